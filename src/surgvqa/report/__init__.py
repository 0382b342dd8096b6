"""The evaluation report, rebuilt from metrics.json alone: ``write_report`` writes its figures and page.

The terminal tables (:mod:`.console`) and the text files (:mod:`.files`) are the evaluate stage's to print and
write; they are named here so that ``surgvqa.report`` is the one place to reach them.
"""

from __future__ import annotations

from pathlib import Path

from surgvqa.core.io import atomic_write_bytes, atomic_write_text
from surgvqa.report.console import rich_tables
from surgvqa.report.figures import report_figures
from surgvqa.report.files import confusion_csv, markdown_report, per_type_csv
from surgvqa.report.page import render_html
from surgvqa.report.run_files import load_training_curve, read_run_config, report_image_roots

__all__ = ["markdown_report", "per_type_csv", "rich_tables", "write_report"]


def write_report(metrics: dict, out_dir: Path, run_dir: Path | None = None) -> dict[str, str]:
    """Write plots/*.png, confusion_<type>.csv and report.html under `out_dir`; returns {name: path}."""
    out_dir = Path(out_dir)
    curve, curve_source = load_training_curve(run_dir)
    figures = report_figures(metrics, curve)
    outputs: dict[str, str] = {}
    for name, data in figures.items():
        path = out_dir / "plots" / f"{name}.png"
        atomic_write_bytes(path, data)
        outputs[f"plot_{name}"] = str(path)
    for question_type, confusion in (metrics.get("confusion") or {}).items():
        path = out_dir / f"confusion_{question_type}.csv"
        atomic_write_text(path, confusion_csv(confusion))
        outputs[f"confusion_{question_type}"] = str(path)
    page = render_html(metrics, figures, config_text=read_run_config(run_dir), curve_source=curve_source,
                       image_roots=report_image_roots(run_dir))
    atomic_write_text(out_dir / "report.html", page)
    outputs["report"] = str(out_dir / "report.html")
    return outputs
