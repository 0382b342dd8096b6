"""Shared fixtures: the offline tiny model and a prepared synthetic split, built once per test session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: a second intra-op thread per worker (and per subprocess it starts)
    # would wait on a core the other worker holds, which makes every op many times slower.
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Every test runs as CI does: no hub access, whatever the caller's environment says."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("surgvqa-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(session_cache) -> Path:
    from surgvqa.models.tiny import ensure_tiny_model

    return ensure_tiny_model(session_cache / "models", arch="qwen2_vl", seed=0, min_pixels=56 * 56,
                             max_pixels=112 * 112)


@pytest.fixture(scope="session")
def demo_config_overrides(session_cache, tmp_path_factory) -> list[str]:
    """Overrides that point the embedded default config at session-scoped folders."""
    runs = tmp_path_factory.mktemp("runs")
    return [f"output_dir={runs}", f"cache_dir={session_cache}"]


@pytest.fixture(scope="session")
def prepared_demo(demo_config_overrides) -> Path:
    """The default config's synthetic data, prepared once; returns the prepared folder."""
    from surgvqa.core.config import load_config
    from surgvqa.stages.prepare import prepare

    config = load_config(None, demo_config_overrides)
    return prepare(config, quiet=True).prepared_dir


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine OpenMP threads that wait for a
    descheduled sibling make every op 10-50x slower. Used per module (``pytestmark = usefixtures(...)``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_run_command(session_cache):
    """``surgvqa run`` on a run small enough to repeat a dozen times (20 synthetic images, 6 training steps, a
    checkpoint every 2), as a subprocess, optionally with a failpoint armed (``surgvqa.core.faults``)."""
    import subprocess
    import sys

    from surgvqa.core.faults import ENVIRONMENT_VARIABLE

    repo = Path(__file__).resolve().parents[1]

    def run(output_dir: Path, failpoint: str | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        settings = [f"output_dir={output_dir}", "run_name=small", f"cache_dir={session_cache}",
                    "data.synthetic.images=20", f"train.max_steps={run.steps}",
                    f"train.save_steps={run.save_steps}", "train.logging_steps=1",
                    "train.per_device_batch_size=8", "predict.batch_size=8", "evaluate.bootstrap_samples=200",
                    *run.calibration]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(repo / "src")}
        env.pop(ENVIRONMENT_VARIABLE, None)
        if failpoint:
            env[ENVIRONMENT_VARIABLE] = failpoint
        command = [sys.executable, "-m", "surgvqa", "run", "--skip-sanity", *extra,
                   *(arg for item in settings for arg in ("--set", item))]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)

    run.steps, run.save_steps = 6, 2
    # Calibrated on the validation split's predictions: confidences, conformal answer sets.
    run.calibration = ["predict.calibration=overall", "predict.conformal_alpha=0.1"]
    run.overrides = lambda output_dir: [f"output_dir={output_dir}", "run_name=small", f"cache_dir={session_cache}",
                                        "data.synthetic.images=20", "predict.batch_size=8", *run.calibration]
    return run


@pytest.fixture(scope="session")
def small_run(small_run_command, tmp_path_factory) -> Path:
    """The small run, trained and evaluated once, never interrupted; returns its run directory."""
    output_dir = tmp_path_factory.mktemp("small-run")
    result = small_run_command(output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir / "small"
