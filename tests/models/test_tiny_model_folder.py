"""`make-tiny-model OUT` into a folder that already exists: the same tiny model is kept, a tiny model built with
other settings is rebuilt and said so, and a folder holding anything else is left as it is unless --force."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surgvqa.cli import app
from surgvqa.models import tiny
from surgvqa.models.tiny import OccupiedFolderError, build_tiny_model, tiny_model_settings


def model_type(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["model_type"]


def make_tiny_model(*args: str):
    return CliRunner().invoke(app, ["make-tiny-model", *args])


def assert_no_temporary_left(parent: Path) -> None:
    assert not [path.name for path in parent.iterdir() if path.name.startswith(".")]


def test_tiny_model_with_other_settings_is_rebuilt_and_said_so(tmp_path):
    out = tmp_path / "model"
    assert make_tiny_model(str(out)).exit_code == 0
    assert model_type(out) == "qwen2_vl"
    result = make_tiny_model(str(out), "--arch", "qwen2_5_vl", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert model_type(out) == "qwen2_5_vl"
    assert tiny_model_settings(out).startswith("qwen2_5_vl seed=3 ")
    assert f"tiny qwen2_5_vl model written to {out}, replacing the tiny model built there with other settings " \
           "(qwen2_vl seed=0 " in result.stdout
    assert_no_temporary_left(tmp_path)


def test_tiny_model_with_the_same_settings_is_kept(tmp_path):
    out = build_tiny_model(tmp_path / "model", seed=1)
    weights = (out / "model.safetensors").stat()
    result = make_tiny_model(str(out), "--seed", "1", "--max-pixels", str(224 * 224))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"tiny qwen2_vl model with these settings already in {out}: kept\n"
    assert (out / "model.safetensors").stat().st_mtime_ns == weights.st_mtime_ns
    assert_no_temporary_left(tmp_path)


def test_folder_holding_other_files_is_refused_and_kept(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("three weeks of notes\n")
    (out / "weights").mkdir()
    result = make_tiny_model(str(out))
    assert result.exit_code == 2
    assert result.output == (f"error: {out} is not empty and holds no tiny model (notes.txt, weights); choose a new "
                             "or empty folder, or pass --force to replace the folder and everything in it\n")
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt", "weights"]
    assert (out / "notes.txt").read_text() == "three weeks of notes\n"
    assert_no_temporary_left(tmp_path)


def test_a_file_is_never_replaced(tmp_path):
    out = tmp_path / "model"
    out.write_text("not a folder\n")
    with pytest.raises(OccupiedFolderError, match=f"^{out} is a file, not a folder$"):
        build_tiny_model(out, force=True)
    assert out.read_text() == "not a folder\n"


def test_force_replaces_a_folder_of_other_files(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("scratch\n")
    result = make_tiny_model(str(out), "--force")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"tiny qwen2_vl model written to {out}\n"
    assert not (out / "notes.txt").exists()
    assert model_type(out) == "qwen2_vl"
    assert_no_temporary_left(tmp_path)


def test_empty_folder_is_filled(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert build_tiny_model(out) == out
    assert model_type(out) == "qwen2_vl"


def test_a_rank_that_finishes_the_same_model_first_is_kept(tmp_path, monkeypatch):
    """Two ranks build the same tiny model at once: the one that renames its copy in first wins, the other
    drops its own copy and uses the finished one."""
    out = tmp_path / "model"
    real_build_model = tiny.build_model
    other_rank_done = []

    def other_rank_finishes_first(*args, **kwargs):
        if not other_rank_done:
            other_rank_done.append(True)
            build_tiny_model(out, seed=0)  # the other rank, between this one's checks and its rename
            (out / "loaded-by-the-other-rank").write_text("")
        return real_build_model(*args, **kwargs)

    monkeypatch.setattr(tiny, "build_model", other_rank_finishes_first)
    assert build_tiny_model(out, seed=0) == out
    assert (out / "loaded-by-the-other-rank").exists()  # not swapped out under the rank that uses it
    assert_no_temporary_left(tmp_path)


def test_a_rank_that_finishes_other_settings_first_is_not_replaced(tmp_path, monkeypatch):
    out = tmp_path / "model"
    real_build_model = tiny.build_model

    def other_rank_finishes_first(*args, **kwargs):
        monkeypatch.setattr(tiny, "build_model", real_build_model)
        build_tiny_model(out, seed=5)
        return real_build_model(*args, **kwargs)

    monkeypatch.setattr(tiny, "build_model", other_rank_finishes_first)
    with pytest.raises(OccupiedFolderError, match=f"^{out}: another process wrote a tiny model with other settings "
                                                  r"\(qwen2_vl seed=5 .*\) there while this one was being built"):
        build_tiny_model(out, seed=0)
    assert tiny_model_settings(out).startswith("qwen2_vl seed=5 ")
    assert_no_temporary_left(tmp_path)
