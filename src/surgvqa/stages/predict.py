"""The ``predict`` stage: batched, resumable inference over prepared JSONL to ``predictions.jsonl``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from surgvqa.core.config import PREDICT_MODES, Config
from surgvqa.core.faults import failpoint
from surgvqa.core.io import (
    append_lines,
    atomic_write_json,
    atomic_write_text,
    content_digest,
    file_fingerprint,
    jsonl_text,
)
from surgvqa.data.records import Record, read_records
from surgvqa.inference.confidence import apply_calibration, fit_on_rows, wants_calibration
from surgvqa.inference.decoding import is_closed
from surgvqa.inference.distributed import barrier, process_group
from surgvqa.inference.prediction_files import (
    discard_predictions,
    image_reference,
    latest_rows,
    merge_rank_files,
    pending_batches,
    prediction_row,
    rank_file,
    rank_files,
    read_done,
    write_in_input_order,
)
from surgvqa.inference.predictor import LazyPredictor, Predictor, default_model_path
from surgvqa.inference.rank_threshold import resolve_threshold, validation_key

log = logging.getLogger(__name__)


def made_with_path(out: Path) -> Path:
    """The file beside a predictions file that says what its rows were predicted with."""
    return out.with_name(f"{out.stem}.made_with.json")


def prediction_key(config: Config, mode: str, model_path: str, data: Path) -> dict[str, Any]:
    """What a predictions file's rows depend on: rows made with another mode, model (or the same path retrained),
    input file, prompt or masking strategy must not be resumed as if they were this run's."""
    return {"mode": mode, "model": str(model_path), "model_files": file_fingerprint(Path(model_path)),
            "data": str(data.absolute()), "data_file": content_digest(data),  # the same split prepared again: same
            "prompt": config.section_hash("prompt", "model"), "strategy": config.masking.strategy}


def _differences(earlier: dict[str, Any], now: dict[str, Any]) -> str:
    def changed(field: str) -> bool:
        return earlier.get(field) != now.get(field)

    said = []
    if changed("mode"):
        said.append(f"mode {earlier.get('mode')} (now {now['mode']})")
    if changed("model"):
        said.append(f"model {earlier.get('model')} (now {now['model']})")
    elif changed("model_files"):
        said.append(f"model {now['model']} as it was before its files changed")
    if changed("data"):
        said.append(f"data {earlier.get('data')} (now {now['data']})")
    elif changed("data_file"):
        said.append(f"data {now['data']} as it was before it changed")
    if changed("prompt") or changed("strategy"):
        said.append("another prompt or model section")
    return ", ".join(said)


def _check_made_with(out: Path, key: dict[str, Any], restart: bool, replace_other: bool, rank: int,
                     world: int) -> None:
    """Resume ``out`` only if its rows were made with ``key``; otherwise refuse, or start afresh when asked to."""
    record = made_with_path(out)
    earlier = None
    if record.is_file():
        try:
            earlier = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            earlier = {}  # unreadable: nothing vouches for the rows, so they count as made with something else
    holds_rows = out.exists() or bool(rank_files(out))
    other = holds_rows and earlier is not None and earlier != key
    if other and not (restart or replace_other):
        raise ValueError(f"{out} holds predictions made with {_differences(earlier, key) or 'other settings'}: "
                         "predict into another file (--out), or start this one afresh (--restart)")
    if rank == 0:
        if restart or other:
            discard_predictions(out)
        atomic_write_json(record, key)
    barrier(world)  # no rank appends before rank 0 has discarded what is not to be resumed


def run(config: Config, mode: str | None = None, data: Path | None = None, out: Path | None = None,
                model_path: str | None = None, quiet: bool = False,
                load_predictor: Callable[[], Predictor] | None = None, *, restart: bool = False,
                replace_other: bool = False) -> Path:
    """Predict every record of ``data`` into ``out`` (resuming, retrying rows in error), and return ``out``.

    ``out`` is resumed only if its rows were made with the same mode, model, input and prompt (``<out
    stem>.made_with.json`` says with what); otherwise this refuses, unless ``restart`` (start afresh in any case)
    or ``replace_other`` (start afresh only then: the pipeline, whose stage ledger decides). ``load_predictor``:
    where the model comes from when one is needed (another run's, already loaded); default: loaded from
    ``model_path``. Whether the rows left in error are acceptable is the caller's question: see
    :func:`surgvqa.inference.prediction_errors.check_error_rate`.
    """
    mode = mode or config.predict.mode
    if mode not in PREDICT_MODES:
        raise ValueError(f"unknown predict mode {mode!r}; expected one of {PREDICT_MODES}")
    data = Path(data) if data is not None else config.run_dir / "prepared" / f"{config.predict.split}.jsonl"
    out = Path(out) if out is not None else config.run_dir / "predictions.jsonl"
    records = _read_input(data)
    model_path = model_path or default_model_path(config)
    with process_group() as (rank, world):
        out.parent.mkdir(parents=True, exist_ok=True)
        _check_made_with(out, prediction_key(config, mode, model_path, data), restart, replace_other, rank, world)
        target, latest = _resume(out, records, rank, world)
        batches = pending_batches(records[rank::world], config.predict.batch_size, latest)
        predictor = LazyPredictor(config, model_path, data.parent, quiet, load_predictor)
        # Decided from what every rank sees alike, because calibration ends with a barrier.
        scope = records if world > 1 else [record for batch in batches for record in batch]
        threshold = _rank_threshold(config, mode, scope, data, predictor, model_path, rank, world, quiet)
        progress = tqdm(total=sum(map(len, batches)), desc=f"predict ({mode})", unit="record",
                        disable=quiet or rank != 0)
        for batch in batches:
            _append_predictions(predictor(), batch, mode, threshold, target, data.parent, out.parent)
            progress.update(len(batch))
        progress.close()
        _write_in_input_order(out, records, rank, world)
        if wants_calibration(config.predict):
            calibrate_predictions(config, mode, data, out, model_path, rank, world, quiet, predictor)
    return out


def _read_input(data: Path) -> list[Record]:
    if not data.is_file():
        raise FileNotFoundError(f"{data} not found: run `surgvqa prepare` first (or pass --data)")
    records = read_records(data)
    if not records:
        raise ValueError(f"{data}: no records to predict (an empty split: prepare needs more images)")
    return records


def _resume(out: Path, records: Sequence[Record], rank: int, world: int) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The file this process appends to, and the latest row per id already predicted."""
    if world == 1 and rank_files(out):
        merge_rank_files(out, records)  # the shards of an interrupted multi-process run
    target = rank_file(out, rank) if world > 1 else out
    # Under several ranks the merged file of an earlier run is read-only here: rank 0 rewrites it at the end.
    earlier = read_done(out, repair=False) if world > 1 else []
    return target, latest_rows([*earlier, *read_done(target)])


def validation_split(config: Config, data: Path) -> Path:
    """The validation split beside ``data``, else the run's prepared one."""
    val = data.parent / "val.jsonl"
    return val if val.is_file() else config.run_dir / "prepared" / "val.jsonl"


def _rank_threshold(config: Config, mode: str, scope: Sequence[Record], data: Path, predictor: LazyPredictor,
                    model_path: str, rank: int, world: int, quiet: bool) -> float | None:
    """The multi-label threshold, when rank mode takes one (``predict.multi_label_rank: threshold``) and
    ``scope`` holds a multi-label record."""
    if mode != "rank" or config.predict.multi_label_rank != "threshold" \
            or not any(is_closed(r) and r.multi_label for r in scope):
        return None
    return resolve_threshold(config, predictor, model_path, validation_split(config, data), rank, world, quiet)


def _append_predictions(predictor: Predictor, batch: list[Record], mode: str, threshold: float | None,
                        target: Path, data_dir: Path, out_dir: Path) -> None:
    """Predict one batch and append its rows to ``target``, forced to disk."""
    predictor.threshold = threshold
    outcomes = predictor.predict_batch(batch, mode)
    text = jsonl_text(prediction_row(record, image_reference(record, data_dir, out_dir), outcome, mode)
                      for record, outcome in zip(batch, outcomes))
    # A kill in the middle of an append: half a batch of lines reaches the disk.
    failpoint("predict.append", partial(append_lines, target, [text[: len(text) // 2]]))
    append_lines(target, [text])


def _write_in_input_order(out: Path, records: Sequence[Record], rank: int, world: int) -> None:
    """One row per id in input order; under several ranks, rank 0 merges the shards once every rank is done."""
    if world == 1:
        write_in_input_order(out, latest_rows(read_done(out)), records)
        return
    barrier(world)
    if rank == 0:
        merge_rank_files(out, records)
    barrier(world)


def calibration_files(out: Path) -> tuple[Path, Path]:
    """(the validation split's predictions, the fitted calibration) beside ``out``."""
    return out.with_name(f"{out.stem}.val{out.suffix}"), out.with_name(f"{out.stem}.calibration.json")


def calibrate_predictions(config: Config, mode: str, data: Path, out: Path, model_path: str, rank: int,
                          world: int, quiet: bool, load_predictor: Callable[[], Predictor] | None = None
                          ) -> dict[str, Any] | None:
    """Fit what ``predict.calibration`` / ``conformal_alpha`` / ``abstain`` ask for on the validation split's
    predictions (made with the same model and mode; ``out`` itself when it is the validation split), save it
    beside ``out`` and rewrite ``out`` with it applied. Returns the calibration (None: no validation split)."""
    val = validation_split(config, data)
    val_out, calibration_path = calibration_files(out)
    if val.is_file() and val.resolve() == data.resolve():
        val_out = out
    elif not val.is_file():
        log.warning("%s not found: predictions keep the model's own confidences, without calibration", val)
        return None
    else:
        key = validation_key(config, model_path, val, mode=mode)
        if rank == 0:
            saved = json.loads(calibration_path.read_text(encoding="utf-8")) if calibration_path.is_file() else {}
            if saved.get("key") != key:  # predictions of another model or split must not be resumed
                discard_predictions(val_out)
                atomic_write_json(calibration_path, {"key": key})
        barrier(world)
        plain = config.predict.model_copy(update={"calibration": "none", "conformal_alpha": None, "abstain": False})
        run(config.model_copy(update={"predict": plain}), mode, val, val_out, model_path, quiet,
                    load_predictor)
    calibration = None
    if rank == 0:
        rows = list(latest_rows(read_done(val_out, repair=False)).values())
        calibration = {**fit_on_rows(rows, config.predict, config.evaluate), "validation": str(val_out)}
        saved = json.loads(calibration_path.read_text(encoding="utf-8")) if calibration_path.is_file() else {}
        atomic_write_json(calibration_path, {**calibration, "key": saved.get("key")})
        atomic_write_text(out, jsonl_text(apply_calibration(row, calibration, config.predict.abstain)
                                          for row in read_done(out)))
    barrier(world)
    return calibration
