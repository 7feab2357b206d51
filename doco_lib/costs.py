"""What a phase of a run costs: wall time and peak memory, written to `<run>/costs/<phase>.json`.

Peak memory is the GPU's `torch.cuda.max_memory_allocated` when CUDA is in use, else the process's peak
resident set (Linux VmHWM, reset at the start of the phase; elsewhere the process's peak so far). Phases
add their own counts (images, iterations), so that rates such as images/s follow from the record.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from doco_lib.io import atomic_save_json

STATUS = Path("/proc/self/status")


def status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (Linux) in bytes; None where there is no such file."""
    if not STATUS.is_file():
        return None
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def reset_peak() -> None:
    """Start a fresh peak for the GPU (when in use) and for the process's resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets the resident-set high-water mark (VmHWM)


def peak_memory() -> dict:
    gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"peak_gpu_bytes": torch.cuda.max_memory_allocated() if gpu else None,
            "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved() if gpu else None,
            "gpu": torch.cuda.get_device_name() if gpu else None,
            "peak_rss_bytes": status_bytes("VmHWM")}


@contextlib.contextmanager
def phase(name: str, run_dir: Path):
    """Measure the block as phase `name`; the block may add counts to the yielded record. Written on success."""
    record = {"phase": name}
    reset_peak()
    started = time.perf_counter()
    yield record
    record["seconds"] = time.perf_counter() - started
    record.update(peak_memory())
    atomic_save_json(record, Path(run_dir) / "costs" / f"{name}.json")
