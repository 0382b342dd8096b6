"""What the report says, as strings every renderer (terminal, Markdown, HTML) lays out its own way."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from surgvqa.core.formatting import NOT_AVAILABLE, percent, percent_change, percent_interval
from surgvqa.data.answers import QUESTION_TYPES
from surgvqa.evaluation.comparison import CLOSED_ALL

TABLE_TYPES: tuple[str, ...] = (*QUESTION_TYPES, CLOSED_ALL)

# A table as (header, rows) of strings. The interval columns' headers differ between the renderers, so the
# builders take them as arguments.
TableData = tuple[list[str], list[list[str]]]


def confidence_label(metrics: dict) -> str:
    return f"{round(100 * metrics.get('settings', {}).get('confidence', 0.95))} % CI"


def error_banner(metrics: dict) -> str | None:
    """A warning for predictions that failed (unreadable image, out of memory, ...): their rows count as wrong, so
    the accuracies understate the model; the banner keeps a reader from taking them at face value."""
    errors = metrics.get("n_errors", 0)
    if not errors:
        return None
    share = 100 * errors / max(metrics.get("n", 0), 1)
    first = metrics.get("errors") or [{}]
    example = f" First: {first[0].get('id')}: {first[0].get('error')}" if first[0] else ""
    return (f"{errors} of {metrics.get('n', 0)} predictions ({share:.1f} %) are errors, scored as wrong: these "
            f"accuracies understate the model. Rerun `surgvqa predict` to retry them.{example}")


def collapse_line(metrics: dict) -> str | None:
    """One line naming each question type whose predictions collapsed to one answer while its references vary
    (``metrics["collapse"]``, docs/metrics.md): the accuracies then describe that answer, not the model."""
    collapsed = metrics.get("collapse") or []
    if not collapsed:
        return None
    parts = [f"{entry['question_type']}: {entry['answer']!r} is {entry['count']} of {entry['n']} predictions "
             f"({100 * entry['share']:.0f} %) while the references hold {entry['distinct_references']} distinct answers"
             for entry in collapsed]
    return f"Predictions collapsed to one answer: {'; '.join(parts)}. Check the model's raw output before " \
           "trusting these numbers."


def headline(metrics: dict) -> list[tuple[str, float | None, Sequence[float] | None]]:
    """(label, fraction, interval) of the numbers a result is read by: the task's own (``metrics["headline"]``,
    e.g. x1's atomic-fact recall, ROUGE-L and exact match), else Kvasir-VQA's accuracies."""
    if metrics.get("headline"):
        return [(entry["label"], entry.get("value"), entry.get("ci")) for entry in metrics["headline"]]
    overall, closed = metrics["overall"], metrics["per_type"].get(CLOSED_ALL, {})
    return [("micro strict", overall["micro_strict"], overall["micro_strict_ci"]),
            ("micro tolerant", overall["micro_tolerant"], overall["micro_tolerant_ci"]),
            ("macro strict", overall["macro_strict"], overall["macro_strict_ci"]),
            ("closed types strict", closed.get("strict"), closed.get("strict_ci"))]


def run_line(metrics: dict, evaluated_at: str | None = None) -> str:
    """model · task · predicted with · evaluated · commit, as far as metrics.json names them."""
    run = metrics.get("run") or {}
    parts = [f"model: {run.get('model') or 'unknown'}"]
    if run.get("predicted_with"):
        parts.append(f"predicted with: {run['predicted_with']}")
    if run.get("task"):
        parts.append(f"task: {run['task']}")
    if evaluated_at:
        parts.append(f"evaluated: {evaluated_at}")
    parts.append(f"commit: {run.get('commit') or 'unknown'}")
    return " · ".join(parts)


def per_type_rows(metrics: dict) -> list[dict[str, Any]]:
    """One row per type that has rows, then closed_all: the table of the terminal, Markdown, CSV and HTML."""
    rows = []
    for name in TABLE_TYPES:
        entry = metrics["per_type"].get(name)
        if not entry or not entry["n"]:
            continue
        rows.append({"type": name, "n": entry["n"], "strict": entry["strict"], "strict_ci": entry["strict_ci"],
                     "tolerant": entry["tolerant"], "tolerant_ci": entry["tolerant_ci"],
                     "set_f1": entry.get("set_f1"), "jaccard": entry.get("jaccard")})
    return rows


def per_type_table(metrics: dict, strict_ci: str, tolerant_ci: str) -> TableData:
    header = ["type", "n", "strict", strict_ci, "tolerant", tolerant_ci, "set F1", "Jaccard"]
    rows = [[r["type"], str(r["n"]), percent(r["strict"]), percent_interval(r["strict_ci"]), percent(r["tolerant"]),
             percent_interval(r["tolerant_ci"]), percent(r["set_f1"]), percent(r["jaccard"])]
            for r in per_type_rows(metrics)]
    return header, rows


def average_rows(metrics: dict) -> list[list[str]]:
    """The micro and macro average rows in the per-type table's columns (no set F1 or Jaccard)."""
    overall = metrics["overall"]
    return [[f"{label} average", str(overall["n"]) if label == "micro" else "",
             percent(overall[f"{label}_strict"]), percent_interval(overall[f"{label}_strict_ci"]),
             percent(overall[f"{label}_tolerant"]), percent_interval(overall[f"{label}_tolerant_ci"]), "", ""]
            for label in ("micro", "macro")]


def baseline_table(baseline: dict, strict_ci: str, tolerant_ci: str) -> TableData:
    header = ["type", "n", "baseline strict", "run strict", "delta", strict_ci, "delta tolerant", tolerant_ci]
    rows = [[name, str(e["n"]), percent(e["baseline_strict"]), percent(e["run_strict"]),
             percent_change(e["delta_strict"]), percent_interval(e["delta_strict_ci"]),
             percent_change(e["delta_tolerant"]), percent_interval(e["delta_tolerant_ci"])]
            for name in TABLE_TYPES if (e := baseline["per_type"].get(name)) and e["n"]]
    return header, rows


def per_template_table(metrics: dict, strict_ci: str) -> TableData:
    header = ["template", "question", "type", "n", "strict", strict_ci, "tolerant", "set F1"]
    rows = [[key, entry.get("question") or "(not a Kvasir template)", entry.get("question_type") or "",
             str(entry["n"]), percent(entry["strict"]), percent_interval(entry["strict_ci"]),
             percent(entry["tolerant"]), percent(entry.get("set_f1"))]
            for key, entry in metrics["per_template"].items()]
    return header, rows


def text_metric_items(metrics: dict) -> list[tuple[str, Any]]:
    """(name, value) of the text metrics; a value is a {"unavailable": why} dict where one could not run."""
    text = metrics.get("text_metrics") or {}
    if "unavailable" in text and len(text) == 1:
        return [("text metrics", text)]
    names = ["bleu", "rouge1", "rouge2", "rougeL", "meteor"] + (["meteor_1_5"] if "meteor_1_5" in text else [])
    return [(name, text.get(name)) for name in names]


def text_metric_value(value: Any) -> str:
    if isinstance(value, dict):
        return f"unavailable: {value.get('unavailable', '?')}"
    return NOT_AVAILABLE if value is None else f"{value:.4f}"


def text_metrics_table(metrics: dict) -> TableData:
    return ["metric", "value"], [[name, text_metric_value(value)] for name, value in text_metric_items(metrics)]


def task_tables(metrics: dict) -> list[dict[str, Any]]:
    """The task's own sections (surgvqa.tasks: x1's per-complexity and per-class tables, ...), plus the note on
    test images that the training split also holds."""
    tables = list(metrics.get("task_tables") or [])
    leak = metrics.get("data_leak")
    if leak:
        tables.insert(0, {"title": "Test images also in the official training split",
                          "header": ["images", "test rows on them", "test rows dropped"],
                          "rows": [[str(leak.get("images_in_train_and_test")),
                                    str(leak.get("test_rows_on_train_images")), str(leak.get("test_rows_dropped"))]]})
    return tables


# The confidence section reads its missing values as an en dash, as it always has.
CONFIDENCE_MISSING = "–"


def confidence_percent(value: float | None) -> str:
    """As :func:`percent`; NaN (a group with nothing answered) reads as missing too."""
    return percent(None if isinstance(value, float) and math.isnan(value) else value, CONFIDENCE_MISSING)


def _score(value: float | None, ci: Sequence[float] | None = None) -> str:
    """A calibration score with three decimals and, where it has one, its interval."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return CONFIDENCE_MISSING
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and not any(math.isnan(c) for c in ci) else ""
    return f"{value:.3f}{interval}"


def _calibrated_ece(values: Sequence[float] | None) -> str:
    """The ECE a calibrated model would show: its mean and 95th percentile."""
    if not values or any(math.isnan(value) for value in values):
        return CONFIDENCE_MISSING
    return f"{values[0]:.3f} (95 %: {values[1]:.3f})"


def confidence_table(section: dict[str, Any]) -> TableData:
    """The calibration and selective-prediction table of metrics.json's ``confidence``: one row per type, then
    all rows."""
    header = ["type", "n", "accuracy %", "ECE before", "ECE after", "ECE if calibrated", "ECE mass after",
              "MCE after", "Brier after", "NLL after", "AURC", *[f"acc@{round(c * 100)} %" for c in section["coverages"]]]
    rows = []
    for name, group in section["per_type"].items():
        before, after = group["before"], group["after"]
        rows.append([name, str(group["n"]), confidence_percent(after["accuracy"]),
                     _score(before["ece"], before["ece_ci"]), _score(after["ece"], after["ece_ci"]),
                     _calibrated_ece(after.get("ece_if_calibrated")), _score(after["ece_equal_mass"]),
                     _score(after["mce"]), _score(after["brier"], after["brier_ci"]),
                     _score(after["nll"], after["nll_ci"]), _score(group["aurc"]),
                     *[confidence_percent(group[f"accuracy_at_{round(c * 100)}"]) for c in section["coverages"]]])
    return header, rows


# The calibration scores a reader needs first; the rest follow in a second table, so that each fits 800 px.
CONFIDENCE_MAIN = ("type", "n", "accuracy %", "ECE before", "ECE after", "Brier after", "AURC")
CONFIDENCE_DETAIL = ("type", "ECE if calibrated", "ECE mass after", "MCE after", "NLL after")


def confidence_tables(section: dict[str, Any]) -> tuple[TableData, TableData]:
    """:func:`confidence_table` split in two: the main scores with accuracy at each coverage, then the others."""
    header, rows = confidence_table(section)

    def columns(names: Sequence[str]) -> TableData:
        picked = [header.index(name) for name in names]
        return [header[i] for i in picked], [[row[i] for i in picked] for row in rows]

    main = [*CONFIDENCE_MAIN, *[name for name in header if name.startswith("acc@")]]
    return columns(main), columns(CONFIDENCE_DETAIL)


def confidence_in_words(section: dict[str, Any]) -> str | None:
    """The confidence table's "all" row in one plain sentence: how sure the model says it is, how often it is
    right, and what answering only its most confident questions buys."""
    group = (section.get("per_type") or {}).get("all")
    if not group:
        return None
    after = group["after"]
    sure, right = after.get("mean_confidence"), after.get("accuracy")
    if not isinstance(sure, float) or not isinstance(right, float) or math.isnan(sure) or math.isnan(right):
        return None
    gap = "over-confident" if sure > right + 0.02 else "under-confident" if right > sure + 0.02 else "about right"
    text = (f"In plain words: on average the model says it is {100 * sure:.0f} % sure and is right {100 * right:.0f} % "
            f"of the time ({gap}); a typical gap between its confidence and its accuracy is {100 * after['ece']:.0f} "
            "points (ECE after).")
    coverage = min(section.get("coverages") or [1.0])
    at = group.get(f"accuracy_at_{round(coverage * 100)}")
    if isinstance(at, float) and not math.isnan(at):
        text += (f" Answering only its {round(coverage * 100)} % most confident questions, it is right on "
                 f"{100 * at:.0f} %.")
    return text


def conformal_table(section: dict[str, Any]) -> TableData:
    """Coverage and size of the conformal answer sets, per type that has them (empty rows: none has)."""
    header = ["type", "n", "coverage %", "mean set size", "single-candidate sets"]
    rows = [[name, str(sets["n"]), confidence_percent(sets["coverage"]), f"{sets['mean_set_size']:.2f}",
             str(sets["singletons"])]
            for name, group in section["per_type"].items() if (sets := group.get("conformal"))]
    return header, rows


def abstention_table(section: dict[str, Any]) -> TableData:
    header = ["type", "answered", "abstained", "accuracy on answered %"]
    rows = [[name, str(group["answered"]), str(group["abstained"]), confidence_percent(group["accuracy_answered"])]
            for name, group in section["per_type"].items()]
    return header, rows
