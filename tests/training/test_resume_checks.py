"""`train --resume` continues only checkpoints made with the current settings and training split (SLURM's training
script always passes --resume, so an edited config must not silently continue the old run), may raise the length
to train longer, and trains nothing when the checkpoint is already at the last step."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgvqa.core.config import load_config
from surgvqa.core.io import WriteError
from surgvqa.training import trainer as training

VENV_BIN = Path(sys.executable).parent
# LoRA on the tiny model, 4 steps with a checkpoint every 2, at a constant rate: a step too many changes the weights.
SETTINGS = ["train.per_device_batch_size=8", "train.grad_accum=1", "train.logging_steps=1", "train.lr=1e-3",
            "train.lr_scheduler=constant", "train.max_steps=4", "train.save_steps=2", "lora.r=4", "lora.alpha=8"]


def train_command(overrides: list[str], *extra: str) -> list[str]:
    command = [str(VENV_BIN / "python"), "-m", "surgvqa", "train", *extra]
    for override in overrides:
        command += ["--set", override]
    return command


def run_train(overrides: list[str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(overrides, *extra), capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})


def json_result(completed: subprocess.CompletedProcess) -> dict:
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout[completed.stdout.rindex("{\n"):])  # after the trainer's own log lines


def contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def logged_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [row["step"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def finished_run(demo_config_overrides, prepared_demo) -> tuple[Path, dict]:
    """A training that ran to its last step (checkpoint-4, model/ saved), and its `--json` result."""
    config = load_config(None, [*demo_config_overrides, "run_name=finished"])
    shutil.copytree(prepared_demo, config.run_dir / "prepared")
    result = json_result(run_train([*demo_config_overrides, "run_name=finished", *SETTINGS], "--json"))
    assert result["global_step"] == 4
    return config.run_dir, result


@pytest.fixture
def copy_of_finished_run(finished_run, demo_config_overrides, request):
    """A copy of the finished run under a name of its own, and the overrides that select it."""
    run_dir, _ = finished_run
    name = "copy-" + request.node.name.replace("[", "-").replace("]", "").replace(" ", "-")
    shutil.copytree(run_dir, run_dir.parent / name)
    return run_dir.parent / name, [*demo_config_overrides, f"run_name={name}", *SETTINGS]


REFUSED = [
    (["train.lr=0.5", "train.epochs=3"], "train.epochs 8 → 3, train.lr 0.001 → 0.5"),
    (["lora.r=8"], "lora.r 4 → 8"),
    (["lora=null"], 'lora {"r": 4, "alpha": 8, "dropout": 0.05, "… → null'),
    (["train.max_steps=3"], "train.max_steps 4 → 3"),  # lowered: only a longer training continues
    (["prompt.system=Answer."], "prompt.system null → Answer."),  # null: the task's own system prompt
]


@pytest.mark.parametrize(("changes", "said"), REFUSED, ids=[" ".join(changes) for changes, _ in REFUSED])
def test_resume_with_settings_that_change_the_training_is_refused_naming_them(changes, said, finished_run,
                                                                              demo_config_overrides):
    run_dir, _ = finished_run
    before = contents(run_dir / "checkpoints"), contents(run_dir / "model"), logged_steps(run_dir)
    refused = run_train([*demo_config_overrides, "run_name=finished", *SETTINGS, *changes], "--resume")
    assert refused.returncode == 2
    assert refused.stderr == (f"error: {run_dir / 'checkpoints'} were made with other settings ({said}): remove the "
                              "folder to start afresh, or resume with the settings they were made with\n")
    assert (contents(run_dir / "checkpoints"), contents(run_dir / "model"), logged_steps(run_dir)) == before


def test_a_refused_resume_stops_before_loading_the_model(finished_run, demo_config_overrides, monkeypatch):
    run_dir, _ = finished_run

    def load_for_training(_config):
        raise AssertionError("the model was loaded before the checkpoints were checked")

    monkeypatch.setattr(training, "load_for_training", load_for_training)
    config = load_config(None, [*demo_config_overrides, "run_name=finished", *SETTINGS, "train.lr=0.5"])
    with pytest.raises(ValueError, match=re.escape(f"{run_dir / 'checkpoints'} were made with other settings "
                                                   "(train.lr 0.001 → 0.5)")):
        training.train(config, resume=True)


def test_another_training_split_is_refused_and_the_same_one_prepared_again_is_not(copy_of_finished_run):
    run_dir, overrides = copy_of_finished_run
    split = run_dir / "prepared" / "train.jsonl"
    original = split.read_text()
    split.write_text("".join(original.splitlines(keepends=True)[:-1]))  # one question fewer
    refused = run_train(overrides, "--resume")
    assert refused.returncode == 2
    assert "were made with other settings (prepared/train.jsonl changed): remove the folder" in refused.stderr

    split.write_text(original)  # the same content, written again (a new modification time)
    assert json_result(run_train(overrides, "--resume", "--json"))["global_step"] == 4


def test_bookkeeping_settings_may_change_on_resume(copy_of_finished_run):
    run_dir, overrides = copy_of_finished_run
    bookkeeping = ["train.save_steps=3", "train.logging_steps=2", "train.save_total_limit=5",
                   "model.gradient_checkpointing=true"]
    resumed = run_train([*overrides, *bookkeeping], "--resume", "--json")
    assert json_result(resumed)["global_step"] == 4
    assert sorted(path.name for path in (run_dir / "checkpoints").glob("checkpoint-*")) == \
        ["checkpoint-2", "checkpoint-4"]


def test_a_save_interval_lowered_on_resume_applies_to_the_resumed_steps(copy_of_finished_run):
    run_dir, overrides = copy_of_finished_run
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")  # killed after step 3: checkpoint-2 is the latest
    resumed = run_train([*overrides, "train.save_steps=1", "train.save_total_limit=5"], "--resume", "--json")
    assert json_result(resumed)["global_step"] == 4
    assert sorted(path.name for path in (run_dir / "checkpoints").glob("checkpoint-*")) == \
        ["checkpoint-2", "checkpoint-3", "checkpoint-4"]


def test_raising_max_steps_continues_to_the_new_length_and_says_the_schedule_is_recomputed(copy_of_finished_run):
    run_dir, overrides = copy_of_finished_run
    before = json.loads((run_dir / "train_log.jsonl").read_text().splitlines()[0])
    longer = run_train([*overrides, "train.max_steps=6"], "--resume", "--json")
    assert json_result(longer)["global_step"] == 6
    assert ("train.max_steps raised (4 → 6): training continues from step 4 to the new length, with the "
            "learning-rate schedule (constant) recomputed for it") in longer.stderr
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "train_log.jsonl").read_text().splitlines()[0]) == before
    assert sorted(path.name for path in (run_dir / "checkpoints").glob("checkpoint-*")) == \
        ["checkpoint-4", "checkpoint-6"]
    made_with = json.loads((run_dir / "checkpoints" / "made_with.json").read_text())
    assert made_with["settings"]["train"]["max_steps"] == 6  # the record follows the longer training

    back = run_train(overrides, "--resume")  # back to 4 steps: checkpoint-6 is past it
    assert back.returncode == 2 and "(train.max_steps 6 → 4)" in back.stderr


def test_checkpoints_without_a_record_resume_as_before(copy_of_finished_run):
    run_dir, overrides = copy_of_finished_run
    (run_dir / "checkpoints" / "made_with.json").unlink()  # as checkpoints of an earlier version
    resumed = run_train([*overrides, "train.lr=5e-4", "train.max_steps=5"], "--resume", "--json")
    assert json_result(resumed)["global_step"] == 5
    assert not (run_dir / "checkpoints" / "made_with.json").exists()  # nothing vouches for unrecorded settings


def test_resuming_a_finished_training_trains_no_step_and_keeps_the_model(copy_of_finished_run, finished_run):
    run_dir, overrides = copy_of_finished_run
    _, first = finished_run
    model_before, checkpoints_before = contents(run_dir / "model"), contents(run_dir / "checkpoints")
    mtimes = {path.name: path.stat().st_mtime_ns for path in (run_dir / "model").iterdir()}
    resumed = run_train(overrides, "--resume", "--json")
    result = json_result(resumed)
    assert result["global_step"] == 4
    assert result["final_loss"] == pytest.approx(first["final_loss"], rel=1e-5)  # the training's, not a 5th step's
    assert f"training already finished: {run_dir / 'checkpoints' / 'checkpoint-4'} is at step 4 of 4; no step " \
           f"trained, {run_dir / 'model'} kept as it was" in resumed.stderr
    assert contents(run_dir / "checkpoints") == checkpoints_before  # no checkpoint-5
    assert contents(run_dir / "model") == model_before
    # The predictions made with model/ are fingerprinted by its files' times: they must stay valid.
    assert {path.name: path.stat().st_mtime_ns for path in (run_dir / "model").iterdir()} == mtimes
    assert logged_steps(run_dir) == [1, 2, 3, 4]


def test_a_finished_training_whose_model_was_not_saved_saves_it_from_the_last_checkpoint(copy_of_finished_run):
    run_dir, overrides = copy_of_finished_run
    final = load_file(run_dir / "model" / "adapter_model.safetensors")
    shutil.rmtree(run_dir / "model")  # killed between the last checkpoint and saving model/
    resumed = run_train(overrides, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"no step trained, {run_dir / 'model'} saved from it" in resumed.stderr
    assert not (run_dir / "checkpoints" / "checkpoint-5").exists()
    saved = load_file(run_dir / "model" / "adapter_model.safetensors")
    assert saved.keys() == final.keys()
    assert all(torch.equal(saved[name], final[name]) for name in final)


def test_a_fresh_training_replaces_the_checkpoints_of_an_earlier_one(copy_of_finished_run):
    run_dir, overrides = copy_of_finished_run
    fresh = run_train([*overrides, "train.max_steps=2", "train.lr=5e-4"])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    # checkpoint-4 of the earlier training would be resumed under the new record (and outrank the new ones).
    assert sorted(path.name for path in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    made_with = json.loads((run_dir / "checkpoints" / "made_with.json").read_text())
    assert made_with["settings"]["train"]["lr"] == 5e-4
    resumed = run_train([*overrides, "train.max_steps=2", "train.lr=5e-4"], "--resume", "--json")
    assert json_result(resumed)["global_step"] == 2


def test_a_fresh_training_over_an_unfinished_ones_checkpoints_is_refused_unless_restarted(copy_of_finished_run):
    run_dir, overrides = copy_of_finished_run
    shutil.rmtree(run_dir / "model")  # killed after its last checkpoint: the checkpoints are the only copy
    before = contents(run_dir / "checkpoints")
    refused = run_train([*overrides, "train.lr=5e-4"])
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"error: {run_dir / 'checkpoints'} holds an unfinished training (checkpoint-4): "
                                      "continue it with --resume, or start afresh with --restart, which deletes its "
                                      "checkpoints")
    assert contents(run_dir / "checkpoints") == before
    restarted = run_train([*overrides, "train.max_steps=2", "train.lr=5e-4"], "--restart")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert sorted(path.name for path in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_kill_while_old_checkpoints_are_deleted_leaves_none_of_them_to_resume(tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "checkpoint-4").mkdir(parents=True)
    (checkpoints / "checkpoint-4" / "trainer_state.json").write_text("{}")  # an earlier training's, no record
    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        if Path(path).exists():
            raise KeyboardInterrupt("killed part-way through deleting the old checkpoints")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(training.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        training.start_checkpoints(checkpoints, {"settings": {}, "training_split_sha256": "x"})
    monkeypatch.undo()
    # Whatever is left of the old ones is outside the folder --resume reads, which holds the new record only.
    assert sorted(path.name for path in checkpoints.iterdir()) == ["made_with.json"]
    training.start_checkpoints(checkpoints, {"settings": {}, "training_split_sha256": "x"})  # the rerun
    assert not checkpoints.with_name("checkpoints.discarded").exists()


def test_an_incomplete_checkpoint_left_by_a_killed_rotation_is_removed_at_the_next_run(tmp_path):
    """HF deletes the checkpoints beyond save_total_limit after saving the last one; a kill while it deletes one
    leaves a folder without its weights (issue 29, junk). The next resume removes it and keeps the complete ones."""
    folder = tmp_path / "checkpoints"

    def checkpoint(step: int, weights: bool) -> Path:
        path = folder / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}), encoding="utf-8")
        if weights:
            save_file({"weight": torch.zeros(2)}, path / "adapter_model.safetensors")
        return path

    half_deleted, kept, last = checkpoint(2, weights=False), checkpoint(4, True), checkpoint(6, True)
    assert training.latest_complete_checkpoint(folder) == str(last)
    assert half_deleted.is_dir()  # looking is not cleaning
    assert training.latest_complete_checkpoint(folder, discard_incomplete=True) == str(last)
    assert not half_deleted.exists() and kept.is_dir() and last.is_dir()


def _cut_in_half(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # as a full disk or a copy cut short leaves it


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt"])
def test_a_damaged_file_in_the_latest_checkpoint_falls_back_to_the_one_before_naming_it(tmp_path, damaged, caplog):
    folder = tmp_path / "checkpoints"
    for step in (2, 4):
        path = folder / f"checkpoint-{step}"
        path.mkdir(parents=True)
        save_file({"weight": torch.full((8,), float(step))}, path / "adapter_model.safetensors")
        torch.save({"state": {0: {"exp_avg": torch.zeros(8)}}}, path / "optimizer.pt")
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}), encoding="utf-8")
    _cut_in_half(folder / "checkpoint-4" / damaged)

    assert training.latest_complete_checkpoint(folder) == str(folder / "checkpoint-2")  # looking deletes nothing
    assert (folder / "checkpoint-4").is_dir()
    with caplog.at_level("WARNING", logger=training.log.name):
        assert training.latest_complete_checkpoint(folder, discard_incomplete=True) == str(folder / "checkpoint-2")
    assert not (folder / "checkpoint-4").exists()  # the resumed run saves its own checkpoint-4
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 1
    assert said[0].startswith(f"{folder / 'checkpoint-4' / damaged} is damaged (")
    assert said[0].endswith(f": its checkpoint was removed; resuming from {folder / 'checkpoint-2'}")


def test_a_resume_whose_latest_checkpoint_is_truncated_continues_from_the_intact_one(copy_of_finished_run):
    run_dir, overrides = copy_of_finished_run
    shutil.rmtree(run_dir / "model")  # killed after its last checkpoint, which a full disk cut short
    _cut_in_half(run_dir / "checkpoints" / "checkpoint-4" / "optimizer.pt")
    resumed = run_train(overrides, "--resume", "--json")
    assert json_result(resumed)["global_step"] == 4
    damaged = run_dir / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    assert f"{damaged} is damaged (BadZipFile: File is not a zip file): its checkpoint was removed; resuming from " \
           f"{run_dir / 'checkpoints' / 'checkpoint-2'}" in resumed.stderr
    assert f"continuing training from {run_dir / 'checkpoints' / 'checkpoint-2'} (step 2)" in resumed.stderr
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    resumed_again = run_train(overrides, "--resume")  # the new checkpoint-4 is intact
    assert resumed_again.returncode == 0 and "is damaged" not in resumed_again.stderr


def test_a_full_disk_while_saving_a_checkpoint_names_it_and_gives_its_space_back(tmp_path, monkeypatch):
    from transformers import Trainer

    checkpoints = tmp_path / "checkpoints"
    half = checkpoints / "checkpoint-6"

    def save_until_the_disk_is_full(self, model, trial):
        half.mkdir(parents=True)
        save_file({"weight": torch.zeros(8)}, half / "adapter_model.safetensors")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # optimizer.pt

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_until_the_disk_is_full)
    trainer = training.SupervisedOnlyTrainer.__new__(training.SupervisedOnlyTrainer)
    trainer.args, trainer.state = argparse.Namespace(output_dir=str(checkpoints)), argparse.Namespace(global_step=6)
    with pytest.raises(WriteError) as caught:
        trainer._save_checkpoint(None, None)
    assert str(caught.value).startswith(f"disk full while writing {half} (")
    assert str(caught.value).endswith("free now): free space on its disk, or point output_dir at another, and rerun "
                                      "the same command")
    assert not half.exists()  # its space given back; the checkpoint before it is what the rerun resumes
