"""`textual_inversion` (white box): Circumventing Concept Erasure (CCE), one new word learnt for the target.

Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image Generative Models", ICLR 2024. A
placeholder word <x> gets one continuous input embedding v, learnt by textual inversion against the *erased*
model θ* (frozen) on images z0 of the target drawn by the *original* model (the first `attack_ti_images` of
`target.latents`):

    min_v E_{z0, t, ε} ‖ε − ε_θ*(√ᾱ_t z0 + √(1−ᾱ_t) ε, t, c("a photo of a <x>"; v))‖²   (v target for v-prediction).

v starts from the embedding of `attack_ti_initializer` (textual inversion's coarse initializer word; the
mean of its tokens' embeddings when it has several) and takes `attack_ti_steps` Adam steps at `attack_ti_lr`.
It is substituted at <x>'s position as the text encoder's input embedding (prompt_tokens.soft_tokens) rather than
added to the tokenizer, so the pipeline is left as it was. On SD 3 (the flow-matching loss, target ε − z0) each CLIP
encoder learns its own v, of its own width, from the initializer's embedding in that encoder; a pipeline with T5 is
refused (common.check_pipeline). "a photo of a <x>" is then judged on the
evaluation seeds; `loss_before` and `loss_after` are the objective on a fixed batch (every image at 4
stratified timesteps). The issue's manual trial on SD used 300 steps at learning rate 5e-3 on 256 images; the
toy defaults (see doco_lib/config.py) are smaller so that an attempt takes seconds on a CPU.
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

TEMPLATE = "a photo of a"  # the prompt is TEMPLATE + " <x>"


def original_images(settings: AttackSettings) -> int:
    """Images of the original model the attack needs per attempt: its training images."""
    return settings.ti_images


def textual_inversion(pipe, judge: Judge, start_prompt: str, latents: torch.Tensor, vocabulary: torch.Tensor,
                      attempt: int, settings: AttackSettings, generator: torch.Generator) -> Attempt:
    """Learn <x>'s embedding against the erased model's diffusion loss on the original model's images
    `latents`, then generate "a photo of a <x>" and judge."""
    tokenizer, model, encoders = pipe.tokenizer, denoiser(pipe), clip_encoders(pipe)
    template = word_ids(tokenizer, TEMPLATE)
    placeholder = word_ids(tokenizer, settings.ti_initializer)[:1]  # any one token: its embedding is replaced
    ids = padded_ids(tokenizer, template + placeholder)[None].to(encoders[0].device)
    slot = [1 + len(template)]  # after BOS and the template
    tables = [encoder.get_input_embeddings().weight for encoder in encoders]
    initial = word_ids(tokenizer, settings.ti_initializer)
    words = [torch.nn.Parameter(table[initial].detach().float().mean(0, keepdim=True)) for table in tables]
    objective = DenoisingObjective(pipe, latents, generator)

    def condition() -> torch.Tensor:
        return conditioning(pipe, ids, slot, words)

    loss_before, loss_after = objective.optimise(model, encoders, condition, words, settings.ti_lr,
                                                 settings.ti_steps)
    with torch.no_grad():
        embedding = condition()
        candidates = vocabulary.long() if len(vocabulary) else torch.arange(len(tables[0]))
        nearest = nearest_tokens(tables[0], words[0], candidates)
    final, rate, success = judged_embedding(pipe, judge, embedding, attempt, settings)
    shown = f"{TEMPLATE} <x> (<x> ≈ {decode(tokenizer, nearest.tolist())})"
    return Attempt("textual_inversion", attempt, start_prompt, shown, rate, success, final, loss_before=loss_before,
                   loss_after=loss_after)


def run(pipe, judge: Judge, target: Target, attempt: int, settings: AttackSettings) -> Attempt:
    return textual_inversion(pipe, judge, target.prompt, target.latents[:settings.ti_images], target.vocabulary,
                             attempt, settings, settings.generator(attempt))
