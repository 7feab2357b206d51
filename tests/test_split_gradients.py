"""G_u and G_r from one joint pass equal the gradients of two separate passes."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from doco_lib.methods.harness import select_trainable
from doco_lib.methods.split_gradients import SplitLinearGradients, bias_free_linears


@pytest.fixture(scope="module")
def toy_pipe():
    from doco_lib.models import load_pipeline

    return load_pipeline("toy", "cpu")


def test_split_equals_separate_passes_on_the_toy_unet(toy_pipe):
    unet = copy.deepcopy(toy_pipe.unet).requires_grad_(False)
    params = select_trainable(unet, "cross_attention_kv")
    for p in params.values():
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (6,), generator=generator)
    c = torch.randn(6, 77, unet.config.cross_attention_dim, generator=generator)
    target = torch.randn(6, 4, 8, 8, generator=generator)

    def loss_u(prediction):  # any per-row loss; a square so the split is not a plain mean
        return (prediction - target[:2]).pow(2).mean() ** 2

    def loss_r(prediction):
        return 0.3 * F.mse_loss(prediction, target[2:])

    separate_u = torch.autograd.grad(loss_u(unet(x[:2], t[:2], encoder_hidden_states=c[:2]).sample), list(params.values()))
    separate_r = torch.autograd.grad(loss_r(unet(x[2:], t[2:], encoder_hidden_states=c[2:]).sample), list(params.values()))
    splitter = SplitLinearGradients(bias_free_linears(unet, params))
    with splitter.recording():
        both = unet(x, t, encoder_hidden_states=c).sample
    g_u, g_r = splitter.gradients(loss_u(both[:2]) + loss_r(both[2:]), split=2)
    for joint, separate in ((g_u, separate_u), (g_r, separate_r)):
        for a, b in zip(joint, separate):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in g_u + g_r)


def test_other_trainable_parameters_fall_back_to_separate_passes(toy_pipe):
    unet = toy_pipe.unet
    assert bias_free_linears(unet, select_trainable(unet, "cross_attention_kv")) is not None
    assert bias_free_linears(unet, select_trainable(unet, "cross_attention")) is None  # to_out has a bias
    assert bias_free_linears(unet, select_trainable(unet, "full")) is None


@pytest.mark.parametrize("fidelity, retain_mode", [("official", "cp"), ("paper", "cp"), ("paper", "l2"),
                                                   ("official", "none")])
def test_a_doco_step_is_the_same_with_one_joint_pass(toy_pipe, tmp_path, fidelity, retain_mode):
    from doco_lib.anchors import prepare_anchor_latents
    from doco_lib.concepts import ConceptSpec
    from doco_lib.methods.harness import FIDELITY_PRESETS, DocoTrainer, TrainingConfig

    anchors = prepare_anchor_latents(toy_pipe, ["a photo of a pentagon", "a red pentagon"], 8, tmp_path / "anchors",
                                     model="toy", seed=0, steps=2, guidance=5.0, shard_size=8, save_images=False,
                                     progress=False)
    config = TrainingConfig(**{**FIDELITY_PRESETS[fidelity], "disc_layers": 3, "iterations": 3,
                               "warmup_iterations": 1, "batch_size": 4, "lr": 1e-3, "retain_mode": retain_mode})
    trainers = []
    for name in ("joint", "separate"):
        pipe = SimpleNamespace(unet=copy.deepcopy(toy_pipe.unet), scheduler=toy_pipe.scheduler,
                               tokenizer=toy_pipe.tokenizer, text_encoder=toy_pipe.text_encoder)
        trainers.append(DocoTrainer(pipe, anchors, ConceptSpec("instance", "pentagon", "star"), config,
                                    tmp_path / name, "cpu"))
    joint, separate = trainers
    separate.joint = None
    assert joint.joint is not None
    for _ in range(3):
        logs = [trainer.train_step() for trainer in trainers]
        assert logs[0].keys() == logs[1].keys()
        for key in logs[0].keys() - {"phase"}:
            assert logs[0][key] == pytest.approx(logs[1][key], rel=1e-4, abs=1e-6), key
    for name, p in joint.params.items():  # Adam turns rounding in near-zero gradients into small steps: 5% of lr
        torch.testing.assert_close(p, separate.params[name], rtol=1e-4, atol=0.05 * config.lr)
    assert any(not torch.equal(p, joint.original[name]) for name, p in joint.params.items())
