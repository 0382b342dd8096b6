"""SLURM: one readable sbatch script per stage plus ``RUN_ALL.sh``, which chains them with afterok dependencies.

The scripts are meant to be read and edited before submission, so they are rendered from plain string
templates with the config's values written in literally (no Jinja, no generated indirection). Every script
runs the preflight (``surgvqa doctor``) first, so a GPU already held by someone else or a missing model
fails in seconds instead of after the queue wait.

Pre-emption: the training job asks SLURM for SIGUSR1 five minutes before its time limit, forwards it to the
trainer (which saves a checkpoint and exits 75), then requeues itself; the requeued job runs
``surgvqa train --resume`` again and continues from that checkpoint. The dependent jobs wait, because a
requeued job has not finished.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from surgvqa.core.config import Config, default_config_path
from surgvqa.core.io import check_not_foreign, umask

USR1_LEAD_SECONDS = 300  # SIGUSR1 this long before the time limit: room for a step to finish and save
# (doctor.SAVE_LEAD_SECONDS counts the same minutes in its training-time estimate)
RDZV_PORT = 29500
STAGES = (  # (file name, stage name) in submission order
    ("01_diagnose.sbatch", "diagnose"),
    ("02_overfit.sbatch", "overfit"),
    ("03_train.sbatch", "train"),
    ("04_predict.sbatch", "predict"),
    ("05_evaluate.sbatch", "evaluate"),
)
RUN_ALL = "RUN_ALL.sh"
JOB_IDS = "job_ids.txt"


def _write_executable(path: Path, text: str) -> None:
    """Temp file in the same folder + rename, so a half-written script is never submitted."""
    check_not_foreign(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            os.fchmod(handle.fileno(), 0o777 & ~umask())  # executable, readable as the umask allows
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sbatch_value(text: str) -> str:
    """``text`` as one argument of an ``#SBATCH`` line.

    sbatch splits directive lines at whitespace, ends them at an unescaped ``#`` and honours double quotes and
    backslash escapes (its own small parser, not a shell, so shlex.quote's single quotes would stay literal).
    """
    if not any(char.isspace() or char in "#\"'\\" for char in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sbatch_header(config: Config, stage: str, logs_dir: Path, *, gpus: int, nodes: int,
                   extra: tuple[str, ...] = ()) -> str:
    slurm = config.slurm
    lines = [f"--job-name={config.run_name}-{stage}", f"--partition={slurm.partition}"]
    if slurm.account:
        lines.append(f"--account={slurm.account}")
    lines.append(f"--nodes={nodes}")
    if nodes > 1 or gpus > 1:
        lines.append("--ntasks-per-node=1")  # one torchrun launcher per node; it starts one worker per GPU
    if gpus > 0:
        lines.append(f"--gres=gpu:{gpus}")
    lines += [f"--cpus-per-task={slurm.cpus_per_task}", f"--mem={slurm.mem}", f"--time={slurm.time}",
              f"--output={_sbatch_value(f'{logs_dir}/%x-%j.out')}", f"--error={_sbatch_value(f'{logs_dir}/%x-%j.err')}",
              *extra, *slurm.extra_sbatch]
    return "\n".join(f"#SBATCH {line}" for line in lines)


def _preamble(config: Config, project_dir: Path, args: str) -> str:
    return f"""set -euo pipefail

# Relative paths in the config (output_dir, cache_dir, data.source, model.name_or_path) resolve here:
# the directory `surgvqa slurm` was run in, which RUN_ALL.sh also submits from.
cd {shlex.quote(str(project_dir))}

# Environment set-up (slurm.env_setup). Activation scripts (conda, modules) often read unset variables.
set +u
# shellcheck source=/dev/null
{config.slurm.env_setup}
set -u
export HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1
export SRUN_CPUS_PER_TASK="${{SLURM_CPUS_PER_TASK:-1}}"  # srun no longer inherits --cpus-per-task

# The config and the --set overrides every surgvqa command of this run uses.
{args}

echo "job ${{SLURM_JOB_ID:-local}} on $(hostname) at $(date -Is)"
# Preflight: torch/CUDA, GPU memory held by other processes, model and data paths, disk, image tokens.
surgvqa doctor "${{SURGVQA_ARGS[@]}}"
"""


def _simple_stage(config: Config, project_dir: Path, logs_dir: Path, args: str, stage: str, title: str,
                  commands: str) -> str:
    header = _sbatch_header(config, stage, logs_dir, gpus=min(config.slurm.gpus, 1), nodes=1)
    return f"""#!/bin/bash
# {title} — run '{config.run_name}'. Rendered by `surgvqa slurm`; edit freely, then submit with sbatch
# (or RUN_ALL.sh for the whole chain).
{header}

{_preamble(config, project_dir, args)}
{commands}
"""


def _train_launch(config: Config) -> str:
    gpus, nodes = config.slurm.gpus, config.slurm.nodes
    if gpus * nodes <= 1:
        return 'surgvqa train "${SURGVQA_ARGS[@]}" --resume &'
    return f"""# One torchrun per node (srun), {gpus} worker(s) per node. torchrun forwards SIGUSR1 to its workers
# (PET_SIGNALS_TO_HANDLE; needs a torchrun with --signals-to-handle) and gives them PET_SHUTDOWN_TIMEOUT
# seconds to save the checkpoint.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_ADDR
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE
export PET_SHUTDOWN_TIMEOUT={USR1_LEAD_SECONDS - 60}
srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node {gpus} \\
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:{RDZV_PORT}" \\
    -m surgvqa train "${{SURGVQA_ARGS[@]}}" --resume &"""


def training_time_note(config: Config) -> str:
    """``surgvqa doctor``'s training-time line against ``slurm.time``, with its fix when the limit is shorter."""
    # Imported here: the doctor loads torch and transformers, which the CLI must not at start-up.
    from surgvqa.run.doctor import training_time_check

    try:
        _, detail, fix = training_time_check(config)
    except (OSError, ValueError) as exc:
        return f"not estimated: {type(exc).__name__}: {' '.join(str(exc).split())}"
    return f"{detail} -> {fix}" if fix else detail


def _train_stage(config: Config, project_dir: Path, logs_dir: Path, args: str, time_note: str) -> str:
    slurm = config.slurm
    header = _sbatch_header(config, "train", logs_dir, gpus=slurm.gpus, nodes=slurm.nodes,
                            extra=(f"--signal=B:USR1@{USR1_LEAD_SECONDS}", "--requeue", "--open-mode=append"))
    return f"""#!/bin/bash
# Training — run '{config.run_name}': LoRA fine-tuning, pre-emptible and resumable.
# SLURM sends SIGUSR1 to this script {USR1_LEAD_SECONDS // 60} minutes before the time limit (--signal=B:USR1@...);
# the trap forwards it to the trainer, which saves a checkpoint and exits 75. The script then requeues the
# job: the same job id runs again and `--resume` continues from the checkpoint (a first run with no checkpoint
# starts fresh). Rendered by `surgvqa slurm`; edit freely.
# Time estimate (surgvqa doctor, when rendered):
{textwrap.indent(textwrap.fill(time_note, 110), "#   ")}
{header}

{_preamble(config, project_dir, args)}
echo "restart count: ${{SLURM_RESTART_COUNT:-0}}"

SIGNALLED=0
INTERRUPTED=0
# shellcheck disable=SC2329  # invoked by the trap below
forward_usr1() {{
    echo "SIGUSR1: asking the trainer (pid $TRAIN_PID) to save a checkpoint and stop" >&2
    SIGNALLED=1
    INTERRUPTED=1
    kill -USR1 "$TRAIN_PID" 2>/dev/null || true
}}
trap forward_usr1 USR1

# The trainer runs in the background so that bash can run the trap while it waits.
{_train_launch(config)}
TRAIN_PID=$!

# A trapped signal makes `wait` return early (status > 128) while the trainer is still saving: wait again.
while :; do
    INTERRUPTED=0
    status=0
    wait "$TRAIN_PID" || status=$?
    [[ $INTERRUPTED -eq 1 ]] || break
done

# 75 = pre-empted, checkpoint saved. (torchrun reports its own non-zero code when it was signalled.)
if [[ $status -eq 75 || ( $SIGNALLED -eq 1 && $status -ne 0 ) ]]; then
    echo "pre-empted (exit $status): requeueing job $SLURM_JOB_ID; it resumes from the last checkpoint" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""


def _run_all(config: Config, project_dir: Path, scripts_dir: Path, logs_dir: Path) -> str:
    chain = []
    previous = None
    for file_name, stage in STAGES:
        dependency = f' --dependency="afterok:${previous}"' if previous else ""
        chain.append(f'{stage}=$(submit {file_name}{dependency})\necho "{stage}: ${stage}" | tee -a "$IDS"')
        previous = stage
    steps = "\n".join(chain)
    return f"""#!/bin/bash
# Submit the five stages of run '{config.run_name}' in order; each starts only after the previous one
# succeeded (afterok), so a failed preflight, diagnostic or overfit gate stops the chain before training.
# Job ids are printed and written to {JOB_IDS}. Rendered by `surgvqa slurm`.
set -euo pipefail

SCRIPTS={shlex.quote(str(scripts_dir))}
IDS="$SCRIPTS/{JOB_IDS}"
cd {shlex.quote(str(project_dir))}  # the submit directory of every job
mkdir -p {shlex.quote(str(logs_dir))}  # SLURM does not create the folder of --output
: > "$IDS"

submit() {{  # submit SCRIPT [sbatch options...]; prints the job id
    local script=$1 job_id
    shift
    # (set -e does not reach inside $(...): check sbatch's status explicitly)
    job_id=$(sbatch --parsable "$@" "$SCRIPTS/$script") || {{ echo "sbatch failed for $script" >&2; return 1; }}
    job_id=${{job_id%%;*}}  # --parsable prints "id" or "id;cluster"
    [[ -n $job_id ]] || {{ echo "sbatch printed no job id for $script" >&2; return 1; }}
    echo "$job_id"
}}

{steps}
"""


def _args_array(config_file: Path, overrides: list[str]) -> str:
    """A bash array, one option per line; values are single-quoted, so nothing in them expands."""
    items = [f"--config {shlex.quote(str(config_file))}", *(f"--set {shlex.quote(item)}" for item in overrides)]
    lines = ["SURGVQA_ARGS=(", *(f"    {item}" for item in items), ")"]
    if any(char in item for item in overrides for char in "$`"):
        lines.insert(0, "# shellcheck disable=SC2016  # a literal $ or backtick in an override value")
    return "\n".join(lines)


def render_slurm(config: Config, config_path: Path | None, overrides: list[str],
                 out_dir: Path | None = None) -> list[Path]:
    """Write the five stage scripts and RUN_ALL.sh (default folder: run_dir/slurm); returns their paths."""
    project_dir = Path.cwd().resolve()
    run_dir = config.run_dir if config.run_dir.is_absolute() else project_dir / config.run_dir
    scripts_dir = Path(out_dir).resolve() if out_dir else run_dir / "slurm"
    logs_dir = run_dir / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    config_file = Path(config_path).resolve() if config_path else default_config_path().resolve()
    args = _args_array(config_file, overrides)
    time_note = training_time_note(config)
    # Printed beside the script paths: the --time limit is chosen now, before the first job runs.
    print(f"training time: {time_note}", file=sys.stderr, flush=True)

    bodies = {
        "diagnose": _simple_stage(
            config, project_dir, logs_dir, args, "diagnose", "Prepare + masking diagnostic",
            '# prepare is cheap (validate, split, type); the diagnostic exits 1 if any sample is mis-masked.\n'
            'surgvqa prepare "${SURGVQA_ARGS[@]}"\nsurgvqa diagnose "${SURGVQA_ARGS[@]}"'),
        "overfit": _simple_stage(
            config, project_dir, logs_dir, args, "overfit", "Sanity overfit gate",
            '# exits 1 unless the model memorises the first samples (loss and greedy answers).\n'
            'surgvqa overfit "${SURGVQA_ARGS[@]}"'),
        "train": _train_stage(config, project_dir, logs_dir, args, time_note),
        "predict": _simple_stage(
            config, project_dir, logs_dir, args, "predict", "Prediction",
            '# resumable: a rerun continues after the last written batch.\nsurgvqa predict "${SURGVQA_ARGS[@]}"'),
        "evaluate": _simple_stage(
            config, project_dir, logs_dir, args, "evaluate", "Evaluation",
            '# per-type metrics, tables, plots and report.html in the run directory.\n'
            'surgvqa evaluate "${SURGVQA_ARGS[@]}"'),
    }
    written = []
    for file_name, stage in STAGES:
        path = scripts_dir / file_name
        _write_executable(path, bodies[stage])
        written.append(path)
    run_all = scripts_dir / RUN_ALL
    _write_executable(run_all, _run_all(config, project_dir, scripts_dir, logs_dir))
    written.append(run_all)
    return written


def submit(scripts_dir: Path) -> str:
    """Run RUN_ALL.sh (needs ``sbatch`` on PATH); returns what it printed (one ``stage: job id`` per line)."""
    script = Path(scripts_dir) / RUN_ALL
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: render the scripts first (`surgvqa slurm`)")
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {result.returncode}): {result.stderr.strip() or result.stdout}")
    return result.stdout
