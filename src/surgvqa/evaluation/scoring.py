"""Whether one predicted answer matches its reference: strict, tolerant, set F1 and Jaccard (docs/metrics.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from surgvqa.core.config import EvaluateConfig
from surgvqa.data.answers import (
    COUNT_NUMERIC,
    SIZE_NUMERIC,
    SizeInterval,
    SizeValue,
    interval_distance_mm,
    label_set,
    parse_count,
    parse_size_labels,
    split_labels,
)


@dataclass(frozen=True)
class PredictionRow:
    """One scorable line of a predictions file, already validated by the evaluate stage."""

    id: str  # "" when the file gave none: such a row is scored but cannot be paired with a baseline
    question_type: str
    reference: str
    prediction: str
    template: int | None = None
    question: str = ""
    text: str | None = None  # raw model output for the text metrics; None: use `prediction`
    error: str | None = None
    image: str | None = None  # absolute path, or None
    where: str = ""  # "file:line", for messages
    task: str = "kvasir-vqa"  # the task whose metrics score this row (surgvqa.tasks)
    meta: Any = None  # the task's fields for its metrics (a dict), e.g. x1's complexity and atomic facts

    @property
    def stratum(self) -> tuple[str, int]:
        """(question type, template; 0 when untemplated): the group the bootstrap resamples within."""
        return (self.question_type, self.template if self.template is not None else 0)


@dataclass(frozen=True)
class AnswerScore:
    strict: bool
    tolerant: bool
    f1: float
    jaccard: float


WRONG = AnswerScore(False, False, 0.0, 0.0)


def set_f1(reference: frozenset[str], prediction: frozenset[str]) -> float:
    """F1 between label sets: 2|P∩R| / (|P| + |R|); 1.0 when both are empty."""
    total = len(reference) + len(prediction)
    return 1.0 if total == 0 else 2.0 * len(reference & prediction) / total


def set_jaccard(reference: frozenset[str], prediction: frozenset[str]) -> float:
    """Jaccard index between label sets: |P∩R| / |P∪R|; 1.0 when both are empty."""
    union = len(reference | prediction)
    return 1.0 if union == 0 else len(reference & prediction) / union


def _inside(point: SizeValue, interval: SizeValue) -> bool:
    """True when `point` is a single length (``8mm``) inside `interval` (bounds' inclusivity respected)."""
    if (
        not isinstance(point, SizeInterval)
        or not isinstance(interval, SizeInterval)
        or point.low != point.high
    ):
        return False
    value = point.low
    above_low = value > interval.low or (interval.low_inclusive and value == interval.low)
    below_high = value < interval.high or (interval.high_inclusive and value == interval.high)
    return above_low and below_high


# Polyps above 20 mm are managed differently (resection technique, referral, surveillance interval), so no tolerance
# carries a size across this line: 11-20mm and >20mm never match tolerantly, however close their bounds.
MANAGEMENT_THRESHOLD_MM = 20.0


def _above_threshold(size: SizeValue) -> bool | None:
    """True when every length of `size` is above 20 mm, False when every one is at most 20 mm, None when it
    straddles the line (``15-25mm``) or is not a length (``none``)."""
    if not isinstance(size, SizeInterval):
        return None
    if size.low > MANAGEMENT_THRESHOLD_MM or (size.low == MANAGEMENT_THRESHOLD_MM and not size.low_inclusive):
        return True
    if size.high <= MANAGEMENT_THRESHOLD_MM:
        return False
    return None


def tolerant_distance_mm(a: SizeValue, b: SizeValue) -> float:
    """`interval_distance_mm`, but infinite between a size above 20 mm and one at most 20 mm."""
    sides = {_above_threshold(a), _above_threshold(b)}
    return math.inf if sides == {True, False} else interval_distance_mm(a, b)


def _directed_distance_mm(a: Sequence[SizeValue], b: Sequence[SizeValue]) -> float:
    return max(min(tolerant_distance_mm(x, y) for y in b) for x in a)


def size_set_distance_mm(reference: Sequence[SizeValue], prediction: Sequence[SizeValue]) -> float:
    """Symmetric Hausdorff distance between two sets of sizes, with `tolerant_distance_mm` as the gap."""
    return max(_directed_distance_mm(reference, prediction), _directed_distance_mm(prediction, reference))


def size_match(reference: str, prediction: str, tolerance_mm: float) -> tuple[bool, bool]:
    """(strict, tolerant) for a size answer: equal labels, equal intervals or a length inside the one reference
    interval; tolerant: every size within `tolerance_mm` of the other set, never across 20 mm."""
    strict = label_set(reference) == label_set(prediction)
    ref_sizes, pred_sizes = parse_size_labels(reference), parse_size_labels(prediction)
    if ref_sizes is None or pred_sizes is None:
        return strict, strict
    if not strict:
        strict = set(ref_sizes) == set(pred_sizes) or (
            len(ref_sizes) == len(pred_sizes) == 1 and _inside(pred_sizes[0], ref_sizes[0])
        )
    return strict, strict or size_set_distance_mm(ref_sizes, pred_sizes) <= tolerance_mm


def _single_count(text: str) -> int | None:
    return parse_count(text) if len(split_labels(text)) == 1 else None


def count_match(reference: str, prediction: str, tolerance: int) -> tuple[bool, bool]:
    """(strict, tolerant) for a count answer: equal labels or equal counts; |pred - ref| <= tolerance."""
    strict = label_set(reference) == label_set(prediction)
    ref_count, pred_count = _single_count(reference), _single_count(prediction)
    if ref_count is None or pred_count is None:
        return strict, strict
    strict = strict or ref_count == pred_count
    return strict, strict or abs(ref_count - pred_count) <= tolerance


@lru_cache(maxsize=1 << 17)
def score_answer(
    question_type: str,
    reference: str,
    prediction: str,
    size_tolerance_mm: float = 5.0,
    count_tolerance: int = 1,
) -> AnswerScore:
    """Score one answer (cached: a Kvasir test set repeats a few hundred (reference, prediction) pairs)."""
    ref_labels, pred_labels = label_set(reference), label_set(prediction)
    if question_type == SIZE_NUMERIC:
        strict, tolerant = size_match(reference, prediction, size_tolerance_mm)
    elif question_type == COUNT_NUMERIC:
        strict, tolerant = count_match(reference, prediction, count_tolerance)
    else:
        strict = tolerant = ref_labels == pred_labels
    return AnswerScore(
        strict, tolerant, set_f1(ref_labels, pred_labels), set_jaccard(ref_labels, pred_labels)
    )


def score_row(row: PredictionRow, settings: EvaluateConfig) -> AnswerScore:
    """The row's answer scored with the configured tolerances; a row whose prediction failed is wrong."""
    if row.error is not None:
        return WRONG
    return score_answer(
        row.question_type,
        row.reference,
        row.prediction,
        float(settings.size_tolerance_mm),
        int(settings.count_tolerance),
    )


def strict_correct(rows: Sequence[dict[str, Any]], evaluate: EvaluateConfig) -> list[bool]:
    """Whether each predictions.jsonl row's prediction matches its reference strictly, as the evaluate stage
    scores it; an empty prediction never does."""
    return [bool(row.get("prediction")) and score_row(PredictionRow(
        id="", question_type=row.get("question_type", ""), reference=str(row.get("answer", "")),
        prediction=str(row.get("prediction")), error=row.get("error")), evaluate).strict for row in rows]
