"""The masking diagnostic: proves, sample by sample, that exactly the answer tokens are supervised.

For each inspected sample it reports the supervised positions, the decoded supervised text against what it must
be, the mask ratio, the tensor shapes and the image-token count against the image grid; then a summary over the
whole file (how many samples would fail, the mean mask ratio). With ``train.group_by_image`` it also checks, on the
images of the inspected samples, that each answer's loss in its image's grouped rows equals its loss alone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from surgvqa.core.config import Config
from surgvqa.core.io import atomic_write_json
from surgvqa.data.records import Record, read_records
from surgvqa.data.sources import allowed_image_roots
from surgvqa.models.loading import load_processor, resolve_model_path
from surgvqa.prompting.chat import training_target
from surgvqa.prompting.encoding import SampleTooLong, encode_example, load_image
from surgvqa.prompting.masking import IGNORE_INDEX

# Grouping is checked on this many images of the inspected samples (all their questions each): one model forward
# per question and per row, so it stays seconds on a small model.
GROUP_CHECK_IMAGES = 3
# fp32 rounding of a reordered attention sum is ~1e-6 per answer; a wrong mask or position is ~1e-2.
GROUPED_LOSS_TOLERANCE = 1e-4


@dataclass
class SampleDiagnosis:
    id: str
    question_type: str
    question: str
    answer: str
    supervised_positions: list[int] = field(default_factory=list)
    supervised_text: str = ""
    expected_text: str = ""
    mask_ratio: float = 0.0  # supervised tokens / all tokens
    shapes: dict[str, list[int]] = field(default_factory=dict)
    image_tokens: int = 0
    image_tokens_expected: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def diagnose_record(processor: Any, record: Record, base_dir: Path, config: Config) -> SampleDiagnosis:
    result = SampleDiagnosis(record.id, record.question_type, record.question, record.answer)
    try:
        image = load_image(record, base_dir, roots=allowed_image_roots(config, base_dir))
        example = encode_example(processor, record, image, config.prompt, config.masking)
    except (SampleTooLong, ValueError) as exc:
        result.problems.append(str(exc))
        return result
    features = example.features
    labels = features["labels"].tolist()
    input_ids = features["input_ids"].tolist()
    tokenizer = processor.tokenizer
    result.supervised_positions = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    result.supervised_text = tokenizer.decode([labels[i] for i in result.supervised_positions])
    result.expected_text = example.expected_text
    result.mask_ratio = len(result.supervised_positions) / max(len(labels), 1)
    result.shapes = {key: list(value.shape) for key, value in features.items() if hasattr(value, "shape")}
    image_token_id = processor.image_token_id if hasattr(processor, "image_token_id") else \
        tokenizer.convert_tokens_to_ids("<|image_pad|>")
    result.image_tokens = input_ids.count(image_token_id)
    merge = processor.image_processor.merge_size
    result.image_tokens_expected = int(features["image_grid_thw"].prod(dim=-1).sum().item()) // (merge * merge)
    for position in example.straddling:
        result.problems.append(f"token {position} {tokenizer.convert_ids_to_tokens(input_ids[position])!r} "
                               f"straddles the supervised-span boundary")
    if not training_target(record, config.prompt).strip():
        # Only the end-of-turn token would be taught: the sample teaches the model to say nothing.
        result.problems.append(f"empty training target: the answer {record.answer[:40]!r} normalises to nothing")
    if not result.supervised_positions:
        result.problems.append("no supervised tokens")
    elif result.supervised_text != result.expected_text:
        result.problems.append(f"supervised text {result.supervised_text!r} != expected {result.expected_text!r}")
    if result.image_tokens != result.image_tokens_expected:
        result.problems.append(f"{result.image_tokens} image tokens but the grid implies "
                               f"{result.image_tokens_expected}")
    if result.supervised_positions and result.supervised_positions[-1] != len(labels) - 2:
        # The rendered turn ends "<|im_end|>\n": the end-of-turn token must be the last supervised one.
        result.problems.append("the end-of-turn token is not the last supervised token")
    return result


@dataclass
class DiagnosticReport:
    data: str
    strategy: str
    samples: list[SampleDiagnosis]
    total: int
    failing: int
    mean_mask_ratio: float
    failing_ids: list[str]
    # With train.group_by_image: the largest |loss grouped - loss alone| over the checked answers (fp32), and
    # why grouping fails the diagnostic, if it does.
    grouped_max_abs_loss_diff: float | None = None
    grouping_problem: str | None = None

    @property
    def passed(self) -> bool:
        return not self.failing and self.grouping_problem is None

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        for sample, item in zip(self.samples, payload["samples"]):
            item["ok"] = sample.ok
        return payload


def pick_per_type(records: list[Record], per_type: int) -> list[Record]:
    chosen: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        if len(chosen[record.question_type]) < per_type:
            chosen[record.question_type].append(record)
    return [record for group in chosen.values() for record in group]


def run_diagnostic(config: Config, processor: Any, data: Path, per_type: int = 5,
                   full_summary: bool = True, quiet: bool = False) -> DiagnosticReport:
    records = read_records(data)
    if not records:
        raise ValueError(f"{data}: no records")
    shown = pick_per_type(records, per_type)
    shown_ids = {record.id for record in shown}
    detailed = [diagnose_record(processor, record, data.parent, config) for record in shown]
    failing_ids = [sample.id for sample in detailed if not sample.ok]
    ratios = [sample.mask_ratio for sample in detailed if sample.ok]
    if full_summary:
        rest = [record for record in records if record.id not in shown_ids]
        for record in tqdm(rest, desc="diagnose: whole file", unit="sample", disable=quiet, mininterval=1.0):
            sample = diagnose_record(processor, record, data.parent, config)
            if sample.ok:
                ratios.append(sample.mask_ratio)
            else:
                failing_ids.append(sample.id)
    total = len(records) if full_summary else len(shown)
    report = DiagnosticReport(str(data), config.masking.strategy, detailed, total, len(failing_ids),
                              sum(ratios) / len(ratios) if ratios else 0.0, failing_ids)
    if config.train.group_by_image:
        report.grouped_max_abs_loss_diff, report.grouping_problem = check_grouping(
            config, processor, records, shown, data.parent)
    return report


def check_grouping(config: Config, processor: Any, records: list[Record], shown: list[Record],
                   base_dir: Path) -> tuple[float | None, str | None]:
    """(largest per-answer loss difference, problem or None): the inspected samples' images, each with all its
    questions in the file, through the grouped rows and one by one, on the model loaded in fp32."""
    from surgvqa.models.loading import load_model, resolve_model_path
    from surgvqa.training.grouping import (
        check_grouping_supported,
        grouped_attention_request,
        grouped_max_abs_loss_diff,
    )

    attention = grouped_attention_request(config.model.attn_implementation)
    fp32 = config.model_copy(update={"model": config.model.model_copy(
        update={"dtype": "float32", "attn_implementation": attention})})
    model = load_model(resolve_model_path(fp32), fp32, processor, for_training=False).eval()
    try:
        check_grouping_supported(model.config.model_type, model.config._attn_implementation)
    except ValueError as exc:
        return None, str(exc)
    images: list[list[dict[str, Any]]] = []
    for key in list(dict.fromkeys((record.img_id, record.image) for record in shown))[:GROUP_CHECK_IMAGES]:
        questions = [record for record in records if (record.img_id, record.image) == key]
        image = load_image(questions[0], base_dir, roots=allowed_image_roots(config, base_dir))
        encoded = []
        for record in questions:
            try:
                encoded.append(encode_example(processor, record, image, config.prompt, config.masking).features)
            except (SampleTooLong, ValueError):
                continue  # reported with the sample itself
        if encoded:
            images.append(encoded)
    difference = grouped_max_abs_loss_diff(model, images, processor.tokenizer.pad_token_id,
                                           model.config._attn_implementation, config.masking.max_length)
    if difference > GROUPED_LOSS_TOLERANCE:
        return difference, (f"an answer's loss grouped by image differs from its loss alone by {difference:.2e} "
                            f"(> {GROUPED_LOSS_TOLERANCE:g} in fp32): grouped training would not train the same "
                            "model; set train.group_by_image=false")
    return difference, None


def run(config: Config, *, data: Path | None = None, per_type: int = 2, full_summary: bool = True,
        quiet: bool = False) -> DiagnosticReport:
    """The diagnostic of ``data`` (default: the run's training split); for the run's own split it is also kept as
    ``diagnose.json``, the record `surgvqa run` checks."""
    own = config.run_dir / "prepared" / "train.jsonl"
    data = data or own
    processor = load_processor(resolve_model_path(config), config.model, config.masking.strategy)
    report = run_diagnostic(config, processor, data, per_type=per_type, full_summary=full_summary, quiet=quiet)
    if data.absolute() == own.absolute():
        atomic_write_json(config.run_dir / "diagnose.json", report.to_json())
    return report


def print_diagnostic(report: DiagnosticReport) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    console.print(f"masking diagnostic — {report.data} (strategy: {report.strategy})")
    for sample in report.samples:
        status = "[green]ok[/green]" if sample.ok else "[red]PROBLEM[/red]: " + "; ".join(sample.problems)
        console.print(f"\n[{sample.question_type}] {sample.id}: {sample.question!r} -> {sample.answer!r}")
        console.print(f"  shapes: {sample.shapes}")
        console.print(f"  image tokens: {sample.image_tokens} (grid implies {sample.image_tokens_expected})")
        console.print(f"  supervised positions: {sample.supervised_positions}")
        console.print(f"  supervised text: {sample.supervised_text!r} (expected {sample.expected_text!r})")
        console.print(f"  mask ratio: {sample.mask_ratio:.3f}   {status}")
    console.print(f"\nsummary: {report.total} samples checked, {report.failing} would fail, "
                  f"mean supervised ratio {report.mean_mask_ratio:.3f}")
    if report.grouped_max_abs_loss_diff is not None:
        console.print(f"grouped by image: largest per-answer loss difference {report.grouped_max_abs_loss_diff:.2e} "
                      f"(fp32, limit {GROUPED_LOSS_TOLERANCE:g})")
    if report.grouping_problem:
        console.print(f"[red]PROBLEM[/red]: {report.grouping_problem}")
    if report.failing_ids:
        console.print(f"failing ids (first 20): {report.failing_ids[:20]}")
