"""Image-grouped training across processes gives the weights of the one-process grouped run.

Each Trainer item of grouped training is a micro-batch of whole images, and the data loader hands items to the
ranks in turn (rank r takes items r, r + world, ...). An optimizer step of W processes with A accumulation steps
therefore holds the same items as a one-process step with W x A accumulation steps, and the loss is normalised
by the step's supervised tokens gathered over the ranks: the weights after each step are the same to rounding.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgvqa.core.config import load_config
from surgvqa.data.records import read_records
from surgvqa.run.slurm import RDZV_PORT, render_slurm
from surgvqa.training.grouping import grouped_accumulation_steps, mean_questions, pack_images

VENV_BIN = Path(sys.executable).parent
QUESTIONS_PER_MICRO_BATCH = 10  # one demo image (7 to 10 questions) or a few one-question ones per item
PROCESSES = 2
# fp32 weights after 3 AdamW steps at lr 1e-3. The runs differ only in the order in which gradient sums are added
# (gloo's all-reduce against one process's accumulation), about 1e-7 relative; AdamW turns that into weight
# changes far below its lr-sized moves (measured: 9.3e-7). A step that trained other questions (a wrong shard, a
# missed all-reduce) moves weights by about lr (measured: 4.0e-3 between grad_accum 1 and 2 in one process).
WEIGHT_TOLERANCE = 1e-5
COMMON = ["train.group_by_image=true", "train.max_steps=3", "train.lr=1e-3", "train.warmup_ratio=0",
          "train.logging_steps=1", "train.save_steps=1000", f"train.per_device_batch_size={QUESTIONS_PER_MICRO_BATCH}"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _copy_prepared(demo_config_overrides, prepared_demo, run_name) -> Path:
    config = load_config(None, [*demo_config_overrides, f"run_name={run_name}"])
    shutil.copytree(prepared_demo, config.run_dir / "prepared", dirs_exist_ok=True)
    return config.run_dir


def _set(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    (weights,) = (run_dir / "model").glob("*.safetensors")  # the demo trains every weight: one shard
    return load_file(weights)


def max_weight_difference(left: Path, right: Path) -> float:
    a, b = _weights(left), _weights(right)
    assert a.keys() == b.keys()
    return max(float((a[name].float() - b[name].float()).abs().max()) for name in a)


def _steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return sorted(row["step"] for row in rows if "loss" in row)


@pytest.fixture(scope="module")
def accumulation(prepared_demo) -> int:
    """The per-rank accumulation steps of the W-process runs (grad_accum=1): the one-process run takes W times as
    many, which holds only where rounding gives exactly that; checked here rather than assumed."""
    counts = list(Counter((record.img_id, record.image)
                          for record in read_records(prepared_demo / "train.jsonl")).values())
    per_item = mean_questions(pack_images(counts, QUESTIONS_PER_MICRO_BATCH, seed=42), counts)
    per_rank = grouped_accumulation_steps(per_item, QUESTIONS_PER_MICRO_BATCH, 1)
    assert grouped_accumulation_steps(per_item, QUESTIONS_PER_MICRO_BATCH, PROCESSES) == PROCESSES * per_rank
    return per_rank


@pytest.fixture(scope="module")
def one_process_run(demo_config_overrides, prepared_demo) -> Path:
    run_dir = _copy_prepared(demo_config_overrides, prepared_demo, "grouped-one")
    command = [sys.executable, "-m", "surgvqa", "train",
               *_set([*demo_config_overrides, "run_name=grouped-one", f"train.grad_accum={PROCESSES}", *COMMON])]
    completed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert _steps(run_dir) == [1, 2, 3]
    return run_dir


def test_two_process_gloo_grouped_training_gives_the_one_process_weights(
        demo_config_overrides, prepared_demo, accumulation, one_process_run):
    run_dir = _copy_prepared(demo_config_overrides, prepared_demo, "grouped-ddp")
    command = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(PROCESSES), "--master_port", str(_free_port()),
               "-m", "surgvqa", "train", *_set([*demo_config_overrides, "run_name=grouped-ddp", "train.grad_accum=1",
                                                 *COMMON])]
    completed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert _steps(run_dir) == [1, 2, 3]  # three optimizer steps, each over both ranks' items
    difference = max_weight_difference(one_process_run, run_dir)
    print(f"two-process gloo grouped: max |weight difference| {difference:.3g}")
    assert difference <= WEIGHT_TOLERANCE


FAKE_SRUN = """\
#!/bin/bash
# srun on a 2-node allocation with --ntasks-per-node=1: one copy of the command per node, node ids 0 and 1.
pids=()
for node in 0 1; do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """\
#!/bin/bash
# `scontrol show hostnames LIST`: both "nodes" are this machine.
[[ "$1 $2" == "show hostnames" ]] && { echo 127.0.0.1; exit 0; }
echo "scontrol $* is not simulated" >&2
exit 1
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def test_two_node_launch_as_the_slurm_script_renders_it_gives_the_one_process_weights(
        demo_config_overrides, prepared_demo, accumulation, one_process_run, tmp_path, monkeypatch):
    """The rendered 03_train.sbatch, run by bash as SLURM would run it on the first node of two: its srun starts
    one torchrun launcher per node (`--nnodes 2 --nproc_per_node 1`, c10d rendezvous on the first node's address),
    here both on this machine with 127.0.0.1 as that address and a free port for the rendered one."""
    run_dir = _copy_prepared(demo_config_overrides, prepared_demo, "grouped-nodes")
    overrides = [*demo_config_overrides, "run_name=grouped-nodes", "train.grad_accum=1", *COMMON,
                 "slurm.nodes=2", "slurm.gpus=1", "slurm.env_setup=true"]
    monkeypatch.chdir(tmp_path)  # the script cd's into the folder `surgvqa slurm` ran in
    config = load_config(None, overrides)
    scripts = {path.name: path for path in render_slurm(config, None, overrides, out_dir=tmp_path / "slurm")}
    script = scripts["03_train.sbatch"].read_text()
    assert "srun torchrun --nnodes \"$SLURM_NNODES\" --nproc_per_node 1" in script
    endpoint = f'--rdzv_endpoint "$MASTER_ADDR:{RDZV_PORT}"'
    assert script.count(endpoint) == 1
    scripts["03_train.sbatch"].write_text(script.replace(endpoint, f'--rdzv_endpoint "$MASTER_ADDR:{_free_port()}"'))

    shims = tmp_path / "bin"
    shims.mkdir()
    _executable(shims / "srun", FAKE_SRUN)
    _executable(shims / "scontrol", FAKE_SCONTROL)
    _executable(shims / "surgvqa", f'#!/bin/bash\nexec {sys.executable} -m surgvqa "$@"\n')
    env = {**_env(), "PATH": f"{shims}:{VENV_BIN}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_CPUS_PER_TASK": "1"}
    completed = subprocess.run(["bash", str(scripts["03_train.sbatch"])], env=env, capture_output=True, text=True,
                               timeout=420, check=False)
    assert completed.returncode == 0, textwrap.shorten(completed.stdout, 2000) + completed.stderr[-4000:]
    assert _steps(run_dir) == [1, 2, 3]
    difference = max_weight_difference(one_process_run, run_dir)
    print(f"two-node launch: max |weight difference| {difference:.3g}")
    assert difference <= WEIGHT_TOLERANCE
