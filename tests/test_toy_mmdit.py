"""The toy MMDiT world ('toy-mmdit'): a plain `StableDiffusion3Pipeline` on the toy world's judge, VAE and text
encoder, whose flow-matching transformer follows prompts well enough to erase from."""

import os

import pytest
import torch
from safetensors import safe_open

from doco_lib import toy
from doco_lib.models import encode_prompts, load_judge, load_pipeline, pipeline_kind, text_call_kwargs, toy_weights_dir
from doco_lib.toy.mmdit import build_toy_mmdit
from doco_lib.toy.quality import pipeline_quality

FOLDER = toy.TOY_WEIGHTS / toy.TOY_PIPELINES["toy-mmdit"]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("toy-mmdit", "cpu")


def test_loads_with_plain_diffusers_on_the_toy_worlds_vae_and_text_encoder():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(FOLDER, text_encoder_3=None, tokenizer_3=None)
    shipped = load_pipeline("toy", "cpu")
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert pipeline_kind("toy-mmdit") == "mmdit" and pipeline_kind("toy") == "unet"
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.tokenizer.model_max_length == 16 and len(pipe.tokenizer) == len(shipped.tokenizer)
    for name, value in shipped.vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[name], value), name
    # Both CLIP encoders are the toy text encoder as it ships, rounded to float16, with an identity projection.
    tower = pipe.text_encoder.text_model.state_dict()
    for name, value in shipped.text_encoder.state_dict().items():
        assert torch.equal(tower[name].float(), value.half().float()), name
    assert torch.equal(pipe.text_encoder.text_projection.weight.float(), torch.eye(32))
    assert torch.equal(pipe.text_encoder_2.text_projection.weight, pipe.text_encoder.text_projection.weight)


def test_shared_files_are_links_inside_the_weights_folder():
    links = [p for p in FOLDER.rglob("*") if p.is_symlink()]
    assert {p.relative_to(FOLDER).parts[0] for p in links} >= {"vae", "text_encoder_2", "tokenizer_2"}
    root = toy_weights_dir().resolve()
    for link in links:
        assert not os.path.isabs(os.readlink(link)), link
        assert link.resolve().is_file() and link.resolve().is_relative_to(root), link


def test_prompts_read_clip_rows_beside_as_many_zero_rows(pipe):
    """Without T5, SD 3's pipeline fills the T5 slot with zeros; `text_call_kwargs` makes every call (encoding,
    sampling) use as many as the CLIP rows, so training and sampling read the same conditioning."""
    assert text_call_kwargs(pipe) == {"max_sequence_length": 16}
    conditioning = encode_prompts(pipe, ["a photo of a star", "a red heart"])
    assert conditioning.shape == (2, 16 + 16 + 1, 64)  # CLIP rows, zero rows, the pooled embedding's row
    assert conditioning[:, 16:32].abs().sum() == 0 and conditioning[:, :16].abs().sum(-1).min() > 0
    states, _, pooled, _ = pipe.encode_prompt("a photo of a star", None, None, do_classifier_free_guidance=False,
                                              **text_call_kwargs(pipe))
    assert torch.equal(conditioning[0, :32], states[0]) and torch.equal(conditioning[0, 32], pooled[0])


def test_uce_reads_the_clip_rows_of_a_pipeline_without_t5(pipe):
    """UCE's MMDiT rows: each text's last word token among the CLIP rows (no T5 segment to read), and the pooled
    embedding."""
    from doco_lib.methods.uce import mmdit_rows

    rows = mmdit_rows(pipe, ["a photo of a star", ""])
    assert rows["states"].shape == rows["pooled"].shape == (2, 1, 64)
    conditioning = encode_prompts(pipe, ["a photo of a star", ""]).double()
    star = len(pipe.tokenizer("a photo of a star").input_ids) - 2  # its last word token, before the end token
    assert torch.equal(rows["states"][0, 0], conditioning[0, star]) and torch.equal(rows["states"][1, 0], conditioning[1, 0])


def test_pipeline_follows_prompts_reduced_bar(pipe):
    """The toy UNet's reduced bar (tests/test_toy_pipeline.py: 8 samples per prompt instead of 32), but for
    hexagon, toy-mmdit's weakest shape (81% of the build's 32 samples; 2 of these 8): above chance (1/8) only."""
    report = pipeline_quality(pipe, load_judge("cpu"), n_per_prompt=8, steps=25, guidance=5.0, seed=123)
    assert report["shape"]["mean"] >= 0.70, report["shape"]
    shapes = report["shape"]["per_value"]
    assert min(rate for shape, rate in shapes.items() if shape != "hexagon") >= 0.375, shapes
    assert shapes["hexagon"] > 1 / 8, shapes
    assert report["colour"]["mean"] >= 0.60, report["colour"]
    assert report["style"]["mean"] >= 0.60, report["style"]


def test_the_build_recorded_its_curve_and_the_95_percent_bar():
    report = toy.build_report("toy-mmdit")
    assert report["transformer_curve"], "the build records its accuracy-vs-time curve"
    assert report["config"]["context_length"] == 16
    assert all(report["final_quality"][attribute]["mean"] >= 0.95 for attribute in ("shape", "colour", "style"))


@pytest.mark.slow  # a few steps of every stage (about 30 s)
def test_quick_mmdit_build_links_the_shipped_files_and_resumes(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "weights" / "pipeline_mmdit"
    build_toy_mmdit(out, tmp_path / "cache", toy.TOY_WEIGHTS, quick=True)
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.config.num_layers == 4
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as stored:
        assert {stored.get_slice(name).get_dtype() for name in stored.keys()} == {"F16"}
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_symlink()
    assert (out / "text_encoder_2" / "model.safetensors").resolve() == (out / "text_encoder" / "model.safetensors")
    assert not (out.parent / "pipeline_mmdit.partial").exists()
    # A second call finds the transformer trained and does no training; its links are replaced, not written through.
    checkpoint = tmp_path / "cache" / "transformer.ckpt.pt"
    mtime = checkpoint.stat().st_mtime_ns
    vae_bytes = (toy.TOY_WEIGHTS / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    build_toy_mmdit(out, tmp_path / "cache", toy.TOY_WEIGHTS, quick=True)
    assert checkpoint.stat().st_mtime_ns == mtime
    assert (toy.TOY_WEIGHTS / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == vae_bytes
