"""Flow-matching transformer pipelines (Stable Diffusion 3.5 medium, FLUX.1-dev, FLUX.1-schnell) with random
weights, for tests and GPU rehearsals: the counterpart of `sd_shaped` for the MMDiT families.

`build_sd35_pipeline(folder, size)` writes a `StableDiffusion3Pipeline` folder with the configs of
stabilityai/stable-diffusion-3.5-medium: an `SD3Transformer2DModel` (MMDiT-X: 2×2 patches of 16 latent channels,
24 joint blocks of which the first 13 carry a second self-attention on the image tokens, RMS-normed queries and keys,
1536 wide, 24 heads of 64, 384×384 positional-embedding grid, 128×128 latents for 1024 px), an ×8 `AutoencoderKL`
with 16 latent channels (scaling 1.5305, shift 0.0609, no quant convolutions), three text encoders (CLIP ViT-L and
OpenCLIP bigG, both `CLIPTextModelWithProjection`, whose pooled projections (768 + 1280) make the 2048-d pooled
conditioning, and a T5 v1.1 XXL encoder whose 4096-wide states the CLIP states are zero-padded to and joined with)
with their tokenizers, and `FlowMatchEulerDiscreteScheduler` with shift 3.0.

`build_flux_pipeline(folder, size, variant)` writes a `FluxPipeline` folder with the configs of
black-forest-labs/FLUX.1-dev (`variant="dev"`) or FLUX.1-schnell (`"schnell"`): a `FluxTransformer2DModel`
(19 double-stream and 38 single-stream blocks, 24 heads of 128 = 3072 wide, rotary position axes (16, 56, 56),
`in_channels` 64 = 16 latent channels packed 2×2, pooled CLIP-L conditioning of 768, T5 states of 4096; dev embeds
the distilled guidance scale, schnell does not), the 16-channel VAE (scaling 0.3611, shift 0.1159), CLIP-L
(`CLIPTextModel`) and T5 v1.1 XXL with their tokenizers, and the flow-matching Euler scheduler: dev with the
resolution-dependent shift (`use_dynamic_shifting`, base 0.5, max 1.15 between 256 and 4096 image tokens),
schnell with shift 1.0.

`tiny` narrows widths and depths: heads, channels and feature sizes shrink, and the transformers keep their
block kinds in proportion but fewer of them (SD3.5: 4 joint blocks, the first 2 with dual attention; Flux: 2
double- and 4 single-stream blocks), the T5 encoder keeps 4 of its 24 blocks. What the pipelines' code depends on
stays: 16 latent channels, the ×8 VAE, 2×2 patches or packing, the positional grid, the rope axes' proportions
(2:7:7, heads of 32), the guidance embedding, the pooled widths (sum of both CLIP projections for SD3.5, CLIP-L's
for Flux), T5 states wider than the joined CLIP states, all encoders and tokenizers, the schedulers as shipped.
`full` keeps the published configs (transformers of 2.5B and 11.9B parameters; build them on a GPU or on the
meta device).

The configs were written from the published model_index.json and */config.json files of these repositories, from
memory (there is no internet here). The CLIP tokenizers are the real CLIP BPE (`sd_shaped`); the T5 tokenizer is
a `T5Tokenizer` (Unigram, tokenizers-backed, loads offline) with T5's layout (<pad> 0, </s> 1, <unk> 2, 32,100
entries ending in the 100 <extra_id_*> sentinels, 512 positions) but its vocabulary is NOT T5's SentencePiece
vocabulary: its pieces are the first ASCII tokens of the CLIP BPE vocabulary, word-final tokens turned into
word-initial "▁" pieces. Nothing built here is shipped.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch

from doco_lib.toy import toy_weights_dir
from doco_lib.toy.sd_shaped import SD14_TEXT, SD14_VAE, SDXL_TEXT_2, TINY_WIDTHS, _sized, _tokenizer

SD35_ID = "stabilityai/stable-diffusion-3.5-medium"
FLUX_DEV_ID = "black-forest-labs/FLUX.1-dev"
FLUX_SCHNELL_ID = "black-forest-labs/FLUX.1-schnell"
FLUX_IDS = {"dev": FLUX_DEV_ID, "schnell": FLUX_SCHNELL_ID}

# T5 v1.1 XXL's encoder (text_encoder_3/config.json of SD3.5, text_encoder_2/config.json of FLUX.1).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
              num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
              dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="gated-gelu",
              dense_act_fn="gelu_new", is_gated_act=True, is_encoder_decoder=True, tie_word_embeddings=False,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
T5_MAX_LENGTH = 512  # tokenizer model_max_length; SD3 encodes 256 of them by default, Flux-dev 512

# stabilityai/stable-diffusion-3.5-medium: transformer/, vae/, text_encoder{,_2,_3}/ and scheduler/ configs.
SD35_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_VAE = dict(SD14_VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True)
SD35_TEXT = dict(SD14_TEXT)  # CLIP ViT-L/14, with its projection (CLIPTextModelWithProjection)
SD35_TEXT_2 = dict(SDXL_TEXT_2)  # OpenCLIP ViT-bigG/14, as SDXL's second encoder
SD35_TEXT_3 = dict(T5_XXL)
SD35_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# black-forest-labs/FLUX.1-dev and FLUX.1-schnell: transformer/, vae/, text_encoder{,_2}/ and scheduler/ configs.
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(SD35_VAE, scaling_factor=0.3611, shift_factor=0.1159)
FLUX_TEXT = dict(SD14_TEXT)  # CLIP ViT-L/14's text tower (CLIPTextModel: the pooled output, 768)
FLUX_TEXT_2 = dict(T5_XXL)
FLUX_SCHEDULERS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
}

# tiny: CLIP-L 32 wide and bigG 64 wide (their pooled projections join into 96, as 768 + 1280 into 2048), T5 128
# wide (wider than the 96 of the joined CLIP states, as 4096 > 2048), 4 of T5's 24 blocks.
TINY_T5 = dict(d_model=128, d_kv=16, num_heads=8, d_ff=320, num_layers=4, num_decoder_layers=4)
TINY_VAE = dict(TINY_WIDTHS["vae"])
SD35_TINY = dict(transformer=dict(num_layers=4, dual_attention_layers=(0, 1), attention_head_dim=8,
                                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=128,
                                  pooled_projection_dim=32 + 64),
                 vae=TINY_VAE, text=TINY_WIDTHS["text"],
                 text_2=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, projection_dim=64),
                 text_3=TINY_T5)
FLUX_TINY = dict(transformer=dict(num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=2,
                                  joint_attention_dim=128, pooled_projection_dim=32, axes_dims_rope=(4, 14, 14)),
                 vae=TINY_VAE, text=TINY_WIDTHS["text"], text_2=TINY_T5)


def t5_vocabulary(size: int = 32000) -> list[tuple[str, float]]:
    """`size` Unigram pieces with scores in T5's layout (<pad>, </s>, <unk>, pieces, then <extra_id_99> …
    <extra_id_0>): the ASCII tokens of the CLIP BPE vocabulary in merge order, CLIP's word-final "w</w>" as
    SentencePiece's word-initial "▁w", scores falling with the rank as a Zipf law's log-probabilities."""
    vocab = json.loads((toy_weights_dir() / "pipeline" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    pieces, seen = [], {"<pad>", "</s>", "<unk>"}
    for token in sorted(vocab, key=vocab.get):
        if token.startswith("<|"):
            continue
        word = token[:-4] if token.endswith("</w>") else token
        piece = "▁" + word if token.endswith("</w>") else word
        if word.isascii() and word.isprintable() and word and piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    pieces = ["▁", *[p for p in pieces if p != "▁"]][:size - 3]
    if len(pieces) < size - 3:
        raise ValueError(f"the CLIP vocabulary has only {len(pieces)} ASCII pieces, not {size - 3}")
    return ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
            + [(piece, -math.log(rank + 2)) for rank, piece in enumerate(pieces)]
            + [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)])


def t5_tokenizer():
    """A T5-layout `T5Tokenizer` (32,100 entries, 512 positions) whose vocabulary is not T5's (see `t5_vocabulary`)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_vocabulary(), extra_ids=100, model_max_length=T5_MAX_LENGTH)


def make_sd35_transformer(size: str = "tiny", device: str = "cpu"):
    """SD3.5 medium's `SD3Transformer2DModel` (on `device`: "meta" allocates nothing)."""
    from diffusers import SD3Transformer2DModel

    with torch.device(device):
        return SD3Transformer2DModel(**_sized(SD35_TRANSFORMER, size, "transformer", SD35_TINY))


def make_flux_transformer(size: str = "tiny", variant: str = "dev", device: str = "cpu"):
    """FLUX.1's `FluxTransformer2DModel`, with the guidance embedding for dev (on `device`: "meta" allocates
    nothing)."""
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        return FluxTransformer2DModel(**_sized(dict(FLUX_TRANSFORMER, guidance_embeds=_variant(variant) == "dev"),
                                              size, "transformer", FLUX_TINY))


def _variant(variant: str) -> str:
    if variant not in FLUX_IDS:
        raise ValueError(f"variant {variant!r} is not 'dev' or 'schnell'")
    return variant


def _t5_encoder(config: dict):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**config))


@contextmanager
def _default_dtype(dtype: torch.dtype):
    """Modules built inside are initialised in `dtype`: a full FLUX.1 built in bfloat16 on a GPU never holds its
    48 GB of float32 weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def make_sd35_pipeline(size: str = "tiny", seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """An SD-3.5-medium-shaped `StableDiffusion3Pipeline` with seeded random weights, initialised on `device` in
    `dtype`."""
    with _default_dtype(dtype):
        return _sd35_pipeline(size, seed, device)


def _sd35_pipeline(size: str, seed: int, device: str):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = make_sd35_transformer(size, device)
    with torch.device(device):
        vae = AutoencoderKL(**_sized(SD35_VAE, size, "vae", SD35_TINY))
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**_sized(SD35_TEXT, size, "text", SD35_TINY)))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_sized(SD35_TEXT_2, size, "text_2",
                                                                             SD35_TINY)))
        text_encoder_3 = _t5_encoder(_sized(SD35_TEXT_3, size, "text_3", SD35_TINY))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER), vae=vae,
        text_encoder=text_encoder, tokenizer=_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=_tokenizer(open_clip=True), text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer())


def build_sd35_pipeline(folder: Path, size: str = "tiny", seed: int = 0, device: str = "cpu") -> Path:
    """Write `make_sd35_pipeline`'s pipeline to `folder` (safetensors)."""
    make_sd35_pipeline(size, seed, device).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def make_flux_pipeline(size: str = "tiny", variant: str = "dev", seed: int = 0, device: str = "cpu",
                       dtype: torch.dtype = torch.float32):
    """A FLUX.1-dev- or FLUX.1-schnell-shaped `FluxPipeline` with seeded random weights, initialised on `device` in
    `dtype`."""
    with _default_dtype(dtype):
        return _flux_pipeline(size, variant, seed, device)


def _flux_pipeline(size: str, variant: str, seed: int, device: str):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = make_flux_transformer(size, variant, device)
    with torch.device(device):
        vae = AutoencoderKL(**_sized(FLUX_VAE, size, "vae", FLUX_TINY))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_sized(FLUX_TEXT, size, "text", FLUX_TINY)))
        text_encoder_2 = _t5_encoder(_sized(FLUX_TEXT_2, size, "text_2", FLUX_TINY))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[variant]), vae=vae, text_encoder=text_encoder,
        tokenizer=_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer(), transformer=transformer)


def build_flux_pipeline(folder: Path, size: str = "tiny", variant: str = "dev", seed: int = 0,
                        device: str = "cpu") -> Path:
    """Write `make_flux_pipeline`'s pipeline to `folder` (safetensors) in bfloat16, as FLUX.1's checkpoints on the
    hub are stored: a run that loads it in bfloat16 (`weight_dtype`) holds the stored weights exactly."""
    make_flux_pipeline(size, variant, seed, device, dtype=torch.bfloat16).save_pretrained(folder,
                                                                                            safe_serialization=True)
    return Path(folder)
