"""The multi-label threshold of rank mode, calibrated on the validation split and cached in the run directory."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from surgvqa.core.config import Config
from surgvqa.core.io import atomic_write_json, file_fingerprint
from surgvqa.data.answers import label_set, normalize_answer
from surgvqa.data.records import read_records
from surgvqa.inference.decoding import calibrate_threshold, is_closed
from surgvqa.inference.distributed import barrier
from surgvqa.inference.predictor import Predictor

log = logging.getLogger(__name__)

THRESHOLD_FILE = "rank_threshold.json"


def validation_key(config: Config, model_path: str, val_path: Path, **settings: str) -> dict[str, Any]:
    """What a value fitted on the validation split depends on: a retrained model (same path, new weights) or a
    re-prepared split must not reuse it."""
    return {"model": str(model_path), "model_files": file_fingerprint(Path(model_path)), "val": str(val_path),
            "val_file": file_fingerprint(val_path), **settings, "strategy": config.masking.strategy,
            "prompt": config.section_hash("prompt", "model")}


def calibrate_on_validation(predictor: Predictor, val_path: Path, batch_size: int, quiet: bool = True
                            ) -> dict[str, Any]:
    """Score the validation split's multi-label records and pick the threshold with the best set-exact match."""
    records = [r for r in read_records(val_path) if is_closed(r) and r.multi_label]
    saved_base, predictor.base_dir = predictor.base_dir, val_path.parent
    examples = []
    try:
        for start in tqdm(range(0, len(records), batch_size), desc="predict: calibrating threshold",
                          disable=quiet, unit="batch"):
            chunk = []
            for record in records[start:start + batch_size]:
                try:
                    chunk.append((record, predictor.encode(record)))
                except Exception as exc:  # noqa: BLE001
                    log.warning("calibration skips %s: %s", record.id, exc)
            if not chunk:
                continue
            sets = [predictor.candidates(record) for record, _ in chunk]
            scores = predictor.score([features for _, features in chunk], sets)
            examples += [(tuple(normalize_answer(label) for label in cs.labels), row, label_set(record.answer))
                         for (record, _), cs, row in zip(chunk, sets, scores)]
    finally:
        predictor.base_dir = saved_base
    threshold, match = calibrate_threshold(examples)
    return {"threshold": threshold if math.isfinite(threshold) else None, "set_exact_match": match,
            "records": len(examples), "score": "mean log-probability per token (label + end token)"}


def _cached(cache: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    if cache.is_file():
        payload = json.loads(cache.read_text(encoding="utf-8"))
        if payload.get("key") == key:
            return payload
    return None


def resolve_threshold(config: Config, get_predictor: Callable[[], Predictor], model_path: str, val_path: Path,
                      rank: int, world: int, quiet: bool) -> float | None:
    """``predict.multi_label_threshold``, or the value calibrated on ``val_path`` (by rank 0, cached)."""
    if config.predict.multi_label_threshold is not None:
        return config.predict.multi_label_threshold
    cache = config.run_dir / THRESHOLD_FILE
    key = validation_key(config, model_path, val_path)
    if rank == 0 and _cached(cache, key) is None:
        if val_path.is_file():
            payload = calibrate_on_validation(get_predictor(), val_path, config.predict.batch_size, quiet)
        else:
            log.warning("%s not found: multi-label records get their best label only", val_path)
            payload = {"threshold": None, "set_exact_match": None, "records": 0, "score": "none: no validation"}
        atomic_write_json(cache, {**payload, "key": key})
    barrier(world)
    payload = _cached(cache, key)
    return None if payload is None else payload["threshold"]
