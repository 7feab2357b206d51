"""The build code itself, on a few steps per stage (`--quick`): it runs, exports, and resumes exactly."""

import json

import torch
from torch import nn

from doco_lib.toy.build import ResumableTraining, build_toy_world


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
