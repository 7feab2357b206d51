"""Prompts as token ids, and soft tokens: what the attacks (doco_lib/studies/attacks) and adversarial training
(doco_lib/methods/adversarial_prompts.py) share of a CLIP text encoder's input."""

from __future__ import annotations

import contextlib

import torch

from doco_lib.errors import ParamsError


def word_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def padded_ids(tokenizer, ids: list[int], key: str = "attack_tokens") -> torch.Tensor:
    """BOS + ids + EOS, padded to the encoder's length: what the pipeline's tokenizer call would produce. `key`:
    the parameter named when the prompt is too long."""
    length = tokenizer.model_max_length
    if len(ids) + 2 > length:
        raise ParamsError(f"{key}: the adversarial prompt has {len(ids)} tokens; the text encoder takes at most "
                          f"{length - 2}.")
    return torch.tensor([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] +
                        [tokenizer.pad_token_id] * (length - len(ids) - 2))


@contextlib.contextmanager
def soft_tokens(text_encoder, positions: list[int], vectors: torch.Tensor):
    """Inside the block, the input token embeddings at `positions` are `vectors`: (n, D) for every prompt of a
    batch, or (B, n, D), a row per prompt."""
    def replace(module, inputs, output):
        output = output.clone()
        output[:, positions] = vectors.to(output.dtype)
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()
