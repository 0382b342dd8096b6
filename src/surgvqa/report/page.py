"""report.html: the self-contained page, rendered from the template ``assets/report.html.j2``."""

from __future__ import annotations

import base64
import functools
import html
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import BaseLoader, Environment
from markupsafe import Markup

from surgvqa.core.formatting import percent, percent_interval
from surgvqa.data.answers import CLOSED_TYPES
from surgvqa.evaluation.comparison import CLOSED_ALL
from surgvqa.report.contents import (
    abstention_table,
    average_rows,
    baseline_table,
    collapse_line,
    confidence_in_words,
    confidence_label,
    confidence_percent,
    confidence_tables,
    conformal_table,
    error_banner,
    headline,
    per_template_table,
    per_type_table,
    run_line,
    task_tables,
    text_metrics_table,
)
from surgvqa.report.run_files import thumbnail_data_uri

TEMPLATE = "report.html.j2"


class _AssetLoader(BaseLoader):
    """Templates from ``surgvqa/assets``. A ``.j2`` template's line breaks and indentation are layout only: it is
    joined into one line, so the page comes out as compact as it always was."""

    def get_source(self, environment: Environment, template: str) -> tuple[str, None, Any]:
        source = resources.files("surgvqa").joinpath("assets", template).read_text(encoding="utf-8")
        if template.endswith(".j2"):
            source = "".join(line.strip() for line in source.splitlines())
        return source, None, lambda: True


def _escape(value: Any) -> Any:
    """Every value the template prints, HTML-escaped as :func:`html.escape` does (None prints nothing); markup
    (a macro's output) passes as it is."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value)))


@functools.cache
def _environment() -> Environment:
    environment = Environment(loader=_AssetLoader(), autoescape=True, finalize=_escape, keep_trailing_newline=True)
    environment.filters.update(percent=percent, percent_interval=percent_interval,
                               confidence_percent=confidence_percent)
    return environment


_NUMBER_CELL = re.compile(r"[-+]?\d[\d.,]*( %)?( \[[^\]]*\])?|[-+]?\d[\d.,]*\.?\d* \(95 %: [\d.]+\)|\[[^\]]*\]|[—–-]?")


def _text_columns(rows: Sequence[Sequence[str]]) -> tuple[int, ...]:
    """The columns of a task's table that hold text (left-aligned): the first (the row's name) and any other with
    a cell that is not a number or an interval."""
    width = max((len(row) for row in rows), default=0)
    return (0, *(i for i in range(1, width)
                 if any(i < len(row) and not _NUMBER_CELL.fullmatch(str(row[i]).strip()) for row in rows)))


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _with_thumbnails(cases: Sequence[dict[str, Any]], image_roots: Sequence[str | Path]) -> list[dict[str, Any]]:
    return [{**case, "thumbnail": thumbnail_data_uri(case.get("image"), roots=image_roots)} for case in cases]


def _confidence_view(section: dict[str, Any] | None, image_roots: Sequence[str | Path]) -> dict[str, Any] | None:
    if not section:
        return None
    return {"n": section["n"], "n_abstained": section["n_abstained"],
            "calibration": section.get("calibration") or {}, "table": confidence_tables(section)[0],
            "details_table": confidence_tables(section)[1],
            "in_words": confidence_in_words(section),
            "conformal_table": conformal_table(section), "abstention_table": abstention_table(section),
            "errors": _with_thumbnails(section.get("most_confident_errors") or [], image_roots)}


def render_html(
    metrics: dict, plots: dict[str, bytes], *, config_text: str | None = None, curve_source: str | None = None,
    image_roots: Sequence[str | Path] = (), evaluated_at: str | None = None,
) -> str:
    """The page's text: every table, figure (``plots``: PNG bytes by name) and image embedded; images only from
    ``image_roots``; ``evaluated_at`` (default: now, UTC) is the date the header names."""
    ci = confidence_label(metrics)
    header, rows = per_type_table(metrics, ci, ci)
    averages = average_rows(metrics)
    baseline = metrics.get("baseline")
    if not (baseline and baseline.get("per_type")):
        baseline = None
    problems = [[s["where"], s["reason"]] for s in metrics.get("skipped", [])]
    problems += [[e["where"], f"prediction error (scored as wrong): {e['error']}"] for e in metrics.get("errors", [])]
    uris = {name: _png_uri(data) for name, data in plots.items()}
    page = _environment().get_template(TEMPLATE).render(
        metrics=metrics, settings=metrics.get("settings", {}), ci=ci, banner=error_banner(metrics), collapse=collapse_line(metrics),
        cards=headline(metrics),
        run_line=run_line(metrics, evaluated_at or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        prompt=(metrics.get("run") or {}).get("prompt"),
        per_type={"table": (header, rows + averages),
                  "aggregate": [i for i, row in enumerate(rows) if row[0] == CLOSED_ALL]
                  + list(range(len(rows), len(rows) + len(averages)))},
        plots=uris,
        baseline=baseline, baseline_table=baseline_table(baseline, ci, ci) if baseline else None,
        task_tables=[{**t, "text_columns": _text_columns(t["rows"])} for t in task_tables(metrics)], per_template_table=per_template_table(metrics, ci),
        text_metrics_table=text_metrics_table(metrics),
        confusion_plots=[(t, uris[f"confusion_{t}"]) for t in CLOSED_TYPES if f"confusion_{t}" in uris],
        curve_source=curve_source, confidence=_confidence_view(metrics.get("confidence"), image_roots),
        failures={question_type: _with_thumbnails(cases, image_roots)
                  for question_type, cases in (metrics.get("failures") or {}).items()},
        config_text=config_text, problems=problems,
    )
    return page + "\n"  # the file ends with a line break
