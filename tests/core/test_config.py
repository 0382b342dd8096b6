from pathlib import Path

import pytest
import yaml

from surgvqa.core.config import ConfigError, load_config, write_resolved_config


def test_default_config_is_the_cpu_demo():
    config = load_config()
    assert config.model.name_or_path == "tiny"
    assert config.data.source == "synthetic"
    assert config.lora is None  # a random model cannot learn through an adapter alone


def test_exp1_holds_the_seed_recipe():
    config = load_config(Path("configs/exp1.yaml"))
    assert (config.lora.r, config.lora.alpha) == (16, 32)
    assert (config.train.per_device_batch_size, config.train.grad_accum, config.train.epochs) == (4, 16, 1)
    assert (config.data.split.train, config.data.split.val, config.data.split.test) == (0.7, 0.15, 0.15)


def test_overrides_are_parsed_as_yaml_values():
    config = load_config(None, ["train.lr=1e-4", "lora.r=8", "masking.strategy=sentinel", "run_name=x"])
    assert config.train.lr == pytest.approx(1e-4)
    assert config.lora.r == 8  # a null section is created by an override into it
    assert config.masking.strategy == "sentinel"
    assert config.run_name == "x"


@pytest.mark.parametrize(
    "override, named",
    [
        ("lora.aplha=3", "lora.aplha"),
        ("train.lr=fast", "train.lr"),
        ("masking.strategy=tokens", "masking.strategy"),
        ("nonsense=1", "nonsense"),
        ("data.split.train=0.9", "split fractions"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Path("no/such/config.yaml"))


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}", "train.lr=0.5"])
    written = write_resolved_config(config)
    assert written == tmp_path / "demo" / "config.resolved.yaml"
    again = load_config(written)
    assert again == config
    assert yaml.safe_load(written.read_text())["train"]["lr"] == 0.5


def test_binary_config_file_is_one_line_error(tmp_path):
    config_file = tmp_path / "weights.yaml"
    config_file.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(ConfigError, match="not a UTF-8 text file") as caught:
        load_config(config_file)
    assert "\n" not in str(caught.value)


def test_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    config_file = tmp_path / "broken.yaml"
    config_file.write_text("train:\n  lr: [1e-4, 2e-4\nlora: {r: 8}\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(.* at line \d+, column \d+\)") as caught:
        load_config(config_file)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"--set train\.lr: the value is not valid YAML"):
        load_config(None, ["train.lr=[1,"])


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-4", "train.lr"),
        ("train.vision_lr=-1e-5", "train.vision_lr"),
        ("sanity.lr=0", "sanity.lr"),
        ("sanity.lr=-0.001", "sanity.lr"),
        ("train.lr_scheduler=cosin", "train.lr_scheduler"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.max_steps=-5", "train.max_steps"),
        ("lora.alpha=0", "lora.alpha"),
        ("lora.target_modules=[]", "lora.target_modules"),
        ("data.max_rows=0", "data.max_rows"),
        ("predict.multi_label_threshold=1.5", "predict.multi_label_threshold"),
        ("run_name=../elsewhere", "run_name"),
        ("run_name=a/b", "run_name"),
        ("run_name='two words'", "run_name"),
        ("run_name=''", "run_name"),
        ("output_dir=''", "output_dir"),
        ("data.source=''", "data.source"),
        ("model.name_or_path=''", "model.name_or_path"),
        ("prompt.user_template='Q: {questoin}'", "prompt.user_template"),
        ("prompt.user_template='Q: {question'", "prompt.user_template"),
        ("prompt.candidates_template='Options: {options}'", "prompt.candidates_template"),
        ("train=5", "train"),
    ],
)
def test_invalid_values_fail_at_load_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=f"'{named.replace('.', '[.]')}'") as caught:
        load_config(None, [override])
    assert "\n" not in str(caught.value)


def test_control_characters_in_names_are_rejected(tmp_path):
    config_file = tmp_path / "newline.yaml"
    config_file.write_text('run_name: "demo\\nrm -rf ~"\noutput_dir: "runs\\r"\n')
    with pytest.raises(ConfigError, match="'run_name'.*'output_dir'") as caught:
        load_config(config_file)
    assert "\n" not in str(caught.value)


def test_scheduler_names_are_transformers_own():
    from transformers.trainer_utils import SchedulerType

    from surgvqa.core.config import lr_scheduler_names

    assert lr_scheduler_names() == tuple(member.value for member in SchedulerType)
    for name in ("linear", "constant_with_warmup", "inverse_sqrt"):
        assert load_config(None, [f"train.lr_scheduler={name}"]).train.lr_scheduler == name
    # Needs min_lr through lr_scheduler_kwargs, which the training arguments do not pass: it would stop at step 1.
    with pytest.raises(ConfigError, match="'train.lr_scheduler': cosine_with_min_lr needs min_lr"):
        load_config(None, ["train.lr_scheduler=cosine_with_min_lr"])


def test_valid_prompt_templates_still_load():
    config = load_config(None, ["prompt.user_template='[{source}] {question_type}: {question} {{literal}}'"])
    assert config.prompt.user_template.startswith("[{source}]")
