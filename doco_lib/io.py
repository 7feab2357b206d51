"""Crash-safe file writes and safe loads.

Everything a run writes goes to a temporary file in the same folder and is then renamed over the
target (`os.replace` is atomic on POSIX), so a kill at any moment leaves either the old file or the
new one, never half of one. Checkpoints are read with `torch.load(weights_only=True)`, which refuses
to unpickle arbitrary objects.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(data: bytes, path: Path) -> None:
    _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_save_json(obj: Any, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def load_torch_checkpoint(path: Path) -> Any:
    """Load one of our own checkpoints; `weights_only=True` so no arbitrary object is ever unpickled."""
    return torch.load(path, map_location="cpu", weights_only=True)


class RunLocked(RuntimeError):
    """Another process is writing to the same run folder."""


@contextlib.contextmanager
def run_lock(directory: Path):
    """Hold an exclusive lock on `directory/.lock` while a run writes there; a second run refuses at once.

    The lock is an `flock`, released by the kernel when the process dies, so a killed run leaves no
    stale lock behind."""
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
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
