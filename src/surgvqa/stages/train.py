"""The ``train`` stage: fine-tune the run's model on its prepared training split (LoRA or every weight)."""

from __future__ import annotations

from surgvqa.core.config import Config
from surgvqa.training.trainer import TrainResult, train


def run(config: Config, *, resume: bool = False, restart: bool = False) -> TrainResult:
    """Train, or continue the latest checkpoint made with the same settings (``resume``); ``restart`` discards
    an unfinished training's checkpoints instead of refusing them."""
    return train(config, resume=resume, restart=restart)
