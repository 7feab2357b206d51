"""SPM (doco_lib/methods/spm.py): rank-1 adapters on the layers the code adapts, stored on their own, loaded into a
pipeline and unloaded to the original weights bit for bit, merged as the code merges them; facilitated transport;
the code's learning-rate schedule and anchor batch; a toy run through `doco train`; the SD-v1.4-shaped path."""

import pytest
import torch
from safetensors import safe_open
from tiny_training import ERASURE_REGRESSION_THRESHOLD, judged_shape_rates, write_params

from doco_lib import config
from doco_lib.app import cli
from doco_lib.methods import spm
from doco_lib.models import load_pipeline
from doco_lib.sampling import generate
from doco_lib.toy import sd_shaped


def test_sd14_gets_192_rank_one_adapters_with_423936_parameters():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # SD v1.4's UNet at full size, without its weights
        unet = UNet2DConditionModel(**sd_shaped.SD14_UNET)
    network = spm.SpmNetwork(unet, rank=1)
    layers = network.layers()
    assert len(layers) == 192 and sum(p.numel() for p in network.parameters()) == 423_936
    assert all(layer.lora_down.weight.shape[0] == 1 and layer.lora_up.weight.shape[1] == 1 for layer in layers.values())
    within_block = {path.split(".attentions.")[1].split(".", 1)[1] for path in spm.adapted_modules(unet)}
    block = "transformer_blocks.0."
    assert within_block == {"proj_in", "proj_out", *(f"{block}attn{i}.{p}" for i in (1, 2)
                                                      for p in ("to_q", "to_k", "to_v", "to_out.0")),
                            f"{block}ff.net.0.proj", f"{block}ff.net.2"}


def _toy_inputs():
    pipe = load_pipeline("toy", "cpu")
    g = torch.Generator().manual_seed(0)
    return pipe, torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 100]), torch.randn(2, 77, 32, generator=g)


def _trained_looking(network: spm.SpmNetwork) -> spm.SpmNetwork:
    """Non-zero up factors, as after training (they start at zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in network.layers().values():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.1)
    return network


@torch.no_grad()
def test_at_init_and_at_multiplier_zero_the_unet_is_unchanged_bit_for_bit():
    pipe, x, t, c = _toy_inputs()
    original = pipe.unet(x, t, encoder_hidden_states=c).sample
    network = spm.SpmNetwork(pipe.unet).attach()
    assert torch.equal(pipe.unet(x, t, encoder_hidden_states=c).sample, original)  # U = 0
    _trained_looking(network)
    assert not torch.allclose(pipe.unet(x, t, encoder_hidden_states=c).sample, original)
    with network.strength(0.0):
        assert torch.equal(pipe.unet(x, t, encoder_hidden_states=c).sample, original)


@torch.no_grad()
def test_the_adapter_is_stored_alone_loads_into_a_pipeline_and_unloads_bit_for_bit(tmp_path):
    pipe, x, t, c = _toy_inputs()
    path = tmp_path / spm.ADAPTER_FILE
    _trained_looking(spm.SpmNetwork(pipe.unet)).save(path, {"prompts": "star"})
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                        for k in keys)
    assert metadata["prompts"] == "star" and metadata["rank"] == "1" and metadata["alpha"] == "1.0"
    assert path.stat().st_size < 0.05 * sum(p.numel() * 4 for p in pipe.unet.parameters())

    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    original = pipe.unet(x, t, encoder_hidden_states=c).sample
    network = spm.SpmNetwork.from_file(path, pipe.unet).attach()
    hooked = pipe.unet(x, t, encoder_hidden_states=c).sample
    assert not torch.allclose(hooked, original)
    with network.merged(1.0):  # W + (α/r) U D: what export writes, as the code's merge_spm.py
        assert not all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())
        assert torch.allclose(pipe.unet(x, t, encoder_hidden_states=c).sample, hooked, atol=1e-4)
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())
    network.detach()
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())
    assert torch.equal(pipe.unet(x, t, encoder_hidden_states=c).sample, original)

    for other in ("toy-wide", sd_shaped.make_sd14_pipeline("tiny")):  # other widths; other blocks
        unet = (load_pipeline(other, "cpu") if isinstance(other, str) else other).unet
        with pytest.raises(ValueError, match="fit no layer of this UNet"):
            spm.SpmNetwork.from_file(path, unet)


def test_facilitated_transport_scales_the_adapter_down_for_an_unrelated_prompt():
    pipe = load_pipeline("toy", "cpu")
    network = _trained_looking(spm.SpmNetwork(pipe.unet)).attach()
    named, unrelated = "a red star on a dotted background", "a photo of a circle"
    assert spm.transport_strength(pipe, named, ["star"]) == 1.0  # every token of "star" is in the prompt
    strength = spm.transport_strength(pipe, unrelated, ["star"])
    assert 0 < strength < 0.9
    assert spm.transport_multiplier(strength) == pytest.approx(strength ** 2)  # the code scales U and D by s
    assert spm.transport_multiplier(strength, "linear") == strength

    prompts, seeds = [unrelated, named, unrelated], [0, 1, 2]
    drawn = spm.generate_with_transport(pipe, network, prompts, seeds, 2, 5.0, ["star"])
    with network.strength(strength ** 2):
        scaled = generate(pipe, [unrelated] * 2, [0, 2], 2, 5.0)
    full = generate(pipe, [unrelated, named], [0, 1], 2, 5.0)
    assert torch.allclose(drawn[[0, 2]], scaled, atol=1e-5) and torch.allclose(drawn[1], full[1], atol=1e-5)
    assert not torch.allclose(drawn[0], full[0], atol=1e-3)
    assert network.multiplier == 1.0


def test_learning_rate_schedule_is_diffusers_cosine_with_hard_restarts():
    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, 50, 300, num_cycles=3)
    expected = []
    for _ in range(300):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [spm.cosine_restarts_factor(step, 50, 300, 3) for step in range(300)] == pytest.approx(expected)
    assert spm.cosine_restarts_factor(10, 0, 300, 0) == 1.0


# The schema's toy defaults for SPM, lr and batch (params/toy_world.yaml's) over the tiny run's anchor-image counts
# (tests/tiny_training.py): as `doco train --params params/toy_world.yaml --set method=spm` trains.
TOY_RUN = dict(iterations=400, warmup_iterations=0, checkpoint_every=100, lr=3e-4, batch_size=8)
# Measured through this test on seeds 0-2 (8 prompts per shape at 25 steps, before → after): star 100 → 37.5, 50,
# 25% (seed 1 sits at the threshold of half the original's rate); circle, heart and pentagon 100 → 100% on each.
SPM_MIN_CIRCLE_RATE = 0.75  # circle, neither erased nor anchored: at most 2 of 8 lost


@pytest.mark.slow
def test_spm_through_doco_train_erases_star_and_keeps_circle_in_the_toy_world(tmp_path):
    params = write_params(tmp_path, "spm", method="spm", **TOY_RUN)
    assert cli.main(["train", "--params", str(params), "--quiet"]) == 0
    run = tmp_path / "outputs" / "spm" / "spm"
    assert (run / spm.ADAPTER_FILE).is_file() and not (run / "delta.safetensors").exists()

    rates = judged_shape_rates(run / "unet", ["star", "circle"])
    (before, after), (circle_before, circle_after) = rates["star"], rates["circle"]
    assert before >= 0.75 and after <= ERASURE_REGRESSION_THRESHOLD * before, rates
    assert circle_before >= 0.75 and circle_after >= SPM_MIN_CIRCLE_RATE, rates


def test_the_sd14_spm_file_trains_on_the_sd14_shaped_pipeline(sd_hub, repo_root, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from diffusers import UNet2DConditionModel

    from doco_lib.studies import runs

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(sd_hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    params = config.load_params(repo_root / "params" / "concepts" / "sd14_snoopy_spm.yaml", {
        "device": "cpu", "output_root": str(tmp_path), "num_inference_steps": 1, "iterations": 2,
        "spm_denoising_steps": 2, "spm_lr_warmup": 0, "gradient_checkpointing": False})
    assert params["method"] == "spm" and params["spm_rank"] == 1 and params["spm_anchor_strength"] == 1000
    pipe = runs.starting_pipeline(params)
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    runs.prepare_anchors(params, pipe)
    trainer = runs.make_trainer(params, pipe)

    anchors = trainer._anchors()  # the code's batch: "", a_3, "", a_4
    empty, norm = trainer.empty_embedding[0].cpu(), trainer.concept.flatten().norm().item()
    assert len(anchors) == 4 and torch.equal(anchors[0], empty) and torch.equal(anchors[2], empty)
    assert all(0.8 * norm <= anchors[i].norm() <= 1.2 * norm for i in (1, 3))

    history = trainer.run(progress=False)
    assert len(history) == 2 and history[-1]["g_loss"] > 0
    assert all(torch.equal(p, base[n]) for n, p in pipe.unet.named_parameters())  # the UNet itself stays frozen
    paths = trainer.export(base_model=params["model"])
    network = spm.SpmNetwork.from_file(paths["adapter"], pipe.unet)
    assert len(network.layers()) == 192 and spm.read_metadata(paths["adapter"])["prompts"] == "Snoopy"
    merged = dict(UNet2DConditionModel.from_pretrained(paths["unet"]).named_parameters())
    changed = {n for n, p in merged.items() if not torch.equal(p, base[n])}
    assert changed and changed <= {f"{path}.weight" for path in spm.adapted_modules(pipe.unet)}
