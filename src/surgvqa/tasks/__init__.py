"""Tasks: one module per dataset (see :mod:`surgvqa.tasks.base` and docs/tasks.md).

Task modules are imported when first asked for, so that importing a stage does not import every dataset.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from surgvqa.tasks.base import Task

DEFAULT_TASK = "kvasir-vqa"
# Task name -> "module:class" under surgvqa.tasks.
TASK_MODULES = {
    "kvasir-vqa": "kvasir_vqa:KvasirVQA",
    "kvasir-vqa-x1": "kvasir_vqa_x1.task:KvasirVQAx1",
    "vqa-jsonl": "vqa_jsonl:VQAJsonl",
}
TASK_NAMES = tuple(TASK_MODULES)


@cache
def get_task(name: str | None = None) -> Task:
    """The task called ``name`` (the default task for None or "")."""
    name = name or DEFAULT_TASK
    if name not in TASK_MODULES:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    module_name, class_name = TASK_MODULES[name].split(":")
    module = importlib.import_module(f"surgvqa.tasks.{module_name}")
    return getattr(module, class_name)()
