"""Imported at start-up by a submission script that `surgvqa export` (or a test) runs locally with this folder on
PYTHONPATH: the script's `load_dataset` of a hub dataset then reads the local copy named in
$SURGVQA_LOCAL_DATASETS, and its `from_pretrained` of a hub id the run's local folder named in
$SURGVQA_LOCAL_WEIGHTS. Never uploaded: the organizers' runner loads the hub's datasets and weights."""

from surgvqa.export.challenge import redirect_from_pretrained, redirect_load_dataset

redirect_load_dataset()
redirect_from_pretrained()
