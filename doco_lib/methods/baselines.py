"""The baselines and comparable methods in the same harness as DoCo (data, parameter selection, loop, checkpoints, export).

ESD — Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023. The UNet is trained so that
its prediction for the target prompt c* matches the frozen original's guidance pushed *away* from c*:

    ε_θ(x_t, c*, t)  →  ε*(x_t, t) − η (ε*(x_t, c*, t) − ε*(x_t, t))

on latents x_t obtained by partially denoising noise with prompt c* (the trained model, guidance
`esd_start_guidance`, a random number of the `esd_steps` DDIM steps; Euler steps of the flow for SD 3.x and
FLUX.1). ESD-x trains cross-attention (`trainable: cross_attention`), ESD-u everything else (`trainable:
non_cross_attention`); on an MMDiT their analogues (`registry.TRAINABLE_PARAMETERS`).

Concept Ablation (ConAbl) — Kumari et al., "Ablating Concepts in Text-to-Image Diffusion Models", ICCV
2023. On noised anchor latents, the prediction for the target prompt c* is pulled to the frozen model's
prediction for the anchor prompt c (`conabl_variant: model`, eq. 4 of that paper) or to the true noise
(`noise`), optionally with the diffusion loss on the anchor images as its retaining term (`conabl_retain`,
weight `retain_weight`).

RGD — Ko et al., "Boosting Alignment for Post-Unlearning Text-to-Image Generative Models", NeurIPS 2024
(restricted gradient + diversity). The ordinary diffusion loss on (forget image, forget prompt) pairs is
*ascended* (G_u = −∇L_f, switched off for a batch whose L_f already exceeds the truncation m) and the
same loss on the paired concept-free twins is descended (G_r = ∇L_r); where they conflict each is
projected onto the normal plane of the other, and the update is G_u' + α G_r' (`rgd_alpha`, default 1.6
as the authors' run script). Forget/retain prompts come from slot vocabularies (`doco_lib.methods.rgd_prompts`).

Each loss regresses the trained UNet's output in its own parameterization (ε, v for SD 2.x, a flow's v for SD 3.x
and FLUX.1): targets made of
noise come from the harness as ε or v, and targets made of UNet outputs (the frozen model's anchor prediction,
ESD's guided combination, whose weights sum to one) are in that parameterization already
(`doco_lib.methods.prediction`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from doco_lib.anchors import AnchorLatents
from doco_lib.methods.harness import ErasureTrainer
from doco_lib.methods.prediction import denoising_scheduler
from doco_lib.methods.spm import SpmTrainer
from doco_lib.methods.surgery import restricted_gradient
from doco_lib.methods.uce import UceTrainer
from doco_lib.models import denoiser_output, latent_shape


class ConAblTrainer(ErasureTrainer):
    method = "conabl"

    def needs_frozen_unet(self) -> bool:
        return self.config.conabl_variant == "model"

    def train_step(self) -> dict:
        cfg = self.config
        index = self._sample_index()
        x_t, t, diffusion_target, c, c_star = self._batch(index, self.generator)
        x_r, t_r, target_r, c_r = (self._retain_batch(x_t, t, diffusion_target, c) if cfg.conabl_retain
                                   else (x_t, t, diffusion_target, c))
        with self.accelerator.autocast():
            if cfg.conabl_variant == "model":
                target = self.original_output(x_t, t, c).float()
            else:
                target = diffusion_target
            both = denoiser_output(self.unet, torch.cat([x_t, x_r]), torch.cat([t, t_r]), torch.cat([c_star, c_r])).float()
        prediction, retain_prediction = both[: len(x_t)], both[len(x_t):]
        ablation_loss = F.mse_loss(prediction, target)
        retain_loss = F.mse_loss(retain_prediction, target_r)
        loss = ablation_loss + (cfg.retain_weight * retain_loss if cfg.conabl_retain else 0.0)
        return self.descend(loss, {"g_loss": ablation_loss.item(), "retain_loss": retain_loss.item()}, "ablation")


class EsdTrainer(ErasureTrainer):
    method = "esd"

    def needs_frozen_unet(self) -> bool:
        return True

    @torch.no_grad()
    def _partial_denoise(self, c_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoise fresh noise with prompt c* for a random number of DDIM steps (a flow's Euler steps); returns
        (x_t, t)."""
        cfg = self.config
        channels, size = latent_shape(self.unet)
        scheduler = denoising_scheduler(self.scheduler_config, cfg.esd_steps, (size // 2) ** 2)
        stop = int(torch.randint(0, cfg.esd_steps - 1, (1,), generator=self.generator))
        shape = (len(c_star), channels, size, size)
        # A flow starts from unit noise (its scheduler has no `init_noise_sigma`).
        latents = torch.randn(shape, generator=self.generator).to(self.device) * getattr(scheduler, "init_noise_sigma", 1.0)
        empty = self.empty_embedding.expand_as(c_star)
        for timestep in scheduler.timesteps[:stop]:
            with self.accelerator.autocast():
                eps_empty, eps_prompt = denoiser_output(self.unet, torch.cat([latents, latents]), timestep,
                                                        torch.cat([empty, c_star])).float().chunk(2)
            eps = eps_empty + cfg.esd_start_guidance * (eps_prompt - eps_empty)
            latents = scheduler.step(eps, timestep, latents).prev_sample
        t = scheduler.timesteps[stop].to(self.device).repeat(len(c_star))
        return latents, t

    def train_step(self) -> dict:
        cfg = self.config
        logs = self.refresh_adversarial_prompts()
        index = self._sample_index()
        prompts = self.prompt_index[index]
        c_star = self.target_embeddings[prompts]
        x_t, t = self._partial_denoise(c_star)
        empty = self.empty_embedding.expand_as(c_star)
        with torch.no_grad(), self.accelerator.autocast():
            eps_empty, eps_prompt = self.original_output(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                                         torch.cat([empty, c_star])).float().chunk(2)
            target = eps_empty - cfg.esd_eta * (eps_prompt - eps_empty)
        with self.accelerator.autocast():
            # The trained UNet reads P, or with adversarial prompts on, δ ⊕ P for a share of the batch.
            prediction = denoiser_output(self.unet, x_t, t, self._target_conditioning(prompts)).float()
        loss = F.mse_loss(prediction, target)
        return self.descend(loss, {"g_loss": loss.item(), **logs}, "esd")

    def _adversarial_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch of the inner attack: ESD's own x_t, partially denoised with the target prompts."""
        index = self._sample_index()
        prompts = self.prompt_index[index]
        return (*self._partial_denoise(self.target_embeddings[prompts]), prompts)


class RgdTrainer(ErasureTrainer):
    """`anchors` are the retain images (concept-free prompts); `forget` the forget images, index-paired."""

    method = "rgd"

    def __init__(self, *args, forget: AnchorLatents, **kwargs):
        self.forget = forget
        super().__init__(*args, **kwargs)
        if len(forget) != len(self.anchors):
            raise ValueError(f"forget and retain caches must be index-paired; got {len(forget)} and "
                             f"{len(self.anchors)} images")

    def train_step(self) -> dict:
        cfg = self.config
        index = self._sample_index()
        x_r, t_r, target_r, c_r, c_f = self._batch(index, self.generator)
        x_f, t_f, target_f = self._noised(self.forget.sample(index, self.generator).to(self.device), self.generator)
        # Separate passes, so that each of the two backward passes runs through its own batch only.
        with self.accelerator.autocast():
            pred_f = denoiser_output(self.unet, x_f, t_f, c_f).float()
            pred_r = denoiser_output(self.unet, x_r, t_r, c_r).float()
        forget_loss, retain_loss = F.mse_loss(pred_f, target_f), F.mse_loss(pred_r, target_r)
        truncated = 0 < cfg.rgd_truncation < forget_loss.item()
        # Ascend L_f unless it is already above m; in place, as G_f is a UNet's size (RGD trains the whole UNet).
        g_u = [g.zero_() if truncated else g.neg_() for g in self._grads(forget_loss, retain_graph=True)]
        g_r = self._grads(retain_loss, retain_graph=False)
        update, stats = restricted_gradient(self.reduce(g_u), self.reduce(g_r), cfg.rgd_alpha)
        logs = {"g_loss": forget_loss.item(), "retain_loss": retain_loss.item()}
        self.check_finite(logs)
        self.apply_update(update)
        return self.record_step("rgd", {**logs, "truncated": float(truncated), "cosine": stats.cosine.item(),
                                        "fired": stats.fired.item()})


TRAINERS = {"conabl": ConAblTrainer, "esd": EsdTrainer, "rgd": RgdTrainer, "uce": UceTrainer, "spm": SpmTrainer}
