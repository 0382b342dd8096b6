"""The ``prepare`` stage: read the raw source, validate every row, split by image, type the questions.

Writes ``<run>/prepared/{train,val,test}.jsonl`` (one :class:`Record` per line), ``rejects.jsonl`` (every rejected
row with its reason), ``vocabulary.json`` (closed candidates per template, from the training split only) and
``summary.json``. The folder is built beside the old one and swapped in at the end, so a failed run never leaves
a half-written ``prepared/``.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from surgvqa.config import Config
from surgvqa.data.records import SPLITS, Record, write_records
from surgvqa.data.schema import (
    QUESTION_TYPES,
    build_candidate_vocabulary,
    is_bad_answer,
    normalize_answer,
    typed_record_fields,
)
from surgvqa.data.sources import RawRow, iter_raw_rows
from surgvqa.data.split import split_images
from surgvqa.io import atomic_write_json, write_jsonl

REJECT_REASONS = {
    "not_utf8": "line is not valid UTF-8",
    "bad_json": "line is not a JSON object",
    "missing_image": "image missing",
    "image_outside_root": "image path escapes the dataset root",
    "empty_image": "image has zero bytes",
    "corrupt_image": "image cannot be decoded",
    "empty_question": "question is empty",
    "bad_answer": "answer is empty or nan",
    "missing_img_id": "no img_id and no image to derive one from",
    "duplicate_row": "same image, question and answer as an earlier row",
}


@dataclass
class PrepareResult:
    prepared_dir: Path
    counts: dict[str, int]
    rejects: Counter = field(default_factory=Counter)
    by_type: dict[str, dict[str, int]] = field(default_factory=dict)
    by_template: dict[str, dict[str, int]] = field(default_factory=dict)


def synthetic_source(config: Config) -> Path:
    """Build (once) and return the synthetic Kvasir-like parquet the default config trains on."""
    from surgvqa.data.synthetic import make_synthetic

    settings = config.data.synthetic
    folder = Path(config.cache_dir) / f"synthetic-{settings.images}img-seed{settings.seed}-{settings.image_size}px"
    marker = folder / ".complete"
    if not marker.exists():
        make_synthetic(folder, images=settings.images, seed=settings.seed, image_size=settings.image_size)
        marker.write_text("ok\n")
    return next(folder.glob("*.parquet"))


def _safe_name(img_id: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", img_id).strip("._") or "image"
    if cleaned != img_id:  # keep distinct ids distinct after cleaning
        cleaned += "-" + hashlib.sha1(img_id.encode()).hexdigest()[:8]
    return cleaned


def _check_image(data: bytes) -> tuple[str | None, str]:
    """Return (problem, image format) for encoded image bytes."""
    if not data:
        return "empty_image", ""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = (image.format or "png").lower()
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return "corrupt_image", str(exc)
    return None, image_format


class _ImageStore:
    """Checks each image once per img_id and writes embedded bytes to ``images/`` under the prepared folder."""

    def __init__(self, prepared_dir: Path):
        self.images_dir = prepared_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.seen: dict[str, tuple[str | None, str]] = {}

    def add(self, raw: RawRow) -> tuple[str | None, str]:
        """Return (problem, image reference relative to the prepared folder or absolute)."""
        if raw.img_id in self.seen:
            return self.seen[raw.img_id]
        if raw.image_bytes is not None:
            problem, image_format = _check_image(raw.image_bytes)
            reference = ""
            if problem is None:
                name = f"images/{_safe_name(raw.img_id)}.{image_format.replace('jpeg', 'jpg')}"
                (self.images_dir.parent / name).write_bytes(raw.image_bytes)
                reference = name
        elif raw.image_file is not None:
            if not raw.image_file.is_file():
                problem, reference = "missing_image", ""
            else:
                problem, _ = _check_image(raw.image_file.read_bytes())
                reference = str(raw.image_file)
        else:
            problem, reference = "missing_image", ""
        self.seen[raw.img_id] = (problem, reference)
        return problem, reference


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def prepare(config: Config, *, quiet: bool = False) -> PrepareResult:
    run_dir = config.run_dir
    final_dir = run_dir / "prepared"
    work_dir = run_dir / "prepared.partial"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)

    source = str(synthetic_source(config)) if config.data.source == "synthetic" else config.data.source
    rows = iter_raw_rows(source, config.data.format, image_root=config.data.image_root,
                         hub_split=config.data.hub_split, cache_dir=config.cache_dir)
    store = _ImageStore(work_dir)
    rejects: list[dict[str, Any]] = []
    kept: list[Record] = []
    seen_rows: set[tuple[str, str, str]] = set()
    questions_per_image: Counter = Counter()
    source_by_image: dict[str, str] = {}

    def reject(raw: RawRow, reason: str, detail: str = "") -> None:
        rejects.append({"origin": raw.origin, "reason": reason, "detail": detail or REJECT_REASONS[reason],
                        "img_id": raw.img_id, "question": _text(raw.question), "answer": _text(raw.answer)})

    for index, raw in enumerate(tqdm(rows, desc="prepare: reading rows", unit="row", disable=quiet,
                                     mininterval=1.0)):
        if config.data.max_rows is not None and index >= config.data.max_rows:
            break
        if raw.problem:
            reject(raw, raw.problem, raw.detail)
            continue
        question, answer = _text(raw.question), _text(raw.answer)
        if raw.img_id is None and raw.image_bytes:
            raw.img_id = hashlib.sha1(raw.image_bytes).hexdigest()[:16]
        if not raw.img_id:
            reject(raw, "missing_img_id")
            continue
        if not question:
            reject(raw, "empty_question")
            continue
        if is_bad_answer(raw.answer):
            reject(raw, "bad_answer", f"answer is {raw.answer!r}")
            continue
        problem, reference = store.add(raw)
        if problem:
            reject(raw, problem)
            continue
        key = (raw.img_id, question.lower(), normalize_answer(answer))
        if key in seen_rows:
            reject(raw, "duplicate_row")
            continue
        seen_rows.add(key)
        source_by_image.setdefault(raw.img_id, _text(raw.source))
        number = questions_per_image[raw.img_id]
        questions_per_image[raw.img_id] += 1
        kept.append(Record(id=f"{raw.img_id}-q{number}", img_id=raw.img_id, image=reference, question=question,
                           answer=answer, source=source_by_image[raw.img_id]))

    if not kept:
        raise ValueError(f"{source}: no usable rows ({len(rejects)} rejected; see {work_dir / 'rejects.jsonl'})")

    split = config.data.split
    assignment = split_images(source_by_image, (split.train, split.val, split.test), seed=split.seed)
    for record in kept:
        record.split = assignment[record.img_id]

    vocabulary = build_candidate_vocabulary((r.question, r.answer) for r in kept if r.split == "train")
    by_type: dict[str, dict[str, int]] = {t: dict.fromkeys(SPLITS, 0) for t in QUESTION_TYPES}
    by_template: dict[str, dict[str, int]] = {}
    for record in kept:
        typed = typed_record_fields(record.question, vocabulary)
        record.question_type = typed["question_type"]
        record.template = typed["template"]
        record.multi_label = typed["multi_label"]
        record.candidates = list(typed["candidates"])
        by_type[record.question_type][record.split] += 1
        template_key = f"{record.template:02d}" if record.template else "none"
        by_template.setdefault(template_key, dict.fromkeys(SPLITS, 0))[record.split] += 1

    counts = {}
    for name in SPLITS:
        counts[name] = write_records(work_dir / f"{name}.jsonl", [r for r in kept if r.split == name])
    write_jsonl(work_dir / "rejects.jsonl", rejects)
    atomic_write_json(work_dir / "vocabulary.json", {str(k): v for k, v in sorted(vocabulary.items())})
    reject_counts = Counter(item["reason"] for item in rejects)
    summary = {"source": source, "rows_kept": len(kept), "rows_rejected": len(rejects),
               "images": len(source_by_image), "splits": counts,
               "images_per_split": dict(Counter(assignment.values())), "rejects": dict(reject_counts),
               "by_type": by_type, "by_template": dict(sorted(by_template.items()))}
    atomic_write_json(work_dir / "summary.json", summary)

    # Swap the finished folder in; the previous one survives any failure above.
    if final_dir.exists():
        old = run_dir / "prepared.old"
        shutil.rmtree(old, ignore_errors=True)
        final_dir.rename(old)
        work_dir.rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work_dir.rename(final_dir)
    return PrepareResult(final_dir, counts, reject_counts, by_type, by_template)


def print_prepare_summary(result: PrepareResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True, highlight=False)
    counts = result.counts
    console.print(f"prepared {sum(counts.values())} rows -> {result.prepared_dir} "
                  f"(train {counts['train']}, val {counts['val']}, test {counts['test']})")
    for reason, number in sorted(result.rejects.items()):
        console.print(f"rejected {number} row(s): {REJECT_REASONS.get(reason, reason)} [{reason}] "
                      f"(see {result.prepared_dir / 'rejects.jsonl'})", markup=False)
    for title, rows in (("question type", result.by_type), ("template", result.by_template)):
        table = Table(title=f"rows per {title}")
        table.add_column(title)
        for name in SPLITS:
            table.add_column(name, justify="right")
        for key, per_split in sorted(rows.items()):
            if any(per_split.values()):
                table.add_row(key, *(str(per_split[name]) for name in SPLITS))
        console.print(table)
