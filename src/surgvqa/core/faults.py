"""Failpoints: named places where a test makes this process die, to prove that a rerun recovers."""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from collections.abc import Callable

# Written here because the failpoint libraries (etcd's gofail, fail-rs) serve Go and Rust, not Python.
ENVIRONMENT_VARIABLE = "SURGVQA_FAILPOINT"

_hits: Counter = Counter()
_stage: list[str] = []


def enter_stage(name: str | None) -> None:
    """The pipeline stage now running (None between stages): failpoints are addressed per stage."""
    _stage[:] = [name] if name else []


def _armed() -> tuple[str, int, signal.Signals] | None:
    spec = os.environ.get(ENVIRONMENT_VARIABLE)
    if not spec:
        return None
    place, hit, *rest = spec.split(":")
    return place, int(hit), signal.Signals[f"SIG{rest[0]}" if rest else "SIGKILL"]


def failpoint(name: str, before_death: Callable[[], None] | None = None) -> None:
    """``SURGVQA_FAILPOINT="<place>:<hit>[:<signal>]"``: send this process ``signal`` (default KILL) the ``hit``-th
    time it reaches ``place``, ``<stage>/<name>`` inside ``surgvqa run`` or the bare ``<name>``; unset, a no-op."""
    armed = _armed()
    if armed is None:
        return
    place, hit, signum = armed
    full = f"{_stage[0]}/{name}" if _stage else name
    if place not in (full, name):
        return
    _hits[place] += 1
    if _hits[place] != hit:
        return
    if before_death is not None:
        before_death()
    print(f"failpoint {place} (hit {hit}): sending {signum.name}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signum)
