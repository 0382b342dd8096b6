"""``surgvqa run``: every stage in order in one run directory, skipping the stages whose inputs are unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from surgvqa.core.config import Config
from surgvqa.core.faults import enter_stage
from surgvqa.core.io import (
    atomic_write_json,
    check_not_foreign,
    content_digest,
    file_fingerprint,
    recover_directory,
    remove_stale_temporaries,
    remove_tree,
)
from surgvqa.stages import GateFailed
from surgvqa.stages import stage as load_stage


class RejectedOutput(GateFailed):
    """A stage completed, but its output fails a check whose setting is not part of the stage's key (rows in error
    beyond ``predict.max_error_rate``): the output is kept, and judged again on every run."""


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections (or dotted keys) the stage reads
    upstream: tuple[str, ...]  # stages whose outputs it reads
    output: str  # path, relative to the run directory, that exists once the stage has completed
    # The sections its key held before LEDGER_VERSION 3, where they differ: entries written then are compared
    # with keys made from these, so that an existing run does not redo a stage whose settings did not change.
    earlier_sections: tuple[str, ...] | None = None


# The overfit gate trains for sanity.max_steps at sanity.batch_size without accumulation, so of `train` it reads
# only the optimiser and schedule (train.lr where sanity.lr is unset) and the seed; of `predict`, what its greedy
# answers are generated with. train.epochs, max_steps, batch size and accumulation do not reach it.
OVERFIT_TRAIN_SETTINGS = ("train.lr", "train.vision_lr", "train.weight_decay", "train.warmup_ratio",
                          "train.lr_scheduler", "train.max_grad_norm", "train.seed")
OVERFIT_PREDICT_SETTINGS = ("predict.batch_size", "predict.max_new_tokens_open", "predict.group_by_image")

STAGES = (
    # prepare measures every sample in tokens (prompt, masking, the model's processor and pixel budget)
    Stage("prepare", ("data", "task", "prompt", "masking", "model.name_or_path", "model.tiny_arch",
                      "model.min_pixels", "model.max_pixels"), (), "prepared/summary.json"),
    # train.group_by_image: diagnose then also checks the grouped losses against the separate ones
    Stage("diagnose", ("model", "prompt", "masking", "train.group_by_image"), ("prepare",), "diagnose.json"),
    Stage("overfit", ("model", "prompt", "masking", "lora", "sanity", *OVERFIT_TRAIN_SETTINGS,
                      *OVERFIT_PREDICT_SETTINGS), ("prepare",), "sanity.json",
          earlier_sections=("model", "prompt", "masking", "lora", "train", "sanity", "predict")),
    Stage("train", ("model", "prompt", "masking", "lora", "train"), ("prepare",), "model"),
    Stage("baseline", ("model", "prompt", "masking", "predict"), ("prepare",), "predictions.untrained.jsonl"),
    Stage("predict", ("predict",), ("train",), "predictions.jsonl"),
    Stage("evaluate", ("evaluate",), ("predict", "baseline"), "metrics.json"),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}

# Settings that change how a stage keeps its books, judges its output or spends memory, never the output itself
# (gradient checkpointing recomputes the same activations). They stay out of the stage keys, so that changing one
# throws no finished work away: a user who just lost work to a kill lowers train.save_steps, one who ran out of
# memory turns gradient checkpointing on, and the chain's own stop message invites raising predict.max_error_rate,
# which is checked on every run instead (ACCEPTANCE_CHECKS). Batch sizes stay in: they change the numbers.
BOOKKEEPING_SETTINGS = ("train.save_steps", "train.logging_steps", "train.save_total_limit", "train.num_workers",
                        "predict.max_error_rate", "model.gradient_checkpointing")


def _source_fingerprint(config: Config) -> str:
    """The local data source's files with their sizes and modification times: a changed file reruns ``prepare``."""
    # Imported here, as in _image_folders: the source readers bring PIL, and the CLI imports this module at start-up.
    from surgvqa.data.sources import local_path

    path = local_path(config.data.source)  # `~/kvasir.jsonl` is the file prepare reads, to be fingerprinted too
    if config.data.source == "synthetic" or not path.exists():
        return config.data.source
    return file_fingerprint(path, recursive=True, full_paths=True) or ""


def _image_folders(config: Config) -> list[Path]:
    """The image files ``prepare`` reads beside ``data.source``: the dataset root that JSONL and CSV rows name
    their images in, and ``data.images`` (the x1 layout's images, joined by img_id). Parquet, save_to_disk, hub
    and synthetic sources embed their images, which the source's own fingerprint covers."""
    from surgvqa.data.sources import SourceError, dataset_root, detect_format, local_path

    folders = []
    source = config.data.source
    if source != "synthetic" and not source.startswith("hub:") and local_path(source).exists():
        try:
            kind = detect_format(source) if config.data.format == "auto" else config.data.format
        except SourceError:
            kind = None  # prepare says what is wrong with the source
        root = dataset_root(source, config.data.image_root)
        if kind in ("jsonl", "csv") and root is not None:
            folders.append(root)
    if config.data.images and local_path(config.data.images).exists():
        folders.append(local_path(config.data.images))
    return folders


def _image_folder_fingerprint(folder: Path, skip: Collection[str]) -> str:
    """A digest of the relative names, sizes and modification times of every file under ``folder`` (or of the
    file itself), without reading any content: a replaced or added image changes it.

    Stats only, no hashing: an image rewritten in place gets a new modification time (and usually a new size),
    which is all a changed image needs, while reading the bytes of a whole dataset on every ``run`` would cost
    minutes. One stat per file: 6,000 files in 10 folders took 0.02 s (ext4, warm cache, 2-core machine;
    ``io.file_fingerprint``, three stats per file, took 0.06 s). Folders in ``skip`` (the run and cache folders
    surgvqa writes itself) and hidden ones (.git, .venv, .ipynb_checkpoints) are not the dataset's, and change
    without any image changing.
    """
    digest = hashlib.sha256()
    if folder.is_file():
        status = folder.stat()
        digest.update(f"{folder.name}:{status.st_size}:{status.st_mtime_ns}".encode())
    for parent, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith(".")
                               and os.path.realpath(os.path.join(parent, name)) not in skip)
        relative = os.path.relpath(parent, folder)
        for name in sorted(files):
            if name.startswith("."):
                continue
            try:
                status = os.stat(os.path.join(parent, name))
            except OSError:  # a dangling link: the row naming it is rejected by prepare
                continue
            digest.update(f"{relative}/{name}:{status.st_size}:{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _images_fingerprint(config: Config) -> str | None:
    folders = _image_folders(config)
    if not folders:
        return None
    skip = {os.path.realpath(config.output_dir), os.path.realpath(config.cache_dir)}
    return ";".join(f"{folder}:{_image_folder_fingerprint(folder, skip)}" for folder in folders)


def _key_settings(config: Config, sections: tuple[str, ...]) -> list[str]:
    """A stage's config sections as :meth:`Config.section_hash` takes them, less ``BOOKKEEPING_SETTINGS``: a
    section holding one of them is named key by key."""
    settings: list[str] = []
    for section in sections:
        left_out = {name for name in BOOKKEEPING_SETTINGS if name.startswith(section + ".")}
        if not left_out:
            settings.append(section)
            continue
        fields = type(getattr(config, section)).model_fields
        settings += [f"{section}.{name}" for name in fields if f"{section}.{name}" not in left_out]
    return settings


def _chained_keys(config: Config, settings_hash: Callable[[Stage], str], prepare_inputs: dict[str, str]
                  ) -> dict[str, str]:
    keys: dict[str, str] = {}
    for stage in STAGES:
        payload = {"sections": settings_hash(stage), "seed": config.seed,
                   "upstream": [keys[name] for name in stage.upstream]}
        if stage.name == "prepare":
            payload.update(prepare_inputs)
        keys[stage.name] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return keys


def _keys(config: Config, sections_of: Callable[[Stage], tuple[str, ...]]) -> dict[str, str]:
    prepare_inputs = {"source": _source_fingerprint(config)}
    if (images := _images_fingerprint(config)) is not None:
        prepare_inputs["images"] = images  # absent otherwise, so that the key of such a source stays as it was
    return _chained_keys(config, lambda stage: config.section_hash(*_key_settings(config, sections_of(stage))),
                         prepare_inputs)


def stage_keys(config: Config) -> dict[str, str]:
    """Each stage's key: a hash of the config settings it reads (less ``BOOKKEEPING_SETTINGS``), the seed and the
    keys of the stages it reads from, so that a change reruns exactly what depends on it; prepare's also holds
    the data source's files and the image folders it reads."""
    return _keys(config, lambda stage: stage.sections)


def _earlier_sections(stage: Stage) -> tuple[str, ...]:
    return stage.earlier_sections or stage.sections


def previous_version_keys(config: Config, version: int = 1) -> dict[str, str]:
    """The keys a ledger of an earlier ``LEDGER_VERSION`` was written with: in version 1 (no fingerprints) whole
    sections hashed and no image folders, in version 2 the keys of today made from each stage's earlier sections.
    Its stages stay current when these match, so that an existing run is not redone."""
    if version == 1:
        return _chained_keys(config, lambda stage: config.section_hash(*_earlier_sections(stage)),
                             {"source": _source_fingerprint(config)})
    return _keys(config, _earlier_sections)


def output_fingerprint(path: Path) -> str | None:
    """A digest of a stage's output (None: missing): a file's content, so that a manual prepare or predict that
    writes the same bytes again leaves the chain current (a rerun prepare would otherwise retrain from scratch);
    a folder's (model/) names, sizes and modification times, as reading gigabytes of weights on every run would
    cost minutes, and a training that wrote the folder again did change it."""
    if path.is_file():
        return (content_digest(path) or "")[:16]
    listing = file_fingerprint(path, recursive=True)
    return None if listing is None else hashlib.sha256(listing.encode()).hexdigest()[:16]


# 2: entries hold the fingerprints of the stage's output and of the upstream outputs it read; keys leave
# BOOKKEEPING_SETTINGS out and prepare's holds the image folders. Entries without a version were written before.
# 3: the overfit gate's key holds only the train and predict settings it reads (Stage.earlier_sections).
LEDGER_VERSION = 3


class StageLedger:
    """``stages.json``: for each stage, the key it last started or completed with and, once completed, the
    fingerprints of its output and of the upstream outputs it read. A stage is current while all three are
    unchanged: a manual command that replaced its output (``surgvqa train`` with other settings) or an upstream
    output reruns it."""

    def __init__(self, run_dir: Path, previous_keys: Callable[[int], dict[str, str]] = lambda version: {}):
        # previous_keys: the keys to compare entries of an earlier version with (see previous_version_keys)
        self.run_dir = run_dir
        self.path = run_dir / "stages.json"
        self.entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self._previous_keys = previous_keys
        self._previous: dict[int, dict[str, str]] = {}

    def _key_matches(self, entry: dict, stage: Stage, key: str) -> bool:
        version = entry.get("version", 1)
        if version >= LEDGER_VERSION:
            return entry.get("key") == key
        if version not in self._previous:  # computed only for a ledger an earlier version wrote
            self._previous[version] = self._previous_keys(version)
        return entry.get("key") == self._previous[version].get(stage.name)

    def _fingerprints(self, stage: Stage) -> dict:
        return {"output": output_fingerprint(self.run_dir / stage.output),
                "inputs": {name: output_fingerprint(self.run_dir / STAGE_BY_NAME[name].output)
                           for name in stage.upstream}}

    def is_current(self, stage: Stage, key: str) -> bool:
        entry = self.entries.get(stage.name)
        if not entry or entry.get("status", "done") != "done" or not self._key_matches(entry, stage, key) \
                or not (self.run_dir / stage.output).exists():
            return False
        if "output" not in entry:
            return True  # written before fingerprints were recorded: current as it was then (see upgrade)
        now = self._fingerprints(stage)
        return entry["output"] == now["output"] and entry.get("inputs", {}) == now["inputs"]

    def was_interrupted(self, stage: Stage, key: str) -> bool:
        """The stage started with this same key and never completed: its partial work can be continued."""
        entry = self.entries.get(stage.name)
        return bool(entry) and entry.get("status") == "running" and self._key_matches(entry, stage, key)

    def upgrade(self, stage: Stage, key: str) -> None:
        """Rewrite a current entry of an earlier version in this version's form, fingerprints included, so
        that from now on a replaced output is noticed."""
        entry = self.entries[stage.name]
        if entry.get("version", 1) < LEDGER_VERSION:
            self.entries[stage.name] = {**entry, "key": key, "version": LEDGER_VERSION, **self._fingerprints(stage)}
            atomic_write_json(self.path, self.entries)

    def start(self, stage: Stage, key: str) -> None:
        self.entries[stage.name] = {"key": key, "version": LEDGER_VERSION, "status": "running",
                                    "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(self.path, self.entries)

    def record(self, stage: Stage, key: str, seconds: float) -> None:
        self.entries[stage.name] = {"key": key, "version": LEDGER_VERSION, "status": "done",
                                    "seconds": round(seconds, 1),
                                    "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **self._fingerprints(stage)}
        atomic_write_json(self.path, self.entries)


@dataclass
class RunOutcome:
    ran: list[str]
    skipped: list[str]
    metrics: dict | None
    report: Path | None


def _run_prepare(config: Config, quiet: bool, resume: bool) -> None:
    load_stage("prepare").run(config, quiet=quiet)


def _run_diagnose(config: Config, quiet: bool, resume: bool) -> None:
    report = load_stage("diagnose").run(config, quiet=quiet)
    print(f"masking diagnostic: {report.total} samples, {report.failing} would fail, "
          f"mean supervised ratio {report.mean_mask_ratio:.3f}")
    if report.failing:
        raise GateFailed(f"the masking diagnostic found {report.failing} failing sample(s) "
                         f"(first: {report.failing_ids[:5]}); run `surgvqa diagnose` for the details")
    if report.grouping_problem:
        raise GateFailed(f"the masking diagnostic: {report.grouping_problem}")


def _run_overfit(config: Config, quiet: bool, resume: bool) -> None:
    result = load_stage("overfit").run(config, quiet=quiet)
    if quiet:
        load_stage("overfit").print_sanity(result)
    if not result.passed:
        raise GateFailed(f"the sanity overfit gate failed ({result.reason}); fix the set-up, or rerun with "
                         f"--skip-sanity to train anyway")


def _run_train(config: Config, quiet: bool, resume: bool) -> None:
    result = load_stage("train").run(config, resume=resume, restart=not resume)  # not resumed: another stage key
    continued = f" (continued from {result.resumed_from})" if result.resumed_from else ""
    print(f"trained {result.global_step} steps{continued}; model saved to {result.model_dir}")


def _check_predictions(config: Config, out: Path) -> None:
    """Rows left in error beyond ``predict.max_error_rate`` are never evaluated silently."""
    # Imported here: the prediction files load torch, which `surgvqa --help` (importing this module) must not.
    from surgvqa.inference.prediction_errors import PredictionErrors, check_error_rate

    try:
        summary = check_error_rate(out, config.predict.max_error_rate)
    except PredictionErrors as exc:
        raise RejectedOutput(f"{exc}; the predictions are not evaluated") from None
    if summary.errors:
        print(f"{out.name}: {summary.errors} of {summary.rows} rows in error, within predict.max_error_rate")


def _predictions(config: Config, out: Path, model_path: str, quiet: bool, resume: bool) -> None:
    # Predictions made under another stage key must not be resumed; nor rows a manual `surgvqa predict` made there.
    load_stage("predict").run(config, out=out, model_path=model_path, quiet=quiet, restart=not resume,
                              replace_other=True)
    _check_predictions(config, out)


def _run_baseline(config: Config, quiet: bool, resume: bool) -> None:
    _check_predictions(config, load_stage("baseline").run(config, quiet=quiet, restart=not resume,
                                                          replace_other=True))


def _run_predict(config: Config, quiet: bool, resume: bool) -> None:
    _predictions(config, config.run_dir / "predictions.jsonl", str(config.run_dir / "model"), quiet, resume)


def _run_evaluate(config: Config, quiet: bool, resume: bool) -> None:
    load_stage("evaluate").run(config)


# Each runner gets (config, quiet, resume): resume is true when the stage was interrupted under the same key, or
# completed but its output was rejected (rows in error: only those are predicted again).
RUNNERS: dict[str, Callable[[Config, bool, bool], None]] = {
    "prepare": _run_prepare, "diagnose": _run_diagnose, "overfit": _run_overfit, "train": _run_train,
    "baseline": _run_baseline, "predict": _run_predict, "evaluate": _run_evaluate,
}

# Checks of a stage's output against settings left out of its key, run after the stage and whenever it is found
# current: raising predict.max_error_rate accepts the predictions already made; lowering it below their error
# share retries the rows in error, and stops the chain if too many remain.
ACCEPTANCE_CHECKS: dict[str, Callable[[Config, Path], None]] = {
    "baseline": _check_predictions, "predict": _check_predictions,
}


def _accepted(stage: Stage, config: Config) -> bool:
    check = ACCEPTANCE_CHECKS.get(stage.name)
    try:
        if check is not None:
            check(config, config.run_dir / stage.output)
    except RejectedOutput:
        return False
    return True


def run_pipeline(config: Config, *, from_stage: str | None = None, force: bool = False,
                 skip_sanity: bool = False, quiet: bool = False) -> RunOutcome:
    if from_stage is not None and from_stage not in STAGE_NAMES:
        raise ValueError(f"--from {from_stage!r}: choose one of {', '.join(STAGE_NAMES)}")
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for folder in ("prepared", "model"):
        recover_directory(run_dir / folder)  # a kill between the two renames of a directory swap
    remove_stale_temporaries(run_dir)  # files a kill left before their rename; the run lock keeps writers out
    for stage in STAGES:  # refused before any work, not after hours of it (core.run_folder: an adopted folder)
        check_not_foreign(run_dir / Path(stage.output).parts[0])
    check_not_foreign(run_dir / "checkpoints", "delete")
    keys = stage_keys(config)
    ledger = StageLedger(run_dir, previous_keys=lambda version: previous_version_keys(config, version))
    forced_from = STAGE_NAMES.index(from_stage) if from_stage else (0 if force else len(STAGE_NAMES))
    ran, skipped = [], []
    for index, stage in enumerate(STAGES):
        key = keys[stage.name]
        if stage.name == "overfit" and skip_sanity:
            print("overfit: skipped (--skip-sanity)")
            skipped.append(stage.name)
            continue
        # An upstream stage that ran has replaced what this one read (the ledger's input fingerprints say so too,
        # but a file system with coarse modification times could miss a rewrite of the same size).
        reusable = index < forced_from and not any(name in ran for name in stage.upstream)
        if reusable and ledger.is_current(stage, key):
            if _accepted(stage, config):
                ledger.upgrade(stage, key)
                print(f"{stage.name}: up to date, skipped")
                skipped.append(stage.name)
                continue
            resume, reason = True, "continuing: its output is not accepted under the current settings"
        else:
            resume = reusable and ledger.was_interrupted(stage, key)
            reason = "continuing an interrupted run" if resume else ""
        print(f"== {stage.name}" + (f" ({reason})" if reason else ""))
        if stage.name == "train" and not resume:
            remove_tree(run_dir / "checkpoints")  # a new key means a new training run
        ledger.start(stage, key)
        started = time.perf_counter()
        enter_stage(stage.name)
        try:
            RUNNERS[stage.name](config, quiet, resume)
        except RejectedOutput:
            # The output is complete, only not accepted under today's settings: recorded as done, so that a rerun
            # with a raised limit accepts it as it is, and one without retries the rows in error only.
            ledger.record(stage, key, time.perf_counter() - started)
            raise
        finally:
            enter_stage(None)
        ledger.record(stage, key, time.perf_counter() - started)
        ran.append(stage.name)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    report = run_dir / "report.html"
    return RunOutcome(ran, skipped, metrics, report if report.exists() else None)
