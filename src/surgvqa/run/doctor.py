"""Preflight before spending GPU hours: versions, GPUs and who else holds their memory, paths, disk, image tokens.

Each check is one line (ok / warn / fail) with the fix next to it. The most expensive failure it catches is a
GPU whose memory another process already holds: training then dies with an out-of-memory error after the queue
wait and the model load, or runs at a fraction of the batch size. NVML answers that in milliseconds without
creating a CUDA context (which would itself take memory on the GPU).
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import pwd
import shutil
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from surgvqa.core.config import Config
from surgvqa.core.io import iter_jsonl
from surgvqa.data.records import Record, read_records
from surgvqa.data.sources import allowed_image_roots
from surgvqa.models.families import CONFIG_TOKEN_SIDE, family_of, family_pixel_budget
from surgvqa.models.loading import load_processor, max_image_tokens, resolve_model_path
from surgvqa.models.tiny import build_config
from surgvqa.prompting.encoding import SampleTooLong, encode_example, load_image
from surgvqa.training.grouping import grouped_accumulation_steps, mean_questions, pack_images
from surgvqa.training.trainer import lora_target_regex

GIB = 1024**3
DISK_WARN_GIB = 20.0
DISK_FAIL_GIB = 2.0
CHECKPOINT_FACTOR = 3  # weights + optimizer state + the previous checkpoint kept by save_total_limit

Status = Literal["ok", "warn", "fail"]


def _load_pynvml() -> Any:
    return importlib.import_module("pynvml")


# Tests replace this with a function returning a fake module (see tests/run/test_doctor.py).
NVML_MODULE_LOADER: Callable[[], Any] = _load_pynvml


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    gpu_free: list[int] = field(default_factory=list)  # free bytes per GPU this job may use (NVML)

    @property
    def ok(self) -> bool:
        return all(check.status != "fail" for check in self.checks)

    def add(self, name: str, status: Status, detail: str, fix: str = "") -> None:
        self.checks.append(Check(name, status, detail, fix))

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(check) for check in self.checks]}


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- versions -----------------------------------------------------------------------------------------------

def check_versions(report: DoctorReport) -> None:
    parts = [f"python {platform.python_version()}"]
    for name in ("torch", "transformers", "peft", "accelerate"):
        try:
            parts.append(f"{name} {importlib.import_module(name).__version__}")
        except ImportError:
            report.add(name, "fail", f"{name} is not installed", "pip install -e . (inside the run's environment)")
    report.add("versions", "ok", ", ".join(parts))


def check_torch_cuda(report: DoctorReport, nvml_gpus: int) -> None:
    """torch must see the GPUs NVML sees; otherwise training silently runs on the CPU."""
    try:
        import torch
    except ImportError:
        return  # reported by check_versions
    built = torch.version.cuda
    available = torch.cuda.is_available()  # no CUDA context is created: no GPU memory is taken
    if available:
        report.add("cuda", "ok", f"torch built for CUDA {built}; {torch.cuda.device_count()} device(s) visible")
    elif nvml_gpus:
        cause = "torch is a CPU-only build" if built is None else f"torch (CUDA {built}) cannot use the driver"
        report.add("cuda", "fail", f"{nvml_gpus} GPU(s) present but {cause}; training would run on the CPU",
                   "install a CUDA build of torch matching the driver (https://pytorch.org/get-started/locally/)"
                   if built is None else "check CUDA_VISIBLE_DEVICES and that the driver supports this CUDA")
    else:
        report.add("cuda", "ok", f"CPU mode (torch CUDA build: {built or 'none'}; no GPU visible)")


# --- GPUs and the processes holding their memory --------------------------------------------------------------

def process_user(pid: int) -> str:
    """The owner of a process, from the real uid in /proc/<pid>/status; "?" where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return pwd.getpwuid(int(line.split()[1])).pw_name
    except (OSError, KeyError, ValueError, IndexError):
        pass
    return "?"


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "?"
    except OSError:
        return "?"


def _selected_gpus(nvml: Any, count: int) -> set[int] | None:
    """NVML indices named by CUDA_VISIBLE_DEVICES (integers or GPU UUIDs); None = all of them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return None
    chosen: set[int] = set()
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    for entry in entries:
        if entry.isdigit():
            chosen.add(int(entry))
            continue
        for index in range(count):  # a UUID (GPU-...) or MIG id: match it against each device's UUID
            try:
                uuid = _text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(index)))
            except (AttributeError, nvml.NVMLError):
                return None
            if uuid.startswith(entry) or entry.startswith(uuid):
                chosen.add(index)
    return chosen or None  # nothing matched (e.g. MIG ids): check every GPU rather than none


def _gpu_processes(nvml: Any, handle: Any) -> tuple[list[Any], list[str]]:
    """The processes holding memory on a GPU, and the queries that failed (some GPUs lack graphics queries)."""
    seen: dict[int, Any] = {}
    failed = []
    for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        try:
            for process in query(handle) or []:
                seen.setdefault(process.pid, process)
        except nvml.NVMLError as exc:
            failed.append(f"{query.__name__}: {_text(exc)}")
    return list(seen.values()), failed


def check_gpus(report: DoctorReport, nvml: Any | None) -> int:
    """One line per GPU (memory total / free) and one FAIL per foreign process on it. Returns the GPU count."""
    if nvml is None:
        try:
            nvml = NVML_MODULE_LOADER()
        except ImportError:
            report.add("gpu", "ok", "CPU mode (nvidia-ml-py not installed, so no GPU check)")
            return 0
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        report.add("gpu", "ok", f"CPU mode (no NVIDIA driver or GPU: {_text(exc) or type(exc).__name__})")
        return 0
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            report.add("gpu", "ok", "CPU mode (the NVIDIA driver reports no GPU)")
            return 0
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            driver = "?"
        report.add("driver", "ok", f"NVIDIA driver {driver}, {count} GPU(s)")
        selected = _selected_gpus(nvml, count)
        own_pid = os.getpid()
        for index in range(count):
            _check_one_gpu(report, nvml, index, selected, own_pid)
        return count
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def _check_one_gpu(report: DoctorReport, nvml: Any, index: int, selected: set[int] | None, own_pid: int) -> None:
    name = f"gpu {index}"
    if selected is not None and index not in selected:
        report.add(name, "ok", f"not used (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
        return
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        model = _text(nvml.nvmlDeviceGetName(handle))
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    except nvml.NVMLError as exc:
        report.add(name, "warn", f"cannot query this GPU ({_text(exc)})",
                   "select the GPUs this job may use with CUDA_VISIBLE_DEVICES")
        return
    report.add(name, "ok", f"{model}: {gib(memory.total)} total, {gib(memory.free)} free")
    report.gpu_free.append(int(memory.free))
    processes, failed = _gpu_processes(nvml, handle)
    if len(failed) == 2:  # neither query answered: other processes cannot be ruled out
        report.add(f"{name} processes", "warn", "cannot list the processes on this GPU (" + "; ".join(failed) + ")",
                   "check with nvidia-smi that no other job holds its memory")
    for process in processes:
        if process.pid == own_pid:
            continue
        used = getattr(process, "usedGpuMemory", None)
        used_text = gib(used) if isinstance(used, int) and 0 <= used < 2**62 else "? GiB"  # None: not reported
        report.add(f"{name} process", "fail",
                   f"pid {process.pid} ({_process_name(process.pid)}, user {process_user(process.pid)}) "
                   f"holds {used_text} on {model}",
                   f"stop PID {process.pid} or choose another GPU with CUDA_VISIBLE_DEVICES")


# --- paths and disk --------------------------------------------------------------------------------------------

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _hub_cached_config(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return found if isinstance(found, str) else None


def check_model(report: DoctorReport, config: Config) -> bool:
    """Whether the model can be loaded without a download; returns True when the check passed."""
    name = config.model.name_or_path
    if name == "tiny":
        report.add("model", "ok", f"tiny: built offline into {Path(config.cache_dir) / 'models'} (no download)")
        return True
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            report.add("model", "fail", f"{path}: no config.json", "point model.name_or_path at the folder that "
                       "holds config.json and the *.safetensors (a complete snapshot)")
            return False
        if not os.access(path / "config.json", os.R_OK):
            report.add("model", "fail", f"{path}/config.json is not readable", f"chmod -R u+rX {path}")
            return False
        weights = _safetensors_bytes(path)
        report.add("model", "ok", f"{path} (config.json" + (f", {gib(weights)} of safetensors)" if weights else ")"))
        return True
    if path.exists():
        report.add("model", "fail", f"{path} is a file, not a model directory", "point model.name_or_path at the "
                   "model folder")
        return False
    if _looks_like_hub_id(name):
        download = (f"download it first: huggingface-cli download {name} --local-dir models/{name.split('/')[-1]} "
                    f"and set model.name_or_path to that folder")
        cached = _hub_cached_config(name)
        if cached:
            report.add("model", "ok", f"hub id {name}: found in the local Hugging Face cache ({Path(cached).parent})")
            return True
        if _offline():
            report.add("model", "fail", f"hub id {name} is not a local folder nor in the Hugging Face cache, and "
                       "HF_HUB_OFFLINE=1", download)
            return False
        report.add("model", "warn", f"hub id {name}: will be downloaded when the job starts", download)
        return True
    report.add("model", "fail", f"{path} not found (working directory {Path.cwd()})",
               "fix model.name_or_path (relative paths resolve from the working directory)")
    return False


def _safetensors_bytes(path: Path) -> int:
    return sum(item.stat().st_size for item in path.glob("*.safetensors"))


def check_data(report: DoctorReport, config: Config) -> None:
    source = config.data.source
    if source == "synthetic":
        report.add("data", "ok", f"synthetic: generated into {Path(config.cache_dir)} (no download)")
        return
    if source.startswith("hub:") or config.data.format == "hub":
        fix = (f"download it first (huggingface-cli download {source.removeprefix('hub:')} --repo-type dataset "
               f"--local-dir data/NAME) and set data.source to that folder")
        if _offline():
            report.add("data", "warn", f"{source}: a hub dataset with HF_HUB_OFFLINE=1 loads only from the cache", fix)
        else:
            report.add("data", "warn", f"{source}: downloaded by `prepare` (needs the network)", fix)
        return
    path = Path(source).expanduser()
    if not path.exists():
        report.add("data", "fail", f"{path} not found (working directory {Path.cwd()})",
                   "point data.source at the Kvasir-VQA parquet folder, a save_to_disk folder, or JSONL/CSV")
    elif not os.access(path, os.R_OK):
        report.add("data", "fail", f"{path} is not readable", f"chmod -R u+rX {path}")
    else:
        report.add("data", "ok", f"{path}")
    # The folders images are read from: a wrong one passes everything above and then rejects every row.
    for key, folder in (("data.image_root", config.data.image_root), ("data.images", config.data.images)):
        if folder and not Path(folder).expanduser().exists():
            report.add("data", "fail", f"{key} {Path(folder).expanduser()} not found",
                       f"point {key} at the folder the rows' image paths are relative to"
                       if key == "data.image_root" else f"point {key} at the folder of <img_id> images")


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(report: DoctorReport, config: Config, model_ok: bool) -> None:
    target = _existing_ancestor(Path(config.output_dir))
    free = shutil.disk_usage(target).free
    model_dir = Path(config.model.name_or_path)
    weights = _safetensors_bytes(model_dir) if model_ok and model_dir.is_dir() else 0
    need = CHECKPOINT_FACTOR * weights
    need_text = (f"; checkpoints need about {gib(need)} ({CHECKPOINT_FACTOR} x {gib(weights)} of weights)"
                 if need else "")
    detail = f"{gib(free)} free in {target}{need_text}"
    fix = "free space or set output_dir to a larger file system (e.g. scratch)"
    if free < max(DISK_FAIL_GIB * GIB, need):
        report.add("disk", "fail", detail, fix)
    elif free < DISK_WARN_GIB * GIB:
        report.add("disk", "warn", detail, fix)
    else:
        report.add("disk", "ok", detail)


# --- image tokens of one prepared sample -------------------------------------------------------------------------

def check_image_tokens(report: DoctorReport, config: Config, model_ok: bool) -> None:
    """The first prepared training sample: image tokens must match its grid, the length must fit max_length."""
    data = config.run_dir / "prepared" / "train.jsonl"
    if not data.is_file():
        report.add("image tokens", "ok", f"no prepared data yet ({data}); checked by `surgvqa diagnose`")
        return
    if not model_ok:
        report.add("image tokens", "warn", "skipped: the model is not readable (see the model check)")
        return

    try:
        first = next((obj for _, obj in iter_jsonl(data)), None)
        if first is None:
            report.add("image tokens", "fail", f"{data} is empty", "rerun `surgvqa prepare`")
            return
        record = Record.from_json(first, origin=f"{data}:1")
        processor = load_processor(resolve_model_path(config), config.model, config.masking.strategy)
        example = encode_example(processor, record, load_image(record, data.parent, roots=allowed_image_roots(config, data.parent)),
                                 config.prompt, config.masking)
    except SampleTooLong as exc:
        report.add("image tokens", "fail", str(exc), "lower model.max_pixels or raise masking.max_length")
        return
    except Exception as exc:  # noqa: BLE001 - any failure to encode is the finding; one line, not a traceback
        report.add("image tokens", "fail", f"cannot encode the first sample of {data}: {type(exc).__name__}: {exc}",
                   "run `surgvqa diagnose` for the full picture")
        return
    features = example.features
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id is None:
        image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    found = features["input_ids"].tolist().count(image_token_id)
    merge = processor.image_processor.merge_size
    grid = features["image_grid_thw"]
    expected = int(grid.prod(dim=-1).sum().item()) // (merge * merge)
    length = len(features["input_ids"])
    grid_text = "x".join(str(int(value)) for value in grid[0].tolist())
    detail = (f"{record.id}: {found} <|image_pad|> tokens, grid {grid_text} / {merge}^2 = {expected}; "
              f"{length} of masking.max_length={config.masking.max_length} tokens")
    if found != expected:
        report.add("image tokens", "fail", detail, "image tokens were cut: never truncate after the processor; "
                   "control length with model.min_pixels / max_pixels")
    else:
        report.add("image tokens", "ok", detail)


# --- architecture, image tokens and a peak-memory estimate ------------------------------------------------------

# Prompt (system, question type, question) + answer + chat markup of a Kvasir-VQA sample: 40-60 tokens measured on
# the prepared demo; 64 keeps the estimate on the safe side.
TEXT_TOKENS_PER_SAMPLE = 64
SUPERVISED_TOKENS_PER_SAMPLE = 16  # answer + end of turn; the LM head runs only there (training.supervised_only_loss)
CUDA_CONTEXT_BYTES = 0.5 * GIB  # CUDA context and cuBLAS workspace: held by the process, outside torch's allocator
# Grouped training (train.group_by_image) puts whole images in a micro-batch: the image and the system prompt once
# per image, then per question only its own text (question type, question, answer, markup; ~25 tokens on the
# demo, 40 on the safe side). The peak is the image with the most questions, counted from the prepared training
# split when there is one; without it, Kvasir-VQA-x1's ~25 questions per image, the most of the tasks.
SEGMENT_TOKENS_PER_QUESTION = 40
QUESTIONS_PER_IMAGE_BOUND = 25


@dataclass
class MemoryEstimate:
    """Peak training memory of one process for the configured batch, by part (bytes). How the activation terms
    are counted is in :func:`layer_activation_bytes`; the validation is in docs/benchmarks.md."""

    parameters: int
    trainable_parameters: int
    weights: int  # every parameter in the model's dtype
    trainable_state: int  # trainable weights' gradients and AdamW moments (LoRA: also its fp32 weights)
    activations: int  # saved for backward, with the configured gradient checkpointing
    activations_other: int  # the same with gradient checkpointing switched the other way
    logits: int  # LM head on the supervised positions: fp32 logits and their gradient
    tokens_per_sample: int
    gradient_checkpointing: bool
    batch_tokens: int = 0  # tokens of the largest micro-batch
    batch_questions: int = 0  # questions in it (grouped: whole images, see SEGMENT_TOKENS_PER_QUESTION)

    @property
    def total(self) -> int:
        return self.weights + self.trainable_state + self.activations + self.logits

    @property
    def total_other(self) -> int:
        return self.weights + self.trainable_state + self.activations_other + self.logits


def _dtype_bytes(config: Config) -> int:
    # "auto" is bf16 on a GPU, which is what the estimate is for.
    return 4 if config.model.dtype == "float32" else 2


# Linear layers that read the same normed input: without LoRA dropout, autograd keeps that input once per group.
SHARED_INPUT_GROUPS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention",
                       "in_proj_qkv": "attention", "in_proj_z": "attention", "in_proj_a": "attention",
                       "in_proj_b": "attention", "gate_proj": "mlp", "up_proj": "mlp"}


def layer_activation_bytes(layer: Any, text_config: Any, config: Config, act_bytes: int) -> int:
    """Bytes one decoder layer saves for backward, per token (sdpa/flash attention: no L x L matrix).

    Counted from the layer's own modules: each norm's fp32 input copy; the inputs of the linear layers that train
    (a LoRA target keeps its fp32-cast input for lora_A: one copy per group of targets reading the same tensor, or
    with LoRA dropout a dropout output and mask per target; full fine-tuning keeps every linear's input in the
    weights' dtype); attention's q, k, v
    (k and v repeated to all query heads) and output; the MLP's gate, up and product inputs. Frozen linear layers
    save nothing: their input gradient needs only the weight. Qwen3.5's linear-attention layers: their
    convolution input and output and the gated output, not the delta rule's chunk states.
    """
    import torch

    lora = config.lora
    targets = set(lora.target_modules) if lora is not None else None
    total = 0
    shared: dict[str, int] = {}
    for name, module in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear):
            if leaf == "up_proj":
                total += 3 * module.out_features * act_bytes  # gate (silu input), silu output and up
            if targets is not None and leaf not in targets:
                continue
            if targets is None:
                shared[SHARED_INPUT_GROUPS.get(leaf, name)] = module.in_features * act_bytes
            elif lora.dropout > 0:
                # PEFT casts a LoRA input to the adapter's fp32 before its dropout: fp32 output and a byte mask.
                total += module.in_features * (4 + 1)
            else:
                shared[SHARED_INPUT_GROUPS.get(leaf, name)] = module.in_features * 4
        elif "norm" in leaf.lower() and getattr(module, "weight", None) is not None and module.weight.dim() == 1:
            total += 4 * module.weight.shape[0]  # an RMSNorm computes in fp32 and keeps that copy of its input
    total += sum(shared.values())
    if getattr(layer, "self_attn", None) is not None:
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        total += 4 * heads * head_dim * act_bytes  # q, repeated k and v, attention output
    if getattr(layer, "linear_attn", None) is not None:
        mixer = layer.linear_attn
        total += (2 * mixer.conv_dim + 3 * mixer.value_dim) * act_bytes
    return total


def _decoder_layers(model: Any) -> list[Any]:
    inner = getattr(model, "model", model)
    language = getattr(inner, "language_model", inner)
    return list(getattr(language, "layers", []))


def estimate_training_memory(model_config: Any, config: Config) -> MemoryEstimate:
    """Peak memory of a training step of ``config`` on the architecture ``model_config`` describes.

    The parameter counts come from the model itself, built on the meta device (no memory, no weights).
    """
    import torch
    from transformers import AutoModelForImageTextToText


    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(model_config)
    act_bytes = _dtype_bytes(config)
    parameters = sum(p.numel() for p in model.parameters())
    settings = config.model
    visual = getattr(getattr(model, "model", model), "visual", None)
    vision_names = {id(p) for p in visual.parameters()} if visual is not None else set()
    mergers = family_of(model_config.model_type).merger_prefixes
    merger_names = {id(p) for name, p in visual.named_parameters() if name.startswith(mergers)} \
        if visual is not None else set()
    trainable_vision = (0 if settings.freeze_vision and not settings.train_merger else
                        sum(p.numel() for p in visual.parameters() if not settings.freeze_vision or id(p) in
                            merger_names)) if visual is not None else 0
    if config.lora is not None:
        import re

        pattern = re.compile(lora_target_regex(config.lora))
        adapter = sum(config.lora.r * (module.in_features + module.out_features)
                      for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name))
        # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype): weight, gradient and two AdamW moments.
        trainable_state = 16 * adapter + (act_bytes + 2 * act_bytes) * trainable_vision
        trainable = adapter + trainable_vision
    else:
        language = sum(p.numel() for p in model.parameters() if id(p) not in vision_names)
        trainable = language + trainable_vision
        trainable_state = 3 * act_bytes * trainable  # gradient + two AdamW moments in the weights' dtype
    tokens = min(config.masking.max_length, max_image_tokens(settings) + TEXT_TOKENS_PER_SAMPLE)
    questions = config.train.per_device_batch_size
    batch_tokens = questions * tokens
    if config.train.group_by_image:
        per_image = most_questions_per_image(config)
        images = max(1, questions // per_image)  # micro-batches hold whole images, at least one
        questions = images * per_image
        batch_tokens = images * (tokens - SEGMENT_TOKENS_PER_QUESTION) + questions * SEGMENT_TOKENS_PER_QUESTION
    layers = _decoder_layers(model)
    text_config = model_config.get_text_config()
    hidden = text_config.hidden_size
    per_layer = [layer_activation_bytes(layer, text_config, config, act_bytes) for layer in layers]
    final_norm = 4 * hidden + hidden * act_bytes  # the final norm's fp32 input and the embedding output
    full = batch_tokens * (sum(per_layer) + final_norm)
    # Checkpointing keeps each layer's input and recomputes one layer at a time during backward.
    checkpointed = batch_tokens * (len(layers) * hidden * act_bytes + max(per_layer, default=0) + final_norm)
    vocab = model_config.get_text_config().vocab_size
    logits = questions * SUPERVISED_TOKENS_PER_SAMPLE * vocab * 8
    use_checkpointing = settings.gradient_checkpointing
    return MemoryEstimate(
        parameters=parameters, trainable_parameters=trainable, weights=parameters * act_bytes,
        trainable_state=trainable_state, activations=checkpointed if use_checkpointing else full,
        activations_other=full if use_checkpointing else checkpointed, logits=logits, tokens_per_sample=tokens,
        gradient_checkpointing=use_checkpointing, batch_tokens=batch_tokens, batch_questions=questions)


def most_questions_per_image(config: Config) -> int:
    """The most questions any training image has, from the prepared split; the bound when it is not there yet."""
    from collections import Counter

    from surgvqa.data.records import read_records

    prepared = config.run_dir / "prepared" / "train.jsonl"
    try:
        counts = Counter((record.img_id, record.image) for record in read_records(prepared))
    except (OSError, ValueError):
        return QUESTIONS_PER_IMAGE_BOUND
    return max(counts.values(), default=QUESTIONS_PER_IMAGE_BOUND)


def _model_config(config: Config) -> Any:
    """The checkpoint's config (the tiny model's without building it)."""
    if config.model.name_or_path == "tiny":

        return build_config(config.model.tiny_arch, hidden_size=config.model.tiny_hidden_size,
                            num_layers=config.model.tiny_layers)
    from transformers import AutoConfig

    local = Path(config.model.name_or_path).expanduser()
    return AutoConfig.from_pretrained(str(local) if local.is_dir() else config.model.name_or_path)


def check_architecture(report: DoctorReport, config: Config, model_ok: bool, gpu_free: list[int]) -> None:
    """The checkpoint's family, the image tokens the pixel budget gives, and the peak-memory estimate."""

    if not model_ok:
        report.add("architecture", "warn", "skipped: the model is not readable (see the model check)")
        return
    try:
        model_config = _model_config(config)
        family = family_of(model_config.model_type, config.model.name_or_path)
    except (OSError, ValueError) as exc:
        report.add("architecture", "fail", f"{type(exc).__name__}: {' '.join(str(exc).split())}",
                   "point model.name_or_path at a Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5 checkpoint")
        return
    traits = [f"patch {family.patch_size} x merge {family.merge_size} = {family.token_side}-px tokens",
              family.position_ids.split(":")[0]]
    traits += ["DeepStack"] * family.deepstack + ["linear-attention layers"] * family.linear_attention
    traits += ["template thinks unless told not to (rendered with enable_thinking=false)"] * family.thinking_template
    report.add("architecture", "ok", f"{family.name} ({family.model_type}): " + "; ".join(traits))

    settings = config.model
    low_pixels, high_pixels = family_pixel_budget(settings.min_pixels, settings.max_pixels, family.token_side)
    low_tokens = settings.min_pixels // (CONFIG_TOKEN_SIDE * CONFIG_TOKEN_SIDE)
    report.add("image tokens per sample", "ok",
               f"{low_tokens} to {max_image_tokens(settings)} (model.min_pixels/max_pixels count 28x28-px areas; "
               f"{family.name} gets {low_pixels} to {high_pixels} px)")

    if config.lora is not None and family.extra_lora_targets and \
            not set(family.extra_lora_targets) & set(config.lora.target_modules):
        report.add("lora targets", "warn", f"lora.target_modules has none of {', '.join(family.extra_lora_targets)}: "
                   f"{family.name}'s linear-attention layers would be adapted in their MLPs only",
                   "add them to lora.target_modules (as configs/qwen3.5-2b.yaml does)")
    estimate = estimate_training_memory(model_config, config)
    lora = "LoRA" if config.lora is not None else "full fine-tuning"
    on = "with" if estimate.gradient_checkpointing else "without"
    off = "without" if estimate.gradient_checkpointing else "with"
    batch = (f"a grouped micro-batch of {estimate.batch_questions} questions in {estimate.batch_tokens} tokens "
             f"(whole images)" if config.train.group_by_image else
             f"batch {config.train.per_device_batch_size} x {estimate.tokens_per_sample} tokens")
    detail = (f"{gib(estimate.total + CUDA_CONTEXT_BYTES)} peak per GPU for {batch}, {on} gradient "
              f"checkpointing: weights {gib(estimate.weights)} ({estimate.parameters / 1e9:.2f} B parameters), "
              f"{lora} state {gib(estimate.trainable_state)} ({estimate.trainable_parameters / 1e6:.1f} M trainable), "
              f"activations {gib(estimate.activations)}, logits {gib(estimate.logits)}, CUDA context "
              f"{gib(CUDA_CONTEXT_BYTES)}; {off} it: {gib(estimate.total_other + CUDA_CONTEXT_BYTES)}")
    need = estimate.total + CUDA_CONTEXT_BYTES
    if gpu_free and need > min(gpu_free):
        report.add("memory estimate", "warn", detail + f"; more than the {gib(min(gpu_free))} free on a GPU here",
                   "lower train.per_device_batch_size (raise train.grad_accum), model.max_pixels, or set "
                   "model.gradient_checkpointing: true")
    else:
        report.add("memory estimate", "ok", detail)


# --- training time: what the SLURM job's --time must hold ----------------------------------------------------

# Without a measured rate: tokens per second of one process training Qwen2-VL-2B's dimensions at batch 4 on one
# H200 (docs/benchmarks.md, "GPU (real dimensions)"), scaled down for larger models by their parameters (a
# token's matrix work grows with them). A first guess only: the overfit gate's measured rate replaces it in the
# training job's preflight.
REFERENCE_TOKENS_PER_S = {"lora": 2140.0, "full": 2700.0}
REFERENCE_PARAMETERS = 2_208_985_600
RATE_LOGS = ("train_log.jsonl", "sanity_log.jsonl")  # this run's training, else its overfit gate
TIME_MARGIN = 1.2  # the suggested slurm.time: the estimate plus a fifth
# The training job gets SIGUSR1 this long before its time limit, to save a checkpoint and requeue
# (run/slurm.py's USR1_LEAD_SECONDS; not imported: slurm imports this module).
SAVE_LEAD_SECONDS = 300


@dataclass
class TimeEstimate:
    """Training wall time as optimizer steps x the tokens they run / the measured or assumed tokens per second.

    Tokens are counted as the memory estimate counts them (``TEXT_TOKENS_PER_SAMPLE`` beside the image tokens of
    ``model.max_pixels``, on the safe side). Grouped (``train.group_by_image``), an image's prefix (system prompt
    and image) runs once per row for all its questions, each of which adds ``SEGMENT_TOKENS_PER_QUESTION``: a
    question costs ``prefix / questions per image + segment`` tokens instead of ``prefix + segment``."""

    steps: int
    questions_per_step: float  # over all processes
    tokens_per_question: float
    tokens_per_question_alone: int
    questions_per_image: float
    processes: int
    tokens_per_s: float  # of one process, as train_log.jsonl logs it
    rate_source: str

    @property
    def seconds(self) -> float:
        return self.steps * self.questions_per_step * self.tokens_per_question / (self.tokens_per_s * self.processes)


def measured_tokens_per_s(run_dir: Path) -> tuple[float, str] | None:
    """The median logged ``tokens_per_s`` of this run's training, else of its overfit gate; the first window is
    left out when there are others (it holds the start-up)."""
    for name in RATE_LOGS:
        try:
            rates = [row["tokens_per_s"] for _, row in iter_jsonl(run_dir / name, skip_bad=True)
                     if row.get("tokens_per_s")]
        except OSError:
            continue
        if rates:
            return statistics.median(rates[1:] or rates), name
    return None


def _parameter_count(config: Config) -> int:
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):  # no memory, no weights
        model = AutoModelForImageTextToText.from_config(_model_config(config))
    return sum(p.numel() for p in model.parameters())


def estimate_training_time(config: Config) -> TimeEstimate | None:
    """The training stage's wall time; None before ``prepare`` has written the training split."""
    try:
        counts = list(Counter((record.img_id, record.image)
                              for record in read_records(config.run_dir / "prepared" / "train.jsonl")).values())
    except (OSError, ValueError):
        return None
    if not counts:
        return None
    train, questions = config.train, sum(counts)
    processes = max(config.slurm.gpus, 1) * config.slurm.nodes
    alone = min(config.masking.max_length, max_image_tokens(config.model) + TEXT_TOKENS_PER_SAMPLE)
    if train.group_by_image:
        micro_batches = pack_images(counts, train.per_device_batch_size, train.seed)
        per_micro_batch = mean_questions(micro_batches, counts)
        accumulation = grouped_accumulation_steps(per_micro_batch, train.per_device_batch_size, train.grad_accum)
        per_step = accumulation * processes * per_micro_batch
        prefix = alone - SEGMENT_TOKENS_PER_QUESTION
        # An image with more questions than a row holds (masking.max_length) repeats its prefix in each row.
        per_row = max(1, (config.masking.max_length - prefix) // SEGMENT_TOKENS_PER_QUESTION)
        prefixes = sum(math.ceil(count / per_row) for count in counts)
        tokens = prefixes * prefix / questions + SEGMENT_TOKENS_PER_QUESTION
    else:
        per_step = train.per_device_batch_size * train.grad_accum * processes
        tokens = alone
    steps = train.max_steps if train.max_steps > 0 else math.ceil(train.epochs * questions / per_step)
    measured = measured_tokens_per_s(config.run_dir)
    if measured is not None:
        rate, source = measured[0], f"measured in {measured[1]}"
    else:
        recipe = "lora" if config.lora is not None else "full"
        parameters = _parameter_count(config)
        rate = REFERENCE_TOKENS_PER_S[recipe] * min(1.0, REFERENCE_PARAMETERS / parameters)
        source = (f"assumed: {recipe} rate of Qwen2-VL-2B on one H200 (docs/benchmarks.md) for "
                  f"{parameters / 1e9:.2f} B parameters; the overfit gate's log replaces it")
    return TimeEstimate(steps=steps, questions_per_step=per_step, tokens_per_question=tokens,
                        tokens_per_question_alone=alone, questions_per_image=questions / len(counts),
                        processes=processes, tokens_per_s=rate, rate_source=source)


def slurm_time_seconds(limit: str) -> float:
    """A SLURM time limit in seconds: minutes, minutes:seconds, hours:minutes:seconds or
    days-hours[:minutes[:seconds]]; UNLIMITED and infinite are math.inf."""
    if limit.lower() in ("unlimited", "infinite"):
        return math.inf
    days, _, time_of_day = limit.rpartition("-")
    parts = [int(part) for part in time_of_day.split(":")]
    if days:
        hours, minutes, seconds = [*parts, 0, 0][:3]
    else:
        hours, minutes, seconds = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def clock(seconds: float) -> str:
    """Seconds as SLURM writes a time limit: D-HH:MM:SS, or HH:MM:SS under a day."""
    seconds = math.ceil(seconds)
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


def training_time_check(config: Config) -> tuple[Status, str, str]:
    """(status, detail, fix) of the training time against ``slurm.time``: a shorter limit is a warning, not a
    failure, since the training job requeues itself and resumes (each run loses the minutes it saves in)."""
    estimate = estimate_training_time(config)
    if estimate is None:
        return "ok", "no prepared data yet: estimated once `surgvqa prepare` has run", ""
    alone, shared = estimate.tokens_per_question_alone, estimate.tokens_per_question
    tokens = (f"; grouped by image ({estimate.questions_per_image:.1f} questions per image): {shared:.0f} tokens per "
              f"question instead of {alone} ({alone / shared:.1f}x fewer)" if config.train.group_by_image else
              f"; {alone} tokens per question")
    detail = (f"training about {clock(estimate.seconds)}: {estimate.steps} optimizer steps of "
              f"~{estimate.questions_per_step:.0f} questions on {estimate.processes} process(es) at "
              f"{estimate.tokens_per_s:,.0f} tokens/s each ({estimate.rate_source}){tokens}")
    limit = slurm_time_seconds(config.slurm.time)
    if estimate.seconds <= limit - SAVE_LEAD_SECONDS:
        return "ok", detail + f"; within slurm.time {config.slurm.time}", ""
    runs = math.ceil(estimate.seconds / max(limit - SAVE_LEAD_SECONDS, 60))
    suggested = clock(estimate.seconds * TIME_MARGIN + SAVE_LEAD_SECONDS)
    shorter = f"{detail}; slurm.time {config.slurm.time} is shorter: the job stops and requeues itself about {runs - 1} time(s)"
    return "warn", shorter, f"set slurm.time='{suggested}' (the estimate plus a fifth), or keep it and let the job requeue"


def check_training_time(report: DoctorReport, config: Config, model_ok: bool) -> None:
    if not model_ok:
        report.add("training time", "warn", "skipped: the model is not readable (see the model check)")
        return
    try:
        report.add("training time", *training_time_check(config))
    except (OSError, ValueError) as exc:
        report.add("training time", "warn", f"not estimated: {type(exc).__name__}: {' '.join(str(exc).split())}")


# --- the report --------------------------------------------------------------------------------------------------

def run_doctor(config: Config, nvml: Any | None = None) -> DoctorReport:
    """Every preflight check; ``nvml`` replaces the pynvml module (tests pass a fake)."""
    report = DoctorReport()
    check_versions(report)
    gpus = check_gpus(report, nvml)
    check_torch_cuda(report, gpus)
    model_ok = check_model(report, config)
    check_data(report, config)
    check_disk(report, config, model_ok)
    check_image_tokens(report, config, model_ok)
    check_architecture(report, config, model_ok, report.gpu_free)
    check_training_time(report, config, model_ok)
    return report


def print_report(report: DoctorReport) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    colours = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    table = Table(title="surgvqa doctor", show_lines=False)
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for check in report.checks:
        table.add_row(check.name, Text(check.status, style=colours[check.status]), Text(check.detail),
                      Text(check.fix))
    console = Console(soft_wrap=True, highlight=False)
    console.print(table)
    failures = [check for check in report.checks if check.status == "fail"]
    if not failures:
        console.print("preflight passed")
        return
    # Also one unwrapped line per failure: batch logs are 80 columns wide and the table folds long details.
    console.print(f"preflight FAILED: {len(failures)} check(s) to fix first", style="bold red")
    for check in failures:
        console.print(Text(f"  {check.name}: {check.detail} -> {check.fix}"))
