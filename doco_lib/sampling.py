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


def default_batch_size(pipe) -> int:
    """Images per pipeline call by latent size: 64 for the toy world's 8×8 latents, 8 for SD v1's 64×64 (a
    classifier-free-guidance batch of 16), 2 for SDXL's 128×128; what a 24 GB card holds in float16."""
    return max(1, min(64, 32768 // pipe.unet.config.sample_size ** 2))


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
             batch_size: int | None = None) -> torch.Tensor:
    """Images in [0, 1], shape (len(prompts), 3, H, W), for each (prompt, seed) pair. `batch_size`: images per
    pipeline call (None or 0: `default_batch_size`). A float32 pipeline on a GPU samples under float16 autocast,
    or bfloat16 where the VAE overflows float16 (SDXL's, `force_upcast`; no autocast on GPUs without bfloat16)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt")
    batch_size = batch_size or default_batch_size(pipe)
    device = pipe.unet.device
    half = device.type == "cuda" and pipe.unet.dtype == torch.float32
    dtype = torch.float16
    if half and pipe.vae.config.get("force_upcast", False):
        dtype, half = torch.bfloat16, torch.cuda.is_bf16_supported(including_emulation=False)
    autocast = torch.autocast(device.type, dtype, enabled=half)
    out = []
    for start in range(0, len(prompts), batch_size):
        latents = initial_latents(pipe, seeds[start:start + batch_size]).to(device, pipe.unet.dtype)
        with autocast:
            result = pipe(prompts[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                          latents=latents, output_type="pt")
        out.append(result.images.float().cpu())
    return torch.cat(out)
