import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.training_batches import training_batch

from surgvqa.core.config import load_config
from surgvqa.models.loading import load_model, load_processor
from surgvqa.training.dataset import TrainingCollator, VQADataset
from surgvqa.training.trainer import (
    PREEMPTED_EXIT_CODE,
    SupervisedOnlyTrainer,
    build_model_for_training,
    merge_adapter,
    save_trained,
    supervised_only_loss,
    training_arguments,
)

VENV_BIN = Path(sys.executable).parent


@pytest.mark.parametrize("strategy", ["span", "sentinel"])
def test_supervised_positions_loss_equals_the_models_own_loss(strategy, tiny_model_dir, prepared_demo):
    config = load_config(None, [f"masking.strategy={strategy}"])
    processor = load_processor(str(tiny_model_dir), config.model, strategy)
    model = load_model(str(tiny_model_dir), config, processor)
    batch, labels = training_batch(processor, config, prepared_demo)
    reference = model(**batch, labels=labels).loss
    reference.backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss, supervised = supervised_only_loss(model, batch, labels)
    loss.backward()
    assert supervised == int((labels[:, 1:] != -100).sum())
    assert abs(loss.item() - reference.item()) < 1e-5
    assert reference_grads
    for name, parameter in model.named_parameters():
        if name in reference_grads:
            assert torch.allclose(parameter.grad, reference_grads[name], atol=1e-6), name


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_lora_trains_adapter_only_and_round_trips(tiny_model_dir, prepared_demo, tmp_path):
    config = load_config(None, ["lora.r=4", "lora.alpha=8", "lora.dropout=0", f"output_dir={tmp_path}",
                                f"model.name_or_path={tiny_model_dir}"])
    processor = load_processor(str(tiny_model_dir), config.model)
    model = build_model_for_training(config, str(tiny_model_dir), processor)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert not any("visual" in name for name in trainable)  # never the vision blocks by default
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    dataset = VQADataset.from_jsonl(prepared_demo / "train.jsonl", processor, config.prompt, config.masking, limit=16)
    args = training_arguments(config, tmp_path / "ckpt", max_steps=3, batch_size=4, grad_accum=1, lr=1e-2,
                              save=False, report_tensorboard=False)
    SupervisedOnlyTrainer(model=model, args=args, train_dataset=dataset,
                          data_collator=TrainingCollator(processor.tokenizer.pad_token_id)).train()
    for name, parameter in model.named_parameters():
        if name in base_before:
            assert torch.equal(parameter.detach(), base_before[name]), f"base weight {name} changed"
    assert any(not torch.equal(p.detach(), lora_before[n]) for n, p in model.named_parameters() if n in lora_before)

    adapter_dir = save_trained(model, processor, tmp_path / "adapter")
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    batch, _ = training_batch(processor, config, prepared_demo, n=3, split="val")
    model.eval()
    expected = _logits(model, batch)

    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(load_model(str(tiny_model_dir), config, processor, for_training=False),
                                         str(adapter_dir)).eval()
    assert torch.allclose(_logits(reloaded, batch), expected, atol=1e-5)
    merged_dir = merge_adapter(config, adapter_dir, tmp_path / "merged")
    merged = load_model(str(merged_dir), config, processor, for_training=False).eval()
    assert torch.allclose(_logits(merged, batch), expected, atol=1e-4)


def test_vision_lr_puts_the_vision_tower_in_its_own_groups_and_the_schedule_scales_both(
        tiny_model_dir, prepared_demo, tmp_path):
    config = load_config(None, ["train.lr=1e-3", "train.vision_lr=2e-4", "train.weight_decay=0.1",
                                "train.warmup_ratio=0.5", f"model.name_or_path={tiny_model_dir}"])
    processor = load_processor(str(tiny_model_dir), config.model)
    model = build_model_for_training(config, str(tiny_model_dir), processor)
    dataset = VQADataset.from_jsonl(prepared_demo / "train.jsonl", processor, config.prompt, config.masking, limit=8)
    args = training_arguments(config, tmp_path / "ckpt", max_steps=4, batch_size=4, grad_accum=1, save=False,
                              report_tensorboard=False)
    trainer = SupervisedOnlyTrainer(model=model, args=args, train_dataset=dataset, vision_lr=config.train.vision_lr,
                                    data_collator=TrainingCollator(processor.tokenizer.pad_token_id))
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    rate_of = {id(p): (group["initial_lr"], group["weight_decay"]) for group in trainer.optimizer.param_groups
               for p in group["params"]}
    named = dict(model.named_parameters())
    assert len(rate_of) == sum(1 for p in named.values() if p.requires_grad)  # every trainable weight, once
    for name, parameter in named.items():
        lr, _ = rate_of[id(parameter)]
        assert lr == pytest.approx(2e-4 if name.startswith("model.visual.") else 1e-3), name
    assert rate_of[id(named["model.visual.patch_embed.proj.weight"])][1] == 0.1
    assert rate_of[id(named["model.visual.merger.ln_q.bias"])][1] == 0.0  # no decay on biases and norms
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-3)  # the logged rate is train.lr
    trainer.optimizer.step()  # no gradients yet: moves nothing, keeps the optimizer-then-scheduler order
    trainer.lr_scheduler.step()  # one step into a two-step warmup: both rates at half
    rates = sorted({group["lr"] for group in trainer.optimizer.param_groups})
    assert rates == pytest.approx([1e-4, 5e-4])


def _train_cmd(overrides: list[str], *extra: str) -> list[str]:
    args = [str(VENV_BIN / "python"), "-m", "surgvqa", "train", *extra]
    for override in overrides:
        args += ["--set", override]
    return args


def _log_steps(run_dir: Path) -> dict[int, float]:
    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _overrides(demo_config_overrides, run_name, *extra):
    return [*demo_config_overrides, f"run_name={run_name}", "train.per_device_batch_size=8", "train.grad_accum=1",
            "train.logging_steps=1", "train.lr=1e-3", *extra]


def _copy_prepared(demo_config_overrides, prepared_demo, run_name) -> Path:
    import shutil

    config = load_config(None, [*demo_config_overrides, f"run_name={run_name}"])
    shutil.copytree(prepared_demo, config.run_dir / "prepared", dirs_exist_ok=True)
    return config.run_dir


def test_killed_run_resumes_with_the_same_history(demo_config_overrides, prepared_demo):
    run_dir = _copy_prepared(demo_config_overrides, prepared_demo, "resume")
    overrides = _overrides(demo_config_overrides, "resume", "train.max_steps=40", "train.save_steps=5")
    process = subprocess.Popen(_train_cmd(overrides), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "checkpoint-10").is_dir() and time.time() < deadline:
        assert process.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_history = _log_steps(run_dir)
    assert 10 <= max(killed_history) < 40

    resumed = subprocess.run(_train_cmd(overrides, "--resume", "--json"), env=_env(), capture_output=True, check=False,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads(resumed.stdout[resumed.stdout.rindex("{\n"):])  # after the trainer's own log lines
    assert result["global_step"] == 40
    assert Path(result["resumed_from"]).name.startswith("checkpoint-")
    history = _log_steps(run_dir)
    assert sorted(history) == list(range(1, 41))  # no gaps, no duplicates
    resumed_from = int(Path(result["resumed_from"]).name.split("-")[1])
    for step in range(1, resumed_from + 1):
        assert history[step] == killed_history[step]
    # Steps the killed run reached past its checkpoint were replayed on the same data order.
    for step in range(resumed_from + 1, max(killed_history) + 1):
        assert history[step] == pytest.approx(killed_history[step], rel=1e-3)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(demo_config_overrides, prepared_demo):
    run_dir = _copy_prepared(demo_config_overrides, prepared_demo, "sigterm")
    overrides = _overrides(demo_config_overrides, "sigterm", "train.max_steps=200", "train.save_steps=1000")
    process = subprocess.Popen(_train_cmd(overrides), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 240
    while not _log_steps(run_dir) and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "`surgvqa train --resume`) to continue" in stderr
    checkpoints = list((run_dir / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("-")[1]) < 200


def test_two_process_gloo_ddp_matches_one_process(demo_config_overrides, prepared_demo):
    common = ["train.grad_accum=1", "train.logging_steps=1", "train.lr=1e-3", "train.max_steps=2",
              "train.group_by_length=false", "train.save_steps=1000"]
    single_dir = _copy_prepared(demo_config_overrides, prepared_demo, "single")
    single = _train_cmd([*demo_config_overrides, "run_name=single", "train.per_device_batch_size=4", *common])
    assert subprocess.run(single, env=_env(), capture_output=True, timeout=300, check=False).returncode == 0
    ddp_dir = _copy_prepared(demo_config_overrides, prepared_demo, "ddp")
    ddp = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29533", "-m", "surgvqa", "train"]
    for override in [*demo_config_overrides, "run_name=ddp", "train.per_device_batch_size=2", *common]:
        ddp += ["--set", override]
    completed = subprocess.run(ddp, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    single_losses, ddp_losses = _log_steps(single_dir), _log_steps(ddp_dir)
    assert sorted(single_losses) == sorted(ddp_losses) == [1, 2]
    for step in (1, 2):  # step 2 also proves the gradients were synchronised
        assert ddp_losses[step] == pytest.approx(single_losses[step], rel=1e-4)
