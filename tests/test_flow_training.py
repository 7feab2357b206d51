"""The flow-matching transformers (SD 3.5 medium, FLUX.1) in the training harness.

The flow conversions of `doco_lib.methods.prediction` are checked against diffusers' FlowMatchEulerDiscreteScheduler
(an ε-only or DDPM reading of the output fails here); `denoiser_output` against the pipelines' own denoising step;
the MMDiT parameters each `trainable` mode selects on the full configs (meta device). On the SD-3.5- and
FLUX.1-dev-shaped tiny pipelines, installed under their hub ids, DoCo, ESD, ConAbl and RGD train through `doco train`
and change only their registered parameters (FLUX.1 in bfloat16 weights with float32 trained parameters, as its
file ships it, whose memory on the full config is computed here); on SD 3.5 each update moves its own objective the
right way on a held batch (ESD's and ConAbl's fall, RGD's forget loss rises and its retain loss falls; an update of
the wrong sign fails); UCE edits the two maps that take the text into SD 3.5's and FLUX.1's transformers, as UCE's
Flux script does; SPM adapts both transformers' block Linears; SepME trains its increment on the context embedder of SD 3.5, FLUX.1-dev and -schnell (T5 widened to leave
a null space; the tiny pipelines' are refused), leaving the outputs for "" and the decoupled concept as they were.
Notebooks 01-04 run through `doco batch` on SD 3.5 and FLUX.1-dev."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tiny_training import TRAINING_NOTEBOOKS, run_training_notebooks

from doco_lib import config
from doco_lib.anchors import AnchorLatents
from doco_lib.concepts import ConceptSpec
from doco_lib.methods.baselines import TRAINERS
from doco_lib.methods.harness import TrainingConfig, select_trainable
from doco_lib.methods.prediction import Parameterization
from doco_lib.models import denoiser_output, encode_prompts, load_pipeline, text_encoders
from doco_lib.studies import runs
from doco_lib.toy import flow_shaped, shaped


# ---------------------------------------------------------------------------------------------- conversions
def _flow_scheduler(steps: int | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**flow_shaped.SD35_SCHEDULER)  # shift 3.0
    if steps is not None:
        scheduler.set_timesteps(steps)
    return scheduler


def test_flow_conversions_match_the_flow_match_euler_scheduler():
    """x_t = diffusers' scale_noise; ε and x0 of a v output are inverses of the target; an Euler step of the
    scheduler on v lands where (1−σ') x0 + σ' ε of the same output does; training draws the shifted grid."""
    scheduler = _flow_scheduler()
    flow = Parameterization.of_scheduler(scheduler.config)
    assert flow.prediction_type == "flow_matching" and flow.alphas_cumprod is None
    assert torch.equal(flow.timesteps, scheduler.timesteps)  # σ·1000 on the training grid, shifted
    assert flow.timesteps[500] / 1000 == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=1e-3)
    g = torch.Generator().manual_seed(0)
    z0, noise, v = (torch.randn(3, 16, 8, 8, generator=g) for _ in range(3))
    t = scheduler.timesteps[torch.tensor([3, 400, 990])]
    x_t = scheduler.scale_noise(z0, t, noise)

    assert torch.allclose(flow.add_noise(z0, noise, t), x_t, atol=1e-6)
    target = flow.target(z0, noise, t)
    assert torch.equal(target, noise - z0)
    assert torch.allclose(flow.eps(target, x_t, t), noise, atol=1e-5)
    assert torch.allclose(flow.x0(target, x_t, t), z0, atol=1e-5)
    assert not torch.allclose(flow.eps(v, x_t, t), v, atol=1e-2)  # an ε model's identity would pass v through

    for step in (0, 3, 7):
        sampler = _flow_scheduler(10)
        timestep, sigma_next = sampler.timesteps[step], sampler.sigmas[step + 1]
        moved = sampler.step(v[:1], timestep, x_t[:1]).prev_sample
        at = timestep.view(1)
        expected = (1 - sigma_next) * flow.x0(v[:1], x_t[:1], at) + sigma_next * flow.eps(v[:1], x_t[:1], at)
        assert torch.allclose(moved, expected, atol=1e-4), step

    drawn = flow.draw_timesteps(64, torch.Generator().manual_seed(1))
    assert drawn.dtype == torch.float32 and set(drawn.tolist()) <= set(scheduler.timesteps.tolist())
    assert (drawn / 1000).median() > 0.5  # shift 3 spends most training steps at high noise


def test_full_mmdits_train_the_registered_text_stream_projections():
    """On the full configs (meta device): DoCo's default (cross_attention_kv) is the text stream's K/V of every
    joint or double-stream block, ESD-x's (cross_attention) adds its queries; FLUX.1's single-stream blocks and
    SD 3.5's second, image-only attention (attn2) stay frozen."""
    sd35 = flow_shaped.make_sd35_transformer("full", device="meta")
    flux = flow_shaped.make_flux_transformer("full", "dev", device="meta")

    def count(params):
        return sum(p.numel() for p in params.values())

    for model, blocks, width, counts in (
            (sd35, 24, 1536, {"cross_attention_kv": 113_319_936, "cross_attention": 169_979_904,
                              "non_cross_attention": 2_064_829_568, "full": 2_243_171_520}),
            (flux, 19, 3072, {"cross_attention_kv": 358_729_728, "cross_attention": 538_094_592,
                              "non_cross_attention": 11_330_854_912, "full": 11_901_408_320})):
        selected = {mode: select_trainable(model, mode) for mode in counts}
        assert {mode: count(params) for mode, params in selected.items()} == counts
        kv = selected["cross_attention_kv"]
        assert count(kv) == blocks * 2 * (width * width + width)  # weights and biases
        assert all(".attn.add_k_proj." in n or ".attn.add_v_proj." in n for n in kv)
        assert not any("single_transformer_blocks" in n or "attn2" in n for n in selected["cross_attention"])
        assert not set(selected["cross_attention"]) & set(selected["non_cross_attention"])


def test_uce_edits_the_two_text_input_maps_of_the_full_mmdits():
    """UCE's maps on the full configs (meta device): the context embedder (T5's 4096 → width) and the pooled
    projection's first layer (SD 3.5: 2048 pooled CLIP-L/G, FLUX.1: 768 CLIP-L → width), weights only."""
    from doco_lib.methods import uce

    for model, width, pooled in ((flow_shaped.make_sd35_transformer("full", device="meta"), 1536, 2048),
                                 (flow_shaped.make_flux_transformer("full", "dev", device="meta"), 3072, 768)):
        shapes = {name: tuple(m.weight.shape) for name, m in uce.edited_modules(model).items()}
        assert shapes == {"context_embedder": (width, 4096), "time_text_embed.text_embedder.linear_1": (width, pooled)}


# ---------------------------------------------------------------------------------------------- FLUX.1's memory
def test_flux_dev_training_weights_fit_an_80_gb_card_in_bfloat16(repo_root):
    """FLUX.1-dev's concept file holds the transformer in bfloat16 (`weight_dtype`), the trained K/V, gradients and
    Adam's moments in float32: 26.8 GiB before activations on the full config (meta device), against 48.3 GiB with
    float32 weights; the shared original adds 0.67 GiB, a separate bfloat16 copy 22.2 GiB. The numbers its comment
    states."""
    from doco_lib import costs

    flux = flow_shaped.make_flux_transformer("full", "dev", device="meta")
    trained = set(select_trainable(flux, "cross_attention_kv"))

    def gib(parts):
        return round(sum(parts.values()) / 2**30, 1)

    shipped = config.load_params(repo_root / "params" / "concepts" / "flux_snoopy.yaml")
    assert (shipped["weight_dtype"], shipped["mixed_precision"]) == ("bfloat16", "bf16")
    assert gib(costs.weight_memory(flux, trained, torch.bfloat16)) == 26.8
    assert gib(costs.weight_memory(flux, trained, torch.float32)) == 48.3
    assert round(costs.weight_memory(flux, trained, torch.bfloat16, "shared")["original"] / 2**30, 2) == 0.67
    assert round(costs.weight_memory(flux, trained, torch.bfloat16, torch.bfloat16)["original"] / 2**30, 1) == 22.2
    comment = (repo_root / "params" / "concepts" / "flux_snoopy.yaml").read_text()
    assert all(f"{number} GiB" in comment for number in ("26.8", "48.3", "0.67", "22.2"))


@pytest.mark.parametrize("method", ["doco", "conabl"])
def test_bfloat16_weights_keep_the_trained_flux_parameters_and_adam_in_float32(method, repo_root, tmp_path,
                                                                               monkeypatch, one_torch_thread):
    """With FLUX.1's `weight_dtype: bfloat16` and `mixed_precision: bf16` (its concept file's), the transformer and a
    frozen copy hold bfloat16, the trained text-stream K/V and Adam's moments float32. Three iterations at the
    paper's lr 4e-6 change nearly every trained entry, a change bfloat16 could not hold: rounded to bfloat16, most
    entries are their starting values again."""
    monkeypatch.chdir(repo_root)
    params = config.load_params(repo_root / "params" / "concepts" / "flux_snoopy.yaml",
                                {"method": method, "iterations": 3, "warmup_iterations": 1, "batch_size": 2,
                                 "disc_layers": 3, "frozen_dtype": "bfloat16", "device": "cpu"})
    cfg = TrainingConfig.from_params(params)
    pipe = flow_shaped.make_flux_pipeline("tiny", "dev", dtype=torch.bfloat16)
    anchors = AnchorLatents(torch.zeros(4, 16, 16, 16), torch.ones(4, 16, 16, 16), ["a photo of a dog"] * 4,
                            list(range(4)), 1.0, 0.0)
    trainer = (runs.DocoTrainer if method == "doco" else TRAINERS[method])(
        pipe, anchors, ConceptSpec("instance", "dog", "Snoopy"), cfg, tmp_path, device="cpu")
    assert {p.dtype for p in trainer.params.values()} == {torch.float32}
    assert {p.dtype for n, p in trainer.unet.named_parameters() if n not in trainer.params} == {torch.bfloat16}
    if method == "conabl":
        assert {p.dtype for p in trainer.frozen_unet.parameters()} == {torch.bfloat16}
    for step in range(3):
        trainer.step = step
        assert np.isfinite(trainer.train_step()["g_loss" if step else "step"])
    assert {s["exp_avg"].dtype for s in trainer.opt_g.state.values()} == {torch.float32}
    if method == "doco":  # notebook 02's diagnostic runs the weights outside a training step, under autocast too
        assert all(0 <= row["accuracy"] <= 1 for row in trainer.discriminator_accuracy(n_buckets=2))
    total = sum(p.numel() for p in trainer.params.values())
    changed = sum(int((p.detach() != trainer.original[n]).sum()) for n, p in trainer.params.items())
    visible = sum(int((p.detach().bfloat16() != trainer.original[n].bfloat16()).sum())
                  for n, p in trainer.params.items())
    assert changed > 0.9 * total and visible < 0.2 * total, (changed, visible, total)


def test_half_precision_weights_without_mixed_precision_are_refused(repo_root, tmp_path):
    """bfloat16 weights need autocast: refused with both keys named, in the params and (mixed_precision auto, which
    is none on the CPU) by the trainer, before the pipeline is touched."""
    with pytest.raises(config.ParamsError, match="weight_dtype: bfloat16 with mixed_precision: no"):
        config.load_params(repo_root / "params" / "concepts" / "flux_snoopy.yaml", {"mixed_precision": "no"})
    cfg = TrainingConfig(weight_dtype="bfloat16", mixed_precision="auto")
    with pytest.raises(config.ParamsError, match="weight_dtype: bfloat16 needs mixed precision"):
        runs.DocoTrainer(None, None, None, cfg, tmp_path, device="cpu")


# ---------------------------------------------------------------------------------------------- the SD3.5 pipeline
@pytest.fixture(scope="module")
def flow_hub(tmp_path_factory):
    hub = tmp_path_factory.mktemp("hub")
    shaped.install_shaped("sd35", hub)
    return hub


@pytest.fixture(scope="module")
def flux_hub(flow_hub):
    """FLUX.1-dev and -schnell beside SD 3.5, installed only by the tests that use them."""
    shaped.install_shaped("flux-dev", flow_hub)
    shaped.install_shaped("flux-schnell", flow_hub)
    return flow_hub


@pytest.fixture
def offline(flow_hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(flow_hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.slow
def test_denoiser_output_is_the_sd35_pipelines_own_step(offline, one_torch_thread):
    """One Euler step of the pipeline itself (σ from 1 to 0, no guidance) equals x_T − v of `denoiser_output` with the
    `encode_prompts` conditioning: the conditioning, the pooled embedding and the timestep reach the transformer as
    the pipeline passes them."""
    pipe = load_pipeline(flow_shaped.SD35_ID, "cpu", dtype=torch.float32)
    prompt = "a photo of Snoopy on a beach"
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stepped = pipe(prompt, num_inference_steps=1, guidance_scale=1.0, height=128, width=128, latents=latents,
                       output_type="latent").images
        v = denoiser_output(pipe.transformer, latents, torch.tensor([1000.0]), encode_prompts(pipe, [prompt]))
    assert torch.allclose(stepped, latents - v, atol=1e-5)


@pytest.mark.slow
def test_denoiser_output_is_the_flux_dev_pipelines_own_step(flux_hub, offline, one_torch_thread):
    """The same on FLUX.1-dev: latents packed into 2×2 patches and unpacked again, t/1000, the distilled guidance
    3.5 (the pipeline's default), the text ids."""
    from diffusers import FluxPipeline

    pipe = load_pipeline(flow_shaped.FLUX_DEV_ID, "cpu", dtype=torch.float32)
    prompt = "a photo of Snoopy on a beach"
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = pipe(prompt, num_inference_steps=1, guidance_scale=3.5, height=128, width=128,
                      latents=FluxPipeline._pack_latents(latents, 1, 16, 16, 16), output_type="latent").images
        v = denoiser_output(pipe.transformer, latents, torch.tensor([1000.0]), encode_prompts(pipe, [prompt]))
    assert torch.allclose(FluxPipeline._unpack_latents(packed, 128, 128, 8), latents - v, atol=1e-5)


# Counts only, as tests/test_model_families.py's runs of the UNet families.
COUNTS = {"n_anchor_images": 2, "anchor_shard_size": 2, "num_inference_steps": 1, "iterations": 2,
          "warmup_iterations": 1, "batch_size": 1, "checkpoint_every": 2, "esd_steps": 2, "device": "cpu"}


def _doco_train(repo_root, outputs, monkeypatch, params_file="sd35_snoopy.yaml", **overrides):
    from doco_lib.app import cli

    monkeypatch.chdir(repo_root)
    values = {**COUNTS, "output_root": str(outputs), **overrides}
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    code = cli.main(["train", "--params", f"params/concepts/{params_file}", "--quiet", *sets])
    return code, config.load_params(repo_root / "params" / "concepts" / params_file, values)


BASELINES = [("esd", "cross_attention", {}), ("conabl", "cross_attention_kv", {}),
             ("rgd", "cross_attention", {"rgd_slots_file": "params/prompts/rgd_nudity_slots.yaml"})]


@pytest.mark.slow
@pytest.mark.parametrize("params_file, pipeline_class", [("sd35_snoopy.yaml", "StableDiffusion3Pipeline"),
                                                         ("flux_snoopy.yaml", "FluxPipeline")])
@pytest.mark.parametrize("method, trainable, extra", BASELINES)
def test_baselines_train_the_mmdits_through_doco_train(method, trainable, extra, params_file, pipeline_class, flux_hub,
                                                       offline, repo_root, tmp_path_factory, monkeypatch,
                                                       one_torch_thread):
    """ESD, ConAbl and RGD through `doco train` on SD 3.5 and FLUX.1-dev (FLUX.1 as its file ships it: bfloat16
    weights, float32 trained parameters) change registered text-stream projections of the joint or double-stream
    blocks and nothing else."""
    outputs = tmp_path_factory.getbasetemp() / f"flow_outputs_{params_file}"  # one anchor cache a family
    family = params_file.split("_")[0]
    code, params = _doco_train(repo_root, outputs, monkeypatch, params_file, method=method, trainable=trainable,
                               run_name=f"{family}_{method}", **extra)
    assert code == 0
    erased = load_pipeline(params["model"], "cpu", unet=str(runs.training_dir(params) / "unet"))
    base = load_pipeline(params["model"], "cpu")
    assert type(erased).__name__ == pipeline_class
    original = base.transformer.state_dict()
    changed = {n for n, w in erased.transformer.state_dict().items() if not torch.equal(w, original[n])}
    registered = set(select_trainable(base.transformer, trainable))
    assert changed and changed <= registered, changed - registered
    assert all(n.startswith("transformer_blocks.") and ".attn.add_" in n for n in changed)


@pytest.mark.slow
@pytest.mark.parametrize("params_file", ["sd35_snoopy.yaml", "flux_snoopy.yaml", "flux_schnell_snoopy.yaml"])
def test_doco_trains_an_mmdit_and_exports_a_lora_that_diffusers_loads_onto_it(params_file, flux_hub, offline,
                                                                              repo_root, tmp_path, monkeypatch,
                                                                              one_torch_thread):
    """DoCo through `doco train` on SD 3.5, FLUX.1-dev and -schnell (FLUX.1: anchors drawn from packed noise, trained on
    unpacked 16-channel latents) changes the text stream's K/V of the joint or double-stream blocks and nothing
    else; `export_lora` writes PEFT keys under `transformer.` with their config in the metadata, no kohya file (its
    names are UNet modules'); `load_lora_weights` then `fuse_lora` on the base pipeline gives the erased
    transformer's weights (energy 1: every layer at its full rank); the card loads the transformer by AutoModel."""
    from safetensors import safe_open

    from doco_lib import export

    code, params = _doco_train(repo_root, tmp_path, monkeypatch, params_file, run_name="lora", export_lora=True,
                               lora_energy=1.0)
    assert code == 0
    model, run = params["model"], runs.training_dir(params)
    assert sorted(p.name for p in (run / "lora").iterdir()) == sorted([export.DIFFUSERS_FILE, export.REPORT_FILE,
                                                                       export.CARD_FILE])
    with safe_open(str(run / "lora" / export.DIFFUSERS_FILE), "pt") as lora:
        assert lora.keys() and all(k.startswith("transformer.") for k in lora.keys())
        assert '"transformer.rank_pattern"' in lora.metadata()[export.PEFT_METADATA_KEY]
    erased = load_pipeline(model, "cpu", unet=str(run / "unet")).transformer.state_dict()
    pipe = load_pipeline(model, "cpu")
    original = {n: w.clone() for n, w in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(run / "lora"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    changed = [n for n in erased if not torch.equal(erased[n], original[n])]
    assert changed and set(changed) <= set(select_trainable(pipe.transformer, "cross_attention_kv"))
    assert all(n.startswith("transformer_blocks.") for n in changed)  # joint or double-stream blocks only
    assert all(torch.allclose(fused[n], erased[n], atol=1e-5) for n in changed)
    card = (run / "README.md").read_text()
    assert "transformer = AutoModel.from_pretrained('<this folder>/unet')" in card and "transformer=transformer" in card
    with pytest.raises(config.ParamsError, match="kohya names UNet modules"):
        export.export_from_folders(run / "unet", model, tmp_path / "kohya", 1.0, "kohya")


@pytest.mark.slow
@pytest.mark.parametrize("params_file, single_stream", [("sd35_snoopy.yaml", False), ("flux_snoopy.yaml", True)])
def test_spm_adapts_the_block_linears_of_the_mmdits_through_doco_train(params_file, single_stream, flux_hub, offline,
                                                                       repo_root, tmp_path, monkeypatch,
                                                                       one_torch_thread):
    """SPM on SD 3.5 and FLUX.1-dev: rank-1 adapters on every block's attention and feed-forward Linears, both
    streams and FLUX.1's single-stream blocks (not the AdaLN modulations); the exported transformer differs from the
    base in those weights only, and the adapter file, under kohya's `lora_transformer_` names, loads back onto the
    base transformer."""
    from doco_lib.methods import spm

    code, params = _doco_train(repo_root, tmp_path, monkeypatch, params_file, method="spm", run_name="spm",
                               spm_denoising_steps=3)
    assert code == 0
    run = runs.training_dir(params)
    base = load_pipeline(params["model"], "cpu").transformer
    erased = load_pipeline(params["model"], "cpu", unet=str(run / "unet")).transformer
    adapted = spm.adapted_modules(base)
    assert any(p.startswith("transformer_blocks.") for p in adapted)
    assert any(p.startswith("single_transformer_blocks.") for p in adapted) == single_stream
    assert not any(".norm" in p for p in adapted)
    original = base.state_dict()
    changed = {n for n, w in erased.state_dict().items() if not torch.equal(w, original[n])}
    assert changed and changed <= {f"{path}.weight" for path in adapted}
    network = spm.SpmNetwork.from_file(run / spm.ADAPTER_FILE, base)
    assert all(key.startswith("lora_transformer_") for key in network.layers())


# ---------------------------------------------------------------------------------------------- ESD's sign
SIGN_STEPS = 3
SIGN_BATCH = 2


@pytest.mark.slow
def test_esd_update_lowers_its_objective_on_a_held_sd35_batch(offline, tmp_path, monkeypatch, one_torch_thread):
    """ESD-x on the flow: ‖v_θ(x_t, c*) − [v₀(x_t, ∅) − η (v₀(x_t, c*) − v₀(x_t, ∅))]‖² on fixed latents at a fixed
    timestep falls over repeated steps (ESD's sampled x_t replaced by them); an update of the wrong sign raises it."""
    pipe = load_pipeline(flow_shaped.SD35_ID, "cpu", dtype=torch.float32)
    original = copy.deepcopy(pipe.transformer).requires_grad_(False).eval()
    anchors = AnchorLatents(torch.zeros(4, 16, 16, 16), torch.ones(4, 16, 16, 16), ["a photo of a dog"] * 4,
                            list(range(4)), 1.5305, 0.0609)
    cfg = TrainingConfig(method="esd", trainable="cross_attention", iterations=SIGN_STEPS, batch_size=SIGN_BATCH,
                         esd_eta=1.0, lr=1e-3, seed=1)
    trainer = TRAINERS["esd"](pipe, anchors, ConceptSpec("instance", "dog", "Snoopy"), cfg, tmp_path, device="cpu")
    x_t = torch.randn(SIGN_BATCH, 16, 16, 16, generator=torch.Generator().manual_seed(7))
    t = torch.full((SIGN_BATCH,), float(trainer.parameterization.timesteps[300]))
    monkeypatch.setattr(trainer, "_partial_denoise", lambda c_star: (x_t, t))
    c_star = trainer.target_embeddings[:1].expand(SIGN_BATCH, -1, -1)
    empty = trainer.empty_embedding.expand_as(c_star)
    with torch.no_grad():
        unconditional = denoiser_output(original, x_t, t, empty)
        target = unconditional - cfg.esd_eta * (denoiser_output(original, x_t, t, c_star) - unconditional)

        def objective():
            return F.mse_loss(denoiser_output(trainer.unet, x_t, t, c_star), target)
        before = objective()
    start = trainer.generator.get_state()
    for _ in range(SIGN_STEPS):
        trainer.generator.set_state(start.clone())
        trainer.train_step()
    with torch.no_grad():
        after = objective()
    assert after < before, f"ESD's objective on the held batch went from {before} to {after}"


def _held_batch_trainer(method, tmp_path, forget=None, **settings):
    """A trainer of `method` on the SD-3.5-shaped pipeline over four random anchor latents, at lr 1e-3, and a frozen
    copy of its transformer."""
    pipe = load_pipeline(flow_shaped.SD35_ID, "cpu", dtype=torch.float32)
    anchors = AnchorLatents(torch.zeros(4, 16, 16, 16), torch.ones(4, 16, 16, 16), ["a photo of a dog"] * 4,
                            list(range(4)), 1.5305, 0.0609)
    cfg = TrainingConfig(method=method, trainable="cross_attention", iterations=SIGN_STEPS, batch_size=SIGN_BATCH,
                         lr=1e-3, seed=1, **settings)
    trainer = TRAINERS[method](pipe, anchors, ConceptSpec("instance", "dog", "Snoopy"), cfg, tmp_path, device="cpu",
                               **({"forget": forget} if forget else {}))
    return trainer, copy.deepcopy(pipe.transformer).requires_grad_(False).eval()


def _steps_on_the_held_batch(trainer):
    """SIGN_STEPS training steps, each on the batch the run's first step draws (the generator reset before each)."""
    start = trainer.generator.get_state()
    for _ in range(SIGN_STEPS):
        trainer.generator.set_state(start.clone())
        trainer.train_step()
    trainer.generator.set_state(start)


@pytest.mark.slow
def test_conabl_update_lowers_its_objective_on_a_held_sd35_batch(offline, tmp_path, one_torch_thread):
    """ConAbl (model variant) on the flow: ‖v_θ(x_t, c*) − v₀(x_t, c)‖² on the first step's batch falls over
    repeated steps on it; an update of the wrong sign raises it."""
    trainer, original = _held_batch_trainer("conabl", tmp_path, conabl_retain=False)

    def objective():
        start = trainer.generator.get_state()
        x_t, t, _, c, c_star = trainer._batch(trainer._sample_index(), trainer.generator)
        trainer.generator.set_state(start)
        with torch.no_grad():
            return F.mse_loss(denoiser_output(trainer.unet, x_t, t, c_star), denoiser_output(original, x_t, t, c))

    before = objective()
    _steps_on_the_held_batch(trainer)
    after = objective()
    assert after < before, f"ConAbl's objective on the held batch went from {before} to {after}"


@pytest.mark.slow
def test_rgd_update_ascends_the_forget_loss_and_descends_the_retain_loss_on_sd35(offline, tmp_path,
                                                                                  one_torch_thread):
    """RGD on the flow: the diffusion loss (target ε − z0) on the first step's forget batch rises over repeated steps
    on it, and on its retain batch falls; a flipped ascent fails."""
    forget = AnchorLatents(torch.full((4, 16, 16, 16), 0.5), torch.ones(4, 16, 16, 16), ["Snoopy"] * 4,
                           list(range(4)), 1.5305, 0.0609)
    trainer, _ = _held_batch_trainer("rgd", tmp_path, forget=forget, rgd_truncation=0.0)  # every step ascends

    def losses():
        start = trainer.generator.get_state()
        index = trainer._sample_index()
        x_r, t_r, target_r, c_r, c_f = trainer._batch(index, trainer.generator)
        x_f, t_f, target_f = trainer._noised(forget.sample(index, trainer.generator), trainer.generator)
        trainer.generator.set_state(start)
        with torch.no_grad():
            return (F.mse_loss(denoiser_output(trainer.unet, x_f, t_f, c_f), target_f).item(),
                    F.mse_loss(denoiser_output(trainer.unet, x_r, t_r, c_r), target_r).item())

    forget_before, retain_before = losses()
    _steps_on_the_held_batch(trainer)
    forget_after, retain_after = losses()
    assert forget_after > forget_before, f"the forget loss went from {forget_before} to {forget_after}"
    assert retain_after < retain_before, f"the retain loss went from {retain_before} to {retain_after}"


@pytest.mark.slow
@pytest.mark.parametrize("params_file", ["sd35_snoopy.yaml", "flux_snoopy.yaml"])
def test_uce_edits_the_text_input_maps_of_an_mmdit_through_doco_train(params_file, flux_hub, offline, repo_root,
                                                                      tmp_path, monkeypatch, one_torch_thread):
    """UCE on SD 3.5 and FLUX.1, as UCE's Flux script: only `context_embedder` and the pooled projection's first layer
    change (no block reads the text alone), and each maps the target's rows onto what the original made of the
    anchor's: ‖W'c_e − W₀c_a‖ well below ‖W₀c_e − W₀c_a‖, for the token rows and the pooled embedding alike."""
    from doco_lib.methods import uce

    code, params = _doco_train(repo_root, tmp_path, monkeypatch, params_file, method="uce", run_name="uce",
                               uce_preserve=["a cat"])
    assert code == 0
    base = load_pipeline(params["model"], "cpu")
    erased = load_pipeline(params["model"], "cpu", unet=str(runs.training_dir(params) / "unet")).transformer
    original = base.transformer.state_dict()
    changed = {n for n, w in erased.state_dict().items() if not torch.equal(w, original[n])}
    assert changed == {f"{name}.weight" for name in uce.MMDIT_MODULES}
    target, anchor = uce.mmdit_rows(base, [params["target"]]), uce.mmdit_rows(base, [params["anchor"]])
    modules = dict(erased.named_modules())
    for name, reads in uce.MMDIT_MODULES.items():
        w0, w = original[f"{name}.weight"].double(), modules[name].weight.double()
        c_e, c_a = target[reads][0], anchor[reads][0]
        before, after = (c_e @ w0.T - c_a @ w0.T).norm(), (c_e @ w.T - c_a @ w0.T).norm()
        assert after < 0.5 * before, (name, before, after)


# ---------------------------------------------------------------------------------------------- SepME
SEPME_TARGET, SEPME_OTHER = "a photo of Snoopy", "a photo of a cat"
# T5's width (and the context embedder's input) for SepME's shaped pipelines: above the rows of "" and one other
# prompt, SD 3.5's 2·(77 + 256) = 666 and FLUX.1's 2·512 = 1024 (the tiny pipelines' 128 hold not even "").
WIDE_T5 = 1152


def _flow_latents(prompt: str, n: int = 4) -> AnchorLatents:
    return AnchorLatents(torch.zeros(n, 16, 16, 16), torch.ones(n, 16, 16, 16), [prompt] * n, list(range(n)), 1.5305,
                         0.0609)


def test_sepme_refuses_the_tiny_sd35_whose_rows_fill_its_embedding_width(offline, one_torch_thread):
    """The tiny SD-3.5-shaped pipeline reads 77 CLIP and 256 T5 rows a prompt, 128 wide: "" and another prompt leave
    no null space, and SepME says so before training, with the numbers."""
    from doco_lib.methods.sepme import SepMETrainer

    pipe = load_pipeline(flow_shaped.SD35_ID, "cpu", dtype=torch.float32)
    with pytest.raises(config.ParamsError, match=r"the 666 stacked token rows of '', 'a cat' span all 128 dimensions"):
        SepMETrainer(pipe, _flow_latents("Snoopy"), ["a cat"])


def _wide_shaped_pipeline(family: str, monkeypatch):
    """The tiny `family` pipeline ('sd35', 'flux-dev', 'flux-schnell') with T5 and the context embedder's input
    `WIDE_T5` wide."""
    tiny, t5 = (flow_shaped.SD35_TINY, "text_3") if family == "sd35" else (flow_shaped.FLUX_TINY, "text_2")
    monkeypatch.setitem(tiny, t5, dict(tiny[t5], d_model=WIDE_T5))
    monkeypatch.setitem(tiny, "transformer", dict(tiny["transformer"], joint_attention_dim=WIDE_T5))
    pipe = (flow_shaped.make_sd35_pipeline() if family == "sd35"
            else flow_shaped.make_flux_pipeline(variant=family.removeprefix("flux-")))
    for encoder in text_encoders(pipe):  # no dropout in T5: load_pipeline's encoders are in eval mode too
        encoder.eval()
    return pipe


@pytest.mark.parametrize("family", ["sd35", "flux-dev", "flux-schnell"])
def test_sepme_trains_the_context_embedder_of_sd35_and_flux(family, tmp_path, monkeypatch, one_torch_thread):
    """SepME on SD-3.5- and FLUX.1-shaped transformers (T5 widened to leave room): its increment is on
    `context_embedder.weight` alone; repeated steps on one held batch lower the concept-irrelevant correlation (an
    update of the wrong sign raises it); the trained increment changes the output for the target prompt and leaves
    the outputs for "" and for the concept it was decoupled against as they were (a wrong null space fails here); the
    composed transformer saves and loads with its class's `from_pretrained`, and restoring gives the base back."""
    from doco_lib.methods import sepme

    pipe = _wide_shaped_pipeline(family, monkeypatch)
    transformer = pipe.transformer
    settings = sepme.SepMEConfig(lr=1e-1, scale=1.0, beta=0.0, threshold=float("-inf"), max_steps=SIGN_STEPS,
                                 batch_size=SIGN_BATCH, seed=0)
    trainer = sepme.SepMETrainer(pipe, _flow_latents(SEPME_TARGET), [SEPME_OTHER], settings)
    start = trainer.generator.get_state()
    held = trainer._noised_batch(trainer._next_images(SIGN_BATCH, trainer.generator), trainer.generator)
    trainer._queue = []

    def correlation():
        with torch.no_grad():
            return (trainer.directions(*held, trainer.increment.deltas()) * trainer.directions(*held)).mean().item()

    before = correlation()
    for _ in range(SIGN_STEPS):  # each step on the held batch: the same images, noise and timesteps
        trainer.generator.set_state(start.clone())
        trainer._queue = []
        trainer.train_step()
    after = correlation()
    assert after < before, f"the correlation on the held batch went from {before} to {after}"

    increment = trainer.result("snoopy", family)
    assert list(increment.deltas) == ["context_embedder.weight"]
    x = torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    t = trainer.parameterization.timesteps[torch.tensor([900, 500, 100])]
    conditioning = encode_prompts(pipe, ["", SEPME_TARGET, SEPME_OTHER])
    with torch.no_grad():
        base = denoiser_output(transformer, x, t, conditioning)
        edited = sepme.edited_output(transformer, increment.deltas, x, t, conditioning)
    change = (edited - base).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1)
    assert change[1] > 1e-3, change
    assert change[0] < 1e-5 and change[2] < 1e-5, change

    original = {n: w.clone() for n, w in transformer.state_dict().items()}
    eraser = sepme.SeparableEraser(copy.deepcopy(transformer), [increment], family)
    eraser.erase("snoopy").save_pretrained(tmp_path / "composed", safe_serialization=True)
    composed = type(transformer).from_pretrained(tmp_path / "composed", use_safetensors=True).state_dict()
    changed = {n for n, w in composed.items() if not torch.equal(w, original[n])}
    assert changed == {"context_embedder.weight"}
    eraser.restore("snoopy")
    assert all(torch.equal(w, original[n]) for n, w in eraser.unet.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("family, params_file", [("flux-dev", "flux_snoopy.yaml")])  # SD 3.5: the same path, 97 s
def test_sepme_trains_through_doco_train_on_an_mmdit(family, params_file, repo_root, tmp_path, monkeypatch,
                                                     one_torch_thread):
    """`method: sepme` through `doco train` on the widened FLUX.1-dev-shaped pipeline (saved as a local folder; SD
    3.5's passed too, 97 s, left out for the slow tier's time; the family-specific parts are
    `test_sepme_trains_the_context_embedder_of_sd35_and_flux`'s): the target's increment, composed as
    `<run>/sepme/unet`, loads into the family's pipeline and differs from the base in the context embedder alone."""
    folder = tmp_path / family
    _wide_shaped_pipeline(family, monkeypatch).save_pretrained(folder, safe_serialization=True)
    code, params = _doco_train(repo_root, tmp_path / "outputs", monkeypatch, params_file, method="sepme",
                               model=str(folder), sepme_concepts=["Snoopy", "cat"], sepme_restore="Snoopy", sepme_images=2,
                               sepme_max_steps=2,
                               run_name="sepme")
    assert code == 0
    run = runs.training_dir(params)
    assert (run / "increments" / "snoopy.safetensors").is_file() and (run / "costs" / "training.json").is_file()
    base = load_pipeline(str(folder), "cpu").transformer.state_dict()
    erased = load_pipeline(str(folder), "cpu", unet=str(run / "unet")).transformer.state_dict()
    assert {n for n, w in erased.items() if not torch.equal(w, base[n])} == {"context_embedder.weight"}


@pytest.mark.parametrize("pipeline, transformer, label", [
    ("StableDiffusion3Pipeline", "SD3Transformer2DModel", "SD base"),
    ("FluxPipeline", "FluxTransformer2DModel", "FLUX.1 base")])
def test_notebook_04_names_the_base_model_by_its_family(pipeline, transformer, label, tmp_path):
    """The base model's row of notebook 04's tables is named from the pipeline's model_index.json: FLUX.1's was
    labelled "SD base", beside the paper's SD v1.4 rows."""
    model = tmp_path / "base"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": pipeline,
                                                        "transformer": ["diffusers", transformer]}))
    unet = tmp_path / "run" / "doco" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("{}")
    params = config.validate({"model": str(model), "target": "Snoopy", "eval_concepts": ["Snoopy"],
                              "erased_concepts": ["Snoopy"], "eval_models": [str(unet)]})
    assert [m.label for m in runs.evaluated_models(params)] == [label, "DoCo (run)"]


# Counts only, for the notebooks: a comparison grid of 3 prompts × 1 seed (03); CLIP score, accuracy and FID of
# one template × 2 images (the fewest FID's covariance takes) of the target and one related concept (04).
NOTEBOOK_COUNTS = {**COUNTS, "grid_columns": 2, "related_concepts": "[Mickey]", "eval_concepts": "[Snoopy, Mickey]",
                   "n_templates": 1, "images_per_template": 2}


@pytest.fixture(scope="module")
def clip_hub(flux_hub):
    """SD 3.5, FLUX.1-dev and the tiny CLIP ViT-L/14 that notebook 04 scores with (the params' `clip_model`)."""
    shaped.install_shaped("clip-l", flux_hub)
    return flux_hub


@pytest.mark.slow
@pytest.mark.parametrize("params_file, pipeline_class, base", [
    ("sd35_snoopy.yaml", "StableDiffusion3Pipeline", "SD base"), ("flux_snoopy.yaml", "FluxPipeline", "FLUX.1 base")])
def test_notebooks_01_to_04_run_on_sd35_and_flux_dev(params_file, pipeline_class, base, clip_hub, repo_root, tmp_path,
                                                     doco, monkeypatch):
    """The notebooks' path (papermill, `doco batch`) on the SD-3.5- and FLUX.1-dev-shaped pipelines at their native
    1024 px: anchors, D's warm-up on 16-channel latents, DoCo's training and its comparison grid, then the
    evaluation. The erased transformer loads into the family's pipeline class; notebook 04's table holds a finite
    CLIP score and accuracy of both models for every evaluated concept, and the related-concept ranking is written."""
    run = run_training_notebooks(doco, params_file, clip_hub, tmp_path, NOTEBOOK_COUNTS, monkeypatch,
                                 notebooks=(*TRAINING_NOTEBOOKS, "04_evaluation"))
    params = config.load_params(repo_root / "params" / "concepts" / params_file)
    assert type(load_pipeline(params["model"], "cpu", unet=str(run / "doco" / "unet"))).__name__ == pipeline_class
    assert (run / "03_adversarial_training" / "original_vs_erased.png").is_file()
    results = pd.read_csv(run / "04_evaluation" / "results_long.csv")
    clip = results[results.metric.isin(["CS", "CA"])]
    assert set(clip.model) == {base, f"DoCo ({params['run_name']})"}
    assert len(clip) == 2 * 2 * 2 and set(clip.concept) == {"Snoopy", "Mickey"} and np.isfinite(clip.value).all()
    assert len(pd.read_csv(run / "04_evaluation" / "related_concepts.csv")) == params["related_top_k"]
