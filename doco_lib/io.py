"""Crash-safe file writes and safe loads.

Everything a run writes goes to a temporary file in the same folder and is then renamed over the
target (`os.replace` is atomic on POSIX), so a kill at any moment leaves either the old file or the
new one, never half of one; folders (an exported UNet) are written the same way. A killed writer
leaves its temporary behind, named after its process and host; the next run that locks the folder removes it.
Checkpoints are read with `torch.load(weights_only=True)`, which refuses to unpickle arbitrary objects.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from doco_lib.errors import CorruptFileError, RunLocked

# `.{name}.{pid}@{host}.{8 random characters}.tmp`: the pid tells whether a writer of this host is still alive
# (another host's pid cannot be checked from here). Names without `@{host}` come from versions before hosts were
# recorded and are judged as this host's, as those versions did.
_TEMPORARY = re.compile(r"\..+\.(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9-]+))?\.[a-z0-9_]{8}\.tmp")
# Another host's temporary untouched this long belongs to a writer that died (a live one would have finished).
FOREIGN_TEMPORARY_AGE_S = 24 * 3600


def _host() -> str:
    """This machine's name as it goes into file names: letters, digits and '-' only."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()).strip("-") or "localhost"


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}@{_host()}."



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


def read_utf8(path: Path) -> str:
    """A text file's content; a file that is not UTF-8 is a CorruptFileError naming it and the first bad byte."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CorruptFileError(f"{path}: not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}); "
                               "save it as UTF-8.") from None


def atomic_write_bytes(data: bytes, path: Path) -> None:
    _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def write_text_if_changed(text: str, path: Path) -> Path:
    """`atomic_write_text` unless `path` already holds `text` (generated settings files keep their timestamps)."""
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(text, path)
    return path


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


def ignore_temporaries(directory: str, names: list[str]) -> list[str]:
    """`shutil.copytree`'s `ignore`: writers' temporaries, which vanish mid-copy when their writer renames them."""
    return [name for name in names if _TEMPORARY.fullmatch(name)]


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove the temporaries that killed writers left under `directory`: this host's whose process is gone, and
    another host's untouched for `FOREIGN_TEMPORARY_AGE_S` (on a shared filesystem a live writer on another node
    has a pid this host does not know, so its pid alone would get its temporary deleted mid-write)."""
    removed = []
    for path in sorted(Path(directory).rglob(".*.tmp")):
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or not os.path.lexists(path) or not _writer_gone(int(match["pid"]), match["host"], path):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _writer_gone(pid: int, host: str | None, path: Path) -> bool:
    if host in (None, _host()):
        return not _alive(pid)
    try:
        return time.time() - path.lstat().st_mtime > FOREIGN_TEMPORARY_AGE_S
    except FileNotFoundError:  # its writer renamed it, or another cleaner removed it, a moment ago
        return False


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



# What flock raises on filesystems without it (Lustre mounted without `-o flock`, some NFS setups).
_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK}
# For locks held only for one small write (a manifest update): another host's holder file this old is a dead one's.
WRITE_LOCK_STALE_AFTER_S = 600.0
_LOCK_POLL_S = 0.05


@contextlib.contextmanager
def exclusive_lock(path: Path, *, wait: bool = False, stale_after: float | None = None):
    """Hold an exclusive lock on the file `path` (created if absent): wait for it, or raise RunLocked at once when
    another process holds it.

    The lock is an `flock`, released by the kernel when its process dies, so a killed holder leaves no stale lock.
    Where the filesystem has no flock, the lock is the file `<path>.holder`, created exclusively and naming its host
    and pid: a holder on this host whose process is gone is taken over, one on another host (whose pid cannot be
    checked from here) only once the file is older than `stale_after` seconds (None: never; the message then says
    which file to delete)."""
    path = Path(path)
    with open(path, "a+") as handle:  # closing it releases the flock
        holder = None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RunLocked(f"{path} is locked by another process") from None
        except OSError as error:
            if error.errno not in _NO_FLOCK:
                raise
            holder = path.with_name(path.name + ".holder")
        if holder is not None:
            _take_holder_file(holder, wait, stale_after)
        try:
            yield
        finally:
            if holder is not None:
                holder.unlink(missing_ok=True)


def _take_holder_file(holder: Path, wait: bool, stale_after: float | None) -> None:
    while True:
        try:
            fd = os.open(holder, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{_host()} {os.getpid()}\n")
            return
        try:
            seen, age = holder.read_text(), time.time() - holder.stat().st_mtime
        except FileNotFoundError:  # released a moment ago
            continue
        host, _, pid = seen.strip().partition(" ")
        if (host == _host() and pid.isdigit() and not _alive(int(pid))) or (stale_after is not None and
                                                                             age > stale_after):
            _remove_stale_holder(holder, seen)
        elif not wait:
            who = f"process {pid} on host {host}" if pid.isdigit() else "a process that has not written its name yet"
            raise RunLocked(f"{holder} is held by {who} (this filesystem has no flock, so the lock is that file); "
                            f"if that process has ended, delete {holder}")
        else:
            time.sleep(_LOCK_POLL_S)


def _remove_stale_holder(holder: Path, seen: str) -> None:
    """Delete `holder` if it still reads `seen`. Takers on this host go one at a time, under an flock on a local
    file, so none deletes the holder file another taker has just created. (Takers on two hosts at once, of a holder
    older than `stale_after`, are not serialised: both may get the lock.)"""
    key = hashlib.sha256(str(holder.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"doco-takeover-{key}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if holder.read_text() == seen:
                holder.unlink()


@contextlib.contextmanager
def run_lock(directory: Path):
    """Hold an exclusive lock on `directory/.lock` (see `exclusive_lock`) while a run writes there; a second run
    refuses at once. The temporaries of a killed run's interrupted writes are removed once the lock is held."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(directory / ".lock"))
        except RunLocked as error:
            raise RunLocked(f"{directory} is in use by another run ({error}); wait for it to finish or choose "
                            "another run_name.") from None
        remove_stale_temporaries(directory)
        yield


def slug(text: str) -> str:
    """A file-name-safe lowercase form: "DoCo (cp)" → "doco_cp", "star + heart" → "star_heart"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
