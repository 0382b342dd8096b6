"""The process group of a run launched as several processes (``torchrun``, ``accelerate launch``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


@contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """(rank, world size) from the launcher's environment; a group that nobody has initialised yet is initialised
    here and destroyed on exit."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        yield 0, 1
        return
    owned = dist.is_available() and not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield rank, world
    finally:
        if owned:
            dist.destroy_process_group()


def barrier(world: int) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()
