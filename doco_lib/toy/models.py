"""Architectures of the toy world: a Stable-Diffusion-shaped pipeline and a judge, all tiny.

The pipeline components are the real diffusers/transformers classes with small configs, so every
method in this repo runs on them exactly as on Stable Diffusion. Sizes are chosen so that the shipped
weights stay under 30 MB and a UNet training step takes a fraction of a second on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from doco_lib.toy.render import COLOURS, SHAPES, STYLES
from doco_lib.toy.tokenizer import CLIP_VOCAB_SIZE, MODEL_MAX_LENGTH

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
LATENT_SIZE = 8  # the VAE downsamples by 4, as SD's by 8: 32×32×3 → 8×8×4
TEXT_HIDDEN = 32


def text_config(width: int = TEXT_HIDDEN, context_length: int = MODEL_MAX_LENGTH):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=context_length,
                          projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def clip_config(width: int = TEXT_HIDDEN, context_length: int = MODEL_MAX_LENGTH):
    """A CLIPModel small enough to train contrastively on toy pairs in minutes."""
    from transformers import CLIPConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=4, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=4, projection_dim=width, num_channels=3)
    return CLIPConfig(text_config=text_config(width, context_length).to_dict(), vision_config=vision.to_dict(),
                      projection_dim=width)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=16)


def make_unet(cross_attention_dim: int = TEXT_HIDDEN):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=16)


def make_scheduler_config(sampler: bool = False) -> dict:
    """Stable Diffusion v1's noise schedule; `sampler=True` adds the DDIM settings SD ships with.

    `clip_sample` is off: latents are not bounded to [-1, 1].
    """
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, prediction_type="epsilon")
    if sampler:
        config.update(set_alpha_to_one=False, steps_offset=1)
    return config


class ToyJudge(nn.Module):
    """A small CNN that predicts the shape, colour and background style of a toy image.

    It stands in for CLIP-based classification (CLIP accuracy) and its penultimate features stand in
    for Inception features in toy FID. Input: images in [-1, 1], shape (B, 3, 32, 32).
    """

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = 4 * width
        self.heads = nn.ModuleDict({"shape": nn.Linear(self.feature_dim, len(SHAPES)),
                                    "colour": nn.Linear(self.feature_dim, len(COLOURS)),
                                    "style": nn.Linear(self.feature_dim, len(STYLES))})
        self.width = width

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features, used for toy FID."""
        return self.features(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Class indices per head (on the CPU) for images in [-1, 1] on any device."""
        self.eval()
        device = next(self.parameters()).device
        out: dict[str, list[torch.Tensor]] = {name: [] for name in self.heads}
        for start in range(0, len(images), batch_size):
            logits = self(images[start:start + batch_size].to(device))
            for name, value in logits.items():
                out[name].append(value.argmax(1).cpu())
        return {name: torch.cat(values) for name, values in out.items()}

    def save_pretrained(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(
            {"width": self.width, "shapes": SHAPES, "colours": COLOURS, "styles": STYLES}, indent=2))

    @classmethod
    def from_pretrained(cls, directory: Path) -> "ToyJudge":
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        model = cls(width=config["width"])
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval()
