"""surgvqa replaces and deletes only what it wrote: a run folder it did not make is refused, or adopted with
--force and its files kept byte for byte (issue 29, lost data)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from surgvqa.core import io
from surgvqa.core.run_folder import MARKER, ForeignRunFolder, claim_run_directory

# What the hostile probe of issue 29 found deleted or overwritten by `surgvqa run`.
FOREIGN = {
    "prepared/mydata.csv": b"id,answer\n1,yes\n",
    "model/weights.bin": b"\x00\x01weights",
    "checkpoints/keep.txt": b"keep me\n",
    "predictions.jsonl": b'{"mine": 1}\n',
    "metrics.json": b'{"accuracy": 0.99}\n',
    "report.html": b"<p>my report</p>\n",
    "train_log.jsonl": b'{"step": 1}\n',
    "notes/.hidden.tmp": b"not a surgvqa temporary\n",
}


def _write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def _assert_unchanged(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (root / name).read_bytes() == data, name


@pytest.fixture(autouse=True)
def _no_protection_left(monkeypatch):
    monkeypatch.setattr(io, "_foreign", set())


def test_run_into_a_folder_of_foreign_files_is_refused_and_with_force_keeps_every_file(small_run_command,
                                                                                      tmp_path):
    run_dir = tmp_path / "small"
    _write(run_dir, FOREIGN)
    refused = small_run_command(tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "was not made by surgvqa" in error and "--force" in error
    assert any(name in error for name in FOREIGN)
    _assert_unchanged(run_dir, FOREIGN)
    assert not (run_dir / MARKER).exists()

    forced = small_run_command(tmp_path, extra=("--force",))
    assert forced.returncode == 2, forced.stderr[-2000:]
    error = forced.stderr.strip().splitlines()[-1]
    assert "was not written by surgvqa" in error and "nothing of yours was deleted" in error
    _assert_unchanged(run_dir, FOREIGN)
    # The files in its way moved out, the adopted folder runs, and what was left of the user's stays as it was.
    kept = {name: data for name, data in FOREIGN.items() if name.startswith("notes/")}
    for name in set(FOREIGN) - set(kept):
        os.replace(run_dir / name, tmp_path / name.replace("/", "_"))
    finished = small_run_command(tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert (run_dir / "metrics.json").is_file()
    _assert_unchanged(run_dir, kept)


def test_a_fresh_run_folder_is_marked_and_an_earlier_run_folder_is_its_own(tmp_path):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert claim_run_directory(fresh) == []
    assert (fresh / MARKER).is_file()
    (fresh / "notes.txt").write_text("added later")
    assert claim_run_directory(fresh) == []  # marked: surgvqa's folder
    earlier = tmp_path / "earlier"
    _write(earlier, {"stages.json": b"{}", "predictions.jsonl": b""})
    assert claim_run_directory(earlier) == []  # made by surgvqa before the marker existed


def test_adopted_files_are_never_replaced_or_deleted_by_any_writer(tmp_path):
    run_dir = tmp_path / "run"
    _write(run_dir, FOREIGN)
    with pytest.raises(ForeignRunFolder, match="holds other files"):
        claim_run_directory(run_dir)
    assert sorted(claim_run_directory(run_dir, adopt=True)) == sorted(FOREIGN)
    assert claim_run_directory(run_dir) == sorted(FOREIGN)  # the marker remembers them
    staged = tmp_path / "staged"
    staged.mkdir()
    for attempt in (lambda: io.atomic_write_text(run_dir / "metrics.json", "{}"),
                    lambda: io.append_lines(run_dir / "train_log.jsonl", ["{}\n"]),
                    lambda: io.replace_directory(staged, run_dir / "model"),
                    lambda: io.remove_tree(run_dir / "checkpoints"),
                    lambda: io.remove_file(run_dir / "report.html")):
        with pytest.raises(io.ForeignFileError, match="was not written by surgvqa"):
            attempt()
    assert io.remove_stale_temporaries(run_dir) == 0
    _assert_unchanged(run_dir, FOREIGN)
    io.atomic_write_text(run_dir / "notes.txt", "surgvqa's own")  # elsewhere it writes as before
    assert stat.S_ISREG((run_dir / "notes.txt").stat().st_mode)


def test_evaluate_of_a_users_own_predictions_adopts_the_folder_and_keeps_them(tmp_path):
    """Commands that add single files (evaluate, predict, diagnose) adopt a folder they did not make, its files
    protected: the user's predictions.jsonl is scored where it lies and stays byte for byte; a later `surgvqa run`
    there stops before replacing it."""
    from typer.testing import CliRunner

    from surgvqa.cli import app

    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    mine = "".join(f'{{"id": "q{i}", "img_id": "i{i}", "question": "Is there a polyp?", "answer": "yes", '
                   f'"question_type": "yes_no", "prediction": "{"yes" if i % 2 else "no"}"}}\n' for i in range(6))
    (run_dir / "predictions.jsonl").write_text(mine, encoding="utf-8")
    result = CliRunner().invoke(app, ["evaluate", "--no-report", "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert (run_dir / MARKER).is_file() and (run_dir / "metrics.json").is_file()
    assert (run_dir / "predictions.jsonl").read_text(encoding="utf-8") == mine
    assert claim_run_directory(run_dir) == ["predictions.jsonl"]
