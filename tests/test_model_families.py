"""Beyond SD v1: v-prediction (SD 2.x) and SDXL's two text encoders in every method.

The conversions of `doco_lib.methods.prediction` are checked against diffusers' scheduler math, and each method's
reading of the UNet output is checked on a v-prediction model by hand: an ε-only assumption anywhere fails here.
The SD-2.1- and SDXL-shaped random pipelines (published configs, narrowed widths) load as the right pipeline
class and give the pipeline's own conditioning; every method trains on both through `doco train` (slow tier), and on
the SD-2.1-shaped one each method's update lowers its own objective on a held batch (an update of the wrong sign,
which still changes the weights, raises it)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_training import run_training_notebooks

from doco_lib import config
from doco_lib.anchors import AnchorLatents
from doco_lib.concepts import ConceptSpec
from doco_lib.methods import registry, spm
from doco_lib.methods.baselines import TRAINERS
from doco_lib.methods.discriminator import NLayerDiscriminator, check_discriminator_fits
from doco_lib.methods.harness import DocoTrainer, TrainingConfig, select_trainable
from doco_lib.methods.prediction import Parameterization
from doco_lib.methods.sepme import SepMEConfig, SepMETrainer
from doco_lib.models import ModelLoadError, encode_prompts, load_pipeline, unconditional_conditioning, unet_inputs
from doco_lib.studies import runs
from doco_lib.toy import sd_shaped


# ---------------------------------------------------------------------------------------------- conversions
def _v_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(sd_shaped.SD21_SCHEDULER)  # SD 2.1's, as DDPM (its DDIM-only keys dropped)


def test_conversions_match_the_schedulers_v_prediction_math():
    """target = diffusers' get_velocity; x0 = DDPM step's pred_original_sample; ε drives an ε-scheduler to the
    same next latent as v drives the v-scheduler."""
    from diffusers import DDPMScheduler

    v_scheduler = _v_scheduler()
    eps_scheduler = DDPMScheduler.from_config(v_scheduler.config, prediction_type="epsilon")
    v_model = Parameterization.of_scheduler(v_scheduler.config)
    assert v_model.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    z0, noise, v = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([5, 400, 990])
    x_t = v_scheduler.add_noise(z0, noise, t)

    assert torch.allclose(v_model.target(z0, noise, t), v_scheduler.get_velocity(z0, noise, t), atol=1e-6)
    assert torch.allclose(v_model.eps(v_model.target(z0, noise, t), x_t, t), noise, atol=1e-5)
    assert torch.allclose(v_model.x0(v_model.target(z0, noise, t), x_t, t), z0, atol=1e-4)
    x0, eps = v_model.x0(v, x_t, t), v_model.eps(v, x_t, t)
    for i, step in enumerate(t.tolist()):
        by_v = v_scheduler.step(v[i:i + 1], step, x_t[i:i + 1], generator=torch.Generator().manual_seed(i))
        by_eps = eps_scheduler.step(eps[i:i + 1], step, x_t[i:i + 1], generator=torch.Generator().manual_seed(i))
        assert torch.allclose(x0[i:i + 1], by_v.pred_original_sample, atol=1e-4)
        assert torch.allclose(by_eps.prev_sample, by_v.prev_sample, atol=1e-4)

    # ε models: every conversion is the identity on the output; x0 the usual inversion.
    eps_model = Parameterization.of_scheduler(eps_scheduler.config)
    assert eps_model.target(z0, noise, t) is noise and eps_model.eps(v, x_t, t) is v
    assert torch.allclose(eps_model.x0(noise, x_t, t), z0, atol=1e-4)
    with pytest.raises(ModelLoadError, match="prediction_type 'sample' is not supported"):
        Parameterization("sample", v_scheduler.alphas_cumprod)


# ---------------------------------------------------------------------------------------------- each method on v
@pytest.fixture
def toy_v():
    """The toy pipeline told its UNet predicts v: the harness's reading of the output is what is under test."""
    from diffusers import DDIMScheduler

    pipe = load_pipeline("toy", "cpu", dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    return pipe


def _anchors(pipe, prompts: list[str], n: int = 6, size: int | None = None) -> AnchorLatents:
    """`n` random anchor latents of the UNet's sample size (or `size`), captioned with `prompts` in turn."""
    size, channels = size or pipe.unet.config.sample_size, pipe.unet.config.in_channels
    g = torch.Generator().manual_seed(1)
    return AnchorLatents(torch.randn(n, channels, size, size, generator=g), torch.full((n, channels, size, size), 0.1),
                         [prompts[i % len(prompts)] for i in range(n)], list(range(n)), pipe.vae.config.scaling_factor)


class Recorder:
    """The inputs and outputs of every call of a module."""

    def __init__(self, module):
        self.calls = []
        module.register_forward_hook(lambda m, args, kwargs, out: self.calls.append((args, kwargs, out)),
                                     with_kwargs=True)


def _replay_index(trainer, generator_state, batch: int) -> tuple[torch.Tensor, torch.Generator]:
    """The next training batch's anchor indices, drawn again by hand from the trainer's generator state, and the
    generator after that draw."""
    g = torch.Generator()
    g.set_state(generator_state)
    return trainer.train_index[torch.randint(0, len(trainer.train_index), (batch,), generator=g)], g


def _replay_noised(trainer, latents: AnchorLatents, index: torch.Tensor, g: torch.Generator):
    """(ε, t, x_t, v, ᾱ_t) of the images `index` noised as the harness draws them, computed by hand."""
    z0 = latents.sample(index, g)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, 1000, (len(index),), generator=g)
    a = trainer.alphas_cumprod[t].view(-1, 1, 1, 1)
    return noise, t, a.sqrt() * z0 + (1 - a).sqrt() * noise, a.sqrt() * noise - (1 - a).sqrt() * z0, a


@pytest.mark.parametrize("disc_input", ["eps", "x0"])
def test_doco_on_a_v_model_shows_d_eps_or_x0_and_regresses_l_r_onto_v(toy_v, tmp_path, disc_input):
    batch = 2
    cfg = TrainingConfig(iterations=2, warmup_iterations=0, batch_size=batch, disc_layers=2, disc_input=disc_input,
                         retain_mode="cp", seed=3)
    trainer = DocoTrainer(toy_v, _anchors(toy_v, ["a photo of a pentagon"]), ConceptSpec("instance", "pentagon", "star"),
                          cfg, tmp_path, device="cpu")
    unet, disc = Recorder(trainer.unet), Recorder(trainer.discriminator)
    state = trainer.generator.get_state()
    logs = trainer.train_step()
    index, g = _replay_index(trainer, state, batch)
    noise, t, x_t, v, a = _replay_noised(trainer, trainer.anchors, index, g)

    (args, _, out), = unet.calls  # one pass: the target batch (c*), then the anchor batch (c) of L_r
    assert torch.equal(args[1], torch.cat([t, t])) and torch.allclose(args[0][:batch], x_t, atol=1e-6)
    fake, retain = out.sample[:batch].detach(), out.sample[batch:].detach()
    assert logs["retain_loss"] == pytest.approx(F.mse_loss(retain, v).item(), rel=1e-5)
    assert not math.isclose(logs["retain_loss"], F.mse_loss(retain, noise).item(), rel_tol=1e-2)

    seen_by_d = disc.calls[0][0][0].detach()  # the generator term: D on the target prediction
    expected = a.sqrt() * fake + (1 - a).sqrt() * x_t if disc_input == "eps" else a.sqrt() * x_t - (1 - a).sqrt() * fake
    assert torch.allclose(seen_by_d, expected, atol=1e-5)
    assert not torch.allclose(seen_by_d, fake if disc_input == "eps" else (x_t - (1 - a).sqrt() * fake) / a.sqrt(),
                              atol=1e-3)


def test_conabl_on_a_v_model_regresses_onto_v(toy_v, tmp_path):
    cfg = TrainingConfig(method="conabl", iterations=2, batch_size=2, conabl_variant="noise", seed=4)
    trainer = TRAINERS["conabl"](toy_v, _anchors(toy_v, ["a photo of a pentagon"]),
                                 ConceptSpec("instance", "pentagon", "star"), cfg, tmp_path, device="cpu")
    unet = Recorder(trainer.unet)
    state = trainer.generator.get_state()
    logs = trainer.train_step()
    index, g = _replay_index(trainer, state, 2)
    *_, v, _ = _replay_noised(trainer, trainer.anchors, index, g)
    out = unet.calls[0][2].sample.detach()
    assert logs["g_loss"] == pytest.approx(F.mse_loss(out[:2], v).item(), rel=1e-5)
    assert logs["retain_loss"] == pytest.approx(F.mse_loss(out[2:], v).item(), rel=1e-5)


def test_rgd_on_a_v_model_ascends_and_descends_the_v_loss(toy_v, tmp_path):
    cfg = TrainingConfig(method="rgd", iterations=2, batch_size=2, trainable="cross_attention_kv", rgd_truncation=0,
                         seed=5)
    retain = _anchors(toy_v, ["a photo of a pentagon"])
    forget = _anchors(toy_v, ["a photo of a star"])
    trainer = TRAINERS["rgd"](toy_v, retain, ConceptSpec("instance", "pentagon", "star"), cfg, tmp_path,
                              device="cpu", target_prompts={"a photo of a pentagon": "a photo of a star"}, forget=forget)
    unet = Recorder(trainer.unet)
    state = trainer.generator.get_state()
    logs = trainer.train_step()
    index, g = _replay_index(trainer, state, 2)
    *_, v_r, _ = _replay_noised(trainer, retain, index, g)  # the retain batch first, then the forget batch
    *_, v_f, _ = _replay_noised(trainer, forget, index, g)
    pred_f, pred_r = (call[2].sample.detach() for call in unet.calls)
    assert logs["g_loss"] == pytest.approx(F.mse_loss(pred_f, v_f).item(), rel=1e-5)
    assert logs["retain_loss"] == pytest.approx(F.mse_loss(pred_r, v_r).item(), rel=1e-5)


def test_esd_partially_denoises_a_v_model_with_its_own_prediction_type(toy_v, tmp_path):
    """ESD's x_t comes from DDIM steps that read the UNet output as v (a v model's output taken for ε would give
    other latents); its target ε(∅) − η(ε(c*) − ε(∅)) has weights summing to one, so it stays in v."""
    from diffusers import DDIMScheduler

    cfg = TrainingConfig(method="esd", iterations=2, batch_size=1, esd_steps=4, seed=4)  # seed 4: 2 of 4 steps
    trainer = TRAINERS["esd"](toy_v, _anchors(toy_v, ["a photo of a pentagon"]),
                              ConceptSpec("instance", "pentagon", "star"), cfg, tmp_path, device="cpu")
    c_star = trainer.target_embeddings[:1]
    state = trainer.generator.get_state()
    x_t, t = trainer._partial_denoise(c_star)

    g = torch.Generator()
    g.set_state(state)
    stop = int(torch.randint(0, cfg.esd_steps - 1, (1,), generator=g))
    size = toy_v.unet.config.sample_size
    latents = torch.randn((1, 4, size, size), generator=g)
    scheduler = DDIMScheduler.from_config(toy_v.scheduler.config)  # prediction_type: v_prediction
    scheduler.set_timesteps(cfg.esd_steps)
    with torch.no_grad():
        for step in scheduler.timesteps[:stop]:
            both = toy_v.unet(torch.cat([latents, latents]), step,
                              encoder_hidden_states=torch.cat([trainer.empty_embedding, c_star])).sample
            guided = both[0:1] + cfg.esd_start_guidance * (both[1:2] - both[0:1])
            latents = scheduler.step(guided, step, latents).prev_sample
    assert stop == 2 and torch.allclose(x_t, latents, atol=1e-5) and t.item() == scheduler.timesteps[stop]
    as_eps = DDIMScheduler.from_config(toy_v.scheduler.config, prediction_type="epsilon")
    as_eps.set_timesteps(cfg.esd_steps)
    assert not torch.allclose(as_eps.step(guided, step, latents).prev_sample, scheduler.step(guided, step, latents)
                              .prev_sample, atol=1e-3)


def test_sepme_correlates_eps_directions_of_a_v_model(tmp_path):
    from diffusers import DDIMScheduler

    pipe = load_pipeline("toy-wide", "cpu", dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    trainer = SepMETrainer(pipe, _anchors(pipe, ["a photo of a star"], 4), ["a photo of a heart"],
                           SepMEConfig(max_steps=1), device="cpu")
    x_t, t, c = trainer._noised_batch(torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    with torch.no_grad():
        directions = trainer.directions(x_t, t, c)
        v = pipe.unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                      encoder_hidden_states=torch.cat([c, trainer.empty_embedding.expand_as(c)])).sample
    v_c, v_empty = v.chunk(2)
    a = trainer.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(directions, a.sqrt() * (v_c - v_empty), atol=1e-5)
    assert not torch.allclose(directions, v_c - v_empty, atol=1e-3)


# ---------------------------------------------------------------------------------------------- the pipelines
@pytest.fixture(scope="module")
def sd21_folder(tmp_path_factory):
    return sd_shaped.build_sd21_pipeline(tmp_path_factory.mktemp("sd21") / "sd21")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return sd_shaped.build_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "sdxl")


def test_sd21_shaped_pipeline_has_sd21_configs_but_widths(sd21_folder):
    pipe = load_pipeline(str(sd21_folder), "cpu")
    unet = pipe.unet.config
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction" and not pipe.scheduler.config.clip_sample
    assert unet.sample_size == 96 and pipe.vae_scale_factor * unet.sample_size == 768
    assert unet.use_linear_projection and unet.upcast_attention and len(unet.attention_head_dim) == 4
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size  # 1024 at full size
    assert pipe.text_encoder.config.num_hidden_layers == 23 and pipe.text_encoder.config.hidden_act == "gelu"
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.model_max_length == 77
    assert sd_shaped.SD21_TEXT["hidden_size"] == sd_shaped.SD21_UNET["cross_attention_dim"] == 1024


def test_sdxl_shaped_pipeline_has_sdxl_configs_but_widths(sdxl_folder):
    pipe = load_pipeline(str(sdxl_folder), "cpu")
    unet = pipe.unet.config
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.config.force_zeros_for_empty_prompt
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler" and pipe.scheduler.config.prediction_type == "epsilon"
    assert unet.sample_size == 128 and pipe.vae_scale_factor * unet.sample_size == 1024
    assert unet.addition_embed_type == "text_time" and tuple(unet.transformer_layers_per_block) == (1, 2, 10)
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == widths
    assert unet.projection_class_embeddings_input_dim == (pipe.text_encoder_2.config.projection_dim
                                                          + 6 * unet.addition_time_embed_dim)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection" and pipe.tokenizer_2.pad_token == "!"
    full = sd_shaped.SDXL_UNET
    assert full["cross_attention_dim"] == sd_shaped.SDXL_TEXT["hidden_size"] + sd_shaped.SDXL_TEXT_2["hidden_size"]
    assert full["projection_class_embeddings_input_dim"] == sd_shaped.SDXL_TEXT_2["projection_dim"] + 6 * 256


def test_encode_prompts_gives_each_pipeline_its_own_conditioning(sd21_folder, sdxl_folder):
    prompts = ["a photo of a dog", "Snoopy on a beach"]
    sd21 = load_pipeline(str(sd21_folder), "cpu")
    with torch.no_grad():
        assert torch.equal(encode_prompts(sd21, prompts), sd21.encode_prompt(prompts, "cpu", 1, False)[0])
    assert unet_inputs(sd21.unet, encode_prompts(sd21, prompts)).keys() == {"encoder_hidden_states"}

    xl = load_pipeline(str(sdxl_folder), "cpu")
    with torch.no_grad():
        hidden, negative, pooled, negative_pooled = xl.encode_prompt(prompts, device="cpu")
    time_ids = xl._get_add_time_ids((1024, 1024), (0, 0), (1024, 1024), torch.float32,
                                    xl.text_encoder_2.config.projection_dim)
    inputs = unet_inputs(xl.unet, encode_prompts(xl, prompts))
    assert torch.equal(inputs["encoder_hidden_states"], hidden)
    assert torch.equal(inputs["added_cond_kwargs"]["text_embeds"], pooled)
    assert torch.equal(inputs["added_cond_kwargs"]["time_ids"], time_ids.expand(2, 6))
    # Guidance contrasts with zeros on SDXL (force_zeros_for_empty_prompt), as the pipeline samples.
    empty = unet_inputs(xl.unet, unconditional_conditioning(xl))
    assert torch.equal(empty["encoder_hidden_states"], negative[:1]) and not negative.any()
    assert torch.equal(empty["added_cond_kwargs"]["text_embeds"], negative_pooled[:1])
    assert torch.equal(empty["added_cond_kwargs"]["time_ids"], time_ids)


def test_sdxl_trains_140_kv_matrices_of_340m_parameters_and_d_fits_128_latents():
    """Full-size SDXL base on the meta device: K/V of 10 transformer blocks at 640 channels and 60 at 1280, each
    reading the 2048-d text states; D of 6 layers gives SD v1's 2×2 logit map on 128×128 latents."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd_shaped.SDXL_UNET)
    kv = select_trainable(unet, "cross_attention_kv")
    assert len(kv) == 140 and all(p.shape[1] == 2048 for p in kv.values())
    assert sum(p.numel() for p in kv.values()) == 2 * 2048 * (10 * 640 + 60 * 1280) == 340_787_200
    for layers, stride, side in ((5, 2, 4), (6, 2, 2), (6, 1, 3)):
        assert NLayerDiscriminator(4, 64, layers, "batch", stride).output_size(128) == side
    assert NLayerDiscriminator(4, 64, 5, "batch", 2).output_size(64) == 2  # SD v1, the paper's D
    check_discriminator_fits(6, 2, 128)
    with pytest.raises(ValueError, match="too deep for 128×128"):
        check_discriminator_fits(9, 2, 128)


@pytest.mark.parametrize("name, model, size, logits", [("sd21_snoopy", sd_shaped.SD21_ID, 96, 3),
                                                       ("sdxl_snoopy", sd_shaped.SDXL_ID, 128, 2)])
def test_params_files_of_the_new_families_validate(repo_root, name, model, size, logits):
    params = config.load_params(repo_root / "params" / "concepts" / f"{name}.yaml")
    assert params["model"] == model and params["run_name"] == name
    cfg = runs.training_config(params, size)  # D fits the family's latents
    assert NLayerDiscriminator(4, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm,
                               cfg.disc_final_stride).output_size(size) == logits


# ---------------------------------------------------------------------------------------------- doco train
# Counts only; the rest (D, gradient checkpointing, mixed precision: none on the CPU) as in the params files.
COUNTS = {"n_anchor_images": 2, "anchor_shard_size": 2, "num_inference_steps": 1, "iterations": 2,
          "warmup_iterations": 1, "batch_size": 1, "checkpoint_every": 2, "esd_steps": 2, "rgd_prompts": 2,
          "spm_denoising_steps": 2, "spm_anchors": 1, "device": "cpu",
          # A real model refuses the toy world's RGD slots and UCE preserve list (config.check_real_model_defaults);
          # the Snoopy files have neither, so the nudity slots and UCE's own default for objects stand in.
          "rgd_slots_file": "params/prompts/rgd_nudity_slots.yaml", "uce_preserve": []}


@pytest.fixture(scope="module")
def hub_cache(sd21_folder, sdxl_folder, tmp_path_factory):
    hub = tmp_path_factory.mktemp("hub")
    sd_shaped.install_in_hub_cache(sd21_folder, sd_shaped.SD21_ID, hub)
    sd_shaped.install_in_hub_cache(sdxl_folder, sd_shaped.SDXL_ID, hub)
    return hub


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One output root per module: the runs of a family share its anchor images (one latent cache)."""
    return tmp_path_factory.mktemp("outputs")


def _family_runs():
    """(family, pipeline class, method) for every method on both families; DoCo's in the fast tier (about 25 s
    each, the family's anchor images included), the others slow."""
    for family, pipeline_class in (("sd21", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")):
        for method in registry.METHODS:
            marks = [] if method == "doco" else [pytest.mark.slow]
            yield pytest.param(family, pipeline_class, method, marks=marks, id=f"{family}-{method}")


@pytest.mark.parametrize("family, pipeline_class, method", list(_family_runs()))
def test_every_method_trains_through_doco_train(family, pipeline_class, method, hub_cache, outputs, repo_root,
                                                monkeypatch, one_torch_thread):
    import huggingface_hub.constants

    from doco_lib.app import cli

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(repo_root)
    run_name = f"{family}_{method}"
    overrides = {**COUNTS, "method": method, "run_name": run_name, "output_root": str(outputs)}
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    assert cli.main(["train", "--params", f"params/concepts/{family}_snoopy.yaml", "--quiet", *sets]) == 0

    params = config.load_params(repo_root / "params" / "concepts" / f"{family}_snoopy.yaml", overrides)
    pipe = load_pipeline(params["model"], "cpu", unet=str(runs.training_dir(params) / "unet"))
    assert type(pipe).__name__ == pipeline_class
    base = load_pipeline(params["model"], "cpu").unet.state_dict()
    assert any(not torch.equal(w, base[name]) for name, w in pipe.unet.state_dict().items()), "nothing was erased"


# ---------------------------------------------------------------------------------------------- each loss's sign
# `test_every_method_trains_through_doco_train` checks that a weight changed, which an update of the wrong sign
# does too. Here each method's own update, repeated on one held batch (the trainer's generator set back to its
# state before the first step, so every step draws the same latents, noise, timesteps and prompts; ESD's and SPM's
# sampled x_t replaced by fixed latents at a fixed timestep), must lower that method's objective on the batch, as
# the test computes it from UNet outputs alone: an update that ascends it (a flipped loss) raises it. SD 2.1's
# v-prediction throughout (u below: the UNet's output, v for this model).
SIGN_STEPS = 3
SIGN_BATCH = 2
# 16×16 latents, not SD 2.1's 96×96: the UNet is convolutional, and 96² tokens of self-attention made each case
# 40-80 s on one core (1-2 s at 16×16).
SIGN_LATENT = 16


def _sign_anchors(pipe, prompt: str) -> AnchorLatents:
    return _anchors(pipe, [prompt], size=SIGN_LATENT)


def _sign_pipeline(sd21_folder):
    pipe = load_pipeline(str(sd21_folder), "cpu", dtype=torch.float32)
    return pipe, copy.deepcopy(pipe.unet).requires_grad_(False).eval()  # the original, apart from any trainer's


def _u(unet, x, t, c) -> torch.Tensor:
    return unet(x, t, encoder_hidden_states=c).sample


def _held_batch(trainer, start, latents=None):
    """The batch every step draws from the generator state `start`: (ε, t, x_t, v, ᾱ_t, c, c*) of the harness's
    anchor batch, then the anchor indices and the generator after those draws (RGD's forget batch comes next)."""
    index, g = _replay_index(trainer, start, SIGN_BATCH)
    noise, t, x_t, v, a = _replay_noised(trainer, latents or trainer.anchors, index, g)
    prompts = trainer.prompt_index[index]
    return noise, t, x_t, v, a, trainer.anchor_embeddings[prompts], trainer.target_embeddings[prompts], index, g


def _fixed_sample():
    """Fixed latents at a fixed timestep, in place of the x_t ESD and SPM sample with the model being trained."""
    x_t = torch.randn(SIGN_BATCH, 4, SIGN_LATENT, SIGN_LATENT, generator=torch.Generator().manual_seed(7))
    return x_t, torch.full((SIGN_BATCH,), 601)


def _doco_case(pipe, original, tmp_path, monkeypatch):
    """DoCo, paper preset (cp): L_u = BCE(D₀(ε of u_θ(x_t, c*)), real), against D as it was before the steps (the
    steps train D too; L_u against a moving D could rise with a correct update)."""
    cfg = TrainingConfig(iterations=SIGN_STEPS, warmup_iterations=0, batch_size=SIGN_BATCH, disc_layers=3, lr=1e-4,
                         seed=1)
    trainer = DocoTrainer(pipe, _sign_anchors(pipe, "a photo of a dog"), ConceptSpec("instance", "dog", "Snoopy"), cfg,
                          tmp_path, device="cpu")
    start = trainer.generator.get_state()
    _, t, x_t, _, a, _, c_star, *_ = _held_batch(trainer, start)
    frozen_d = copy.deepcopy(trainer.discriminator)  # train mode, as D runs in training: batch statistics

    def objective():
        eps = a.sqrt() * _u(trainer.unet, x_t, t, c_star) + (1 - a).sqrt() * x_t  # ε of a v prediction
        logits = frozen_d(eps)
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    return trainer, start, objective


def _esd_case(pipe, original, tmp_path, monkeypatch):
    """ESD-x: ‖u_θ(x_t, c*) − [u₀(x_t, ∅) − η (u₀(x_t, c*) − u₀(x_t, ∅))]‖²."""
    cfg = TrainingConfig(method="esd", trainable="cross_attention", iterations=SIGN_STEPS, batch_size=SIGN_BATCH,
                         esd_eta=1.0, lr=1e-4, seed=1)
    trainer = TRAINERS["esd"](pipe, _sign_anchors(pipe, "a photo of a dog"), ConceptSpec("instance", "dog", "Snoopy"),
                              cfg, tmp_path, device="cpu")
    x_t, t = _fixed_sample()
    monkeypatch.setattr(trainer, "_partial_denoise", lambda c_star: (x_t, t))
    c_star = trainer.target_embeddings[:1].expand(SIGN_BATCH, -1, -1)  # one anchor prompt: one target prompt
    empty = trainer.empty_embedding.expand_as(c_star)
    unconditional = _u(original, x_t, t, empty)
    target = unconditional - cfg.esd_eta * (_u(original, x_t, t, c_star) - unconditional)
    return trainer, trainer.generator.get_state(), lambda: F.mse_loss(_u(trainer.unet, x_t, t, c_star), target)


def _conabl_case(pipe, original, tmp_path, monkeypatch):
    """ConAbl (model variant, retaining): ‖u_θ(x_t, c*) − u₀(x_t, c)‖² + α ‖u_θ(x_t, c) − v‖²."""
    cfg = TrainingConfig(method="conabl", conabl_variant="model", conabl_retain=True, retain_weight=0.5,
                         iterations=SIGN_STEPS, batch_size=SIGN_BATCH, lr=1e-4, seed=1)
    trainer = TRAINERS["conabl"](pipe, _sign_anchors(pipe, "a photo of a dog"), ConceptSpec("instance", "dog", "Snoopy"),
                                 cfg, tmp_path, device="cpu")
    start = trainer.generator.get_state()
    _, t, x_t, v, _, c, c_star, *_ = _held_batch(trainer, start)
    anchor = _u(original, x_t, t, c)

    def objective():
        return (F.mse_loss(_u(trainer.unet, x_t, t, c_star), anchor)
                + cfg.retain_weight * F.mse_loss(_u(trainer.unet, x_t, t, c), v))
    return trainer, start, objective


def _rgd_case(pipe, original, tmp_path, monkeypatch):
    """RGD (no truncation): L_f = ‖u_θ(x_f, c_f) − v_f‖² ascended and L_r = ‖u_θ(x_r, c_r) − v_r‖² descended, each
    on its own (−L_f + α L_r fell with the forget term's sign flipped too: both losses then fell)."""
    cfg = TrainingConfig(method="rgd", trainable="cross_attention_kv", rgd_truncation=0, iterations=SIGN_STEPS,
                         batch_size=SIGN_BATCH, lr=1e-4, seed=1)
    retain, forget = _sign_anchors(pipe, "a photo of a dog"), _sign_anchors(pipe, "a photo of Snoopy")
    trainer = TRAINERS["rgd"](pipe, retain, ConceptSpec("instance", "dog", "Snoopy"), cfg, tmp_path, device="cpu",
                              target_prompts={"a photo of a dog": "a photo of Snoopy"}, forget=forget)
    start = trainer.generator.get_state()
    _, t_r, x_r, v_r, _, c_r, c_f, index, g = _held_batch(trainer, start)
    _, t_f, x_f, v_f, _ = _replay_noised(trainer, forget, index, g)

    def objective():
        return torch.stack([-F.mse_loss(_u(trainer.unet, x_f, t_f, c_f), v_f),
                            F.mse_loss(_u(trainer.unet, x_r, t_r, c_r), v_r)])
    return trainer, start, objective


def _spm_case(pipe, original, tmp_path, monkeypatch):
    """SPM (the code's bare word c): ‖u_SPM(x_t, c) − [u₀(x_t, ∅) − g (u₀(x_t, c) − u₀(x_t, ∅))]‖² (its anchoring
    term is 0 at the start, where the adapters' up factors are 0)."""
    cfg = TrainingConfig(method="spm", spm_prompts="concept", spm_anchors=1, iterations=SIGN_STEPS,
                         batch_size=SIGN_BATCH, lr=1e-3, seed=1)
    trainer = TRAINERS["spm"](pipe, _sign_anchors(pipe, "a photo of a dog"), ConceptSpec("instance", "dog", "Snoopy"),
                              cfg, tmp_path, device="cpu")
    x_t, t = _fixed_sample()
    monkeypatch.setattr(trainer, "_noised_by_sampling", lambda c, empty: (x_t, t))
    c = trainer.concept.expand(SIGN_BATCH, -1, -1)
    empty = trainer.empty_embedding.expand_as(c)
    unconditional = _u(original, x_t, t, empty)
    target = unconditional - cfg.spm_guidance * (_u(original, x_t, t, c) - unconditional)
    return trainer, trainer.generator.get_state(), lambda: F.mse_loss(_u(trainer.unet, x_t, t, c), target)


SIGN_CASES = {"doco": _doco_case, "esd": _esd_case, "conabl": _conabl_case, "rgd": _rgd_case, "spm": _spm_case}


@pytest.mark.parametrize("method", list(SIGN_CASES))
def test_each_methods_update_lowers_its_own_objective_on_a_held_sd21_batch(method, sd21_folder, tmp_path,
                                                                         monkeypatch, one_torch_thread):
    pipe, original = _sign_pipeline(sd21_folder)
    with torch.no_grad():
        trainer, start, objective = SIGN_CASES[method](pipe, original, tmp_path, monkeypatch)
        before = objective()
    for _ in range(SIGN_STEPS):
        trainer.generator.set_state(start.clone())
        trainer.train_step()
    with torch.no_grad():
        after = objective()
    assert (after < before).all(), f"{method}: its objective on the held batch went from {before} to {after}"


def test_the_uce_edit_lowers_its_ridge_objective_on_sd21(sd21_folder, tmp_path):
    """UCE is closed form: its edit W' of every K/V matrix must lower λ‖W − W₀‖² + s_e ‖W c_e − W₀ c_a‖² +
    s_p ‖(W − W₀) c_p‖² below its value at W₀ (s_e ‖W₀ (c_e − c_a)‖²), and bring the target's rows onto the
    anchor's values: an edit of the wrong sign moves them away."""
    from doco_lib.methods import uce

    pipe, _ = _sign_pipeline(sd21_folder)
    cfg = TrainingConfig(method="uce", uce_preserve=("a photo of a cat",), seed=1)
    trainer = TRAINERS["uce"](pipe, _sign_anchors(pipe, "a photo of a dog"), ConceptSpec("instance", "dog", "Snoopy"),
                              cfg, tmp_path, device="cpu")
    c_e, c_a, c_p = trainer.rows["states"]  # the rows every K/V reads
    w0 = {name: m.weight.detach().double().clone() for name, m in uce.kv_modules(trainer.unet).items()}
    trainer.run(progress=False)
    for name, module in uce.kv_modules(trainer.unet).items():
        w, start = module.weight.detach().double(), w0[name]
        values = c_a @ start.T

        def ridge(weights):
            return (cfg.uce_lambda * (weights - start).square().sum()
                    + cfg.uce_erase_scale * (c_e @ weights.T - values).square().sum()
                    + trainer.preserve_scale * (c_p @ (weights - start).T).square().sum()).item()

        assert ridge(w) < ridge(start), name
        assert (c_e @ w.T - values).norm() < 0.5 * (c_e @ start.T - values).norm(), name


def test_spm_on_sdxl_anchors_hidden_states_and_pooled_embedding_apart(hub_cache, outputs, repo_root, monkeypatch,
                                                                     one_torch_thread):
    """As the code's train_spm_xl.py: each anchor's hidden states and pooled embedding are drawn against the
    concept's own (norms within the 0.8–1.2 scale), its time ids are the concept's; transport reads the
    cross-attended states."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    params = config.load_params(repo_root / "params" / "concepts" / "sdxl_snoopy.yaml",
                                {**COUNTS, "method": "spm", "spm_anchors": 4, "spm_anchor_batch": "intended",
                                 "run_name": "sdxl_spm_anchors", "output_root": str(outputs)})
    pipe = runs.starting_pipeline(params)
    runs.prepare_anchors(params, pipe)
    trainer = runs.make_trainer(params, pipe)
    concept = unet_inputs(pipe.unet, trainer.concept[:1].cpu())
    anchors = unet_inputs(pipe.unet, trainer._anchors())
    assert anchors["encoder_hidden_states"].shape == (4, 77, 96)
    for drawn, own in ((anchors["encoder_hidden_states"], concept["encoder_hidden_states"]),
                       (anchors["added_cond_kwargs"]["text_embeds"], concept["added_cond_kwargs"]["text_embeds"])):
        ratios = drawn.flatten(1).norm(dim=1) / own.flatten().norm()
        assert ((0.8 <= ratios) & (ratios <= 1.2)).all(), ratios
        assert (F.cosine_similarity(drawn.flatten(1), own.flatten(1)) < 0.5).all()  # random, not the concept
    assert torch.equal(anchors["added_cond_kwargs"]["time_ids"], concept["added_cond_kwargs"]["time_ids"].expand(4, -1))
    assert spm.transport_strength(pipe, "a photo of Snoopy", ["Snoopy"]) == 1.0
    assert spm.transport_strength(pipe, "a photo of a teapot", ["Snoopy"]) < 1.0


@pytest.mark.slow
def test_sepme_trains_an_increment_on_the_sdxl_shaped_pipeline(sdxl_folder, one_torch_thread):
    pipe = load_pipeline(str(sdxl_folder), "cpu", dtype=torch.float32)
    trainer = SepMETrainer(pipe, _anchors(pipe, ["a photo of Snoopy"], 2), [], SepMEConfig(max_steps=1),
                           device="cpu")  # decoupled against "" alone: its 77 rows in the 96-d tiny states
    record = trainer.train_step()
    assert math.isfinite(record["correlation"]) and trainer.step == 1
    assert all(d.shape[1] == 32 + 64 for d in trainer.increment.deltas().values())  # both encoders' states
    assert trainer.null_space_dim == 96 - 77


@pytest.mark.slow
def test_notebooks_01_to_03_run_on_sdxl(hub_cache, tmp_path, doco, monkeypatch):
    """The notebooks' path (papermill, `doco batch`) on the SDXL-shaped pipeline, whose conditioning differs most
    from SD v1's (SD 2.x's v-prediction goes through the same harness calls as `doco train` above)."""
    run = run_training_notebooks(doco, "sdxl_snoopy.yaml", hub_cache, tmp_path, COUNTS, monkeypatch)
    unet = run / "doco" / "unet"
    assert type(load_pipeline(sd_shaped.SDXL_ID, "cpu", unet=str(unet))).__name__ == "StableDiffusionXLPipeline"
    assert (run / "03_adversarial_training" / "original_vs_erased.png").is_file()
