"""ESD and ConAbl train on the losses their papers define: each training loss recomputed here, independently, from
UNet outputs on the same batch (the trained UNet before its update, and the original UNet loaded afresh)."""

import pytest
import torch
import torch.nn.functional as F
from tiny_training import tiny_trainer

from doco_lib.models import load_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # toy-sized kernels


@pytest.fixture(scope="module")
def original():
    """The toy pipeline as shipped: its UNet is ε* (the frozen original), its text encoder encodes ''."""
    return load_pipeline("toy", "cpu", dtype=torch.float32)


def _losses_at_each_step(trainer, monkeypatch, record: str, formula) -> list[tuple[float, float]]:
    """Run the trainer; at each step, (the loss it descends, `formula(recorded batch)`), both taken before the
    update. `record` names the trainer method whose result is the batch (its arguments are kept too)."""
    batches, pairs = [], []
    recorded, descend = getattr(trainer, record), trainer.descend

    def recording(*args):
        result = recorded(*args)
        batches.append((args, result))
        return result

    def checked(loss, logs, phase):
        with torch.no_grad():
            pairs.append((loss.item(), formula(*batches[-1]).item(), logs))
        return descend(loss, logs, phase)

    monkeypatch.setattr(trainer, record, recording)
    monkeypatch.setattr(trainer, "descend", checked)
    trainer.run(progress=False)
    assert len(pairs) == trainer.config.iterations
    return pairs


def _unet(model, x, t, embeddings):
    return model(x, t, encoder_hidden_states=embeddings).sample


def test_conabl_model_variant_pulls_the_target_to_the_frozen_anchor_prediction(tmp_path, monkeypatch, original):
    """ConAbl eq. 4 + retaining: L = ‖ε_θ(x_t, c*, t) − ε*(x_t, c, t)‖² + α ‖ε_θ(x_t, c, t) − ε‖² (mean squares)."""
    alpha = 0.5
    trainer = tiny_trainer(tmp_path, "conabl_model", method="conabl", conabl_variant="model", conabl_retain=True,
                       retain_weight=alpha, lr=1e-2)

    def formula(args, batch):
        x_t, t, noise, c, c_star = batch
        ablation = F.mse_loss(_unet(trainer.unet, x_t, t, c_star), _unet(original.unet, x_t, t, c))
        return ablation + alpha * F.mse_loss(_unet(trainer.unet, x_t, t, c), noise)

    pairs = _losses_at_each_step(trainer, monkeypatch, "_batch", formula)
    for loss, expected, logs in pairs:
        assert loss == pytest.approx(expected, rel=1e-4) and loss > 1e-4
        assert logs["g_loss"] + alpha * logs["retain_loss"] == pytest.approx(loss, rel=1e-5)
    # The second step's trained UNet has moved: its anchor prediction is no longer the frozen one, so a target
    # taken from the trained UNet (or from c* in the frozen one) would have failed the formula above.
    assert any(not torch.equal(p, trainer.original[n]) for n, p in trainer.params.items())


def test_conabl_noise_variant_pulls_the_target_to_the_noise(tmp_path, monkeypatch):
    """ConAbl's noise variant without retaining: L = ‖ε_θ(x_t, c*, t) − ε‖²."""
    trainer = tiny_trainer(tmp_path, "conabl_noise", method="conabl", conabl_variant="noise", conabl_retain=False,
                       lr=1e-2)

    def formula(args, batch):
        x_t, t, noise, c, c_star = batch
        return F.mse_loss(_unet(trainer.unet, x_t, t, c_star), noise)

    for loss, expected, logs in _losses_at_each_step(trainer, monkeypatch, "_batch", formula):
        assert loss == pytest.approx(expected, rel=1e-4) and logs["g_loss"] == pytest.approx(loss, rel=1e-6)
    assert trainer.frozen_unet is None and trainer.starting_weights is None  # the noise variant reads no original


def test_esd_target_is_the_frozen_guidance_pushed_away_from_the_concept(tmp_path, monkeypatch, original):
    """ESD: L = ‖ε_θ(x_t, c*, t) − [ε*(x_t, t) − η (ε*(x_t, c*, t) − ε*(x_t, t))]‖², x_t partially denoised with c*."""
    eta, steps = 2.0, 4
    trainer = tiny_trainer(tmp_path, "esd", method="esd", trainable="cross_attention", esd_eta=eta, esd_steps=steps,
                       lr=1e-2)
    tokens = original.tokenizer([""], padding="max_length", max_length=original.tokenizer.model_max_length,
                                return_tensors="pt").input_ids
    with torch.no_grad():
        empty = original.text_encoder(tokens)[0]
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(original.scheduler.config)
    ddim.set_timesteps(steps)

    def formula(args, result):
        (c_star,), (x_t, t) = args, result
        assert len(set(t.tolist())) == 1 and t[0] in ddim.timesteps  # one DDIM step of the partial denoising
        unconditional = _unet(original.unet, x_t, t, empty.expand_as(c_star))
        target = unconditional - eta * (_unet(original.unet, x_t, t, c_star) - unconditional)
        return F.mse_loss(_unet(trainer.unet, x_t, t, c_star), target)

    for loss, expected, logs in _losses_at_each_step(trainer, monkeypatch, "_partial_denoise", formula):
        assert loss == pytest.approx(expected, rel=1e-4) and loss > 1e-4
        assert logs["g_loss"] == pytest.approx(loss, rel=1e-6)
    assert any(not torch.equal(p, trainer.original[n]) for n, p in trainer.params.items())


@pytest.mark.parametrize("method, settings", [
    ("esd", {}), ("conabl", {}), ("doco", {"fidelity": "official"}),  # the official preset's D reads the original
    ("doco", {"adv_prompt_every": 2, "adv_prompt_steps": 2, "retain_mode": "cp"})])
def test_the_shared_original_trains_as_a_separate_float32_copy_does(method, settings, tmp_path):
    """`frozen_dtype: shared` keeps no second denoiser, only the trained parameters' starting values, and swaps them in
    per call: every method that reads the original (ESD, ConAbl, DoCo's frozen real source, the adversarial prompts'
    reference) ends with the same weights, bit for bit, as with a separate float32 copy; after training the shared
    original's output is the original UNet's, not the trained one's."""
    common = {"method": method, "iterations": 4, "warmup_iterations": 1 if method == "doco" else 0, **settings}
    shared = tiny_trainer(tmp_path, "shared", frozen_dtype="shared", **common)
    copied = tiny_trainer(tmp_path, "copied", frozen_dtype="float32", **common)
    assert shared.frozen_unet is None and set(shared.starting_weights) == set(shared.params)
    assert copied.frozen_unet is not None and copied.starting_weights is None
    shared.run(progress=False)
    copied.run(progress=False)
    assert all(torch.equal(p, copied.params[name]) for name, p in shared.params.items())
    assert any(not torch.equal(p, shared.starting_weights[name]) for name, p in shared.params.items())

    x_t = torch.randn(2, *shared.anchors.latent_mean.shape[1:], generator=torch.Generator().manual_seed(0))
    t, c = torch.tensor([500, 100]), shared.anchor_embeddings[:1].expand(2, -1, -1)
    original_unet = load_pipeline("toy", "cpu", dtype=torch.float32).unet
    assert torch.equal(shared.original_output(x_t, t, c), copied.original_output(x_t, t, c))
    assert torch.allclose(shared.original_output(x_t, t, c), _unet(original_unet, x_t, t, c), atol=1e-5)
    shared.unet.train()
    shared.original_output(x_t, t, c)
    assert shared.unet.training  # the call put back the mode it found
