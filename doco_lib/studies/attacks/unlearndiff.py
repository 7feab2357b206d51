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

from doco_lib.prompt_tokens import padded_ids, soft_tokens, word_ids
from doco_lib.studies.attacks.common import (
    AttackSettings,
    Attempt,
    DenoisingObjective,
    Judge,
    Target,
    decode,
    judged_embedding,
    nearest_tokens,
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

    def condition() -> torch.Tensor:
        with soft_tokens(encoder, slots, delta):
            return encoder(ids)[0]

    objective = DenoisingObjective(pipe, latents, generator)
    loss_before, loss_after = objective.optimise(unet, encoder, condition, delta, settings.unlearndiff_lr,
                                                 settings.unlearndiff_steps)
    with torch.no_grad():
        embedding = condition()
        nearest = nearest_tokens(table, delta, vocabulary)
    final, rate, success = judged_embedding(pipe, judge, embedding, attempt, settings)
    shown = f"soft[{decode(tokenizer, nearest.tolist())}] ⊕ {start_prompt}"
    return Attempt("unlearndiff", attempt, start_prompt, shown, rate, success, final, loss_before=loss_before,
                   loss_after=loss_after)


def run(pipe, judge: Judge, target: Target, attempt: int, settings: AttackSettings) -> Attempt:
    return soft_prompt_attack(pipe, judge, target.prompt, target.latents[:settings.unlearndiff_images],
                              target.vocabulary, attempt, settings, settings.generator(attempt))
