"""Tables (terminal, Markdown, CSV), plots (PNG) and a self-contained report.html from metrics.json's dict.

Reads only the metrics dict (plus, for the HTML, the run's config, training log and the failure cases'
images), so a report can be rebuilt from a saved metrics.json. Plots use matplotlib's object API with the
Agg canvas (no pyplot, no global backend switch); the HTML embeds every image as a base64 data URI and
loads nothing.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from surgvqa.data.answers import CLOSED_TYPES, QUESTION_TYPES
from surgvqa.io import atomic_write_bytes, atomic_write_text
from surgvqa.metrics import CLOSED_ALL

TABLE_TYPES: tuple[str, ...] = (*QUESTION_TYPES, CLOSED_ALL)
THUMBNAIL_PX = 160

# ----------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------


def fmt_pct(value: float | None) -> str:
    return "—" if value is None else f"{100.0 * value:.1f}"


def fmt_ci(ci: list[float] | None) -> str:
    return "—" if not ci else f"[{100.0 * ci[0]:.1f}, {100.0 * ci[1]:.1f}]"


def fmt_delta(value: float | None) -> str:
    return "—" if value is None else f"{100.0 * value:+.1f}"


def fmt_number(value: Any) -> str:
    if isinstance(value, dict):
        return f"unavailable: {value.get('unavailable', '?')}"
    return "—" if value is None else f"{value:.4f}"


def per_type_rows(metrics: dict) -> list[dict[str, Any]]:
    """One row per type that has rows, then closed_all: the table of the terminal, Markdown, CSV and HTML."""
    rows = []
    for name in TABLE_TYPES:
        entry = metrics["per_type"].get(name)
        if not entry or not entry["n"]:
            continue
        rows.append(
            {
                "type": name,
                "n": entry["n"],
                "strict": entry["strict"],
                "strict_ci": entry["strict_ci"],
                "tolerant": entry["tolerant"],
                "tolerant_ci": entry["tolerant_ci"],
                "set_f1": entry.get("set_f1"),
                "jaccard": entry.get("jaccard"),
            }
        )
    return rows


def _confidence_label(metrics: dict) -> str:
    return f"{round(100 * metrics.get('settings', {}).get('confidence', 0.95))} % CI"


def _text_metric_items(metrics: dict) -> list[tuple[str, Any]]:
    text = metrics.get("text_metrics") or {}
    if "unavailable" in text and len(text) == 1:
        return [("text metrics", text)]
    names = ["bleu", "rouge1", "rouge2", "rougeL", "meteor"] + (["meteor_1_5"] if "meteor_1_5" in text else [])
    return [(name, text.get(name)) for name in names]


# Table contents as (header, rows) of strings, built once for the terminal, Markdown and HTML renderers;
# the interval columns' headers differ between the renderers, so they are arguments.

TableData = tuple[list[str], list[list[str]]]


def _per_type_table(metrics: dict, strict_ci: str, tolerant_ci: str) -> TableData:
    header = ["type", "n", "strict", strict_ci, "tolerant", tolerant_ci, "set F1", "Jaccard"]
    rows = [
        [
            r["type"],
            str(r["n"]),
            fmt_pct(r["strict"]),
            fmt_ci(r["strict_ci"]),
            fmt_pct(r["tolerant"]),
            fmt_ci(r["tolerant_ci"]),
            fmt_pct(r["set_f1"]),
            fmt_pct(r["jaccard"]),
        ]
        for r in per_type_rows(metrics)
    ]
    return header, rows


def _average_rows(metrics: dict) -> list[list[str]]:
    """The micro and macro average rows in the per-type table's columns (no set F1 or Jaccard)."""
    overall = metrics["overall"]
    return [
        [
            f"{label} average",
            str(overall["n"]) if label == "micro" else "",
            fmt_pct(overall[f"{label}_strict"]),
            fmt_ci(overall[f"{label}_strict_ci"]),
            fmt_pct(overall[f"{label}_tolerant"]),
            fmt_ci(overall[f"{label}_tolerant_ci"]),
            "",
            "",
        ]
        for label in ("micro", "macro")
    ]


def _baseline_table(baseline: dict, strict_ci: str, tolerant_ci: str) -> TableData:
    header = ["type", "n", "baseline strict", "run strict", "delta", strict_ci, "delta tolerant", tolerant_ci]
    rows = [
        [
            name,
            str(e["n"]),
            fmt_pct(e["baseline_strict"]),
            fmt_pct(e["run_strict"]),
            fmt_delta(e["delta_strict"]),
            fmt_ci(e["delta_strict_ci"]),
            fmt_delta(e["delta_tolerant"]),
            fmt_ci(e["delta_tolerant_ci"]),
        ]
        for name in TABLE_TYPES
        if (e := baseline["per_type"].get(name)) and e["n"]
    ]
    return header, rows


def _per_template_table(metrics: dict, strict_ci: str) -> TableData:
    header = ["template", "question", "type", "n", "strict", strict_ci, "tolerant", "set F1"]
    rows = [
        [
            key,
            entry.get("question") or "(not a Kvasir template)",
            entry.get("question_type") or "",
            str(entry["n"]),
            fmt_pct(entry["strict"]),
            fmt_ci(entry["strict_ci"]),
            fmt_pct(entry["tolerant"]),
            fmt_pct(entry.get("set_f1")),
        ]
        for key, entry in metrics["per_template"].items()
    ]
    return header, rows


def _text_metrics_table(metrics: dict) -> TableData:
    return ["metric", "value"], [[name, fmt_number(value)] for name, value in _text_metric_items(metrics)]


# ----------------------------------------------------------------------------------------------------------
# Terminal, Markdown, CSV
# ----------------------------------------------------------------------------------------------------------


def rich_tables(metrics: dict) -> list[Any]:
    """Renderables for the terminal: per-type table, text metrics, baseline deltas, what was skipped."""
    from rich.markup import escape
    from rich.table import Table

    ci = _confidence_label(metrics)
    banner = error_banner(metrics)
    table = Table(title=f"Accuracy per question type, % [{ci}]")
    for column, justify in (
        ("type", "left"),
        ("n", "right"),
        ("strict", "right"),
        ("tolerant", "right"),
        ("set F1", "right"),
    ):
        table.add_column(column, justify=justify, no_wrap=True)

    def with_ci(row: list[str]) -> list[str]:
        """type, n, strict and tolerant each with its interval, set F1: from a per-type table row."""
        pairs = [value if value == "—" else f"{value} {interval}" for value, interval in (row[2:4], row[4:6])]
        return [row[0], row[1], *pairs, row[6]]

    _, rows = _per_type_table(metrics, ci, ci)
    for i, row in enumerate(rows):
        last_of_group = i + 1 == len(rows) or rows[i + 1][0] == CLOSED_ALL
        table.add_row(*with_ci(row), end_section=last_of_group)
    for row in _average_rows(metrics):
        table.add_row(*with_ci(row), style="bold")
    out: list[Any] = [f"[bold red]{escape(banner)}[/bold red]", table] if banner else [table]

    text = Table(title="Text metrics on the raw text (0-1)")
    items = _text_metric_items(metrics)
    for name, _ in items:
        text.add_column(name, justify="right")
    text.add_row(*("n/a" if isinstance(value, dict) else fmt_number(value) for _, value in items))
    out.append(text)
    out += [
        f"[yellow]{name}: {escape(value['unavailable'])}[/yellow]"
        for name, value in items
        if isinstance(value, dict)
    ]

    baseline = metrics.get("baseline")
    if baseline and baseline.get("per_type"):
        delta = Table(title=f"Run vs baseline on {baseline['n_paired']} paired ids (strict %, paired {ci})")
        for column in ("type", "n", "baseline", "run", "delta", ci):
            delta.add_column(column, justify="left" if column == "type" else "right")
        for row in _baseline_table(baseline, ci, ci)[1]:
            delta.add_row(*row[:6])
        out.append(delta)
    problems = []
    if metrics.get("n_skipped"):
        more = f" (all {metrics['n_skipped']} in metrics.json)" if metrics["n_skipped"] > 5 else ""
        problems.append(f"[yellow]{metrics['n_skipped']} line(s) skipped[/yellow]{more}:")
        problems += [escape(f"  {s['where']}: {s['reason']}") for s in metrics["skipped"][:5]]
    if metrics.get("n_errors"):
        problems.append(
            f"[yellow]{metrics['n_errors']} row(s) with a prediction error scored as wrong[/yellow]"
        )
    if metrics.get("n_empty_predictions"):
        problems.append(
            f"[yellow]{metrics['n_empty_predictions']} empty prediction(s) scored as wrong[/yellow]"
        )
    out.extend(problems)
    return out


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


def _md_table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_report(metrics: dict) -> str:
    ci = _confidence_label(metrics)
    parts = [
        f"# Evaluation: {metrics.get('predictions', '')}\n",
        (
            f"{metrics['n']} rows scored, {metrics.get('n_skipped', 0)} line(s) skipped, "
            f"{metrics.get('n_errors', 0)} prediction error(s) (scored as wrong). Accuracies in %, {ci} "
            "from a stratified bootstrap.\n"
        ),
        *([f"> **Warning:** {error_banner(metrics)}\n"] if error_banner(metrics) else []),
        "## Per question type\n",
        _md_table(*_per_type_table(metrics, f"strict {ci}", f"tolerant {ci}")),
    ]
    parts += [
        "\n## Overall\n",
        _md_table(
            ["average", "strict", f"strict {ci}", "tolerant", f"tolerant {ci}"],
            [[label, *row[2:6]] for label, row in zip(("micro", "macro"), _average_rows(metrics))],
        ),
    ]
    for table in _task_tables(metrics):
        parts += [f"\n## {table['title']}\n", _md_table(table["header"], table["rows"])]
    parts += ["\n## Per template\n", _md_table(*_per_template_table(metrics, f"strict {ci}"))]
    parts += ["\n## Text metrics (raw predictions, 0-1)\n", _md_table(*_text_metrics_table(metrics))]
    if metrics.get("confidence"):
        from surgvqa.confidence_report import confidence_table

        parts += ["\n## Confidence (docs/confidence.md)\n", _md_table(*confidence_table(metrics["confidence"]))]
    baseline = metrics.get("baseline")
    if baseline and baseline.get("per_type"):
        parts += [
            f"\n## Run vs baseline ({baseline['n_paired']} paired ids)\n",
            # the second interval header ends in a space, as in earlier reports
            _md_table(*_baseline_table(baseline, f"paired {ci}", f"paired {ci} ")),
        ]
    if metrics.get("skipped"):
        parts += [
            "\n## Skipped lines\n",
            _md_table(["where", "reason"], [[s["where"], s["reason"]] for s in metrics["skipped"]]),
        ]
    return "".join(parts)


def per_type_csv(metrics: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "type",
            "n",
            "strict",
            "strict_ci_low",
            "strict_ci_high",
            "tolerant",
            "tolerant_ci_low",
            "tolerant_ci_high",
            "set_f1",
            "jaccard",
        ]
    )

    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.6f}"

    for row in per_type_rows(metrics):
        strict_ci, tolerant_ci = row["strict_ci"] or [None, None], row["tolerant_ci"] or [None, None]
        writer.writerow(
            [
                row["type"],
                row["n"],
                cell(row["strict"]),
                cell(strict_ci[0]),
                cell(strict_ci[1]),
                cell(row["tolerant"]),
                cell(tolerant_ci[0]),
                cell(tolerant_ci[1]),
                cell(row["set_f1"]),
                cell(row["jaccard"]),
            ]
        )
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Plots (PNG bytes)
# ----------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure) -> bytes:
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
        axes.bar(
            [i + offset for i in range(len(rows))],
            points,
            width,
            yerr=_error_bars(points, cis),
            capsize=3,
            label=column,
            color=color,
        )
    axes.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 105)
    axes.set_title(f"Accuracy per question type ({_confidence_label(metrics)})")
    axes.legend(loc="upper right")
    axes.grid(axis="y", alpha=0.3)
    return _png(figure)


def plot_baseline(metrics: dict) -> bytes | None:
    baseline = metrics.get("baseline") or {}
    entries = [
        (name, e) for name in TABLE_TYPES if (e := (baseline.get("per_type") or {}).get(name)) and e["n"]
    ]
    if not entries:
        return None
    figure = _figure(max(7.0, 1.2 * len(entries) + 3), 4.0)
    left, right = figure.subplots(1, 2, width_ratios=[3, 2])
    width = 0.38
    positions = range(len(entries))
    left.bar(
        [i - width / 2 for i in positions],
        [100 * e["baseline_strict"] for _, e in entries],
        width,
        label="baseline",
        color="#9a9a9a",
    )
    left.bar(
        [i + width / 2 for i in positions],
        [100 * e["run_strict"] for _, e in entries],
        width,
        label="run",
        color="#3b6ea8",
    )
    left.set_xticks(list(positions), [n for n, _ in entries], rotation=20, ha="right")
    left.set_ylabel("strict accuracy (%)")
    left.set_ylim(0, 105)
    left.set_title(f"Baseline vs run ({baseline['n_paired']} paired ids)")
    left.legend(loc="upper right")
    deltas = [100 * e["delta_strict"] for _, e in entries]
    cis = [[100 * c for c in e["delta_strict_ci"]] for _, e in entries]
    right.barh(
        list(positions),
        deltas,
        xerr=_error_bars(deltas, cis),
        capsize=3,
        color=["#3a9a5b" if d >= 0 else "#c0504d" for d in deltas],
    )
    right.axvline(0, color="black", linewidth=0.8)
    right.set_yticks(list(positions), [n for n, _ in entries])
    right.invert_yaxis()
    right.set_xlabel("delta strict (points)")
    right.set_title(f"Run - baseline (paired {_confidence_label(metrics)})")
    for axes in (left, right):
        axes.grid(alpha=0.3)
    return _png(figure)


def plot_confusion(question_type: str, confusion: dict) -> bytes:
    import numpy as np

    labels, matrix = confusion["labels"], np.asarray(confusion["matrix"], dtype=float)
    size = max(3.5, 0.55 * len(labels) + 2.0)
    figure = _figure(size + 1.0, size)
    axes = figure.add_subplot()
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j]:
                axes.text(
                    j,
                    i,
                    str(int(matrix[i, j])),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black",
                )
    short = [label if len(label) <= 18 else label[:16] + "…" for label in labels]
    axes.set_xticks(range(len(labels)), short, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(labels)), short, fontsize=8)
    axes.set_xlabel("prediction")
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


# ----------------------------------------------------------------------------------------------------------
# Run directory inputs: config, training log, images
# ----------------------------------------------------------------------------------------------------------


def _curve_points(entries: Iterable[Any]) -> list[tuple[float, float]]:
    points = []
    for entry in entries:
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("step"), (int, float))
            and isinstance(entry.get("loss"), (int, float))
        ):
            points.append((float(entry["step"]), float(entry["loss"])))
    return sorted(points)


def load_training_curve(run_dir: Path | None) -> tuple[list[tuple[float, float]], str | None]:
    """(step, loss) points from ``train_log.jsonl`` (one {step, loss, ...} per line) or a Trainer
    ``trainer_state.json`` (its ``log_history``) in the run directory or its newest checkpoint; bad lines
    are ignored."""
    if run_dir is None or not Path(run_dir).is_dir():
        return [], None
    run_dir = Path(run_dir)
    log = run_dir / "train_log.jsonl"
    if log.is_file():
        entries = []
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        if points := _curve_points(entries):
            return points, str(log)
    states = [
        run_dir / "trainer_state.json",
        *run_dir.glob("*/trainer_state.json"),
        *run_dir.glob("*/checkpoint-*/trainer_state.json"),
    ]
    for state in sorted((s for s in states if s.is_file()), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
        except (ValueError, AttributeError):
            continue
        if points := _curve_points(history):
            return points, str(state)
    return [], None


def report_image_roots(run_dir: str | Path | None) -> list[Path]:
    """The folders the report may embed images from: the run folder (its prepared images) and the image root of
    the dataset the run's resolved config names."""
    if run_dir is None:
        return []
    from surgvqa.config import load_config
    from surgvqa.data.images import allowed_image_roots

    roots = [Path(run_dir)]
    config_path = roots[0] / "config.resolved.yaml"
    if config_path.is_file():
        try:
            roots += allowed_image_roots(load_config(config_path))
        except (ValueError, OSError):  # an unreadable config only narrows the roots to the run folder
            pass
    return roots


def thumbnail_data_uri(path: str | None, size: int = THUMBNAIL_PX, *, roots: Sequence[str | Path]) -> str | None:
    """A JPEG data URI of the image, or None ("no image") when it is unreadable or lies outside ``roots``: a
    prediction file must not make the report embed an arbitrary file."""
    if not path:
        return None
    from surgvqa.data.images import ImageProblem, open_rgb, resolve_within

    resolved = resolve_within(path, roots)
    if resolved is None:
        return None
    try:
        image = open_rgb(resolved)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    except (ImageProblem, OSError):  # unreadable, truncated or oversized: shown as "no image", never a crash
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# ----------------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#222;padding:0 16px}
h1{margin-bottom:4px}.banner{background:#fde8e8;border:1px solid #c62828;color:#8e0000;padding:8px 12px;
margin:12px 0;font-weight:600}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}th{background:#f3f5f8}
td.l,th.l{text-align:left}tr.agg td{font-weight:600;background:#fafafa}
.meta{color:#555}.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:150px}
.card b{display:block;font-size:22px}.card span{color:#666;font-size:12px}
img.plot{max-width:100%;border:1px solid #eee;margin:6px 0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.case{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:13px}
.case img{display:block;margin:0 auto 6px;max-width:160px;max-height:160px}
.noimg{height:80px;display:flex;align-items:center;justify-content:center;background:#f3f3f3;color:#888}
.ref{color:#2f6f3e}.pred{color:#b03a2e}pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px}
.warn{color:#9a6700}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _html_table(
    header: list[str],
    rows: list[list[str]],
    *,
    table_id: str = "",
    aggregate_rows: Iterable[int] = (),
    text_columns: Iterable[int] = (0,),
) -> str:
    aggregate, left = set(aggregate_rows), set(text_columns)
    head = "".join(f'<th class="{"l" if i in left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = "".join(
        f'<tr class="{"agg" if r in aggregate else ""}">'
        + "".join(f'<td class="{"l" if i in left else ""}">{_e(c)}</td>' for i, c in enumerate(row))
        + "</tr>"
        for r, row in enumerate(rows)
    )
    id_attr = f' id="{table_id}"' if table_id else ""
    return f"<table{id_attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _task_tables(metrics: dict) -> list[dict[str, Any]]:
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


def render_html(
    metrics: dict, plots: dict[str, bytes], *, config_text: str | None = None, curve_source: str | None = None,
    image_roots: Sequence[str | Path] = (),
) -> str:
    ci = _confidence_label(metrics)
    overall = metrics["overall"]
    out = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,"><title>surgvqa evaluation report</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>Evaluation report</h1>",
        (
            f'<p class="meta">predictions: <code>{_e(metrics.get("predictions"))}</code> · '
            f"{metrics['n']} rows scored · {metrics.get('n_skipped', 0)} line(s) skipped · "
            f"{metrics.get('n_errors', 0)} prediction error(s) · "
            f"{metrics.get('n_empty_predictions', 0)} empty prediction(s) (both scored as wrong)</p>"
        ),
    ]
    banner = error_banner(metrics)
    if banner:
        out.append(f'<div class="banner" id="error-banner" role="alert">{_e(banner)}</div>')
    closed = metrics["per_type"].get(CLOSED_ALL, {})
    cards = [
        ("micro strict", overall["micro_strict"], overall["micro_strict_ci"]),
        ("micro tolerant", overall["micro_tolerant"], overall["micro_tolerant_ci"]),
        ("macro strict", overall["macro_strict"], overall["macro_strict_ci"]),
        ("closed types strict", closed.get("strict"), closed.get("strict_ci")),
    ]
    out.append(
        '<div class="cards" id="summary">'
        + "".join(
            f'<div class="card"><span>{_e(label)}</span><b>{fmt_pct(value)} %</b>'
            f"<span>{ci} {fmt_ci(interval)}</span></div>"
            for label, value, interval in cards
        )
        + "</div>"
    )

    settings = metrics.get("settings", {})
    out.append(
        f'<h2>Per question type</h2><p class="meta">Accuracy in %, {ci} from a stratified bootstrap '
        f"({settings.get('bootstrap_samples', '?')} resamples). Tolerant: size within "
        f"{settings.get('size_tolerance_mm', '?')} mm, count within {settings.get('count_tolerance', '?')}; "
        "see docs/metrics.md.</p>"
    )
    header, table_rows = _per_type_table(metrics, ci, ci)
    aggregate_at = [i for i, row in enumerate(table_rows) if row[0] == CLOSED_ALL]
    for row in _average_rows(metrics):
        aggregate_at.append(len(table_rows))
        table_rows.append(row)
    out.append(_html_table(header, table_rows, table_id="per-type-table", aggregate_rows=aggregate_at))
    if "per_type" in plots:
        uri = _png_uri(plots["per_type"])
        out.append(f'<img class="plot" id="plot-per-type" alt="accuracy per type" src="{uri}">')

    baseline = metrics.get("baseline")
    if baseline and baseline.get("per_type"):
        out.append(
            f'<h2>Run vs baseline</h2><p class="meta">{baseline["n_paired"]} ids in both files '
            f"({baseline['n_run_only']} only in the run, {baseline['n_baseline_only']} only in the "
            f"baseline); deltas in points with paired bootstrap {ci}.</p>"
        )
        out.append(_html_table(*_baseline_table(baseline, ci, ci), table_id="baseline-table"))
        if "baseline" in plots:
            out.append(
                f'<img class="plot" id="plot-baseline" alt="baseline vs run" '
                f'src="{_png_uri(plots["baseline"])}">'
            )

    for number, table in enumerate(_task_tables(metrics)):
        out.append(f"<h2>{_e(table['title'])}</h2>")
        out.append(_html_table(table["header"], table["rows"], table_id=f"task-table-{number}"))

    out.append("<h2>Per template</h2>")
    out.append(
        _html_table(*_per_template_table(metrics, ci), table_id="per-template-table", text_columns=(0, 1, 2))
    )

    out.append(
        '<h2>Text metrics</h2><p class="meta">On the raw model text against one reference each '
        "(BLEU-4 corpus, ROUGE F-measure and METEOR 1.5 averaged over samples), 0-1.</p>"
    )
    out.append(_html_table(*_text_metrics_table(metrics), table_id="text-metrics-table"))

    confusion_plots = [(t, plots[f"confusion_{t}"]) for t in CLOSED_TYPES if f"confusion_{t}" in plots]
    if confusion_plots:
        out.append("<h2>Confusion matrices (closed types)</h2>")
        out += [
            f'<img class="plot" alt="confusion {_e(t)}" src="{_png_uri(data)}">'
            for t, data in confusion_plots
        ]
    if "training_curve" in plots:
        out.append(
            f'<h2>Training curve</h2><p class="meta">from <code>{_e(curve_source)}</code></p>'
            f'<img class="plot" id="plot-training" alt="training curve" '
            f'src="{_png_uri(plots["training_curve"])}">'
        )

    from surgvqa.confidence_report import confidence_html

    out.append(confidence_html(metrics.get("confidence"), {name.removeprefix("confidence_"): data for name, data
                                                           in plots.items() if name.startswith("confidence_")},
                               image_roots))
    failures = metrics.get("failures") or {}
    if failures:
        out.append("<h2>Failure cases</h2>")
        for question_type, cases in failures.items():
            out.append(f'<h3>{_e(question_type)}</h3><div class="gallery">')
            for case in cases:
                uri = thumbnail_data_uri(case.get("image"), roots=image_roots)
                picture = (
                    f'<img alt="{_e(case.get("id"))}" src="{uri}">'
                    if uri
                    else '<div class="noimg">no image</div>'
                )
                detail = (
                    f'<div class="warn">error: {_e(case["error"])}</div>'
                    if case.get("error")
                    else f'<div class="pred">prediction: <b>{_e(case["prediction"])}</b>'
                    f"{' (tolerant match)' if case.get('tolerant') else ''}</div>"
                )
                out.append(
                    f'<div class="case">{picture}<div>{_e(case.get("question"))}</div>'
                    f'<div class="ref">reference: <b>{_e(case["answer"])}</b></div>{detail}'
                    f'<div class="meta">{_e(case.get("where"))}</div></div>'
                )
            out.append("</div>")

    if config_text:
        out.append(f"<h2>Run configuration</h2><pre>{_e(config_text)}</pre>")
    problems = [(s["where"], s["reason"]) for s in metrics.get("skipped", [])]
    problems += [
        (e["where"], f"prediction error (scored as wrong): {e['error']}") for e in metrics.get("errors", [])
    ]
    if problems:
        out.append(
            f"<h2>Skipped lines and errors</h2>"
            f"<details><summary>{len(problems)} entries (file:line and reason)</summary>"
            + _html_table(["where", "reason"], [[w, r] for w, r in problems], text_columns=(0, 1))
            + "</details>"
        )
    out.append("</body></html>\n")
    return "".join(out)


def build_plots(metrics: dict, run_dir: Path | None) -> tuple[dict[str, bytes], str | None]:
    plots = {"per_type": plot_per_type(metrics)}
    if (baseline := plot_baseline(metrics)) is not None:
        plots["baseline"] = baseline
    for question_type, confusion in (metrics.get("confusion") or {}).items():
        if confusion["labels"]:
            plots[f"confusion_{question_type}"] = plot_confusion(question_type, confusion)
    curve, source = load_training_curve(run_dir)
    if curve:
        plots["training_curve"] = plot_training_curve(curve)
    from surgvqa.confidence_report import confidence_plots

    plots.update({f"confidence_{name}": data for name, data in confidence_plots(metrics.get("confidence")).items()})
    return plots, source


def write_report(metrics: dict, out_dir: Path, run_dir: Path | None = None) -> dict[str, str]:
    """Write plots/*.png, confusion_<type>.csv and report.html under `out_dir`; returns {name: path}."""
    out_dir = Path(out_dir)
    plots, curve_source = build_plots(metrics, run_dir)
    outputs: dict[str, str] = {}
    for name, data in plots.items():
        path = out_dir / "plots" / f"{name}.png"
        atomic_write_bytes(path, data)
        outputs[f"plot_{name}"] = str(path)
    for question_type, confusion in (metrics.get("confusion") or {}).items():
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["reference \\ prediction", *confusion["labels"]])
        for label, counts in zip(confusion["labels"], confusion["matrix"]):
            writer.writerow([label, *counts])
        path = out_dir / f"confusion_{question_type}.csv"
        atomic_write_text(path, buffer.getvalue())
        outputs[f"confusion_{question_type}"] = str(path)
    config_path = Path(run_dir) / "config.resolved.yaml" if run_dir else None
    config_text = (
        config_path.read_text(encoding="utf-8", errors="replace")
        if config_path and config_path.is_file()
        else None
    )
    report_path = out_dir / "report.html"
    atomic_write_text(
        report_path, render_html(metrics, plots, config_text=config_text, curve_source=curve_source,
                                 image_roots=report_image_roots(run_dir))
    )
    outputs["report"] = str(report_path)
    return outputs
