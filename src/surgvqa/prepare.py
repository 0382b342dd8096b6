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
import json
import math
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from surgvqa.chat import render_training, training_target
from surgvqa.config import Config
from surgvqa.data.answers import is_bad_answer, normalize_answer
from surgvqa.data.images import ImageProblem, decode_image
from surgvqa.data.records import SPLITS, Record, write_records
from surgvqa.data.sources import RawRow, SourceError
from surgvqa.io import atomic_write_json, atomic_write_text, recover_directory, replace_directory, write_jsonl
from surgvqa.tasks import get_task
from surgvqa.tasks.base import official_split_name

REJECT_REASONS = {
    "not_utf8": "line is not valid UTF-8",
    "bad_json": "line is not a JSON object",
    "missing_image": "image missing",
    "image_outside_root": "image path escapes the dataset root",
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
}
MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize raises above it; used only to name the reason
REJECTS_KEPT_CHARS = 500  # question/answer text kept per reject: enough to find the row, not a 100 kB copy
FAILED_REJECTS_NAME = "prepare-rejects.jsonl"  # beside prepared/ when no row survives and no folder is written

# Control characters (NUL included) and lone surrogates are removed from text: they mean nothing in a question,
# a NUL ends strings in C code under the tokenizer, and a lone surrogate cannot be written as UTF-8. Tab and
# newline stay. A regular expression because no library function removes exactly these.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


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
        atomic_write_text(marker, "ok\n")
    return next(folder.glob("*.parquet"))


def synthetic_x1_source(config: Config) -> Path:
    """Build (once) and return the folder of the synthetic Kvasir-VQA-x1 set (``parquet/``, ``save_to_disk/``,
    and the Kvasir-VQA parquet its images are joined from, ``kvasir-vqa/``)."""
    from surgvqa.data.synthetic_x1 import make_synthetic_x1

    settings = config.data.synthetic
    folder = Path(config.cache_dir) / (f"synthetic-x1-{settings.images}img-seed{settings.seed}-"
                                       f"{settings.image_size}px")
    marker = folder / ".complete"
    if not marker.exists():
        make_synthetic_x1(folder, images=settings.images, seed=settings.seed, image_size=settings.image_size)
        atomic_write_text(marker, "ok\n")
    return folder


def _safe_name(img_id: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", img_id).strip("._") or "image"
    if cleaned != img_id:  # keep distinct ids distinct after cleaning
        cleaned += "-" + hashlib.sha1(img_id.encode()).hexdigest()[:8]
    return cleaned


def clean_text(value: str) -> str:
    return _UNPRINTABLE.sub("", value).strip()


def question_text(value: Any) -> str | None:
    """The question as clean text; None when it is not text at all (a list or an object)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (str, int, float)):
        return clean_text(str(value))
    return None


def answer_text(value: Any) -> str | None:
    """The answer as clean text; a list of labels (a JSON array, a parquet list) becomes the multi-label "a; b".

    None when the value is no answer (a JSON object).
    """
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy values from parquet/datasets
        value = value.tolist()
    if isinstance(value, str):
        text = clean_text(value)
        if text.startswith("[") and text.endswith("]"):  # a list written into a CSV cell as JSON
            try:
                parsed = json.loads(text)
            except ValueError:
                return text
            return answer_text(parsed) if isinstance(parsed, list) else text
        return text
    if isinstance(value, (list, tuple)):
        labels = [answer_text(item) for item in value if item is not None]
        if any(label is None for label in labels):
            return None
        return "; ".join(label for label in labels if label)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, dict):
        return None
    return clean_text(str(value))


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class _StoredImage:
    problem: str | None
    detail: str = ""
    reference: str = ""
    digest: str = ""
    path: Path | None = None
    origin: str = ""  # the first row that carried this img_id
    image_tokens: int = 0


class _ImageStore:
    """Decodes each img_id's image once, writes embedded bytes to ``images/`` under the prepared folder and
    refuses a later row whose img_id names different image bytes."""

    def __init__(self, prepared_dir: Path, image_tokens: Callable[[int, int], int]):
        self.images_dir = prepared_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.image_tokens = image_tokens
        self.by_id: dict[str, _StoredImage] = {}
        # The Kvasir export repeats an image's bytes on each of its question rows, one after the other:
        # comparing with the previous row's bytes spares hashing them again.
        self._previous: tuple[str, bytes] | None = None

    def add(self, raw: RawRow) -> _StoredImage:
        img_id = raw.img_id
        known = self.by_id.get(img_id)
        if known is not None:
            if raw.image_file is not None and raw.image_file == known.path:
                return known
            if raw.image_bytes is not None and self._previous == (img_id, raw.image_bytes):
                return known
        # A second image under a known img_id is only compared: writing it would replace the first one's file.
        image = self._load(raw, write=known is None)
        image.origin, image.path = raw.origin, raw.image_file
        if known is None:
            self.by_id[img_id] = image
        elif not image.digest:  # this row's own file could not be read
            return image
        elif image.digest != known.digest:
            return _StoredImage("img_id_conflict", f"img_id {img_id!r} was first read at {known.origin} with "
                                                   f"different image bytes; give each image its own img_id")
        else:
            image = known
        if raw.image_bytes is not None:
            self._previous = (img_id, raw.image_bytes)
        return image

    def _load(self, raw: RawRow, *, write: bool) -> _StoredImage:
        if raw.image_bytes is not None:
            data = raw.image_bytes
        elif raw.image_file is not None:
            try:
                data = raw.image_file.read_bytes()
            except OSError as exc:
                return _StoredImage("missing_image", f"cannot read image file {raw.image_file} "
                                                     f"({exc.strerror or type(exc).__name__})")
        else:
            return _StoredImage("missing_image", "no image")
        digest = hashlib.sha1(data).hexdigest()
        where = str(raw.image_file) if raw.image_file is not None else "embedded image"
        if not data:
            return _StoredImage("empty_image", f"{where} has zero bytes", digest=digest)
        try:
            image, image_format = decode_image(data)
        except ImageProblem as exc:
            return _StoredImage(exc.reason, f"{where}: {exc}", digest=digest)
        # The processor's own size rule: it refuses an aspect ratio over 200 and scales tiny images up to
        # min_pixels (a 1x1 image encodes as 4 tokens), so tiny images are kept.
        try:
            tokens = self.image_tokens(image.width, image.height)
        except ValueError as exc:
            ratio = max(image.size) / min(image.size)
            reason = "bad_aspect_ratio" if ratio > MAX_ASPECT_RATIO else "image_size_refused"
            return _StoredImage(reason, f"{where} is {image.width}x{image.height}; the image processor refuses "
                                        f"it ({exc})", digest=digest)
        if raw.image_file is not None:
            reference = str(raw.image_file)
        else:
            reference = f"images/{_safe_name(raw.img_id)}.{image_format.replace('jpeg', 'jpg')}"
            if write:
                (self.images_dir.parent / reference).write_bytes(data)
        return _StoredImage(None, reference=reference, digest=digest, image_tokens=tokens)


class SampleLengths:
    """The token length of a sample exactly as :func:`surgvqa.dataset.encode_example` encodes it.

    Computed from the tokenizer and the image processor's own resize rule instead of running every image
    through the processor, which would make prepare minutes slower at Kvasir scale: the image placeholder is a
    special token, so the text around it tokenizes the same before and after it expands to the image tokens.
    """

    def __init__(self, config: Config, processor: Any = None):
        self.config = config
        self.prompt = config.prompt
        self.strategy = config.masking.strategy
        self.max_length = config.masking.max_length
        self._processor = processor
        self._special_tokens: list[str] | None = None
        self._text_tokens: dict[tuple, int] = {}

    @property
    def processor(self) -> Any:
        """Loaded at the first row that needs it: a source that fails before its first row costs no model load."""
        if self._processor is None:
            self._processor = _load_processor(self.config)
        return self._processor

    @property
    def special_tokens(self) -> list[str]:
        if self._special_tokens is None:
            self._special_tokens = sorted(self.processor.tokenizer.get_added_vocab(), key=len, reverse=True)
        return self._special_tokens

    def image_tokens(self, width: int, height: int) -> int:
        image_processor = self.processor.image_processor
        patches = image_processor.get_number_of_image_patches(height, width, {})
        return patches // image_processor.merge_size ** 2

    def special_token_in(self, text: str) -> str | None:
        return next((token for token in self.special_tokens if token in text), None)

    def text_tokens(self, record: Record) -> int:
        """Tokens of the rendered conversation other than the image's (its one placeholder excluded)."""
        # Keyed by what the rendering reads; Kvasir repeats a few thousand question/answer pairs over 58k rows.
        key = (record.question, training_target(record, self.prompt), record.question_type,
               tuple(record.candidates), record.source, record.task)
        if key not in self._text_tokens:
            rendered = render_training(self.processor, record, self.prompt, self.strategy)
            self._text_tokens[key] = len(self.processor.tokenizer(rendered.text)["input_ids"]) - 1
        return self._text_tokens[key]

    def total(self, record: Record, image_tokens: int) -> int:
        return self.text_tokens(record) + image_tokens

    def too_long(self, record: Record, image_tokens: int) -> str | None:
        """None when the sample fits, else a message that names the length and what makes it long."""
        total = self.total(record, image_tokens)
        if total <= self.max_length:
            return None
        text = self.text_tokens(record)
        empty = Record(id=record.id, img_id=record.img_id, image=record.image, question="", answer="",
                       source=record.source, question_type=record.question_type, task=record.task)
        listed = f" with its {len(record.candidates)} listed candidates" if self.prompt.list_candidates and \
            record.candidates else ""
        if self.total(empty, image_tokens) <= self.max_length:
            return (f"{total} tokens ({text} text + {image_tokens} image) exceed masking.max_length="
                    f"{self.max_length}: the question/answer text{listed} is too long "
                    f"(question {len(record.question):,} chars, answer {len(record.answer):,} chars)")
        return (f"{total} tokens ({text} text + {image_tokens} image) exceed masking.max_length={self.max_length} "
                f"even with an empty question and answer: lower model.max_pixels (image tokens) or raise "
                f"masking.max_length")


def _load_processor(config: Config) -> Any:
    from surgvqa.modeling import load_processor, resolve_model_path

    path = resolve_model_path(config)
    try:
        return load_processor(path, config.model, config.masking.strategy)
    except OSError as exc:
        raise ValueError(f"cannot load the processor of {path}, which prepare needs to measure every sample "
                         f"in tokens ({exc})") from None


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
    work_dir = run_dir / "prepared.partial"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        result = _prepare_into(work_dir, final_dir, config, quiet)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    replace_directory(work_dir, final_dir)
    (run_dir / FAILED_REJECTS_NAME).unlink(missing_ok=True)  # a failed run's list no longer describes prepared/
    return result


def _prepare_into(work_dir: Path, final_dir: Path, config: Config, quiet: bool) -> PrepareResult:
    task = get_task(config.task)
    source = task.resolve_source(config)
    rows = task.read_rows(config, source)
    lengths = SampleLengths(config)
    store = _ImageStore(work_dir, lengths.image_tokens)
    rejects: list[dict[str, Any]] = []
    kept: list[Record] = []
    image_tokens: dict[str, int] = {}
    seen_rows: set[tuple[str | None, str, str, str]] = set()
    questions_per_image: Counter = Counter()
    source_by_image: dict[str, str] = {}  # one source per image, the first kept row's: the split stratifies by it
    rows_read = 0

    def reject(raw: RawRow, reason: str, detail: str = "") -> None:
        question, answer = question_text(raw.question), answer_text(raw.answer)
        rejects.append({"origin": clean_text(raw.origin), "reason": reason,
                        "detail": clean_text(detail or REJECT_REASONS[reason]), "img_id": raw.img_id,
                        "question": (question or "")[:REJECTS_KEPT_CHARS],
                        "answer": (answer or "")[:REJECTS_KEPT_CHARS]})

    for raw in tqdm(rows, desc="prepare: reading rows", unit="row", disable=quiet, mininterval=1.0):
        if config.data.max_rows is not None and rows_read >= config.data.max_rows:
            break
        rows_read += 1
        if raw.img_id is not None:
            raw.img_id = clean_text(raw.img_id)
        if raw.problem:
            reject(raw, raw.problem, raw.detail)
            continue
        question, answer = question_text(raw.question), answer_text(raw.answer)
        if raw.img_id is None and raw.image_bytes:
            raw.img_id = hashlib.sha1(raw.image_bytes).hexdigest()[:16]
        if not raw.img_id:
            reject(raw, "missing_img_id")
            continue
        if question is None:
            reject(raw, "bad_question", f"question is a {type(raw.question).__name__}: {_preview(raw.question)}")
            continue
        if not question:
            reject(raw, "empty_question")
            continue
        if answer is None or is_bad_answer(answer):
            reject(raw, "bad_answer", f"answer is {_preview(raw.answer)}")
            continue
        special = lengths.special_token_in(question) or lengths.special_token_in(answer)
        if special:
            reject(raw, "special_token_text", f"the text contains the tokenizer's special token {special!r}, "
                                              f"which would break the chat structure")
            continue
        image = store.add(raw)
        if image.problem:
            reject(raw, image.problem, image.detail)
            continue
        # With shipped splits the same pair may sit in train and test (a leak, counted later), not a duplicate.
        official_split = official_split_name(raw.split) if task.official_splits else None
        key = (official_split, raw.img_id, question.lower(), normalize_answer(answer))
        if key in seen_rows:
            reject(raw, "duplicate_row")
            continue
        # Measured before the split with no candidates listed: a row this long must not reach the vocabulary.
        source_name = source_by_image.get(raw.img_id) or clean_text("" if raw.source is None else str(raw.source))
        record = Record(id=f"{raw.img_id}-q{questions_per_image[raw.img_id]}", img_id=raw.img_id,
                        image=image.reference, question=question, answer=answer, source=source_name,
                        question_type=task.initial_type(question), split=official_split, task=task.name,
                        meta=task.record_meta(raw))
        if problem := lengths.too_long(record, image.image_tokens):
            reject(raw, "too_long", problem)
            continue
        seen_rows.add(key)
        questions_per_image[raw.img_id] += 1
        image_tokens[raw.img_id] = image.image_tokens
        source_by_image.setdefault(raw.img_id, source_name)
        kept.append(record)

    if rows_read == 0:
        raise SourceError(f"{source}: the data source holds no rows")
    if not kept:
        failed_rejects = final_dir.parent / FAILED_REJECTS_NAME
        write_jsonl(failed_rejects, rejects)
        raise ValueError(f"{source}: no usable rows: all {len(rejects)} row(s) rejected ({_top_reasons(rejects)}); "
                         f"every rejected row is listed in {failed_rejects}")

    split = config.data.split
    fractions = (split.train, split.val, split.test)
    needed = [name for name, fraction in zip(SPLITS, fractions) if fraction > 0]
    if len(source_by_image) < len(needed):
        raise ValueError(f"{source}: {len(source_by_image)} usable image(s) after rejects, but splitting by image "
                         f"into {'/'.join(needed)} needs at least {len(needed)} (one per split); "
                         f"{len(rejects)} row(s) were rejected")
    outcome = task.assign_splits(kept, source_by_image, config)
    kept = outcome.records
    if "official_splits" in outcome.summary and "test" not in needed:
        needed.append("test")

    vocabulary = task.build_vocabulary([r for r in kept if r.split == "train"])
    typed_kept: list[Record] = []
    for record in kept:
        task.type_record(record, vocabulary)
        # Listed candidates lengthen the prompt; measured again now that they are known.
        if config.prompt.list_candidates and record.candidates and \
                (problem := lengths.too_long(record, image_tokens[record.img_id])):
            rejects.append({"origin": record.id, "reason": "too_long", "detail": problem, "img_id": record.img_id,
                            "question": record.question[:REJECTS_KEPT_CHARS],
                            "answer": record.answer[:REJECTS_KEPT_CHARS]})
            continue
        typed_kept.append(record)
    kept = typed_kept

    by_type: dict[str, dict[str, int]] = {t: dict.fromkeys(SPLITS, 0) for t in task.question_types}
    by_template: dict[str, dict[str, int]] = {}
    for record in kept:
        by_type[record.question_type][record.split] += 1
        by_template.setdefault(task.group_key(record), dict.fromkeys(SPLITS, 0))[record.split] += 1

    counts = {name: sum(1 for r in kept if r.split == name) for name in SPLITS}
    if empty := [name for name in needed if counts[name] == 0]:
        raise ValueError(f"{source}: split(s) {', '.join(empty)} hold no rows after rejects (rows per split: "
                         f"{counts}); add images or change data.split")
    for name in SPLITS:
        write_records(work_dir / f"{name}.jsonl", [r for r in kept if r.split == name])
    write_jsonl(work_dir / "rejects.jsonl", rejects)
    atomic_write_json(work_dir / "vocabulary.json", {str(k): v for k, v in sorted(vocabulary.items())})
    reject_counts = Counter(item["reason"] for item in rejects)
    split_of_image = {r.img_id: r.split for r in kept}
    summary = {"source": source, "rows_kept": len(kept), "rows_rejected": len(rejects),
               "images": len({r.img_id for r in kept}), "splits": counts,
               "images_per_split": dict(Counter(split_of_image.values())),
               "rejects": dict(reject_counts),
               "longest_sample_tokens": max(lengths.total(r, image_tokens[r.img_id]) for r in kept),
               "by_type": by_type, "by_template": dict(sorted(by_template.items())),
               **({"task": task.name} if task.name != "kvasir-vqa" else {}), **outcome.summary}
    atomic_write_json(work_dir / "summary.json", summary)
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
