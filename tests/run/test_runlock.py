"""One writer per run directory: a second surgvqa process is refused at once; a dead holder never blocks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surgvqa.cli import app
from surgvqa.core.run_folder import MARKER
from surgvqa.run.runlock import LOCK_FILE, RunDirectoryBusy, run_directory_lock

SURGVQA = Path(sys.executable).parent / "surgvqa"

HOLDER = """
import sys, time
from surgvqa.run.runlock import run_directory_lock
with run_directory_lock(sys.argv[1], command="surgvqa run"):
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills this process)
"""


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_process_on_a_held_run_directory_is_refused_at_once(tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    holder = _hold_lock(run_dir)
    try:
        started = time.monotonic()
        result = subprocess.run([str(SURGVQA), "prepare", "--set", f"output_dir={tmp_path / 'runs'}"],
                                capture_output=True, text=True, timeout=60, check=False)
        elapsed = time.monotonic() - started
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"error: {run_dir} is in use by another surgvqa process (pid {holder.pid}, "
                             "`surgvqa run`); wait for it or use another run_name\n")
    assert elapsed < 15
    # Refused before anything was written: not even the resolved config (the holder made the lock and the marker).
    assert sorted(path.name for path in run_dir.iterdir()) == [LOCK_FILE, MARKER]


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    holder.send_signal(signal.SIGKILL)  # no cleanup runs: the lock file stays, naming the dead process
    holder.wait(timeout=10)
    holder.stdin.close()
    assert str(holder.pid) in (run_dir / LOCK_FILE).read_text()
    with run_directory_lock(run_dir, command="surgvqa train") as lock_path:
        assert f'"pid": {os.getpid()}' in lock_path.read_text()


def test_lock_is_exclusive_within_one_process_too_and_released_after(tmp_path):
    with run_directory_lock(tmp_path, command="surgvqa train"), \
            pytest.raises(RunDirectoryBusy, match=r"pid \d+, `surgvqa train`"), run_directory_lock(tmp_path):
        pass
    with run_directory_lock(tmp_path):
        pass


def test_writing_commands_take_the_lock_and_read_only_ones_do_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    with run_directory_lock(runs / "demo", command="surgvqa train"):
        refused = CliRunner().invoke(app, ["slurm", "--set", f"output_dir={runs}"])
        assert refused.exit_code == 1
        assert "is in use by another surgvqa process" in refused.output
        assert not (runs / "demo" / "slurm").exists()
    written = CliRunner().invoke(app, ["slurm", "--set", f"output_dir={runs}"])
    assert written.exit_code == 0, written.output
    assert (runs / "demo" / "slurm" / "RUN_ALL.sh").is_file()
    # The command released the lock when it ended.
    with run_directory_lock(runs / "demo"):
        pass


def test_only_the_commands_that_make_the_runs_data_and_model_record_its_resolved_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = ["--set", f"output_dir={tmp_path / 'runs'}", "--set", f"cache_dir={tmp_path / 'cache'}"]
    resolved = tmp_path / "runs" / "demo" / "config.resolved.yaml"
    assert CliRunner().invoke(app, ["prepare", *settings]).exit_code == 0
    recorded = resolved.read_text(encoding="utf-8")
    assert "strategy: span" in recorded
    # Trying other settings in a command that only reads the run's data leaves the record as it was.
    tried = CliRunner().invoke(app, ["slurm", *settings, "--set", "masking.strategy=sentinel"])
    assert tried.exit_code == 0, tried.output
    assert resolved.read_text(encoding="utf-8") == recorded
    again = CliRunner().invoke(app, ["prepare", *settings, "--set", "data.split.seed=7"])
    assert again.exit_code == 0, again.output
    assert "seed: 7" in resolved.read_text(encoding="utf-8")
