"""Whose files a run folder holds: surgvqa replaces and deletes only what it wrote.

A run folder carries a marker (``.surgvqa-run``) written when surgvqa creates it. A folder without one that
already holds other files is not surgvqa's: it is refused, or, adopted knowingly (``surgvqa run --force``), its
files at that moment are listed in the marker and protected for good (``core.io.protect_foreign_files``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from surgvqa.core.io import ForeignFileError, atomic_write_json, protect_foreign_files, shown_names

MARKER = ".surgvqa-run"
LOCK_FILE = ".lock"  # the run lock's file, made before the folder is claimed (run.runlock)
# What a run folder made before the marker existed holds (the ledger, the resolved config, prepare's summary, which
# is also what a user copies in from another run to skip preparing, `surgvqa slurm`'s chain): such a folder is
# surgvqa's own.
EARLIER_RUN_FILES = ("stages.json", "config.resolved.yaml", "prepared/summary.json", "slurm/RUN_ALL.sh")


class ForeignRunFolder(ForeignFileError):
    """A run folder that surgvqa did not create holds other files, and adopting it was not asked for."""


def _entries(run_dir: Path) -> list[str]:
    return sorted(entry.name for entry in run_dir.iterdir() if entry.name not in (MARKER, LOCK_FILE))


def _files_under(run_dir: Path) -> list[str]:
    found = []
    for parent, folders, files in os.walk(run_dir):  # links to folders are listed, never followed
        found += [os.path.join(parent, name) for name in files]
        found += [os.path.join(parent, name) for name in folders if os.path.islink(os.path.join(parent, name))]
    top = {str(run_dir / MARKER), str(run_dir / LOCK_FILE)}
    return sorted(os.path.relpath(path, run_dir) for path in found if path not in top)


def claim_run_directory(run_dir: str | Path, *, adopt: bool = False) -> list[str]:
    """Make sure ``run_dir`` is surgvqa's to write in, and protect the files it did not write; returns them
    (relative paths). Call it holding the folder's lock."""
    run_dir = Path(run_dir)
    marker = run_dir / MARKER
    if marker.is_file():
        try:
            foreign = list(json.loads(marker.read_text(encoding="utf-8")).get("foreign", []))
        except (OSError, ValueError, AttributeError):
            raise ForeignRunFolder(f"{marker} is damaged: surgvqa cannot tell which files in {run_dir} are its "
                                   "own; restore it, or start a new run_name") from None
        present = [name for name in foreign if os.path.lexists(run_dir / name)]
        if present != foreign:  # moved away by the user: what surgvqa writes there later is its own
            foreign = present
            atomic_write_json(marker, {**json.loads(marker.read_text(encoding="utf-8")), "foreign": foreign})
    else:
        entries = _entries(run_dir) if run_dir.is_dir() else []
        earlier_run = any((run_dir / name).is_file() for name in EARLIER_RUN_FILES)
        foreign = [] if not entries or earlier_run else _files_under(run_dir)
        if foreign and not adopt:
            raise ForeignRunFolder(
                f"{run_dir} was not made by surgvqa and holds other files ({shown_names(entries)}; e.g. "
                f"{foreign[0]}): choose another run_name or output_dir, or run `surgvqa run --force` to use it "
                "anyway (surgvqa never replaces or deletes a file it did not write)")
        atomic_write_json(marker, {"created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                   "adopted": bool(entries), "foreign": foreign})
    protect_foreign_files(run_dir / name for name in foreign)
    return foreign
