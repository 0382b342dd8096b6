"""The ``baseline`` stage: the untrained base model's predictions, the reference every trained number is read
against (``predictions.untrained.jsonl``)."""

from __future__ import annotations

from pathlib import Path

from surgvqa.core.config import Config
from surgvqa.models.loading import resolve_model_path
from surgvqa.stages import predict


def output_path(config: Config) -> Path:
    return config.run_dir / "predictions.untrained.jsonl"


def run(config: Config, *, quiet: bool = False, restart: bool = False, replace_other: bool = False) -> Path:
    return predict.run(config, out=output_path(config), model_path=resolve_model_path(config), quiet=quiet,
                       restart=restart, replace_other=replace_other)
