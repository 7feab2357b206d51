"""The PatchGAN discriminator and GAN losses of DoCo's concept domain correction.

D sees a denoiser prediction in latent space (the predicted noise ε, or the predicted clean latent x0: 4
channels for SD v1, 2.x and SDXL, 16 for SD 3.x and FLUX.1, whose packed 2×2 patches the harness unpacks first,
`models.latent_shape`) and outputs a map of logits, one per patch: positive for the anchor concept ("real"),
negative for the target concept ("fake"). Built like pix2pix/CycleGAN's `NLayerDiscriminator`
(4×4 convolutions, LeakyReLU 0.2, normalisation from the second layer on, no sigmoid). Trained by several
processes, its BatchNorm layers take their statistics over all processes' batches (`SyncedBatchNorm2d`).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

NORMS = ("batch", "instance", "none")
GAN_MODES = ("vanilla", "lsgan")


class _SumOverProcesses(torch.autograd.Function):
    """The sum of a tensor over all processes, differentiable: the gradient of each process's input is the sum of
    all processes' output gradients (every process's loss depends on every process's input)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics span the batches of all processes of the launch, as one process
    holding all of them would compute them: forward, backward and running statistics (the same in every process).
    torch's SyncBatchNorm refuses CPU tensors; this runs under gloo on the CPU as under NCCL on GPUs, so the test
    of several CPU processes exercises the code GPUs run. Statistics in float32, mean and variance in two passes
    (no cancellation of E[x²] − E[x]²). Affine, with running statistics and a momentum, as D's layers are; in eval
    mode it is BatchNorm2d, and its state dict is BatchNorm2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        values = x.float()
        local_count = values.new_tensor([values.numel() // values.shape[1]])
        sums = _SumOverProcesses.apply(torch.cat([values.sum((0, 2, 3)), local_count]))
        count = sums[-1]
        mean = sums[:-1] / count
        centred = values - mean[:, None, None]
        var = _SumOverProcesses.apply(centred.square().sum((0, 2, 3))) / count  # biased, to normalise
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var * count / (count - 1), alpha=self.momentum)  # unbiased
        normalised = centred * torch.rsqrt(var + self.eps)[:, None, None]
        return (normalised * self.weight[:, None, None] + self.bias[:, None, None]).to(x.dtype)


def _norm_layer(norm: str, sync_batch_norm: bool = False):
    if norm == "batch":
        return functools.partial(SyncedBatchNorm2d if sync_batch_norm else nn.BatchNorm2d, affine=True)
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
    (Conv 4→64, 64→128→256→512 with BatchNorm, then 512→1). `sync_batch_norm`: BatchNorm statistics over
    the batches of all processes (`SyncedBatchNorm2d`), for training by several processes.
    """

    def __init__(self, in_channels: int = 4, base_channels: int = 64, n_layers: int = 5, norm: str = "batch",
                 final_stride: int = 2, sync_batch_norm: bool = False):
        super().__init__()
        if n_layers < 2:
            raise ValueError(f"disc_layers must be at least 2, got {n_layers}")
        norm_layer = _norm_layer(norm, sync_batch_norm)
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
    """Raise a clear error when a discriminator this deep would shrink the latent below one patch (the latent's
    channels do not change the geometry: the probe reads 4)."""
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
