"""UCE (doco_lib/methods/uce.py): the closed form against a hand computation and the properties of the ridge
objective it solves; the code's text rows; a toy run through `doco train`; the SD-v1.4-shaped path."""

import torch
from safetensors.torch import load_file
from tiny_training import ERASURE_REGRESSION_THRESHOLD, judged_shape_rates, write_params

from doco_lib import config
from doco_lib.app import cli
from doco_lib.methods import uce
from doco_lib.models import load_pipeline
from doco_lib.toy import sd_shaped


def test_closed_form_matches_the_hand_computed_2x2_case():
    w0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    c_e, c_a = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # No preserved rows, λ = s_e = 1: v* = W0 c_a = (2, 4); left = W0 + v* c_eᵀ = [[3, 2], [7, 4]];
    # right = I + c_e c_eᵀ = diag(2, 1); W' = left · diag(1/2, 1).
    w = uce.closed_form(w0, c_e, c_a, torch.zeros(0, 2), lam=1.0, erase_scale=1.0, preserve_scale=1.0)
    assert torch.allclose(w, torch.tensor([[1.5, 2.0], [3.5, 4.0]], dtype=torch.float64), atol=1e-12)
    # With c_p = (1, 1), s_p = 1: left += W0 c_p c_pᵀ = [[3, 3], [7, 7]] → [[6, 5], [14, 11]];
    # right = [[3, 1], [1, 2]], its inverse [[2, −1], [−1, 3]] / 5, so W' = [[7, 9], [17, 19]] / 5.
    w = uce.closed_form(w0, c_e, c_a, torch.tensor([[1.0, 1.0]]), lam=1.0, erase_scale=1.0, preserve_scale=1.0)
    assert torch.allclose(w, torch.tensor([[1.4, 1.8], [3.4, 3.8]], dtype=torch.float64), atol=1e-12)


def _random_case(seed=0, d_in=12, d_out=7, n_e=3, n_p=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
            *(torch.randn(n, d_in, generator=g, dtype=torch.float64) for n in (n_e, n_e, n_p)))


def test_no_edit_and_orthogonal_inputs_keep_w0():
    w0, c_e, c_a, c_p = _random_case()
    assert torch.allclose(uce.closed_form(w0, c_e[:0], c_a[:0], c_p[:0], 0.5, 1.0, 1.0), w0, atol=1e-12)
    w = uce.closed_form(w0, c_e, c_a, c_p, 0.5, 1.0, 0.3)
    basis = torch.linalg.svd(torch.cat([c_e, c_p]), full_matrices=True).Vh[len(c_e) + len(c_p):]  # ⟂ every c
    assert not torch.allclose(w, w0)
    assert torch.allclose(basis @ w.T, basis @ w0.T, atol=1e-10)


def test_the_edit_zeroes_the_gradient_of_the_ridge_objective():
    w0, c_e, c_a, c_p = _random_case(1)
    lam, s_e, s_p = 0.5, 1.3, 0.2
    v_star = c_a @ w0.T

    def objective(w):
        return (lam * (w - w0).square().sum() + s_e * (c_e @ w.T - v_star).square().sum()
                + s_p * (c_p @ (w - w0).T).square().sum())

    edited = uce.closed_form(w0, c_e, c_a, c_p, lam, s_e, s_p).requires_grad_(True)
    start = w0.clone().requires_grad_(True)
    grad_edited, = torch.autograd.grad(objective(edited), edited)
    grad_start, = torch.autograd.grad(objective(start), start)
    assert grad_edited.norm() < 1e-10 * grad_start.norm()


def test_residual_shrinks_with_the_erase_scale_and_drift_with_the_preserve_scale():
    w0, c_e, c_a, c_p = _random_case(2)
    v_star = c_a @ w0.T
    residuals = [(c_e @ uce.closed_form(w0, c_e, c_a, c_p, 0.5, s_e, 1.0).T - v_star).norm().item()
                 for s_e in (0.1, 1.0, 10.0, 100.0)]
    drifts = [(c_p @ (uce.closed_form(w0, c_e, c_a, c_p, 0.5, 1.0, s_p) - w0).T).norm().item()
              for s_p in (0.1, 1.0, 10.0, 100.0)]
    assert residuals == sorted(residuals, reverse=True) and residuals[-1] < 0.05 * residuals[0]
    assert drifts == sorted(drifts, reverse=True) and drifts[-1] < 0.05 * drifts[0]


def test_text_rows_follow_the_code():
    pipe = load_pipeline("toy", "cpu")
    hidden, lengths = uce.encode(pipe, ["star", "", " ", "a photo of a star"])
    assert lengths == [3, 2, 2, 7]  # BOS, words, EOS: the attention mask's sum
    # 2023: "star" from its word token on, paired with "" (→ " ", BOS) from BOS on, trimmed to equal length.
    c_e, c_a, c_p = uce.edit_rows(pipe, ["star"], [""], [""], 2023)
    assert len(c_e) == len(c_a) == 76 and torch.allclose(c_e, hidden[0, 1:], atol=1e-6)
    assert torch.allclose(c_a, hidden[2, :-1], atol=1e-6) and torch.allclose(c_a[0], hidden[1, 0], atol=1e-6)  # BOS
    assert torch.allclose(c_p, hidden[1], atol=1e-6)  # all 77 rows of ""
    # 2025: the last word token's row only (index mask.sum() − 2), the anchor "" at BOS.
    c_e, c_a, c_p = uce.edit_rows(pipe, ["a photo of a star"], [""], ["star"], 2025)
    for rows, expected in ((c_e, hidden[3, 5:6]), (c_a, hidden[1, :1]), (c_p, hidden[0, 1:2])):
        assert rows.shape == (1, hidden.shape[-1]) and torch.allclose(rows, expected, atol=1e-6)


# Circle is neither erased nor preserved (the toy `uce_preserve` is triangle, square, heart, cross), yet UCE's edit of
# every K/V matrix in the toy's 32-wide text space damages it with every other shape (docs/results.md: IRA 58%). With
# the test's 8 prompts at 25 steps circle measured 50% (4 of 8) after the edit, 100% before; the same 8-prompt sets
# drawn with prompt seeds 1-4: 37.5, 75, 50, 62.5% (star 0, 37.5, 0, 12.5%); 16 prompts at 10 steps, prompt seeds
# 0-4: 50, 56, 69, 62, 56%. So circle is held to a floor that catches an edit wiping out what it does not target,
# not to "kept" (code version 2025 keeps no shape better: circle 75%, cross 0%).
UCE_MIN_CIRCLE_RATE = 0.25  # at least 2 of 8 circles


def test_uce_through_doco_train_erases_star_and_leaves_circle_above_a_floor_in_the_toy_world(tmp_path):
    params = write_params(tmp_path, "uce", method="uce")
    assert cli.main(["train", "--params", str(params), "--quiet"]) == 0
    run = tmp_path / "outputs" / "uce" / "uce"
    delta = load_file(str(run / "delta.safetensors"))
    assert len(delta) == 14 and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in delta)
    assert all(v.abs().max() > 0 for v in delta.values())
    assert len((run / "training_log.csv").read_text().splitlines()) == 2  # one edit, however many iterations

    rates = judged_shape_rates(run / "unet", ["star", "circle"])  # at the toy world's sampling (anchors: 2 steps)
    (before, after), (circle_before, circle_after) = rates["star"], rates["circle"]
    assert before >= 0.75 and after <= ERASURE_REGRESSION_THRESHOLD * before, rates
    assert circle_before >= 0.75 and circle_after >= UCE_MIN_CIRCLE_RATE, rates


def test_the_sd14_uce_file_edits_only_the_32_cross_attention_kv_matrices(sd_hub, repo_root, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from doco_lib.studies import runs

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(sd_hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    params = config.load_params(repo_root / "params" / "concepts" / "sd14_snoopy_uce.yaml", {
        "device": "cpu", "output_root": str(tmp_path), "n_anchor_images": 2, "num_inference_steps": 1,
        "mixed_precision": "no"})
    assert params["method"] == "uce" and params["model"] == sd_shaped.SD14_ID
    pipe = runs.starting_pipeline(params)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    runs.prepare_anchors(params, pipe)
    trainer = runs.make_trainer(params, pipe)
    trainer.run(progress=False)
    changed = sorted(n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n]))
    assert len(changed) == 32 and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)
    assert (trainer.export(base_model=params["model"])["unet"] / "config.json").is_file()
