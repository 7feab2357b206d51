"""The attacks (doco_lib/studies/attacks) on SD 3-style pipelines: the shipped toy-mmdit (an MMDiT trained by flow
matching, two toy CLIP encoders, no T5) with tiny budgets, and the SD3.5-shaped random pipeline (T5 present) where
no sampling is needed; FLUX.1 is refused."""

from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from test_attack import same_state, state

from doco_lib import config, prompt_tokens
from doco_lib.app.cli import main
from doco_lib.models import denoiser_output, encode_prompts, load_judge, load_pipeline
from doco_lib.sampling import generate
from doco_lib.studies import attacks, robustness
from doco_lib.studies.attacks import common, completion, gcg
from doco_lib.toy import flow_shaped

TINY = {"device": "cpu", "model": "toy-mmdit", "num_inference_steps": 8, "attack_attempts": 1, "attack_tokens": 1,
        "attack_images": 2, "attack_search_steps": 1, "attack_candidates": 2, "attack_unlearndiff_tokens": 2,
        "attack_unlearndiff_steps": 3, "attack_unlearndiff_images": 2, "attack_noise_scales": [2.0],
        "attack_completion_strengths": [0.25, 0.5], "attack_ti_steps": 3, "attack_ti_images": 2,
        "attack_relearn_steps": [0, 2], "attack_relearn_images": 2, "attack_ring_a_bell_population": 4,
        "attack_ring_a_bell_generations": 2, "attack_gcg_tokens": 3, "attack_gcg_steps": 2, "attack_gcg_topk": 4,
        "attack_gcg_candidates": 4}
PROMPTS = ["a photo of a star", "", "a red circle on a dotted background"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def settings(**overrides) -> common.AttackSettings:
    return common.AttackSettings.from_params(config.validate({**TINY, **overrides}))


@pytest.fixture(scope="module")
def mmdit():
    return load_pipeline("toy-mmdit", "cpu"), common.ToyShapeJudge(load_judge("cpu"), "star")


@pytest.fixture(scope="module")
def target(mmdit):
    """The start prompt "a photo of a star" with 4 of toy-mmdit's own stars (8 steps)."""
    pipe, run = mmdit[0], settings()
    latents = common.target_latents(pipe, "a photo of a star", run.seeds(0, common.TARGET_IMAGE_SEEDS, 4), 8, 5.0)
    return common.Target("a photo of a star", "star", common.vocabulary_ids(pipe.tokenizer, "captions", ["star"]),
                         latents)


@pytest.fixture(scope="module")
def sd35():
    """The SD3.5-medium-shaped random pipeline (two CLIP encoders of different widths, T5), in eval mode."""
    pipe = flow_shaped.make_sd35_pipeline("tiny")
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def test_a_prompts_conditioning_is_encode_prompts_and_samples_as_the_pipeline(mmdit, sd35):
    pipe = mmdit[0]
    for prompt in PROMPTS:  # 16 CLIP rows, 16 zero T5 rows, the pooled row: 33 rows of 64
        embedding = common.prompt_embedding(pipe, prompt)
        assert embedding.shape == (1, 33, 64)
        assert torch.allclose(embedding, encode_prompts(pipe, [prompt]), atol=1e-6)
    for prompt in [*PROMPTS, "Snoopy, the dog, in a red car"]:  # T5 present; the second tokenizer pads with "!"
        assert torch.allclose(common.prompt_embedding(sd35, prompt), encode_prompts(sd35, [prompt]), atol=1e-6)
    embedding = common.prompt_embedding(pipe, "a photo of a star").expand(2, -1, -1)
    images = common.generate_embedded(pipe, embedding, [0, 1], 8, 5.0)
    assert images.shape == (2, 3, 32, 32)
    assert torch.allclose(images, generate(pipe, ["a photo of a star"] * 2, [0, 1], 8, 5.0), atol=1e-5)


def test_soft_tokens_reach_both_clip_encoders_and_only_inside_the_call(mmdit):
    pipe = mmdit[0]
    ids = prompt_tokens.padded_ids(pipe.tokenizer, prompt_tokens.word_ids(pipe.tokenizer, "a photo of a star"))[None]
    plain = common.encode(pipe, ids)
    vectors = [torch.zeros(1, 32, requires_grad=True), torch.ones(1, 32, requires_grad=True)]
    spliced = common.conditioning(pipe, ids, [2], vectors)
    clip, pooled = spliced[:, :16], spliced[:, -1:]
    assert torch.equal(clip[:, :2], plain[:, :2]) and not torch.allclose(clip[:, 2:], plain[:, 2:16])
    assert not torch.allclose(spliced[:, 2:16, :32], spliced[:, 2:16, 32:])  # each encoder read its own vector
    assert not torch.allclose(pooled, plain[:, -1:])
    spliced.pow(2).sum().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vectors)
    assert torch.equal(common.encode(pipe, ids), plain)  # the hooks are gone


def test_the_denoising_objective_is_the_flow_matching_loss(mmdit, target):
    """x_σ = (1 − σ) z0 + σ ε at t = σ·1000 of the scheduler's training grid, regressed onto v = ε − z0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = mmdit[0]
    z0, condition = target.latents[:2], common.prompt_embedding(pipe, "a photo of a star")
    objective = common.DenoisingObjective(pipe, z0, torch.Generator().manual_seed(3), repeats=2)
    generator = torch.Generator().manual_seed(3)  # the same draws, in the same order
    strata = torch.arange(4) % 2 + torch.rand(4, generator=generator)
    grid = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config).timesteps
    t = grid[(strata * len(grid) / 2).long()]
    z = z0.repeat_interleave(2, 0)
    noise = torch.randn(z.shape, generator=generator)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    assert 0 < sigma.min() and sigma.max() <= 1
    with torch.no_grad():
        velocity = denoiser_output(pipe.transformer, (1 - sigma) * z + sigma * noise, t, condition.expand(4, -1, -1))
        loss = common.DenoisingObjective.loss(pipe.transformer, objective.fixed, condition)
    assert loss.item() == pytest.approx((velocity - (noise - z)).pow(2).mean().item(), rel=1e-5)


def test_completion_starts_from_the_image_and_ends_at_plain_sampling(mmdit, target):
    pipe = mmdit[0]
    embedding, seeds, z0 = common.prompt_embedding(pipe, "a photo of a star"), [100, 101], target.latents[:2]
    plain = common.generate_embedded(pipe, embedding.expand(2, -1, -1), seeds, 8, 5.0)
    assert torch.allclose(completion.complete(pipe, embedding, z0, seeds, 1.0, 8, 5.0), plain, atol=1e-5)
    image = completion.decode_latents(pipe, z0)
    drawn = generate(pipe, ["a photo of a star"] * 2, [7, 8], 8, 5.0)  # decoded by the pipeline itself
    assert torch.allclose(completion.decode_latents(pipe, common.target_latents(pipe, "a photo of a star", [7, 8], 8,
                                                                                5.0)), drawn, atol=1e-5)
    assert torch.allclose(completion.complete(pipe, embedding, z0, seeds, 0.0, 8, 5.0), image, atol=1e-6)
    distances = [(completion.complete(pipe, embedding, z0, seeds, s, 8, 5.0) - image).abs().mean().item()
                 for s in (0.25, 0.5, 1.0)]
    assert 0 < distances[0] < distances[1] < distances[2]  # the more noise, the less of the image is left


@pytest.mark.parametrize("name", ["none", *attacks.ATTACKS])
def test_every_attack_runs_on_toy_mmdit(mmdit, target, name):
    pipe, judge = mmdit
    run = settings()
    result, _, steps = robustness.measured(name, pipe, judge, target, 0, run)
    assert steps > 0 if name != "none" else steps == 8 * 2 * run.images  # guided: a batch of 2 per image and step
    assert result.attack == name and 0 <= result.judged_target <= 1
    assert result.images.shape == (run.images, 3, 32, 32) and 0 <= result.images.min() <= result.images.max() <= 1
    if name not in ("ring_a_bell", "gcg"):  # theirs are embedding distances, the others' judged rates
        assert all(0 <= score <= 1 for score in result.search_scores)
    if name in ("unlearndiff", "textual_inversion", "relearning", "ring_a_bell", "gcg"):
        assert result.loss_after < result.loss_before  # measured on toy-mmdit at these budgets


def test_relearning_tunes_a_copy_and_leaves_the_pipelines_transformer_alone(mmdit, target):
    pipe, judge = mmdit
    own, before = pipe.transformer, state(pipe.transformer)
    grads = [p.requires_grad for p in own.parameters()]
    plain = common.no_attack(pipe, judge, target, 0, settings())
    relearnt = attacks.run("relearning", pipe, judge, target, 0, settings(attack_relearn_steps=[0, 3]))
    assert pipe.transformer is own and same_state(own, before) and [p.requires_grad for p in own.parameters()] == grads
    assert relearnt.search_scores[0] == plain.judged_target and relearnt.loss_after < relearnt.loss_before
    assert relearnt.prompt == "a photo of a star [relearnt 3 steps]"


def test_sd35_samples_a_conditioning_as_its_pipeline_and_completes_from_the_noise(sd35):
    """T5 present, 16 latent channels, the scheduler's shift 3.0, the VAE's shift factor: one 1024-px image at 2
    steps (10-15 s a call on one thread)."""
    embedding = common.prompt_embedding(sd35, "a photo of Snoopy")
    images = common.generate_embedded(sd35, embedding, [0], 2, 5.0)
    assert torch.allclose(images, generate(sd35, ["a photo of Snoopy"], [0], 2, 5.0), atol=1e-5)
    z0 = torch.randn(1, 16, 128, 128, generator=torch.Generator().manual_seed(1))  # dropped at strength 1
    assert torch.allclose(completion.complete(sd35, embedding, z0, [0], 1.0, 2, 5.0), images, atol=1e-5)


def test_gcg_searches_sd35s_joined_pooled_projections(sd35):
    """Two CLIP encoders of different widths (32 and 64): the one-hot gradient goes through both."""
    tokenizer = sd35.tokenizer
    ids = prompt_tokens.padded_ids(tokenizer, prompt_tokens.word_ids(tokenizer, "a photo of a star"))[None]
    target = common.pooled_embedding(sd35, ids)
    assert target.shape == (1, sd35.transformer.config.pooled_projection_dim)
    assert torch.allclose(target, common.encode(sd35, ids)[:, -1, :96])  # the pooled row the transformer reads
    vocabulary = common.vocabulary_ids(tokenizer, "captions", ["star"])
    found, scores = gcg.coordinate_search(sd35, target, vocabulary, settings(), torch.Generator().manual_seed(0))
    assert len(found) == 3 and len(scores) == 3 and scores[-1] <= scores[0]


def test_unsupported_pipelines_are_refused_before_any_work(sd35):
    run = settings()
    flux = flow_shaped.make_flux_pipeline("tiny")
    with pytest.raises(config.ParamsError, match="cannot attack a FLUX.1 pipeline \\(family 'flux'\\)"):
        attacks.run("tokens", flux, None, None, 0, run)  # no judge, no target: refused before reading them
    for name in ("unlearndiff", "textual_inversion"):
        with pytest.raises(config.ParamsError, match=f"\\['{name}'\\] cannot attack an SD 3 pipeline with a T5"):
            attacks.run(name, sd35, None, None, 0, run)
    sdxl = SimpleNamespace(unet=torch.nn.Linear(1, 1), text_encoder=object(), text_encoder_2=object())  # its shape
    with pytest.raises(config.ParamsError, match="cannot attack an SDXL pipeline \\(family 'unet' with 2 text"):
        attacks.run("tokens", sdxl, None, None, 0, run)


def test_cli_attacks_toy_mmdit_and_an_erased_transformer_folder(mmdit, tmp_path):
    folder = tmp_path / "run" / "esd" / "transformer"
    mmdit[0].transformer.save_pretrained(folder)  # an "erased" transformer that is the original one
    params = tmp_path / "attack.yaml"
    params.write_text(yaml.safe_dump({"run_name": "attack", "output_root": str(tmp_path / "out"), **TINY}))
    assert main(["attack", "--params", str(params), "--unet", str(folder), "--attack", "unlearndiff", "completion",
                 "--attempts", "1"]) == 0
    table = pd.read_csv(tmp_path / "out" / "attack" / "attack" / "asr.csv")
    assert set(zip(table.model, table.attack)) == {(m, a) for m in ("original", "esd (run)")
                                                   for a in ("none", "unlearndiff", "completion")}
