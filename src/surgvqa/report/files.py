"""The report's text files: metrics.md and the CSV tables (per type, confusion matrices)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

from surgvqa.report.contents import (
    average_rows,
    baseline_table,
    collapse_line,
    confidence_label,
    confidence_table,
    error_banner,
    per_template_table,
    per_type_rows,
    per_type_table,
    task_tables,
    text_metrics_table,
)


def _md_table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_report(metrics: dict) -> str:
    ci = confidence_label(metrics)
    banner = error_banner(metrics)
    parts = [
        f"# Evaluation: {metrics.get('predictions', '')}\n",
        (f"{metrics['n']} rows scored, {metrics.get('n_skipped', 0)} line(s) skipped, "
         f"{metrics.get('n_errors', 0)} prediction error(s) (scored as wrong). Accuracies in %, {ci} "
         "from a stratified bootstrap.\n"),
        *([f"> **Warning:** {banner}\n"] if banner else []),
        *([f"> **Warning:** {collapsed}\n"] if (collapsed := collapse_line(metrics)) else []),
        "## Per question type\n",
        _md_table(*per_type_table(metrics, f"strict {ci}", f"tolerant {ci}")),
        "\n## Overall\n",
        _md_table(["average", "strict", f"strict {ci}", "tolerant", f"tolerant {ci}"],
                  [[label, *row[2:6]] for label, row in zip(("micro", "macro"), average_rows(metrics))]),
    ]
    for table in task_tables(metrics):
        parts += [f"\n## {table['title']}\n", _md_table(table["header"], table["rows"])]
    parts += ["\n## Per template\n", _md_table(*per_template_table(metrics, f"strict {ci}"))]
    parts += ["\n## Text metrics (raw predictions, 0-1)\n", _md_table(*text_metrics_table(metrics))]
    if metrics.get("confidence"):
        parts += ["\n## Confidence (docs/confidence.md)\n", _md_table(*confidence_table(metrics["confidence"]))]
    baseline = metrics.get("baseline")
    if baseline and baseline.get("per_type"):
        parts += [
            f"\n## Run vs baseline ({baseline['n_paired']} paired ids)\n",
            # the second interval header ends in a space, as in earlier reports
            _md_table(*baseline_table(baseline, f"paired {ci}", f"paired {ci} ")),
        ]
    if metrics.get("skipped"):
        parts += ["\n## Skipped lines\n",
                  _md_table(["where", "reason"], [[s["where"], s["reason"]] for s in metrics["skipped"]])]
    return "".join(parts)


def _csv_text(rows: Iterable[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _share(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def per_type_csv(metrics: dict) -> str:
    header = ["type", "n", "strict", "strict_ci_low", "strict_ci_high", "tolerant", "tolerant_ci_low",
              "tolerant_ci_high", "set_f1", "jaccard"]
    rows = []
    for row in per_type_rows(metrics):
        strict_ci, tolerant_ci = row["strict_ci"] or [None, None], row["tolerant_ci"] or [None, None]
        rows.append([row["type"], row["n"], _share(row["strict"]), _share(strict_ci[0]), _share(strict_ci[1]),
                     _share(row["tolerant"]), _share(tolerant_ci[0]), _share(tolerant_ci[1]), _share(row["set_f1"]),
                     _share(row["jaccard"])])
    return _csv_text([header, *rows])


def confusion_csv(confusion: dict) -> str:
    """A confusion matrix: one row per reference label, one column per predicted label."""
    return _csv_text([["reference \\ prediction", *confusion["labels"]],
                      *([label, *counts] for label, counts in zip(confusion["labels"], confusion["matrix"]))])
