"""Every bad input is one `error:` line with a non-zero exit code; no traceback reaches the user."""

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surgvqa.cli import app, describe_error
from surgvqa.models.families import ModelLoadError
from surgvqa.models.loading import load_adapter

SURGVQA = Path(sys.executable).parent / "surgvqa"


def surgvqa(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    return subprocess.run([str(SURGVQA), *args], capture_output=True, text=True, timeout=120, check=False, **kwargs)


def assert_one_error_line(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr
    assert stderr.splitlines() == [expected], stderr


def test_console_script_reports_a_binary_config_in_one_line(tmp_path):
    config_file = tmp_path / "model.safetensors"
    config_file.write_bytes(b"\x00\x01\xff\xfe" * 64)
    result = surgvqa("prepare", "--config", str(config_file))
    assert result.returncode == 2
    assert_one_error_line(result.stderr, f"error: {config_file}: not a UTF-8 text file (byte 2 cannot be decoded); "
                                         "is it a binary file?")


def test_malformed_yaml_is_one_line_with_exit_2(tmp_path):
    config_file = tmp_path / "broken.yaml"
    config_file.write_text("train: {lr: 1e-4\nlora: null\n")
    result = CliRunner().invoke(app, ["prepare", "--config", str(config_file)])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {config_file}: not valid YAML (")
    assert len(result.output.splitlines()) == 1


@pytest.mark.parametrize("override, message", [
    ("sanity.lr=-0.5", "'sanity.lr': Input should be greater than 0 (got -0.5)"),
    ("train.lr_scheduler=cosine_annealing", "'train.lr_scheduler': unknown scheduler; choose one of linear, cosine"),
])
def test_invalid_config_values_stop_before_any_work(tmp_path, override, message):
    result = CliRunner().invoke(app, ["train", "--set", f"output_dir={tmp_path}", "--set", override])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output
    assert list(tmp_path.iterdir()) == []


def test_missing_model_folder_is_named(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("")
    result = CliRunner().invoke(app, ["diagnose", "--data", str(data), "--set", f"output_dir={tmp_path}",
                                      "--set", "model.name_or_path=/no/such/dir"])
    assert result.exit_code == 2
    assert result.output == "error: model.name_or_path: /no/such/dir does not exist\n"


def test_hub_id_missing_from_the_offline_cache_says_how_to_get_it(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("")
    result = CliRunner().invoke(app, ["diagnose", "--data", str(data), "--set", f"output_dir={tmp_path}",
                                      "--set", "model.name_or_path=surgvqa-tests/not-downloaded"])
    assert result.exit_code == 2
    assert result.output.startswith("error: model.name_or_path: surgvqa-tests/not-downloaded is not a folder here "
                                    "and not in the local hub cache, and the hub is offline (HF_HUB_OFFLINE)")
    assert "`hf download surgvqa-tests/not-downloaded`" in result.output
    assert len(result.output.splitlines()) == 1


def test_unexpected_error_is_one_line_unless_debugging(tmp_path, monkeypatch):
    import surgvqa.cli

    def broken_render(*args, **kwargs):
        raise RuntimeError("scheduler template\nlost")

    monkeypatch.setattr(surgvqa.cli, "render_slurm", broken_render)
    monkeypatch.delenv("SURGVQA_DEBUG", raising=False)
    result = CliRunner().invoke(app, ["slurm", "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == 1
    assert result.output == ("error: RuntimeError: scheduler template lost; rerun with SURGVQA_DEBUG=1 for the "
                             "traceback\n")

    monkeypatch.setenv("SURGVQA_DEBUG", "1")
    debug = CliRunner().invoke(app, ["slurm", "--set", f"output_dir={tmp_path}"])
    assert debug.exit_code == 1
    assert "Traceback (most recent call last)" in debug.output and "in broken_render" in debug.output


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    # A real SIGINT inside a command of the console entry point, not a simulated exception.
    script = f"""
import signal, sys, threading, time
import surgvqa.cli
from surgvqa.cli import main

# As in a terminal: a shell starts its background jobs (a test run started with `&`) with SIGINT ignored, and
# Python then leaves it ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

def press_ctrl_c(*args, **kwargs):
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # to the main thread, as Ctrl-C reaches it
    time.sleep(30)  # interrupted by the KeyboardInterrupt

surgvqa.cli.render_slurm = press_ctrl_c
sys.argv = ["surgvqa", "slurm", "--set", "output_dir={tmp_path}"]
main()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 130
    assert_one_error_line(result.stderr, "error: interrupted")


def _without_root_file_access() -> list[str]:
    """A command prefix under which file modes apply. Root ignores them (CAP_DAC_OVERRIDE), so as root a chmod alone
    would never reach the EACCES path a user meets; dropping the two file-access capabilities from the child's
    bounding set makes the kernel check the mode bits for it as for any user. The venv's interpreter lives under
    /root here, so switching to `nobody` instead is not possible. As a user, the chmod is enough."""
    if os.getuid() != 0:
        return []
    setpriv = shutil.which("setpriv")  # util-linux
    assert setpriv, "the read-only test needs setpriv (util-linux) when the tests run as root"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_read_only_run_directory_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "config.resolved.yaml").write_text("run_name: demo\n")
    run_dir.chmod(0o555)
    try:
        result = subprocess.run([*_without_root_file_access(), str(SURGVQA), "prepare", "--set",
                                 f"output_dir={tmp_path / 'runs'}", "--set", f"cache_dir={tmp_path / 'cache'}"],
                                capture_output=True, text=True, timeout=120, check=False)
    finally:
        run_dir.chmod(0o755)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, f"error: cannot write {run_dir}: permission denied (read-only folder?)")
    assert (run_dir / "config.resolved.yaml").read_text() == "run_name: demo\n"


@pytest.mark.parametrize("error, line, code", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/runs/x.json"),
     "cannot access /data/runs/x.json: permission denied", 2),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/train.jsonl"),
     "/data/train.jsonl: No such file or directory", 2),
    (ValueError("train.jsonl:3: not a JSON object line\n(Expecting value)"),
     "train.jsonl:3: not a JSON object line (Expecting value)", 2),
    (ModelLoadError("adapter a does not fit base model b"), "adapter a does not fit base model b", 2),
    (KeyError("question"), "KeyError: 'question'; rerun with SURGVQA_DEBUG=1 for the traceback", 1),
])
def test_error_lines_and_codes(error, line, code):
    assert describe_error(error) == (line, code)


TORCH_FULL_DISK = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
SAFETENSORS_FULL_DISK = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/prepared.partial/test.jsonl"),
     ("disk full while writing /data/runs/x/prepared.partial/test.jsonl (N MB free now): free space on its "
     "disk, or point output_dir at another, and rerun the same command")),
    (OSError(errno.ENOSPC, "No space left on device"),
     ("disk full while writing a file it does not name ([Errno 28] No space left on device): free space on the "
     "run's disk and rerun the same command")),
    (TORCH_FULL_DISK, ("disk full while writing a file it does not name ([enforce fail at inline_container.cc:672] . "
                      "unexpected pos 704 vs 598): free space on the run's disk and rerun the same command")),
    (SAFETENSORS_FULL_DISK, ("disk full while writing a file it does not name (Error while serializing: I/O error: "
                            "No space left on device (os error 28)): free space on the run's disk and rerun the "
                            "same command")),
], ids=["errno-28-with-file", "errno-28-without-file", "torch-zip-writer", "safetensors"])
def test_a_full_disk_is_said_to_be_one_with_exit_2(error, line):
    said, code = describe_error(error)
    assert (re.sub(r"\([0-9,]+ MB free now\)", "(N MB free now)", said), code) == (line, 2)


def test_a_reader_error_of_torch_is_not_taken_for_a_full_disk():
    error = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
    assert describe_error(error)[1] == 1


def test_a_full_disk_while_prepare_writes_an_image_names_the_file_and_exits_2(tmp_path, monkeypatch,
                                                                             demo_config_overrides):
    write_bytes = Path.write_bytes

    def full_disk_under_the_run(path, data):
        if "prepared.partial" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file named
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk_under_the_run)
    result = CliRunner().invoke(app, ["prepare", *[arg for override in demo_config_overrides
                                                   for arg in ("--set", override)],
                                      "--set", f"output_dir={tmp_path}", "--set", "run_name=full"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error")]  # after progress bars
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith(f"error: disk full while writing {tmp_path / 'full' / 'prepared.partial' / 'images'}/")
    assert lines[0].endswith("free now): free space on its disk, or point output_dir at another, and rerun the "
                             "same command")
    assert not (tmp_path / "full" / "prepared.partial").exists() and not (tmp_path / "full" / "prepared").exists()


@pytest.fixture(scope="module")
def narrow_tiny_model_dir(session_cache) -> Path:
    from surgvqa.models.tiny import ensure_tiny_model

    return ensure_tiny_model(session_cache / "models", arch="qwen2_vl", seed=0, min_pixels=56 * 56,
                             max_pixels=112 * 112, hidden_size=32, num_layers=1)


def test_adapter_of_another_base_model_is_one_clear_error(tmp_path, tiny_model_dir, narrow_tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    narrow = AutoModelForImageTextToText.from_pretrained(narrow_tiny_model_dir)
    adapter_dir = tmp_path / "adapter"
    get_peft_model(narrow, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter_dir)

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    with pytest.raises(ModelLoadError) as caught:
        load_adapter(base, adapter_dir, str(tiny_model_dir))
    message = str(caught.value)
    assert message.startswith(f"adapter {adapter_dir} does not fit base model {tiny_model_dir}: ")
    assert "q_proj.lora_A" in message and "has shape [4, 32] in the adapter but [4, 64] in the base model" in message
    assert "\n" not in message

    fitting = load_adapter(AutoModelForImageTextToText.from_pretrained(narrow_tiny_model_dir), adapter_dir,
                           str(narrow_tiny_model_dir))
    assert type(fitting).__name__ == "PeftModel"


def test_output_cut_off_by_its_reader_ends_quietly(tmp_path, monkeypatch):
    """`surgvqa slurm | head -1`: the reader closing the pipe while the command writes is no error of the user's."""
    import surgvqa.cli

    def reader_gone(*args, **kwargs):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(surgvqa.cli, "render_slurm", reader_gone)
    result = CliRunner().invoke(app, ["slurm", "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == 1  # click's own status for a closed pipe, as for `surgvqa --help | head -1`
    assert "error" not in result.output, result.output


@pytest.fixture
def damaged_model_copy(tmp_path, tiny_model_dir):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


@pytest.mark.parametrize("damage", ["no tokenizer", "truncated weights"])
def test_a_model_folder_without_a_tokenizer_or_with_damaged_weights_is_named(damaged_model_copy, damage, tmp_path,
                                                                            demo_config_overrides):
    if damage == "no tokenizer":
        (damaged_model_copy / "tokenizer.json").unlink()
        expected = (f"error: model.name_or_path: {damaged_model_copy} has no tokenizer (tokenizer.json is missing, "
                    "and so are vocab.json with merges.txt and tokenizer.model): copy the model's tokenizer files "
                    "into it, or download the model again")
    else:
        weights = damaged_model_copy / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100_000])
        expected = (f"error: model.name_or_path: {weights} is damaged (SafetensorError: Error while deserializing "
                    "header: incomplete metadata, file not fully covered): copy or download the model again")
    result = CliRunner().invoke(app, ["prepare", *[arg for override in demo_config_overrides
                                                   for arg in ("--set", override)],
                                      "--set", f"output_dir={tmp_path / 'runs'}",
                                      "--set", f"model.name_or_path={damaged_model_copy}"])
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.startswith("error")] == [expected]
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs" / "demo" / "prepared").exists()  # no rows kept with empty text
