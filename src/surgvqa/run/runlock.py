"""One writer per run directory: an OS lock on ``<run_dir>/.lock`` held while a command writes there."""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from surgvqa.core.io import WriteError, write_failure_reason
from surgvqa.core.run_folder import LOCK_FILE, claim_run_directory


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory's lock."""


def _holder(handle) -> str:
    handle.seek(0)
    try:
        holder = json.loads(handle.read() or "{}")
    except ValueError:
        return "pid unknown"
    command = holder.get("command")
    return f"pid {holder.get('pid', 'unknown')}" + (f", `{command}`" if command else "")


def _cannot_write(run_dir: Path, exc: OSError) -> WriteError:
    return WriteError(f"cannot write {run_dir}: {write_failure_reason(exc)}")


def _command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]) if sys.argv else "unknown"


@contextmanager
def run_directory_lock(run_dir: str | Path, command: str | None = None, *, adopt: bool = False) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the block; raise :class:`RunDirectoryBusy` at once if another process has it.
    Holding it, claim the folder (``core.run_folder``): one surgvqa did not make is refused unless ``adopt``.

    ``flock``: the kernel drops the lock when its holder dies, so no stale lock ever blocks; the pid and command
    written into the file only let the refusal say who holds it."""
    run_dir = Path(run_dir)
    lock_path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: the holder's pid must still be readable by the process that is refused.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, as every file
    except OSError as exc:
        raise _cannot_write(run_dir, exc) from None
    with os.fdopen(fd, "r+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryBusy(f"{run_dir} is in use by another surgvqa process ({_holder(handle)}); "
                                   "wait for it or use another run_name") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "command": command or _command_line()}))
            handle.flush()
        except OSError as exc:
            raise _cannot_write(run_dir, exc) from None
        try:
            claim_run_directory(run_dir, adopt=adopt)
            yield lock_path
        finally:
            # Empty the record before the kernel drops the lock, so the file never names a finished process.
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
