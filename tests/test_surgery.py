import pytest
import torch

from doco_lib.methods.surgery import concept_preserving_gradient, restricted_gradient


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def eq9(g_u, g_r, lam):
    """Eq. 9 on flat vectors, written out."""
    dot = g_u @ g_r
    return g_u if dot >= 0 else g_u - lam * dot / (g_r @ g_r) * g_r


def random_pair(seed, shapes=((5,), (3, 4), (2, 2, 3))):
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes],
            [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes])


@pytest.mark.parametrize("seed", range(20))
def test_result_never_conflicts_with_the_retaining_gradient(seed):
    g_u, g_r = random_pair(seed)
    g, _ = concept_preserving_gradient(g_u, g_r, lam=1.0)
    assert flat(g) @ flat(g_r) >= -1e-6 * flat(g).norm() * flat(g_r).norm()


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_matches_eq9_and_works_across_tensors_as_on_their_concatenation(seed, lam):
    g_u, g_r = random_pair(seed)
    g, stats = concept_preserving_gradient(g_u, g_r, lam=lam, scope="global")
    expected = eq9(flat(g_u), flat(g_r), lam)
    assert torch.allclose(flat(g), expected, atol=1e-12)
    concatenated, _ = concept_preserving_gradient([flat(g_u)], [flat(g_r)], lam=lam)
    assert torch.allclose(flat(g), concatenated[0], atol=1e-12)
    assert stats.fired.item() == float(flat(g_u) @ flat(g_r) < 0)


def test_no_conflict_leaves_the_unlearning_gradient_unchanged():
    g_u = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    g_r = [torch.tensor([1.0, 0.0]), torch.tensor([[1.0]])]
    g, stats = concept_preserving_gradient(g_u, g_r)
    assert all(torch.equal(a, b) for a, b in zip(g, g_u))
    assert stats.fired.item() == 0.0


def test_per_tensor_scope_applies_the_rule_to_each_tensor():
    g_u, g_r = random_pair(3)
    g, _ = concept_preserving_gradient(g_u, g_r, lam=1.0, scope="per_tensor")
    for a, u, r in zip(g, g_u, g_r):
        assert torch.allclose(a.reshape(-1), eq9(u.reshape(-1), r.reshape(-1), 1.0), atol=1e-12)


def test_official_projection_hand_computed_per_tensor():
    # Tensor 1 conflicts: |G_u| = 5, G_r = (-1, 0), cos = -3/5 → G_u − λ·cos·G_r/|G_r| = (3 − 0.6, 4).
    # The exact projection would give (0, 4): the code's update equals it only when |G_u| = 1.
    # Tensor 2 does not conflict and is left alone.
    g_u = [torch.tensor([3.0, 4.0]), torch.tensor([1.0, 1.0])]
    g_r = [torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.0])]
    g, stats = concept_preserving_gradient(g_u, g_r, lam=1.0, scope="per_tensor", projection="official")
    assert torch.allclose(g[0], torch.tensor([2.4, 4.0]))
    assert torch.equal(g[1], g_u[1])
    assert stats.fired.item() == 0.5
    exact, _ = concept_preserving_gradient(g_u, g_r, lam=1.0, scope="per_tensor", projection="exact")
    assert torch.allclose(exact[0], torch.tensor([0.0, 4.0]))
    unit = [torch.tensor([0.6, 0.8])]
    official, _ = concept_preserving_gradient(unit, g_r[:1], scope="per_tensor", projection="official")
    exact, _ = concept_preserving_gradient(unit, g_r[:1], scope="per_tensor", projection="exact")
    assert torch.allclose(official[0], exact[0])


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_degenerate_retaining_gradient_is_handled(bad):
    g_u = [torch.tensor([1.0, -1.0])]
    g_r = [torch.full((2,), bad)]
    g, stats = concept_preserving_gradient(g_u, g_r)
    assert torch.equal(g[0], g_u[0])
    assert stats.fired.item() == 0.0


def test_invalid_settings_are_named():
    with pytest.raises(ValueError, match="surgery_scope"):
        concept_preserving_gradient([torch.ones(1)], [torch.ones(1)], scope="layer")
    with pytest.raises(ValueError, match="surgery_lambda"):
        concept_preserving_gradient([torch.ones(1)], [torch.ones(1)], lam=-1)


def test_restricted_gradient_hand_computed_and_without_conflict():
    # G_u = (1, 0), G_r = (-1, 1): G_u·G_r = -1 → G_u' = (0.5, 0.5), G_r' = (0, 1); α = 1 → (0.5, 1.5).
    update, _ = restricted_gradient([torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])], alpha=1.0)
    assert torch.allclose(update[0], torch.tensor([0.5, 1.5]))
    g_u, g_r = [torch.tensor([1.0, 2.0])], [torch.tensor([0.5, 0.5])]
    update, _ = restricted_gradient(g_u, g_r, alpha=0.3)
    assert torch.allclose(update[0], g_u[0] + 0.3 * g_r[0])
    # Unlike eq. 9, RGD also projects G_r and adds it: the two differ whenever there is a conflict.
    cp, _ = concept_preserving_gradient([torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])])
    assert not torch.allclose(cp[0], torch.tensor([0.5, 1.5]))


def test_restricted_gradient_equals_both_projections_combined():
    """The one-pass combination equals G_u' + α G_r' built from eq. 9 both ways, with and without conflict."""
    generator = torch.Generator().manual_seed(0)
    for sign in (-1.0, 1.0):
        g_u = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
        g_r = [sign * g_u[0] + 0.1 * torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
        u_adjusted, expected_stats = concept_preserving_gradient(g_u, g_r)
        r_adjusted, _ = concept_preserving_gradient(g_r, g_u)
        update, stats = restricted_gradient(g_u, g_r, alpha=1.6)
        for got, u, r in zip(update, u_adjusted, r_adjusted):
            assert torch.allclose(got, u + 1.6 * r, atol=1e-6)
        assert stats.fired == expected_stats.fired and torch.isclose(stats.cosine, expected_stats.cosine)
