"""Kvasir-VQA-x1's own section of metrics.json: exact match, atomic-fact recall and text metrics per group."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from surgvqa.core.formatting import percent, percent_interval
from surgvqa.evaluation.bootstrap import bootstrap_mean_ci, percentile_ci, stratified_bootstrap_sums
from surgvqa.evaluation.text_metrics import bleu_rouge
from surgvqa.tasks.kvasir_vqa_x1.atomic_facts import ATOM_TYPES, Fact, check_facts, facts_of
from surgvqa.tasks.kvasir_vqa_x1.text import normalise_text, original_problem, question_classes

if TYPE_CHECKING:
    from surgvqa.core.config import EvaluateConfig
    from surgvqa.evaluation.scoring import PredictionRow

MAX_MISSES_PER_TYPE = 6


def _hypothesis(row: PredictionRow) -> str:
    if row.error is not None:
        return ""
    return row.text if row.text is not None else row.prediction


def _row_facts(row: PredictionRow) -> list[Fact]:
    meta = row.meta if isinstance(row.meta, dict) else {}
    return facts_of(meta.get("original"))


def _rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    cache: dict[tuple[str, str], float] = {}
    values = []
    for hypothesis, reference in zip(hypotheses, references):
        key = (reference, hypothesis)
        if key not in cache:
            cache[key] = scorer.score(reference, hypothesis)["rougeL"].fmeasure
        values.append(cache[key])
    return np.asarray(values, dtype=np.float64)


class _RowScores:
    """Per-row exact match, ROUGE-L and fact checks of a set of prediction rows."""

    def __init__(self, rows: Sequence[PredictionRow]):
        self.rows = list(rows)
        self.hypotheses = [_hypothesis(row) for row in self.rows]
        self.exact = np.array([float(bool(h) and normalise_text(h) == normalise_text(row.reference))
                               for row, h in zip(self.rows, self.hypotheses)])
        self.rouge_l = _rouge_l(self.hypotheses, [row.reference for row in self.rows])
        self.facts = [_row_facts(row) for row in self.rows]
        self.stated = [check_facts(h, facts) if h else [False] * len(facts)
                       for h, facts in zip(self.hypotheses, self.facts)]

    def fact_counts(self, atom_type: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per row: (facts stated, facts) of one atom type (None: all)."""
        stated = np.array([sum(ok for fact, ok in zip(facts, flags) if atom_type in (None, fact.atom_type))
                           for facts, flags in zip(self.facts, self.stated)], dtype=np.float64)
        total = np.array([sum(1 for fact in facts if atom_type in (None, fact.atom_type)) for facts in self.facts],
                         dtype=np.float64)
        return stated, total


def _ratio_ci(numerator: np.ndarray, denominator: np.ndarray, settings: EvaluateConfig) -> dict[str, Any]:
    """sum(numerator) / sum(denominator) with a percentile bootstrap CI over rows (resampled with replacement)."""
    total = float(denominator.sum())
    if total == 0:
        return {"value": None, "ci": None, "n": 0}
    columns = np.stack([numerator, denominator], axis=1)
    draws = stratified_bootstrap_sums(columns, np.zeros(len(numerator), dtype=np.int64), 1,
                                      settings.bootstrap_samples, settings.seed)[0]
    ratios = draws[:, 0] / np.maximum(draws[:, 1], 1e-12)
    return {"value": float(numerator.sum() / total), "ci": percentile_ci(ratios, settings.confidence),
            "n": int(total)}


def _group_metrics(scores: _RowScores, indices: list[int], settings: EvaluateConfig) -> dict[str, Any]:
    hypotheses = [scores.hypotheses[i] for i in indices]
    references = [scores.rows[i].reference for i in indices]
    stated, total = scores.fact_counts()
    text = bleu_rouge(hypotheses, references)
    return {"n": len(indices), "exact_match": float(scores.exact[indices].mean()) if indices else None,
            "bleu": text.get("bleu"), "rouge1": text.get("rouge1"), "rouge2": text.get("rouge2"),
            "rougeL": text.get("rougeL"),
            "atomic_recall": _ratio_ci(stated[indices], total[indices], settings)["value"]}


def _misses(scores: _RowScores, settings: EvaluateConfig) -> dict[str, list[dict[str, Any]]]:
    """A seeded sample of rows per atom type where a fact was not stated, for the report's gallery."""
    rng = np.random.default_rng(settings.seed)
    gallery: dict[str, list[dict[str, Any]]] = {}
    for atom_type in ATOM_TYPES:
        missed = [i for i, (facts, flags) in enumerate(zip(scores.facts, scores.stated))
                  if any(fact.atom_type == atom_type and not ok for fact, ok in zip(facts, flags))]
        if not missed:
            continue
        limit = min(len(missed), max(settings.failure_examples, 0), MAX_MISSES_PER_TYPE)
        chosen = sorted(rng.choice(len(missed), size=limit, replace=False)) if limit else []
        gallery[atom_type] = [{
            "id": scores.rows[missed[i]].id, "question": scores.rows[missed[i]].question,
            "answer": scores.rows[missed[i]].reference, "prediction": scores.hypotheses[missed[i]],
            "missed": [f"{fact.label} ({fact.question})" for fact, ok in
                       zip(scores.facts[missed[i]], scores.stated[missed[i]]) if fact.atom_type == atom_type and not ok],
            "image": scores.rows[missed[i]].image, "error": scores.rows[missed[i]].error,
        } for i in chosen]
    return gallery


def _complexity(row: PredictionRow) -> str:
    meta = row.meta if isinstance(row.meta, dict) else {}
    return str(meta.get("complexity") or "unknown")


def _paired_recall(run_stated: np.ndarray, base_stated: np.ndarray, facts: np.ndarray,
                   settings: EvaluateConfig) -> dict[str, Any] | None:
    """Run and baseline recall over the same facts, and their difference with a paired bootstrap CI over rows."""
    if facts.sum() == 0:
        return None
    # One index draw resamples (run, baseline) pairs together: the interval reflects only their disagreement.
    columns = np.stack([run_stated - base_stated, facts], axis=1)
    draws = stratified_bootstrap_sums(columns, np.zeros(len(facts), dtype=np.int64), 1, settings.bootstrap_samples,
                                      settings.seed)[0]
    return {"run": float(run_stated.sum() / facts.sum()), "baseline": float(base_stated.sum() / facts.sum()),
            "delta": float((run_stated.sum() - base_stated.sum()) / facts.sum()),
            "delta_ci": percentile_ci(draws[:, 0] / np.maximum(draws[:, 1], 1e-12), settings.confidence),
            "n_facts": int(facts.sum())}


def _paired(run: _RowScores, base: _RowScores, settings: EvaluateConfig) -> dict[str, Any]:
    """Run minus baseline on the rows both scored: atomic-fact recall (overall, per atom type and per complexity)
    and ROUGE-L, with paired bootstrap CIs."""
    run_stated, facts = run.fact_counts()
    base_stated, _ = base.fact_counts()
    n = len(run.rows)
    out: dict[str, Any] = {"n_paired": n}
    if n == 0:
        return out
    recall = _paired_recall(run_stated, base_stated, facts, settings)
    if recall is not None:
        out["atomic_recall"] = recall
        per_type = {}
        for atom_type in ATOM_TYPES:
            run_type_stated, type_facts = run.fact_counts(atom_type)
            per_type[atom_type] = _paired_recall(run_type_stated, base.fact_counts(atom_type)[0], type_facts, settings)
        out["atomic_recall_per_type"] = {key: value for key, value in per_type.items() if value is not None}
        complexity = np.array([_complexity(row) for row in run.rows])
        per_complexity = {key: _paired_recall(run_stated[complexity == key], base_stated[complexity == key],
                                              facts[complexity == key], settings)
                          for key in sorted(set(complexity))}
        out["atomic_recall_per_complexity"] = {key: value for key, value in per_complexity.items()
                                               if value is not None}
    strata = np.zeros(n, dtype=np.int64)
    draws = stratified_bootstrap_sums((run.rouge_l - base.rouge_l)[:, None], strata, 1, settings.bootstrap_samples,
                                      settings.seed)[0]
    out["rougeL"] = {"run": float(run.rouge_l.mean()), "baseline": float(base.rouge_l.mean()),
                     "delta": float((run.rouge_l - base.rouge_l).mean()),
                     "delta_ci": percentile_ci(draws[:, 0] / n, settings.confidence)}
    out["exact_match"] = {"run": float(run.exact.mean()), "baseline": float(base.exact.mean()),
                          "delta": float((run.exact - base.exact).mean())}
    return out


def x1_metrics(rows: Sequence[PredictionRow], settings: EvaluateConfig,
               baseline: Sequence[PredictionRow] | None = None) -> dict[str, Any]:
    """Exact match, atomic-fact recall (overall and per atom type, with CIs), text metrics per complexity and per
    question class, the misses gallery, and the paired comparison with ``baseline`` when given."""
    scores = _RowScores(rows)
    stated, total = scores.fact_counts()
    result: dict[str, Any] = {
        "n": len(scores.rows),
        "exact_match": float(scores.exact.mean()),
        "exact_match_ci": bootstrap_mean_ci(scores.exact, settings.bootstrap_samples, settings.confidence,
                                            settings.seed),
        "exact_match_definition": "lower case, punctuation and articles removed, white space collapsed",
        "rougeL": float(scores.rouge_l.mean()),
        "rougeL_ci": bootstrap_mean_ci(scores.rouge_l, settings.bootstrap_samples, settings.confidence,
                                       settings.seed),
        "rows_with_facts": int((total > 0).sum()),
        # Rows prepared before prepare rejected them: their facts cannot be counted, so they are named here.
        "rows_original_unreadable": sum(
            original_problem((row.meta if isinstance(row.meta, dict) else {}).get("original")) is not None
            for row in scores.rows),
        "atomic_recall": _ratio_ci(stated, total, settings),
        "atomic_recall_per_type": {atom_type: _ratio_ci(*scores.fact_counts(atom_type), settings)
                                   for atom_type in ATOM_TYPES},
    }
    by_complexity: dict[str, list[int]] = {}
    by_class: dict[str, list[int]] = {}
    for index, row in enumerate(scores.rows):
        meta = row.meta if isinstance(row.meta, dict) else {}
        by_complexity.setdefault(_complexity(row), []).append(index)
        for label in question_classes(meta.get("question_class")) or ["(none)"]:
            by_class.setdefault(label, []).append(index)
    result["per_complexity"] = {key: _group_metrics(scores, indices, settings)
                                for key, indices in sorted(by_complexity.items())}
    result["per_question_class"] = {key: _group_metrics(scores, indices, settings)
                                    for key, indices in sorted(by_class.items())}
    result["misses"] = _misses(scores, settings)
    if baseline is not None:
        base_by_id = {row.id: row for row in baseline if row.id}
        pairs = [(row, base_by_id[row.id]) for row in scores.rows if row.id in base_by_id]
        result["baseline"] = _paired(_RowScores([r for r, _ in pairs]), _RowScores([b for _, b in pairs]), settings)
    return result


def x1_headline(x1: dict[str, Any]) -> list[dict[str, Any]]:
    """The numbers an x1 result is read by, for the terminal summary and the report's cards (fractions, with
    their intervals): atomic-fact recall, ROUGE-L and normalised exact match."""
    recall = x1["atomic_recall"]
    return [{"label": "atomic-fact recall", "value": recall["value"], "ci": recall["ci"]},
            {"label": "ROUGE-L", "value": x1["rougeL"], "ci": x1["rougeL_ci"]},
            {"label": "exact match", "value": x1["exact_match"], "ci": x1["exact_match_ci"]}]


def _pct(value: Any) -> str:
    return percent(value, missing="-")


def _ci(ci: Any) -> str:
    return percent_interval(ci, missing="-")


def x1_tables(x1: dict[str, Any]) -> list[dict[str, Any]]:
    """The x1 sections of the report as plain tables (title, header, rows of strings)."""
    group_header = ["n", "exact match", "BLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L", "atomic recall"]

    def group_rows(groups: dict[str, Any]) -> list[list[str]]:
        return [[key, str(entry["n"]), _pct(entry["exact_match"]), _pct(entry["bleu"]), _pct(entry["rouge1"]),
                 _pct(entry["rouge2"]), _pct(entry["rougeL"]), _pct(entry["atomic_recall"])]
                for key, entry in groups.items()]

    recall = x1["atomic_recall"]
    tables = [
        {"title": "Kvasir-VQA-x1: overall (%)", "header": ["metric", "value", "95% CI"],
         "rows": [["exact match (normalised)", _pct(x1["exact_match"]), _ci(x1["exact_match_ci"])],
                  ["ROUGE-L", _pct(x1["rougeL"]), _ci(x1["rougeL_ci"])],
                  [f"atomic-fact recall ({recall['n']} facts)", _pct(recall["value"]), _ci(recall["ci"])],
                  *([["rows whose 'original' is not JSON (no facts counted)",
                      str(x1["rows_original_unreadable"]), ""]] if x1.get("rows_original_unreadable") else [])]},
        {"title": "Atomic-fact recall per atom type (%)", "header": ["atom type", "facts", "recall", "95% CI"],
         "rows": [[atom_type, str(entry["n"]), _pct(entry["value"]), _ci(entry["ci"])]
                  for atom_type, entry in x1["atomic_recall_per_type"].items() if entry["n"]]},
        {"title": "Per complexity (%)", "header": ["complexity", *group_header],
         "rows": group_rows(x1["per_complexity"])},
        {"title": "Per question class (%)", "header": ["question class", *group_header],
         "rows": group_rows(x1["per_question_class"])},
    ]
    if "baseline" in x1 and x1["baseline"].get("n_paired"):
        paired = x1["baseline"]
        tables.append({"title": f"Trained vs baseline, paired ({paired['n_paired']} rows, %)",
                       "header": ["metric", "run", "baseline", "delta", "95% CI of delta"],
                       "rows": [[name, _pct(paired[key]["run"]), _pct(paired[key]["baseline"]),
                                 _pct(paired[key]["delta"]), _ci(paired[key].get("delta_ci"))]
                                for name, key in (("atomic-fact recall", "atomic_recall"), ("ROUGE-L", "rougeL"),
                                                  ("exact match", "exact_match")) if key in paired]
                               + [[f"atomic-fact recall, {group} {key}", _pct(entry["run"]), _pct(entry["baseline"]),
                                   _pct(entry["delta"]), _ci(entry["delta_ci"])]
                                  for group, field in (("atom type", "atomic_recall_per_type"),
                                                       ("complexity", "atomic_recall_per_complexity"))
                                  for key, entry in paired.get(field, {}).items()]})
    misses = [[atom_type, item["question"], item["answer"], item["prediction"] or "(empty)", "; ".join(item["missed"])]
              for atom_type, items in x1["misses"].items() for item in items]
    if misses:
        tables.append({"title": "Missed facts (a sample per atom type)",
                       "header": ["atom type", "question", "reference", "prediction", "facts not stated"],
                       "rows": misses})
    return tables
