"""Adversarial prompts in the loop: a robust erasure in the manner of AdvUnlearn (Zhang et al., "Defensive Unlearning
with Adversarial Training for Robust Concept Erasure in Diffusion Models", NeurIPS 2024), for DoCo and ESD.

Every `adv_prompt_every` iterations from `warmup_iterations` on, an inner attack finds, for each target prompt P,
K = `adv_prompt_tokens` soft token embeddings δ put in front of P's tokens (after BOS) with which the model being
erased, θ, predicts what the original model θ₀ predicts for P itself:

    min_δ E_{x_t, t} ‖ε_θ(x_t, t, c(δ ⊕ P)) − ε_θ₀(x_t, t, c(P))‖²          (AdvUnlearn's attack objective)

with `adv_prompt_steps` Adam steps at `adv_prompt_lr`, δ starting where the previous round left it (AdvUnlearn's
`attack_init: latest`; the first round from random vocabulary tokens). Between rounds, a share
`adv_prompt_fraction` of the target batch, drawn per sample, is conditioned on δ ⊕ P instead of P, so the erasure
is trained on the prompts that would bring the concept back as well as on the target prompts (AdvUnlearn erases on
the adversarial prompt alone: fraction 1).

Unlike AdvUnlearn, x_t are the run's own noised latents (the original model's anchor images for DoCo, ESD's
partially denoised target latents), not latents the erased model samples for P; and δ moves only the prompts the
trainer erases. Under several processes each inner step's gradient is averaged over the processes, so δ stays the
same in all of them. One text encoder only (SD v1 and 2.x, the toy world): the soft tokens are CLIP input
embeddings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from doco_lib.errors import ParamsError
from doco_lib.models import denoiser_output, text_encoders
from doco_lib.prompt_tokens import padded_ids, soft_tokens, word_ids


class AdversarialPrompts:
    """The soft prefix δ of each target prompt (`delta`, (P, K, D)), the inner attack that updates it, and the
    conditionings δ ⊕ P (`embeddings`, (P, L, D); None before the first round)."""

    def __init__(self, pipe, prompts: list[str], tokens: int, seed: int, device: torch.device):
        if len(text_encoders(pipe)) != 1:
            raise ParamsError("adv_prompt_every: adversarial prompts need a single CLIP text encoder (SD v1, 2.x, "
                              f"the toy world); this pipeline has {len(text_encoders(pipe))}. Set adv_prompt_every: 0.")
        tokenizer, self.encoder = pipe.tokenizer, pipe.text_encoder.to(device).requires_grad_(False).eval()
        self.slots = list(range(1, 1 + tokens))  # after BOS, before the prompt
        generator = torch.Generator().manual_seed(seed)  # the same in every process
        # Start words drawn from the whole vocabulary, special tokens left out, as AdvUnlearn's random start.
        special = set(tokenizer.all_special_ids)
        vocabulary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
        start = vocabulary[torch.randint(len(vocabulary), (len(prompts), tokens), generator=generator)]
        self.ids = torch.stack([padded_ids(tokenizer, row.tolist() + word_ids(tokenizer, prompt), "adv_prompt_tokens")
                                for row, prompt in zip(start, prompts)]).to(device)
        table = self.encoder.get_input_embeddings().weight
        self.delta = table[start.to(table.device)].detach().float().clone()
        self.embeddings: torch.Tensor | None = None

    def conditioning(self, delta: torch.Tensor) -> torch.Tensor:
        """(P, L, D): every target prompt's conditioning with its soft prefix `delta`."""
        with soft_tokens(self.encoder, self.slots, delta):
            return self.encoder(self.ids)[0].float()

    def attack(self, unet, original: Callable, draw: Callable, plain: torch.Tensor, steps: int, lr: float,
               reduce: Callable = lambda grads: grads, autocast: Callable = contextlib.nullcontext) -> float:
        """`steps` Adam steps on δ against `unet` (left unchanged), each on a fresh batch `draw()` = (x_t, t, index
        of each sample's target prompt); `original(x_t, t, c)`: the starting denoiser's output, the reference
        (the trainer's `original_output`); `plain`: the target prompts' own conditionings (P, L, D); `reduce`
        averages a gradient over processes, `autocast()` is the run's mixed precision. Returns the objective at the last step."""
        delta = torch.nn.Parameter(self.delta.clone())
        optimizer = torch.optim.Adam([delta], lr=lr)
        loss = torch.zeros(())
        for _ in range(steps):
            x_t, t, index = draw()
            with torch.no_grad(), autocast():
                reference = original(x_t, t, plain[index]).float()
            with autocast():
                prediction = denoiser_output(unet, x_t, t, self.conditioning(delta)[index]).float()
            loss = F.mse_loss(prediction, reference)
            # Only δ's gradient: the UNet's trainable weights keep whatever gradients they hold.
            (grad,) = reduce(list(torch.autograd.grad(loss, [delta])))
            delta.grad = grad
            optimizer.step()
        self.load(delta.detach())
        return loss.item()

    def load(self, delta: torch.Tensor) -> None:
        """Take `delta` as the prefix (a round's result, or a checkpoint's) and embed the adversarial prompts."""
        self.delta = delta.to(self.delta.device, torch.float32)
        with torch.no_grad():
            self.embeddings = self.conditioning(self.delta)

    def mixed(self, plain: torch.Tensor, index: torch.Tensor, fraction: float,
              generator: torch.Generator) -> torch.Tensor:
        """A batch's target conditionings `plain` (B, L, D) with a share `fraction` of its samples, drawn from
        `generator`, replaced by their prompt's adversarial conditioning (`index`: each sample's prompt)."""
        if self.embeddings is None:
            return plain
        chosen = (torch.rand(len(index), generator=generator) < fraction).to(plain.device)
        return torch.where(chosen.view(-1, 1, 1), self.embeddings[index.to(plain.device)].to(plain.dtype), plain)
