"""What the denoiser's output means, and its conversions: the one place that knows about `prediction_type`.

A diffusion UNet is trained to output one of two quantities (the scheduler config's `prediction_type`):
SD v1 and SDXL predict the noise ε (`epsilon`), SD 2.x at 768 px the velocity v (`v_prediction`). With
x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε (DDPM's forward process):

    v   = √ᾱ_t ε − √(1−ᾱ_t) z0                       (diffusers' `get_velocity`)
    ε   = √ᾱ_t v + √(1−ᾱ_t) x_t                      from a v output
    x0  = √ᾱ_t x_t − √(1−ᾱ_t) v                      from a v output
    x0  = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t                  from an ε output

The MMDiT transformers (SD 3.x, FLUX.1) are rectified flows (`flow_matching`, the kind of a
`FlowMatchEulerDiscreteScheduler`): x_t = (1−σ) z0 + σ ε for σ ∈ (0, 1], and the model outputs the velocity
v = ε − z0 along that straight path. Their timestep is t = σ·1000 (`num_train_timesteps`), the number the
pipelines pass (the Flux pipeline divides it by 1000 again inside its transformer call, `models.denoiser_output`):

    v   = ε − z0                                      (the training target)
    ε   = x_t + (1−σ) v                              from a v output
    x0  = x_t − σ v                                  from a v output

Training draws t uniformly from the scheduler's 1000-step training grid (`timesteps`): the DDPM steps 0…999, or
for a flow the grid `FlowMatchEulerDiscreteScheduler` builds at initialisation, σ_i = i/1000 shifted by the
scheduler's `shift` (SD 3.5: 3.0, which spends more steps at high noise; FLUX.1-dev shifts by resolution while
sampling only, so its grid is unshifted). This is diffusers' flow training (train_dreambooth_lora_sd3.py,
train_dreambooth_flux.py: u → `noise_scheduler.timesteps[(u·1000).long()]`) with u uniform, its
`weighting_scheme: none` (the Flux script's default; the SD3 script defaults to a logit-normal u instead): the
same uniform draw over the training steps as for the DDPM models.

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

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_matching")


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t for a batch of timesteps (a batched DDPM `pred_original_sample`)."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1).to(x_t.dtype)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


class Parameterization:
    """A denoiser's `prediction_type` and its scheduler's training schedule (DDPM's ᾱ_t, or a flow's σ = t/1000),
    with the conversions above for a batch of timesteps `t` (one per sample): what training draws
    (`draw_timesteps`), how it noises (`add_noise`) and what the output should be (`target`) or stands for
    (`eps`, `x0`)."""

    def __init__(self, prediction_type: str, alphas_cumprod: torch.Tensor | None = None,
                 timesteps: torch.Tensor | None = None, num_train_timesteps: int = 1000):
        """`alphas_cumprod` for the DDPM kinds (ε, v); `timesteps`, the training grid of σ·`num_train_timesteps`, for
        `flow_matching`."""
        if prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(f"scheduler prediction_type {prediction_type!r} is not supported (expected one of "
                                 f"{PREDICTION_TYPES}: ε models such as SD v1 and SDXL, v models such as SD 2.x, "
                                 "flow-matching transformers such as SD 3.5 and FLUX.1).")
        self.prediction_type, self.alphas_cumprod = prediction_type, alphas_cumprod
        self.num_train_timesteps = num_train_timesteps
        self.flow = prediction_type == "flow_matching"
        if self.flow:
            self.timesteps = timesteps
        else:  # DDPM's steps: a drawn index is its timestep
            self.timesteps = torch.arange(len(alphas_cumprod))

    @classmethod
    def of_scheduler(cls, scheduler_config, device: torch.device | str = "cpu") -> "Parameterization":
        """From a pipeline's `scheduler.config` (any diffusers scheduler; ᾱ_t as DDPM training defines them, σ as
        `FlowMatchEulerDiscreteScheduler` does)."""
        if is_flow_matching(scheduler_config):
            from diffusers import FlowMatchEulerDiscreteScheduler

            grid = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).timesteps
            return cls("flow_matching", timesteps=grid, num_train_timesteps=scheduler_config["num_train_timesteps"])
        from diffusers import DDPMScheduler

        alphas_cumprod = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.to(device)
        return cls(scheduler_config.get("prediction_type", "epsilon"), alphas_cumprod)

    def draw_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` training timesteps, uniform over the training grid (on the CPU)."""
        return self.timesteps[torch.randint(0, len(self.timesteps), (n,), generator=generator)]

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t / self.num_train_timesteps).view(-1, 1, 1, 1).to(like.device, like.dtype)

    def _roots(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(like.dtype)
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: DDPM's √ᾱ_t z0 + √(1−ᾱ_t) ε, or the flow's (1−σ) z0 + σ ε (diffusers' `scale_noise`)."""
        if self.flow:
            sigma = self._sigma(t, z0)
            return sigma * noise + (1 - sigma) * z0
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser should output for x_t made of `z0` and `noise`: ε, v = √ᾱ ε − √(1−ᾱ) z0, or the flow's
        v = ε − z0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.flow:
            return noise - z0
        root_a, root_1ma = self._roots(t, z0)
        return root_a * noise - root_1ma * z0

    def eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise ε the denoiser's `output` at (x_t, t) stands for."""
        if self.prediction_type == "epsilon":
            return output
        if self.flow:
            return x_t + (1 - self._sigma(t, x_t)) * output
        root_a, root_1ma = self._roots(t, x_t)
        return root_a * output + root_1ma * x_t

    def x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent x0 the denoiser's `output` at (x_t, t) stands for."""
        if self.prediction_type == "epsilon":
            return predicted_x0(x_t, output, self.alphas_cumprod, t)
        if self.flow:
            return x_t - self._sigma(t, x_t) * output
        root_a, root_1ma = self._roots(t, x_t)
        return root_a * x_t - root_1ma * output


def is_flow_matching(scheduler_config) -> bool:
    """Whether a scheduler config is a flow-matching one (SD 3.x, FLUX.1): its class, or for a config built in
    memory (no `_class_name`) the key only flow-matching schedulers have."""
    name = scheduler_config.get("_class_name")
    return name.startswith("FlowMatch") if name else "use_dynamic_shifting" in scheduler_config


def denoising_scheduler(scheduler_config, steps: int, image_tokens: int):
    """A fresh scheduler of `steps` sampling steps for denoising with the model's own prediction (ESD's partial
    denoising): DDIM for the DDPM models, the flow's Euler scheduler for flow-matching ones, shifted for
    `image_tokens` (2×2 latent patches) as the Flux pipeline shifts where the config asks (`use_dynamic_shifting`)."""
    if not is_flow_matching(scheduler_config):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(steps)
        return scheduler
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    config = scheduler.config
    mu = calculate_shift(image_tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift) if config.use_dynamic_shifting else None
    scheduler.set_timesteps(steps, mu=mu)
    return scheduler
