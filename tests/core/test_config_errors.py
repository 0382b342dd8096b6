"""A config error names where the bad value came from: the file (with its line numbers for a repeated key) or the
``--set`` override that gave it."""

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surgvqa.cli import app
from surgvqa.core.config import ConfigError, default_config_path, load_config


def write_config(folder: Path, text: str) -> Path:
    config_file = folder / "config.yaml"
    config_file.write_text(text)
    return config_file


@pytest.mark.parametrize("text, key, lines", [
    # A second `train:` section would silently drop the first one's lr.
    ("run_name: a\ntrain:\n  lr: 1e-4\n  epochs: 3\ntrain:\n  epochs: 1\n", "train", (2, 5)),
    ("train:\n  lr: 1e-4\n  epochs: 3\n  lr: 2e-4\n", "train.lr", (2, 4)),
    ("data:\n  split:\n    seed: 1\n    train: 0.8\n    seed: 2\n", "data.split.seed", (3, 5)),
    ("export:\n  submission_info: {Team_Name: a, Team_Name: b}\n", "export.submission_info.Team_Name", (2, 2)),
    ("slurm:\n  extra_sbatch:\n    - {a: 1, a: 2}\n", "slurm.extra_sbatch.0.a", (3, 3)),
])
def test_repeated_key_is_one_line_naming_file_key_and_both_lines(tmp_path, text, key, lines):
    config_file = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    assert str(caught.value) == (f"{config_file}: key '{key}' is given twice, at lines {lines[0]} and {lines[1]} "
                                 "(YAML would keep only the last; merge them into one)")


def test_repeated_section_stops_the_command_with_exit_2(tmp_path):
    config_file = write_config(tmp_path, "run_name: a\ntrain:\n  lr: 1e-4\n  epochs: 3\ntrain:\n  epochs: 1\n")
    result = CliRunner().invoke(app, ["doctor", "--config", str(config_file)])
    assert result.exit_code == 2
    assert result.output == (f"error: {config_file}: key 'train' is given twice, at lines 2 and 5 (YAML would keep "
                             "only the last; merge them into one)\n")


def test_merge_keys_may_be_overridden_without_a_repeat_error(tmp_path):
    config_file = write_config(tmp_path, "sanity: &shared {lr: 0.001}\ntrain:\n  <<: *shared\n  lr: 0.002\n")
    config = load_config(config_file)
    assert (config.sanity.lr, config.train.lr) == (0.001, 0.002)


def test_repeated_key_inside_an_override_value_is_named(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["export.submission_info={Team_Name: a, Team_Name: b}"])
    assert str(caught.value) == ("--set export.submission_info: key 'export.submission_info.Team_Name' is given "
                                 "twice (YAML would keep only the last; give it once)")


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", ("--set train.lr=abc: 'train.lr': Input should be a valid number, unable to parse string as "
                      "a number (got 'abc')")),
    # A text key keeps the override's text as typed, which is then still checked, and named as the override.
    ("slurm.mem=1.5", ("--set slurm.mem=1.5: 'slurm.mem': must be a SLURM memory size like 64G or 16000M "
                       "(got '1.5')")),
])
def test_bad_override_value_names_the_override_not_the_file(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert str(caught.value) == message


def test_bad_file_value_still_names_the_file(tmp_path):
    config_file = write_config(tmp_path, "train:\n  lr: abc\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file, ["train.epochs=2"])
    assert str(caught.value) == (f"{config_file}: 'train.lr': Input should be a valid number, unable to parse "
                                 "string as a number (got 'abc')")


def test_errors_from_file_and_override_each_name_their_origin(tmp_path):
    config_file = write_config(tmp_path, "train:\n  lr: abc\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file, ["lora.aplha=3", "sanity.lr=-1"])
    assert str(caught.value) == ("--set lora.aplha=3: unknown key 'lora.aplha'; "
                                 f"{config_file}: 'train.lr': Input should be a valid number, unable to parse "
                                 "string as a number (got 'abc'); "
                                 "--set sanity.lr=-1: 'sanity.lr': Input should be greater than 0 (got -1)")


def test_last_override_of_a_key_is_the_one_named():
    # The section override comes last, so the bad lr is its value, not the earlier key's.
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["train.lr=1e-4", "train={lr: fast}"])
    assert str(caught.value).startswith("--set train={lr: fast}: 'train.lr': Input should be a valid number")


def test_section_check_names_the_file_and_the_override_that_met_in_it():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["data.split.train=0.9"])
    assert str(caught.value).startswith(f"{default_config_path()} with --set data.split.train=0.9: 'data.split': "
                                        "split fractions must be >= 0 and sum to 1")


@pytest.mark.parametrize("override, key, text", [
    ("run_name=2024", "run_name", "2024"),
    ("slurm.partition=on", "slurm.partition", "on"),
    ("slurm.account=123", "slurm.account", "123"),
    ("slurm.mem=64", "slurm.mem", "64"),
    ("export.base_model=0x10", "export.base_model", "0x10"),  # the text as typed, not YAML's number 16
])
def test_override_of_a_text_key_keeps_the_text_as_typed(override, key, text):
    config = load_config(None, [override])
    section, _, name = key.rpartition(".")
    assert getattr(getattr(config, section) if section else config, name) == text


def test_number_for_a_text_key_in_the_file_says_to_quote_it(tmp_path):
    config_file = write_config(tmp_path, "run_name: 2024\nslurm:\n  partition: on\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    assert str(caught.value) == (f"{config_file}: 'run_name': Input should be a valid string (got 2024; write it in "
                                 "quotes to make it text); 'slurm.partition': Input should be a valid string (got "
                                 "True; write it in quotes to make it text)")


def test_override_error_reaches_the_command_line_with_its_origin():
    result = CliRunner().invoke(app, ["doctor", "--set", "train.lr=abc"])
    assert result.exit_code == 2
    assert result.output == ("error: --set train.lr=abc: 'train.lr': Input should be a valid number, unable to parse "
                             "string as a number (got 'abc')\n")


@pytest.mark.parametrize("override, key", [
    ("train.epochs=inf", "train.epochs"), ("train.epochs=.inf", "train.epochs"), ("train.lr=.nan", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("evaluate.size_tolerance_mm=-.inf", "evaluate.size_tolerance_mm"),
])
def test_infinite_and_nan_values_fail_at_load_naming_the_key(override, key):
    # `train.epochs=inf` passed every bound and failed after prepare with OverflowError (issue 29).
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert f"'{key}': Input should be a finite number" in str(caught.value) and "\n" not in str(caught.value)


def test_a_yaml_alias_bomb_is_reported_with_a_bounded_excerpt_in_bounded_time(tmp_path):
    # Each level lists the one before ten times: a small file whose value of train.lr repr()s to 10^7 items.
    levels = [f"a0: &a0 [{', '.join(['x' * 10] * 10)}]"]
    levels += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 7)]
    config_file = write_config(tmp_path, "\n".join(["x-anchors:", *("  " + line for line in levels)])
                               + "\ntrain:\n  lr: *a6\n")  # was 4 s and a 100 MB string (8 levels: > 2 GB)
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    assert time.monotonic() - started < 1.0
    message = str(caught.value)
    assert "'train.lr': Input should be a valid number" in message and len(message) < 600, message


def test_no_value_and_a_leading_dash_in_run_name_say_what_is_wrong():
    with pytest.raises(ConfigError, match=r"'run_name': has no value \(YAML reads ~, null and an empty value as "
                                          r"none\); give one"):
        load_config(None, ["run_name=~"])
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["run_name=-x"])
    assert "starts with a letter or digit" in str(caught.value) and "(got '-x')" in str(caught.value)
