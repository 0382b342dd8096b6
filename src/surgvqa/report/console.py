"""The report on the terminal: rich renderables of the per-type, text-metric and baseline tables."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from surgvqa.core.formatting import NOT_AVAILABLE, percent, percent_interval
from surgvqa.evaluation.comparison import CLOSED_ALL
from surgvqa.report.contents import (
    average_rows,
    baseline_table,
    collapse_line,
    confidence_label,
    error_banner,
    headline,
    per_type_table,
    text_metric_items,
    text_metric_value,
)

SKIPPED_SHOWN = 5  # skipped lines named on the terminal; metrics.json holds them all


def _with_intervals(row: list[str]) -> list[str]:
    """A per-type table row as the terminal shows it: strict and tolerant each followed by its interval."""
    pairs = [value if value == NOT_AVAILABLE else f"{value} {interval}" for value, interval in (row[2:4], row[4:6])]
    return [row[0], row[1], *pairs, row[6]]


def _per_type(metrics: dict, ci: str) -> Table:
    table = Table(title=f"Accuracy per question type, % [{ci}]")
    for column in ("type", "n", "strict", "tolerant", "set F1"):
        table.add_column(column, justify="left" if column == "type" else "right", no_wrap=True)
    _, rows = per_type_table(metrics, ci, ci)
    for i, row in enumerate(rows):
        last_of_group = i + 1 == len(rows) or rows[i + 1][0] == CLOSED_ALL
        table.add_row(*_with_intervals(row), end_section=last_of_group)
    for row in average_rows(metrics):
        table.add_row(*_with_intervals(row), style="bold")
    return table


def _headline(metrics: dict, ci: str) -> Table:
    """The task's own summary (x1: atomic-fact recall, ROUGE-L, exact match) in place of the per-type table."""
    table = Table(title=f"{metrics.get('task') or 'Summary'}, % [{ci}] on {metrics.get('n', 0)} rows")
    for column in ("metric", "value", ci):
        table.add_column(column, justify="left" if column == "metric" else "right", no_wrap=True)
    for label, value, interval in headline(metrics):
        table.add_row(label, percent(value), percent_interval(interval))
    return table


def _text_metrics(items: list[tuple[str, Any]]) -> Table:
    table = Table(title="Text metrics on the raw text (0-1)")
    for name, _ in items:
        table.add_column(name, justify="right")
    table.add_row(*("n/a" if isinstance(value, dict) else text_metric_value(value) for _, value in items))
    return table


def _baseline(baseline: dict, ci: str) -> Table:
    table = Table(title=f"Run vs baseline on {baseline['n_paired']} paired ids (strict %, paired {ci})")
    for column in ("type", "n", "baseline", "run", "delta", ci):
        table.add_column(column, justify="left" if column == "type" else "right")
    for row in baseline_table(baseline, ci, ci)[1]:
        table.add_row(*row[:6])
    return table


def _problems(metrics: dict) -> list[str]:
    """What was skipped or scored as wrong without being the model's answer."""
    problems = []
    if metrics.get("n_skipped"):
        more = f" (all {metrics['n_skipped']} in metrics.json)" if metrics["n_skipped"] > SKIPPED_SHOWN else ""
        problems.append(f"[yellow]{metrics['n_skipped']} line(s) skipped[/yellow]{more}:")
        problems += [escape(f"  {s['where']}: {s['reason']}") for s in metrics["skipped"][:SKIPPED_SHOWN]]
    if metrics.get("n_errors"):
        problems.append(f"[yellow]{metrics['n_errors']} row(s) with a prediction error scored as wrong[/yellow]")
    if metrics.get("n_empty_predictions"):
        problems.append(f"[yellow]{metrics['n_empty_predictions']} empty prediction(s) scored as wrong[/yellow]")
    return problems


def rich_tables(metrics: dict) -> list[Any]:
    """Renderables for the terminal: per-type table, text metrics, baseline deltas, what was skipped."""
    ci = confidence_label(metrics)
    banner = error_banner(metrics)
    out: list[Any] = [f"[bold red]{escape(banner)}[/bold red]"] if banner else []
    if collapsed := collapse_line(metrics):
        out.append(f"[bold yellow]{escape(collapsed)}[/bold yellow]")
    out.append(_headline(metrics, ci) if metrics.get("headline") else _per_type(metrics, ci))
    items = text_metric_items(metrics)
    out.append(_text_metrics(items))
    out += [f"[yellow]{name}: {escape(value['unavailable'])}[/yellow]" for name, value in items
            if isinstance(value, dict)]
    baseline = metrics.get("baseline")
    if baseline and baseline.get("per_type"):
        out.append(_baseline(baseline, ci))
    return out + _problems(metrics)
