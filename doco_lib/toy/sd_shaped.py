"""Stable-Diffusion-v1.4-shaped pipelines with random weights, for tests and the GPU rehearsal.

`build_sd14_pipeline(folder, size="tiny")` writes a `StableDiffusionPipeline` folder whose configs are
SD v1.4's (UNet block types, 4 levels, `layers_per_block=2`, 64×64 latents for 512-px images, an ×8
`AutoencoderKL` with scaling factor 0.18215, a 77-position CLIP text encoder with the real CLIP BPE
tokenizer, SD v1.4's PNDM scheduler) with seeded random weights in safetensors: `tiny` narrows every
width (seconds to build, runs on a CPU), `full` keeps SD v1.4's (UNet 860M, text 123M, VAE 84M
parameters). `build_clip_model` writes a random `CLIPModel` with CLIP ViT-L/14's 224-px processor config.
`install_in_hub_cache` puts such a folder into a Hugging Face cache under a hub id, so that, with
`HF_HUB_OFFLINE=1`, the shipped params files load it by exactly the id a user has
(`CompVis/stable-diffusion-v1-4`, `openai/clip-vit-large-patch14`). Nothing built here is shipped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from doco_lib.toy import toy_weights_dir

SD14_ID = "CompVis/stable-diffusion-v1-4"
CLIP_L_ID = "openai/clip-vit-large-patch14"

SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                       "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD14_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=0.18215,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
# SD v1.4's scheduler/scheduler_config.json.
SD14_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None)
# Only the widths differ from SD v1.4 (channels, heads, feature sizes); depths, block types and sizes stay.
TINY_WIDTHS = dict(unet=dict(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=4),
                   vae=dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=16),
                   text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32))

# CLIP ViT-L/14's preprocessor_config.json: 224-px resize and centre crop, CLIP's normalisation.
CLIP_PROCESSOR = dict(crop_size={"height": 224, "width": 224}, do_center_crop=True, do_convert_rgb=True,
                      do_normalize=True, do_rescale=True, do_resize=True, rescale_factor=1 / 255, resample=3,
                      image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                      size={"shortest_edge": 224})
CLIP_L = dict(text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        max_position_embeddings=77, vocab_size=49408),
              vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=224, patch_size=14), projection_dim=768)
TINY_CLIP = dict(text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=77, vocab_size=49408),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=224, patch_size=14), projection_dim=32)


def _tokenizer():
    """The real CLIP BPE tokenizer (49,408 tokens, 77 positions), as shipped with the toy world."""
    from transformers import CLIPTokenizer


    return CLIPTokenizer.from_pretrained(toy_weights_dir() / "pipeline" / "tokenizer")


def _sized(full: dict, size: str, part: str) -> dict:
    if size not in ("tiny", "full"):
        raise ValueError(f"size {size!r} is not 'tiny' or 'full'")
    return {**full, **TINY_WIDTHS[part]} if size == "tiny" else dict(full)


def make_sd14_pipeline(size: str = "tiny", seed: int = 0, device: str = "cpu"):
    """An SD-v1.4-shaped `StableDiffusionPipeline` with seeded random weights, initialised on `device` (a GPU
    initialises SD's billion parameters in seconds)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**_sized(SD14_UNET, size, "unet"))
        vae = AutoencoderKL(**_sized(SD14_VAE, size, "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_sized(SD14_TEXT, size, "text")))
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(),
        scheduler=PNDMScheduler(**SD14_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def build_sd14_pipeline(folder: Path, size: str = "tiny", seed: int = 0, device: str = "cpu") -> Path:
    """Write `make_sd14_pipeline`'s pipeline to `folder` (safetensors)."""
    make_sd14_pipeline(size, seed, device).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def make_clip_model(size: str = "tiny", seed: int = 0, device: str = "cpu"):
    """A random `CLIPModel` (CLIP ViT-L/14's shape with `full`) and its processor with CLIP's 224-px config."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    if size not in ("tiny", "full"):
        raise ValueError(f"size {size!r} is not 'tiny' or 'full'")
    shape = TINY_CLIP if size == "tiny" else CLIP_L
    torch.manual_seed(seed)
    with torch.device(device):
        model = CLIPModel(CLIPConfig(text_config=shape["text"], vision_config=shape["vision"],
                                     projection_dim=shape["projection_dim"]))
    return model, CLIPProcessor(image_processor=CLIPImageProcessor(**CLIP_PROCESSOR), tokenizer=_tokenizer())


def build_clip_model(folder: Path, size: str = "tiny", seed: int = 0, device: str = "cpu") -> Path:
    """Write `make_clip_model`'s model and processor to `folder`."""
    model, processor = make_clip_model(size, seed, device)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return Path(folder)


def install_in_hub_cache(folder: Path, repo_id: str, cache_dir: Path, revision: str = "0" * 40) -> Path:
    """Copy a saved model folder into the Hugging Face cache `cache_dir` (the layout of HF_HUB_CACHE) as
    `repo_id` at `revision`, with refs/main pointing at it, as a download would have left it."""
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def parameter_counts(folder: Path) -> dict[str, int]:
    """Parameters per component of a saved pipeline folder, read from the safetensors headers."""
    counts = {}
    for weights in sorted(Path(folder).glob("*/*.safetensors")):
        with open(weights, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        counts[weights.parent.name] = sum(int(torch.tensor(v["shape"]).prod()) for k, v in header.items()
                                          if k != "__metadata__")
    return counts
