"""What a task decides, and the defaults the tasks share.

A task (as in lm-evaluation-harness) owns everything specific to one dataset: the columns it reads, how questions
are typed and which candidates they get, the prompt text, which prediction method answers which question, and
which metrics are reported over which groups of rows. The stages (prepare, training, predict, evaluate) stay
generic and ask the record's task, named in every record, so no stage needs the config to find it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from surgvqa.data.answers import OPEN_ENDED, QUESTION_TYPES, normalize_answer
from surgvqa.data.records import SPLITS, Record
from surgvqa.data.sources import REQUIRED_COLUMNS, RawRow, iter_raw_rows
from surgvqa.data.split import split_images
from surgvqa.data.synthetic import synthetic_source
from surgvqa.evaluation.metrics import evaluate_by_type

if TYPE_CHECKING:
    from surgvqa.core.config import Config, EvaluateConfig, PromptConfig
    from surgvqa.evaluation.scoring import PredictionRow

# Split names as datasets spell them, mapped to the three a run uses.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}


def official_split_name(value: object) -> str | None:
    """"train" / "val" / "test" for a split name a dataset ships ("validation", "Test", ...); None otherwise."""
    return SPLIT_ALIASES.get(value.strip().lower()) if isinstance(value, str) else None


DEFAULT_SYSTEM_PROMPT = (
    "You are a medical visual question answering assistant for gastrointestinal endoscopy. "
    "Look at the image and answer the question with the answer alone, as briefly as possible."
)
DEFAULT_USER_TEMPLATE = "Question type: {question_type}\nQuestion: {question}"
def reject_unknown_split(raw: RawRow) -> RawRow:
    """Mark a row whose shipped split is no known name ("foo", "eval", "holdout"): counted as training it would
    train on rows its source meant to hold out."""
    if raw.problem is None and raw.split is not None and official_split_name(raw.split) is None:
        raw.problem, raw.detail = "unknown_split", (
            f"split {str(raw.split)[:40]!r} is none of {', '.join(SPLIT_ALIASES)}; rename it, or remove the field "
            f"to let prepare split the row by image")
    return raw


@dataclass
class SplitOutcome:
    records: list[Record]  # the records kept, each with its split set
    summary: dict[str, Any] = field(default_factory=dict)  # task-specific facts for summary.json and the report


class Task:
    """The default behaviour, which Kvasir-VQA uses as it is; other tasks override what differs."""

    name: ClassVar[str] = ""
    # The question types a record of this task can carry, in the order tables list them.
    question_types: ClassVar[tuple[str, ...]] = QUESTION_TYPES
    # Column groups a source must offer (each: accepted names); the rest of a row is kept in RawRow.extra.
    required_columns: ClassVar[Mapping[str, tuple[str, ...]]] = REQUIRED_COLUMNS
    # True when the dataset ships its own train/test split (kept as shipped); False: split by image here.
    official_splits: ClassVar[bool] = False
    # The question templates by id, for the per-template table of metrics.json ({}: no such table).
    templates_by_id: ClassVar[Mapping[int, Any]] = {}

    # -- reading and preparing ------------------------------------------------------------------------------

    def resolve_source(self, config: Config) -> str:
        """``data.source`` as a path or hub id; "synthetic" builds the task's synthetic set in the cache."""
        return str(synthetic_source(config)) if config.data.source == "synthetic" else config.data.source

    def read_rows(self, config: Config, source: str) -> Iterator[RawRow]:
        return iter_raw_rows(source, config.data.format, image_root=config.data.image_root,
                             hub_split=config.data.hub_split, cache_dir=config.cache_dir,
                             required=self.required_columns)

    def record_meta(self, raw: RawRow) -> dict[str, Any]:
        """Task fields a record carries beside the common ones (kept through prediction for the metrics)."""
        return {}

    def initial_type(self, question: str) -> str:
        """The question type before the split, used to measure a sample's length without candidates."""
        return OPEN_ENDED

    def assign_splits(self, records: list[Record], source_by_image: Mapping[str, str], config: Config
                      ) -> SplitOutcome:
        """Image-level split by ``data.split``, stratified by source: no image in two splits."""
        split = config.data.split
        assignment = split_images(source_by_image, (split.train, split.val, split.test), seed=split.seed)
        for record in records:
            record.split = assignment[record.img_id]
        return SplitOutcome(records)

    def build_vocabulary(self, train_records: Sequence[Record]) -> dict[Any, list[str]]:
        """Closed candidate answers learnt from the TRAINING split only (vocabulary.json)."""
        return {}

    def type_record(self, record: Record, vocabulary: Mapping[Any, list[str]]) -> None:
        """Set question_type, template, multi_label and candidates on a record, from the training vocabulary."""
        record.question_type, record.template, record.multi_label, record.candidates = OPEN_ENDED, None, False, []

    def group_key(self, record: Record) -> str:
        """The finer grouping prepare's summary counts rows by (Kvasir: the template)."""
        return "none"

    # -- prompt and training target ---------------------------------------------------------------------------

    # The prompt this task asks with when the config leaves prompt.system / prompt.user_template unset.
    default_system: str = DEFAULT_SYSTEM_PROMPT
    default_user_template: str = DEFAULT_USER_TEMPLATE

    def system_text(self, prompt: PromptConfig) -> str:
        """The system prompt ("" for none): the config's, else the task's own."""
        return self.default_system if prompt.system is None else prompt.system

    def user_template(self, prompt: PromptConfig) -> str:
        """The user turn's format template (fields ``{question_type}``, ``{question}``, ``{source}``): the
        config's, else the task's own."""
        return self.default_user_template if prompt.user_template is None else prompt.user_template

    def user_text(self, record: Record, prompt: PromptConfig) -> str:
        text = self.user_template(prompt).format(question_type=record.question_type, question=record.question,
                                                 source=record.source)
        if prompt.list_candidates and record.candidates:
            text += prompt.candidates_template.format(candidates=", ".join(record.candidates))
        return text

    def training_target(self, record: Record, prompt: PromptConfig) -> str:
        """The answer text the model is taught to produce.

        Normalised (lower case, multi-label answers in one canonical order) by default: the raw data lists labels
        in random order, and teaching a random order is teaching noise.
        """
        return normalize_answer(record.answer) if prompt.normalize_targets else record.answer.strip()

    # -- prediction -------------------------------------------------------------------------------------------

    def prediction_method(self, record: Record, mode: str, multi_label_rank: str) -> str:
        """How ``mode`` answers this record: open questions are generated freely, and in rank mode a multi-label
        set is decoded through the trie unless ``predict.multi_label_rank`` is "threshold"."""
        closed = record.question_type != OPEN_ENDED and bool(record.candidates)
        if mode == "generate" or not closed:
            return "generate"
        if mode == "rank" and record.multi_label and multi_label_rank == "constrained":
            return "constrained"
        return mode

    def normalise_prediction(self, record: Record, text: str) -> str:
        """A freely generated answer as it is scored: open answers as written, closed ones normalised."""
        return text.strip() if record.question_type == OPEN_ENDED else normalize_answer(text)

    def matches_reference(self, record: Record, prediction: str) -> bool:
        """Whether a prediction (as predict stores it) is the reference answer, for the sanity gate."""
        return prediction == normalize_answer(record.answer)

    # -- evaluation -------------------------------------------------------------------------------------------

    def evaluate(self, rows: Sequence[PredictionRow], settings: EvaluateConfig, *,
                 baseline: Sequence[PredictionRow] | None, skipped: Sequence[dict[str, Any]],
                 notes: Sequence[dict[str, Any]], with_text_metrics: bool, with_meteor: bool) -> dict[str, Any]:
        """metrics.json for these rows: exact match per question type (and template), the text metrics and the
        baseline comparison, then the task's own section (`task_metrics`) when it has one."""
        metrics = evaluate_by_type(rows, settings, baseline=baseline, skipped=skipped, notes=notes,
                                   with_text_metrics=with_text_metrics, with_meteor=with_meteor,
                                   templates_by_id=self.templates_by_id)
        section = self.task_metrics(rows, settings, baseline=baseline, with_text_metrics=with_text_metrics)
        if section:
            metrics["task"] = self.name
            metrics.update(section)
        return metrics

    def task_metrics(self, rows: Sequence[PredictionRow], settings: EvaluateConfig, *,
                     baseline: Sequence[PredictionRow] | None, with_text_metrics: bool) -> dict[str, Any]:
        """The task's own entries of metrics.json (its metrics, then ``task_tables`` for the report, and
        ``headline``: [{label, value, ci}], the numbers the terminal summary and the report's cards lead with in
        place of Kvasir-VQA's accuracies); {} for none."""
        return {}


def official_split_outcome(records: list[Record], source_by_image: Mapping[str, str], config: Config,
                           *, drop_leaking_test_rows: bool) -> SplitOutcome | None:
    """The dataset's own test split kept, validation carved from its training split by image.

    Records arrive with ``split`` set from the source ("train", "val", "test" or None: None counts as train).
    ``data.split`` fractions apply to the training images: a share ``val / (train + val)`` becomes validation,
    unless the source ships a validation split. Images that occur in both the official training and test split
    are counted (a model is then scored on images it trained on); with ``drop_leaking_test_rows`` their test
    rows are removed. Returns None when no record is marked test: the caller splits by image instead.
    """
    if not any(record.split == "test" for record in records):
        return None
    shipped_val = any(record.split == "val" for record in records)
    for record in records:
        if record.split is None:
            record.split = "train"
    train_images = {r.img_id: source_by_image.get(r.img_id, "") for r in records if r.split in ("train", "val")}
    test_images = {r.img_id for r in records if r.split == "test"}
    share = 0.0
    if not shipped_val:
        fractions = config.data.split
        share = fractions.val / (fractions.train + fractions.val) if fractions.train + fractions.val else 0.0
        carve = split_images(train_images, (1.0 - share, share, 0.0),
                             seed=fractions.seed)
        for record in records:
            if record.split == "train":
                record.split = carve[record.img_id]
    leaking = test_images & train_images.keys()
    leaking_rows = sum(1 for r in records if r.split == "test" and r.img_id in leaking)
    if drop_leaking_test_rows:
        records = [r for r in records if not (r.split == "test" and r.img_id in leaking)]
    images_per_split = {name: len({r.img_id for r in records if r.split == name}) for name in SPLITS}
    summary = {
        "official_splits": {
            "test": "as shipped",
            "val": "as shipped" if shipped_val else f"carved from train by image ({share:.1%} of its images)",
            "images_per_split": images_per_split,
        },
        "leak": {
            "images_in_train_and_test": len(leaking),
            "test_rows_on_train_images": leaking_rows,
            "test_rows_dropped": leaking_rows if drop_leaking_test_rows else 0,
            "note": "images of the official test split that also occur in its training split; "
                    "data.drop_leaking_test_rows removes their test rows (off: comparable with published numbers)",
        },
    }
    return SplitOutcome(records, summary)
