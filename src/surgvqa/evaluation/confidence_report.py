"""metrics.json's ``confidence`` section: calibration, selective prediction, conformal sets and abstention per type.

Computed from the predictions file itself: every number can be recomputed from its rows (``confidence_raw``,
``confidence``, ``answer_set``, ``abstained``); the metric definitions are in :mod:`surgvqa.evaluation.calibration`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from surgvqa.core.io import iter_jsonl
from surgvqa.data.answers import answer_meaning, normalize_answer
from surgvqa.data.images import resolve_image_path
from surgvqa.evaluation.calibration import (
    COVERAGE_POINTS,
    calibration_bins,
    calibration_summary,
    clopper_pearson_interval,
    risk_coverage_curve,
    selective_summary,
)
from surgvqa.evaluation.scoring import strict_correct

ALL = "all"
CURVE_POINTS = 200  # risk-coverage points kept per group in metrics.json
CONFIDENT_ERRORS = 8


def read_confidence_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a predictions file that carry a confidence (no error, a prediction, a number in [0, 1]);
    lines that are not JSON objects are the evaluate stage's to report, and skipped here."""
    rows, seen = [], set()
    for _, row in iter_jsonl(path, skip_bad=True):
        if row.get("id") in seen or row.get("error") is not None:
            continue
        value = row.get("confidence")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
            seen.add(row.get("id"))
            rows.append(row)
    return rows


def _raw(row: dict[str, Any]) -> float:
    value = row.get("confidence_raw")
    return float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else float(row["confidence"])


def _group_metrics(rows: list[dict[str, Any]], correct: np.ndarray, settings: Any) -> dict[str, Any]:
    after = np.array([float(row["confidence"]) for row in rows])
    before = np.array([_raw(row) for row in rows])
    samples, level, seed = settings.bootstrap_samples, settings.confidence, settings.seed
    coverage, risk = risk_coverage_curve(after, correct)
    keep = np.unique(np.linspace(0, len(rows) - 1, min(CURVE_POINTS, len(rows))).astype(int))
    out: dict[str, Any] = {
        "n": len(rows),
        "before": calibration_summary(before, correct, samples, level, seed),
        "after": calibration_summary(after, correct, samples, level, seed),
        "reliability_before": calibration_bins(before, correct),
        "reliability_after": calibration_bins(after, correct),
        **selective_summary(after, correct),
        "aurc_before": selective_summary(before, correct)["aurc"],
        "risk_coverage": {"coverage": coverage[keep].tolist(), "risk": risk[keep].tolist()},
    }
    with_sets = [(row, hit) for row, hit in zip(rows, correct) if isinstance(row.get("answer_set"), list)]
    if with_sets:
        out["conformal"] = {"n": len(with_sets),
                            "coverage": float(np.mean([_covers(row) for row, _ in with_sets])),
                            "mean_set_size": float(np.mean([len(row["answer_set"]) for row, _ in with_sets])),
                            "singletons": int(sum(len(row["answer_set"]) == 1 for row, _ in with_sets))}
    abstained = np.array([row.get("abstained") is True for row in rows])
    answered = ~abstained
    out["abstained"] = int(abstained.sum())
    out["answered"] = int(answered.sum())
    out["accuracy_answered"] = float(correct[answered].mean()) if answered.any() else math.nan
    # The realised risk among the answered with an exact binomial interval: at a few hundred answered rows the
    # sampling error alone is about a percentage point, as large as the gap to a 5 % target
    errors = round(float((1 - correct[answered]).sum()))
    out["risk_answered"] = errors / out["answered"] if out["answered"] else math.nan
    out["risk_answered_ci"] = clopper_pearson_interval(errors, out["answered"], settings.confidence)
    return out


def _covers(row: dict[str, Any]) -> bool:
    """Whether the conformal set holds the reference (compared by meaning, as the set was built)."""
    question_type = row.get("question_type", "")
    reference = answer_meaning(question_type, normalize_answer(row.get("answer", "")))
    return any(answer_meaning(question_type, normalize_answer(label)) == reference for label in row["answer_set"])


def confidence_metrics(predictions: Path, settings: Any, type_order: Sequence[str] = ()) -> dict[str, Any] | None:
    """metrics.json's ``confidence`` section, or None when no row carries a confidence."""
    rows = read_confidence_rows(predictions)
    if not rows:
        return None
    correct = np.array(strict_correct(rows, settings), dtype=np.float64)
    types = sorted({row.get("question_type", "") for row in rows},
                   key=lambda t: (type_order.index(t) if t in type_order else len(type_order), t))
    per_type = {}
    for question_type in types:
        index = [i for i, row in enumerate(rows) if row.get("question_type", "") == question_type]
        per_type[question_type] = _group_metrics([rows[i] for i in index], correct[index], settings)
    per_type[ALL] = _group_metrics(rows, correct, settings)
    errors = sorted((i for i in range(len(rows)) if not correct[i]), key=lambda i: -float(rows[i]["confidence"]))
    calibration_path = Path(predictions).with_name(f"{Path(predictions).stem}.calibration.json")
    calibration = json.loads(calibration_path.read_text(encoding="utf-8")) if calibration_path.is_file() else None
    return {
        "definitions": "docs/confidence.md; metrics: surgvqa.evaluation.calibration (15 bins; NLL and Brier of the confidence "
                       "as a forecast that the answer is right)",
        "calibration": {key: calibration[key] for key in ("scope", "temperature", "platt", "conformal_alpha",
                                                          "conformal_quantile", "target_risk", "risk_delta",
                                                          "abstain_threshold", "abstain_validation")
                        if key in calibration} if calibration else None,
        "n": len(rows),
        "n_abstained": per_type[ALL]["abstained"],
        "coverages": list(COVERAGE_POINTS),
        "per_type": per_type,
        # Images as absolute paths, as the failure cases have them: a predictions file names them relative to
        # its own folder, which is not where the report is rendered from.
        "most_confident_errors": [
            {**{key: rows[i].get(key) for key in ("id", "question", "question_type", "answer", "prediction",
                                                  "confidence", "confidence_raw", "answer_set")},
             "image": resolve_image_path(rows[i].get("image"), Path(predictions).absolute().parent)}
            for i in errors[:CONFIDENT_ERRORS]],
    }
