"""The ``prepare`` stage: read the raw source, validate every row, split by image, type the questions.

Writes ``<run>/prepared/{train,val,test}.jsonl`` (one :class:`Record` per line), ``rejects.jsonl`` (every rejected
row with its reason), ``vocabulary.json`` (closed candidates per template, from the training split only) and
``summary.json``. The folder is built beside the old one and swapped in at the end, so a failed run never leaves
a half-written ``prepared/`` and never loses the previous one.

A row that prepare keeps never fails a later stage: its image is decoded completely with the same function
training and prediction use (:func:`surgvqa.data.images.decode_image`), its size is one the model's image
processor accepts, and its whole training sample (prompt, answer and image tokens) fits in ``masking.max_length``.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from surgvqa.core.config import Config
from surgvqa.core.io import (
    WriteError,
    atomic_write_json,
    check_not_foreign,
    disk_full_error,
    is_disk_full,
    recover_directory,
    remove_file,
    remove_tree,
    replace_directory,
    write_jsonl,
)
from surgvqa.data.answers import answer_problem, is_bad_answer, normalize_answer
from surgvqa.data.image_store import ImageStore, StoredImage
from surgvqa.data.records import SPLITS, Record, write_records
from surgvqa.data.sources import RawRow, SourceError
from surgvqa.data.text import answer_text, clean_text, question_text
from surgvqa.prompting.sample_length import SampleLengths
from surgvqa.tasks import get_task
from surgvqa.tasks.base import Task, official_split_name

REJECT_REASONS = {
    "not_utf8": "line is not valid UTF-8",
    "bad_json": "line (or JSON array element) is not a JSON object",
    "bad_csv": "line is not a well-formed CSV record",
    "missing_image": "image missing",
    "image_outside_root": "image path escapes the dataset root",
    "image_link_loop": "image path is a symbolic link loop",
    "empty_image": "image has zero bytes",
    "not_an_image": "file is not an image (PIL cannot identify its format)",
    "corrupt_image": "image header cannot be parsed",
    "truncated_image": "image pixel data is truncated or damaged",
    "image_too_large": f"image has more pixels than PIL's decompression-bomb limit ({Image.MAX_IMAGE_PIXELS:,})",
    "unsupported_image_mode": "image mode cannot be converted to RGB",
    "bad_aspect_ratio": "image aspect ratio is beyond what the model's image processor accepts (200:1)",
    "image_size_refused": "the model's image processor refuses the image's size",
    "img_id_conflict": "same img_id as an earlier row but different image bytes",
    "empty_question": "question is empty",
    "bad_question": "question is not text",
    "bad_answer": "answer is empty or nan",
    "special_token_text": "question or answer contains a special token of the model's tokenizer",
    "too_long": "sample longer than masking.max_length tokens",
    "missing_img_id": "no img_id and no image to derive one from",
    "duplicate_row": "same image, question and answer as an earlier row",
    "duplicate_key": "a key is given twice in the row's JSON object",
    "punctuation_answer": "answer (or one of its labels) has no letter or digit",
    "bad_count": "count answer is not a non-negative whole number",
    "bad_original": "the x1 'original' field is not valid JSON",
    "unknown_split": "the row's split is none of the known split names",
    "contradictory_duplicate": "same image and question as another row with another answer "
                               "(data.contradictory_duplicates=drop)",
    "test_row_on_train_image": "official test row on an image of the training split "
                               "(data.drop_leaking_test_rows)",
}
MAX_CONTRADICTIONS_LISTED = 20  # in summary.json; the count covers them all
REJECTS_KEPT_CHARS = 500  # question/answer text kept per reject: enough to find the row, not a 100 kB copy
FAILED_REJECTS_NAME = "prepare-rejects.jsonl"  # beside prepared/ when no row survives and no folder is written


@dataclass
class PrepareResult:
    prepared_dir: Path
    counts: dict[str, int]
    rejects: Counter = field(default_factory=Counter)
    by_type: dict[str, dict[str, int]] = field(default_factory=dict)
    by_template: dict[str, dict[str, int]] = field(default_factory=dict)
    contradictions: dict[str, Any] = field(default_factory=dict)


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _top_reasons(rejects: list[dict[str, Any]], limit: int = 3) -> str:
    counts = Counter(item["reason"] for item in rejects).most_common()
    shown = [f"{number} {reason} ({REJECT_REASONS.get(reason, reason)})" for reason, number in counts[:limit]]
    if len(counts) > limit:
        shown.append(f"{sum(number for _, number in counts[limit:])} other")
    return ", ".join(shown)


def prepare(config: Config, *, quiet: bool = False) -> PrepareResult:
    """Prepare into a staging folder and swap it in for ``prepared/``; any failure leaves the old one as it was."""
    run_dir = config.run_dir
    final_dir = run_dir / "prepared"
    recover_directory(final_dir)  # a swap killed half-way left the previous folder aside
    check_not_foreign(final_dir)  # before the work: prepared/ is replaced whole
    work_dir = run_dir / "prepared.partial"
    remove_tree(work_dir)
    work_dir.mkdir(parents=True)
    try:
        result = _prepare_into(work_dir, final_dir, config, quiet)
    except BaseException as exc:
        shutil.rmtree(work_dir, ignore_errors=True)
        if is_disk_full(exc) and not isinstance(exc, WriteError):  # WriteErrors name their file already
            raise disk_full_error(getattr(exc, "filename", None) or work_dir) from None
        raise
    replace_directory(work_dir, final_dir)
    remove_file(run_dir / FAILED_REJECTS_NAME)  # a failed run's list no longer describes prepared/
    return result


def _prepare_into(work_dir: Path, final_dir: Path, config: Config, quiet: bool) -> PrepareResult:
    task = get_task(config.task)
    source = task.resolve_source(config)
    rows = task.read_rows(config, source)
    lengths = SampleLengths(config)
    reader = _RowReader(task, lengths, ImageStore(work_dir, lengths.image_tokens))
    reader.read_all(rows, config.data.max_rows, quiet)
    contradictions = reader.contradictions(drop=config.data.contradictory_duplicates == "drop")
    _require_kept_rows(reader, source, final_dir)
    needed = _required_splits(config, reader, source)
    outcome = task.assign_splits(reader.records, reader.source_by_image, config)
    reader.reject_dropped(outcome.records)
    if "official_splits" in outcome.summary and "test" not in needed:
        needed.append("test")
    vocabulary = task.build_vocabulary([r for r in outcome.records if r.split == "train"])
    kept = _type_records(task, outcome.records, vocabulary, lengths, reader, config.prompt.list_candidates)
    by_type, by_template = _rows_per_group(task, kept)
    counts = {name: sum(1 for r in kept if r.split == name) for name in SPLITS}
    if empty := [name for name in needed if counts[name] == 0]:
        raise ValueError(f"{source}: split(s) {', '.join(empty)} hold no rows after rejects (rows per split: "
                         f"{counts}); add images or change data.split")
    for name in SPLITS:
        write_records(work_dir / f"{name}.jsonl", [r for r in kept if r.split == name])
    write_jsonl(work_dir / "rejects.jsonl", reader.rejects)
    atomic_write_json(work_dir / "vocabulary.json", {str(k): v for k, v in sorted(vocabulary.items())})
    reject_counts = Counter(item["reason"] for item in reader.rejects)
    split_of_image = {r.img_id: r.split for r in kept}
    summary = {"source": source, "rows_kept": len(kept), "rows_rejected": len(reader.rejects),
               "images": len({r.img_id for r in kept}), "splits": counts,
               "images_per_split": dict(Counter(split_of_image.values())),
               "rejects": dict(reject_counts),
               "longest_sample_tokens": max(lengths.total(r, reader.image_tokens[r.img_id]) for r in kept),
               "by_type": by_type, "by_template": dict(sorted(by_template.items())),
               "contradictory_duplicates": contradictions,
               **({"task": task.name} if task.name != "kvasir-vqa" else {}), **outcome.summary}
    atomic_write_json(work_dir / "summary.json", summary)
    return PrepareResult(final_dir, counts, reject_counts, by_type, by_template, contradictions)


def _reject_entry(raw: RawRow, reason: str, detail: str = "") -> dict[str, Any]:
    question, answer = question_text(raw.question), answer_text(raw.answer)
    return {"origin": clean_text(raw.origin), "reason": reason,
            "detail": clean_text(detail or REJECT_REASONS[reason]), "img_id": raw.img_id,
            "question": (question or "")[:REJECTS_KEPT_CHARS], "answer": (answer or "")[:REJECTS_KEPT_CHARS]}


class _RowReader:
    """Keeps or rejects raw rows one at a time, remembering what earlier rows kept (images, duplicates)."""

    def __init__(self, task: Task, lengths: SampleLengths, store: ImageStore):
        self.task, self.lengths, self.store = task, lengths, store
        self.records: list[Record] = []
        self.rejects: list[dict[str, Any]] = []
        self.image_tokens: dict[str, int] = {}
        # One source per image, the first kept row's: the split stratifies by it.
        self.source_by_image: dict[str, str] = {}
        self.rows_read = 0
        self._seen_rows: set[tuple[str | None, str, str, str]] = set()
        self._questions_per_image: Counter = Counter()
        self.origin_by_id: dict[str, str] = {}  # record id -> its raw row, for rejects made after reading
        # (split, img_id, question) -> {normalised answer: record ids}: one question with two answers is reported.
        self._answers: dict[tuple[str | None, str, str], dict[str, list[str]]] = {}

    def read_all(self, rows: Iterable[RawRow], max_rows: int | None, quiet: bool) -> None:
        for raw in tqdm(rows, desc="prepare: reading rows", unit="row", disable=quiet, mininterval=1.0):
            if max_rows is not None and self.rows_read >= max_rows:
                break
            self.rows_read += 1
            self.read(raw)

    def read(self, raw: RawRow) -> None:
        if raw.img_id is not None:
            raw.img_id = clean_text(raw.img_id)
        if raw.problem:
            return self._reject(raw, raw.problem, raw.detail)
        question, answer = question_text(raw.question), answer_text(raw.answer)
        if raw.img_id is None and raw.image_bytes:
            raw.img_id = hashlib.sha1(raw.image_bytes).hexdigest()[:16]
        if not raw.img_id:
            return self._reject(raw, "missing_img_id")
        if question is None:
            return self._reject(raw, "bad_question",
                                f"question is a {type(raw.question).__name__}: {_preview(raw.question)}")
        if not question:
            return self._reject(raw, "empty_question")
        if answer is None or is_bad_answer(answer):
            invisible = isinstance(raw.answer, str) and raw.answer.strip() and not answer
            return self._reject(raw, "bad_answer", f"answer is {_preview(raw.answer)}"
                                + (": invisible characters only" if invisible else ""))
        if problem := answer_problem(answer, self.task.initial_type(question)):
            return self._reject(raw, *problem)
        if special := self.lengths.special_token_in(question) or self.lengths.special_token_in(answer):
            return self._reject(raw, "special_token_text", f"the text contains the tokenizer's special token "
                                                           f"{special!r}, which would break the chat structure")
        image = self.store.add(raw)
        if image.problem:
            return self._reject(raw, image.problem, image.detail)
        # With shipped splits the same pair may sit in train and test (a leak, counted later), not a duplicate.
        official_split = official_split_name(raw.split) if self.task.official_splits else None
        key = (official_split, raw.img_id, question.lower(), normalize_answer(answer))
        if key in self._seen_rows:
            return self._reject(raw, "duplicate_row")
        record = self._record(raw, question, answer, image, official_split)
        # Measured before the split with no candidates listed: a row this long must not reach the vocabulary.
        if problem := self.lengths.too_long(record, image.image_tokens):
            return self._reject(raw, "too_long", problem)
        self._seen_rows.add(key)
        self._answers.setdefault(key[:3], {}).setdefault(key[3], []).append(record.id)
        self.origin_by_id[record.id] = raw.origin
        self._questions_per_image[raw.img_id] += 1
        self.image_tokens[raw.img_id] = image.image_tokens
        self.source_by_image.setdefault(raw.img_id, record.source)
        self.records.append(record)

    def _record(self, raw: RawRow, question: str, answer: str, image: StoredImage,
                official_split: str | None) -> Record:
        source = self.source_by_image.get(raw.img_id) or clean_text("" if raw.source is None else str(raw.source))
        return Record(id=f"{raw.img_id}-q{self._questions_per_image[raw.img_id]}", img_id=raw.img_id,
                      image=image.reference, question=question, answer=answer, source=source,
                      question_type=self.task.initial_type(question), split=official_split, task=self.task.name,
                      meta=self.task.record_meta(raw))

    def _reject(self, raw: RawRow, reason: str, detail: str = "") -> None:
        self.rejects.append(_reject_entry(raw, reason, detail))

    def reject_record(self, record: Record, reason: str, detail: str) -> None:
        """Reject a row kept at reading, as its raw row would have been."""
        self.rejects.append({"origin": self.origin_by_id.get(record.id, record.id), "reason": reason,
                             "detail": detail, "img_id": record.img_id,
                             "question": record.question[:REJECTS_KEPT_CHARS],
                             "answer": record.answer[:REJECTS_KEPT_CHARS]})

    def contradictions(self, *, drop: bool) -> dict[str, Any]:
        """Questions asked of one image with different answers: counted and listed, their rows rejected when
        ``drop`` (no rule can tell which answer is right)."""
        groups = [(key, answers) for key, answers in self._answers.items() if len(answers) > 1]
        ids = {record_id for _, answers in groups for listed in answers.values() for record_id in listed}
        question_of = {record.id: record.question for record in self.records}
        listed = [{"img_id": img_id, "question": question_of[next(iter(answers.values()))[0]],
                   "answers": sorted(answers),
                   "rows": [self.origin_by_id[i] for ids_ in answers.values() for i in ids_],
                   **({"split": split} if split else {})}
                  for (split, img_id, _), answers in groups[:MAX_CONTRADICTIONS_LISTED]]
        if drop and ids:
            for record in [r for r in self.records if r.id in ids]:
                key = (record.split, record.img_id, record.question.lower())
                self.reject_record(record, "contradictory_duplicate",
                                   f"img_id {record.img_id!r} is asked {record.question[:80]!r} with the answers "
                                   f"{', '.join(map(repr, sorted(self._answers[key])))[:200]}; "
                                   f"data.contradictory_duplicates=drop")
            self.records = [r for r in self.records if r.id not in ids]
            remaining = {record.img_id for record in self.records}
            self.source_by_image = {img_id: source for img_id, source in self.source_by_image.items()
                                    if img_id in remaining}
        return {"questions": len(groups), "rows": len(ids), "action": "dropped" if drop else "kept",
                "listed": listed}

    def reject_dropped(self, kept: list[Record]) -> None:
        """Rows the task's split left out (official test rows on training images) become rejects, not gaps."""
        kept_ids = {record.id for record in kept}
        for record in self.records:
            if record.id not in kept_ids:
                self.reject_record(record, "test_row_on_train_image",
                                   f"official test row on image {record.img_id!r}, which the training split "
                                   f"also holds; data.drop_leaking_test_rows removes these rows")


def _require_kept_rows(reader: _RowReader, source: Any, final_dir: Path) -> None:
    if reader.rows_read == 0:
        raise SourceError(f"{source}: the data source holds no rows")
    if not reader.records:
        failed_rejects = final_dir.parent / FAILED_REJECTS_NAME
        write_jsonl(failed_rejects, reader.rejects)
        raise ValueError(f"{source}: no usable rows: all {len(reader.rejects)} row(s) rejected "
                         f"({_top_reasons(reader.rejects)}); every rejected row is listed in {failed_rejects}")


def _required_splits(config: Config, reader: _RowReader, source: Any) -> list[str]:
    """The splits that must hold rows (a positive fraction), checked against the number of usable images."""
    split = config.data.split
    needed = [name for name, fraction in zip(SPLITS, (split.train, split.val, split.test)) if fraction > 0]
    if len(reader.source_by_image) < len(needed):
        raise ValueError(f"{source}: {len(reader.source_by_image)} usable image(s) after rejects, but splitting by "
                         f"image into {'/'.join(needed)} needs at least {len(needed)} (one per split); "
                         f"{len(reader.rejects)} row(s) were rejected")
    return needed


def _type_records(task: Task, records: list[Record], vocabulary: dict[Any, list[str]], lengths: SampleLengths,
                  reader: _RowReader, list_candidates: bool) -> list[Record]:
    """Type every record against the vocabulary; a record its listed candidates make too long is rejected."""
    typed: list[Record] = []
    for record in records:
        task.type_record(record, vocabulary)
        # Listed candidates lengthen the prompt; measured again now that they are known.
        if list_candidates and record.candidates and \
                (problem := lengths.too_long(record, reader.image_tokens[record.img_id])):
            reader.reject_record(record, "too_long", problem)
            continue
        typed.append(record)
    return typed


def _rows_per_group(task: Task, records: list[Record]) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Rows per split for each question type (every type listed) and for each template group."""
    by_type: dict[str, dict[str, int]] = {t: dict.fromkeys(SPLITS, 0) for t in task.question_types}
    by_template: dict[str, dict[str, int]] = {}
    for record in records:
        by_type[record.question_type][record.split] += 1
        by_template.setdefault(task.group_key(record), dict.fromkeys(SPLITS, 0))[record.split] += 1
    return by_type, by_template


def run(config: Config, *, quiet: bool = False) -> PrepareResult:
    """Prepare the run's data; the summary is printed unless ``quiet`` (a caller printing JSON instead)."""
    result = prepare(config, quiet=quiet)
    if not quiet:
        print_prepare_summary(result)
    return result


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
    if contradictions := result.contradictions.get("questions"):
        first = result.contradictions["listed"][0]
        console.print(f"warning: {contradictions} question(s) asked of the same image with different answers "
                      f"({result.contradictions['rows']} rows, {result.contradictions['action']}; e.g. img_id "
                      f"{first['img_id']!r}: {first['question'][:60]!r} -> {', '.join(first['answers'])[:80]}); "
                      f"listed in {result.prepared_dir / 'summary.json'} under contradictory_duplicates"
                      + ("; data.contradictory_duplicates=drop rejects them" if
                         result.contradictions["action"] == "kept" else ""), markup=False)
    for title, rows in (("question type", result.by_type), ("template", result.by_template)):
        table = Table(title=f"rows per {title}")
        table.add_column(title)
        for name in SPLITS:
            table.add_column(name, justify="right")
        for key, per_split in sorted(rows.items()):
            if any(per_split.values()):
                table.add_row(key, *(str(per_split[name]) for name in SPLITS))
        console.print(table)
