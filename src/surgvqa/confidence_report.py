"""The evaluate stage's view of confidence: calibration before and after temperature scaling, selective
prediction, conformal answer sets and abstentions per question type (metrics.json's ``confidence``), and the
report's "Confidence" section (reliability diagrams, risk-coverage plot, tables, most confident errors).

Computed from the predictions file itself: every number can be recomputed from its rows (``confidence_raw``,
``confidence``, ``answer_set``, ``abstained``); the metric definitions are in :mod:`surgvqa.calibration`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from surgvqa.calibration import (
    COVERAGE_POINTS,
    calibration_bins,
    calibration_summary,
    risk_coverage_curve,
    selective_summary,
)
from surgvqa.confidence import strict_correct

ALL = "all"
CURVE_POINTS = 200  # risk-coverage points kept per group in metrics.json
CONFIDENT_ERRORS = 8


def read_confidence_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a predictions file that carry a confidence (no error, a prediction, a number in [0, 1]);
    lines that are not JSON objects are the evaluate stage's to report, and skipped here."""
    rows, seen = [], set()
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or row.get("id") in seen or row.get("error") is not None:
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
    return out


def _covers(row: dict[str, Any]) -> bool:
    """Whether the conformal set holds the reference (compared by meaning, as the set was built)."""
    from surgvqa.data.answers import normalize_answer
    from surgvqa.decoding import answer_meaning

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
        "definitions": "docs/confidence.md; metrics: surgvqa.calibration (15 bins; NLL and Brier of the confidence "
                       "as a forecast that the answer is right)",
        "calibration": {key: calibration[key] for key in ("scope", "temperature", "conformal_alpha",
                                                          "conformal_quantile", "target_risk", "abstain_threshold")
                        if key in calibration} if calibration else None,
        "n": len(rows),
        "n_abstained": per_type[ALL]["abstained"],
        "coverages": list(COVERAGE_POINTS),
        "per_type": per_type,
        "most_confident_errors": [
            {key: rows[i].get(key) for key in ("id", "question", "question_type", "answer", "prediction",
                                               "confidence", "confidence_raw", "answer_set", "image")}
            for i in errors[:CONFIDENT_ERRORS]],
    }


# ----------------------------------------------------------------------------------------------------------------
# Plots and the HTML section
# ----------------------------------------------------------------------------------------------------------------


def plot_reliability(section: dict[str, Any]) -> bytes:
    """Reliability diagrams per type: accuracy against mean confidence per bin, before and after temperature
    scaling; the diagonal is perfect calibration, the marker size the bin's share of rows."""
    from surgvqa.report import _figure, _png

    groups = list(section["per_type"])
    columns = min(4, len(groups))
    rows = math.ceil(len(groups) / columns)
    figure = _figure(3.2 * columns, 3.0 * rows)
    for number, name in enumerate(groups):
        axes = figure.add_subplot(rows, columns, number + 1)
        axes.plot([0, 1], [0, 1], color="#999", linewidth=1, linestyle="--")
        for key, color, label in (("reliability_before", "#c0504d", "before"), ("reliability_after", "#1f77b4",
                                                                                "after")):
            bins = section["per_type"][name][key]
            axes.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color=color,
                      label=label, linewidth=1)
            axes.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins],
                         s=[10 + 200 * b["share"] for b in bins], color=color, alpha=0.4)
        group = section["per_type"][name]
        axes.set_title(f"{name} (n={group['n']}): ECE {group['before']['ece']:.3f} → {group['after']['ece']:.3f}",
                       fontsize=9)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel("confidence", fontsize=8)
        axes.set_ylabel("accuracy", fontsize=8)
        if number == 0:
            axes.legend(fontsize=8, loc="upper left")
    return _png(figure)


def plot_risk_coverage(section: dict[str, Any]) -> bytes:
    """Selective risk (errors among the answered) against coverage, answering the most confident first."""
    from surgvqa.report import _figure, _png

    figure = _figure(6.5, 4.0)
    axes = figure.add_subplot(1, 1, 1)
    for name, group in section["per_type"].items():
        curve = group["risk_coverage"]
        axes.plot(curve["coverage"], curve["risk"], label=f"{name} (AURC {group['aurc']:.3f})",
                  linewidth=2.5 if name == ALL else 1.2, color="black" if name == ALL else None)
    axes.set_xlabel("coverage (share of questions answered)")
    axes.set_ylabel("risk (error rate among answered)")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8)
    return _png(figure)


def confidence_plots(section: dict[str, Any] | None) -> dict[str, bytes]:
    if not section:
        return {}
    return {"reliability": plot_reliability(section), "risk_coverage": plot_risk_coverage(section)}


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _num(value: float | None, ci: Sequence[float] | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and not any(math.isnan(c) for c in ci) else ""
    return f"{value:.3f}{interval}"


def confidence_table(section: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the calibration and selective-prediction table: one row per type, then all rows."""
    header = ["type", "n", "accuracy %", "ECE before", "ECE after", "ECE mass after", "MCE after", "Brier after",
              "NLL after", "AURC", *[f"acc@{round(c * 100)} %" for c in section["coverages"]]]
    rows = []
    for name, group in section["per_type"].items():
        before, after = group["before"], group["after"]
        rows.append([name, str(group["n"]), _pct(after["accuracy"]), _num(before["ece"], before["ece_ci"]),
                     _num(after["ece"], after["ece_ci"]), _num(after["ece_equal_mass"]), _num(after["mce"]),
                     _num(after["brier"], after["brier_ci"]), _num(after["nll"], after["nll_ci"]),
                     _num(group["aurc"]),
                     *[_pct(group[f"accuracy_at_{round(c * 100)}"]) for c in section["coverages"]]])
    return header, rows


def confidence_html(section: dict[str, Any] | None, plots: dict[str, bytes], image_roots: Sequence[Any]) -> str:
    """The report's "Confidence" section (empty when no row carries a confidence)."""
    if not section:
        return ""
    from surgvqa.report import _e, _html_table, _png_uri, thumbnail_data_uri

    calibration = section.get("calibration") or {}
    temperature = calibration.get("temperature")
    fitted = (f"temperature scaling fitted on the validation split ({_e(calibration.get('scope'))}): "
              + ", ".join(f"{_e(k)} T={v:.2f}" for k, v in temperature.items())) if temperature \
        else "no calibration file beside the predictions: before = after (the model's own probabilities)"
    out = ['<h2 id="confidence">Confidence</h2>',
           (f'<p class="meta">{section["n"]} rows with a confidence; {fitted}. ECE with 15 equal-width bins '
           "(and equal-mass), MCE, Brier and NLL of the confidence as a forecast that the answer is right, with "
           "bootstrap intervals; AURC and accuracy at coverage rank by the calibrated confidence. "
           f"{section['n_abstained']} abstention(s), scored as wrong.</p>")]
    header, rows = confidence_table(section)
    out.append(_html_table(header, rows, table_id="confidence-table", aggregate_rows=[len(rows) - 1]))
    if "reliability" in plots:
        out.append(f'<img class="plot" id="plot-reliability" alt="reliability diagrams" '
                   f'src="{_png_uri(plots["reliability"])}">')
    if "risk_coverage" in plots:
        out.append(f'<img class="plot" id="plot-risk-coverage" alt="risk-coverage curves" '
                   f'src="{_png_uri(plots["risk_coverage"])}">')
    conformal = [(name, group) for name, group in section["per_type"].items() if "conformal" in group]
    if conformal:
        alpha = calibration.get("conformal_alpha")
        out.append(f'<h3>Conformal answer sets</h3><p class="meta">Closed single-label questions; target coverage '
                   f'{_pct(1 - alpha) if alpha else "?"} %. A set of one candidate is a confident answer; a large '
                   "set says: look again.</p>")
        out.append(_html_table(["type", "n", "coverage %", "mean set size", "single-candidate sets"],
                               [[name, g["conformal"]["n"], _pct(g["conformal"]["coverage"]),
                                 f'{g["conformal"]["mean_set_size"]:.2f}', g["conformal"]["singletons"]]
                                for name, g in conformal], table_id="conformal-table"))
    if calibration.get("target_risk") is not None:
        out.append(f'<h3>Abstention</h3><p class="meta">Target risk {_pct(calibration["target_risk"])} % '
                   "(threshold chosen on the validation split).</p>")
        out.append(_html_table(["type", "answered", "abstained", "accuracy on answered %"],
                               [[name, g["answered"], g["abstained"], _pct(g["accuracy_answered"])]
                                for name, g in section["per_type"].items()], table_id="abstention-table"))
    errors = section.get("most_confident_errors") or []
    if errors:
        out.append('<h3>Most confident errors</h3><div class="gallery" id="confident-errors">')
        for case in errors:
            uri = thumbnail_data_uri(case.get("image"), roots=image_roots)
            picture = f'<img alt="{_e(case.get("id"))}" src="{uri}">' if uri else '<div class="noimg">no image</div>'
            answer_set = case.get("answer_set")
            out.append(f'<div class="case">{picture}<div>{_e(case.get("question"))}</div>'
                       f'<div class="ref">reference: <b>{_e(case.get("answer"))}</b></div>'
                       f'<div class="pred">prediction: <b>{_e(case.get("prediction"))}</b> '
                       f'({_pct(case.get("confidence"))} % sure)</div>'
                       + (f'<div class="meta">answer set: {_e("; ".join(answer_set))}</div>' if answer_set else "")
                       + f'<div class="meta">{_e(case.get("id"))}</div></div>')
        out.append("</div>")
    return "".join(out)
