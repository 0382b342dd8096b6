"""The Kvasir-VQA-x1 task: free-text answers over the Kvasir-VQA images, scored as text and as atomic facts.

``SimulaMet/Kvasir-VQA-x1`` (CC BY-NC 4.0): 159,549 question-answer pairs over the 6,500 Kvasir-VQA images, answers
in natural sentences. Columns: ``img_id``, ``question``, ``answer``, ``complexity`` (1-3: atomic facts combined),
``original`` (a JSON string: the atomic Kvasir-VQA items the row was built from), ``question_class`` (clinical
aspect labels); splits ``train`` and ``test``.

What this task decides:

- reading: rows need no image column; a row without an image gets it by ``img_id`` from ``data.images`` (a
  Kvasir-VQA parquet or ``save_to_disk`` folder, or a folder of ``<img_id>.jpg``), and is rejected with its reason
  when the image is not there;
- splits: the official test stays the test; validation is carved from the official train by image; images in
  both official splits are counted in ``summary.json`` (``leak``) and ``data.drop_leaking_test_rows`` drops their
  test rows;
- prompt and target: every answer is open text, taught as written (no label normalisation) and generated freely;
- metrics: the challenge's text metrics overall, per complexity and per question class; exact match after
  normalisation; atomic-fact recall per atom type with bootstrap CIs (:mod:`surgvqa.tasks.kvasir_vqa_x1.atomic_facts`), a
  gallery of misses, and the paired comparison with a baseline run on recall and ROUGE-L.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from surgvqa.data.answers import OPEN_ENDED
from surgvqa.data.records import Record
from surgvqa.data.sources import ANSWER_KEYS, QUESTION_KEYS, RawRow, SourceError, iter_raw_rows, local_path
from surgvqa.data.synthetic_x1 import synthetic_x1_source
from surgvqa.tasks.base import SplitOutcome, Task, official_split_outcome, reject_unknown_split
from surgvqa.tasks.kvasir_vqa_x1.metrics import x1_headline, x1_metrics, x1_tables
from surgvqa.tasks.kvasir_vqa_x1.text import normalise_text, original_problem, question_classes

if TYPE_CHECKING:
    from surgvqa.core.config import Config, EvaluateConfig, PromptConfig
    from surgvqa.evaluation.scoring import PredictionRow

X1_SYSTEM_PROMPT = (
    "You are a medical visual question answering assistant for gastrointestinal endoscopy. "
    "Look at the image and answer the question in one or more short, complete sentences."
)
X1_USER_TEMPLATE = "Question: {question}"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


# ------------------------------------------------------------------------------------------- the image join


class ImageIndex:
    """Images by img_id from ``data.images``: a folder of ``<img_id>.<ext>`` files, or any Kvasir-VQA source
    (parquet, save_to_disk) whose rows carry ``img_id`` and ``image``. Only the ids asked for are kept."""

    def __init__(self, location: str, wanted: set[str], config: Config):
        self.location = location
        self.bytes_by_id: dict[str, bytes] = {}
        self.file_by_id: dict[str, Path] = {}
        self.source_by_id: dict[str, str] = {}
        path = local_path(location)
        if not path.exists():
            raise SourceError(f"data.images not found: {path}")
        is_dataset = path.is_file() or (path / "dataset_dict.json").exists() or (path / "state.json").exists() \
            or any(path.rglob("*.parquet"))
        if not is_dataset:
            for file in sorted(path.rglob("*")):
                if file.suffix.lower() in IMAGE_SUFFIXES and file.stem in wanted and file.stem not in self.file_by_id:
                    self.file_by_id[file.stem] = file
            return
        for raw in iter_raw_rows(location, "auto", hub_split=config.data.hub_split, cache_dir=config.cache_dir):
            img_id = raw.img_id
            if img_id not in wanted or img_id in self.bytes_by_id or img_id in self.file_by_id or raw.problem:
                continue
            if raw.image_bytes is not None:
                self.bytes_by_id[img_id] = raw.image_bytes
            elif raw.image_file is not None:
                self.file_by_id[img_id] = raw.image_file
            if isinstance(raw.source, str):
                self.source_by_id[img_id] = raw.source

    def join(self, raw: RawRow) -> None:
        """Give a row without an image the indexed one, or say why it has none."""
        img_id = raw.img_id or ""
        if img_id in self.bytes_by_id:
            raw.image_bytes = self.bytes_by_id[img_id]
        elif img_id in self.file_by_id:
            raw.image_file = self.file_by_id[img_id]
        else:
            raw.problem, raw.detail = "missing_image", f"img_id {img_id!r} has no image in data.images {self.location}"
            return
        raw.problem, raw.detail = None, ""
        if raw.source is None and img_id in self.source_by_id:
            raw.source = self.source_by_id[img_id]


def _lacks_image(raw: RawRow) -> bool:
    return raw.problem == "missing_image" and raw.image_bytes is None and raw.image_file is None


# ---------------------------------------------------------------------------------------------- text helpers


def _complexity(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 1 <= number <= 9 else None


def _reject_unreadable_original(raw: RawRow) -> RawRow:
    if raw.problem is None and (problem := original_problem(raw.extra.get("original"))):
        raw.problem, raw.detail = "bad_original", (
            f"'original' is not valid JSON ({problem}); atomic-fact recall could not check this row: fix the "
            f"field or remove it")
    return raw


# ------------------------------------------------------------------------------------------------- the task


class KvasirVQAx1(Task):
    name = "kvasir-vqa-x1"
    question_types = (OPEN_ENDED,)
    required_columns: ClassVar[Mapping[str, tuple[str, ...]]] = {"question": QUESTION_KEYS, "answer": ANSWER_KEYS}
    official_splits = True
    default_system = X1_SYSTEM_PROMPT
    default_user_template = X1_USER_TEMPLATE

    # -- reading ----------------------------------------------------------------------------------------------

    def resolve_source(self, config: Config) -> str:
        if config.data.source == "synthetic":

            return str(synthetic_x1_source(config) / "parquet")
        return config.data.source

    def image_source(self, config: Config) -> str | None:
        if config.data.images:
            return config.data.images
        if config.data.source == "synthetic":

            return str(synthetic_x1_source(config) / "kvasir-vqa")
        return None

    def read_rows(self, config: Config, source: str) -> Iterator[RawRow]:
        # Read every row first (text only): the image join then indexes only the img_ids the rows name.
        rows = list(super().read_rows(config, source))
        wanted = {raw.img_id for raw in rows if raw.img_id and _lacks_image(raw)}
        images = self.image_source(config)
        index = ImageIndex(images, wanted, config) if wanted and images else None
        for raw in rows:
            if _lacks_image(raw):
                if index is not None:
                    index.join(raw)
                else:
                    raw.detail = "the row has no image and data.images (where x1 images are joined by img_id) " \
                                 "is not set"
            yield _reject_unreadable_original(reject_unknown_split(raw))

    def record_meta(self, raw: RawRow) -> dict[str, Any]:
        original = raw.extra.get("original")
        if original is not None and not isinstance(original, str):
            original = json.dumps(original.tolist() if hasattr(original, "tolist") else original, default=str)
        return {"complexity": _complexity(raw.extra.get("complexity")),
                "question_class": question_classes(raw.extra.get("question_class")),
                "original": original}

    def assign_splits(self, records: list[Record], source_by_image: Mapping[str, str], config: Config
                      ) -> SplitOutcome:
        outcome = official_split_outcome(records, source_by_image, config,
                                         drop_leaking_test_rows=config.data.drop_leaking_test_rows)
        return outcome if outcome is not None else super().assign_splits(records, source_by_image, config)

    def group_key(self, record: Record) -> str:
        complexity = record.meta.get("complexity")
        return f"complexity {complexity}" if complexity else "complexity unknown"

    # -- prompt, target, prediction ----------------------------------------------------------------------------

    def training_target(self, record: Record, prompt: PromptConfig) -> str:
        """The sentence as written: lower-casing or reordering "labels" would garble free text."""
        return record.answer.strip()

    def prediction_method(self, record: Record, mode: str, multi_label_rank: str) -> str:
        return "generate"

    def normalise_prediction(self, record: Record, text: str) -> str:
        return text.strip()

    def matches_reference(self, record: Record, prediction: str) -> bool:
        return normalise_text(prediction) == normalise_text(record.answer)

    # -- evaluation -------------------------------------------------------------------------------------------

    def task_metrics(self, rows: Sequence[PredictionRow], settings: EvaluateConfig, *,
                     baseline: Sequence[PredictionRow] | None, with_text_metrics: bool) -> dict[str, Any]:
        x1 = x1_metrics(rows, settings, baseline)
        return {"x1": x1, "task_tables": x1_tables(x1), "headline": x1_headline(x1)}

