"""Seeded sampling: image i of a request always starts from the noise of its own seed.

One generator per image makes an image independent of batch size and of which other prompts share
its batch, so the original and an erased model can be compared on exactly the same starting noise.
"""

from __future__ import annotations

import torch


def initial_latents(pipe, seeds: list[int]) -> torch.Tensor:
    config = pipe.unet.config
    return torch.stack([torch.randn(config.in_channels, config.sample_size, config.sample_size,
                                    generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds])


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
             batch_size: int = 64) -> torch.Tensor:
    """Images in [0, 1], shape (len(prompts), 3, H, W), for each (prompt, seed) pair."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt")
    out = []
    for start in range(0, len(prompts), batch_size):
        latents = initial_latents(pipe, seeds[start:start + batch_size]).to(pipe.unet.device, pipe.unet.dtype)
        result = pipe(prompts[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                      latents=latents, output_type="pt")
        out.append(result.images.float().cpu())
    return torch.cat(out)
