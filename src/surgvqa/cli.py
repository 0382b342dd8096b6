"""Command line: parses arguments, loads the config, calls a stage. No logic of its own."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import sys
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from surgvqa.core.config import PREDICT_MODES, Config, ConfigError, load_config, write_resolved_config
from surgvqa.core.io import WriteError, disk_full_error, is_disk_full
from surgvqa.models.tiny import ARCHS, build_tiny_model, tiny_model_settings
from surgvqa.run.pipeline import STAGE_NAMES, run_pipeline
from surgvqa.run.runlock import RunDirectoryBusy, run_directory_lock
from surgvqa.run.slurm import render_slurm
from surgvqa.run.slurm import submit as submit_all
from surgvqa.stages import GateFailed, stage

# The stages are imported inside their commands (surgvqa.stages.stage): torch and transformers take seconds to
# import, must not load before the run directory's lock is taken (a second writer is refused first), and `--help`
# stays fast.

DEBUG_ENV = "SURGVQA_DEBUG"  # set to 1 to see the traceback of an unexpected error
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def describe_error(exc: BaseException) -> tuple[str, int]:
    """The ``error:`` line and exit code for an exception that reached the command line.

    Bad input (config, data, model, paths, a folder that cannot be written) is exit 2 with the stage's own message;
    a run directory held by another process is exit 1; anything unexpected is exit 1 with its type named.
    """
    if isinstance(exc, RunDirectoryBusy):
        return _one_line(exc), 1
    if isinstance(exc, (ConfigError, WriteError, ValueError)):
        return _one_line(exc), 2
    if is_disk_full(exc):  # a writer that no stage wrapped: the file when the error names one
        where = getattr(exc, "filename", None)
        if where is not None:
            return _one_line(disk_full_error(where)), 2
        return (f"disk full while writing a file it does not name ({_one_line(exc)}): free space on the run's "
                "disk and rerun the same command"), 2
    if isinstance(exc, OSError) and exc.filename is not None:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot access {exc.filename}: permission denied", 2
        return f"{exc.filename}: {exc.strerror or exc}", 2
    if isinstance(exc, FileNotFoundError):
        return _one_line(exc), 2
    return f"{type(exc).__name__}: {_one_line(exc)}; rerun with {DEBUG_ENV}=1 for the traceback", 1


# What the running command holds until it ends (its run directory lock), and its name for the lock's record.
_command_scope = ExitStack()
_command_name = "surgvqa"


def _is_cli_flow(exc: BaseException) -> bool:
    """Exit codes, usage errors and aborts of the CLI library itself: it reports those on its own."""
    return type(exc).__module__.split(".")[0] in ("typer", "click")


class ErrorReportingGroup(TyperGroup):
    """Every command runs inside this handler, so no traceback reaches the user unless SURGVQA_DEBUG=1."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        global _command_name
        name, command, rest = super().resolve_command(ctx, args)
        _command_name = f"surgvqa {name}"
        return name, command, rest

    def invoke(self, ctx: Any) -> Any:
        try:
            with _command_scope:
                return super().invoke(ctx)
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(INTERRUPTED_EXIT_CODE) from None
        except BrokenPipeError:
            # The reader went away (`surgvqa evaluate --help | head`): click ends quietly with status 1, as it does
            # for `surgvqa --help | head`, instead of this handler's "error: BrokenPipeError".
            raise
        except Exception as exc:
            if _is_cli_flow(exc):
                raise
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                traceback.print_exc()
            message, code = describe_error(exc)
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code) from None


app = typer.Typer(cls=ErrorReportingGroup, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Fine-tune Qwen2-VL-family models on surgical / GI-endoscopy VQA and measure them per type.")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: embedded demo)")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a config key: --set train.lr=1e-4")]
JsonOption = Annotated[bool, typer.Option("--json", help="print a JSON object instead of tables")]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _config(config: Path | None, overrides: list[str] | None, *, write: bool = True,
            record: bool = False, adopt: bool = False) -> Config:
    """Load the config; for a command that writes into the run directory (``write``), also take the directory's
    lock for the rest of the command. Only the commands that make the run's data and model (``record``: prepare,
    train, run) record the resolved config there: a diagnose, predict or evaluate tried with other settings must
    not leave a config.resolved.yaml (shown in the report as the run's) that no longer describes ``model/``."""
    try:
        loaded = load_config(config, overrides or [])
    except ConfigError as exc:
        fail(str(exc))
    if write:
        # prepare, train and run replace whole folders of the run: a folder surgvqa did not make is refused unless
        # adopted with `run --force`. The other commands add single files (a user's own predictions.jsonl is
        # evaluated where it lies): they adopt such a folder, its files protected all the same.
        _lock_run_directory(loaded, adopt=adopt or not record)
        if record:
            write_resolved_config(loaded)
    return loaded


def _lock_run_directory(cfg: Config, *, adopt: bool = False) -> None:
    """Hold the run directory's lock until the current command ends (the click context closes it); a folder
    surgvqa did not make is refused unless ``adopt`` (``run --force``)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return  # the workers of one torchrun job share the directory; rank 0 holds the lock for all of them
    _command_scope.enter_context(run_directory_lock(cfg.run_dir, command=_command_name, adopt=adopt))


def _print_json(payload: object) -> None:
    typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))


@app.command("make-tiny-model")
def make_tiny_model(
    out: Annotated[Path, typer.Argument(help="output directory")],
    arch: Annotated[str, typer.Option(help="qwen2_vl, qwen2_5_vl, qwen3_vl or qwen3_5")] = "qwen2_vl",
    seed: int = 0,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    force: Annotated[bool, typer.Option("--force", help="replace OUT even if it holds files other than a tiny "
                                                        "model (they are lost)")] = False,
) -> None:
    """Write an offline tiny Qwen-VL model (real Qwen vocabulary and chat template, random weights).

    A tiny model already in OUT is kept if it has these settings and rebuilt if not; any other non-empty OUT is
    refused unless --force.
    """
    if arch not in ARCHS:
        fail(f"--arch must be one of {', '.join(ARCHS)}, not {arch!r}")
    previous = tiny_model_settings(out)
    path = build_tiny_model(out, arch=arch, seed=seed, min_pixels=min_pixels, max_pixels=max_pixels, force=force)
    if previous is not None and previous == tiny_model_settings(path):
        typer.echo(f"tiny {arch} model with these settings already in {path}: kept")
    elif previous is not None:
        typer.echo(f"tiny {arch} model written to {path}, replacing the tiny model built there with other settings "
                   f"({previous})")
    else:
        typer.echo(f"tiny {arch} model written to {path}")


@app.command("make-synthetic")
def make_synthetic(
    out: Annotated[Path, typer.Argument(help="output directory")],
    images: Annotated[int, typer.Option(min=1)] = 300,
    seed: int = 0,
    image_size: Annotated[int, typer.Option(min=28)] = 112,
    task: Annotated[str, typer.Option(help="kvasir-vqa (parquet) or kvasir-vqa-x1 (parquet/ with train and test "
                                           "files, save_to_disk/, and the kvasir-vqa/ images they join to)")]
    = "kvasir-vqa",
) -> None:
    """Write a synthetic Kvasir-like dataset in the Kvasir-VQA parquet schema (or the Kvasir-VQA-x1 layouts)."""
    if task == "kvasir-vqa-x1":
        from surgvqa.data.synthetic_x1 import make_synthetic_x1

        path = make_synthetic_x1(out, images=images, seed=seed, image_size=image_size)
    elif task == "kvasir-vqa":
        from surgvqa.data.synthetic import make_synthetic as build

        path = build(out, images=images, seed=seed, image_size=image_size)
    else:
        fail(f"--task must be kvasir-vqa or kvasir-vqa-x1, not {task!r}")
    typer.echo(f"synthetic dataset written to {path}")


@app.command()
def prepare(config: ConfigOption = None, set_: SetOption = None, as_json: JsonOption = False) -> None:
    """Read the raw source, validate, split by image, type the questions, write prepared JSONL."""
    cfg = _config(config, set_, record=True)
    result = stage("prepare").run(cfg, quiet=as_json)
    if as_json:
        _print_json(json.loads((result.prepared_dir / "summary.json").read_text()))


def _prepared_file(cfg: Config, data: Path | None, split: str) -> Path:
    path = data or cfg.run_dir / "prepared" / f"{split}.jsonl"
    if not path.is_file():
        fail(f"{path} not found: run `surgvqa prepare` first (or pass --data)")
    return path


@app.command()
def diagnose(
    config: ConfigOption = None,
    set_: SetOption = None,
    data: Annotated[Path | None, typer.Option(help="prepared JSONL (default: the run's train split)")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="samples shown per question type")] = 5,
    whole_file: Annotated[bool, typer.Option(help="also check every other sample for the summary")] = True,
    as_json: JsonOption = False,
) -> None:
    """The masking diagnostic: supervised tokens, decoded text, mask ratio, shapes, image tokens per sample."""
    cfg = _config(config, set_)
    diagnose_stage = stage("diagnose")
    report = diagnose_stage.run(cfg, data=_prepared_file(cfg, data, "train"), per_type=n, full_summary=whole_file,
                                quiet=as_json)
    if as_json:
        _print_json(report.to_json())
    else:
        diagnose_stage.print_diagnostic(report)
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="start afresh even over an unfinished training's "
                                          "checkpoints, deleting them")] = False,
    as_json: JsonOption = False,
) -> None:
    """Fine-tune (LoRA, or every weight when lora is null) with answer-only supervision."""
    cfg = _config(config, set_, record=True)
    from surgvqa.training.trainer import Preempted

    try:
        result = stage("train").run(cfg, resume=resume, restart=restart)
    except Preempted as exc:
        typer.echo(f"stopped: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    payload = {"model_dir": str(result.model_dir), "global_step": result.global_step,
               "final_loss": result.final_loss, "resumed_from": result.resumed_from}
    if as_json:
        _print_json(payload)
    elif result.already_finished:
        typer.echo(f"already trained {result.global_step} steps (mean loss {result.final_loss:.4f}); model in "
                   f"{result.model_dir}")
    else:
        typer.echo(f"trained {result.global_step} steps (mean loss {result.final_loss:.4f}); "
                   f"model saved to {result.model_dir}")


@app.command()
def overfit(config: ConfigOption = None, set_: SetOption = None, as_json: JsonOption = False) -> None:
    """The sanity gate: memorise the first training samples; exit 1 unless loss and greedy answers pass."""
    cfg = _config(config, set_)
    result = stage("overfit").run(cfg, quiet=as_json)
    if as_json:
        _print_json(json.loads((cfg.run_dir / "sanity.json").read_text()))
    if not result.passed:
        raise typer.Exit(1)


@app.command()
def merge(
    adapter: Annotated[Path, typer.Argument(help="LoRA adapter directory (e.g. runs/exp1/model)")],
    out: Annotated[Path, typer.Argument(help="where to write the merged model: a new or empty folder")],
    config: ConfigOption = None,
    set_: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="replace OUT and everything in it, whatever it holds "
                                                        "(never the adapter or the base model)")] = False,
) -> None:
    """Fold a LoRA adapter into its base model and write a plain model directory."""
    cfg = _config(config, set_, write=False)
    from surgvqa.training.trainer import merge_adapter

    path = merge_adapter(cfg, adapter, out, force=force)
    typer.echo(f"merged model written to {path}")


@app.command()
def slurm(
    config: ConfigOption = None,
    set_: SetOption = None,
    submit: Annotated[bool, typer.Option("--submit", help="also run RUN_ALL.sh (sbatch chained with afterok)")] = False,
) -> None:
    """Write one sbatch script per stage and RUN_ALL.sh into the run's slurm/ folder (edit them, then submit)."""
    cfg = _config(config, set_)
    paths = render_slurm(cfg, config, set_ or [])
    for path in paths:
        typer.echo(str(path))
    if submit:
        try:
            typer.echo(submit_all(paths[-1].parent), nl=False)
        except (FileNotFoundError, RuntimeError) as exc:
            fail(str(exc), 1)


@app.command()
def doctor(config: ConfigOption = None, set_: SetOption = None, as_json: JsonOption = False) -> None:
    """Preflight: torch/CUDA, GPU memory held by other processes, model and data paths, disk, image tokens."""
    from surgvqa.run.doctor import print_report, run_doctor

    report = run_doctor(_config(config, set_, write=False))
    if as_json:
        _print_json(report.to_json())
    else:
        print_report(report)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def evaluate(
    config: ConfigOption = None,
    set_: SetOption = None,
    predictions: Annotated[Path | None, typer.Option(help="predictions.jsonl (default: the run's); with --challenge, "
                                                         "predictions_1.json or its submission folder")] = None,
    baseline: Annotated[Path | None, typer.Option(help="a baseline run's predictions.jsonl to compare with")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default: the run directory for the run's own "
                                                  "predictions.jsonl; for any other file, <its name>.evaluation "
                                                  "beside it; with --challenge, <submission folder>.evaluation "
                                                  "beside that folder)")] = None,
    report: Annotated[bool, typer.Option(help="write plots and report.html")] = True,
    challenge: Annotated[str | None, typer.Option(help="score a challenge's predictions_1.json (gi-2025, gi-2026, "
                                                       "medico-2025, medico-2026)")] = None,
    references: Annotated[Path | None, typer.Option(help="with --challenge: a local copy of the challenge's split "
                                                         "(default: export.validation_data)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Per-type metrics with tolerance and bootstrap CIs, text metrics, baseline deltas, plots, report.html.
    With --challenge, scores a submission's predictions_1.json against a local copy of the challenge's split."""
    cfg = _config(config, set_)
    evaluate_stage = stage("evaluate")
    metrics = evaluate_stage.run(cfg, predictions=predictions, baseline=baseline, out=out, with_report=report,
                                 challenge=challenge, references=references)
    if as_json:
        _print_json(metrics)
    else:
        evaluate_stage.print_metrics_table(metrics)


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="the submission folder to write: a new or empty folder, or an earlier "
                                             "export, which is replaced whole")],
    challenge: Annotated[str, typer.Option(help="gi-2025, gi-2026, medico-2025 or medico-2026")],
    config: ConfigOption = None,
    set_: SetOption = None,
    validate: Annotated[bool, typer.Option(help="run the script here on export.validation_data and keep its "
                                                "predictions_1.json")] = True,
    as_json: JsonOption = False,
) -> None:
    """A ready challenge submission from a trained run: submission_task1.py, requirements.txt, README.md and a
    local validation run's predictions_1.json (docs/challenge.md)."""
    cfg = _config(config, set_, write=False)  # reads the run; writes only OUT
    from surgvqa.export.challenge import export_submission

    try:
        path = export_submission(cfg, challenge, out, validate=validate, quiet=as_json)
    except RuntimeError as exc:
        fail(str(exc), 1)
    files = sorted(p.name for p in path.iterdir())
    if as_json:
        _print_json({"submission": str(path), "files": files})
    else:
        typer.echo(f"submission for {challenge} written to {path}: {', '.join(files)}")


@app.command()
def run(
    config: ConfigOption = None,
    set_: SetOption = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="rerun from this stage on")] = None,
    force: Annotated[bool, typer.Option("--force", help="rerun every stage; also use a run folder that surgvqa did "
                                        "not make (its files are kept: never replaced or deleted)")] = False,
    skip_sanity: Annotated[bool, typer.Option("--skip-sanity", help="do not run the overfit gate")] = False,
) -> None:
    """Every stage in order (prepare, diagnose, overfit, train, baseline, predict, evaluate), skipping the
    stages whose inputs and config are unchanged."""
    if from_stage is not None and from_stage not in STAGE_NAMES:
        fail(f"--from {from_stage!r}: choose one of {', '.join(STAGE_NAMES)}")
    cfg = _config(config, set_, record=True, adopt=force)
    from surgvqa.training.trainer import Preempted

    try:
        outcome = run_pipeline(cfg, from_stage=from_stage, force=force, skip_sanity=skip_sanity)
    except GateFailed as exc:
        fail(f"stopped: {exc}", code=1)
    except Preempted as exc:
        typer.echo(f"stopped: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    if outcome.metrics is not None:
        stage("evaluate").print_metrics_table(outcome.metrics)
    typer.echo(f"stages run: {', '.join(outcome.ran) or 'none'}; up to date: {', '.join(outcome.skipped) or 'none'}")
    if outcome.report is not None:
        typer.echo(f"report: {outcome.report.resolve()}")


@app.command()
def predict(
    config: ConfigOption = None,
    set_: SetOption = None,
    mode: Annotated[str | None, typer.Option(help="generate | constrained | rank (default: predict.mode)")] = None,
    data: Annotated[Path | None, typer.Option(help="prepared JSONL (default: the run's predict.split)")] = None,
    out: Annotated[Path | None, typer.Option(help="predictions file (default: <run>/predictions.jsonl)")] = None,
    model: Annotated[str | None, typer.Option("--model", help="model, adapter or merged directory "
                                              "(default: <run>/model if present, else the base model)")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="predict every row afresh, replacing what the file "
                                          "holds (by default it is resumed, and refused if its rows were made "
                                          "with another mode, model or input)")] = False,
    as_json: JsonOption = False,
) -> None:
    """Batched, resumable inference to predictions.jsonl (one process, or one shard per rank under torchrun)."""
    if mode is not None and mode not in PREDICT_MODES:
        fail(f"--mode {mode!r}: choose one of {', '.join(PREDICT_MODES)}")
    cfg = _config(config, set_)  # the run directory's lock first: a second writer is refused before slow imports
    from surgvqa.inference.prediction_errors import summarise_errors

    path = _prepared_file(cfg, data, cfg.predict.split)
    written = stage("predict").run(cfg, mode=mode, data=path, out=out, model_path=model, quiet=as_json, restart=restart)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 reports the merged file
    summary = summarise_errors(written)
    payload = {"predictions": str(written), "mode": mode or cfg.predict.mode, "rows": summary.rows,
               "errors": summary.errors, "error_kinds": {kind: {"count": count, "first": first}
                                                        for kind, (count, first) in summary.by_kind.items()}}
    if as_json:
        _print_json(payload)
    else:
        typer.echo(f"{payload['rows']} predictions ({payload['errors']} errors) in {written}")
    if summary.errors and summary.rate > cfg.predict.max_error_rate:
        fail(summary.describe(written) + f" (predict.max_error_rate is {cfg.predict.max_error_rate:g})", code=1)


@app.command("app")
def web_app(
    config: ConfigOption = None,
    set_: SetOption = None,
    model: Annotated[str | None, typer.Option("--model", help="model, adapter or merged directory "
                                              "(default: <run>/model if present, else the base model)")] = None,
    compare_base: Annotated[bool, typer.Option("--compare-base", help="also load the untrained base model and "
                                               "show its answer beside")] = False,
    host: Annotated[str, typer.Option(help="address to bind; 127.0.0.1 keeps it on this machine")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 7860,
) -> None:
    """A local web app: ask the trained model about an image and see its answer, confidence and candidates."""
    if importlib.util.find_spec("gradio") is None:
        fail("the app needs the app extra: pip install -e '.[app]' (or run `make app`)")
    from surgvqa.serve.app import serve

    cfg = _config(config, set_, write=False)  # a reader of the run: it writes under <run>/app/ only, no lock
    typer.echo(f"surgvqa app for {cfg.run_dir} on http://{host}:{port} (Ctrl-C to stop)")
    serve(cfg, model, compare_base=compare_base, host=host, port=port)


@app.command("nearest-baseline")
def nearest_baseline(
    config: ConfigOption = None,
    set_: SetOption = None,
    out: Annotated[Path | None, typer.Option(help="predictions file (default: <run>/predictions.nearest.jsonl)")]
    = None,
) -> None:
    """Text-only baseline: each question of predict.split answered with the answer of the most similar training
    question (no image); compare with `surgvqa evaluate --baseline`."""
    cfg = _config(config, set_)
    from surgvqa.inference.nearest_question import nearest_question_predictions

    prepared = cfg.run_dir / "prepared"
    _prepared_file(cfg, None, cfg.predict.split)
    written = nearest_question_predictions(prepared, cfg.predict.split,
                                           out or cfg.run_dir / "predictions.nearest.jsonl")
    typer.echo(f"text-only nearest-question answers in {written}")


def main() -> None:
    """Console entry (`python -m surgvqa`); an interrupt outside a command (while importing) is one line too."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
