"""The PatchGAN discriminator and GAN losses of DoCo's concept domain correction.

D sees a UNet prediction in latent space (4 channels: the predicted noise ε, or the predicted clean
latent x0) and outputs a map of logits, one per patch: positive for the anchor concept ("real"),
negative for the target concept ("fake"). Built like pix2pix/CycleGAN's `NLayerDiscriminator`
(4×4 convolutions, LeakyReLU 0.2, normalisation from the second layer on, no sigmoid).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

NORMS = ("batch", "instance", "none")
GAN_MODES = ("vanilla", "lsgan")


def _norm_layer(norm: str):
    if norm == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True)
    if norm == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm == "none":
        return None
    raise ValueError(f"disc_norm {norm!r} is not one of {NORMS}")


class NLayerDiscriminator(nn.Module):
    """PatchGAN with `n_layers` 4×4 convolutions in all.

    Layers 1 … n_layers−1 have stride 2 and double the width (capped at 8× `base_channels`); the last
    maps to one logit per patch with stride `final_stride`. Defaults follow the DoCo paper: 5 layers,
    stride 2 throughout. The authors' code is the same with `final_stride=1`
    (Conv 4→64, 64→128→256→512 with BatchNorm, then 512→1).
    """

    def __init__(self, in_channels: int = 4, base_channels: int = 64, n_layers: int = 5, norm: str = "batch",
                 final_stride: int = 2):
        super().__init__()
        if n_layers < 2:
            raise ValueError(f"disc_layers must be at least 2, got {n_layers}")
        norm_layer = _norm_layer(norm)
        use_bias = norm != "batch"  # BatchNorm's shift makes a conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        width = base_channels
        for i in range(1, n_layers - 1):
            next_width = base_channels * min(2 ** i, 8)
            layers.append(nn.Conv2d(width, next_width, 4, stride=2, padding=1, bias=use_bias))
            if norm_layer is not None:
                layers.append(norm_layer(next_width))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=final_stride, padding=1))
        self.model = nn.Sequential(*layers)
        self.n_layers, self.final_stride = n_layers, final_stride

    def output_size(self, input_size: int) -> int:
        """Side of the logit map for a square input of side `input_size` (≤ 0: input too small)."""
        size = input_size
        for _ in range(self.n_layers - 1):
            size = (size + 2 - 4) // 2 + 1
        return (size + 2 - 4) // self.final_stride + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def check_discriminator_fits(n_layers: int, final_stride: int, latent_size: int) -> None:
    """Raise a clear error when a discriminator this deep would shrink the latent below one patch."""
    probe = NLayerDiscriminator(4, 1, n_layers, "none", final_stride)
    if probe.output_size(latent_size) < 1:
        raise ValueError(f"disc_layers={n_layers} with final stride {final_stride} is too deep for {latent_size}×"
                         f"{latent_size} latents (no patch left); use fewer layers (the toy world's 8×8 latents "
                         "take at most 3).")


class GANLoss(nn.Module):
    """`vanilla`: BCE with logits (the log-likelihood of eq. 8); `lsgan`: least squares on the logits."""

    def __init__(self, mode: str = "vanilla", real_label: float = 1.0, fake_label: float = 0.0):
        super().__init__()
        if mode not in GAN_MODES:
            raise ValueError(f"gan_mode {mode!r} is not one of {GAN_MODES}")
        self.mode = mode
        self.loss = nn.BCEWithLogitsLoss() if mode == "vanilla" else nn.MSELoss()
        self.register_buffer("real_label", torch.tensor(real_label))
        self.register_buffer("fake_label", torch.tensor(fake_label))

    def forward(self, logits: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        label = self.real_label if target_is_real else self.fake_label
        return self.loss(logits, label.to(logits.dtype).expand_as(logits))
