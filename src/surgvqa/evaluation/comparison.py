"""Paired comparison of a run with a baseline on the rows both scored: accuracy deltas with bootstrap CIs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from surgvqa.core.config import EvaluateConfig
from surgvqa.data.answers import CLOSED_TYPES, QUESTION_TYPES
from surgvqa.evaluation.bootstrap import percentile_ci, strata_where, stratified_bootstrap_sums, stratify
from surgvqa.evaluation.scoring import AnswerScore, PredictionRow, score_row

CLOSED_ALL = "closed_all"
ACCURACIES = ("strict", "tolerant")


@dataclass
class PairedDraws:
    """Run and baseline accuracies of the paired rows, and the bootstrap draws of their difference per stratum."""

    strata: np.ndarray  # each paired row's stratum
    run_values: np.ndarray  # (rows, ACCURACIES) of the run, 0/1
    base_values: np.ndarray  # the same for the baseline
    draws: np.ndarray  # (strata, samples, ACCURACIES): resampled sums of run - baseline
    stratum_n: np.ndarray
    confidence: float

    def entry(self, selected: np.ndarray) -> dict[str, Any]:
        """Run, baseline, delta and the delta's CI of each accuracy over the rows of the `selected` strata."""
        mask = np.isin(self.strata, selected)
        n = int(mask.sum())
        entry: dict[str, Any] = {"n": n}
        for col, name in enumerate(ACCURACIES):
            if n == 0:
                entry.update({f"run_{name}": None, f"baseline_{name}": None, f"delta_{name}": None,
                              f"delta_{name}_ci": None})
                continue
            run_acc = float(self.run_values[mask, col].mean())
            base_acc = float(self.base_values[mask, col].mean())
            entry[f"run_{name}"], entry[f"baseline_{name}"] = run_acc, base_acc
            entry[f"delta_{name}"] = run_acc - base_acc
            entry[f"delta_{name}_ci"] = percentile_ci(
                self.draws[selected, :, col].sum(axis=0) / self.stratum_n[selected].sum(), self.confidence
            )
        return entry


def compare_with_baseline(
    rows: Sequence[PredictionRow],
    scores: Sequence[AnswerScore],
    baseline: Sequence[PredictionRow],
    settings: EvaluateConfig,
) -> dict[str, Any]:
    """Run minus baseline per type, closed_all and overall on the ids both files scored (the run's type and
    template decide); one index draw resamples (run, baseline) pairs together."""
    base_by_id = {row.id: row for row in baseline if row.id}
    run_ids = {row.id for row in rows if row.id}
    pairs = [(row, score, base_by_id[row.id]) for row, score in zip(rows, scores) if row.id in base_by_id]
    out: dict[str, Any] = {
        "n_paired": len(pairs),
        "n_run_only": len(run_ids - base_by_id.keys()),
        "n_baseline_only": len(base_by_id.keys() - run_ids),
        "n_type_mismatch": sum(1 for row, _, base in pairs if row.question_type != base.question_type),
    }
    if not pairs:
        out.update(per_type={}, overall={})
        return out
    run_values = np.array([[s.strict, s.tolerant] for _, s, _ in pairs], dtype=np.float64)
    base_scores = [score_row(base, settings) for _, _, base in pairs]
    base_values = np.array([[s.strict, s.tolerant] for s in base_scores], dtype=np.float64)
    keys, strata = stratify([row.stratum for row, _, _ in pairs])
    draws = stratified_bootstrap_sums(run_values - base_values, strata, len(keys), settings.bootstrap_samples,
                                      settings.seed)
    paired = PairedDraws(strata, run_values, base_values, draws, np.bincount(strata, minlength=len(keys)),
                         settings.confidence)
    per_type = {t: paired.entry(strata_where(keys, lambda key, t=t: key[0] == t)) for t in QUESTION_TYPES}
    per_type[CLOSED_ALL] = paired.entry(strata_where(keys, lambda key: key[0] in CLOSED_TYPES))
    out["per_type"] = per_type
    out["overall"] = paired.entry(np.arange(len(keys)))
    return out
