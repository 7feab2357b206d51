"""Experiment tracking (`tracker`, doco_lib/tracking.py): what `doco train` writes to TensorBoard, read back with
TensorBoard's own event reader; sample grids that leave the trajectory as it was; a resumed run's folder; the
params check of a tracker that is not installed."""

import importlib.util
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from tiny_training import tiny_trainer, train, train_with_fault, write_params

from doco_lib import config
from doco_lib.figures import image_grid
from doco_lib.models import load_pipeline
from doco_lib.sampling import generate
from doco_lib.studies import runs

LOSSES = ("d_loss", "d_acc", "g_loss", "retain_loss", "cosine", "fired", "seconds")


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator, tag) -> dict[int, float]:
    steps = [event.step for event in accumulator.Scalars(tag)]
    assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def test_doco_train_writes_a_tensorboard_run_of_every_iteration(tmp_path, doco):
    params = write_params(tmp_path, "tracked", iterations=4, warmup_iterations=2, checkpoint_every=2,
                          tracker_sample_every=2)
    result = doco("train", "--params", params, "--quiet", "--set", "tracker=tensorboard")
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "outputs" / "tracked" / "doco"
    accumulator = events(run / "tracking" / "doco-lab")

    log = pd.read_csv(run / "training_log.csv")
    for tag in LOSSES:
        logged = log.dropna(subset=[tag])  # the warm-up has no generator terms
        assert scalars(accumulator, tag) == {step: pytest.approx(value, rel=1e-6)
                                             for step, value in zip(logged.step, logged[tag])}, tag
    assert sorted(scalars(accumulator, "g_loss")) == [3, 4]
    resolved = config.load_params(params)
    assert scalars(accumulator, "lr") == {step: pytest.approx(resolved["lr"]) for step in range(1, 5)}
    assert scalars(accumulator, "disc_lr") == {step: pytest.approx(resolved["disc_lr"]) for step in range(1, 5)}

    cost = json.loads((run / "costs" / "training.json").read_text())
    for key in ("seconds", "peak_rss_bytes", "changed_params", "trainable_params"):
        assert scalars(accumulator, f"cost/{key}") == {4: pytest.approx(cost[key], rel=1e-6)}, key
    assert cost["changed_params"] > 0

    grids = accumulator.Images("samples")
    assert [grid.step for grid in grids] == [2, 4]
    # The last grid is the trained model's: the exported UNet draws it again, target prompt above anchor prompt.
    pipe = load_pipeline("toy", "cpu", unet=str(run / "unet"))
    anchor_prompt, target_prompt = _first_prompt_pair(resolved, pipe)
    seeds = [resolved["seed"], resolved["seed"] + 1]
    images = generate(pipe, [target_prompt] * 2 + [anchor_prompt] * 2, seeds + seeds, resolved["num_inference_steps"],
                      resolved["guidance_scale"], batch_size=4)
    expected = image_grid(images, 2, scale=128 // images.shape[-1])
    logged_grid = Image.open(io.BytesIO(grids[-1].encoded_image_string)).convert("RGB")
    assert np.array_equal(np.asarray(logged_grid), np.asarray(expected))


def _first_prompt_pair(params, pipe) -> tuple[str, str]:
    """The (anchor prompt, target prompt) the trainer pairs first: of its anchor images' prompts, sorted."""
    spec, _ = runs.concept(params)
    return spec.prompt_pairs(sorted(set(runs.load_anchors(params, pipe).prompts)))[0]


def test_tracking_and_sample_grids_change_no_trained_weight(tmp_path):
    plain = tiny_trainer(tmp_path, "plain")
    tracked = tiny_trainer(tmp_path, "tracked", tracker="tensorboard", tracker_sample_every=1)
    for trainer in (plain, tracked):
        trainer.run(progress=False)
    assert len(events(tracked.run_dir / "tracking" / "doco-lab").Images("samples")) == 2
    for name, weight in plain.params.items():
        assert torch.equal(weight, tracked.params[name]), name
    for name, weight in plain.discriminator.state_dict().items():
        assert torch.equal(weight, tracked.discriminator.state_dict()[name]), name
    assert torch.equal(plain.generator.get_state(), tracked.generator.get_state())

    # A sampler that draws its noise from torch's global generator (the toy world's DDIM draws none).
    pipe = tracked.tracking.pipe
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    before = torch.random.get_rng_state()
    tracked.unet.train(True)
    tracked.tracking.sample_grid()
    assert torch.equal(torch.random.get_rng_state(), before) and tracked.unet.training


def test_spm_logs_its_scheduled_learning_rate_and_its_costs(tmp_path):
    trainer = tiny_trainer(tmp_path, "spm", method="spm", iterations=3, spm_lr_warmup=2, tracker="tensorboard")
    trainer.run(progress=False)
    trainer.export(base_model="toy")
    accumulator = events(trainer.run_dir / "tracking" / "doco-lab")
    scheduled = {record["step"]: pytest.approx(record["lr"]) for record in trainer.history}
    assert scalars(accumulator, "lr") == scheduled and scheduled[1] == 0  # the warm-up starts at 0
    cost = json.loads((trainer.run_dir / "costs" / "training.json").read_text())
    assert scalars(accumulator, "cost/changed_params") == {3: cost["changed_params"]}


def test_a_tracker_that_is_not_installed_is_a_params_error(tmp_path, doco, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args, **kwargs: None if name == "wandb" else
                        find_spec(name, *args, **kwargs))
    params = write_params(tmp_path, "no_wandb")
    result = doco("train", "--params", params, "--set", "tracker=wandb")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"doco: error: {params}: tracker: wandb needs the wandb package (pip install -e '.[tracking]' "
        "(wandb==0.31.0)); or use none or tensorboard."]
    assert not (tmp_path / "outputs").exists()  # refused before any work


@pytest.mark.slow
def test_a_killed_and_resumed_run_logs_each_iteration_once(tmp_path):
    """The killed process logged iteration 3 after its step-2 checkpoint; the resumed one logs it again, and
    TensorBoard shows the resumed run's."""
    params = write_params(tmp_path, "resumed", iterations=6, warmup_iterations=2, checkpoint_every=2,
                          tracker="tensorboard")
    assert train_with_fault(params, "step", "kill", 4).returncode == -9
    folder = tmp_path / "outputs" / "resumed" / "doco" / "tracking" / "doco-lab"
    assert sorted(scalars(events(folder), "d_loss")) == [1, 2, 3]
    assert train(params).returncode == 0
    log = pd.read_csv(tmp_path / "outputs" / "resumed" / "doco" / "training_log.csv")
    logged = {step: pytest.approx(value, rel=1e-6) for step, value in zip(log.step, log.seconds)}
    assert scalars(events(folder), "seconds") == logged

    # Readers take event files in the order of their names, which start with the second a writer opened; the
    # same second, or a clock set back, puts the resumed process's file first. The folder reads the same.
    killed, resumed = sorted(folder.glob("*tfevents*"))
    later = f"events.out.tfevents.{int(resumed.name.split('.')[3]) + 1:010d}.killed"
    killed.rename(folder / later)
    assert scalars(events(folder), "seconds") == logged
