"""The run's files on disk: written so that a kill or a full disk leaves the old or the new version, never half."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from surgvqa.core.faults import failpoint

_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class WriteError(OSError):
    """A file could not be written (full disk, file-size limit, read-only folder); the old content is intact."""


class ForeignFileError(WriteError):
    """surgvqa was about to replace or delete a file it did not write (see :func:`protect_foreign_files`)."""


# Files surgvqa found in a run folder it adopted (``surgvqa run --force``) and so never replaces or deletes; every
# writer and remover below checks this set, so no stage can take such a file whatever path it takes to it.
_foreign: set[Path] = set()


def protect_foreign_files(paths: Iterable[str | Path]) -> None:
    """Refuse, for the rest of this process, to replace or delete any of ``paths`` (absolute)."""
    _foreign.update(Path(os.path.abspath(path)) for path in paths)


def foreign_file_under(path: str | Path) -> Path | None:
    """A protected file at ``path`` or under it (a folder about to be replaced whole), or None."""
    if not _foreign:
        return None
    path = Path(os.path.abspath(path))
    # One the user has since moved away is no longer in the way. Only a real folder can hold one: a file's
    # check is one look-up, however many files an adopted folder holds.
    if path in _foreign and os.path.lexists(path):
        return path
    if path.is_symlink() or not path.is_dir():
        return None
    return next((foreign for foreign in sorted(_foreign)
                 if path in foreign.parents and os.path.lexists(foreign)), None)


def check_not_foreign(path: str | Path, action: str = "replace") -> None:
    """Raise :class:`ForeignFileError` when ``path`` is, or holds, a file surgvqa did not write."""
    foreign = foreign_file_under(path)
    if foreign is not None:
        raise ForeignFileError(f"{foreign} was not written by surgvqa (it was in the run folder when surgvqa "
                               f"adopted it), and surgvqa would {action} it: move it out of the run folder "
                               "or choose another run_name; nothing of yours was deleted")


def umask() -> int:
    """The process's umask: from /proc where Linux shows it, else read by setting it and setting it back (which
    another thread creating a file at that instant would see)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_mode(folder: str | Path) -> None:
    """Give ``folder`` and what is under it at least the bits that ``open()`` and ``mkdir`` give under the umask:
    safetensors writes its weights 0600 and ``mkdtemp`` makes 0700 folders, so no one else on a shared cluster
    could load a saved model."""
    mask = umask()
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        try:
            status = path.lstat()
            if stat.S_ISLNK(status.st_mode):
                continue
            mode = stat.S_IMODE(status.st_mode)
            wanted = mode | ((0o777 if stat.S_ISDIR(status.st_mode) else 0o666) & ~mask)
            if wanted != mode:
                os.chmod(path, wanted)
        except OSError:
            pass  # one we cannot chmod keeps its mode


def remove_file(path: str | Path) -> None:
    """Delete a file surgvqa wrote (missing is fine); a file it did not write is refused."""
    check_not_foreign(path, "delete")
    Path(path).unlink(missing_ok=True)


def remove_tree(path: str | Path) -> None:
    """Delete a folder surgvqa wrote, ignoring errors as ``shutil.rmtree(ignore_errors=True)``; a folder holding a
    file surgvqa did not write is refused."""
    check_not_foreign(path, "delete")
    shutil.rmtree(path, ignore_errors=True)


def write_failure_reason(exc: OSError) -> str:
    """Why a write failed, in the user's words."""
    if exc.errno in _NO_SPACE:
        return "no space left or file-size limit reached"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only folder?)"
    return exc.strerror or str(exc)


def describe_write_failure(path: Path, exc: OSError) -> str:
    return f"cannot write {path}: {write_failure_reason(exc)}; its previous content is unchanged"


# How the writers that do not raise OSError report a full disk: torch's zip writer checks its position after each
# write (`[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598`, or `PytorchStreamWriter failed
# writing file ...`), and safetensors' Rust serializer formats the OS error into its own message.
_FULL_DISK_TEXTS = ("unexpected pos", "PytorchStreamWriter failed", "file write failed", "No space left on device",
                    "os error 28", "Disk quota exceeded", "File too large")


def is_disk_full(exc: BaseException) -> bool:
    """A write that failed for want of space (a full disk, a quota or the file-size limit), whoever wrote it."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _NO_SPACE
    text = str(exc)
    return "Reader" not in text and any(marker in text for marker in _FULL_DISK_TEXTS)


def disk_full_error(path: str | Path) -> WriteError:
    """The one-line error for a full disk while ``path`` (a file, or the folder being written) was written."""
    path = Path(path)
    try:
        free = f"{shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free / 2**20:,.0f} MB"
    except (OSError, StopIteration):
        free = "unknown"
    return WriteError(f"disk full while writing {path} ({free} free now): free space on its disk, or point "
                      "output_dir at another, and rerun the same command")


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # fsync on a directory is advisory on some filesystems
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    check_not_foreign(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The name pattern is what remove_stale_temporaries looks for after a kill.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(describe_write_failure(path, exc)) from None
    try:
        # mkstemp makes 0600 files, and the rename keeps that mode: a report nobody else on a shared cluster can
        # read. The mode an ordinary open() gives instead: 0666 less the umask.
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        failpoint("io.write")
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(describe_write_failure(path, exc)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def jsonl_text(rows: Iterable[dict[str, Any]]) -> str:
    """Rows as JSON lines: one object per line, each ended by a newline, non-ASCII text kept as is."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines atomically; returns the number of rows."""
    rows = list(rows)
    atomic_write_text(path, jsonl_text(rows))
    return len(rows)


def append_lines(path: str | Path, lines: Iterable[str]) -> None:
    """Append whole lines to a file and force them to disk; a full disk is a :class:`WriteError`.

    A kill leaves at most one torn last line, which the reader of an append-only file drops (see
    ``prediction_files.read_done``); a write that fails part-way is cut back off, so the file ends on a whole line.
    """
    path = Path(path)
    check_not_foreign(path, "append to")
    data = "".join(lines).encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise WriteError(describe_write_failure(path, exc)) from None
    position = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        try:
            os.ftruncate(fd, position)
        except OSError:
            pass  # the reader drops a torn last line anyway
        raise WriteError(describe_write_failure(path, exc)) from None
    finally:
        os.close(fd)


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def replace_directory(staged: str | Path, target: str | Path) -> Path:
    """Swap a finished directory in for ``target``: the old one is renamed aside, the new one renamed in, and
    only then is the old one deleted. A kill at any instant leaves the old or the new complete directory (a
    kill between the two renames leaves the old one aside, which :func:`recover_directory` puts back)."""
    staged, target = Path(staged), Path(target)
    check_not_foreign(target)
    _apply_umask_to_folder(staged)
    aside = _aside(target)
    if aside.exists() and target.exists():
        shutil.rmtree(aside)  # a previous swap finished its renames but was killed while deleting
    try:
        if target.exists():
            os.replace(target, aside)
            failpoint("io.replace_directory")
        os.replace(staged, target)
    except OSError as exc:
        recover_directory(target)
        raise WriteError(describe_write_failure(target, exc)) from None
    _fsync_directory(target.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return target


def _apply_umask_to_folder(folder: Path) -> None:
    """Give ``folder`` the mode mkdir gives under the umask (0777 less it): a staging folder made by
    ``tempfile.mkdtemp`` is 0700, and the swap would keep that (the folders under it were made by mkdir)."""
    try:
        os.chmod(folder, 0o777 & ~umask())
    except OSError:
        pass  # a folder we cannot chmod keeps its mode; the swap itself does not depend on it


def recover_directory(target: str | Path) -> bool:
    """Put back a directory that an interrupted :func:`replace_directory` left aside; True if it did."""
    target = Path(target)
    aside = _aside(target)
    if aside.is_dir() and not target.exists():
        os.replace(aside, target)
        return True
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    return False


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporary files that writes killed before their rename left in ``folder`` (recursively); only
    call it while holding the folder's lock, so that no live writer's file is taken. Returns how many."""
    folder = Path(folder)
    # `surgvqa app` writes under <run>/app/ without the run's lock: its files are its own to finish.
    stale = [path for path in folder.rglob(".*.tmp")
             if path.is_file() and path.relative_to(folder).parts[0] != "app" and foreign_file_under(path) is None]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


class JsonlLineError(ValueError):
    """A line of a JSON-lines file that is not a JSON object; names file and line number."""


def iter_jsonl(path: str | Path, *, skip_bad: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, object) for each non-empty line. Bad lines raise, or are skipped when asked."""
    path = Path(path)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                obj, problem = None, str(exc)
            else:
                problem = "" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
            if problem:
                if skip_bad:
                    continue
                raise JsonlLineError(f"{path}:{number}: not a JSON object line ({problem})")
            yield number, obj


def file_fingerprint(path: Path, *, recursive: bool = False, full_paths: bool = False) -> str | None:
    """Names, sizes and modification times of a file or a folder's files (None: no file): changes when any of
    them is rewritten, so a result computed from them is not reused."""
    found = (path.rglob("*") if recursive else path.iterdir()) if path.is_dir() else [path]
    files = [file for file in sorted(found) if file.is_file()]
    if not files:
        return None
    return ";".join(f"{file if full_paths else file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}"
                    for file in files)


def content_digest(path: Path) -> str | None:
    """The SHA-256 of a file's bytes (None: no file). Unlike :func:`file_fingerprint` it stays the same when the
    same content is written again: a prepare or predict run that rewrites identical files changes nothing."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shown_names(names: list[str], limit: int = 5) -> str:
    """The first few of a folder's entries for a one-line message: ``a, b, c and 4 more``."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
