"""Collapsed predictions: one answer for nearly every question of a type whose references vary (docs/metrics.md).

A model that has collapsed (to ".", "no", one sentence) can still score a plausible accuracy where one reference
answer dominates; where the references vary, its numbers describe that one answer, not the model's reading of
the images. The check is the same for every task, on the normalised prediction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from surgvqa.data.answers import QUESTION_TYPES, normalize_answer
from surgvqa.evaluation.scoring import PredictionRow

COLLAPSE_SHARE = 0.8  # the most common prediction is at least this share of a type's rows
COLLAPSE_MIN_ROWS = 10  # fewer rows say nothing about a model's spread of answers
EMPTY = "(empty)"


def collapsed_types(rows: Sequence[PredictionRow]) -> list[dict[str, Any]]:
    """One entry per question type whose predictions collapsed: at least ``COLLAPSE_MIN_ROWS`` rows, the most
    common normalised prediction at least ``COLLAPSE_SHARE`` of them, while the references hold at least two
    distinct normalised answers and none of them reaches that share. Rows whose prediction failed count with
    an empty prediction (the error banner names them)."""
    found = []
    for question_type in QUESTION_TYPES:
        of_type = [row for row in rows if row.question_type == question_type]
        if len(of_type) < COLLAPSE_MIN_ROWS:
            continue
        normalised = ["" if row.error is not None else normalize_answer(row.prediction) for row in of_type]
        answer, count = Counter(normalised).most_common(1)[0]
        # Named as the model wrote it most often ("." rather than its normalised, empty form).
        written = Counter(row.prediction.strip() for row, norm in zip(of_type, normalised)
                          if norm == answer and row.error is None).most_common(1)
        shown = written[0][0] if written and written[0][0] else EMPTY
        references = Counter(normalize_answer(row.reference) for row in of_type)
        top_reference = references.most_common(1)[0][1]
        n = len(of_type)
        if count >= COLLAPSE_SHARE * n and len(references) >= 2 and top_reference < COLLAPSE_SHARE * n:
            found.append({"question_type": question_type, "n": n, "answer": shown, "count": count,
                          "share": count / n, "distinct_references": len(references),
                          "top_reference_share": top_reference / n})
    return found
