"""Confusion matrix of reference against predicted answers of one closed question type."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from surgvqa.data.answers import (
    COUNT_NUMERIC,
    SIZE_NUMERIC,
    SizeInterval,
    normalize_answer,
    parse_count,
    parse_size_labels,
)

OTHER_LABEL = "(other)"
CONFUSION_MAX_LABELS = 12


def _size_order(label: str) -> tuple:
    """Lengths by their lower bound, after "none" and before labels that are no size."""
    sizes = parse_size_labels(label)
    if not sizes:
        return (2, 0.0, label)
    first = sizes[0]
    return (1, first.low, label) if isinstance(first, SizeInterval) else (0, 0.0, label)


def _label_order(question_type: str, labels: Iterable[str], frequency: Counter) -> list[str]:
    labels = list(labels)
    if question_type == COUNT_NUMERIC:
        return sorted(labels, key=lambda x: (parse_count(x) is None, parse_count(x) or 0, x))
    if question_type == SIZE_NUMERIC:
        return sorted(labels, key=_size_order)
    return sorted(labels, key=lambda x: (-frequency[x], x))


def _one_spelling_per_size(labels: Counter) -> dict[str, str]:
    """Size labels that are the same sizes (``>20`` and ``>20mm``, as strict scoring counts them) mapped to the
    most frequent of their spellings that name the unit (``>20mm``), so that a matrix has one row each."""
    groups: dict[frozenset, list[str]] = {}
    for label in labels:
        if (sizes := parse_size_labels(label)) is not None:
            groups.setdefault(frozenset(sizes), []).append(label)
    return {label: max(spellings, key=lambda x: ("mm" in x, labels[x], len(x), x))
            for spellings in groups.values() for label in spellings}


def confusion_matrix(
    question_type: str,
    references: Sequence[str],
    predictions: Sequence[str],
    max_labels: int = CONFUSION_MAX_LABELS,
) -> dict[str, Any]:
    """Counts of (reference answer, predicted answer), normalised (sizes: one spelling per size); rows =
    reference, columns = prediction.

    The `max_labels` most frequent answers (references and predictions counted together) keep their own row
    and column; everything else (rarer answers, empty predictions) is pooled as "(other)".
    """
    normalised = {text: normalize_answer(text) for text in {*references, *predictions}}
    refs = [normalised[r] for r in references]
    preds = [normalised[p] for p in predictions]
    if question_type == SIZE_NUMERIC:
        spelling = _one_spelling_per_size(Counter(refs) + Counter(preds))
        refs = [spelling.get(r, r) for r in refs]
        preds = [spelling.get(p, p) for p in preds]
    frequency = Counter(refs) + Counter(preds)
    frequency.pop("", None)
    kept = [label for label, _ in sorted(frequency.items(), key=lambda kv: (-kv[1], kv[0]))[:max_labels]]
    labels = _label_order(question_type, kept, frequency)
    position = {label: i for i, label in enumerate(labels)}
    other = len(labels)
    matrix = np.zeros((other + 1, other + 1), dtype=np.int64)
    for ref, pred in zip(refs, preds):
        matrix[position.get(ref, other), position.get(pred, other)] += 1
    if not matrix[other].any() and not matrix[:, other].any():
        return {"labels": labels, "matrix": matrix[:other, :other].tolist()}
    return {"labels": [*labels, OTHER_LABEL], "matrix": matrix.tolist()}
