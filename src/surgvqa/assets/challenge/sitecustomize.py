"""Imported at start-up by a submission script that `surgvqa export` (or a test) runs locally with this folder on
PYTHONPATH: the script's `load_dataset` of a hub dataset then reads the local copy named in
$SURGVQA_LOCAL_DATASETS. Never uploaded: the organizers' runner loads the hub's datasets."""

from surgvqa.export.challenge import redirect_load_dataset

redirect_load_dataset()
