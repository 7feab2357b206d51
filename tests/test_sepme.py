"""SepME (doco_lib/methods/sepme.py) on tiny SD-shaped components: a random 256-wide CLIP text encoder (so "" and
two other prompts, 3·77 = 231 token rows, leave a null space) and a random UNet reading 256-wide context."""

from __future__ import annotations

import copy
import json
import math
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from doco_lib.anchors import AnchorLatents
from doco_lib.config import ParamsError
from doco_lib.io import CorruptFileError
from doco_lib.methods import sepme
from doco_lib.models import denoiser
from doco_lib.toy import TOY_WEIGHTS

BASE = "dummy/sd-256"
CONCEPT = "a painting by vincent van gogh"
OTHERS = ["a painting by pablo picasso", "a painting by claude monet"]
LEAK = 1e-5  # the largest ‖ΔW e‖ / (‖ΔW‖₂ ‖e‖) allowed on a decoupled row e


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def get_dummy_components() -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from doco_lib.toy.models import make_scheduler_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=256, attention_head_dim=8,
        norm_num_groups=16)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=16, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(16, 32), norm_num_groups=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                                num_attention_heads=4, vocab_size=49408, max_position_embeddings=77,
                                                projection_dim=256))
    # A freshly initialised final LayerNorm (γ = 1, β = 0) makes every token row orthogonal to the all-ones
    # vector, a null direction no trained encoder has; perturb it as training would.
    with torch.no_grad():
        norm = text_encoder.final_layer_norm
        norm.weight.add_(0.1 * torch.randn(256))
        norm.bias.copy_(0.1 * torch.randn(256))
    tokenizer = CLIPTokenizer.from_pretrained(TOY_WEIGHTS / "pipeline" / "tokenizer")  # SD v1's BPE, 77 tokens
    scheduler = DDIMScheduler(**make_scheduler_config(sampler=True))
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**get_dummy_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def concept_latents(pipe, tmp_path_factory):
    """The original model's images of the concept, as VAE latents (the data-preparation cache)."""
    from doco_lib.anchors import prepare_anchor_latents

    return prepare_anchor_latents(pipe, [CONCEPT], 4, tmp_path_factory.mktemp("concept"), model=BASE, seed=0, steps=2,
                                  guidance=3.0, shard_size=4, save_images=False, progress=False)


def random_increment(pipe, prompt: str, against: list[str], seed: int, concept: str | None = None, base: str = BASE):
    """A concept increment with random (non-zero) coefficients P, so that ΔW = P·B is comparable to W0."""
    increment = sepme.SepMEIncrement.for_denoiser(denoiser(pipe), sepme.decoupling_basis(pipe, against), scale=1.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in increment.coefficients:
            p.copy_(torch.randn(p.shape, generator=generator))
    deltas = {name: delta.detach() for name, delta in increment.deltas().items()}
    metadata = {"base_model": base, "prompts": [prompt], "decoupled_against": against}
    return sepme.ConceptIncrement(concept or prompt, deltas, metadata)


def leakage(delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """‖ΔW e‖ / (‖ΔW‖₂ ‖e‖) for each row e: 0 when e is in ΔW's null space, at most 1."""
    return (rows @ delta.T).norm(dim=1) / (torch.linalg.matrix_norm(delta, ord=2) * rows.norm(dim=1))


def predict(unet, prompts_embeddings, x, t, deltas=None):
    with torch.no_grad():
        return sepme.edited_output(unet, deltas, x, t, prompts_embeddings)


def state(unet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unet.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


# ------------------------------------------------------------------------------------------ null space
def test_null_space_basis_is_orthonormal_and_annihilates_the_rows():
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(10, 4, generator=generator, dtype=torch.float64) @ torch.randn(
        4, 16, generator=generator, dtype=torch.float64)
    rows = torch.cat([low_rank, low_rank[:3]])  # repeated rows (shared BOS tokens) cost no dimension
    basis = sepme.null_space_basis(rows)
    assert basis.shape == (16 - 4, 16) and basis.dtype == torch.float64
    assert torch.allclose(basis @ basis.T, torch.eye(len(basis), dtype=torch.float64), atol=1e-12)
    assert (rows @ basis.T).abs().max() < 1e-12 * rows.abs().max()
    # In float32 the product is rank 4 only up to rounding: directions with σ < rtol·σ_max count as null,
    # and each basis vector b keeps ‖E b‖ ≤ rtol·σ_max.
    rows32 = rows.float()
    basis32 = sepme.null_space_basis(rows32, rtol=1e-5)
    assert len(basis32) == 12
    assert (rows32.double() @ basis32.T).norm(dim=0).max() <= 1e-5 * torch.linalg.matrix_norm(rows, ord=2)
    full = torch.randn(20, 16, generator=generator)  # full rank: nothing is left
    with pytest.raises(ParamsError, match=r"20 stacked token rows of 'x', 'y'.*all 16 dimensions"):
        sepme.null_space_basis(full, names=["x", "y"])


def test_too_many_prompts_for_the_text_encoder_is_a_clear_error(pipe):
    prompts = ["a photo of a cat", "a photo of a dog", "a photo of a bird"]  # with "": 308 rows > 256 dims
    with pytest.raises(ParamsError, match=r"308 stacked token rows of '', 'a photo of a cat'.*256 dimensions"):
        sepme.decoupling_basis(pipe, prompts)


def test_increment_vanishes_on_decoupled_rows_and_only_there(pipe):
    fresh = sepme.SepMEIncrement.for_denoiser(pipe.unet, sepme.decoupling_basis(pipe, OTHERS), scale=1e-4)
    assert all(torch.count_nonzero(d) == 0 for d in fresh.deltas().values())  # P starts at zero
    assert [p.shape[1] for p in fresh.coefficients] == [len(fresh.directions)] * len(fresh.names)
    assert set(fresh.names) == {n for n, _ in pipe.unet.named_parameters() if ".attn2.to_k" in n or ".attn2.to_v" in n}

    increment = random_increment(pipe, CONCEPT, OTHERS, seed=1)
    decoupled, own = sepme.token_rows(pipe, ["", *OTHERS]), sepme.token_rows(pipe, [CONCEPT])
    for name, delta in increment.deltas.items():
        assert torch.linalg.matrix_norm(delta, ord=2) > 0.1 * torch.linalg.matrix_norm(pipe.unet.get_parameter(name), 2)
        assert leakage(delta, decoupled).max() <= LEAK, name
        # The concept's own rows are moved (BOS and the prefix "a painting by" are shared, so not all of them).
        assert leakage(delta, own).max() > 1e-2, name


def test_predictions_change_for_the_concept_only_on_every_batch_row(pipe):
    increment = random_increment(pipe, CONCEPT, OTHERS, seed=2)
    # A classifier-free-guidance style batch: uncond, the concept (row 1, not 0), the two other concepts.
    embeddings = sepme.encode_prompts(pipe, ["", CONCEPT, *OTHERS])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    t = torch.tensor([900, 500, 250, 10])
    original = predict(pipe.unet, embeddings, x, t)
    edited = predict(pipe.unet, embeddings, x, t, increment.deltas)
    for row in (0, 2, 3):
        assert torch.allclose(edited[row], original[row], atol=1e-5), row
    assert not torch.allclose(edited[1], original[1], atol=1e-2)
    for row in range(4):  # each row as if its prompt ran alone
        alone = predict(pipe.unet, embeddings[row:row + 1], x[row:row + 1], t[row:row + 1], increment.deltas)
        assert torch.allclose(edited[row:row + 1], alone, atol=1e-5), row
    # Several images of the concept in one batch: every one of them is edited.
    x3 = torch.randn(3, 4, 8, 8, generator=generator)
    concept3 = embeddings[1:2].expand(3, -1, -1)
    changed = (predict(pipe.unet, concept3, x3, t[:3], increment.deltas) - predict(pipe.unet, concept3, x3, t[:3]))
    assert (changed.flatten(1).abs().amax(1) > 1e-2).all()


# ------------------------------------------------------------------------------------------ training
def test_stopping_rule_on_given_correlations():
    # Momentum m₀ = 1 for five steps, then decays as 0.9^j: below 0.5 from j = 7, i.e. step 12.
    assert sepme.stopping_step([1.0] * 5 + [0.0] * 30, threshold=0.5, max_steps=100) == 12
    # m₀ is the first value, not 0: from 10, m falls below 1 only at step 23 (0.9^22 < 0.1).
    assert sepme.stopping_step([10.0] + [0.0] * 40, threshold=1.0, max_steps=100) == 23
    # Below the threshold from the start: nothing stops before step 10 is done.
    assert sepme.stopping_step([0.0] * 30, threshold=0.5, max_steps=100) == 11
    # Never below: max_steps; max_steps under 10 still ends the run; a sequence that ends first: None.
    assert sepme.stopping_step([1.0] * 50, threshold=0.5, max_steps=20) == 20
    assert sepme.stopping_step([0.0] * 10, threshold=1.0, max_steps=3) == 3
    assert sepme.stopping_step([1.0] * 5, threshold=0.5, max_steps=20) is None
    assert sepme.update_momentum(None, 0.3) == 0.3 and sepme.update_momentum(1.0, 0.0) == pytest.approx(0.9)


def test_training_lowers_the_correlation_keeps_the_decoupling_and_stops_early(pipe, concept_latents):
    # Larger scale than the README run (1e-4): this random UNet's directions are small, and 20 steps are few.
    config = sepme.SepMEConfig(lr=1e-2, scale=1.0, threshold=float("-inf"), max_steps=20, batch_size=2, seed=0)
    trainer = sepme.SepMETrainer(pipe, concept_latents, OTHERS, config)
    before = trainer.heldout_correlation()
    history = trainer.run()
    after = trainer.heldout_correlation()
    assert len(history) == trainer.step == 20
    assert before > 0 > after, (before, after)

    result = trainer.result("van gogh", BASE)
    decoupled, own = sepme.token_rows(pipe, ["", *OTHERS]), sepme.token_rows(pipe, [CONCEPT])
    for name, delta in result.deltas.items():
        assert leakage(delta, decoupled).max() <= LEAK, name
        assert leakage(delta, own).max() > 1e-2, name
    assert result.metadata["steps"] == 20 and result.metadata["decoupled_against"] == OTHERS
    assert result.metadata["prompts"] == [CONCEPT]
    assert result.metadata["final_correlation"] == history[-1]["correlation"]

    # The trainer's momentum is the rule's; a threshold just above step 15's momentum must stop it by then.
    correlations = [r["correlation"] for r in history]
    momentum = None
    for record in history:
        momentum = sepme.update_momentum(momentum, record["correlation"])
        assert record["momentum"] == momentum
    threshold = math.nextafter(history[14]["momentum"], math.inf)
    expected = sepme.stopping_step(correlations, threshold, max_steps=20)
    assert 10 < expected <= 15
    rerun = sepme.SepMETrainer(pipe, concept_latents, OTHERS, replace(config, threshold=threshold))
    rerun.run()
    assert rerun.step == expected and rerun.stopped
    assert [r["correlation"] for r in rerun.history] == correlations[:expected]  # seeded: the same trajectory


# ------------------------------------------------------------------------------------------ storage
class _Payload:
    """Unpickling this creates a file: a stand-in for code a pickle could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_save_load_round_trip_and_no_unpickling(pipe, tmp_path):
    increment = random_increment(pipe, CONCEPT, OTHERS, seed=3, concept="van gogh")
    increment.metadata.update(steps=7, final_correlation=-1.25e-3, rtol=1e-6, scale=1e-4)
    path = sepme.save_increment(increment, tmp_path / "van_gogh.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["van_gogh.safetensors"]  # no temporary left
    loaded = sepme.load_increment(path)
    assert loaded.concept == "van gogh" and loaded.source == str(path)
    assert loaded.deltas.keys() == increment.deltas.keys()
    assert all(torch.equal(loaded.deltas[k], increment.deltas[k]) for k in increment.deltas)
    assert loaded.metadata == {**increment.metadata, "method": "sepme", "concept": "van gogh"}
    assert sepme.read_increment_metadata(path)["final_correlation"] == -1.25e-3
    assert sepme.find_increments(tmp_path) == {"van gogh": path}

    marker = tmp_path / "unpickled"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    with pytest.raises(CorruptFileError, match="evil.safetensors"):
        sepme.load_increment(evil)
    assert not marker.exists()
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(CorruptFileError, match="not a SepME increment"):
        sepme.load_increment(foreign)


# ------------------------------------------------------------------------------------------ compose
@pytest.fixture(scope="module")
def two_increments(pipe):
    """Van Gogh and Picasso, each decoupled against the other (and Monet), as SepME trains them."""
    a = random_increment(pipe, CONCEPT, [OTHERS[0], OTHERS[1]], seed=4, concept="van gogh")
    b = random_increment(pipe, OTHERS[0], [CONCEPT, OTHERS[1]], seed=5, concept="picasso")
    return a, b


def test_compose_and_restore_are_exact_and_separable(pipe, two_increments):
    a, b = two_increments
    base_state = state(pipe.unet)
    both = sepme.compose(pipe.unet, [a, b], BASE)
    assert_same_state(state(both), state(sepme.compose(pipe.unet, [b, a], BASE)))  # order does not matter
    assert_same_state(state(pipe.unet), base_state)  # the base is left as it was
    only_b = sepme.compose(pipe.unet, [b], BASE)

    eraser = sepme.SeparableEraser(copy.deepcopy(pipe.unet), [a, b], BASE)
    eraser.erase("van gogh", "picasso")
    assert_same_state(state(eraser.unet), state(both))
    eraser.restore("van gogh")
    assert eraser.erased == ("picasso",)
    assert_same_state(state(eraser.unet), state(only_b))  # bit for bit, no rounding residue
    eraser.restore("picasso")
    assert_same_state(state(eraser.unet), base_state)
    with pytest.raises(ParamsError, match=r"no increment for \['monet'\]; available: \['picasso', 'van gogh'\]"):
        eraser.erase("monet")

    # Separable: with both erased, each concept is drawn as with its own erasure alone; "" and Monet as before.
    only_a = sepme.compose(pipe.unet, [a], BASE)
    embeddings = sepme.encode_prompts(pipe, ["", CONCEPT, OTHERS[0], OTHERS[1]])
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 400, 400, 100])
    out = {name: predict(unet, embeddings, x, t) for name, unet in
           (("base", pipe.unet), ("a", only_a), ("b", only_b), ("ab", both))}
    assert torch.allclose(out["ab"][1], out["a"][1], atol=1e-5) and torch.allclose(out["ab"][2], out["b"][2], atol=1e-5)
    for row in (0, 3):
        assert torch.allclose(out["ab"][row], out["base"][row], atol=1e-5)
    assert not torch.allclose(out["ab"][1], out["base"][1], atol=1e-2)
    assert not torch.allclose(out["ab"][2], out["base"][2], atol=1e-2)


def test_compose_refuses_another_base_or_architecture(pipe, two_increments, tmp_path):
    a, _ = two_increments
    path = sepme.save_increment(a, tmp_path / "van_gogh.safetensors")
    with pytest.raises(ParamsError, match=rf"{path}.*trained on base model '{BASE}', not on 'other/model'"):
        sepme.compose(pipe.unet, [path], "other/model")
    name = next(iter(a.deltas))
    renamed = sepme.ConceptIncrement("x", {"mid_block.foo.weight": a.deltas[name]}, {"base_model": BASE})
    with pytest.raises(ParamsError, match="'mid_block.foo.weight' is not a cross-attention K/V weight"):
        sepme.compose(pipe.unet, [renamed], BASE)
    reshaped = sepme.ConceptIncrement("x", {name: a.deltas[name][:, :128]}, {"base_model": BASE})
    with pytest.raises(ParamsError, match=r"has shape \(\d+, 128\), the UNet's \(\d+, 256\)"):
        sepme.compose(pipe.unet, [reshaped], BASE)
    # Two increments that were not decoupled against each other compose, with a warning.
    cat = random_increment(pipe, "a photo of a cat", OTHERS, seed=6, concept="cat")
    with pytest.warns(UserWarning) as caught:
        sepme.compose(pipe.unet, [a, cat], BASE)
    assert sorted(str(w.message).split(";")[0] for w in caught) == [
        "SepME: the increment of 'cat' was not decoupled against ['a painting by vincent van gogh'] (prompts of "
        "'van gogh')",
        "SepME: the increment of 'van gogh' was not decoupled against ['a photo of a cat'] (prompts of 'cat')"]


# ------------------------------------------------------------------------------------------ doco compose
@pytest.fixture
def toy_increments(tmp_path):
    """Two increments for the toy UNet (its text encoder is too narrow to train one; composing needs none)."""
    from safetensors.torch import load_file

    weights = load_file(str(TOY_WEIGHTS / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    folder = tmp_path / "increments"
    generator = torch.Generator().manual_seed(0)
    for concept in ("star", "heart"):
        deltas = {k: 1e-2 * torch.randn(v.shape, generator=generator) for k, v in weights.items()
                  if ".attn2.to_k." in k or ".attn2.to_v." in k}
        sepme.save_increment(sepme.ConceptIncrement(concept, deltas, {"base_model": "toy", "prompts": [concept]}),
                             folder / f"{concept}.safetensors")
    return folder, weights


def test_cli_compose_writes_the_composed_unet(toy_increments, tmp_path):
    from diffusers import UNet2DConditionModel

    from doco_lib.app import cli

    folder, weights = toy_increments
    out = tmp_path / "unet_without_star"
    assert cli.main(["compose", "--base", "toy", "--increments", str(folder), "--erase", "star",
                     "--out", str(out)]) == 0
    unet = UNet2DConditionModel.from_pretrained(out, use_safetensors=True)
    star = sepme.load_increment(folder / "star.safetensors")
    for name, value in unet.state_dict().items():
        expected = weights[name]
        if name in star.deltas:
            expected = (expected.double() + star.deltas[name].double()).float()
        assert torch.equal(value, expected), name
    record = json.loads((out / "sepme_compose.json").read_text())
    assert record["erased"] == ["star"] and record["restored"] == ["heart"] and record["base_model"] == "toy"


def test_cli_compose_errors_before_any_work(toy_increments, tmp_path, doco, capsys):
    from doco_lib.app import cli

    folder, _ = toy_increments
    out = tmp_path / "out"
    result = doco("compose", "--base", "toy", "--increments", str(folder), "--erase",
                                            "star, zebra", "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert "--erase: no increment for ['zebra']; available concepts: ['heart', 'star']" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()

    assert cli.main(["compose", "--base", "toy", "--increments", str(tmp_path / "missing"), "--erase", "star",
                     "--out", str(out)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["compose", "--base", "org/other-model", "--increments", str(folder), "--erase", "star",
                     "--out", str(out)]) == 2
    assert "star.safetensors: the increment of 'star' was trained on base model 'toy', not on 'org/other-model'" \
        in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ the authors' quirks
def test_the_authors_quirks_are_switches_defaulting_to_the_correct_version(pipe, concept_latents):
    config = sepme.SepMEConfig(lr=1e-2, scale=1.0, threshold=float("-inf"), max_steps=3, batch_size=2, seed=0)
    assert not config.first_row_only and not config.accumulate_grads

    # first_row_only: with two images a step, only the first image's prediction sees the increment.
    quirky = sepme.SepMETrainer(pipe, concept_latents, OTHERS, replace(config, first_row_only=True))
    with torch.no_grad():
        for p in quirky.increment.coefficients:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x_t, t, c = quirky._noised_batch(torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    d_orig, d_new = quirky.directions(x_t, t, c), quirky.directions(x_t, t, c, quirky.increment.deltas())
    correlation, _ = quirky.losses(x_t, t, c)
    assert torch.allclose(correlation, (torch.cat([d_new[:1], d_orig[1:]]) * d_orig).mean())
    assert not torch.allclose(correlation, (d_new * d_orig).mean())
    assert quirky.result("van gogh", BASE).metadata["first_row_only"] is True

    # accumulate_grads: the second step's gradient is added to the first one's instead of replacing it.
    accumulating = sepme.SepMETrainer(pipe, concept_latents, OTHERS, replace(config, accumulate_grads=True))
    zeroing = sepme.SepMETrainer(pipe, concept_latents, OTHERS, config)
    accumulating.train_step(), zeroing.train_step()  # same seed, same batch, same update
    first = [p.grad.clone() for p in zeroing.increment.coefficients]
    accumulating.train_step(), zeroing.train_step()
    for summed, fresh, old in zip(accumulating.increment.coefficients, zeroing.increment.coefficients, first):
        assert torch.allclose(summed.grad, fresh.grad + old, rtol=1e-5, atol=1e-12)
        assert not torch.allclose(summed.grad, fresh.grad)


# ------------------------------------------------------------------------------------------ the toy MMDiT world
STAR, HEART, CROSS = "a photo of a star", "a photo of a heart", "a photo of a cross"


@pytest.fixture(scope="module")
def mmdit_pipe():
    from doco_lib.models import load_pipeline

    return load_pipeline("toy-mmdit", "cpu", dtype=torch.float32)


def flow_latents(prompt: str, n: int = 4) -> AnchorLatents:
    """n stand-in images of `prompt` (4×8×8 latents, unit posteriors): the loss only needs x_t and its prompt."""
    return AnchorLatents(torch.zeros(n, 4, 8, 8), torch.ones(n, 4, 8, 8), [prompt] * n, list(range(n)), 1.0)


def test_toy_mmdit_has_room_against_one_other_concept_not_two(mmdit_pipe):
    """toy-mmdit's context embedder reads 64-wide rows, but its two CLIP encoders are one toy CLIP, so each prompt is
    16 rows [h, h] (h 32 wide) and 16 zero rows: "" and one concept (31 distinct rows) leave one null direction the
    target's rows reach beside the 32 [u, −u] that no prompt reaches; "" and two concepts fill the 32 dimensions, and
    SepME refuses before training."""
    basis = sepme.decoupling_basis(mmdit_pipe, [HEART])
    assert basis.shape == (33, 64)
    sepme.check_reach(mmdit_pipe, [STAR], [HEART], basis)
    assert sepme.decoupling_basis(mmdit_pipe, [HEART, CROSS]).shape == (32, 64)
    with pytest.raises(ParamsError, match=r"null space of the 96 token rows of \['', 'a photo of a heart', 'a photo of "
                                          r"a cross'\] \(32 of 64 dimensions\) holds no direction the rows of \['a "
                                          r"photo of a star'\] reach"):
        sepme.SepMETrainer(mmdit_pipe, flow_latents(STAR), [HEART, CROSS])


def test_toy_mmdit_increment_erases_the_concept_alone_and_its_loss_falls(mmdit_pipe):
    """Trained on the transformer's context embedder, the increment changes the output for the target and leaves "" and
    the concept it was decoupled against as they were (a wrong null space fails here); repeated steps on one held
    batch lower the concept-irrelevant correlation (an update of the wrong sign raises it)."""
    from doco_lib.models import denoiser_output, encode_prompts

    config = sepme.SepMEConfig(lr=1e-1, scale=1.0, beta=0.0, threshold=float("-inf"), max_steps=3, batch_size=2, seed=0)
    trainer = sepme.SepMETrainer(mmdit_pipe, flow_latents(STAR), [HEART], config)
    assert trainer.parameterization.flow
    start = trainer.generator.get_state()
    held = trainer._noised_batch(trainer._next_images(2, trainer.generator), trainer.generator)
    trainer._queue = []

    def correlation():
        with torch.no_grad():
            return (trainer.directions(*held, trainer.increment.deltas()) * trainer.directions(*held)).mean().item()

    before = correlation()
    for _ in range(config.max_steps):  # each step on the held batch: the same images, noise and timesteps
        trainer.generator.set_state(start.clone())
        trainer._queue = []
        trainer.train_step()
    after = correlation()
    assert after < before, f"the correlation on the held batch went from {before} to {after}"

    deltas = trainer.result("star", "toy-mmdit").deltas
    assert list(deltas) == ["context_embedder.weight"]
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([800.0, 500.0, 200.0])
    conditioning = encode_prompts(mmdit_pipe, ["", STAR, HEART])
    with torch.no_grad():
        base = denoiser_output(mmdit_pipe.transformer, x, t, conditioning)
        edited = sepme.edited_output(mmdit_pipe.transformer, deltas, x, t, conditioning)
    change = (edited - base).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1)
    assert change[1] > 1e-3, change
    assert change[0] < 1e-6 and change[2] < 1e-6, change


def test_compose_and_restore_on_the_toy_mmdit_transformer(mmdit_pipe, tmp_path):
    """Star's and heart's increments (each decoupled against the other) on toy-mmdit's context embedder: `doco
    compose` writes a transformer folder that `SD3Transformer2DModel.from_pretrained` and `load_pipeline(unet=…)`
    load, holding W0 + ΔW there and W0 elsewhere; erasing both and restoring star gives heart's erasure bit for bit,
    and the base again after restoring heart."""
    from diffusers import SD3Transformer2DModel

    from doco_lib.app import cli
    from doco_lib.models import load_pipeline

    transformer = mmdit_pipe.transformer
    star = random_increment(mmdit_pipe, STAR, [HEART], seed=7, concept="star", base="toy-mmdit")
    heart = random_increment(mmdit_pipe, HEART, [STAR], seed=8, concept="heart", base="toy-mmdit")
    folder = tmp_path / "increments"
    for increment in (star, heart):
        sepme.save_increment(increment, folder / f"{increment.concept}.safetensors")
    out = tmp_path / "transformer_without_star"
    assert cli.main(["compose", "--base", "toy-mmdit", "--increments", str(folder), "--erase", "star",
                     "--out", str(out)]) == 0
    composed = SD3Transformer2DModel.from_pretrained(out, use_safetensors=True).state_dict()
    for name, w0 in transformer.state_dict().items():
        expected = (w0.double() + star.deltas[name].double()).float() if name in star.deltas else w0
        assert torch.equal(composed[name], expected), name
    assert type(load_pipeline("toy-mmdit", "cpu", unet=str(out))).__name__ == "StableDiffusion3Pipeline"

    base_state = state(transformer)
    only_heart = sepme.compose(transformer, [heart], "toy-mmdit")
    eraser = sepme.SeparableEraser(copy.deepcopy(transformer), [star, heart], "toy-mmdit")
    eraser.erase("star", "heart")
    eraser.restore("star")
    assert_same_state(state(eraser.unet), state(only_heart))
    eraser.restore("heart")
    assert_same_state(state(eraser.unet), base_state)
    unet_increment = sepme.ConceptIncrement("x", {"transformer_blocks.0.attn.add_k_proj.weight": torch.zeros(96, 96)},
                                            {"base_model": "toy-mmdit"})
    with pytest.raises(ParamsError, match="is not the context embedder's weight of this SD3Transformer2DModel"):
        sepme.compose(transformer, [unet_increment], "toy-mmdit")


def test_doco_train_trains_the_targets_sepme_increment_where_notebook_04_finds_it(tmp_path):
    """`method: sepme` through `doco train` (toy-wide, whose text encoder leaves SepME room): the target's increment,
    decoupled against "" and the other concept, composed as `<run>/sepme/unet` (the folder notebook 04 evaluates),
    with the increment and the cost record beside it; the composed UNet differs from the base in SepME's edited
    weights only, and its output for "" and for the other concept's name prompt is the base's. A second call reuses
    the increment; a target missing from sepme_concepts is refused before any work."""
    from conftest import run_doco
    from tiny_training import write_params

    from doco_lib.models import encode_prompts, load_pipeline

    settings = dict(model="toy-wide", method="sepme", target="star", sepme_concepts=["star", "heart"],
                    sepme_images=4, sepme_max_steps=4)
    result = run_doco("train", "--params", write_params(tmp_path, "sepme_run", **settings), "--quiet")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "outputs" / "sepme_run" / "sepme"
    assert (run / "increments" / "star.safetensors").is_file() and (run / "costs" / "training.json").is_file()
    assert f"unet: {run / 'unet'}" in result.stdout
    base, erased = load_pipeline("toy-wide", "cpu"), load_pipeline("toy-wide", "cpu", unet=str(run / "unet"))
    original = base.unet.state_dict()
    changed = {n for n, w in erased.unet.state_dict().items() if not torch.equal(w, original[n])}
    assert changed and changed <= set(sepme.edited_parameters(base.unet))
    conditioning = encode_prompts(base, ["", "a photo of a heart", "a photo of a star"])
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 500, 100])
    with torch.no_grad():
        before = base.unet(x, t, encoder_hidden_states=conditioning).sample
        after = erased.unet(x, t, encoder_hidden_states=conditioning).sample
    change = (after - before).flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1)
    assert change[0] < 1e-4 and change[1] < 1e-4 and change[2] > 1e-3, change

    stamp = (run / "increments" / "star.safetensors").stat().st_mtime_ns
    assert run_doco("train", "--params", write_params(tmp_path, "sepme_run", **settings), "--quiet").returncode == 0
    assert (run / "increments" / "star.safetensors").stat().st_mtime_ns == stamp

    refused = run_doco("train", "--params", write_params(tmp_path, "other", **{**settings, "target": "circle"}),
                       "--quiet")
    assert refused.returncode == 2 and "sepme_concepts" in refused.stderr and "'circle'" in refused.stderr
    assert not (tmp_path / "outputs" / "other").exists()
