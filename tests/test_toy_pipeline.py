"""The shipped toy world: loads as a standard SD pipeline and follows prompts well enough to erase from."""

import hashlib
import json
import zlib

import pytest
import torch
from PIL import Image

from doco_lib.models import load_judge, load_pipeline, toy_weights_dir
from doco_lib.toy.quality import pipeline_quality


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("toy", "cpu")


def test_shipped_weights_are_safetensors_within_budget():
    root = toy_weights_dir()
    weights = list(root.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} >= {"unet", "vae", "text_encoder", "judge", "eval_clip"}
    assert not [p for p in root.rglob("*") if p.suffix in {".bin", ".pt", ".ckpt", ".pth"}]
    # What a clone stores: each distinct file once, zlib-compressed, as git's object store does ('toy-wide'
    # repeats the VAE, and most of its token table is zero rows, which compress to nothing).
    distinct = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in root.rglob("*") if p.is_file()}
    stored = sum(len(zlib.compress(p.read_bytes(), 6)) for p in distinct.values())
    assert stored <= 30 * 2**20, f"the toy worlds store {stored / 2**20:.1f} MB"
    # On disk: every file but the links (toy-mmdit's shared VAE, vocabulary and second encoder), which cost nothing.
    checked_out = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    assert checked_out <= 64 * 2**20, f"the toy worlds take {checked_out / 2**20:.1f} MB on disk"


def test_loads_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(toy_weights_dir() / "pipeline")
    assert pipe.safety_checker is None
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.scaling_factor != 1.0  # computed from the latents, as SD does


def test_same_seed_gives_same_image(pipe):
    from doco_lib.sampling import generate

    a = generate(pipe, ["a photo of a star", "a photo of a circle"], [3, 4], steps=5, guidance=5.0)
    b = generate(pipe, ["a photo of a star"], [3], steps=5, guidance=5.0)
    assert a.shape == (2, 3, 32, 32)
    assert torch.allclose(a[0], b[0], atol=1e-5), "an image must not depend on what else is in its batch"


def test_pipeline_follows_prompts_reduced_bar(pipe):
    """A reduced version of the quality bar (8 samples per prompt instead of 32)."""
    report = pipeline_quality(pipe, load_judge("cpu"), n_per_prompt=8, steps=25, guidance=5.0, seed=123)
    assert report["shape"]["mean"] >= 0.70, report["shape"]
    assert report["shape"]["min"] >= 0.375, report["shape"]
    assert report["colour"]["mean"] >= 0.60, report["colour"]
    assert report["style"]["mean"] >= 0.60, report["style"]


def test_judge_accuracy_recorded_by_the_build():
    report = json.loads((toy_weights_dir() / "build_report.json").read_text())
    assert min(report["judge_heldout_accuracy"].values()) >= 0.98
    assert report["unet_curve"], "the build records its accuracy-vs-time curve"


def test_sample_command_writes_images_and_grid(tmp_path, doco):
    out = tmp_path / "samples"
    result = doco("sample", "--model", "toy", "--prompt", "a photo of a star", "-n", "3",
                                            "--seed", "1", "--steps", "4", "--guidance", "5", "--device", "cpu",
                                            "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["grid.png", "image_0000.png", "image_0001.png",
                                                          "image_0002.png"]
    assert Image.open(out / "image_0000.png").size == (32, 32)


def test_sample_command_rejects_a_missing_model(tmp_path, doco):
    result = doco("sample", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out",
                                            str(tmp_path))
    assert result.returncode == 2 and "is not a folder" in result.stderr and "Traceback" not in result.stderr


def test_concept_similarity_finds_the_word_in_the_prompt(pipe):
    from doco_lib.models import concept_similarity

    words = ["star", "pentagram", "circle", "heart", "cross"]
    similarity = concept_similarity(pipe, words)
    assert torch.allclose(torch.tensor(similarity.values), torch.tensor(similarity.values.T), atol=1e-6)
    assert similarity.values.diagonal() == pytest.approx([1.0] * len(words), abs=1e-5)
    assert similarity.loc["star", "pentagram"] > similarity.loc["star", "circle"]  # the synonym is nearest
    twice = concept_similarity(pipe, ["star", "star", "circle"], template="a {} on a plain background")
    assert twice.values[0, 1] == pytest.approx(1.0, abs=1e-5)  # the same word, the same state


def test_toy_quality_refuses_seeds_whose_images_overlap(doco, tmp_path):
    result = doco("toy", "quality", "--set", f"output_root={tmp_path}", "--seeds", "0", "1", "--samples", "64")
    assert result.returncode != 0 and "--seeds: [0, 1]" in result.stderr and "at least --samples" in result.stderr
