"""`unlearndiff` (white box): UnlearnDiffAtk's objective on soft prefix tokens.

Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy to Generate
Unsafe Images ... For Now", ECCV 2024. n = `attack_unlearndiff_tokens` continuous token embeddings δ are put
in front of the start prompt P's tokens (after BOS) and optimised with Adam so that the *erased* model
denoises images z0 of the target drawn by the *original* model:

    min_δ E_{z0, t, ε} ‖ε − ε_θ*(√ᾱ_t z0 + √(1−ᾱ_t) ε, t, c(δ ⊕ P))‖²   (the v target for a v-prediction model).

Defaults are the paper's budget: 5 prefix tokens, 40 iterations, learning rate 0.01, for the toy world and SD
alike. Unlike the paper, δ stays continuous (no projection onto the vocabulary); the attempt shows its
nearest vocabulary tokens (of the first CLIP encoder's). On SD 3 (a flow model: the objective is the flow-matching
loss ‖(ε − z0) − v_θ*(x_σ, σ, c)‖², common.DenoisingObjective) each CLIP encoder gets its own δ, of its own width,
from the same start tokens; a pipeline with T5 is refused (common.check_pipeline). The final prompt δ ⊕ P is
judged on the evaluation seeds; `loss_before` and `loss_after` are the objective on a fixed batch (every target
image at 4 stratified timesteps).
"""

from __future__ import annotations

import torch

from doco_lib.models import denoiser
from doco_lib.prompt_tokens import padded_ids, word_ids
from doco_lib.studies.attacks.common import (
    AttackSettings,
    Attempt,
    DenoisingObjective,
    Judge,
    Target,
    clip_encoders,
    conditioning,
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
    tokenizer, model, encoders = pipe.tokenizer, denoiser(pipe), clip_encoders(pipe)
    device, n = model.device, settings.unlearndiff_tokens
    slots = list(range(1, 1 + n))  # after BOS, before the prompt
    start = vocabulary[torch.randint(len(vocabulary), (n,), generator=generator)]
    ids = padded_ids(tokenizer, start.tolist() + word_ids(tokenizer, start_prompt))[None].to(device)
    tables = [encoder.get_input_embeddings().weight for encoder in encoders]
    deltas = [torch.nn.Parameter(table[start.to(table.device)].detach().clone().float()) for table in tables]

    def condition() -> torch.Tensor:
        return conditioning(pipe, ids, slots, deltas)

    objective = DenoisingObjective(pipe, latents, generator)
    loss_before, loss_after = objective.optimise(model, encoders, condition, deltas, settings.unlearndiff_lr,
                                                 settings.unlearndiff_steps)
    with torch.no_grad():
        embedding = condition()
        nearest = nearest_tokens(tables[0], deltas[0], vocabulary)
    final, rate, success = judged_embedding(pipe, judge, embedding, attempt, settings)
    shown = f"soft[{decode(tokenizer, nearest.tolist())}] ⊕ {start_prompt}"
    return Attempt("unlearndiff", attempt, start_prompt, shown, rate, success, final, loss_before=loss_before,
                   loss_after=loss_after)


def run(pipe, judge: Judge, target: Target, attempt: int, settings: AttackSettings) -> Attempt:
    return soft_prompt_attack(pipe, judge, target.prompt, target.latents[:settings.unlearndiff_images],
                              target.vocabulary, attempt, settings, settings.generator(attempt))
