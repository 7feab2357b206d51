"""The explorer of notebook 06, headless: widgets, generation in a thread, step slider, delta toggles, cancel.

Two small "erased" runs are written in the layout `ErasureTrainer.export` produces (unet/, delta.safetensors,
erasure.json, and for DoCo discriminator.safetensors), with perturbed cross-attention K/V instead of training.
"""

import copy
import io
import json
from dataclasses import asdict

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from doco_lib.app import explorer as ex
from doco_lib.methods.discriminator import NLayerDiscriminator
from doco_lib.methods.harness import TrainingConfig, select_trainable
from doco_lib.models import load_pipeline
from doco_lib.sampling import generate

STEPS = 4
PROMPT = "a photo of a star"


def export_fake_run(base_unet, folder, method, target, seed, with_discriminator):
    """What `ErasureTrainer.export` writes, for a UNet whose K/V were perturbed instead of trained."""
    unet = copy.deepcopy(base_unet)
    generator = torch.Generator().manual_seed(seed)
    delta = {}
    with torch.no_grad():
        for name, p in select_trainable(unet, "cross_attention_kv").items():
            delta[name] = 0.5 * p.std() * torch.randn(p.shape, generator=generator)
            p.add_(delta[name])
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    cfg = TrainingConfig(method=method, disc_layers=3, disc_channels=8, disc_final_stride=1, disc_input="x0")
    metadata = {"method": method, "base_model": "toy", "trainable": cfg.trainable, "target": target,
                "anchor": "pentagon", "kind": "instance", "config": json.dumps(asdict(cfg))}
    save_file(delta, str(folder / "delta.safetensors"), metadata=metadata)
    (folder / "erasure.json").write_text(json.dumps(metadata))
    if with_discriminator:
        torch.manual_seed(seed)
        disc = NLayerDiscriminator(4, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm, cfg.disc_final_stride)
        save_file(disc.state_dict(), str(folder / "discriminator.safetensors"))


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("toy", "cpu")


@pytest.fixture(scope="module")
def output_root(tmp_path_factory, pipe):
    root = tmp_path_factory.mktemp("outputs")
    export_fake_run(pipe.unet, root / "a" / "doco", "doco", "star", seed=1, with_discriminator=True)
    export_fake_run(pipe.unet, root / "b" / "esd", "esd", "heart", seed=2, with_discriminator=False)
    export_fake_run(pipe.unet, root / "a" / "ablation" / "conabl_s0" / "conabl", "conabl", "star", seed=3,
                    with_discriminator=False)  # listed, but not one of run a's own models
    (root / "c" / "doco").mkdir(parents=True)  # an interrupted run: no unet/, so not listed
    (root / "c" / "doco" / "erasure.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def explorer(output_root, pipe, monkeypatch_module):
    monkeypatch_module.setattr("doco_lib.app.explorer.load_pipeline", lambda model, device: pipe)  # load once
    explorer = ex.Explorer(str(output_root), "toy", "cpu", run_name="a", prompt=PROMPT, seed=3, steps=STEPS)
    explorer.erased.value = ("a/doco", "b/esd")
    return explorer


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def run(explorer):
    explorer.generate_button.click()
    explorer.wait(timeout=120)
    assert not explorer.running
    assert explorer.error is None, explorer.status.value


def shown(widget, size):
    """The pixels an Image widget shows, at the model's resolution (the widget enlarges by an integer factor)."""
    picture = Image.open(io.BytesIO(bytes(widget.value))).convert("RGB").resize((size, size), Image.NEAREST)
    return torch.tensor(list(picture.getdata()), dtype=torch.float32)


@pytest.mark.parametrize("guidance", [1.0, 7.5])  # at ≤ 1 the pipeline skips the unconditional pass
def test_denoise_ends_on_the_pipelines_image(pipe, guidance):
    trace = ex.denoise(pipe, pipe.unet, ex.encode_prompt(pipe, PROMPT), 5, STEPS, guidance)
    assert torch.allclose(trace.image, generate(pipe, [PROMPT], [5], STEPS, guidance)[0], atol=1e-6)
    assert trace.x0_latents.shape == trace.text_eps.shape == (STEPS, 4, 8, 8) and len(trace.timesteps) == STEPS


def test_finds_exported_runs_and_preselects_the_run_name(output_root):
    runs = ex.find_erased_runs(output_root)
    assert [run.name for run in runs] == ["a/ablation/conabl_s0/conabl", "a/doco", "b/esd"]
    explorer = ex.Explorer(str(output_root), "toy", "cpu", run_name="a")
    assert explorer.erased.value == ("a/doco",)
    assert [label for label, _ in explorer.erased.options] == [run.label for run in runs]
    assert list(explorer.toggles) == ["a/doco"] and explorer.toggles["a/doco"].value
    assert explorer.base_model.options == ("toy",)


def test_generate_shows_every_model_on_the_same_noise(explorer, pipe):
    run(explorer)
    labels = list(explorer.results)
    assert labels == ["original", "a/doco", "b/esd", "base + deltas (star, heart)"]
    original = explorer.results["original"].image
    assert torch.allclose(original, generate(pipe, [PROMPT], [3], STEPS, 5.0)[0], atol=1e-6)  # = the pipeline's
    for label in labels[1:]:
        assert (explorer.results[label].image - original).abs().mean() > 0.01, label
    assert explorer.progress.value == explorer.progress.max == STEPS * 4
    assert "done" in explorer.status.value and not explorer.generate_button.disabled
    images = [child.children[1] for child in explorer.columns_box.children]
    assert len(images) == 4 and all(bytes(image.value[:4]) == b"\x89PNG" for image in images)


def test_step_slider_shows_the_predicted_x0_of_each_step(explorer):
    if not explorer.results:
        run(explorer)
    step_image = explorer.columns_box.children[0].children[3]
    final_image = explorer.results["original"].image
    final_size = final_image.shape[-1]
    final = final_image.permute(1, 2, 0).reshape(-1, 3) * 255
    explorer.step_slider.value = 1
    first = shown(step_image, final_size)
    explorer.step_slider.value = STEPS
    last = shown(step_image, final_size)
    # Early predictions are blurry guesses; the last one is (almost) the final image.
    assert (last - final).abs().mean() < 0.5 * (first - final).abs().mean()
    probabilities = explorer.probabilities["a/doco"]  # b/esd saved no discriminator
    assert list(probabilities) == list(explorer.results)
    assert all(p.shape == (STEPS,) and ((0 <= p) & (p <= 1)).all() for p in probabilities.values())
    assert f"step {STEPS}" in explorer.discriminator_panel.value and "D of a/doco" in explorer.discriminator_panel.value


def test_delta_toggles_add_and_remove_an_erasure(explorer):
    if not explorer.results:
        run(explorer)
    erased_star = explorer.results["a/doco"].image
    explorer.toggles["b/esd"].value = False  # starts a regeneration of the changed column
    explorer.wait(timeout=120)
    assert explorer.error is None
    assert "base + deltas (star)" in explorer.results
    assert torch.allclose(explorer.results["base + deltas (star)"].image, erased_star, atol=1e-3)  # base + Δ = run
    explorer.toggles["a/doco"].value = False
    explorer.wait(timeout=120)
    assert torch.equal(explorer.results["base + deltas (none)"].image, explorer.results["original"].image)
    explorer.toggles["a/doco"].value = True
    explorer.toggles["b/esd"].value = True  # while the first toggle's generation runs: restarted with both
    explorer.wait(timeout=120)
    assert list(explorer.results)[-1] == "base + deltas (star, heart)"


def test_cancel_stops_a_generation(explorer):
    before = explorer.results
    explorer.seed.value = 99  # not cached
    explorer.generate()
    explorer.cancel()
    explorer.wait(timeout=120)
    assert "cancelled" in explorer.status.value
    assert explorer.results is before and explorer.progress.value < explorer.progress.max
    assert not explorer.generate_button.disabled and explorer.cancel_button.disabled
    explorer.seed.value = 3


def test_a_delta_for_another_model_is_reported_in_the_ui(explorer, output_root):
    bad = output_root / "b" / "esd" / "delta.safetensors"
    original = bad.read_bytes()
    try:
        save_file({"not.a.parameter": torch.zeros(1)}, str(bad))
        explorer.erased.value = ("b/esd",)
        explorer.generate()
        explorer.wait(timeout=120)
        assert isinstance(explorer.error, ValueError)
        assert "do not belong to this UNet" in explorer.status.value and "not.a.parameter" in explorer.status.value
    finally:
        bad.write_bytes(original)
        explorer.erased.value = ("a/doco", "b/esd")
