"""The stages of a run, one module each with a ``run(config, ...)`` that the CLI and the pipeline both call.

A stage module is imported when first asked for (:func:`stage`): the stages load torch, which must come after
the run directory's lock is taken (a second writer is refused first) and never for ``surgvqa --help``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# In the order `surgvqa run` runs them; tests/stages/test_stage_table.py checks that each has its module.
STAGE_NAMES = ("prepare", "diagnose", "overfit", "train", "baseline", "predict", "evaluate")


class GateFailed(RuntimeError):
    """A gate failed (masking diagnostic, sanity overfit); the message says what and how to continue."""


def stage(name: str) -> ModuleType:
    """The module of stage ``name``, imported now."""
    if name not in STAGE_NAMES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGE_NAMES)}")
    return importlib.import_module(f"surgvqa.stages.{name}")
