"""The report's figures as PNG bytes, drawn with matplotlib's object API on the Agg canvas (no pyplot state)."""

from __future__ import annotations

import io
import math
import textwrap
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from surgvqa.evaluation.confidence_report import ALL
from surgvqa.report.contents import TABLE_TYPES, confidence_label, per_type_rows


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _error_bars(points: list[float], cis: list[list[float]]) -> list[list[float]]:
    return [
        [max(0.0, p - c[0]) for p, c in zip(points, cis)],
        [max(0.0, c[1] - p) for p, c in zip(points, cis)],
    ]


def plot_per_type(metrics: dict) -> bytes:
    rows = per_type_rows(metrics)
    names = [r["type"] for r in rows]
    figure = _figure(max(6.0, 1.1 * len(names) + 2), 4.0)
    axes = figure.add_subplot()
    width = 0.38
    for offset, column, color in ((-width / 2, "strict", "#3b6ea8"), (width / 2, "tolerant", "#e39b3a")):
        points = [100 * r[column] for r in rows]
        cis = [[100 * c for c in r[f"{column}_ci"]] for r in rows]
        axes.bar([i + offset for i in range(len(rows))], points, width, yerr=_error_bars(points, cis), capsize=3,
                 label=column, color=color)
    axes.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 105)
    axes.set_title(f"Accuracy per question type ({confidence_label(metrics)})")
    axes.legend(loc="upper right")
    axes.grid(axis="y", alpha=0.3)
    return _png(figure)


def plot_baseline(metrics: dict) -> bytes | None:
    baseline = metrics.get("baseline") or {}
    entries = [(name, e) for name in TABLE_TYPES if (e := (baseline.get("per_type") or {}).get(name)) and e["n"]]
    if not entries:
        return None
    figure = _figure(max(7.0, 1.2 * len(entries) + 3), 4.0)
    left, right = figure.subplots(1, 2, width_ratios=[3, 2])
    width = 0.38
    positions = range(len(entries))
    left.bar([i - width / 2 for i in positions], [100 * e["baseline_strict"] for _, e in entries], width,
             label="baseline", color="#9a9a9a")
    left.bar([i + width / 2 for i in positions], [100 * e["run_strict"] for _, e in entries], width, label="run",
             color="#3b6ea8")
    left.set_xticks(list(positions), [n for n, _ in entries], rotation=20, ha="right")
    left.set_ylabel("strict accuracy (%)")
    left.set_ylim(0, 105)
    left.set_title(f"Baseline vs run ({baseline['n_paired']} paired ids)")
    left.legend(loc="upper right")
    deltas = [100 * e["delta_strict"] for _, e in entries]
    cis = [[100 * c for c in e["delta_strict_ci"]] for _, e in entries]
    right.barh(list(positions), deltas, xerr=_error_bars(deltas, cis), capsize=3,
               color=["#3a9a5b" if d >= 0 else "#c0504d" for d in deltas])
    right.axvline(0, color="black", linewidth=0.8)
    right.set_yticks(list(positions), [n for n, _ in entries])
    right.invert_yaxis()
    right.set_xlabel("delta strict (points)")
    right.set_title(f"Run - baseline (paired {confidence_label(metrics)})")
    for axes in (left, right):
        axes.grid(alpha=0.3)
    return _png(figure)


LABEL_CHARS = 18  # a confusion label longer than this is wrapped whole, never cut


def plot_confusion(question_type: str, confusion: dict) -> bytes:
    labels, matrix = confusion["labels"], np.asarray(confusion["matrix"], dtype=float)
    size = max(3.5, 0.55 * len(labels) + 2.0)
    lines = sum(max(1, math.ceil(len(label) / (LABEL_CHARS + 8))) for label in labels)
    long_labels = max(len(label) for label in labels) > LABEL_CHARS
    height = max(size, 0.16 * lines + 2.0) if long_labels else size
    figure = _figure(size + (3.0 if long_labels else 1.0), height)
    axes = figure.add_subplot()
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j]:
                axes.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                          color="white" if share[i, j] > 0.6 else "black")
    if max(len(label) for label in labels) <= LABEL_CHARS:
        axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        axes.set_yticks(range(len(labels)), labels, fontsize=8)
        axes.set_xlabel("prediction")
    else:  # long multi-label answers: whole, wrapped on the rows; the columns numbered as the rows
        wrapped = [f"{i + 1}. " + "\n".join(textwrap.wrap(label, LABEL_CHARS + 8)) for i, label in enumerate(labels)]
        axes.set_xticks(range(len(labels)), [str(i + 1) for i in range(len(labels))], fontsize=8)
        axes.set_yticks(range(len(labels)), wrapped, fontsize=7)
        axes.set_xlabel("prediction (numbered as the reference rows)")
    axes.set_ylabel("reference")
    axes.set_title(f"Confusion: {question_type} (row share, counts)")
    figure.colorbar(image, ax=axes, shrink=0.8)
    return _png(figure)


def plot_training_curve(curve: list[tuple[float, float]]) -> bytes:
    figure = _figure(6.5, 3.5)
    axes = figure.add_subplot()
    axes.plot([s for s, _ in curve], [loss for _, loss in curve], color="#3b6ea8", linewidth=1.5)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title("Training curve")
    axes.grid(alpha=0.3)
    return _png(figure)


def plot_reliability(section: dict[str, Any]) -> bytes:
    """Reliability diagrams per type: accuracy against mean confidence per bin, before and after temperature
    scaling; the diagonal is perfect calibration, the marker size the bin's share of rows."""
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
    figure = _figure(8.5, 4.0)
    axes = figure.add_subplot(1, 1, 1)
    for name, group in section["per_type"].items():
        curve = group["risk_coverage"]
        axes.plot(curve["coverage"], curve["risk"], label=f"{name} (AURC {group['aurc']:.3f})",
                  linewidth=2.5 if name == ALL else 1.2, color="black" if name == ALL else None)
    axes.set_xlabel("coverage (share of questions answered)")
    axes.set_ylabel("risk (error rate among answered)")
    axes.set_title("Risk-coverage: error rate when answering only the most confident questions", fontsize=10)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # beside, not on, the curves
    return _png(figure)


def report_figures(metrics: dict, training_curve: list[tuple[float, float]]) -> dict[str, bytes]:
    """Every figure the metrics (and the run's training curve) call for, by file stem under plots/."""
    figures = {"per_type": plot_per_type(metrics)}
    if (baseline := plot_baseline(metrics)) is not None:
        figures["baseline"] = baseline
    for question_type, confusion in (metrics.get("confusion") or {}).items():
        if confusion["labels"]:
            figures[f"confusion_{question_type}"] = plot_confusion(question_type, confusion)
    if training_curve:
        figures["training_curve"] = plot_training_curve(training_curve)
    if section := metrics.get("confidence"):
        figures["confidence_reliability"] = plot_reliability(section)
        figures["confidence_risk_coverage"] = plot_risk_coverage(section)
    return figures
