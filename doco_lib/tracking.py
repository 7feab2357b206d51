"""Experiment tracking of a training run through accelerate's trackers (`tracker: tensorboard | wandb`).

What is logged, by the main process only, with step = the iteration (the `step` of training_log.csv):
  - every iteration: the numbers of its log record (losses, D's accuracy, the surgery's cosine, seconds) and
    the learning rates of the optimizers (`lr` the UNet's or SPM's adapters', as scheduled; `disc_lr` D's);
  - every `tracker_sample_every` iterations: `samples`, a grid of the trained model's images, the first target
    prompt in the top row and its anchor prompt below, from fixed seeds (`seed`, `seed + 1`), with the run's
    `num_inference_steps` and `guidance_scale`. Sampling leaves the trajectory as it was: its noise comes from
    its own generators and torch's random state is restored after it;
  - at export: the cost record's numbers (`costs.training_record`) as `cost/...`.

The files go to `<run>/<method>/tracking/`: TensorBoard's into `<tracker_project>/`, wandb's offline runs into
`wandb/` (offline unless WANDB_MODE says otherwise; `wandb sync` uploads them). A resumed run appends to the same
TensorBoard folder after cutting what the interrupted process logged past its last checkpoint out of the earlier
event files (`truncate_event_files`), so the folder holds each step once whatever order a reader takes its files in
(TensorBoard's own `purge_step` relies on the files' names sorting by start time); under wandb each process's
session is a run of its own, grouped as `<run_name>/<method>`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from doco_lib.errors import ParamsError
from doco_lib.figures import image_grid
from doco_lib.io import atomic_write_bytes
from doco_lib.models import text_encoders
from doco_lib.sampling import generate

TRACKERS = ("none", "tensorboard", "wandb")
# How to install each tracker's package, for the params check.
INSTALL = {"tensorboard": "pip install tensorboard==2.21.0 (a dependency of doco-lab: pip install -e .)",
           "wandb": "pip install -e '.[tracking]' (wandb==0.31.0)"}
FOLDER = "tracking"
SAMPLE_SEEDS = 2  # images per prompt in a sample grid
SAMPLE_GRID_SIDE = 128  # pixels an image of the grid is at least (nearest upscaling of small toy images)


def check_tracker(key: str, value: str) -> None:
    """A params check: the tracker's package is installed."""
    if value != "none" and importlib.util.find_spec(value) is None:
        raise ParamsError(f"{key}: {value} needs the {value} package ({INSTALL[value]}); or use "
                          f"{' or '.join(t for t in TRACKERS if t != value)}.")


def accelerator_arguments(tracker: str, run_dir: Path) -> dict:
    """`Accelerator`'s `log_with` and `project_dir` for `tracker`; none for `tracker: none`."""
    if tracker == "none":
        return {}
    return {"log_with": tracker, "project_dir": str(Path(run_dir) / FOLDER)}


def truncate_event_files(folder: Path, first_step: int) -> None:
    """Drop from the TensorBoard event files in `folder` every summary logged at `first_step` or later (what a killed
    process logged past the checkpoint a resumed one starts from), and their restart markers; each file is
    rewritten atomically, and only when it changes."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*tfevents*")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = []
        for record in records:
            event = event_pb2.Event.FromString(record)
            late = event.HasField("summary") and event.step >= first_step
            if not (late or event.HasField("session_log")):
                kept.append(record)
        if len(kept) == len(records):
            continue
        buffer = io.BytesIO()
        writer = RecordWriter(buffer)
        for record in kept:
            writer.write(record)
        atomic_write_bytes(buffer.getvalue(), path)


class RunTracking:
    """The tracking of one trainer (an ErasureTrainer built with `accelerator_arguments`): trackers start at its
    first logged value and end at `finish`; every method does nothing under `tracker: none`."""

    def __init__(self, trainer, pipe):
        self.trainer = trainer
        self.config = trainer.config
        self.active = self.config.tracker != "none" and trainer.accelerator.is_main_process
        self.pipe = pipe if self.active and self.config.tracker_sample_every else None  # sampling only
        self.started = False

    def _start(self, first_step: int) -> None:
        """Start the trackers, `first_step` the first step this process logs."""
        trainer, config = self.trainer, self.config
        folder = Path(trainer.accelerator.logging_dir)
        folder.mkdir(parents=True, exist_ok=True)
        group = f"{trainer.run_dir.parent.name}/{trainer.run_dir.name}"
        wandb = {"dir": str(folder), "group": group, "name": group}
        if "WANDB_MODE" not in os.environ:
            wandb["mode"] = "offline"
        if config.tracker == "tensorboard":
            truncate_event_files(folder / config.tracker_project, first_step)
        init = {"wandb": wandb}
        # Trackers take numbers, strings and booleans: a list setting (uce_preserve) as one string.
        settings = {key: ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                    for key, value in asdict(config).items()}
        settings.update(target=trainer.spec.target, anchor=trainer.spec.anchor, kind=trainer.spec.kind)
        trainer.accelerator.init_trackers(config.tracker_project, config=settings, init_kwargs=init)
        self.started = True

    def log_iteration(self, record: dict) -> None:
        """An iteration's log record (its numbers) and the learning rates; a sample grid when one is due."""
        if not self.active:
            return
        if not self.started:
            self._start(record["step"])
        trainer = self.trainer
        values = {key: float(value) for key, value in record.items()
                  if key != "step" and isinstance(value, (int, float))}
        values["lr"] = trainer.opt_g.param_groups[0]["lr"]
        discriminator_optimizer = getattr(trainer, "opt_d", None)  # DoCo's only
        if discriminator_optimizer is not None:
            values["disc_lr"] = discriminator_optimizer.param_groups[0]["lr"]
        step = record["step"]
        trainer.accelerator.log(values, step=step)
        if self.pipe is not None and step % self.config.tracker_sample_every == 0:
            self._log_grid(self.sample_grid(), step)

    def sample_grid(self):
        """The trained model's images of the first target prompt (top row) and its anchor prompt, one column a
        seed, as a PIL image; torch's random state, the UNet's mode and its components' devices as before."""
        trainer, config, pipe = self.trainer, self.config, self.pipe
        anchor_prompt, target_prompt = trainer.prompt_pairs[0]
        seeds = [config.seed + i for i in range(SAMPLE_SEEDS)]
        prompts = [target_prompt] * SAMPLE_SEEDS + [anchor_prompt] * SAMPLE_SEEDS
        device = trainer.device
        # On GPUs the trainer keeps the text encoders and the VAE on the CPU: here only while sampling.
        elsewhere = {module: module.device for module in (*text_encoders(pipe), pipe.vae) if module.device != device}
        training = trainer.unet.training
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), trainer.accelerator.autocast():
                for module in elsewhere:
                    module.to(device)
                trainer.unet.eval()
                # One batch of all the images: `generate` measures no batch size (its peak-memory probe would
                # reset the peaks the run's cost meter reads).
                images = generate(pipe, prompts, seeds + seeds, config.num_inference_steps, config.guidance_scale,
                                  batch_size=len(prompts))
        finally:
            trainer.unet.train(training)
            for module, where in elsewhere.items():
                module.to(where)
        return image_grid(images, SAMPLE_SEEDS, scale=max(1, SAMPLE_GRID_SIDE // images.shape[-1]))

    def _log_grid(self, grid, step: int) -> None:
        for tracker in self.trainer.accelerator.trackers:
            if tracker.name == "tensorboard":  # an (N, H, W, C) array; wandb takes PIL images
                tracker.log_images({"samples": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
                tracker.tracker.flush()  # on disk now, as accelerate's `log` leaves the scalars
            else:
                tracker.log_images({"samples": [grid]}, step=step)

    def finish(self, cost_record: Path) -> None:
        """Log the numbers of the cost record (`costs.write_training_record`'s file) at the run's step, then end
        the trackers: not with `Accelerator.end_training`, which also ends a launch's process group."""
        if not self.active:
            return
        if not self.started:
            self._start(self.trainer.step + 1)
        record = json.loads(Path(cost_record).read_text())
        values = {f"cost/{key}": value for key, value in record.items() if _is_number(value)}
        values.update({f"cost/stored_bytes/{name}": size for name, size in record["stored_bytes"].items()})
        self.trainer.accelerator.log(values, step=self.trainer.step)
        for tracker in self.trainer.accelerator.trackers:
            tracker.finish()
        self.trainer.accelerator.trackers.clear()  # a later `run` starts them afresh
        self.started = False


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
