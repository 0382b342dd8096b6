"""What the report takes from the run folder beside metrics.json: training curve, configuration, thumbnails."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from surgvqa.core.config import load_config
from surgvqa.data.images import ImageProblem, open_rgb, resolve_within
from surgvqa.data.sources import allowed_image_roots

# Shown at 160 px in a card; embedded at the models' usual 448-px input so a click enlarges it without blur.
THUMBNAIL_PX = 448
CONFIG_FILE = "config.resolved.yaml"


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
    """(step, loss) points and the file they came from: ``train_log.jsonl`` (one {step, loss, ...} per line), else
    the newest Trainer ``trainer_state.json`` (its ``log_history``) in the run folder or its checkpoints; bad lines
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


def read_run_config(run_dir: Path | None) -> str | None:
    """The run's resolved configuration as text, shown at the end of the report."""
    path = Path(run_dir) / CONFIG_FILE if run_dir else None
    return path.read_text(encoding="utf-8", errors="replace") if path and path.is_file() else None


def report_image_roots(run_dir: str | Path | None) -> list[Path]:
    """The folders the report may embed images from: the run folder (its prepared images) and the image root of
    the dataset the run's resolved config names."""
    if run_dir is None:
        return []
    roots = [Path(run_dir)]
    config_path = roots[0] / CONFIG_FILE
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
