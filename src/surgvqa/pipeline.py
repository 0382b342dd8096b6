"""``surgvqa run``: every stage in order in one run directory, skipping the stages whose inputs are unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from surgvqa.config import Config
from surgvqa.faults import enter_stage
from surgvqa.io import atomic_write_json, file_fingerprint, recover_directory, remove_stale_temporaries


class PipelineStop(RuntimeError):
    """A gate failed (masking diagnostic, sanity overfit); the message says what and how to continue."""


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections the stage reads
    upstream: tuple[str, ...]  # stages whose outputs it reads
    output: str  # path, relative to the run directory, that exists once the stage has completed


STAGES = (
    # prepare measures every sample in tokens (prompt, masking, the model's processor and pixel budget)
    Stage("prepare", ("data", "task", "prompt", "masking", "model.name_or_path", "model.tiny_arch",
                      "model.min_pixels", "model.max_pixels"), (), "prepared/summary.json"),
    Stage("diagnose", ("model", "prompt", "masking"), ("prepare",), "diagnose.json"),
    Stage("overfit", ("model", "prompt", "masking", "lora", "train", "sanity", "predict"), ("prepare",),
          "sanity.json"),
    Stage("train", ("model", "prompt", "masking", "lora", "train"), ("prepare",), "model"),
    Stage("baseline", ("model", "prompt", "masking", "predict"), ("prepare",), "predictions.untrained.jsonl"),
    Stage("predict", ("predict",), ("train",), "predictions.jsonl"),
    Stage("evaluate", ("evaluate",), ("predict", "baseline"), "metrics.json"),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def _source_fingerprint(config: Config) -> str:
    """The local data source's files with their sizes and modification times: a changed file reruns ``prepare``."""
    path = Path(config.data.source)
    if config.data.source == "synthetic" or not path.exists():
        return config.data.source
    return file_fingerprint(path, recursive=True, full_paths=True) or ""


def stage_keys(config: Config) -> dict[str, str]:
    """Each stage's key: a hash of the config sections it reads, the seed and the keys of the stages it reads
    from, so that a change reruns exactly what depends on it."""
    keys: dict[str, str] = {}
    for stage in STAGES:
        payload = {"sections": config.section_hash(*stage.sections), "seed": config.seed,
                   "upstream": [keys[name] for name in stage.upstream]}
        if stage.name == "prepare":
            payload["source"] = _source_fingerprint(config)
        keys[stage.name] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return keys


class StageLedger:
    """``stages.json``: for each stage, the key it last started or completed with."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
        self.entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def is_current(self, stage: Stage, key: str, run_dir: Path) -> bool:
        entry = self.entries.get(stage.name)
        return bool(entry) and entry.get("key") == key and entry.get("status", "done") == "done" \
            and (run_dir / stage.output).exists()

    def was_interrupted(self, stage: Stage, key: str) -> bool:
        """The stage started with this same key and never completed: its partial work can be continued."""
        entry = self.entries.get(stage.name)
        return bool(entry) and entry.get("key") == key and entry.get("status") == "running"

    def start(self, stage: Stage, key: str) -> None:
        self.entries[stage.name] = {"key": key, "status": "running",
                                    "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(self.path, self.entries)

    def record(self, stage: Stage, key: str, seconds: float) -> None:
        self.entries[stage.name] = {"key": key, "status": "done", "seconds": round(seconds, 1),
                                    "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(self.path, self.entries)


@dataclass
class RunOutcome:
    ran: list[str]
    skipped: list[str]
    metrics: dict | None
    report: Path | None


def _run_prepare(config: Config, quiet: bool, resume: bool) -> None:
    from surgvqa.prepare import prepare, print_prepare_summary

    result = prepare(config, quiet=quiet)
    if not quiet:
        print_prepare_summary(result)


def _run_diagnose(config: Config, quiet: bool, resume: bool) -> None:
    from surgvqa.diagnostics import run_diagnostic
    from surgvqa.modeling import load_processor, resolve_model_path

    processor = load_processor(resolve_model_path(config), config.model, config.masking.strategy)
    report = run_diagnostic(config, processor, config.run_dir / "prepared" / "train.jsonl", per_type=2,
                            quiet=quiet)
    atomic_write_json(config.run_dir / "diagnose.json", report.to_json())
    print(f"masking diagnostic: {report.total} samples, {report.failing} would fail, "
          f"mean supervised ratio {report.mean_mask_ratio:.3f}")
    if report.failing:
        raise PipelineStop(f"the masking diagnostic found {report.failing} failing sample(s) "
                           f"(first: {report.failing_ids[:5]}); run `surgvqa diagnose` for the details")


def _run_overfit(config: Config, quiet: bool, resume: bool) -> None:
    from surgvqa.sanity import print_sanity, sanity_overfit

    result = sanity_overfit(config, quiet=quiet)
    print_sanity(result)
    if not result.passed:
        raise PipelineStop(f"the sanity overfit gate failed ({result.reason}); fix the set-up, or rerun with "
                           f"--skip-sanity to train anyway")


def _run_train(config: Config, quiet: bool, resume: bool) -> None:
    from surgvqa.training import train

    result = train(config, resume=resume)
    continued = f" (continued from {result.resumed_from})" if result.resumed_from else ""
    print(f"trained {result.global_step} steps{continued}; model saved to {result.model_dir}")


def _predictions(config: Config, out: Path, model_path: str, quiet: bool, resume: bool) -> None:
    from surgvqa.predict import run_predict
    from surgvqa.prediction_errors import PredictionErrors, check_error_rate

    # Predictions made under another stage key must not be resumed; nor rows a manual `surgvqa predict` made there.
    run_predict(config, out=out, model_path=model_path, quiet=quiet, restart=not resume, replace_other=True)
    try:
        summary = check_error_rate(out, config.predict.max_error_rate)
    except PredictionErrors as exc:
        raise PipelineStop(f"{exc}; the predictions are not evaluated") from None
    if summary.errors:
        print(f"{out.name}: {summary.errors} of {summary.rows} rows in error, within predict.max_error_rate")


def _run_baseline(config: Config, quiet: bool, resume: bool) -> None:
    from surgvqa.modeling import resolve_model_path

    _predictions(config, config.run_dir / "predictions.untrained.jsonl", resolve_model_path(config), quiet, resume)


def _run_predict(config: Config, quiet: bool, resume: bool) -> None:
    _predictions(config, config.run_dir / "predictions.jsonl", str(config.run_dir / "model"), quiet, resume)


def _run_evaluate(config: Config, quiet: bool, resume: bool) -> None:
    from surgvqa.evaluate import run_evaluate

    run_dir = config.run_dir
    baseline = run_dir / "predictions.untrained.jsonl"
    run_evaluate(run_dir / "predictions.jsonl", run_dir, config.evaluate,
                 baseline=baseline if baseline.exists() else None, run_dir=run_dir)


# Each runner gets (config, quiet, resume): resume is true when the stage was interrupted under the same key.
RUNNERS: dict[str, Callable[[Config, bool, bool], None]] = {
    "prepare": _run_prepare, "diagnose": _run_diagnose, "overfit": _run_overfit, "train": _run_train,
    "baseline": _run_baseline, "predict": _run_predict, "evaluate": _run_evaluate,
}


def run_pipeline(config: Config, *, from_stage: str | None = None, force: bool = False,
                 skip_sanity: bool = False, quiet: bool = False) -> RunOutcome:
    if from_stage is not None and from_stage not in STAGE_NAMES:
        raise ValueError(f"--from {from_stage!r}: choose one of {', '.join(STAGE_NAMES)}")
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for folder in ("prepared", "model"):
        recover_directory(run_dir / folder)  # a kill between the two renames of a directory swap
    remove_stale_temporaries(run_dir)  # files a kill left before their rename; the run lock keeps writers out
    keys = stage_keys(config)
    ledger = StageLedger(run_dir)
    forced_from = STAGE_NAMES.index(from_stage) if from_stage else (0 if force else len(STAGE_NAMES))
    ran, skipped = [], []
    for index, stage in enumerate(STAGES):
        if stage.name == "overfit" and skip_sanity:
            print("overfit: skipped (--skip-sanity)")
            skipped.append(stage.name)
            continue
        if index < forced_from and ledger.is_current(stage, keys[stage.name], run_dir):
            print(f"{stage.name}: up to date, skipped")
            skipped.append(stage.name)
            continue
        resume = index < forced_from and ledger.was_interrupted(stage, keys[stage.name])
        print(f"== {stage.name}" + (" (continuing an interrupted run)" if resume else ""))
        if stage.name == "train" and not resume:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a new key means a new training run
        ledger.start(stage, keys[stage.name])
        started = time.perf_counter()
        enter_stage(stage.name)
        try:
            RUNNERS[stage.name](config, quiet, resume)
        finally:
            enter_stage(None)
        ledger.record(stage, keys[stage.name], time.perf_counter() - started)
        ran.append(stage.name)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    report = run_dir / "report.html"
    return RunOutcome(ran, skipped, metrics, report if report.exists() else None)
