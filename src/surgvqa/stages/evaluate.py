"""The ``evaluate`` stage: read predictions.jsonl, score it, write metrics.json, tables, plots, report.html.

Bad input is scored as far as possible: a line that is not a JSON object, or that lacks what scoring needs (a
reference answer, a prediction, a type), is skipped and named (file:line and reason) in ``metrics.json``; a
missing or unknown ``question_type`` is recovered from the template or the question when possible (and noted);
a row whose ``error`` is set, or whose prediction is empty, is scored as wrong (and listed).
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgvqa import report
from surgvqa.core.config import Config, EvaluateConfig, load_config
from surgvqa.core.io import atomic_write_json, atomic_write_text
from surgvqa.data.answers import QUESTION_TYPES, is_bad_answer, normalize_answer
from surgvqa.data.images import resolve_image_path
from surgvqa.evaluation.confidence_report import confidence_metrics
from surgvqa.evaluation.metrics import task_of
from surgvqa.evaluation.scoring import PredictionRow
from surgvqa.export.challenge import submission_predictions, write_challenge_predictions
from surgvqa.tasks import get_task
from surgvqa.tasks.kvasir_vqa import TEMPLATE_BY_ID, infer_question_type

ABSTAINED = "(abstained)"


class EvaluateError(ValueError):
    """Predictions that cannot be evaluated at all (missing file, no scorable line); the message says why."""


@dataclass
class LoadedPredictions:
    rows: list[PredictionRow] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    lines: int = 0


def _text(value: Any) -> str | None:
    """A field as text: strings as they are, numbers as written, missing values (None, NaN) as None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _template(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def row_from_json(
    obj: dict[str, Any], where: str, base: Path
) -> tuple[PredictionRow | None, str | None, list[str]]:
    """(row, skip reason, notes) for one parsed line; row is None exactly when the line must be skipped."""
    notes: list[str] = []
    reference = _text(obj.get("answer"))
    if reference is None or is_bad_answer(reference) or not normalize_answer(reference):
        return None, "reference 'answer' missing or empty", notes
    question = _text(obj.get("question")) or ""

    template: int | None = None
    if "template" in obj:
        template = _template(obj["template"])
        if obj["template"] is not None and (template is None or template not in TEMPLATE_BY_ID):
            notes.append(f"unknown template {obj['template']!r} treated as untemplated")
            template = None
    elif question:
        template = infer_question_type(question).template
        notes.append("template missing: inferred from the question")

    question_type = obj.get("question_type")
    if question_type not in QUESTION_TYPES:
        described = "missing" if question_type is None else f"unknown ({question_type!r})"
        if template is not None:
            question_type = TEMPLATE_BY_ID[template].question_type
            notes.append(f"question_type {described}: {question_type} from template {template}")
        elif question:
            question_type = infer_question_type(question).question_type
            notes.append(f"question_type {described}: {question_type} inferred from the question")
        else:
            return None, f"question_type {described} and no question to infer it from", notes

    error = _text(obj.get("error")) or None  # "" is no error message
    raw_text = _text(obj.get("raw_text"))
    prediction = _text(obj.get("prediction"))
    if prediction is None:
        if raw_text is not None:
            prediction = normalize_answer(raw_text)
            notes.append("prediction missing: normalised raw_text used")
        elif error is not None:
            prediction = ""
        else:
            return None, "no 'prediction', no 'raw_text' and no 'error'", notes
    if error is None and not prediction.strip():
        notes.append("empty prediction (scored as wrong)")
    if obj.get("abstained") is True:  # predict.abstain: counted, never scored as correct
        notes.append("abstained (scored as wrong)")
        # A label no reference has (not "": that would be counted as an empty prediction); no text to score.
        prediction, raw_text = ABSTAINED, ""

    row_id = _text(obj.get("id")) or ""
    if not row_id:
        notes.append("id missing: scored, but cannot be paired with a baseline")
    return (
        PredictionRow(
            id=row_id,
            question_type=question_type,
            reference=reference,
            prediction=prediction,
            template=template,
            question=question,
            text=raw_text,
            error=error,
            image=resolve_image_path(obj.get("image"), base),
            where=where,
            task=obj.get("task") if isinstance(obj.get("task"), str) and obj.get("task") else "kvasir-vqa",
            meta=obj.get("meta") if isinstance(obj.get("meta"), dict) else {},
        ),
        None,
        notes,
    )


def load_predictions(path: str | Path) -> LoadedPredictions:
    """Read a predictions.jsonl leniently: every skipped line is named with its reason, nothing is silent."""
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"predictions file not found: {path}")
    loaded = LoadedPredictions()
    first_line_of_id: dict[str, int] = {}
    base = path.parent.resolve()
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            loaded.lines = number
            if not raw.strip():
                continue
            where = f"{path.name}:{number}"

            def skip(reason: str, where: str = where, number: int = number) -> None:
                loaded.skipped.append({"where": where, "line": number, "reason": reason})

            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skip("not valid UTF-8")
                continue
            except ValueError as exc:
                skip(f"not JSON ({exc.args[0] if exc.args else exc})")
                continue
            if not isinstance(obj, dict):
                skip(f"not a JSON object (a {type(obj).__name__})")
                continue
            row, reason, notes = row_from_json(obj, where, base)
            for note in notes:
                loaded.notes.append({"where": where, "line": number, "note": note})
            if row is None:
                skip(reason or "unusable")
                continue
            if row.id:
                if row.id in first_line_of_id:
                    skip(f"duplicate id {row.id!r} (first at line {first_line_of_id[row.id]})")
                    continue
                first_line_of_id[row.id] = number
            loaded.rows.append(row)
    return loaded


def evaluate_predictions(
    rows: Sequence[PredictionRow],
    settings: EvaluateConfig | None = None,
    *,
    baseline: Sequence[PredictionRow] | None = None,
    skipped: Sequence[dict[str, Any]] = (),
    notes: Sequence[dict[str, Any]] = (),
    with_text_metrics: bool = True,
    with_meteor: bool = True,
) -> dict[str, Any]:
    """All metrics of a set of scored rows as one JSON-ready dict, as the rows' task reports them."""
    if not rows:
        raise ValueError("no scorable prediction rows")
    return get_task(task_of(rows)).evaluate(rows, settings or EvaluateConfig(), baseline=baseline, skipped=skipped,
                                            notes=notes, with_text_metrics=with_text_metrics,
                                            with_meteor=with_meteor)


def code_commit() -> str | None:
    """The git commit of the surgvqa code that scored the file (``+changes`` when its checkout has uncommitted
    edits), else the installed package's version: a report names what made its numbers."""
    package = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(package), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "--untracked-files=no", "."],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"surgvqa {version('surgvqa')}"
        except PackageNotFoundError:
            return None
    return f"{commit}+changes" if dirty else commit or None


def run_info(config: Config | None, predictions: Path) -> dict[str, Any]:
    """What the report's header and "Run configuration" name: the model, the task, the prompt the task actually
    asked with (its own defaults where the config leaves prompt.system / prompt.user_template unset), the
    model folder the predictions were made with, and the code's commit."""
    info: dict[str, Any] = {"model": None, "task": None, "prompt": None, "predicted_with": None,
                            "commit": code_commit()}
    if config is not None:
        task = get_task(config.task)
        info.update(model=config.model.name_or_path, task=config.task,
                    prompt={"system": task.system_text(config.prompt),
                            "user_template": task.user_template(config.prompt)})
    made_with = predictions.with_name(f"{predictions.stem}.made_with.json")
    if made_with.is_file():
        try:
            info["predicted_with"] = json.loads(made_with.read_text(encoding="utf-8")).get("model")
        except (ValueError, AttributeError):  # an unreadable note only leaves the field empty
            pass
    return info


def _run_config(run_dir: Path) -> Config | None:
    """The run's resolved config, when its folder holds a readable one."""
    path = run_dir / "config.resolved.yaml"
    if not path.is_file():
        return None
    try:
        return load_config(path)
    except (ValueError, OSError):
        return None


def run_on_file(
    predictions: Path,
    out_dir: Path,
    settings: EvaluateConfig,
    baseline: Path | None = None,
    run_dir: Path | None = None,
    with_report: bool = True,
    *,
    with_meteor: bool = True,
    config: Config | None = None,
) -> dict:
    """Score `predictions` (and compare with `baseline`), write everything to `out_dir`, return the metrics.

    `run_dir` (default: the predictions file's folder) is where config.resolved.yaml and train_log.jsonl /
    trainer_state.json are looked for; `config` (default: that folder's config.resolved.yaml) names the model and
    the prompt. `with_report=False` writes metrics.json and the tables only; `with_meteor=False` skips the METEOR
    jar (seconds of JVM start-up), reported as unavailable ("disabled").
    """
    predictions, out_dir = Path(predictions), Path(out_dir)
    loaded = load_predictions(predictions)
    if not loaded.rows:
        first = (
            f" (first: {loaded.skipped[0]['where']}: {loaded.skipped[0]['reason']})" if loaded.skipped else ""
        )
        raise EvaluateError(
            f"{predictions}: no scorable prediction in {loaded.lines} line(s), "
            f"{len(loaded.skipped)} skipped{first}"
        )
    baseline_loaded = load_predictions(baseline) if baseline is not None else None
    metrics = evaluate_predictions(
        loaded.rows,
        settings,
        baseline=baseline_loaded.rows if baseline_loaded else None,
        skipped=loaded.skipped,
        notes=loaded.notes,
        with_meteor=with_meteor,
    )
    metrics = {"predictions": str(predictions), "n_lines": loaded.lines, **metrics}
    metrics["run"] = run_info(config or _run_config(Path(run_dir or predictions.parent)), predictions)
    if (confidence := confidence_metrics(predictions, settings, QUESTION_TYPES)) is not None:
        metrics["confidence"] = confidence
    summary = Path(run_dir or predictions.parent) / "prepared" / "summary.json"
    if summary.is_file() and "leak" in (prepared := json.loads(summary.read_text(encoding="utf-8"))):
        metrics["data_leak"] = prepared["leak"]  # test images the official training split also holds (x1)
    if baseline_loaded is not None:
        metrics["baseline"] = {
            "path": str(baseline),
            "n_skipped": len(baseline_loaded.skipped),
            "skipped": baseline_loaded.skipped,
            **metrics["baseline"],
        }

    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"metrics": str(out_dir / "metrics.json")}
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "metrics.md", report.markdown_report(metrics))
    atomic_write_text(out_dir / "metrics_per_type.csv", report.per_type_csv(metrics))
    outputs.update(markdown=str(out_dir / "metrics.md"), csv=str(out_dir / "metrics_per_type.csv"))
    if with_report:
        outputs.update(
            report.write_report(metrics, out_dir, run_dir=Path(run_dir) if run_dir else predictions.parent)
        )
    metrics["outputs"] = outputs
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def run(config: Config, *, predictions: Path | None = None, baseline: Path | None = None, out: Path | None = None,
        with_report: bool = True, challenge: str | None = None, references: Path | None = None) -> dict:
    """Evaluate the run's predictions (or ``predictions``); with ``challenge``, a submission's predictions_1.json
    (or its folder) scored against a local copy of the challenge's split (``references``, else
    export.validation_data), written to ``<submission folder>.evaluation`` beside it unless ``out`` says otherwise.

    The run's own predictions are written into the run directory, any other file's beside it (``<stem>.evaluation``),
    so that another model's or mode's numbers never replace the run's own metrics.json, which ``surgvqa run`` would
    then take for up to date. Without ``baseline``, the run's own untrained predictions are the baseline of its own
    predictions when they exist.
    """
    own = config.run_dir / "predictions.jsonl"
    predictions = predictions or own
    if challenge is not None:
        local_copy = references or config.export.validation_data
        if local_copy is None:
            raise ValueError("--challenge needs --references (or export.validation_data): a local copy of the "
                             "challenge's split")
        predictions, beside_submission = submission_predictions(predictions)
        out = out or beside_submission
        predictions = write_challenge_predictions(predictions, challenge, str(local_copy), out)
    elif out is None:
        is_own = predictions.absolute() == own.absolute()
        out = config.run_dir if is_own else predictions.with_name(f"{predictions.stem}.evaluation")
        untrained = config.run_dir / "predictions.untrained.jsonl"
        if baseline is None and is_own and untrained.exists():
            baseline = untrained
    return run_on_file(predictions, out, config.evaluate, baseline=baseline, run_dir=config.run_dir,
                       with_report=with_report, config=config)


def print_metrics_table(metrics: dict) -> None:
    """The per-type table, overall averages, text metrics and what was skipped, on the terminal (rich)."""
    from rich.console import Console

    console = Console()
    for renderable in report.rich_tables(metrics):
        console.print(renderable)
