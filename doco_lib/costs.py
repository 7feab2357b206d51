"""What a run costs: wall time, peak memory, parameters trained and changed, bytes stored.

Records are JSON files: `<run>/costs/<phase>.json` for the phases the notebooks measure (anchors, warmup,
adversarial, evaluation, i2p) and `<trainer folder>/costs/training.json` (`<run>/<method>/costs/`), which the
training harness writes at export for every method.

Peak memory of a block is measured by a `Meter`:
  - GPU: `torch.cuda.max_memory_allocated` (and `_reserved`) of the current device, reset when the block starts;
  - CPU: the process's peak resident set, Linux's VmHWM, reset when the block starts by writing 5 to
    /proc/self/clear_refs, so it is the block's own peak (`peak_rss_scope: "phase"`). Where the reset is
    refused or there is no /proc, it is the process's peak so far (VmHWM, else `ru_maxrss`), and the record
    says so (`peak_rss_scope: "process lifetime"`).
Both are process-wide (every thread's allocations count; under a launch of several processes, each measures
its own). Meters nest: before any reset, every open meter takes the peaks reached so far, so an outer block's
peak is the maximum over its whole span, inner blocks included.
"""

from __future__ import annotations

import contextlib
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from doco_lib.io import atomic_save_json

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
MB = 2**20


def status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (Linux) in bytes; None where there is no such file."""
    if not STATUS.is_file():
        return None
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def _gpu_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _rss_peak() -> int:
    """VmHWM, or ru_maxrss where there is no /proc (kilobytes on Linux, bytes on macOS)."""
    hwm = status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _peaks_now() -> dict:
    """The peaks since the last reset."""
    gpu = _gpu_in_use()
    return {"peak_gpu_bytes": torch.cuda.max_memory_allocated() if gpu else None,
            "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved() if gpu else None,
            "peak_rss_bytes": _rss_peak()}


_open_meters: list[Meter] = []  # the meters measuring now, outermost first
_rss_resettable = True  # False once the kernel refused a reset of VmHWM


def _fold() -> None:
    """Every open meter takes the peaks reached so far (before a reset would lose them)."""
    peaks = _peaks_now()
    for meter in _open_meters:
        meter.take(peaks)


def reset_peak() -> None:
    """Start fresh peaks for the GPU (when in use) and for the resident set; open meters keep theirs."""
    global _rss_resettable
    _fold()
    if _gpu_in_use():
        torch.cuda.reset_peak_memory_stats()
    try:
        CLEAR_REFS.write_text("5")  # resets the resident-set high-water mark (VmHWM), Linux 4.0 and later
    except OSError:
        _rss_resettable = False


class Meter:
    """Wall time and peak memory of a `with` block; `reading()` gives them so far, inside the block or after."""

    def __init__(self):
        self.started = self.ended = None
        self.peaks = {"peak_gpu_bytes": None, "peak_gpu_reserved_bytes": None, "peak_rss_bytes": None}

    def take(self, peaks: dict) -> None:
        for key, value in peaks.items():
            if value is not None:
                self.peaks[key] = max(value, self.peaks[key] or 0)

    def __enter__(self) -> Meter:
        reset_peak()
        self.started = time.perf_counter()
        _open_meters.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _fold()
        _open_meters.remove(self)
        self.ended = time.perf_counter()

    def reading(self) -> dict:
        if self in _open_meters:
            _fold()
        return {"seconds": (self.ended or time.perf_counter()) - self.started, **self.peaks,
                "peak_rss_scope": "phase" if _rss_resettable and STATUS.is_file() else "process lifetime"}


def machine(device: torch.device | str | None = None) -> dict:
    """What the numbers were measured on: CPU model and torch's threads, the GPU (of `device`, else the current
    one when CUDA is in use), torch's version."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    device = torch.device(device) if device is not None else None
    on_gpu = device.type == "cuda" if device is not None else _gpu_in_use()
    return {"cpu": cpu, "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if on_gpu else None, "torch": torch.__version__}


def machine_label(machine: dict) -> str:
    """'NVIDIA H100 80GB HBM3, torch 2.5.1' or 'Intel(R) Xeon(R) …, 2 threads, torch 2.5.1'."""
    threads = machine.get("cpu_threads")
    where = machine.get("gpu") or f"{machine.get('cpu')}, {threads} thread{'' if threads == 1 else 's'}"
    return f"{where}, torch {machine.get('torch')}"


@contextlib.contextmanager
def phase(name: str, run_dir: Path):
    """Measure the block as phase `name`; the block may add counts to the yielded record. Written on success."""
    record = {"phase": name}
    with Meter() as meter:
        yield record
    record.update(meter.reading())
    record["gpu"] = torch.cuda.get_device_name() if _gpu_in_use() else None
    record["machine"] = machine()
    atomic_save_json(record, Path(run_dir) / "costs" / f"{name}.json")


class LoopCost:
    """The cost of a trainer's iterations over all its sessions (each call of its `run`), a resumed run's
    earlier processes included: `to_json` goes into the checkpoint with the session still open measured up to
    that checkpoint, `load` takes it back. Sessions without an iteration are left out."""

    def __init__(self):
        self.sessions: list[dict] = []
        self._open = None  # (meter, trainer, first step) of the session running now

    @contextlib.contextmanager
    def session(self, trainer):
        """Measure the block as a session of `trainer`'s iterations (from its `step` before to its `step` after)."""
        first = trainer.step
        with Meter() as meter:
            self._open = (meter, trainer, first)
            try:
                yield
            finally:
                self._open = None
        if trainer.step > first:
            self.sessions.append(_session(meter, first, trainer.step))

    def to_json(self) -> str:
        sessions = list(self.sessions)
        if self._open is not None and self._open[1].step > self._open[2]:
            meter, trainer, first = self._open
            sessions.append(_session(meter, first, trainer.step))
        return json.dumps(sessions)

    def load(self, text: str | None) -> None:
        """Sessions from a checkpoint (None: a checkpoint written before costs were recorded)."""
        self.sessions = json.loads(text) if text else []


def _session(meter: Meter, first: int, last: int) -> dict:
    return {"first_step": first, "last_step": last, **meter.reading()}


def weight_memory(model: torch.nn.Module, trained: set[str], weight_dtype: torch.dtype,
                  original: torch.dtype | str | None = None) -> dict[str, int]:
    """Bytes a training run holds for `model`'s weights before any activation, by part: the weights in
    `weight_dtype` with the `trained` ones (names) in float32, their float32 gradients, Adam's two float32 moments,
    and the original denoiser as the method keeps it (`original`): None (it reads none), "shared" (the trained
    parameters' starting values, in `weight_dtype`) or a dtype (a separate copy in it). Works on the meta device, so
    full configs are sized without their weights."""
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    n_trained, n_all = sum(sizes[name] for name in trained), sum(sizes.values())
    width = torch.finfo(weight_dtype).bits // 8
    if original is None:
        kept = 0
    elif original == "shared":
        kept = n_trained * width
    else:
        kept = n_all * torch.finfo(original).bits // 8
    return {"weights": (n_all - n_trained) * width + n_trained * 4, "gradients": n_trained * 4,
            "adam": n_trained * 8, "original": kept}


def stored_bytes(path: Path) -> int:
    """A file's size, or the total size of the files in a folder (recursively)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def training_record(trainer, paths: dict[str, Path]) -> dict:
    """The cost of `trainer`'s run (an ErasureTrainer, its files exported to `paths`):
      - seconds: its sessions' wall time summed; peaks: their maximum (per process, the main one's);
      - iterations: its step; measured_iterations: those inside a measured session (fewer when it resumed a
        checkpoint written before costs were recorded);
      - gradient_checkpointing: whether the run checkpointed (`auto` resolved by its memory check);
      - trainable_params: Σ numel of `trainer.params`; changed_params: Σ [p ≠ p₀] elementwise over them, p₀
        the weights the run started from (`trainer.original`); every other UNet parameter is frozen
        (requires_grad off, in no optimizer), so it is unchanged; unet_params: all the UNet's parameters;
      - stored_bytes: each exported path's bytes (the full UNet folder, the delta, D, ...)."""
    sessions = trainer.loop_cost.sessions
    peaks = {key: max((s[key] for s in sessions if s[key] is not None), default=None)
             for key in ("peak_gpu_bytes", "peak_gpu_reserved_bytes", "peak_rss_bytes")}
    changed = sum(int((p.detach().cpu() != trainer.original[name]).sum()) for name, p in trainer.params.items())
    return {"phase": "training", "method": trainer.method, "trainable": trainer.config.trainable,
            "gradient_checkpointing": trainer.gradient_checkpointing,
            "iterations": trainer.step, "measured_iterations": sum(s["last_step"] - s["first_step"] for s in sessions),
            "sessions": len(sessions), "seconds": sum(s["seconds"] for s in sessions), **peaks,
            "peak_rss_scope": None if not sessions else "phase" if all(s["peak_rss_scope"] == "phase" for s in sessions)
            else "process lifetime",
            "trainable_params": sum(p.numel() for p in trainer.params.values()), "changed_params": changed,
            "unet_params": sum(p.numel() for p in trainer.unet.parameters()),
            "stored_bytes": {name: stored_bytes(path) for name, path in paths.items()},
            "machine": machine(trainer.device)}


def write_training_record(trainer, paths: dict[str, Path]) -> Path:
    """`training_record` as `<trainer folder>/costs/training.json`."""
    path = trainer.run_dir / "costs" / "training.json"
    atomic_save_json(training_record(trainer, paths), path)
    return path
