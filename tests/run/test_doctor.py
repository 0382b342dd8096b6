"""The preflight: GPU memory held by other processes (with a fake NVML), CPU mode, paths, disk, image tokens."""

import collections
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from surgvqa.cli import app
from surgvqa.core.config import load_config
from surgvqa.data.records import read_records
from surgvqa.run import doctor

GIB = 1024**3
FOREIGN_PID = 4242


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """The pynvml calls the doctor makes, answering for one 80 GiB GPU."""

    NVMLError = FakeNVMLError

    def __init__(self, compute=(), graphics=(), gpus=1, init_error=False):
        self.compute, self.graphics, self.gpus, self.init_error = list(compute), list(graphics), gpus, init_error
        self.shut_down = False

    def nvmlInit(self):
        if self.init_error:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"

    def nvmlDeviceGetCount(self):
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"handle-{index}"

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle):
        used = sum({p.pid: p.usedGpuMemory or 0 for p in self.compute + self.graphics}.values())
        return SimpleNamespace(total=80 * GIB, free=80 * GIB - used, used=used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return self.compute

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return self.graphics


def foreign_process(pid=FOREIGN_PID, gib=17.8):
    return SimpleNamespace(pid=pid, usedGpuMemory=int(gib * GIB))


@pytest.fixture
def overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return [f"output_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"]


def checks(report, name):
    return [check for check in report.checks if check.name == name]


def test_foreign_process_holding_gpu_memory_fails(overrides):
    fake = FakeNVML(compute=[foreign_process()], graphics=[foreign_process()])  # listed twice: reported once
    report = doctor.run_doctor(load_config(None, overrides), nvml=fake)

    assert not report.ok
    held = checks(report, "gpu 0 process")
    assert len(held) == 1 and held[0].status == "fail"
    assert f"pid {FOREIGN_PID}" in held[0].detail and "17.8 GiB" in held[0].detail
    assert held[0].fix == f"stop PID {FOREIGN_PID} or choose another GPU with CUDA_VISIBLE_DEVICES"
    gpu = checks(report, "gpu 0")[0]
    assert gpu.status == "ok" and "NVIDIA H100 80GB HBM3: 80.0 GiB total, 62.2 GiB free" in gpu.detail
    assert "550.54.15" in checks(report, "driver")[0].detail
    assert fake.shut_down
    assert json.loads(json.dumps(report.to_json()))["ok"] is False


def test_own_process_is_not_a_problem(overrides):
    fake = FakeNVML(compute=[SimpleNamespace(pid=os.getpid(), usedGpuMemory=2 * GIB)])
    report = doctor.run_doctor(load_config(None, overrides), nvml=fake)
    assert not checks(report, "gpu 0 process")
    # torch on this machine sees no GPU while the fake NVML reports one: that mismatch is the only failure.
    failing = [check.name for check in report.checks if check.status == "fail"]
    assert failing in ([], ["cuda"])


def test_process_user_is_read_from_proc():
    import pwd

    assert doctor.process_user(os.getpid()) == pwd.getpwuid(os.getuid()).pw_name
    assert doctor.process_user(2**30) == "?"


def test_gpus_outside_cuda_visible_devices_are_not_checked(overrides, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    report = doctor.run_doctor(load_config(None, overrides), nvml=FakeNVML(compute=[foreign_process()], gpus=2))
    assert "not used" in checks(report, "gpu 0")[0].detail
    assert [check.name for check in report.checks if check.name.endswith("process")] == ["gpu 1 process"]


def test_no_gpu_is_cpu_mode(overrides):
    report = doctor.run_doctor(load_config(None, overrides), nvml=FakeNVML(init_error=True))
    assert report.ok
    gpu = checks(report, "gpu")[0]
    assert gpu.status == "ok" and gpu.detail.startswith("CPU mode")


def test_cli_exits_nonzero_and_names_the_process(overrides, monkeypatch):
    monkeypatch.setattr(doctor, "NVML_MODULE_LOADER", lambda: FakeNVML(compute=[foreign_process()]))
    args = ["doctor", *[part for item in overrides for part in ("--set", item)]]

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert f"pid {FOREIGN_PID}" in result.output and "17.8 GiB" in result.output
    assert f"stop PID {FOREIGN_PID} or choose another GPU with CUDA_VISIBLE_DEVICES" in result.output

    as_json = CliRunner().invoke(app, [*args, "--json"])
    assert as_json.exit_code == 1
    payload = json.loads(as_json.stdout)
    assert payload["ok"] is False
    assert any("17.8 GiB" in check["detail"] for check in payload["checks"] if check["status"] == "fail")


def test_cli_cpu_mode_exits_zero(overrides, monkeypatch):
    monkeypatch.setattr(doctor, "NVML_MODULE_LOADER", lambda: FakeNVML(init_error=True))
    args = ["doctor", *[part for item in overrides for part in ("--set", item)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "CPU mode" in result.output and "preflight passed" in result.output


def test_cli_on_this_machine(overrides):
    """The real pynvml and torch: a machine without a GPU passes in CPU mode; on a GPU machine every GPU is listed
    with its memory, torch sees them, and only another process holding GPU memory can fail the run."""
    result = CliRunner().invoke(app, ["doctor", "--json", *[part for item in overrides for part in ("--set", item)]])
    payload = json.loads(result.stdout)
    assert result.exit_code == (0 if payload["ok"] else 1)
    by_name = {check["name"]: check for check in payload["checks"]}
    if "gpu" in by_name:  # no GPU here
        assert by_name["gpu"]["detail"].startswith("CPU mode") and result.exit_code == 0
        assert by_name["cuda"]["status"] == "ok" and by_name["cuda"]["detail"].startswith("CPU mode")
    else:
        gpus = [check for check in payload["checks"] if re.fullmatch(r"gpu \d+", check["name"])]
        assert gpus and by_name["driver"]["detail"].endswith(f", {len(gpus)} GPU(s)")
        assert all(" GiB total, " in gpu["detail"] or gpu["detail"].startswith("not used") for gpu in gpus)
        assert by_name["cuda"]["status"] == "ok" and by_name["cuda"]["detail"].startswith("torch built for CUDA")
        failing = [check["name"] for check in payload["checks"] if check["status"] == "fail"]
        assert all(name.endswith(" process") for name in failing), failing


def test_model_paths(overrides, tmp_path, monkeypatch):
    model_dir = tmp_path / "models" / "broken"
    model_dir.mkdir(parents=True)
    report = doctor.run_doctor(load_config(None, [*overrides, f"model.name_or_path={model_dir}"]),
                               nvml=FakeNVML(init_error=True))
    assert checks(report, "model")[0].status == "fail" and "config.json" in checks(report, "model")[0].detail

    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"\0" * 1024)
    report = doctor.run_doctor(load_config(None, [*overrides, f"model.name_or_path={model_dir}"]),
                               nvml=FakeNVML(init_error=True))
    assert checks(report, "model")[0].status == "ok"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(doctor, "_hub_cached_config", lambda repo_id: None)
    report = doctor.run_doctor(load_config(None, [*overrides, "model.name_or_path=Qwen/Qwen2-VL-2B-Instruct"]),
                               nvml=FakeNVML(init_error=True))
    model = checks(report, "model")[0]
    assert model.status == "fail" and "download it first" in model.fix and not report.ok


def test_data_source_must_exist(overrides, tmp_path):
    report = doctor.run_doctor(load_config(None, [*overrides, f"data.source={tmp_path / 'nowhere'}"]),
                               nvml=FakeNVML(init_error=True))
    assert checks(report, "data")[0].status == "fail"
    assert checks(report, "data")[0].detail.startswith(str(tmp_path / "nowhere"))


def test_an_image_folder_that_does_not_exist_fails_the_preflight(overrides, tmp_path):
    source = tmp_path / "kvasir.jsonl"
    source.write_text("")
    report = doctor.run_doctor(load_config(None, [*overrides, f"data.source={source}",
                                                  f"data.image_root={tmp_path / 'no-images'}"]),
                               nvml=FakeNVML(init_error=True))
    data = checks(report, "data")
    assert [check.status for check in data] == ["ok", "fail"] and not report.ok
    assert data[1].detail == f"data.image_root {tmp_path / 'no-images'} not found"


@pytest.mark.parametrize(("free_gib", "status"), [(100, "ok"), (10, "warn"), (1, "fail")])
def test_disk_thresholds(overrides, monkeypatch, free_gib, status):
    monkeypatch.setattr(doctor.shutil, "disk_usage",
                        lambda path: SimpleNamespace(total=1000 * GIB, used=0, free=free_gib * GIB))
    report = doctor.run_doctor(load_config(None, overrides), nvml=FakeNVML(init_error=True))
    assert checks(report, "disk")[0].status == status


def test_disk_need_scales_with_model_size(overrides, tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(doctor, "_safetensors_bytes", lambda path: 30 * GIB)
    monkeypatch.setattr(doctor.shutil, "disk_usage",
                        lambda path: SimpleNamespace(total=1000 * GIB, used=0, free=50 * GIB))
    report = doctor.run_doctor(load_config(None, [*overrides, f"model.name_or_path={model_dir}"]),
                               nvml=FakeNVML(init_error=True))
    disk = checks(report, "disk")[0]
    assert disk.status == "fail" and "90.0 GiB" in disk.detail


def test_image_token_check_without_and_with_prepared_data(overrides, demo_config_overrides, prepared_demo):
    report = doctor.run_doctor(load_config(None, overrides), nvml=FakeNVML(init_error=True))
    assert checks(report, "image tokens")[0].detail.startswith("no prepared data yet")

    config = load_config(None, demo_config_overrides)
    assert Path(prepared_demo) == config.run_dir / "prepared"
    report = doctor.run_doctor(config, nvml=FakeNVML(init_error=True))
    image = checks(report, "image tokens")[0]
    assert image.status == "ok", image.detail
    assert "<|image_pad|> tokens" in image.detail and f"masking.max_length={config.masking.max_length}" in image.detail

    too_short = load_config(None, [*demo_config_overrides, "masking.max_length=16"])
    image = checks(doctor.run_doctor(too_short, nvml=FakeNVML(init_error=True)), "image tokens")[0]
    assert image.status == "fail" and "max_length" in image.fix


QWEN2_VL_2B_TEXT = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                        "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
QWEN2_VL_2B_VISION = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4}


def test_architecture_image_tokens_and_memory_estimate_are_reported(overrides, session_cache):
    from surgvqa.models.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model(session_cache / "models", arch="qwen3_vl", min_pixels=56 * 56,
                                  max_pixels=112 * 112)
    config = load_config(None, [*overrides, f"model.name_or_path={model_dir}", "model.gradient_checkpointing=true"])
    report = doctor.run_doctor(config, nvml=FakeNVML(init_error=True))
    architecture = checks(report, "architecture")[0]
    assert architecture.status == "ok"
    assert architecture.detail.startswith("Qwen3-VL (qwen3_vl): patch 16 x merge 2 = 32-px tokens")
    assert "DeepStack" in architecture.detail
    tokens = checks(report, "image tokens per sample")[0]
    assert tokens.detail.startswith("4 to 16 ") and "4096 to 16384 px" in tokens.detail
    memory = checks(report, "memory estimate")[0]
    assert memory.status == "ok" and "with gradient checkpointing" in memory.detail
    assert "; without it: " in memory.detail

    # The same run on a GPU that another process nearly fills: the estimate does not fit, a warning says so.
    busy = FakeNVML(compute=[foreign_process(gib=79.9)])
    memory = checks(doctor.run_doctor(config, nvml=busy), "memory estimate")[0]
    assert memory.status == "warn" and "free on a GPU here" in memory.detail


def test_memory_estimate_parts_on_qwen2_vl_2b_dimensions(overrides):
    from transformers import Qwen2VLConfig

    model_config = Qwen2VLConfig(text_config=QWEN2_VL_2B_TEXT, vision_config=QWEN2_VL_2B_VISION,
                                 tie_word_embeddings=True)
    lora = load_config(None, [*overrides, "lora.r=16", "lora.alpha=32", "model.freeze_vision=true",
                              "model.gradient_checkpointing=true", "train.per_device_batch_size=4"])
    estimate = doctor.estimate_training_memory(model_config, lora)
    assert estimate.parameters == 2_208_985_600  # Qwen2-VL-2B-Instruct's parameter count
    assert estimate.weights == 2 * estimate.parameters  # bf16
    # LoRA r16 on the 7 projections of 28 layers: r * (in + out) each.
    per_layer = 16 * ((1536 + 1536) + 2 * (1536 + 256) + (1536 + 1536) + 2 * (1536 + 8960) + (8960 + 1536))
    assert estimate.trainable_parameters == 28 * per_layer
    assert estimate.trainable_state == 16 * estimate.trainable_parameters
    assert estimate.activations < estimate.activations_other / 5  # checkpointing keeps one layer's worth
    full = doctor.estimate_training_memory(model_config, load_config(None, [*overrides, "lora=null",
                                                                            "model.freeze_vision=true"]))
    assert full.trainable_state > 10 * estimate.trainable_state


def test_qwen3_5_lora_targets_without_its_linear_attention_projections_are_warned(overrides):
    config = load_config(None, [*overrides, "model.tiny_arch=qwen3_5", "lora.r=8"])
    report = doctor.run_doctor(config, nvml=FakeNVML(init_error=True))
    assert checks(report, "architecture")[0].detail.startswith("Qwen3.5 (qwen3_5)")
    warning = checks(report, "lora targets")[0]
    assert warning.status == "warn" and "in_proj_qkv" in warning.detail
    targets = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,in_proj_qkv,in_proj_z,out_proj]"
    adapted = load_config(None, [*overrides, "model.tiny_arch=qwen3_5", "lora.r=8", f"lora.target_modules={targets}"])
    assert not checks(doctor.run_doctor(adapted, nvml=FakeNVML(init_error=True)), "lora targets")


def test_doctor_estimates_a_grouped_micro_batch_as_whole_images(tmp_path, prepared_demo):
    from transformers import Qwen2VLConfig

    model_config = Qwen2VLConfig(text_config=QWEN2_VL_2B_TEXT, vision_config=QWEN2_VL_2B_VISION,
                                 tie_word_embeddings=True)
    settings = [f"output_dir={tmp_path}", "run_name=memory", "model.max_pixels=200704",
                "train.per_device_batch_size=4"]
    separate = doctor.estimate_training_memory(model_config, load_config(None, settings))
    grouped_config = load_config(None, [*settings, "train.group_by_image=true"])
    unprepared = doctor.estimate_training_memory(model_config, grouped_config)
    assert unprepared.batch_questions == doctor.QUESTIONS_PER_IMAGE_BOUND  # no split to count from: x1's 25
    shutil.copytree(prepared_demo, grouped_config.run_dir / "prepared")
    grouped = doctor.estimate_training_memory(model_config, grouped_config)
    most = max(collections.Counter(record.img_id for record in
                                   read_records(prepared_demo / "train.jsonl")).values())
    assert grouped.batch_questions == most
    image_and_system = separate.tokens_per_sample - doctor.SEGMENT_TOKENS_PER_QUESTION
    assert grouped.batch_tokens == image_and_system + most * doctor.SEGMENT_TOKENS_PER_QUESTION
    # 256 image tokens once instead of once per question: fewer activations although more questions
    assert grouped.batch_tokens < separate.batch_tokens and grouped.activations < separate.activations
    assert grouped.logits == separate.logits * most // 4  # the LM head still runs once per supervised token
