"""Fault injection: `surgvqa run` killed at seeded points of every stage, rerun until it completes, ends with the
predictions and metrics of an uninterrupted run, with no id lost or duplicated.

Each kill is a real SIGKILL (or SIGINT) sent by the process to itself at a failpoint (``surgvqa.core.faults``), so no
cleanup code runs: what survives is what was on disk at that instant.
"""

import json
import random
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)

MAX_STEPS, SAVE_STEPS = 6, 2  # the small run of conftest.py: 6 training steps, a checkpoint every 2


def _kill_points(seed: int) -> list[tuple[str, int]]:
    """(failpoint, expected exit code) in pipeline order, the hit of each drawn from a seeded generator."""
    rng = random.Random(seed)
    return [
        (f"prepare/io.write:{rng.randint(1, 5)}", -signal.SIGKILL),  # prepared.partial half written
        (f"train/train.step:{rng.randint(1, SAVE_STEPS)}", -signal.SIGKILL),  # before the first checkpoint
        (f"train/train.step:{rng.randint(SAVE_STEPS + 1, MAX_STEPS - 1)}", -signal.SIGKILL),  # resumes from one
        ("train/train.checkpoint:1", -signal.SIGKILL),  # killed while saving a checkpoint
        ("train/train.step:1:INT", 130),  # Ctrl-C: a checkpoint is saved, the rerun continues
        (f"baseline/predict.append:{rng.randint(1, 3)}", -signal.SIGKILL),  # a torn predictions line
        (f"predict/predict.append:{rng.randint(1, 3)}", -signal.SIGKILL),
        (f"evaluate/io.write:{rng.randint(1, 4)}", -signal.SIGKILL),  # between metrics.json and the report
    ]


def _comparable_metrics(path: Path, run_dir: Path) -> dict:
    """metrics.json without what differs between two run folders by nature: paths and timings."""
    text = path.read_text(encoding="utf-8").replace(str(run_dir.resolve()), "<run>").replace(str(run_dir), "<run>")
    metrics = json.loads(text)
    metrics.pop("outputs", None)
    return metrics


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_run_killed_in_every_stage_ends_as_an_uninterrupted_run(small_run, small_run_command, tmp_path):
    reference = small_run
    assert (small_run_command.steps, small_run_command.save_steps) == (MAX_STEPS, SAVE_STEPS)
    stderr_after: dict[str, str] = {}  # failpoint -> what the next run printed
    previous = None
    for point, expected in _kill_points(seed=13):
        result = small_run_command(tmp_path, point)
        place, hit = point.split(":")[:2]
        assert result.returncode == expected, (point, result.returncode, result.stderr[-3000:])
        assert f"failpoint {place} (hit {hit})" in result.stderr, result.stderr[-3000:]
        if previous is not None:
            stderr_after[previous] = result.stderr
        previous = point
    final = small_run_command(tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    stderr_after[previous] = final.stderr
    run_dir = tmp_path / "small"

    points = [point for point, _ in _kill_points(seed=13)]
    # Killed at the end of step k, before that step's checkpoint: continued from the last one saved before it.
    killed_at = int(points[2].split(":")[1])
    saved = (killed_at - 1) // SAVE_STEPS * SAVE_STEPS
    assert f"continuing training from {tmp_path}/small/checkpoints/checkpoint-{saved} (step {saved})" \
        in stderr_after[points[2]]
    # Killed while saving the next checkpoint: the half-written one is skipped in favour of the one before.
    after_half_save = stderr_after[points[3]]
    assert f"checkpoint-{saved + SAVE_STEPS} was not completely saved" in after_half_save
    assert f"checkpoint-{saved} (step {saved})" in after_half_save
    # Ctrl-C at the end of the next step saved a checkpoint there, and the rerun went on from it.
    assert f"checkpoint-{saved + 1} (step {saved + 1})" in stderr_after[points[4]]

    for name in ("predictions.jsonl", "predictions.untrained.jsonl"):
        rows, expected_rows = _rows(run_dir / name), _rows(reference / name)
        ids = [row["id"] for row in rows]
        assert len(ids) == len(set(ids)), f"{name}: duplicated ids"
        assert ids == [row["id"] for row in expected_rows], f"{name}: ids missing or out of order"
        assert rows == expected_rows, name
    assert _comparable_metrics(run_dir / "metrics.json", run_dir) == \
        _comparable_metrics(reference / "metrics.json", reference)
    # Training continued from its checkpoints: one history, each step once, ending at MAX_STEPS.
    history = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in history if "loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == MAX_STEPS
    assert not list(run_dir.rglob(".*.tmp")) and not list(run_dir.glob("*.partial"))  # nothing half-written left
    resumed = [row["checkpoint"] for row in history if row.get("event") == "resumed"]
    assert resumed == [f"checkpoint-{saved}", f"checkpoint-{saved}", f"checkpoint-{saved + 1}"]
