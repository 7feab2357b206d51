"""The interactive explorer of notebook 06: the original and erased models side by side, step by step.

Pure functions do the work: find the erased runs under `outputs/`, denoise one (prompt, seed) while
recording every step, add or remove weight deltas on the base UNet, and ask a DoCo discriminator how
"anchor-like" a prediction is. `Explorer` only wraps them in ipywidgets and runs generation in a
background thread, with a progress bar and a cancel button.

The denoising loop is the one `StableDiffusionPipeline.__call__` runs (same initial noise as
`doco_lib.sampling.generate`, same guidance, same scheduler steps, so the final image is the pipeline's),
written out because the pipeline's step callback sees neither the noise prediction nor the predicted x0:
the explorer keeps both, the guided x0 to show and the text-conditional ε_θ(x_t, c, t), which is what
DoCo's discriminator was trained on.
"""

from __future__ import annotations

import copy
import html
import io
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from safetensors.torch import load_file

from doco_lib.app.notebooks import REPO_ROOT
from doco_lib.figures import to_pil
from doco_lib.methods.deltas import apply_delta
from doco_lib.methods.discriminator import NLayerDiscriminator
from doco_lib.methods.prediction import predicted_x0
from doco_lib.models import load_pipeline, pick_device
from doco_lib.sampling import initial_latents

ORIGINAL = "original"
DISPLAY_SIZE = 160  # pixels per image in the UI


def enter_repo_root() -> None:
    """Work from the repository root, as papermill and `doco` do: params paths are relative to it, but
    JupyterLab starts a notebook's kernel in `notebooks/`."""
    if Path.cwd().resolve() == (REPO_ROOT / "notebooks").resolve():
        os.chdir(REPO_ROOT)


# ---------------------------------------------------------------------------------------------- erased runs
@dataclass(frozen=True)
class ErasedRun:
    """A folder written by `ErasureTrainer.export`: `unet/`, `erasure.json`, usually `delta.safetensors`,
    and for DoCo `discriminator.safetensors`."""

    name: str  # the folder relative to output_root, e.g. "toy_world/doco"
    folder: Path
    info: dict  # erasure.json: method, base_model, target, anchor, config (JSON)

    @property
    def unet_dir(self) -> Path:
        return self.folder / "unet"

    @property
    def delta_path(self) -> Path | None:
        path = self.folder / "delta.safetensors"
        return path if path.is_file() else None

    @property
    def discriminator_path(self) -> Path | None:
        path = self.folder / "discriminator.safetensors"
        return path if path.is_file() else None

    @property
    def config(self) -> dict:
        return json.loads(self.info.get("config", "{}"))

    @property
    def label(self) -> str:
        return f"{self.name} · {self.info.get('method', '?')}: {self.info.get('target', '?')} → " \
               f"{self.info.get('anchor', '?')}"


def find_erased_runs(output_root: str | Path) -> list[ErasedRun]:
    """Every exported erased model under `output_root` (a folder with erasure.json and unet/config.json)."""
    root = Path(output_root)
    if not root.is_dir():
        return []
    runs = []
    for info_path in sorted(root.rglob("erasure.json")):
        folder = info_path.parent
        if (folder / "unet" / "config.json").is_file():
            runs.append(ErasedRun(folder.relative_to(root).as_posix(), folder, json.loads(info_path.read_text())))
    return runs


# ---------------------------------------------------------------------------------------------- generation
class Cancelled(Exception):
    """Generation was stopped by the cancel button (or any set `cancel` event)."""


@dataclass
class Trace:
    """One model's denoising of one (prompt, seed): the final image and what it predicted at every step."""

    image: torch.Tensor  # (3, H, W) in [0, 1]
    x0_latents: torch.Tensor  # (steps, C, h, w): the guided prediction of x0 at each step (see `x0_image`)
    timesteps: torch.Tensor  # (steps,)
    latents: torch.Tensor  # (steps, C, h, w): x_t, the UNet's input at each step
    text_eps: torch.Tensor  # (steps, C, h, w): ε_θ(x_t, c, t) for the prompt alone, without guidance


@torch.no_grad()
def encode_prompt(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, empty-prompt) text embeddings, as the pipeline computes them for classifier-free guidance."""
    return pipe.encode_prompt(prompt, pipe.unet.device, 1, True)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Scaled latents → images in [0, 1], as the pipeline's `output_type="pt"`."""
    images = [pipe.vae.decode(chunk.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
              for chunk in latents.split(batch_size)]
    return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1).cpu()


@torch.no_grad()
def denoise(pipe, unet, embeddings: tuple[torch.Tensor, torch.Tensor], seed: int, steps: int, guidance: float,
            on_step: Callable[[], None] | None = None, cancel: threading.Event | None = None) -> Trace:
    """Sample one image with `unet` in place of the pipeline's, from the noise of `seed`, recording each step."""
    if pipe.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"the explorer reads x0 from ε-predictions; this scheduler predicts "
                         f"{pipe.scheduler.config.prediction_type!r}")
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # its own state: one per run and thread
    scheduler.set_timesteps(steps, device=unet.device)
    alphas_cumprod = scheduler.alphas_cumprod.to(unet.device)
    text, empty = embeddings
    guided = guidance > 1  # the pipeline skips the unconditional pass at guidance ≤ 1
    conditions = torch.cat([empty, text]) if guided else text
    latents = initial_latents(pipe, [seed]).to(unet.device, unet.dtype) * scheduler.init_noise_sigma
    inputs, text_eps, x0 = [], [], []
    for t in scheduler.timesteps:
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        model_input = scheduler.scale_model_input(torch.cat([latents] * len(conditions)), t)
        eps = unet(model_input, t, encoder_hidden_states=conditions).sample
        eps_text = eps[-1:]
        if guided:
            eps = eps[:1] + guidance * (eps_text - eps[:1])
        inputs.append(latents[0].float().cpu())
        text_eps.append(eps_text[0].float().cpu())
        x0.append(predicted_x0(latents.float(), eps.float(), alphas_cumprod, t.view(1).long())[0].cpu())
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step()
    return Trace(image=decode(pipe, latents)[0], x0_latents=torch.stack(x0), timesteps=scheduler.timesteps.cpu(),
                 latents=torch.stack(inputs), text_eps=torch.stack(text_eps))


def x0_image(pipe, trace: Trace, step: int) -> torch.Tensor:
    """The predicted x0 of step `step` (0-based) as an image; decoded on demand, as the step slider moves."""
    return decode(pipe, trace.x0_latents[step:step + 1].to(pipe.vae.device))[0]


def compare(pipe, unets: dict[str, torch.nn.Module], prompt: str, seed: int, steps: int, guidance: float,
            on_step: Callable[[], None] | None = None, cancel: threading.Event | None = None) -> dict[str, Trace]:
    """The same prompt and starting noise through each UNet (label → UNet), in order."""
    embeddings = encode_prompt(pipe, prompt)
    return {label: denoise(pipe, unet, embeddings, seed, steps, guidance, on_step, cancel)
            for label, unet in unets.items()}


# ---------------------------------------------------------------------------------------------- deltas and D
@torch.no_grad()
def compose_unet(base, delta_paths: list[Path], reuse=None):
    """A UNet holding base + Σ deltas; `reuse` (an earlier composition of the same base) is overwritten in place."""
    unet = reuse if reuse is not None else copy.deepcopy(base)
    unet.load_state_dict(base.state_dict())
    for path in delta_paths:
        apply_delta(unet, path)
    return unet


def load_discriminator(run: ErasedRun, in_channels: int, device: torch.device | str = "cpu"):
    """The run's DoCo discriminator, built from the settings in its erasure.json, in eval mode."""
    cfg = run.config
    disc = NLayerDiscriminator(in_channels, cfg["disc_channels"], cfg["disc_layers"], cfg["disc_norm"],
                               cfg["disc_final_stride"])
    disc.load_state_dict(load_file(str(run.discriminator_path)))
    return disc.to(device).eval()


@torch.no_grad()
def anchor_probability(disc, trace: Trace, alphas_cumprod: torch.Tensor, disc_input: str = "x0",
                       gan_mode: str = "vanilla") -> torch.Tensor:
    """Per step, D's belief that the prompt's prediction comes from the anchor concept (1) and not the target (0).

    D sees what it saw in training: the text-conditional prediction as noise (`eps`) or as x0. Vanilla D
    outputs logits (probability = mean sigmoid over patches); an LSGAN D regresses to 1/0, clamped here."""
    device = next(disc.parameters()).device
    eps = trace.text_eps.to(device)
    view = predicted_x0(trace.latents.to(device), eps, alphas_cumprod.to(device), trace.timesteps.long().to(device)) \
        if disc_input == "x0" else eps
    logits = disc(view).flatten(1)
    scores = logits.sigmoid() if gan_mode == "vanilla" else logits.clamp(0, 1)
    return scores.mean(1).cpu()


def png_bytes(image: torch.Tensor, display_size: int = DISPLAY_SIZE) -> bytes:
    """PNG of a (3, H, W) image, enlarged (nearest) or shrunk to about `display_size` pixels wide."""
    picture = to_pil(image)
    scale = display_size / picture.width
    if scale >= 2:
        picture = picture.resize((picture.width * int(scale), picture.height * int(scale)), resample=Image.NEAREST)
    elif scale < 1:
        picture = picture.resize((display_size, round(picture.height * scale)))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- the widget
class Explorer:
    """ipywidgets UI: `display(explorer.ui)`. Columns: the original model, each selected erased model as
    trained, and "base + deltas" (the base UNet plus the weight deltas whose toggles are on)."""

    TRACE_CACHE_SIZE = 16

    def __init__(self, output_root: str = "outputs", model: str = "toy", device: str = "auto", run_name: str = "",
                 prompt: str = "a photo of a star", seed: int = 0, steps: int = 25, guidance: float = 5.0):
        """The models `run_name` itself trained (`output_root/run_name/<method>/`, not its ablation runs) are
        selected at start."""
        import ipywidgets as w


        self.output_root = Path(output_root)
        self.device = pick_device(device)
        self.runs = {run.name: run for run in find_erased_runs(self.output_root)}
        self._pipes, self._unets, self._discriminators = {}, {}, {}
        self._composed = None  # one composed UNet per base model, overwritten for each toggle state
        self._traces: OrderedDict = OrderedDict()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self.results: dict[str, Trace] = {}
        self._results_pipe = None
        self._step_images: dict = {}  # column label → the Image widget of its predicted x0
        self.probabilities: dict[str, dict[str, torch.Tensor]] = {}  # D's run → column → per-step P(anchor)
        self.error: BaseException | None = None
        self.seconds = self.load_seconds = 0.0  # of the last generation

        models = sorted({model, *(run.info.get("base_model", "toy") for run in self.runs.values())})
        self.base_model = w.Dropdown(options=models, value=model, description="base model")
        self.erased = w.SelectMultiple(description="erased", rows=min(8, max(2, len(self.runs))),
                                       layout=w.Layout(width="560px"))
        self.prompt = w.Text(value=prompt, description="prompt", layout=w.Layout(width="560px"))
        self.seed = w.BoundedIntText(value=seed, min=0, max=2**31 - 1, description="seed")
        self.steps = w.IntSlider(value=steps, min=1, max=100, description="steps")
        self.guidance = w.FloatSlider(value=guidance, min=0.0, max=20.0, step=0.5, description="guidance")
        self.generate_button = w.Button(description="generate", button_style="primary", icon="play")
        self.cancel_button = w.Button(description="cancel", icon="stop", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="progress")
        self.status = w.HTML()
        self.toggles_box = w.VBox()
        self.toggles: dict[str, w.Checkbox] = {}  # run name → "apply its delta" checkbox
        self.columns_box = w.HBox()
        self.step_slider = w.IntSlider(value=1, min=1, max=1, description="step", disabled=True,
                                       continuous_update=True)
        self.discriminator_panel = w.HTML()

        self.base_model.observe(lambda _: self._list_runs(), "value")
        self.erased.observe(lambda _: self._build_toggles(), "value")
        self.generate_button.on_click(lambda _: self.generate())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.step_slider.observe(lambda _: self._show_step(), "value")
        self._list_runs(preselect=run_name)

        self.ui = w.VBox([
            w.HBox([self.base_model, self.erased]), self.prompt, w.HBox([self.seed, self.steps, self.guidance]),
            w.HBox([self.generate_button, self.cancel_button, self.progress]), self.status,
            w.HTML("<b>weight deltas</b> (on: added to the base UNet in the “base + deltas” column)"),
            self.toggles_box, self.columns_box, self.step_slider,
            w.HTML("<b>discriminator</b>: P(anchor) of the prompt's prediction at this step"),
            self.discriminator_panel])

    # ------------------------------------------------------------------ selection
    def _list_runs(self, preselect: str = "") -> None:
        """The erased runs made from the chosen base model; select those of run `preselect`."""
        base = self.base_model.value
        matching = [run for run in self.runs.values() if run.info.get("base_model", "toy") == base]
        self.erased.options = [(run.label, run.name) for run in matching]
        self.erased.value = tuple(run.name for run in matching if run.folder.parent.name == preselect
                                  and run.folder.parent.parent == self.output_root)
        self._build_toggles()

    def _build_toggles(self) -> None:
        import ipywidgets as w

        previous = {name: box.value for name, box in self.toggles.items()}
        self.toggles = {}
        for name in self.erased.value:
            run = self.runs[name]
            if run.delta_path is not None:
                box = w.Checkbox(value=previous.get(name, True), description=f"erase {run.info.get('target', '?')} "
                                 f"({name})", indent=False, layout=w.Layout(width="560px"))
                box.observe(lambda _: self._on_toggle(), "value")
                self.toggles[name] = box
        self.toggles_box.children = list(self.toggles.values()) or [w.HTML("<i>none: select an erased run "
                                                                           "that saved a delta</i>")]

    def _on_toggle(self) -> None:
        """Redraw with the new set of deltas: only the "base + deltas" column is recomputed (cache)."""
        was_running = self.running
        if was_running:  # restart with the new set rather than finish a stale one
            self.cancel()
            self.wait()
        if self.results or was_running:
            self.generate()

    # ------------------------------------------------------------------ models
    def _pipe(self):
        model = self.base_model.value
        if model not in self._pipes:
            # One base model in memory at a time, with the erased UNets made for it.
            self._pipes = {model: load_pipeline(model, str(self.device))}
            self._unets, self._composed = {}, None
        return self._pipes[model]

    def _erased_unet(self, run: ErasedRun, dtype: torch.dtype):
        from diffusers import UNet2DConditionModel

        if run.name not in self._unets:
            self._unets[run.name] = UNet2DConditionModel.from_pretrained(
                run.unet_dir, dtype=dtype, use_safetensors=True).to(self.device).eval()
        return self._unets[run.name]

    def _discriminator(self, run: ErasedRun, in_channels: int):
        if run.name not in self._discriminators:
            self._discriminators[run.name] = load_discriminator(run, in_channels, self.device)
        return self._discriminators[run.name]

    def composed_label(self) -> str:
        applied = [self.runs[name].info.get("target", name) for name, box in self.toggles.items() if box.value]
        return f"base + deltas ({', '.join(applied)})" if applied else "base + deltas (none)"

    def columns(self) -> list[tuple[str, tuple, Callable]]:
        """(label, cache key, UNet factory) for each column of the current selection."""
        pipe = self._pipe()
        base_key = ("base", self.base_model.value)
        columns = [(ORIGINAL, base_key, lambda: pipe.unet)]
        for name in self.erased.value:
            run = self.runs[name]
            columns.append((name, ("run", str(run.unet_dir)), lambda run=run: self._erased_unet(run, pipe.unet.dtype)))
        deltas = [self.runs[name].delta_path for name, box in self.toggles.items() if box.value]
        if deltas:
            def composed():
                self._composed = compose_unet(pipe.unet, deltas, reuse=self._composed)
                return self._composed

            columns.append((self.composed_label(), (*base_key, "deltas", *map(str, deltas)), composed))
        elif self.toggles:  # every delta off: the base UNet itself
            columns.append((self.composed_label(), base_key, lambda: pipe.unet))
        return columns

    # ------------------------------------------------------------------ generation
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def generate(self) -> threading.Thread:
        """Start generating the current selection in a background thread (returns it; `wait()` joins it)."""
        if self.running:
            self.status.value = "already generating: wait, or press cancel"
            return self._thread
        request = dict(prompt=self.prompt.value, seed=int(self.seed.value), steps=int(self.steps.value),
                       guidance=float(self.guidance.value))
        self._cancel.clear()
        self.error = None
        self.generate_button.disabled, self.cancel_button.disabled = True, False
        self.status.value = "loading models…"
        self._thread = threading.Thread(target=self._generate, kwargs=request, daemon=True)
        self._thread.start()
        return self._thread

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _generate(self, prompt: str, seed: int, steps: int, guidance: float) -> None:
        started = time.perf_counter()
        try:
            pipe = self._pipe()
            columns = self.columns()
            keys = {label: (*key, prompt, seed, steps, guidance) for label, key, _ in columns}
            unets = {label: make_unet() for label, _, make_unet in columns if keys[label] not in self._traces}
            self.load_seconds = time.perf_counter() - started  # first use of a model: reading its weights
            started = time.perf_counter()
            self.progress.value, self.progress.max = 0, max(1, steps * len(unets))
            self.status.value = f"generating {len(unets)} of {len(columns)} columns…"

            def advance():
                self.progress.value += 1

            for label, trace in compare(pipe, unets, prompt, seed, steps, guidance, advance, self._cancel).items():
                self._traces[keys[label]] = trace
            for key in keys.values():
                self._traces.move_to_end(key)  # least recently shown first out
            results = {label: self._traces[key] for label, key in keys.items()}
            while len(self._traces) > self.TRACE_CACHE_SIZE:
                self._traces.popitem(last=False)
            self.results, self.probabilities = results, self._judge(pipe, results)
            self._results_pipe = pipe  # decodes the step slider's x0, whatever the base dropdown says by then
            self.seconds = time.perf_counter() - started
            self.status.value = f"done in {self.seconds:.2f} s: {len(unets)} of {len(columns)} columns computed, " \
                                f"{steps} steps each" + (f" (+ {self.load_seconds:.1f} s loading models)"
                                                         if self.load_seconds >= 0.05 else "")
            self._show_results(steps)
        except Cancelled:
            self.status.value = "<span style='color:#b45309'>cancelled</span>"
        except Exception as error:  # shown in the UI; the thread must not die silently
            self.error = error
            self.status.value = f"<span style='color:#b91c1c'>error: {type(error).__name__}: " \
                                f"{html.escape(str(error))}</span>"
        finally:
            self.generate_button.disabled, self.cancel_button.disabled = False, True

    def _judge(self, pipe, results: dict[str, Trace]) -> dict[str, dict[str, torch.Tensor]]:
        from diffusers import DDPMScheduler

        alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod  # as in training
        probabilities = {}
        for name in results:
            run = self.runs.get(name)  # the columns of erased runs are labelled by run name
            if run is None or run.discriminator_path is None:
                continue
            disc = self._discriminator(run, pipe.unet.config.in_channels)
            cfg = run.config
            probabilities[name] = {label: anchor_probability(disc, trace, alphas_cumprod, cfg.get("disc_input", "x0"),
                                                             cfg.get("gan_mode", "vanilla"))
                                   for label, trace in results.items()}
        return probabilities

    # ------------------------------------------------------------------ display
    def _show_results(self, steps: int) -> None:
        import ipywidgets as w

        size = w.Layout(width=f"{DISPLAY_SIZE}px", height=f"{DISPLAY_SIZE}px")
        self._step_images, columns = {}, []
        for label, trace in self.results.items():
            self._step_images[label] = w.Image(format="png", layout=size)
            columns.append(w.VBox([w.HTML(f"<b style='word-break:break-all'>{html.escape(label)}</b>",
                                          layout=w.Layout(width=f"{DISPLAY_SIZE}px")),
                                   w.Image(value=png_bytes(trace.image), format="png", layout=size),
                                   w.HTML("predicted x0 at this step"), self._step_images[label]],
                                  layout=w.Layout(margin="0 12px 0 0")))
        self.columns_box.children = columns
        self.step_slider.max = steps
        self.step_slider.disabled = False
        if self.step_slider.value == steps:
            self._show_step()
        else:
            self.step_slider.value = steps  # the observer redraws

    def _show_step(self) -> None:
        if not self.results:
            return
        steps = len(next(iter(self.results.values())).timesteps)
        index = min(self.step_slider.value, steps) - 1
        for label, trace in self.results.items():
            self._step_images[label].value = png_bytes(x0_image(self._results_pipe, trace, index))
        if not self.probabilities:
            self.discriminator_panel.value = "<i>no selected run saved a discriminator (DoCo runs do)</i>"
            return
        t = int(next(iter(self.results.values())).timesteps[index])
        header = "".join(f"<th style='padding:0 8px'>{html.escape(label)}</th>" for label in self.results)
        rows = ""
        for name, by_column in self.probabilities.items():
            run = self.runs[name]
            cells = "".join(f"<td style='padding:0 8px;text-align:center'>{float(p[index]):.2f}</td>"
                            for p in by_column.values())
            rows += f"<tr><td>D of {html.escape(name)} ({run.info.get('target')} vs {run.info.get('anchor')})</td>" \
                    f"{cells}</tr>"
        self.discriminator_panel.value = (f"<div>step {index + 1} of {steps} (t = {t}); 1: looks like the anchor, "
                                          f"0: like the target</div><table><tr><th></th>{header}</tr>{rows}</table>")
