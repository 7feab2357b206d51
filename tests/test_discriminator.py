import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from doco_lib.methods.discriminator import GANLoss, NLayerDiscriminator, SyncedBatchNorm2d, check_discriminator_fits


def test_paper_discriminator_on_sd_latents():
    disc = NLayerDiscriminator(in_channels=4)  # paper: 5 convolutions, 4×4, stride 2
    assert sum(isinstance(m, torch.nn.Conv2d) for m in disc.modules()) == 5
    out = disc(torch.randn(2, 4, 64, 64))
    assert out.shape == (2, 1, 2, 2) and disc.output_size(64) == 2


def test_official_discriminator_layout_on_sd_latents():
    disc = NLayerDiscriminator(in_channels=4, base_channels=64, n_layers=5, norm="batch", final_stride=1)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(4, 64), (64, 128), (128, 256), (256, 512), (512, 1)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules()) == 3
    assert disc(torch.randn(2, 4, 64, 64)).shape == (2, 1, 3, 3)


def test_toy_latents_fit_three_layers_but_not_five():
    disc = NLayerDiscriminator(in_channels=4, n_layers=3, final_stride=1)
    assert disc(torch.randn(3, 4, 8, 8)).shape == (3, 1, 1, 1)
    check_discriminator_fits(3, 1, 8)
    with pytest.raises(ValueError, match="too deep for 8×8"):
        check_discriminator_fits(5, 2, 8)


@pytest.mark.parametrize("norm, layer", [("batch", torch.nn.BatchNorm2d), ("instance", torch.nn.InstanceNorm2d),
                                         ("none", None)])
def test_norms_and_no_sigmoid(norm, layer):
    torch.manual_seed(0)
    disc = NLayerDiscriminator(4, 8, 3, norm, 1)
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in disc.modules())
    norms = [m for m in disc.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d))]
    assert [type(m) for m in norms] == ([layer] if layer else [])  # 3 layers: one normalised hidden layer
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    small, large = disc(50 * x), disc(100 * x)
    assert (small < 0).any(), "logits, not probabilities: negative for 'fake'"
    if layer is None:
        # Convolutions and LeakyReLU are positively homogeneous: without normalisation the logits grow with the
        # input (twice the input, twice the logits, up to the biases; measured within 0.06 of 2×, |logits| up to 5).
        assert (large - small).abs().max() > 1
        torch.testing.assert_close(large, 2 * small, rtol=0.05, atol=0.1)
    else:
        # Normalised after the first convolution: the input's scale drops out (measured: within 1e-3).
        torch.testing.assert_close(large, small, rtol=0, atol=1e-2)


@pytest.fixture
def alone_in_a_process_group(tmp_path):
    """A gloo process group of this process alone (tests/test_multiprocess.py launches two)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_synced_batch_norm_of_one_process_is_batch_norm(alone_in_a_process_group):
    torch.manual_seed(0)
    plain = NLayerDiscriminator(4, 8, 3, "batch", 1)
    synced = NLayerDiscriminator(4, 8, 3, "batch", 1, sync_batch_norm=True)
    assert sum(isinstance(m, SyncedBatchNorm2d) for m in synced.modules()) == 1
    synced.load_state_dict(plain.state_dict())  # the same keys: checkpoints and exports read alike
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):  # two training passes: the running statistics' momentum and unbiased variance
        x = 3 * torch.randn(3, 4, 16, 16, generator=generator) + 1
        outputs = [d(x) for d in (plain, synced)]
        torch.testing.assert_close(outputs[1], outputs[0])
        # Gradients of every weight, those before the BatchNorm layer through its statistics' backward pass.
        plain_grads, synced_grads = (torch.autograd.grad(out.square().mean(), list(d.parameters()))
                                     for out, d in zip(outputs, (plain, synced)))
        for a, b in zip(plain_grads, synced_grads):
            torch.testing.assert_close(b, a)
    state = plain.state_dict()
    assert state["model.3.num_batches_tracked"] == 2
    for name, value in synced.state_dict().items():
        torch.testing.assert_close(value, state[name], msg=lambda m, name=name: f"{name}: {m}")
    plain.eval(), synced.eval()
    torch.testing.assert_close(synced(x), plain(x))


def test_gan_losses():
    logits = torch.tensor([[2.0, -1.0]])
    assert torch.allclose(GANLoss("vanilla")(logits, True), F.binary_cross_entropy_with_logits(logits, torch.ones(1, 2)))
    assert torch.allclose(GANLoss("vanilla")(logits, False), F.binary_cross_entropy_with_logits(logits, torch.zeros(1, 2)))
    assert torch.allclose(GANLoss("lsgan")(logits, True), ((logits - 1) ** 2).mean())
    with pytest.raises(ValueError, match="gan_mode"):
        GANLoss("wgan")
