from pathlib import Path

import pytest
import yaml

from surgvqa.config import ConfigError, load_config, write_resolved_config


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
