"""A predictions file on disk, resumable: the rows it holds, the batches it still needs, its rank shards merged."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgvqa.core.io import JsonlLineError, atomic_write_text, jsonl_text, remove_file
from surgvqa.data.records import Record, image_path
from surgvqa.inference.confidence import row_fields
from surgvqa.inference.predictor import Outcome

log = logging.getLogger(__name__)


def prediction_row(record: Record, image: str, outcome: Outcome, mode: str) -> dict[str, Any]:
    return {
        "id": record.id,
        "img_id": record.img_id,
        "image": image,
        "question": record.question,
        "question_type": record.question_type,
        "template": record.template,
        "answer": record.answer,
        "prediction": outcome.prediction,
        "raw_text": outcome.raw_text,
        "mode": outcome.method or mode,
        "scores": outcome.scores,
        "error": outcome.error,
        "multi_label": record.multi_label,
        "candidates": record.candidates,
        "task": record.task,
        "meta": record.meta,
        **row_fields(outcome.confidence),
    }


def image_reference(record: Record, base_dir: Path, out_dir: Path) -> str:
    """The record's image as a predictions file in ``out_dir`` names it: relative to that folder."""
    path = image_path(record, base_dir).absolute()
    try:
        return os.path.relpath(path, out_dir.absolute())
    except ValueError:  # another drive (Windows)
        return str(path)


def read_done(path: Path, *, repair: bool = True) -> list[dict[str, Any]]:
    """Rows already in a predictions file; a torn last line (a kill mid-write) is dropped, and with ``repair``
    cut from the file so that appending continues on a line boundary. A broken line elsewhere is an error."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    torn = lines.pop().strip() != b""  # the text after the last newline: a line that never got its newline
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            row = None
        if not isinstance(row, dict) or "id" not in row:
            if number == len(lines) and not torn:
                torn = True
                lines.pop()
                break
            raise JsonlLineError(f"{path}:{number}: not a prediction row; remove or fix the file")
        rows.append(row)
    if torn and repair:
        log.warning("%s: dropping a half-written last line left by an interrupted run", path)
        atomic_write_text(path, "".join(line.decode("utf-8") + "\n" for line in lines if line.strip()))
    return rows


def latest_rows(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per id: the last one written (a retried row is appended after the failed attempt it replaces)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        latest.pop(row["id"], None)
        latest[row["id"]] = row
    return latest


def pending_batches(records: Sequence[Record], batch_size: int, latest: dict[str, dict[str, Any]]
                    ) -> list[list[Record]]:
    """The records each fixed input batch still needs: a batch that never completed is predicted whole, done rows
    included, so that it keeps the padding an uninterrupted run gives it; failed rows are retried on their own."""
    batches = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        pending = [record for record in batch
                   if record.id not in latest or latest[record.id].get("error") is not None]
        if any(record.id in latest for record in pending):
            batches.append(pending)
        elif pending:
            batches.append(list(batch))
    return batches


def write_in_input_order(out: Path, by_id: dict[str, dict[str, Any]], records: Sequence[Record]) -> int:
    """Rewrite ``out`` atomically with one row per id in input order; rows of ids not in this input are kept,
    after the others. Returns the row count."""
    by_id = dict(by_id)
    ordered = [by_id.pop(record.id) for record in records if record.id in by_id]
    rows = ordered + list(by_id.values())
    atomic_write_text(out, jsonl_text(rows))
    return len(rows)


def rank_file(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank}{out.suffix}")


def rank_files(out: Path) -> list[Path]:
    """The per-rank shards beside ``out``, by rank (of this run or an interrupted one, whatever its world size)."""
    def rank(path: Path) -> int:
        number = path.stem.rsplit(".rank", 1)[1]
        return int(number) if number.isdigit() else -1

    return sorted(out.parent.glob(f"{out.stem}.rank*{out.suffix}"), key=rank)


def merge_rank_files(out: Path, records: Sequence[Record]) -> int:
    """Fold every per-rank file into ``out``: input order, one row per id (the newest attempt: ``out`` is older
    than the rank files). Returns the row count."""
    parts = rank_files(out)
    rows = [row for path in [out, *parts] for row in read_done(path, repair=False)]
    count = write_in_input_order(out, latest_rows(rows), records)
    for path in parts:
        path.unlink()
    return count


def discard_predictions(out: Path) -> None:
    """Delete a predictions file and its rank shards, so that nothing of it is resumed (a rerun merges leftover
    shards into the file)."""
    for path in [out, *rank_files(out), out.with_name(f"{out.stem}.made_with.json")]:
        remove_file(path)
