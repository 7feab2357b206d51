"""What the UNet's output means, and its conversions: the one place that knows about `prediction_type`.

A diffusion UNet is trained to output one of two quantities (the scheduler config's `prediction_type`):
SD v1 and SDXL predict the noise ε (`epsilon`), SD 2.x at 768 px the velocity v (`v_prediction`). With
x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε (DDPM's forward process):

    v   = √ᾱ_t ε − √(1−ᾱ_t) z0                       (diffusers' `get_velocity`)
    ε   = √ᾱ_t v + √(1−ᾱ_t) x_t                      from a v output
    x0  = √ᾱ_t x_t − √(1−ᾱ_t) v                      from a v output
    x0  = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t                  from an ε output

The methods follow one rule. A regression of the trained UNet's output onto a target (DoCo's L_r, ConAbl, ESD,
RGD) is taken in the UNet's own parameterization, as the model was trained and as diffusers fine-tunes it
(`train_text_to_image`): a target made of noise is `target(z0, ε, t)` (ε, or v), a target made of UNet outputs
(the frozen model's prediction, ESD's guided combination ε(∅) − η(ε(c*) − ε(∅)), whose weights sum to one) is in
that parameterization already, since ε, v and x0 are affine in one another at fixed x_t and t. A method that reads
the output *as* a quantity converts it: DoCo's discriminator sees ε or x0 (`disc_input`), SepME correlates ε
directions. For ε models every conversion is the identity, bit for bit.
"""

from __future__ import annotations

import torch

from doco_lib.errors import ModelLoadError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t for a batch of timesteps (a batched DDPM `pred_original_sample`)."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1).to(x_t.dtype)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


class Parameterization:
    """A UNet's `prediction_type` and the DDPM ᾱ_t of its scheduler, with the conversions above for a batch of
    timesteps `t` (one per sample)."""

    def __init__(self, prediction_type: str, alphas_cumprod: torch.Tensor):
        if prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(f"scheduler prediction_type {prediction_type!r} is not supported (expected one of "
                                 f"{PREDICTION_TYPES}: ε models such as SD v1 and SDXL, v models such as SD 2.x).")
        self.prediction_type, self.alphas_cumprod = prediction_type, alphas_cumprod

    @classmethod
    def of_scheduler(cls, scheduler_config, device: torch.device | str = "cpu") -> "Parameterization":
        """From a pipeline's `scheduler.config` (any diffusers scheduler; ᾱ_t as DDPM training defines them)."""
        from diffusers import DDPMScheduler

        alphas_cumprod = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.to(device)
        return cls(scheduler_config.get("prediction_type", "epsilon"), alphas_cumprod)

    def _roots(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(like.dtype)
        return a.sqrt(), (1 - a).sqrt()

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet should output for x_t made of `z0` and `noise`: ε, or v = √ᾱ ε − √(1−ᾱ) z0."""
        if self.prediction_type == "epsilon":
            return noise
        root_a, root_1ma = self._roots(t, z0)
        return root_a * noise - root_1ma * z0

    def eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise ε the UNet's `output` at (x_t, t) stands for."""
        if self.prediction_type == "epsilon":
            return output
        root_a, root_1ma = self._roots(t, x_t)
        return root_a * output + root_1ma * x_t

    def x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent x0 the UNet's `output` at (x_t, t) stands for."""
        if self.prediction_type == "epsilon":
            return predicted_x0(x_t, output, self.alphas_cumprod, t)
        root_a, root_1ma = self._roots(t, x_t)
        return root_a * x_t - root_1ma * output
