"""The build code itself, on a few steps per stage (`--quick`): it runs, exports, and resumes exactly."""

import json

import pytest
import torch
from torch import nn

from doco_lib.toy.build import ResumableTraining, build_toy_world


@pytest.mark.slow  # trains the toy world anew (about a minute)
def test_quick_build_exports_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    report = build_toy_world(tmp_path / "out", tmp_path / "cache", seed=1, quick=True)
    assert set(report["final_quality"]) == {"shape", "colour", "style"}
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out" / "pipeline")
    assert len(pipe.tokenizer) == 49408
    CLIPModel.from_pretrained(tmp_path / "out" / "eval_clip")
    assert json.loads((tmp_path / "out" / "build_report.json").read_text())["config"]["seed"] == 1
    # A second call finds every stage done and does no training.
    mtime = (tmp_path / "cache" / "unet.ckpt.pt").stat().st_mtime_ns
    build_toy_world(tmp_path / "out", tmp_path / "cache", seed=1, quick=True)
    assert (tmp_path / "cache" / "unet.ckpt.pt").stat().st_mtime_ns == mtime


def _training(path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    training = ResumableTraining(path, {"model": model}, optimizer, seed=5)

    def step(gen):
        x = torch.randn(8, 4, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    return training, model, step


def test_stopped_training_resumes_to_identical_weights(tmp_path):
    straight, straight_model, step = _training(tmp_path / "a.ckpt.pt")
    straight.run(10, step, checkpoint_every=3)

    first, _, step = _training(tmp_path / "b.ckpt.pt")
    first.run(7, step, checkpoint_every=3)  # checkpoints at 3 and 6 and at the end (7); "crash" here
    resumed, resumed_model, step = _training(tmp_path / "b.ckpt.pt")
    assert resumed.step == 7
    resumed.run(10, step, checkpoint_every=3)
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_quick_wide_build_keeps_the_shipped_judge_vae_and_tokenizer(tmp_path):
    from diffusers import StableDiffusionPipeline

    from doco_lib.toy import TOY_WEIGHTS, render

    build_toy_world(tmp_path / "wide", tmp_path / "cache", quick=True, wide_from=TOY_WEIGHTS)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "wide")
    shipped = StableDiffusionPipeline.from_pretrained(TOY_WEIGHTS / "pipeline")
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 96
    assert pipe.tokenizer.model_max_length == 16 and len(pipe.tokenizer) == len(shipped.tokenizer)
    for name, value in shipped.vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[name], value), name
    assert not (tmp_path / "cache" / "judge").exists() and not (tmp_path / "cache" / "vae").exists()
    # Token-table rows of tokens no caption uses get no gradient: they stay at their zero start.
    table = pipe.text_encoder.get_input_embeddings().weight
    seen = torch.zeros(len(table), dtype=torch.bool)
    seen[pipe.tokenizer(render.all_captions() + [""], padding="max_length", truncation=True,
                        return_tensors="pt").input_ids.unique()] = True
    assert (table[~seen] == 0).all() and (table[seen] != 0).any(dim=1).all()


def test_shipped_wide_toy_world_has_room_for_sepme():
    from doco_lib.methods.sepme import null_space_basis, token_rows
    from doco_lib.models import load_pipeline

    pipe = load_pipeline("toy-wide", "cpu")
    rows = token_rows(pipe, ["", "a photo of a heart", "a photo of a cross"])
    assert rows.shape == (3 * 16, 96)
    basis = null_space_basis(rows)
    assert len(basis) >= 40
    assert (rows.double() @ basis.T).abs().max() <= 1e-6 * rows.double().norm(dim=1).max()
    star = token_rows(pipe, ["a photo of a star"]).double()
    assert (star @ basis.T).norm(dim=1).max() > 0.1 * star.norm(dim=1).max()  # star's own rows reach it
