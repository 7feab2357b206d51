"""Crash-safe file writes and safe loads.

Everything a run writes goes to a temporary file in the same folder and is then renamed over the
target (`os.replace` is atomic on POSIX), so a kill at any moment leaves either the old file or the
new one, never half of one; folders (an exported UNet) are written the same way. A killed writer
leaves its temporary behind, named after its process; the next run that locks the folder removes it.
Checkpoints are read with `torch.load(weights_only=True)`, which refuses to unpickle arbitrary objects.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


# `.{name}.{pid}.{8 random characters}.tmp`: the pid tells whether the writer is still alive.
_TEMPORARY = re.compile(r"\..+\.(\d+)\.[a-z0-9_]{8}\.tmp")


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


class CorruptFileError(ValueError):
    """A file the run reads is damaged or not of the expected kind; the message names it and what to do."""


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from error  # name the target, not the temporary
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error(error)
        if cause is not None:  # the same OSError subclass (PermissionError, …), naming the target
            raise OSError(cause.errno, cause.strerror, str(path)) from error
        raise


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind `error`: torch.save reports a failed write (a full disk) as a RuntimeError raised
    while handling it."""
    while error is not None and not (isinstance(error, OSError) and error.errno):
        error = error.__cause__ or error.__context__
    return error


def atomic_write_bytes(data: bytes, path: Path) -> None:
    _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_save_json(obj: Any, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda handle: torch.save(obj, handle))


@contextlib.contextmanager
def atomic_directory(path: Path):
    """Yield a temporary folder to fill; on success it replaces `path`, so readers see the old folder, the
    new one, or (after a kill between the two renames) none, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
            os.replace(path, old)  # an empty folder is replaced, a full one is not
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove the temporaries that killed writers left under `directory` (their process is gone)."""
    removed = []
    for path in sorted(Path(directory).rglob(".*.tmp")):
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or _alive(int(match.group(1))) or not os.path.lexists(path):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def load_torch_checkpoint(path: Path) -> Any:
    """Load one of our own checkpoints; `weights_only=True` so no arbitrary object is ever unpickled."""
    return torch.load(path, map_location="cpu", weights_only=True)


class RunLocked(RuntimeError):
    """Another process is writing to the same run folder."""


@contextlib.contextmanager
def run_lock(directory: Path):
    """Hold an exclusive lock on `directory/.lock` while a run writes there; a second run refuses at once.

    The lock is an `flock`, released by the kernel when the process dies, so a killed run leaves no
    stale lock behind; the temporaries of its interrupted writes are removed once the lock is held."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunLocked(f"{directory} is in use by another run (lock {directory / '.lock'}); wait for it to finish "
                        "or choose another run_name.") from None
    try:
        remove_stale_temporaries(directory)
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def slug(text: str) -> str:
    """A file-name-safe lowercase form: "DoCo (cp)" → "doco_cp", "star + heart" → "star_heart"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
