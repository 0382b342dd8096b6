"""Crash-safe writes: a kill between the two renames of a directory swap, a full disk (a file-size limit) while
writing a file, appending predictions or writing the report. The old content always survives, complete."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from surgvqa.core.faults import ENVIRONMENT_VARIABLE
from surgvqa.core.io import append_lines, recover_directory, replace_directory

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, *, failpoint: str | None = None, file_size_limit: int | None = None,
            args: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop(ENVIRONMENT_VARIABLE, None)
    if failpoint:
        env[ENVIRONMENT_VARIABLE] = failpoint

    def limit() -> None:  # the kernel's answer to a full disk, for this process alone (EFBIG like ENOSPC)
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    command = [sys.executable, *(args or ["-c", code])]
    return subprocess.run(command, env=env, preexec_fn=limit, capture_output=True, text=True, timeout=300,
                          check=False)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_kill_between_the_two_renames_of_a_directory_swap_leaves_the_old_directory(tmp_path):
    target, staged = tmp_path / "prepared", tmp_path / "prepared.partial"
    for folder, text in ((target, "old"), (staged, "new")):
        folder.mkdir()
        (folder / "train.jsonl").write_text(text * 100)
    swap = f"from surgvqa.core.io import replace_directory; replace_directory({str(staged)!r}, {str(target)!r})"
    result = _python(swap, failpoint="io.replace_directory:1")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not target.exists()  # the instant between the renames
    assert recover_directory(target)
    assert (target / "train.jsonl").read_text() == "old" * 100
    replace_directory(staged, target)
    assert (target / "train.jsonl").read_text() == "new" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_a_kill_before_the_rename_of_a_file_leaves_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"old": true}\n')
    write = f"from surgvqa.core.io import atomic_write_json; atomic_write_json({str(path)!r}, {{'new': 1}})"
    result = _python(write, failpoint="io.write:1")
    assert result.returncode == -signal.SIGKILL
    assert json.loads(path.read_text()) == {"old": True}


def test_a_full_disk_while_writing_a_file_is_one_clear_error_and_the_old_file_stays(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"old": true}\n')
    code = ("from surgvqa.core.io import atomic_write_text, WriteError\n"
            f"try:\n    atomic_write_text({str(path)!r}, 'x' * 100000)\n"
            "except WriteError as exc:\n    print(exc)\n")
    result = _python(code, file_size_limit=4096)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"cannot write {path}: no space left or file-size limit reached; its previous "
                                     f"content is unchanged")
    assert path.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_a_full_disk_while_appending_cuts_the_partial_lines_back_off(tmp_path):
    path = tmp_path / "predictions.jsonl"
    append_lines(path, ['{"id": "a"}\n', '{"id": "b"}\n'])
    before = path.read_bytes()
    code = ("from surgvqa.core.io import append_lines, WriteError\n"
            f"try:\n    append_lines({str(path)!r}, ['{{\"id\": \"c\", \"x\": \"' + 'y' * 9000 + '\"}}\\n'])\n"
            "except WriteError as exc:\n    print(exc)\n")
    result = _python(code, file_size_limit=4096)
    assert "no space left or file-size limit reached" in result.stdout, result.stderr
    assert path.read_bytes() == before


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory) -> Path:
    """A predictions file and a first report made without limits."""
    folder = tmp_path_factory.mktemp("evaluate")
    rows = [{"id": f"r{i}", "question": "Is there text?", "question_type": "yes_no", "template": 1,
             "answer": "yes" if i % 2 else "no", "prediction": "yes", "error": None} for i in range(40)]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = _python("", args=["-m", "surgvqa", "evaluate", "--predictions", str(folder / "predictions.jsonl"),
                               "--out", str(folder), "--set", f"output_dir={folder}"])
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


def test_a_full_disk_while_writing_the_report_is_one_clear_error_and_the_old_report_stays(scored_run):
    report = scored_run / "report.html"
    before = report.read_bytes()
    others = max(len(p.read_bytes()) for p in scored_run.rglob("*") if p.is_file() and p.name != "report.html")
    assert len(before) > others + 1000
    predictions = scored_run / "predictions.jsonl"
    predictions.write_text(predictions.read_text().replace('"prediction": "yes"', '"prediction": "no"', 5))
    result = _python("", file_size_limit=others + 500,
                     args=["-m", "surgvqa", "evaluate", "--predictions", str(predictions), "--out", str(scored_run),
                           "--set", f"output_dir={scored_run}"])
    assert result.returncode != 0
    assert f"error: cannot write {report}: no space left or file-size limit reached" in result.stderr
    assert "Traceback" not in result.stderr
    assert report.read_bytes() == before


def test_written_files_and_swapped_folders_take_the_umasks_mode(tmp_path):
    """The temporary file + rename made every file 0600 and every swapped folder 0700 (issue 28): on a shared
    cluster nobody else could read the report. They now get what open() and mkdir give under the umask."""
    import tempfile

    from surgvqa.core.io import atomic_write_text

    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "report.html", "<p>report</p>")
        append_lines(tmp_path / "log.jsonl", ["{}\n"])
        staged = Path(tempfile.mkdtemp(dir=tmp_path, prefix=".model.", suffix=".tmp"))
        atomic_write_text(staged / "weights.json", "{}")
        replace_directory(staged, tmp_path / "model")
    finally:
        os.umask(previous)
    modes = {path.name: oct(path.stat().st_mode & 0o777)
             for path in [tmp_path / "report.html", tmp_path / "log.jsonl", tmp_path / "model",
                          tmp_path / "model" / "weights.json"]}
    assert modes == {"report.html": "0o640", "log.jsonl": "0o640", "model": "0o750", "weights.json": "0o640"}
