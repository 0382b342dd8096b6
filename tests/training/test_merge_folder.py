"""`merge ADAPTER OUT` replaces OUT whole, so OUT may only be new or empty unless --force; the adapter being merged
(OUT equal to it or above it, as its run directory is) is never replaced, --force or not."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surgvqa.cli import app
from surgvqa.core.config import load_config
from surgvqa.models.loading import load_processor
from surgvqa.training.trainer import build_model_for_training, save_trained


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """An untrained LoRA adapter of the tiny model (merging it is the identity, which is all these tests need)."""
    config = load_config(None, ["lora.r=4", "lora.alpha=8", f"model.name_or_path={tiny_model_dir}"])
    processor = load_processor(str(tiny_model_dir), config.model)
    model = build_model_for_training(config, str(tiny_model_dir), processor)
    return save_trained(model, processor, tmp_path_factory.mktemp("adapter") / "model")


@pytest.fixture
def run_dir(trained_adapter, tmp_path) -> Path:
    """A run directory of its own for each test, holding the adapter as `model/` beside the run's other files."""
    run = tmp_path / "runs" / "exp1"
    shutil.copytree(trained_adapter, run / "model")
    (run / "metrics.json").write_text("{}\n")
    return run


def merge(tiny_model_dir: Path, adapter: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["merge", str(adapter), str(out), "--set", f"model.name_or_path={tiny_model_dir}",
                                    *extra])


def contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_no_temporary_left(parent: Path) -> None:
    assert not [path.name for path in parent.iterdir() if path.name.startswith(".") or path.name.endswith(".partial")]


def test_a_folder_of_other_files_is_refused_and_kept(tiny_model_dir, run_dir, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("three weeks of notes\n")
    result = merge(tiny_model_dir, run_dir / "model", precious)
    assert result.exit_code == 2
    assert result.output == (f"error: {precious} is not empty (it holds notes.txt), and merge replaces its folder "
                             "whole: choose a new or empty folder, or pass --force to replace the folder and "
                             "everything in it\n")
    assert contents(precious) == {"notes.txt": b"three weeks of notes\n"}
    assert_no_temporary_left(tmp_path)


@pytest.mark.parametrize("where", ["the adapter itself", "its run directory"])
def test_the_adapter_being_merged_is_never_replaced_even_with_force(where, tiny_model_dir, run_dir):
    adapter = run_dir / "model"
    out = adapter if where == "the adapter itself" else run_dir
    before = contents(run_dir)
    result = merge(tiny_model_dir, adapter, out, "--force")
    assert result.exit_code == 2
    holds = "is the adapter being merged" if out == adapter else f"holds the adapter being merged ({adapter})"
    assert result.output == (f"error: {out} {holds}, and merge replaces its folder whole: choose another folder\n")
    assert contents(run_dir) == before
    assert_no_temporary_left(run_dir)


def test_the_base_model_is_never_replaced_even_with_force(tiny_model_dir, run_dir, tmp_path):
    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_model_dir, base)
    before = contents(base)
    result = merge(base, run_dir / "model", base.parent, "--force")
    assert result.exit_code == 2
    assert result.output == (f"error: {base.parent} holds the base model ({base}), and merge replaces its folder "
                             "whole: choose another folder\n")
    assert contents(base) == before


def test_the_same_folder_spelled_another_way_is_recognised(tiny_model_dir, run_dir, monkeypatch):
    monkeypatch.chdir(run_dir)
    before = contents(run_dir)
    result = merge(tiny_model_dir, Path("model"), Path("model/../model"), "--force")
    assert result.exit_code == 2 and "is the adapter being merged" in result.output
    assert contents(run_dir) == before


def test_a_file_is_never_replaced(tiny_model_dir, run_dir, tmp_path):
    out = tmp_path / "merged"
    out.write_text("not a folder\n")
    result = merge(tiny_model_dir, run_dir / "model", out, "--force")
    assert result.exit_code == 2
    assert result.output == f"error: {out} is a file: merge writes a folder\n"
    assert out.read_text() == "not a folder\n"


def test_a_new_or_empty_folder_is_written_and_force_replaces_other_files(tiny_model_dir, run_dir, tmp_path):
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        result = merge(tiny_model_dir, run_dir / "model", out)
        assert result.exit_code == 0, result.output
        assert result.stdout == f"merged model written to {out}\n"
        assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_vl"
        assert not (out / "adapter_config.json").exists()  # a plain model, not an adapter

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "notes.txt").write_text("scratch\n")
    result = merge(tiny_model_dir, run_dir / "model", scratch, "--force")
    assert result.exit_code == 0, result.output
    assert not (scratch / "notes.txt").exists() and (scratch / "config.json").is_file()
    assert_no_temporary_left(tmp_path)
