"""`completion` (no optimisation): diffusion completion of the original model's images of the target.

SDEdit / img2img with the erased model: an image of the target drawn by the *original* model (scaled latents
z0 of the start prompt P) is noised to the timestep a strength s ∈ [0, 1] reaches,
x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε with t the first of the last ⌊s · steps⌋ sampling timesteps, and the erased model
denoises it on P over those steps. s = 0 returns the image itself, s = 1 drops it (plain sampling from the
same noise ε). An erasure that removed the concept's knowledge turns a half-noised target away from it; one
that only hides it behind the prompt completes it. Each s of `attack_completion_strengths` is scored by the
judge's mean probability of the target on `attack_images` original images (their noise from the search
seeds); the best s is judged on `attack_images` further original images (the evaluation seeds' noise).
At small s the original image survives any model: read the rate beside the strength that reached it.

On a flow model (SD 3) the image is noised as SD 3's img2img noises it, x_σ = (1−σ) z0 + σ ε with σ the
pipeline scheduler's at the first of those steps (`Parameterization.add_noise`), and integrated from there with
that scheduler (Euler on the flow) and the pipeline's classifier-free guidance; s = 1 starts at σ = 1, the noise.
"""

from __future__ import annotations

import torch

from doco_lib.methods.prediction import Parameterization, denoising_scheduler, is_flow_matching
from doco_lib.models import denoiser, denoiser_output, unconditional_conditioning
from doco_lib.sampling import initial_latents
from doco_lib.studies.attacks.common import (
    EVAL_SEEDS,
    SEARCH_SEEDS,
    AttackSettings,
    Attempt,
    Judge,
    Target,
    judge_final,
    prompt_embedding,
)


def original_images(settings: AttackSettings) -> int:
    """Images of the original model the probe needs per attempt: `images` for the search, `images` to judge."""
    return 2 * settings.images


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents → images in [0, 1], as the pipeline's `output_type="pt"` (SD 3's VAE also shifts them)."""
    vae = pipe.vae
    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    if vae.config.get("shift_factor"):
        latents = latents + vae.config.shift_factor
    images = vae.decode(latents).sample
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()


def _scheduler(pipe, steps: int, device: torch.device):
    """A fresh copy of the pipeline's scheduler set to `steps` steps: for a flow model, shifted as its pipeline
    shifts it (`prediction.denoising_scheduler`, by image tokens where the config asks)."""
    config = pipe.scheduler.config
    if is_flow_matching(config):
        model = denoiser(pipe)
        tokens = (model.config.sample_size // model.config.patch_size) ** 2
        return denoising_scheduler(config, steps, tokens)
    scheduler = type(pipe.scheduler).from_config(config)  # its own state
    scheduler.set_timesteps(steps, device=device)
    return scheduler


@torch.no_grad()
def complete(pipe, embedding: torch.Tensor, z0: torch.Tensor, seeds: list[int], strength: float, steps: int,
             guidance: float) -> torch.Tensor:
    """Images in [0, 1]: z0 (N scaled latents) noised to `strength` with the noise of `seeds` and denoised by
    the pipeline's denoiser on `embedding` (1, rows, width), with the pipeline's scheduler and classifier-free
    guidance."""
    model = denoiser(pipe)
    device, dtype = model.device, model.dtype
    flow = is_flow_matching(pipe.scheduler.config)
    scheduler = _scheduler(pipe, steps, device)
    count = min(int(steps * strength), steps)  # the last `count` steps run, as img2img counts them
    start = (steps - count) * scheduler.order
    timesteps = scheduler.timesteps[start:].to(device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    noise = initial_latents(pipe, seeds).to(device, dtype)
    z0 = z0.to(device, dtype)
    if count == 0:
        latents = z0
    elif flow:  # σ of the first step run; at strength 1 it is 1: the noise itself
        latents = Parameterization.of_scheduler(pipe.scheduler.config).add_noise(z0, noise,
                                                                                  timesteps[:1].repeat(len(z0)))
    elif count == steps:  # the image is dropped: plain sampling from the same noise
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(z0, noise, timesteps[:1].repeat(len(z0)))
    guided = guidance > 1  # the pipelines skip the unconditional pass at guidance ≤ 1
    text = embedding.to(device, dtype).expand(len(z0), -1, -1)
    conditions = torch.cat([unconditional_conditioning(pipe).to(device, dtype).expand(len(z0), -1, -1), text]) \
        if guided else text
    for t in timesteps:
        model_input = torch.cat([latents] * (2 if guided else 1))
        if not flow:  # the flow's Euler scheduler scales nothing
            model_input = scheduler.scale_model_input(model_input, t)
        prediction = denoiser_output(model, model_input, t, conditions)
        if guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + guidance * (conditional - unconditional)
        latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
    return decode_latents(pipe, latents)


def completion_probe(pipe, judge: Judge, start_prompt: str, latents: torch.Tensor, attempt: int,
                     settings: AttackSettings) -> Attempt:
    """The best strength of `settings.completion_strengths` on the first `images` original latents (noise of the
    search seeds), judged on the next `images` (noise of the evaluation seeds)."""
    k, embedding = settings.images, prompt_embedding(pipe, start_prompt)

    def images_of(strength: float, z0: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        return complete(pipe, embedding, z0, seeds, strength, settings.num_inference_steps, settings.guidance_scale)

    search, held_out = latents[:k], latents[k:2 * k]
    scores = [judge.target_probability(images_of(s, search, settings.seeds(attempt, SEARCH_SEEDS))).mean().item()
              for s in settings.completion_strengths]
    best = settings.completion_strengths[max(range(len(scores)), key=scores.__getitem__)]
    final = images_of(best, held_out, settings.seeds(attempt, EVAL_SEEDS))
    rate, success = judge_final(judge, final, settings)
    return Attempt("completion", attempt, start_prompt, f"{start_prompt} [completion from {best:g}]", rate, success,
                   final, scores)


def run(pipe, judge: Judge, target: Target, attempt: int, settings: AttackSettings) -> Attempt:
    return completion_probe(pipe, judge, target.prompt, target.latents, attempt, settings)
