"""Preflight before spending GPU hours: versions, GPUs and who else holds their memory, paths, disk, image tokens.

Each check is one line (ok / warn / fail) with the fix next to it. The most expensive failure it catches is a
GPU whose memory another process already holds: training then dies with an out-of-memory error after the queue
wait and the model load, or runs at a fraction of the batch size. NVML answers that in milliseconds without
creating a CUDA context (which would itself take memory on the GPU).
"""

from __future__ import annotations

import importlib
import os
import platform
import pwd
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from surgvqa.config import Config

GIB = 1024**3
DISK_WARN_GIB = 20.0
DISK_FAIL_GIB = 2.0
CHECKPOINT_FACTOR = 3  # weights + optimizer state + the previous checkpoint kept by save_total_limit

Status = Literal["ok", "warn", "fail"]


def _load_pynvml() -> Any:
    return importlib.import_module("pynvml")


# Tests replace this with a function returning a fake module (see tests/test_doctor.py).
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
    from surgvqa.data.images import allowed_image_roots
    from surgvqa.data.records import Record
    from surgvqa.dataset import SampleTooLong, encode_example, load_image
    from surgvqa.io import iter_jsonl
    from surgvqa.modeling import load_processor, resolve_model_path

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
