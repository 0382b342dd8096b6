"""Shared fixtures: the offline tiny model and a prepared synthetic split, built once per test session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
    from surgvqa.tiny import ensure_tiny_model

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
    from surgvqa.config import load_config
    from surgvqa.prepare import prepare

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
