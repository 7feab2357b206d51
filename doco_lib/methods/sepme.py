"""SepME: separable multi-concept erasure, one weight increment per concept.

Zhao, Zhang, Zheng, Kong, Yin, "Separable Multi-Concept Erasure from Diffusion Models", arXiv:2402.05947
(2024). Reference code: github.com/Dlut-lab-zmn/SRS-ME (its extended version, SRS-ME; the scripts still
say SepME). What the code does is summarised in shared/methods/sepme.md; this module is our own design.

Weight decoupling. Only the cross-attention K/V matrices change (`attn2.to_k`, `attn2.to_v`, what
`select_trainable(unet, "cross_attention_kv")` selects); they are the only weights that read the text
embedding. For concept i, stack the token rows (every position: 77 on SD v1) of the text embeddings of the empty
prompt "" and of the *other* known concepts' prompts into E (N×d), and let B_i (m×d) be an orthonormal
basis of its null space. The increment of every K/V layer is

    ΔW_i = P_i · (scale · B_i),        P_i (out×m) trainable, zeros at the start,

so ΔW_i·e = 0 (up to rounding) for each row e of E: with concept i's increment in place, the
unconditional branch of classifier-free guidance and the other concepts' prompts produce the keys and
values they had.

On an MMDiT (SD 3.x, FLUX.1) no attention reads the text embeddings: each joint block's text-stream K/V
(`attn.add_k_proj`, `attn.add_v_proj`) read the text stream as the blocks before it left it, so a null space of the
embeddings says nothing there. The one linear map that reads them is the transformer's `context_embedder` (SD 3.x:
the CLIP states zero-padded to T5's width and joined with T5's rows; FLUX.1: T5's rows), and the increment goes on
its weight alone (`registry.SEPME_PARAMETERS`), with B_i the null space of every row it reads of "" and of the other
concepts (SD 3.x: 77 CLIP rows and 256 T5 rows a prompt, or the zero rows of a pipeline without T5; FLUX.1: 512 T5
rows) in its input width. ΔW_i·e = 0 then leaves the transformer's whole input, hence its whole output, for those
prompts as it was. The pooled embedding's projection is not edited: it reads one pooled vector a prompt, whose null
space would have to hold all of them, and the token rows alone carry a prompt's words into the blocks. Room: the
null space is empty unless the rows are fewer than the width, so SD 3.5 (4096 wide) can decouple a concept against
"" and at most 11 other prompts, FLUX.1 against "" and at most 6; the tiny test pipelines (128 wide) cannot even
hold "" and are refused (`null_space_basis`), and so is a basis that the concept's own rows do not reach
(`check_reach`), as on 'toy-mmdit' decoupled against "" and two concepts: its two CLIP encoders are one, so every
row is [h, h] with h 32 wide, and 48 rows fill those 32 dimensions.
Increments of several concepts add up, W = W0 + Σ_i ΔW_i, and a concept is restored by leaving its
increment out.

Concept-irrelevant unlearning. On images of the concept drawn by the original model (VAE latents), at a
DDPM timestep drawn ESD-style (a DDIM index in [0, ddim_steps), then t uniformly inside that bin; a flow model
draws t uniformly from its training grid instead, as the harness's methods train flows, `Parameterization`, and
`ddim_steps` does not apply):

    d_orig = ε_θ0(x_t, c) − ε_θ0(x_t, ∅)      (original model, no gradient)
    d_new  = ε_θ(x_t, c)  − ε_θ(x_t, ∅)       (with the increment)

(ε: the noise the denoiser's output stands for; a v-prediction model's output v gives ε = √ᾱ_t v + √(1−ᾱ_t) x_t,
so its directions are √ᾱ_t (v(x_t, c) − v(x_t, ∅)); a flow's velocity v gives ε = x_t + (1−σ) v, directions
(1−σ)(v(x_t, c) − v(x_t, ∅)); ∅ is the conditioning the pipeline guides against: the empty prompt's, zeros on SDXL)
    L = mean(d_new ⊙ d_orig) + β · mean over layers of ‖ΔW‖₁

drives the concept's direction to be uncorrelated with (or opposite to) the original one, with an L1
pull towards the original weights. Adam updates P only. Training stops early on the momentum
m ← 0.9·m + 0.1·corr (m₀ = the first correlation) once it falls below `threshold` after step 10, or at
`max_steps`.

Storage. Each concept's increment is saved on its own as safetensors: the folded ΔW of every edited weight,
keyed by the denoiser's parameter name (out×in), with metadata saying which base model, which concept, which
prompts it was decoupled against and how it was trained. `compose` and `SeparableEraser` build
W0 + Σ ΔW_i for any subset of concepts; `doco compose` writes such a UNet or transformer as a diffusers folder.

Differences from the authors' code, on purpose (the first two can be switched back, see `SepMEConfig`):
  - The increment is applied as a weight (W0 + ΔW through `torch.func.functional_call`), so it acts on
    every row of a batch; the authors' `attention.py` adds it to batch element 0 only
    (`first_row_only=True` trains that way: with more than one image a step, only the first image's
    prediction sees the increment).
  - The null space comes from an SVD in float64 with a relative tolerance, not from sympy's exact
    `nullspace()` of floating-point values; the directions come most-null first, so `max_base`
    truncation keeps the best-decoupled ones.
  - Gradients are zeroed every step (their loop never calls `zero_grad`, so Adam sees accumulated
    gradients: `accumulate_grads=True`), images are visited in a seeded random order (theirs: directory
    order, one per step), and a batch may hold several images, each with its own timestep.
  - Their loop checks the stopping rule from its 12th step (0-based `i > 10`) and stops at most at step
    iter_break + 1; ours from step 11 (after 10 steps) and at most at `max_steps`.

The base denoiser should be float32: an increment is tiny next to W0, and float16 rounds most of it away
(together with the exactness of ΔW·e = 0).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from doco_lib.anchors import AnchorLatents
from doco_lib.config import ParamsError
from doco_lib.io import CorruptFileError, atomic_directory, atomic_save_json, atomic_write_bytes
from doco_lib.methods.harness import TrainingDiverged, parameters_matching
from doco_lib.methods.prediction import Parameterization
from doco_lib.methods.registry import SEPME_PARAMETERS
from doco_lib.models import (
    ModelLoadError,
    base_denoiser_class,
    check_model_reference,
    check_safetensors_only,
    denoiser,
    denoiser_kind,
    denoiser_output,
    encode_prompts,
    is_toy,
    output_with_weights,
    pick_device,
    resolve_model,
    text_encoders,
    transformer_inputs,
    unconditional_conditioning,
    unet_inputs,
)

METHOD = "sepme"
# The least share ‖B e‖ / ‖e‖ of one of the concept's own token rows e that the null space must reach: below it the
# increment could not change what the denoiser reads of the concept (`check_reach`).
MIN_REACH = 1e-4


def edited_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The weights SepME's increments go on (`registry.SEPME_PARAMETERS`): a UNet's cross-attention K/V matrices, an
    MMDiT's context embedder."""
    return parameters_matching(model, *SEPME_PARAMETERS[denoiser_kind(model)])


# ------------------------------------------------------------------------------------------ null space
def token_rows(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """All token rows of the prompts' embeddings stacked, (tokens·len(prompts), d): the rows the edited weights see (a
    UNet's K/V: the text encoder's hidden states, SDXL's pooled embedding and time ids do not reach them; an MMDiT's
    context embedder: the states the pipeline joins, without the pooled embedding)."""
    model, conditioning = denoiser(pipe), encode_prompts(pipe, list(prompts))
    if denoiser_kind(model) == "unet":
        embeddings = unet_inputs(model, conditioning)["encoder_hidden_states"]
    else:
        embeddings = transformer_inputs(model, conditioning)[0]
    return embeddings.reshape(-1, embeddings.shape[-1])


def null_space_basis(embeddings: torch.Tensor, rtol: float = 1e-8, names: Sequence[str] | None = None) -> torch.Tensor:
    """Orthonormal rows (m×d, float64) spanning the null space of `embeddings` (N×d): every b with E·b ≈ 0.

    SVD in float64; a right singular vector counts as null when its singular value is below rtol·σ_max
    (then |e·b| ≤ rtol·σ_max for every row e), and when N < d the d − N directions without a singular
    value are null too. Rows come most-null first. The default rtol keeps that bound below the float32
    rounding of ΔW itself (relative ~1e-7); a larger rtol buys directions for leakage onto the rows.
    `names` (the prompts behind the rows) only serve the error message when there is no null space."""
    matrix = embeddings.detach().to("cpu", torch.float64)
    n_rows, width = matrix.shape
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=True)
    rank = int((singular > rtol * singular.max()).sum()) if singular.numel() and singular.max() > 0 else 0
    basis = vh[rank:].flip(0)  # vh rows past `rank`: decreasing singular value, then exact zeros → reverse
    if len(basis) == 0:
        about = f" of {', '.join(repr(n) for n in names)}" if names is not None else ""
        raise ParamsError(
            f"SepME: the {n_rows} stacked token rows{about} span all {width} dimensions of the text encoder "
            f"(rank {rank} at rtol={rtol:g}), so no weight increment can leave them all unchanged. The text "
            f"embeddings' width ({width}) must exceed the number of stacked token rows (one per token position of "
            "each prompt): decouple against fewer concepts or use a wider text encoder ('toy-wide' in the toy "
            "world).")
    return basis


def decoupling_basis(pipe, against: Sequence[str], rtol: float = 1e-8) -> torch.Tensor:
    """B_i for a concept: the null space of the rows of "" and of the `against` prompts (the other concepts)."""
    prompts = ["", *against]
    return null_space_basis(token_rows(pipe, prompts), rtol, names=prompts)


def check_reach(pipe, prompts: Sequence[str], against: Sequence[str], basis: torch.Tensor) -> None:
    """Refuse a basis that none of the concept's own token rows reaches (each row's share in it below `MIN_REACH`):
    every row the concept's prompts give is then (numerically) in the span of the decoupled rows, and no increment
    on it can change what the denoiser reads of the concept."""
    rows = token_rows(pipe, prompts).detach().to("cpu", torch.float64)
    rows = rows[rows.norm(dim=1) > 0]  # the zero rows of a pipeline without T5
    reach = ((rows @ basis.T).norm(dim=1) / rows.norm(dim=1)).max().item() if len(rows) else 0.0
    if reach < MIN_REACH:
        stacked = token_rows(pipe, ["", *against])
        raise ParamsError(
            f"SepME: the null space of the {len(stacked)} token rows of {['', *against]} ({len(basis)} of "
            f"{basis.shape[1]} dimensions) holds no direction the rows of {list(prompts)} reach (largest share "
            f"{reach:.2g} < {MIN_REACH:g}): those rows lie in the span of the decoupled ones, so no increment could "
            "erase the concept without changing them. Decouple against fewer concepts or use a wider text encoder.")


# ------------------------------------------------------------------------------------------ increments
class SepMEIncrement(torch.nn.Module):
    """One concept's increment for every edited weight (`edited_parameters`): ΔW = P · (scale·B); P is the only
    trainable tensor, one per weight, zeros at the start."""

    def __init__(self, layers: Mapping[str, Sequence[int]], basis: torch.Tensor, scale: float):
        super().__init__()
        self.names = list(layers)
        # scale·B in float32: the fixed directions every ΔW row is a combination of.
        self.register_buffer("directions", (scale * basis.to(torch.float64)).float())
        self.coefficients = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(shape[0], len(basis))) for shape in layers.values()])

    @classmethod
    def for_denoiser(cls, model, basis: torch.Tensor, scale: float) -> "SepMEIncrement":
        """The increment of a UNet or an MMDiT transformer `model`, in the span of `basis`."""
        layers = {name: tuple(p.shape) for name, p in edited_parameters(model).items()}
        widths = {shape[1] for shape in layers.values()}
        if widths != {basis.shape[1]}:
            raise ParamsError(f"SepME: the text embeddings are {basis.shape[1]}-dimensional but the denoiser's "
                              f"edited weights read {sorted(widths)}; text encoders and denoiser do not fit.")
        return cls(layers, basis, scale)

    def deltas(self) -> dict[str, torch.Tensor]:
        """The folded ΔW (out×in) of every edited weight, keyed by the denoiser's parameter name."""
        return {name: p @ self.directions for name, p in zip(self.names, self.coefficients)}


def edited_output(model, deltas: Mapping[str, torch.Tensor] | None, x_t: torch.Tensor, t: torch.Tensor,
                  conditioning: torch.Tensor) -> torch.Tensor:
    """`denoiser_output(model, x_t, t, conditioning)` with weights W0 + ΔW for the parameters `deltas` names (None:
    the base weights), W0 left untouched (`output_with_weights`), so gradients reach ΔW."""
    if not deltas:
        return denoiser_output(model, x_t, t, conditioning)
    params = dict(model.named_parameters())
    return output_with_weights(model, {name: params[name] + delta.to(params[name].dtype)
                                       for name, delta in deltas.items()}, x_t, t, conditioning)


# ------------------------------------------------------------------------------------------ early stopping
def update_momentum(momentum: float | None, correlation: float, decay: float = 0.9) -> float:
    """m ← decay·m + (1 − decay)·corr; the first correlation starts it."""
    return correlation if momentum is None else decay * momentum + (1 - decay) * correlation


def should_stop(step: int, momentum: float, threshold: float, max_steps: int, min_steps: int = 10) -> bool:
    """After 1-based `step`: stop at `max_steps`, or once more than `min_steps` steps ran and m < threshold."""
    return step >= max_steps or (step > min_steps and momentum < threshold)


def stopping_step(correlations: Iterable[float], threshold: float, max_steps: int, min_steps: int = 10,
                  decay: float = 0.9) -> int | None:
    """The 1-based step after which training on these per-step correlations stops; None if they run out first."""
    momentum = None
    for step, correlation in enumerate(correlations, start=1):
        momentum = update_momentum(momentum, correlation, decay)
        if should_stop(step, momentum, threshold, max_steps, min_steps):
            return step
    return None


# ------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class SepMEConfig:
    """Settings of one concept's increment. Defaults: the authors' README run (lr 1e-1, scale_factor 1e-4,
    threshold 1e-4, reg_beta 1e-6); steps and DDIM bins from their argparse defaults (iter_break 1000,
    ddim_steps 50). `max_base` None keeps the whole null space; the README run keeps 691 = 768 − 77
    directions, the null space of a single prompt's 77 rows in SD v1's 768 dimensions."""

    lr: float = 1e-1
    scale: float = 1e-4
    threshold: float = 1e-4
    beta: float = 1e-6
    max_steps: int = 1000
    min_steps: int = 10
    momentum: float = 0.9
    ddim_steps: int = 50  # DDPM models only: a flow draws t from its training grid
    batch_size: int = 1
    rtol: float = 1e-8
    max_base: int | None = None
    seed: int = 0
    first_row_only: bool = False  # the authors' code: the increment reaches batch element 0 only
    accumulate_grads: bool = False  # the authors' code: gradients are never zeroed between steps

    def __post_init__(self):
        for key in ("lr", "scale", "rtol"):
            if not getattr(self, key) > 0:
                raise ParamsError(f"SepME {key}: expected a positive number, got {getattr(self, key)!r}.")
        for key in ("max_steps", "ddim_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ParamsError(f"SepME {key}: expected at least 1, got {getattr(self, key)!r}.")
        if self.beta < 0 or not 0 <= self.momentum < 1:
            raise ParamsError(f"SepME: beta must be ≥ 0 and momentum in [0, 1); got {self.beta!r}, "
                              f"{self.momentum!r}.")
        if self.max_base is not None and self.max_base < 1:
            raise ParamsError(f"SepME max_base: expected None or at least 1, got {self.max_base!r}.")


# The two sets of defaults in the authors' code: "readme" is the run their README gives, "argparse" the
# defaults of their training script's arguments.
PRESETS = {
    "readme": SepMEConfig(),
    "argparse": SepMEConfig(lr=1e-6, scale=1e-2, threshold=5e-5, beta=1e-5),
}


def preset(name: str = "readme", **overrides) -> SepMEConfig:
    if name not in PRESETS:
        raise ParamsError(f"SepME preset {name!r} is not one of {sorted(PRESETS)}.")
    return replace(PRESETS[name], **overrides)


class SepMETrainer:
    """Trains one concept's increment on the original model's images of it (`AnchorLatents`, e.g. from
    `prepare_anchor_latents` with the concept's prompts); the denoiser's own weights (a UNet's, or an SD 3.x or
    FLUX.1 transformer's) are never changed, so the same denoiser serves as the original model (called without the
    increment). Everything that refuses (clashing prompts, no null space, one the concept does not reach) refuses
    before the first step."""

    def __init__(self, pipe, latents: AnchorLatents, against: Sequence[str], config: SepMEConfig = SepMEConfig(),
                 device: torch.device | str = "cpu"):
        self.config, self.latents, self.against = config, latents, list(against)
        self.device = torch.device(device)
        self.prompts = sorted(set(latents.prompts))
        clash = sorted(set(self.prompts) & {"", *self.against})
        if clash:
            raise ParamsError(f"SepME: {clash} is both a prompt of the concept's images and a prompt to decouple "
                              "against; its token rows would be in the null space, so it could not be erased.")
        for encoder in text_encoders(pipe):
            encoder.to(self.device)
        self.unet = denoiser(pipe).to(self.device).eval().requires_grad_(False)
        self.parameterization = Parameterization.of_scheduler(pipe.scheduler.config, self.device)
        self.alphas_cumprod = self.parameterization.alphas_cumprod

        # Text embeddings, computed once (the encoder is frozen): the concept's prompts, "" and the basis.
        self.prompt_embeddings = encode_prompts(pipe, self.prompts)
        self.prompt_index = torch.tensor([self.prompts.index(p) for p in latents.prompts])
        self.empty_embedding = unconditional_conditioning(pipe)
        basis = decoupling_basis(pipe, self.against, config.rtol)
        self.null_space_dim = len(basis)
        if config.max_base is not None:
            basis = basis[:config.max_base]
        check_reach(pipe, self.prompts, self.against, basis)
        self.increment = SepMEIncrement.for_denoiser(self.unet, basis, config.scale).to(self.device)
        self.optimizer = torch.optim.Adam(self.increment.parameters(), lr=config.lr)
        self.generator = torch.Generator().manual_seed(config.seed)
        self._queue: list[int] = []
        self.step, self.momentum, self.stopped = 0, None, False
        self.history: list[dict] = []

    # ---------------------------------------------------------------- one step
    def _next_images(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The next n images of a seeded random order that visits every image once per pass."""
        index = []
        while len(index) < n:
            if not self._queue:
                self._queue = torch.randperm(len(self.latents), generator=generator).tolist()
            index.append(self._queue.pop())
        return torch.tensor(index)

    def _timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """ESD-style: a DDIM index i in [0, ddim_steps), then a DDPM t uniform in i's bin of the T steps. A flow has
        no DDPM steps to bin: t uniform on its training grid, as the harness trains flows."""
        if self.parameterization.flow:
            return self.parameterization.draw_timesteps(n, generator)
        steps, total = self.config.ddim_steps, len(self.alphas_cumprod)
        i = torch.randint(0, steps, (n,), generator=generator)
        low, high = torch.round(i * total / steps).long(), torch.round((i + 1) * total / steps).long()
        return (low + (torch.rand(n, generator=generator) * (high - low)).long()).clamp(max=total - 1)

    def _noised_batch(self, index: torch.Tensor, generator: torch.Generator):
        """(x_t, t, c): the images' latents noised at `_timesteps` (DDPM's q_sample, a flow's (1−σ) z0 + σ ε), with
        their prompts."""
        z0 = self.latents.sample(index, generator).to(self.device)
        noise = torch.randn(z0.shape, generator=generator).to(self.device)
        t = self._timesteps(len(index), generator).to(self.device)
        c = self.prompt_embeddings[self.prompt_index[index]]
        return self.parameterization.add_noise(z0, noise, t), t, c

    def directions(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                   deltas: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """ε(x_t, c) − ε(x_t, ∅), conditional and unconditional rows in one batch, with or without increments."""
        empty = self.empty_embedding.expand_as(c)
        x, steps = torch.cat([x_t, x_t]), torch.cat([t, t])
        output = edited_output(self.unet, deltas, x, steps, torch.cat([c, empty]))
        cond, uncond = self.parameterization.eps(output.float(), x, steps).chunk(2)
        return cond - uncond

    def losses(self, x_t, t, c) -> tuple[torch.Tensor, torch.Tensor]:
        """(correlation mean(d_new ⊙ d_orig), mean over layers of ‖ΔW‖₁) for one batch."""
        with torch.no_grad():
            d_orig = self.directions(x_t, t, c)
        deltas = self.increment.deltas()
        d_new = self.directions(x_t, t, c, deltas)
        if self.config.first_row_only:  # the authors' batching: rows after the first keep W0
            d_new = torch.cat([d_new[:1], d_orig[1:]])
        l1 = torch.stack([delta.abs().sum() for delta in deltas.values()]).mean()
        return (d_new * d_orig).mean(), l1

    def train_step(self) -> dict:
        started = time.perf_counter()
        x_t, t, c = self._noised_batch(self._next_images(self.config.batch_size, self.generator), self.generator)
        correlation, l1 = self.losses(x_t, t, c)
        loss = correlation + self.config.beta * l1
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"SepME: non-finite loss at step {self.step + 1} (correlation "
                                   f"{correlation.item()}, L1 {l1.item()}).")
        if not self.config.accumulate_grads:
            self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.momentum = update_momentum(self.momentum, correlation.item(), self.config.momentum)
        self.stopped = should_stop(self.step, self.momentum, self.config.threshold, self.config.max_steps,
                                   self.config.min_steps)
        record = {"step": self.step, "correlation": correlation.item(), "l1": l1.item(), "loss": loss.item(),
                  "momentum": self.momentum, "seconds": time.perf_counter() - started}
        self.history.append(record)
        return record

    def run(self, progress: bool = False) -> list[dict]:
        """Train until the stopping rule fires (momentum below threshold after `min_steps`, or `max_steps`)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.config.max_steps, initial=self.step, desc=METHOD, unit="it", disable=not progress)
        while not self.stopped:
            record = self.train_step()
            bar.update(1)
            bar.set_postfix(correlation=f"{record['correlation']:.3g}", momentum=f"{record['momentum']:.3g}",
                            refresh=False)
        bar.close()
        return self.history

    @torch.no_grad()
    def heldout_correlation(self, n_samples: int = 8, seed: int = 1234) -> float:
        """mean(d_new ⊙ d_orig) on a fixed batch (its own generator): comparable before and after training."""
        generator = torch.Generator().manual_seed(seed)
        index = torch.randint(0, len(self.latents), (n_samples,), generator=generator)
        x_t, t, c = self._noised_batch(index, generator)
        return (self.directions(x_t, t, c, self.increment.deltas()) * self.directions(x_t, t, c)).mean().item()

    def result(self, concept: str, base_model: str) -> "ConceptIncrement":
        """The trained increment, folded per layer, with the metadata it is saved with."""
        deltas = {name: delta.detach().float().cpu().contiguous() for name, delta in self.increment.deltas().items()}
        cfg = self.config
        metadata = {"method": METHOD, "base_model": base_model_id(base_model), "concept": concept,
                    "prompts": self.prompts, "decoupled_against": self.against, "rtol": cfg.rtol,
                    "scale": cfg.scale, "beta": cfg.beta, "lr": cfg.lr, "threshold": cfg.threshold,
                    "max_steps": cfg.max_steps, "batch_size": cfg.batch_size, "ddim_steps": cfg.ddim_steps,
                    "seed": cfg.seed, "first_row_only": cfg.first_row_only,
                    "accumulate_grads": cfg.accumulate_grads, "null_space_dim": self.null_space_dim,
                    "basis_size": len(self.increment.directions), "steps": self.step,
                    "final_correlation": self.history[-1]["correlation"] if self.history else float("nan"),
                    "final_momentum": self.momentum if self.momentum is not None else float("nan"),
                    "config": json.dumps(asdict(cfg))}
        return ConceptIncrement(concept, deltas, metadata)


def train_concept(pipe, concept: str, latents: AnchorLatents, against: Sequence[str], base_model: str,
                  config: SepMEConfig = SepMEConfig(), device: torch.device | str = "cpu",
                  progress: bool = False) -> "ConceptIncrement":
    """Train `concept`'s increment on its images `latents`, decoupled against "" and the `against` prompts."""
    trainer = SepMETrainer(pipe, latents, against, config, device)
    trainer.run(progress)
    return trainer.result(concept, base_model)


# ------------------------------------------------------------------------------------------ storage
# Metadata values are strings in safetensors; these keys are read back as numbers or lists (JSON).
_TYPED = {"prompts": list, "decoupled_against": list, "rtol": float, "scale": float, "beta": float, "lr": float,
          "threshold": float, "max_steps": int, "batch_size": int, "ddim_steps": int, "seed": int,
          "first_row_only": bool, "accumulate_grads": bool,
          "null_space_dim": int, "basis_size": int, "steps": int, "final_correlation": float,
          "final_momentum": float}


@dataclass
class ConceptIncrement:
    """One concept's folded increment: ΔW (out×in, float32) per edited parameter name, plus its metadata."""

    concept: str
    deltas: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)
    source: str | None = None  # the file it was loaded from, for error messages

    @property
    def base_model(self) -> str:
        return self.metadata["base_model"]

    @property
    def decoupled_against(self) -> list[str]:
        return list(self.metadata.get("decoupled_against", []))

    def describe(self) -> str:
        return self.source or f"increment of {self.concept!r}"


def save_increment(increment: ConceptIncrement, path: str | Path) -> Path:
    """Write the increment as safetensors (atomically), its metadata in the header."""
    from safetensors.torch import save

    metadata = {**increment.metadata, "method": METHOD, "concept": increment.concept}
    header = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    tensors = {name: delta.detach().float().cpu().contiguous() for name, delta in increment.deltas.items()}
    path = Path(path)
    atomic_write_bytes(save(tensors, metadata=header), path)
    return path


def read_increment_metadata(path: str | Path) -> dict:
    """The metadata of a saved increment, typed, from the safetensors header only (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error type for a damaged or foreign file
        raise CorruptFileError(f"{path}: not a readable safetensors file ({error}); SepME increments are "
                               "safetensors written by doco_lib.methods.sepme.save_increment.") from None
    if header.get("method") != METHOD or "concept" not in header or "base_model" not in header:
        raise CorruptFileError(f"{path}: not a SepME increment (its metadata lacks method='sepme', concept or "
                               "base_model).")
    metadata = {}
    for key, value in header.items():
        metadata[key] = json.loads(value) if key in _TYPED else value
        if key in _TYPED and _TYPED[key] is float:
            metadata[key] = float(metadata[key])
    return metadata


def load_increment(path: str | Path) -> ConceptIncrement:
    """Load a saved increment; safetensors only, so nothing is ever unpickled."""
    from safetensors.torch import load_file

    metadata = read_increment_metadata(path)
    return ConceptIncrement(metadata["concept"], load_file(str(path)), metadata, source=str(path))


def find_increments(folder: str | Path) -> dict[str, Path]:
    """{concept: file} for every `*.safetensors` increment in `folder`, read from the headers only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ParamsError(f"--increments: {str(folder)!r} is not a folder (expected a folder of SepME increments, "
                          "one <concept>.safetensors per concept).")
    found: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        concept = read_increment_metadata(path)["concept"]
        if concept in found:
            raise ParamsError(f"--increments: {found[concept]} and {path} are both increments of {concept!r}; "
                              "keep one.")
        found[concept] = path
    if not found:
        raise ParamsError(f"--increments: {str(folder)!r} holds no *.safetensors increment.")
    return found


# ------------------------------------------------------------------------------------------ compose
def base_model_id(model: str) -> str:
    """How an increment names its base: toy worlds and hub ids as given, a local folder by its absolute path."""
    path = Path(model).expanduser()
    return model if is_toy(model) or not path.is_dir() else str(path.resolve())


def check_base(stored: str, base_model: str, where: str, concept: str) -> None:
    """Refuse an increment trained on another base model than the one it is to be added to."""
    if stored not in (base_model, base_model_id(base_model)):
        raise ParamsError(f"{where}: the increment of {concept!r} was trained on base model {stored!r}, not on "
                          f"{base_model!r}; compose it onto its own base.")


def check_increment(increment: ConceptIncrement, unet, base_model: str | None) -> None:
    """Refuse an increment made for another base model, or whose layers are not the weights SepME edits on this
    denoiser `unet` (a UNet's K/V matrices, an MMDiT's context embedder)."""
    where = increment.describe()
    if base_model is not None:
        check_base(increment.base_model, base_model, where, increment.concept)
    layers = {name: p.shape for name, p in edited_parameters(unet).items()}
    what = "a cross-attention K/V weight of this UNet" if denoiser_kind(unet) == "unet" else \
        f"the context embedder's weight of this {type(unet).__name__}"
    for name, delta in increment.deltas.items():
        if name not in layers:
            raise ParamsError(f"{where}: {name!r} is not {what}; the increment was made for another architecture.")
        if delta.shape != layers[name]:
            raise ParamsError(f"{where}: {name!r} has shape {tuple(delta.shape)}, the "
                              f"{'UNet' if denoiser_kind(unet) == 'unet' else 'transformer'}'s {tuple(layers[name])}; "
                              "the increment was made for another architecture.")


def _warn_if_coupled(increments: Sequence[ConceptIncrement]) -> None:
    """Increments only stay out of each other's way when each was decoupled against the others' prompts."""
    for a in increments:
        for b in increments:
            missing = [p for p in b.metadata.get("prompts", []) if p not in a.decoupled_against]
            if a is not b and missing:
                warnings.warn(f"SepME: the increment of {a.concept!r} was not decoupled against {missing} (prompts "
                              f"of {b.concept!r}); erasing both may change how {b.concept!r} is drawn.", stacklevel=3)


class SeparableEraser:
    """A base denoiser (UNet or MMDiT transformer) with per-concept increments: erase and restore concepts in any
    order, exactly.

    The edited weights are always recomputed from the saved originals, W = W0 + Σ_{erased} ΔW_i, summed in
    float64 in concept order, so erasing {a, b} and then restoring a gives bit for bit the weights of
    erasing {b} alone. `unet` must hold the base weights W0 when this is built; it is changed in place."""

    def __init__(self, unet, increments: Iterable[ConceptIncrement], base_model: str | None):
        self.unet = unet
        self.increments: dict[str, ConceptIncrement] = {}
        for increment in increments:
            if increment.concept in self.increments:
                raise ParamsError(f"{increment.describe()}: a second increment of {increment.concept!r} "
                                  f"(the first: {self.increments[increment.concept].describe()}).")
            check_increment(increment, unet, base_model)
            self.increments[increment.concept] = increment
        params = dict(unet.named_parameters())
        names = sorted({name for inc in self.increments.values() for name in inc.deltas})
        self.original = {name: params[name].detach().clone() for name in names}
        self.erased: tuple[str, ...] = ()

    def set_erased(self, concepts: Iterable[str]) -> torch.nn.Module:
        """Erase exactly `concepts` (every other concept is restored); returns the denoiser."""
        concepts = tuple(sorted(set(concepts)))
        unknown = [c for c in concepts if c not in self.increments]
        if unknown:
            raise ParamsError(f"SepME: no increment for {unknown}; available: {sorted(self.increments)}.")
        chosen = [self.increments[c] for c in concepts]
        _warn_if_coupled(chosen)
        params = dict(self.unet.named_parameters())
        with torch.no_grad():
            for name, w0 in self.original.items():
                total = w0.to(torch.float64)
                for increment in chosen:
                    if name in increment.deltas:
                        total = total + increment.deltas[name].to(w0.device, torch.float64)
                params[name].copy_(total.to(params[name].dtype))
        self.erased = concepts
        return self.unet

    def erase(self, *concepts: str) -> torch.nn.Module:
        return self.set_erased(set(self.erased) | set(concepts))

    def restore(self, *concepts: str) -> torch.nn.Module:
        return self.set_erased(set(self.erased) - set(concepts))


def compose(unet, increments: Iterable[ConceptIncrement | str | Path], base_model: str | None) -> torch.nn.Module:
    """A copy of the denoiser `unet` (which holds the base weights W0, and is left as it is) with W0 + Σ ΔW_i of the given
    increments (objects or saved files). `base_model` is checked against every increment's base; None skips
    that check."""
    loaded = [inc if isinstance(inc, ConceptIncrement) else load_increment(inc) for inc in increments]
    composed = copy.deepcopy(unet)
    eraser = SeparableEraser(composed, loaded, base_model)
    return eraser.set_erased(eraser.increments)


def load_base_denoiser(model: str, device: str = "cpu"):
    """The denoiser of a base pipeline ('toy', a pipeline folder or a hub id): its UNet or its SD 3.x or FLUX.1
    transformer, in float32, from safetensors only."""
    check_model_reference(model, key="--base")
    component, model_class = base_denoiser_class(model)
    source = resolve_model(model)
    check_safetensors_only(source)
    try:
        loaded = model_class.from_pretrained(source, subfolder=component, use_safetensors=True)
    except OSError as error:
        raise ModelLoadError(f"Could not load the {component} of {model!r}: {error}. Without internet access a hub id "
                             "only works if it is already in the Hugging Face cache.") from None
    return loaded.to(pick_device(device)).eval()


def parse_concepts(erase: str | Sequence[str], available: Iterable[str]) -> list[str]:
    """'a,b,c' (or a list) → concept names, each checked against the available increments."""
    names = [c.strip() for c in erase.split(",")] if isinstance(erase, str) else [c.strip() for c in erase]
    names = [c for c in names if c]
    available = sorted(available)
    if not names:
        raise ParamsError(f"--erase: name at least one concept; available: {available}.")
    unknown = [c for c in names if c not in available]
    if unknown:
        raise ParamsError(f"--erase: no increment for {unknown}; available concepts: {available}.")
    return list(dict.fromkeys(names))


def compose_to_folder(base: str, increments_dir: str | Path, erase: str | Sequence[str], out: str | Path,
                      device: str = "cpu") -> Path:
    """`doco compose`: the base denoiser with the chosen concepts' increments, written as a diffusers UNet or
    transformer folder (`load_pipeline(base, unet=out)` and the model class's `from_pretrained` load it).

    Every check that needs only file headers (folder, concept names, base ids) runs before the denoiser loads."""
    check_model_reference(base, key="--base")
    found = find_increments(increments_dir)
    concepts = parse_concepts(erase, found)
    for concept in concepts:
        check_base(read_increment_metadata(found[concept])["base_model"], base, str(found[concept]), concept)
    unet = load_base_denoiser(base, device)  # ours alone, so the increments go in in place (no copy)
    SeparableEraser(unet, [load_increment(found[c]) for c in concepts], base).set_erased(concepts)
    out = Path(out)
    with atomic_directory(out) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
        atomic_save_json({"method": METHOD, "base_model": base_model_id(base), "erased": concepts,
                          "increments": {c: str(found[c].resolve()) for c in concepts},
                          "restored": sorted(set(found) - set(concepts))}, tmp / "sepme_compose.json")
    return out
