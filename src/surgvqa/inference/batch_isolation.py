"""One batch of rows run so that a row that cannot be answered fails alone: `surgvqa predict` and the challenge
submission script (which copies this definition through surgvqa.export.inline) both answer through it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Answer = TypeVar("Answer")


def run_isolated(run: Callable[[list[int]], list[Answer]], indices: list[int],
                 failed: Callable[[int, BaseException], Answer], retrying: Callable[[str], None] = print
                 ) -> list[Answer]:
    """``run(indices)`` as one batch, one answer per index in order.

    Out of memory: the cached GPU memory is released and the batch halved and retried, down to one row, which
    alone becomes ``failed(index, error)``. Any other failure: the batch is retried row by row, so that one bad row
    (an unreadable image, an over-long prompt) cannot sink the others. ``retrying`` is told each retry in a line.
    A broken device (``torch.AcceleratorError``: a device-side assert, an illegal memory access) is raised at once:
    no row after it could be answered.
    """
    try:
        return run(indices)
    except getattr(torch, "AcceleratorError", ()):
        raise
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(indices) == 1:
            return [failed(indices[0], exc)]
        half = (len(indices) + 1) // 2
        retrying(f"out of memory on a batch of {len(indices)}; retrying as {half} + {len(indices) - half}")
        return [*run_isolated(run, indices[:half], failed, retrying),
                *run_isolated(run, indices[half:], failed, retrying)]
    except Exception as exc:  # noqa: BLE001 - any failure of one row is that row's error
        if len(indices) == 1:
            return [failed(indices[0], exc)]
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        retrying(f"a batch of {len(indices)} failed ({type(exc).__name__}: {first_line}); retrying row by row")
        return [answer for index in indices for answer in run_isolated(run, [index], failed, retrying)]
