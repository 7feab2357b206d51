"""LoRA export of an erasure (doco_lib/export.py): rank selection by energy, the diffusers/PEFT file that
`pipe.load_lora_weights` loads, the kohya file's key names, and the model card written beside an export."""

import copy
import json
import re

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_training import write_params

from doco_lib import export
from doco_lib.errors import ParamsError
from doco_lib.models import load_judge, load_pipeline

KV = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_{}"
CONV = "down_blocks.0.resnets.0.conv1"
# kohya's key of a UNet module (its SD v1/v2 networks, as A1111 and ComfyUI read them): lora_unet_, then the
# diffusers module path with '_' for '.', then the tensor.
KOHYA_KEY = re.compile(r"lora_unet_(conv_in|conv_out|time_embedding_linear_[12]|"
                       r"(down_blocks_\d+|up_blocks_\d+|mid_block)_(attentions|resnets|downsamplers|upsamplers)_\d+_"
                       r"[a-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)")


def _low_rank(out: int, inner: int, singular_values: list[float], seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with orthonormal U (out × k), V (inner × k): an exact rank-k matrix of known spectrum."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(singular_values), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inner, len(singular_values), generator=generator, dtype=torch.float64))
    return (u * torch.tensor(singular_values, dtype=torch.float64)) @ v.T


def test_rank_selection_keeps_the_stated_share_of_a_changes_energy():
    s = [5.0, 4.0, 3.0, 2.0, 1.0]  # energies 25, 16, 9, 4, 1: the first 3 hold 50/55 = 90.9%, 4 hold 98.2%
    delta = _low_rank(64, 48, s)
    for energy, rank in ((0.99, 5), (0.982, 5), (0.98, 4), (0.9, 3), (0.4, 1), (1.0, 5)):
        up, down, kept = export.factorise(delta.float(), energy)
        assert (up.shape, down.shape) == ((64, rank), (rank, 48)), energy
        assert kept >= energy - 1e-6 and kept == pytest.approx(sum(x * x for x in s[:rank]) / 55, abs=1e-6)
        # Eckart–Young: what is left is exactly the dropped singular values' energy.
        residual = float(((up @ down).double() - delta).pow(2).sum())
        assert residual == pytest.approx(sum(x * x for x in s[rank:]), abs=1e-4)
    # An exact low-rank change is never given more than its rank, however much energy is asked for.
    assert export.factorise(_low_rank(40, 40, [3.0, 1e-3]).float(), 1.0)[0].shape == (40, 2)
    assert export.choose_rank(torch.tensor([3.0, 1e-3, 1e-9]), 1.0, rtol=1e-6) == 2
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ParamsError, match="lora_energy"):
            export.choose_rank(torch.tensor([1.0]), bad)


@pytest.fixture(scope="module")
def erased(tmp_path_factory):
    """The toy UNet with a known change: rank-3 K, rank-2 V, a rank-2 3×3 convolution, and a bias (no LoRA form);
    returned as (base UNet, erased UNet, folder of the erased UNet with an erasure.json beside it)."""
    base = load_pipeline("toy", "cpu", dtype=torch.float32).unet
    unet = copy.deepcopy(base)
    with torch.no_grad():
        # Ranks 3, 2, 2: kohya files with an alpha per layer would be mis-scaled by diffusers at K (see export).
        for i, (name, spectrum) in enumerate(((KV.format("k"), [0.3, 0.2, 0.1]), (KV.format("v"), [0.3, 0.1]))):
            weight = unet.get_submodule(name).weight
            weight += _low_rank(*weight.shape, spectrum, seed=i).float()
        conv = unet.get_submodule(CONV).weight
        conv += _low_rank(conv.shape[0], conv[0].numel(), [0.2, 0.1], seed=5).float().reshape(conv.shape)
        unet.get_submodule(CONV).bias += 0.01
    folder = tmp_path_factory.mktemp("erased") / "doco"
    unet.save_pretrained(folder / "unet")
    (folder / "erasure.json").write_text(json.dumps({"method": "doco", "base_model": "toy", "target": "star",
                                                     "anchor": "pentagon", "kind": "instance",
                                                     "trainable": "full", "config": json.dumps({"lr": 3e-4})}))
    return base, unet, folder


def test_linear_and_conv_changes_become_lora_layers_and_a_bias_is_reported_left_out(erased):
    base, unet, _ = erased
    decomposition = export.decompose(unet, export.unet_delta(base, unet), energy=1.0)
    layers = {layer.module: layer for layer in decomposition.layers}
    assert set(layers) == {KV.format("k"), KV.format("v"), CONV}  # unchanged tensors get no layer
    assert [layers[KV.format(x)].rank for x in "kv"] == [3, 2] and layers[CONV].rank == 2
    conv = layers[CONV]
    assert conv.kind == "conv" and conv.down.shape[1:] == unet.get_submodule(CONV).weight.shape[1:]
    assert conv.up.shape == (unet.get_submodule(CONV).weight.shape[0], 2, 1, 1)
    # The factors as the two convolutions PEFT and kohya run: A with the layer's kernel and padding, B 1×1.
    x = torch.randn(2, conv.down.shape[1], 8, 8)
    change = unet.get_submodule(CONV).weight - base.get_submodule(CONV).weight
    torch.testing.assert_close(torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, conv.down, padding=1), conv.up),
                               torch.nn.functional.conv2d(x, change, padding=1), atol=1e-5, rtol=1e-4)
    assert list(decomposition.left_out) == [f"{CONV}.bias"] and 0 < decomposition.left_out[f"{CONV}.bias"] < 1
    report = decomposition.report()
    assert report["layers"] == 3 and report["rank_max"] == 3 and report["left_out_energy_share"] > 0


def _effective_weight(pipe, module: str) -> torch.Tensor:
    """W0 + the loaded adapter's delta (PEFT's own computation of scale · B A)."""
    layer = pipe.unet.get_submodule(module)
    return (layer.base_layer.weight + layer.get_delta_weight(layer.active_adapters[0])).detach()


@pytest.mark.parametrize("weight_name", [export.DIFFUSERS_FILE, export.KOHYA_FILE])
def test_load_lora_weights_gives_the_erased_weights(erased, tmp_path, weight_name):
    """Both files, loaded by diffusers' own `load_lora_weights` (the kohya one through its kohya converter),
    into the base pipeline: every LoRA layer's effective weight is the erased UNet's."""
    base, unet, _ = erased
    export.write_lora(export.decompose(unet, export.unet_delta(base, unet), energy=1.0), tmp_path / "lora")
    pipe = load_pipeline("toy", "cpu", dtype=torch.float32)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=weight_name)
    for module in (KV.format("k"), KV.format("v"), CONV):
        torch.testing.assert_close(_effective_weight(pipe, module), unet.get_submodule(module).weight.detach(),
                                   atol=1e-6, rtol=1e-5)
    assert not hasattr(pipe.unet.get_submodule(KV.format("q")), "base_layer")  # unchanged: no adapter


def test_the_diffusers_file_has_peft_keys_and_loads_from_the_folder_alone(erased, tmp_path):
    base, unet, _ = erased
    export.write_lora(export.decompose(unet, export.unet_delta(base, unet)), tmp_path / "lora")
    keys = set(load_file(str(tmp_path / "lora" / export.DIFFUSERS_FILE)))
    assert keys == {f"unet.{m}.lora_{ab}.weight" for m in (KV.format("k"), KV.format("v"), CONV) for ab in "AB"}
    pipe = load_pipeline("toy", "cpu", dtype=torch.float32)
    pipe.load_lora_weights(str(tmp_path / "lora"))  # no weight_name: diffusers picks the diffusers file
    assert hasattr(pipe.unet.get_submodule(CONV), "base_layer")


def test_kohya_keys_follow_the_documented_pattern_on_an_sd14_shaped_unet():
    """SD v1.4's UNet layout (block types, depths): a change to every cross-attention K/V and to one
    ResNet convolution gives exactly kohya's names for those modules, which A1111 and ComfyUI map."""
    from doco_lib.toy.sd_shaped import make_sd14_pipeline

    pipe = make_sd14_pipeline("tiny")
    unet = pipe.unet
    delta = {}
    for name, p in unet.named_parameters():
        if re.search(r"attn2\.to_[kv]\.weight$", name) or name == f"{CONV}.weight":
            delta[name] = 1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(delta)))
    keys = set(export.kohya_state_dict(export.decompose(unet, delta).layers))
    blocks = ([f"down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)] + ["mid_block_attentions_0"]
              + [f"up_blocks_{b}_attentions_{a}" for b in range(1, 4) for a in range(3)])
    expected = {f"lora_unet_{block}_transformer_blocks_0_attn2_to_{kv}" for block in blocks for kv in "kv"}
    expected.add("lora_unet_down_blocks_0_resnets_0_conv1")
    assert len(expected) == 33
    assert keys == {f"{name}.{tensor}" for name in expected for tensor in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(KOHYA_KEY.fullmatch(key) for key in keys)
    assert not KOHYA_KEY.fullmatch("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight")
    # diffusers' kohya converter finds every one of these modules in the SD v1 layout.
    pipe.load_lora_weights(export.kohya_state_dict(export.decompose(unet, delta).layers))
    assert sum(hasattr(module, "base_layer") for module in unet.modules()) == 33


def test_the_kohya_scale_alpha_over_rank_gives_back_the_change(erased):
    base, unet, _ = erased
    decomposition = export.decompose(unet, export.unet_delta(base, unet), energy=1.0)
    state = export.kohya_state_dict(decomposition.layers)
    name = export.kohya_name(KV.format("k"))
    down, up, alpha = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"], state[f"{name}.alpha"]
    assert alpha.dim() == 0 and down.shape[0] == up.shape[1] == 3
    change = unet.get_submodule(KV.format("k")).weight - base.get_submodule(KV.format("k")).weight
    torch.testing.assert_close(alpha / down.shape[0] * up @ down, change.detach(), atol=1e-6, rtol=1e-5)


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_front_matter_and_evaluation_table(erased, tmp_path):
    _, _, folder = erased
    card = export.model_card(folder)
    meta = _front_matter(card)
    assert meta["library_name"] == "diffusers" and meta["license"] == "mit"
    assert "concept-erasure" in meta["tags"] and "erasure-doco" in meta["tags"]
    assert "base_model" not in meta and "`toy`" in card  # not a hub id: named in the text, not the metadata
    assert "Not evaluated yet" in card and "No cost records" in card

    hub = tmp_path / "doco"
    hub.mkdir()
    info = json.loads((folder / "erasure.json").read_text()) | {"base_model": "CompVis/stable-diffusion-v1-4"}
    (hub / "erasure.json").write_text(json.dumps(info))
    (hub / "costs").mkdir()
    (hub / "costs" / "training.json").write_text(json.dumps({"phase": "training", "seconds": 12.5,
                                                             "peak_rss_bytes": 2**30, "iterations": 3,
                                                             "changed_params": 10, "unet_params": 100}))
    export.record_evaluation(hub, "| concept | toy base | DoCo |\n|---|---|---|\n| star | 100 | 7.8 |")
    card = (hub / export.CARD_FILE).read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == "CompVis/stable-diffusion-v1-4" and meta["license"] == "creativeml-openrail-m"
    assert "| star | 100 | 7.8 |" in card and "| training | 12.5 | 1.00 GiB RSS |" in card
    export.write_model_card(hub)  # a later rewrite (a LoRA export, say) keeps the measured table
    assert "| star | 100 | 7.8 |" in (hub / export.CARD_FILE).read_text()


def test_the_evaluation_writes_its_measured_table_into_the_card(erased, tmp_path, one_torch_thread):
    """Notebook 04 and `doco eval` (runs.run_evaluation) put each erased model's values beside the base
    model's into the card of its export."""
    from doco_lib import config
    from doco_lib.studies import runs

    _, _, folder = erased
    params = config.validate({"output_root": str(tmp_path), "run_name": "ev", "n_templates": 1,
                              "images_per_template": 2, "num_inference_steps": 2, "device": "cpu",
                              "eval_concepts": ["star", "pentagram", "circle"], "eval_models": [str(folder / "unet")]})
    results, _ = runs.run_evaluation(params, judge=load_judge("cpu"))
    card = (folder / export.CARD_FILE).read_text()
    assert "Not evaluated yet" not in card and "| toy base |" in card.replace("  ", "")
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|")[3:5] for line in card.splitlines()
            if line.startswith("| ")}
    measured = results[(results.concept == "star") & (results.metric == "CS")].set_index("model").value
    assert list(measured.index) == ["toy base", "DoCo (erased0)"]  # the label notebook 04 gives the export
    assert [float(x) for x in rows[("star", "CS")]] == pytest.approx(list(measured), abs=0.01)


def test_doco_export_lora_writes_both_formats_with_a_report(erased, tmp_path, doco):
    _, _, folder = erased
    result = doco("export-lora", "--unet", folder / "unet", "--model", "toy", "--out", tmp_path / "lora",
                  "--energy", "0.99")
    assert result.returncode == 0, result.stderr
    assert "3 layers" in result.stdout and "left out (no LoRA form): 1 tensors" in result.stdout
    report = json.loads((tmp_path / "lora" / export.REPORT_FILE).read_text())
    assert report["target"] == "star" and report["base_model"] == "toy" and report["energy"] == 0.99
    for name, size in report["files"].items():
        assert (tmp_path / "lora" / name).stat().st_size == size
    assert _front_matter((tmp_path / "lora" / export.CARD_FILE).read_text())["tags"][:3] == [
        "stable-diffusion", "text-to-image", "lora"]


@pytest.mark.parametrize("args, message", [
    (["--energy", "1.5"], "--energy: 1.5 must be in (0, 1]"),
    (["--format", "ckpt"], "invalid choice"),
    (["--model", "toy-wide"], "says the UNet was erased from 'toy'"),
])
def test_doco_export_lora_errors_are_one_line(erased, tmp_path, doco, args, message):
    _, _, folder = erased
    base = {"--unet": str(folder / "unet"), "--model": "toy", "--out": str(tmp_path / "lora")}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    result = doco("export-lora", *[x for pair in base.items() for x in pair])
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "lora").exists()
    if "invalid choice" not in message:
        assert len(result.stderr.strip().splitlines()) == 1


def test_doco_export_lora_refuses_a_folder_that_is_not_a_unet(tmp_path, doco):
    result = doco("export-lora", "--unet", tmp_path, "--model", "toy", "--out", tmp_path / "lora")
    assert result.returncode == 2 and "is not a diffusers UNet folder" in result.stderr


def test_the_harness_exports_a_lora_and_a_model_card_when_asked(tmp_path, doco, one_torch_thread):
    """`export_lora: true` in a params file: `doco train` writes <run>/doco/lora/ beside the UNet, and the LoRA
    (every energy kept) loaded into the base pipeline gives the trained K/V weights."""
    params = write_params(tmp_path, "lora", iterations=3, warmup_iterations=1, checkpoint_every=3,
                          n_anchor_images=4, export_lora=True, lora_energy=1.0)
    result = doco("train", "--params", params, "--quiet")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "outputs" / "lora" / "doco"
    assert "concept-erasure" in _front_matter((run / export.CARD_FILE).read_text())["tags"]
    assert "## Cost" in (run / export.CARD_FILE).read_text()
    pipe = load_pipeline("toy", "cpu", dtype=torch.float32)
    pipe.load_lora_weights(str(run / "lora"))
    trained = load_file(str(run / "unet" / "diffusion_pytorch_model.safetensors"))
    report = json.loads((run / "lora" / export.REPORT_FILE).read_text())
    assert report["layers"] == 14 and report["left_out"] == {}  # the toy UNet's 7 cross-attentions, K and V
    for layer in report["per_layer"]:
        torch.testing.assert_close(_effective_weight(pipe, layer["module"]), trained[layer["module"] + ".weight"],
                                   atol=1e-6, rtol=1e-5)


def test_lora_energy_is_checked_in_a_params_file(tmp_path, doco):
    result = doco("train", "--params", write_params(tmp_path, "bad", lora_energy=0), "--quiet")
    assert result.returncode == 2 and "lora_energy" in result.stderr


def test_the_files_carry_the_erasure_in_their_metadata(erased, tmp_path):
    base, unet, _ = erased
    export.write_lora(export.decompose(unet, export.unet_delta(base, unet)), tmp_path / "lora",
                      metadata={"target": "star"})
    for name in (export.DIFFUSERS_FILE, export.KOHYA_FILE):
        with safe_open(str(tmp_path / "lora" / name), framework="pt") as handle:
            assert handle.metadata() == {"target": "star", "lora_energy": "0.99"}
