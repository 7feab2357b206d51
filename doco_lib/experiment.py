"""From validated params to the objects the notebooks work with; one place, so notebooks stay short."""

from __future__ import annotations

from pathlib import Path

from doco_lib import config
from doco_lib.concepts import ConceptSpec, read_prompt_file
from doco_lib.data import AnchorLatents, load_anchor_latents, prepare_anchor_latents
from doco_lib.discriminator import check_discriminator_fits
from doco_lib.training import DocoConfig, DocoTrainer


def concept(params: dict) -> tuple[ConceptSpec, list[str]]:
    spec = ConceptSpec(params["concept_kind"], params["anchor"], params["target"])
    return spec, read_prompt_file(params["anchor_prompts_file"], spec)


def anchor_dir(params: dict) -> Path:
    return config.run_dir(params) / "anchor_latents"


def training_dir(params: dict) -> Path:
    return config.run_dir(params) / "doco"


def prepare_anchors(params: dict, pipe) -> AnchorLatents:
    _, prompts = concept(params)
    return prepare_anchor_latents(pipe, prompts, params["n_anchor_images"], anchor_dir(params), model=params["model"],
                                  seed=params["seed"], steps=params["num_inference_steps"],
                                  guidance=params["guidance_scale"], shard_size=params["anchor_shard_size"])


def load_anchors(params: dict, pipe) -> AnchorLatents:
    return load_anchor_latents(anchor_dir(params), pipe.vae.config.scaling_factor)


def doco_config(params: dict, latent_size: int) -> DocoConfig:
    """The fidelity preset overridden by the params; checks D fits the latent size before any training."""
    cfg = DocoConfig.from_params(params)
    try:
        check_discriminator_fits(cfg.disc_layers, cfg.disc_final_stride, latent_size)
    except ValueError as error:
        raise config.ParamsError(f"disc_layers: {error}") from None
    return cfg


def make_trainer(params: dict, pipe) -> DocoTrainer:
    """A trainer over the cached anchor latents; it resumes from `doco/checkpoint.pt` when one exists."""
    spec, _ = concept(params)
    cfg = doco_config(params, pipe.unet.config.sample_size)
    return DocoTrainer(pipe, load_anchors(params, pipe), spec, cfg, training_dir(params), device=pipe.device)
