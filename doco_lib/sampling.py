"""Seeded sampling: image i of a request always starts from the noise of its own seed.

One generator per image makes an image independent of which other prompts share its batch, so the original
and an erased model can be compared on exactly the same starting noise.

On a GPU, sampling runs in float16 without touching the weights it is given: a pipeline whose weights are
float32 (one being trained) samples with a float16 copy of its UNet, text encoders and VAE made for the call,
in channels-last layout, and a pipeline loaded for sampling is float16 already (`models.load_pipeline`). The
batch size follows the free GPU memory (`fitting_batch_size`), halving on an out-of-memory error. The sampler
is the pipeline's own scheduler unless another is named (`SAMPLERS`): PNDM for Stable Diffusion, as the papers
sample, DDIM in the toy world.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Iterator

import torch

from doco_lib.models import (
    denoiser,
    denoiser_component,
    denoiser_family,
    denoiser_kind,
    half_dtype,
    latent_shape,
    pick_device,
    sampling_dtype,
    text_call_kwargs,
)

# "pipeline": the model's own scheduler. "dpmsolver++": DPM-Solver++ (2nd-order multistep), what the DoCo
# authors' code draws its anchor images with (25 steps): faster, a named deviation from the paper's sampler.
SAMPLERS = ("pipeline", "dpmsolver++")
# The largest batch `fitting_batch_size` picks; beyond it a GPU gains nothing on a 512-px UNet.
MAX_BATCH = 64
# Share of the free GPU memory a sampling batch may fill (the rest: fragmentation, the allocator's slack).
MEMORY_SHARE = 0.85


def initial_latents(pipe, seeds: list[int]) -> torch.Tensor:
    """The starting noise of each seed, at the denoiser's native latent size, in the form its pipeline takes (FLUX.1's
    packed into 2×2 patches)."""
    channels, size = latent_shape(denoiser(pipe))
    noise = torch.stack([torch.randn(channels, size, size, generator=torch.Generator("cpu").manual_seed(seed))
                         for seed in seeds])
    if denoiser_family(denoiser(pipe)) == "flux":
        return type(pipe)._pack_latents(noise, len(seeds), channels, size, size)
    return noise


def default_batch_size(pipe) -> int:
    """Images per pipeline call by latent size: 64 for the toy world's 8×8 latents, 8 for SD v1's 64×64 (a
    classifier-free-guidance batch of 16), 2 for SDXL's 128×128; what a 24 GB card holds in float16."""
    return max(1, min(MAX_BATCH, 32768 // latent_shape(denoiser(pipe))[1] ** 2))


def scheduler_for(pipe, sampler: str):
    """The scheduler `sampler` names, configured from the pipeline's own (its prediction type and noise schedule)."""
    if sampler == "pipeline":
        return pipe.scheduler
    if sampler == "dpmsolver++":
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                       solver_order=2)
    raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")


def half_precision_copy(module: torch.nn.Module, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """A copy of `module` with its floating-point parameters and buffers in `dtype`, built tensor by tensor (no
    float32 copy of the whole module on the way); `module` itself is left as it is."""
    converted = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        value = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach().clone()
        converted[id(tensor)] = torch.nn.Parameter(value, requires_grad=False) if isinstance(
            tensor, torch.nn.Parameter) else value
    clone = copy.deepcopy(module, converted)
    clone.__dict__["_compiled_call_impl"] = None  # a compiled original's entry point would run the original
    return clone


def _has_hooks(module: torch.nn.Module) -> bool:
    """Whether hooks act on `module`'s submodules (SPM's adapters): a copy would carry hooks that still read the
    original's tensors, so such a module samples as it is, under autocast."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


@contextlib.contextmanager
def sampling_components(pipe, sampler: str = "pipeline"):
    """`pipe` set up for sampling for the duration of the block, and put back after it: the scheduler `sampler`
    names; on a GPU, where the UNet holds float32 weights, half-precision copies (`models.half_dtype`) of the
    denoiser, text encoders and VAE (in channels-last layout), so the weights being trained are never cast. Yields
    the autocast context a pipeline whose float32 UNet could not be copied (it carries hooks) samples under; a no-op
    otherwise."""
    swaps = {}
    if sampler != "pipeline":
        swaps["scheduler"] = scheduler_for(pipe, sampler)
    name = denoiser_component(pipe)
    unet = getattr(pipe, name)
    autocast = contextlib.nullcontext()
    if unet.device.type == "cuda" and unet.dtype == torch.float32:
        half = half_dtype(denoiser_kind(unet))
        if _has_hooks(unet):
            if pipe.vae.config.get("force_upcast", False) and torch.cuda.is_bf16_supported(including_emulation=False):
                half = torch.bfloat16  # the VAE overflows float16 (SDXL's `force_upcast`)
            autocast = torch.autocast("cuda", half)
        else:
            for component in (name, "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
                module = getattr(pipe, component, None)
                if module is not None:
                    swaps[component] = half_precision_copy(module, half)
            for component in (name, "vae"):
                swaps[component].to(memory_format=torch.channels_last)
    originals = {name: getattr(pipe, name) for name in swaps}
    for name, module in swaps.items():
        setattr(pipe, name, module)
    try:
        yield autocast
    finally:
        for name, module in originals.items():
            setattr(pipe, name, module)


def sampling_settings(device: str, batch_size: int | None = None, sampler: str = "pipeline",
                      compiled: bool = False, kind: str = "unet") -> dict:
    """What changes a sampled image besides the model, prompt, seed, steps and guidance: the kind of device and the
    dtype sampling runs in (`models.sampling_dtype` of the model's denoiser `kind`) and the sampler; on a GPU also its
    name, the batch size and compilation, since float16 kernels chosen per GPU, shape and fusion round differently.
    On a CPU a batch size changes no image at float32 precision, so the runs of one output root share their images
    whatever batch size each uses."""
    target = pick_device(device)
    settings = {"device": target.type, "dtype": str(sampling_dtype(target, kind)).removeprefix("torch."),
                "sampler": sampler}
    if target.type == "cuda":
        settings.update(gpu=torch.cuda.get_device_name(target), batch_size=batch_size or "by free memory",
                        compiled=compiled)
    return settings


_fitting: dict[tuple, int] = {}


def fitting_batch_size(pipe) -> int:
    """Images per pipeline call that fill `MEMORY_SHARE` of the GPU's free memory, as a power of two, at most
    `MAX_BATCH`; on other devices `default_batch_size`. Measured once per UNet architecture, dtype and device: peak
    memory of one guided denoising step at 1 and at 4 images gives a fixed and a per-image part, and the VAE
    decodes one image at a time (slicing) or the whole batch."""
    unet = denoiser(pipe)
    if unet.device.type != "cuda":
        return default_batch_size(pipe)
    key = (type(unet).__name__, latent_shape(unet)[1], sum(p.numel() for p in unet.parameters()), unet.dtype,
           unet.device.index)
    if key not in _fitting:
        peaks = {n: _peak_of_one_step(pipe, n) for n in (1, 4)}
        per_image = max(1, (peaks[4] - peaks[1]) // 3)
        fixed = max(0, peaks[1] - per_image)
        free, _ = torch.cuda.mem_get_info(unet.device)
        free += torch.cuda.memory_reserved(unet.device) - torch.cuda.memory_allocated(unet.device)
        _fitting[key] = batch_that_fits(free, fixed, per_image)
    return _fitting[key]


def batch_that_fits(free: int, fixed: int, per_image: int) -> int:
    """The largest power of two n ≤ `MAX_BATCH` with fixed + n · per_image ≤ `MEMORY_SHARE` · free (bytes); at
    least 1. A power of two, so that small changes of the free memory keep the batch, and with it the images."""
    fits = max(1, int((MEMORY_SHARE * free - fixed) // per_image))
    return min(MAX_BATCH, 2 ** (fits.bit_length() - 1))


@torch.no_grad()
def _peak_of_one_step(pipe, n_images: int) -> int:
    """Bytes one call of `pipe` for `n_images` images with one guided step and decoding adds to what is allocated."""
    device = denoiser(pipe).device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    pipe([""] * n_images, num_inference_steps=1, guidance_scale=2.0, output_type="pt", **text_call_kwargs(pipe),
         latents=initial_latents(pipe, list(range(n_images))).to(device, denoiser(pipe).dtype))
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@torch.no_grad()
def generate_batches(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                     batch_size: int | None = None, sampler: str = "pipeline") -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the batch's first image, its images in [0, 1] on the CPU) per pipeline call, for each (prompt,
    seed) pair; a caller can store one batch while the next is drawn. `batch_size`: images per call (None or 0:
    `fitting_batch_size`, on a CPU `default_batch_size`)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt")
    with sampling_components(pipe, sampler) as autocast:
        batch_size = batch_size or fitting_batch_size(pipe)
        start = 0
        while start < len(prompts):
            end = start + batch_size
            latents = initial_latents(pipe, seeds[start:end]).to(denoiser(pipe).device, denoiser(pipe).dtype)
            try:
                with autocast:
                    images = pipe(prompts[start:end], num_inference_steps=steps, guidance_scale=guidance,
                                  latents=latents, output_type="pt", **text_call_kwargs(pipe)).images
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2  # another process took memory since the batch size was measured
                torch.cuda.empty_cache()
                continue
            yield start, images.float().cpu()
            start = end


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
             batch_size: int | None = None, sampler: str = "pipeline") -> torch.Tensor:
    """Images in [0, 1], shape (len(prompts), 3, H, W), for each (prompt, seed) pair (`generate_batches`)."""
    return torch.cat([images for _, images in generate_batches(pipe, prompts, seeds, steps, guidance, batch_size,
                                                                 sampler)])
