"""`relearning` (white box, weights): fine-tuning the erased model on a few images of the target.

Relearning attacks (e.g. Lynch et al., "Eight Methods to Evaluate Robust Unlearning in LLMs"; for diffusion,
the relearning evaluations of Fan et al.'s SalUn and of Suriyakumar et al.'s "Unstable Unlearning"): a
*copy* of the erased denoiser θ* (never the caller's; a UNet, or SD 3's transformer) is fine-tuned with Adam
at `attack_relearn_lr` on `attack_relearn_images` images z0 of the target drawn by the *original* model,
conditioned on the start prompt P, with the plain denoising loss

    min_θ E_{z0, t, ε} ‖ε − ε_θ(√ᾱ_t z0 + √(1−ᾱ_t) ε, t, c(P))‖²   (θ from θ*; the v target for v-prediction,
                                                                   the flow's ε − z0 at x_σ for SD 3).

After each step count S of `attack_relearn_steps` (cumulative, in increasing order), P is sampled on the
evaluation seeds and judged: `search_scores` holds those rates, the curve of how fast the concept comes back
(`attack_study.relearning_rows` tabulates it per model and seed); the attempt's verdict is the rate at the largest S. S = 0 is plain
sampling (the row `none`). The study runs it on the original model too: the original model's curve is the
reference of how fast fine-tuning teaches a model the concept it already knew. `loss_before` and
`loss_after` are the objective on a fixed batch (every image at 4 stratified timesteps) before and after.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from doco_lib.models import denoiser, denoiser_component
from doco_lib.studies.attacks.common import (
    EVAL_SEEDS,
    AttackSettings,
    Attempt,
    DenoisingObjective,
    Judge,
    Target,
    generate_embedded,
    judge_final,
    prompt_embedding,
)


def original_images(settings: AttackSettings) -> int:
    """Images of the original model the attack needs per attempt: its fine-tuning images."""
    return settings.relearn_images


@contextlib.contextmanager
def swapped_denoiser(pipe, model):
    """Inside the block, `pipe` samples with the denoiser `model`; the pipeline's own is back afterwards."""
    name = denoiser_component(pipe)
    own = getattr(pipe, name)
    setattr(pipe, name, model)
    try:
        yield pipe
    finally:
        setattr(pipe, name, own)


def relearn(pipe, judge: Judge, start_prompt: str, latents: torch.Tensor, attempt: int, settings: AttackSettings,
            generator: torch.Generator) -> Attempt:
    """Fine-tune a float32 copy of the pipeline's denoiser on `latents` (the original model's images of
    `start_prompt`), judging `start_prompt` after each step count of `settings.relearn_steps`."""
    own = denoiser(pipe)
    dtype = own.dtype
    student = copy.deepcopy(own).float().train().requires_grad_(True)
    optimizer = torch.optim.Adam(student.parameters(), lr=settings.relearn_lr)
    objective = DenoisingObjective(pipe, latents, generator)
    condition = prompt_embedding(pipe, start_prompt).float()
    seeds = settings.seeds(attempt, EVAL_SEEDS)
    embeddings = condition.expand(len(seeds), -1, -1)

    def judged() -> tuple[float, bool, torch.Tensor]:
        student.eval()
        sampler = student if dtype == torch.float32 else copy.deepcopy(student).to(dtype)
        with swapped_denoiser(pipe, sampler):
            images = generate_embedded(pipe, embeddings, seeds, settings.num_inference_steps, settings.guidance_scale)
        student.train()
        return (*judge_final(judge, images, settings), images)

    with torch.no_grad():
        loss_before = objective.loss(student, objective.fixed, condition).item()
    scores, done = [], 0
    for steps in sorted(settings.relearn_steps):
        for _ in range(steps - done):
            optimizer.zero_grad()
            objective.loss(student, objective.sample(), condition).backward()
            optimizer.step()
        done = steps
        rate, success, images = judged()
        scores.append(rate)
    with torch.no_grad():
        loss_after = objective.loss(student, objective.fixed, condition).item()
    return Attempt("relearning", attempt, start_prompt, f"{start_prompt} [relearnt {done} steps]", rate, success,
                   images, scores, loss_before=loss_before, loss_after=loss_after)


def run(pipe, judge: Judge, target: Target, attempt: int, settings: AttackSettings) -> Attempt:
    return relearn(pipe, judge, target.prompt, target.latents[:settings.relearn_images], attempt, settings,
                   settings.generator(attempt))

