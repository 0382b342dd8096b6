"""What the benchmark scripts share: the machine's description, the load average, writing the result.

Imported as ``_common``: running ``python benchmarks/<script>.py`` puts the scripts' folder first on sys.path.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from surgvqa.core.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def gpu_names() -> list[str] | None:
    """The NVIDIA GPUs nvidia-smi lists, or None on a machine without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True, check=False)
    names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return names if done.returncode == 0 and names else None


def machine_info(*, with_python: bool = False) -> dict:
    """CPU model (``model name`` in /proc/cpuinfo), core count, GPU names (nvidia-smi); the Python version if asked."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    info: dict[str, Any] = {"cpu": model, "cores": os.cpu_count(), "gpu": gpu_names()}
    if with_python:
        info["python"] = platform.python_version()
    return info


def write_result(name: str, payload: dict, *, indent: int | None = 2) -> dict:
    """Write ``benchmarks/results/<name>.json`` (temporary file + rename), print the payload as one JSON line
    and return it."""
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(payload, indent=indent) + "\n")
    print(json.dumps(payload))
    return payload


def run_at_once(runs: dict[str, list[str]], log_dir: Path) -> None:
    """Start every command at once, one torch thread each and offline, each logging to ``log_dir/<name>.log``;
    wait for them all and exit non-zero naming the first that failed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    running = []
    for name, command in runs.items():
        log = (log_dir / f"{name}.log").open("w")
        running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    for name, process, log in running:
        if process.wait() != 0:
            sys.exit(f"{name} failed: see {log.name}")
        log.close()
        print(f"{name} done", flush=True)
