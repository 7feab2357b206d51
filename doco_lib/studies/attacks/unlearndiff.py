"""`unlearndiff` (white box): UnlearnDiffAtk's objective on soft prefix tokens.

Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy to Generate
Unsafe Images ... For Now", ECCV 2024. n = `attack_unlearndiff_tokens` continuous token embeddings δ are put
in front of the start prompt P's tokens (after BOS) and optimised with Adam so that the *erased* model
denoises images z0 of the target drawn by the *original* model:

    min_δ E_{z0, t, ε} ‖ε − ε_θ*(√ᾱ_t z0 + √(1−ᾱ_t) ε, t, c(δ ⊕ P))‖²   (the v target for a v-prediction model).

Defaults are the paper's budget: 5 prefix tokens, 40 iterations, learning rate 0.01, for the toy world and SD
alike. Unlike the paper, δ stays continuous (no projection onto the vocabulary); the attempt shows its
nearest vocabulary tokens. The final prompt δ ⊕ P is judged on the evaluation seeds; `loss_before` and
`loss_after` are the objective on a fixed batch (every target image at 4 stratified timesteps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from doco_lib.methods.prediction import Parameterization
from doco_lib.studies.attacks.common import (
    EVAL_SEEDS,
    AttackSettings,
    Attempt,
    Judge,
    Target,
    decode,
    generate_embedded,
    judge_final,
    padded_ids,
    soft_tokens,
    word_ids,
)


def original_images(settings: AttackSettings) -> int:
    """Images of the original model the attack needs per attempt: its target images."""
    return settings.unlearndiff_images


def soft_prompt_attack(pipe, judge: Judge, start_prompt: str, latents: torch.Tensor, vocabulary: torch.Tensor,
                       attempt: int, settings: AttackSettings, generator: torch.Generator) -> Attempt:
    """Optimise prefix token embeddings δ against the erased model's diffusion loss on the original model's
    target latents `latents`, then generate with δ ⊕ P and judge."""
    tokenizer, unet, encoder = pipe.tokenizer, pipe.unet, pipe.text_encoder
    device, n = unet.device, settings.unlearndiff_tokens
    slots = list(range(1, 1 + n))  # after BOS, before the prompt
    start = vocabulary[torch.randint(len(vocabulary), (n,), generator=generator)]
    ids = padded_ids(tokenizer, start.tolist() + word_ids(tokenizer, start_prompt))[None].to(device)
    table = encoder.get_input_embeddings().weight
    delta = torch.nn.Parameter(table[start.to(table.device)].detach().clone().float())
    optimizer = torch.optim.Adam([delta], lr=settings.unlearndiff_lr)
    parameterization = Parameterization.of_scheduler(pipe.scheduler.config, device)  # ε or v, as the UNet predicts
    alphas = parameterization.alphas_cumprod

    def noisy_batch(z0: torch.Tensor, t: torch.Tensor):
        z0, t = z0.to(device), t.to(device)
        noise = torch.randn(z0.shape, generator=generator).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, parameterization.target(z0, noise, t)

    def loss_on(batch) -> torch.Tensor:
        x_t, t, target = batch
        with soft_tokens(encoder, slots, delta):
            condition = encoder(ids)[0].expand(len(x_t), -1, -1)
        return F.mse_loss(unet(x_t, t, encoder_hidden_states=condition.to(unet.dtype)).sample.float(), target.float())

    unet.requires_grad_(False)
    encoder.requires_grad_(False)
    repeats = 4
    strata = (torch.arange(repeats * len(latents)) % repeats + torch.rand(repeats * len(latents), generator=generator))
    fixed = noisy_batch(latents.repeat_interleave(repeats, 0), (strata * len(alphas) / repeats).long())
    with torch.no_grad():
        loss_before = loss_on(fixed).item()
    for _ in range(settings.unlearndiff_steps):
        optimizer.zero_grad()
        loss_on(noisy_batch(latents, torch.randint(0, len(alphas), (len(latents),), generator=generator))).backward()
        optimizer.step()
    with torch.no_grad():
        loss_after = loss_on(fixed).item()
        with soft_tokens(encoder, slots, delta):
            embedding = encoder(ids)[0]
        nearest = vocabulary[(F.normalize(delta, dim=1) @ F.normalize(table[vocabulary.to(table.device)].float(),
                                                                       dim=1).T).argmax(1).cpu()]
    seeds = settings.seeds(attempt, EVAL_SEEDS)
    final = generate_embedded(pipe, embedding.expand(len(seeds), -1, -1), seeds, settings.num_inference_steps,
                              settings.guidance_scale)
    rate, success = judge_final(judge, final, settings)
    shown = f"soft[{decode(tokenizer, nearest.tolist())}] ⊕ {start_prompt}"
    return Attempt("unlearndiff", attempt, start_prompt, shown, rate, success, final, loss_before=loss_before,
                   loss_after=loss_after)


def run(pipe, judge: Judge, target: Target, attempt: int, settings: AttackSettings) -> Attempt:
    return soft_prompt_attack(pipe, judge, target.prompt, target.latents[:settings.unlearndiff_images],
                              target.vocabulary, attempt, settings, settings.generator(attempt))
