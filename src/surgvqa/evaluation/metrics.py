"""metrics.json of scored prediction rows: accuracy per question type, per template and overall (docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from surgvqa.core.config import EvaluateConfig
from surgvqa.data.answers import CLOSED_TYPES, COLOR, MCQ, QUESTION_TYPES
from surgvqa.evaluation.bootstrap import percentile_ci, strata_where, stratified_bootstrap_sums, stratify
from surgvqa.evaluation.collapse import collapsed_types
from surgvqa.evaluation.comparison import CLOSED_ALL, compare_with_baseline
from surgvqa.evaluation.confusion import confusion_matrix
from surgvqa.evaluation.scoring import AnswerScore, PredictionRow, score_row
from surgvqa.evaluation.text_metrics import MeteorRun, text_metrics

MULTI_LABEL_TYPES: tuple[str, ...] = (COLOR, MCQ)
UNTEMPLATED = "untemplated"
MAX_LISTED = 1000  # errors and notes listed in metrics.json (all are counted); skipped lines are all listed


def _ci_fields(name: str, point: float | None, draws: np.ndarray | None, confidence: float) -> dict[str, Any]:
    if point is None or draws is None:
        return {name: None, f"{name}_ci": None}
    return {name: point, f"{name}_ci": percentile_ci(draws, confidence)}


class StratifiedScores:
    """Per-row score columns grouped by stratum (type, template), with the bootstrap draws every aggregate reads."""

    COLUMNS = ("strict", "tolerant", "f1", "jaccard")

    def __init__(
        self, rows: Sequence[PredictionRow], scores: Sequence[AnswerScore], settings: EvaluateConfig
    ):
        self.rows = rows
        self.values = np.array(
            [[s.strict, s.tolerant, s.f1, s.jaccard] for s in scores], dtype=np.float64
        ).reshape(len(scores), 4)
        self.keys, self.strata = stratify([row.stratum for row in rows])
        self.stratum_n = np.bincount(self.strata, minlength=len(self.keys)).astype(np.float64)
        self.stratum_sums = np.zeros((len(self.keys), 4))
        np.add.at(self.stratum_sums, self.strata, self.values)
        # F1 / Jaccard are reported for the multi-label types only: their draws are skipped elsewhere.
        needed = np.array(
            [[True, True, key[0] in MULTI_LABEL_TYPES, key[0] in MULTI_LABEL_TYPES] for key in self.keys],
            dtype=bool,
        ).reshape(len(self.keys), 4)
        self.draws = stratified_bootstrap_sums(
            self.values, self.strata, len(self.keys), settings.bootstrap_samples, settings.seed, needed
        )
        self.confidence = settings.confidence

    def of_type(self, question_type: str) -> np.ndarray:
        return strata_where(self.keys, lambda key: key[0] == question_type)

    def group(self, strata: np.ndarray, columns: Sequence[str] = ("strict", "tolerant")) -> dict[str, Any]:
        """Point estimates and CIs of the mean of `columns` over the rows of the given strata."""
        n = int(self.stratum_n[strata].sum()) if len(strata) else 0
        out: dict[str, Any] = {"n": n}
        for name in columns:
            col = self.COLUMNS.index(name)
            if n == 0:
                out.update(_ci_fields(name, None, None, self.confidence))
                continue
            point = float(self.stratum_sums[strata, col].sum() / n)
            draws = self.draws[strata, :, col].sum(axis=0) / n
            out.update(_ci_fields(name, point, draws, self.confidence))
        return out

    def group_draws(self, strata: np.ndarray, column: str) -> np.ndarray:
        """The bootstrap draws of the mean of `column` over the rows of the given strata."""
        col = self.COLUMNS.index(column)
        return self.draws[strata, :, col].sum(axis=0) / self.stratum_n[strata].sum()


def _per_type(scored: StratifiedScores) -> dict[str, dict[str, Any]]:
    per_type: dict[str, dict[str, Any]] = {}
    for question_type in QUESTION_TYPES:
        strata = scored.of_type(question_type)
        columns = (
            ("strict", "tolerant", "f1", "jaccard")
            if question_type in MULTI_LABEL_TYPES
            else ("strict", "tolerant")
        )
        entry = scored.group(strata, columns)
        if question_type in MULTI_LABEL_TYPES:
            entry["set_f1"], entry["set_f1_ci"] = entry.pop("f1"), entry.pop("f1_ci")
        else:
            entry.update(set_f1=None, set_f1_ci=None, jaccard=None, jaccard_ci=None)
        entry["n_errors"] = sum(
            1 for r in scored.rows if r.question_type == question_type and r.error is not None
        )
        per_type[question_type] = entry
    closed = strata_where(scored.keys, lambda key: key[0] in CLOSED_TYPES)
    per_type[CLOSED_ALL] = scored.group(closed)
    return per_type


def _per_template(scored: StratifiedScores, templates_by_id: Mapping[int, Any]) -> dict[str, dict[str, Any]]:
    per_template: dict[str, dict[str, Any]] = {}
    templates = sorted({key[1] for key in scored.keys})
    for template in [t for t in templates if t != 0] + ([0] if 0 in templates else []):
        strata = strata_where(scored.keys, lambda key, t=template: key[1] == t)
        known = templates_by_id.get(template)
        multi = known is not None and known.multi_label
        entry: dict[str, Any] = {
            "question": known.question if known else None,
            "question_type": known.question_type if known else None,
        }
        entry.update(
            scored.group(strata, ("strict", "tolerant", "f1", "jaccard") if multi else ("strict", "tolerant"))
        )
        if multi:
            entry["set_f1"], entry["set_f1_ci"] = entry.pop("f1"), entry.pop("f1_ci")
        per_template[str(template) if template else UNTEMPLATED] = entry
    return per_template


def _overall(scored: StratifiedScores, per_type: dict[str, dict[str, Any]]) -> dict[str, Any]:
    everything = np.arange(len(scored.keys))
    micro = scored.group(everything)
    present = [t for t in QUESTION_TYPES if per_type[t]["n"] > 0]
    overall: dict[str, Any] = {
        "n": micro["n"],
        "micro_strict": micro["strict"],
        "micro_strict_ci": micro["strict_ci"],
        "micro_tolerant": micro["tolerant"],
        "micro_tolerant_ci": micro["tolerant_ci"],
        "macro_types": present,
    }
    for column in ("strict", "tolerant"):
        if not present:
            overall[f"macro_{column}"], overall[f"macro_{column}_ci"] = None, None
            continue
        point = float(np.mean([per_type[t][column] for t in present]))
        draws = np.mean([scored.group_draws(scored.of_type(t), column) for t in present], axis=0)
        overall[f"macro_{column}"] = point
        overall[f"macro_{column}_ci"] = percentile_ci(draws, scored.confidence)
    return overall


def _failure_entry(row: PredictionRow, score: AnswerScore) -> dict[str, Any]:
    return {
        "id": row.id,
        "where": row.where,
        "question": row.question,
        "answer": row.reference,
        "prediction": row.prediction,
        "raw_text": row.text,
        "error": row.error,
        "image": row.image,
        "tolerant": score.tolerant,
    }


def _failures(
    rows: Sequence[PredictionRow], scores: Sequence[AnswerScore], per_type_limit: int, seed: int
) -> dict[str, list[dict[str, Any]]]:
    """A seeded sample of wrong (strictly) rows per type, in file order, for the report's gallery."""
    rng = np.random.default_rng(seed)
    failures: dict[str, list[dict[str, Any]]] = {}
    for question_type in QUESTION_TYPES:
        wrong = [
            i
            for i, (row, score) in enumerate(zip(rows, scores))
            if row.question_type == question_type and not score.strict
        ]
        if not wrong or per_type_limit == 0:
            continue
        chosen = sorted(rng.choice(len(wrong), size=min(per_type_limit, len(wrong)), replace=False))
        failures[question_type] = [_failure_entry(rows[wrong[i]], scores[wrong[i]]) for i in chosen]
    return failures


def task_of(rows: Sequence[PredictionRow]) -> str:
    """The one task the rows belong to; rows of several tasks cannot share one set of metrics."""
    tasks = sorted({row.task for row in rows})
    if len(tasks) > 1:
        raise ValueError(f"the predictions mix tasks ({', '.join(tasks)}); evaluate each task's file on its own")
    return tasks[0] if tasks else "kvasir-vqa"


def evaluate_by_type(
    rows: Sequence[PredictionRow],
    settings: EvaluateConfig | None = None,
    *,
    baseline: Sequence[PredictionRow] | None = None,
    skipped: Sequence[dict[str, Any]] = (),
    notes: Sequence[dict[str, Any]] = (),
    with_text_metrics: bool = True,
    with_meteor: bool = True,
    templates_by_id: Mapping[int, Any] | None = None,
) -> dict[str, Any]:
    """Exact match per question type and group (``templates_by_id``: the task's template per id, for the
    per-template table), the text metrics and the baseline comparison (layout: docs/metrics.md)."""
    settings = settings or EvaluateConfig()
    if not rows:
        raise ValueError("no scorable prediction rows")
    hypotheses = [row.text if row.text is not None else row.prediction for row in rows]
    references = [row.reference for row in rows]
    # Started first: the JVM loads its paraphrase table while the rest is computed.
    meteor_run = MeteorRun(hypotheses, references) if with_text_metrics and with_meteor else None
    try:
        metrics = _score_everything(rows, settings, baseline, skipped, notes, templates_by_id or {})
    except BaseException:
        if meteor_run is not None:
            meteor_run.close()
        raise
    if with_text_metrics:
        metrics["text_metrics"] = text_metrics(
            hypotheses, references, meteor=with_meteor, meteor_run=meteor_run
        )
    else:
        metrics["text_metrics"] = {"unavailable": "disabled"}
    return metrics


def _score_everything(
    rows: Sequence[PredictionRow],
    settings: EvaluateConfig,
    baseline: Sequence[PredictionRow] | None,
    skipped: Sequence[dict[str, Any]],
    notes: Sequence[dict[str, Any]],
    templates_by_id: Mapping[int, Any],
) -> dict[str, Any]:
    scores = [score_row(row, settings) for row in rows]
    metrics: dict[str, Any] = {
        "schema_version": 1,
        "n": len(rows),
        "settings": settings.model_dump(mode="json"),
        "n_skipped": len(skipped),
        "skipped": list(skipped),  # every skipped line, named
        "n_notes": len(notes),
        "notes": list(notes[:MAX_LISTED]),
    }
    errors = [{"where": row.where, "id": row.id, "error": row.error} for row in rows if row.error is not None]
    metrics["n_errors"] = len(errors)
    metrics["errors"] = errors[:MAX_LISTED]
    metrics["n_empty_predictions"] = sum(
        1 for row in rows if row.error is None and not row.prediction.strip()
    )
    scored = StratifiedScores(rows, scores, settings)
    metrics["per_type"] = _per_type(scored)
    metrics["overall"] = _overall(scored, metrics["per_type"])
    metrics["per_template"] = _per_template(scored, templates_by_id)
    metrics["confusion"] = {
        t: confusion_matrix(
            t,
            [r.reference for r in rows if r.question_type == t],
            ["" if r.error is not None else r.prediction for r in rows if r.question_type == t],
        )
        for t in CLOSED_TYPES
        if metrics["per_type"][t]["n"] > 0
    }
    metrics["collapse"] = collapsed_types(rows)
    metrics["failures"] = _failures(rows, scores, settings.failure_examples, settings.seed)
    if baseline is not None:
        metrics["baseline"] = compare_with_baseline(rows, scores, baseline, settings)
    return metrics
