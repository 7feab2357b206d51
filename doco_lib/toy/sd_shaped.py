"""Stable-Diffusion-shaped pipelines (SD v1.4, SD 2.1, SDXL) with random weights, for tests and the GPU rehearsal.

`build_sd14_pipeline(folder, size="tiny")` writes a `StableDiffusionPipeline` folder whose configs are
SD v1.4's (UNet block types, 4 levels, `layers_per_block=2`, 64×64 latents for 512-px images, an ×8
`AutoencoderKL` with scaling factor 0.18215, a 77-position CLIP text encoder with the real CLIP BPE
tokenizer, SD v1.4's PNDM scheduler) with seeded random weights in safetensors: `tiny` narrows every
width (seconds to build, runs on a CPU), `full` keeps SD v1.4's (UNet 860M, text 123M, VAE 84M
parameters). `build_clip_model` writes a random `CLIPModel` with CLIP ViT-L/14's 224-px processor config.
`install_in_hub_cache` puts such a folder into a Hugging Face cache under a hub id, so that, with
`HF_HUB_OFFLINE=1`, the shipped params files load it by exactly the id a user has
(`CompVis/stable-diffusion-v1-4`, `openai/clip-vit-large-patch14`). Nothing built here is shipped.

`build_sd21_pipeline` and `build_sdxl_pipeline` do the same for the newer families. SD 2.1: the 768-px
v-prediction model (96×96 latents, `prediction_type: v_prediction`, DDIM), its UNet with per-level head counts,
linear projections and 1024-wide cross-attention, an OpenCLIP ViT-H text encoder (1024 wide, 23 layers: the
penultimate layer of the 24, as diffusers ships it) whose tokenizer pads with "!". SDXL base 1.0: a 3-level UNet
with 1, 2 and 10 transformer layers per block, 2048-wide cross-attention (CLIP ViT-L's 768 + OpenCLIP bigG's
1280), the `text_time` added embedding (pooled text embedding and six size/crop numbers), 128×128 latents for
1024 px, a VAE with scaling factor 0.13025, Euler sampling. Their configs were written from the published
config.json files of stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-xl-base-1.0, from memory
(there is no internet here); `tiny` narrows the widths only, as for SD v1.4.

The flow-matching transformer families (SD 3.5 medium, FLUX.1-dev and -schnell) are built by `flow_shaped`; `shaped`
builds and installs any family by name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from doco_lib.toy import toy_weights_dir

SD14_ID = "CompVis/stable-diffusion-v1-4"
SD21_ID = "stabilityai/stable-diffusion-2-1"
SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
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

# SD 2.1 (stabilityai/stable-diffusion-2-1: unet/, vae/, text_encoder/ and scheduler/ configs, written from memory).
SD21_UNET = dict(SD14_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True, upcast_attention=True)
SD21_VAE = dict(SD14_VAE, sample_size=768)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=512,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD21_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                      trained_betas=None)
# The attention heads per level scale with the narrowed widths (2 heads of 16 on 32 channels, 4 on 64).
SD21_TINY = dict(unet=dict(TINY_WIDTHS["unet"], attention_head_dim=(2, 2, 4, 4)), vae=TINY_WIDTHS["vae"],
                 text=TINY_WIDTHS["text"])

# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/, text_encoder_2/ and
# scheduler/ configs and model_index.json, written from memory).
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, norm_num_groups=32,
                 addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,  # the pooled 1280 + 6 time ids × 256
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
SDXL_VAE = dict(SD14_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT = dict(SD14_TEXT)  # CLIP ViT-L/14's text tower, as in SD v1
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      interpolation_type="linear", prediction_type="epsilon", steps_offset=1,
                      timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False)
# The second encoder twice as wide as the first, as in SDXL (1280 vs 768): 96-d states, room for the 77 rows of ""
# in a SepME null space.
SDXL_TINY = dict(unet=dict(block_out_channels=(32, 32, 64), cross_attention_dim=32 + 64, attention_head_dim=(2, 2, 4),
                           addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8),
                 vae=TINY_WIDTHS["vae"], text=TINY_WIDTHS["text"],
                 text_2=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, projection_dim=64))

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


def _tokenizer(open_clip: bool = False):
    """The real CLIP BPE tokenizer (49,408 tokens, 77 positions), as shipped with the toy world; `open_clip`: as
    SD 2.x and SDXL's second tokenizer configure it for OpenCLIP's encoders, padding with "!" (id 0)."""
    from transformers import CLIPTokenizer

    folder = toy_weights_dir() / "pipeline" / "tokenizer"
    return CLIPTokenizer.from_pretrained(folder, pad_token="!") if open_clip else CLIPTokenizer.from_pretrained(folder)


def _sized(full: dict, size: str, part: str, tiny: dict = TINY_WIDTHS) -> dict:
    if size not in ("tiny", "full"):
        raise ValueError(f"size {size!r} is not 'tiny' or 'full'")
    return {**full, **tiny[part]} if size == "tiny" else dict(full)


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


def make_sd21_pipeline(size: str = "tiny", seed: int = 0, device: str = "cpu"):
    """An SD-2.1-shaped (768 px, v-prediction) `StableDiffusionPipeline` with seeded random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**_sized(SD21_UNET, size, "unet", SD21_TINY))
        vae = AutoencoderKL(**_sized(SD21_VAE, size, "vae", SD21_TINY))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_sized(SD21_TEXT, size, "text", SD21_TINY)))
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(open_clip=True),
        scheduler=DDIMScheduler(**SD21_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def build_sd21_pipeline(folder: Path, size: str = "tiny", seed: int = 0, device: str = "cpu") -> Path:
    """Write `make_sd21_pipeline`'s pipeline to `folder` (safetensors)."""
    make_sd21_pipeline(size, seed, device).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def make_sdxl_pipeline(size: str = "tiny", seed: int = 0, device: str = "cpu"):
    """An SDXL-base-1.0-shaped `StableDiffusionXLPipeline` with seeded random weights (no watermarker)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**_sized(SDXL_UNET, size, "unet", SDXL_TINY))
        vae = AutoencoderKL(**_sized(SDXL_VAE, size, "vae", SDXL_TINY))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_sized(SDXL_TEXT, size, "text", SDXL_TINY)))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_sized(SDXL_TEXT_2, size, "text_2", SDXL_TINY)))
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(open_clip=True), scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True, add_watermarker=False)


def build_sdxl_pipeline(folder: Path, size: str = "tiny", seed: int = 0, device: str = "cpu") -> Path:
    """Write `make_sdxl_pipeline`'s pipeline to `folder` (safetensors)."""
    make_sdxl_pipeline(size, seed, device).save_pretrained(folder, safe_serialization=True)
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

