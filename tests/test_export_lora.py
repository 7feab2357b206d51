"""LoRA export of an erasure (doco_lib/export.py): rank selection by energy, the diffusers/PEFT file that
`pipe.load_lora_weights` loads (with its PEFT config), the kohya file's key names (diffusers names for SD v1/v2,
LDM names for SDXL), the UNet output of the default energy's LoRA, `export-lora --judge`, and the model cards."""

import copy
import json
import math
import re

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_training import tiny_trainer, write_params

from doco_lib import export
from doco_lib.errors import ParamsError
from doco_lib.models import encode_prompts, load_judge, load_pipeline
from doco_lib.toy import sd_shaped

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


@pytest.fixture(params=["installed", "alpha of the first module"])
def rank_inference(request, monkeypatch):
    """How diffusers infers a LoRA's alphas from its tensors when the file has no PEFT config: the installed
    version's way (alpha = rank for every module), or other versions' (alpha = the first module's rank for all,
    so that a module of rank r_i gets scale r_first / r_i)."""
    if request.param == "alpha of the first module":
        from diffusers.utils import peft_utils

        installed = peft_utils.get_peft_kwargs

        def other_versions(rank_dict, network_alpha_dict, peft_state_dict, *args, **kwargs):
            config = installed(rank_dict, network_alpha_dict, peft_state_dict, *args, **kwargs)
            if not network_alpha_dict:
                config.update(lora_alpha=next(iter(rank_dict.values())), alpha_pattern={})
            return config

        monkeypatch.setattr(peft_utils, "get_peft_kwargs", other_versions)
    return request.param


@pytest.mark.parametrize("weight_name", [export.DIFFUSERS_FILE, export.KOHYA_FILE])
def test_load_lora_weights_gives_the_erased_weights(erased, tmp_path, weight_name, rank_inference):
    """Both files, loaded by diffusers' own `load_lora_weights` (the kohya one through its kohya converter),
    into the base pipeline: every LoRA layer (ranks 3, 2, 2) gets scale 1 and the erased UNet's weight, however
    diffusers would infer alphas from the tensors."""
    base, unet, _ = erased
    decomposition = export.decompose(unet, export.unet_delta(base, unet), energy=1.0)
    export.write_lora(decomposition, tmp_path / "lora")
    pipe = load_pipeline("toy", "cpu", dtype=torch.float32)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=weight_name)
    for layer in decomposition.layers:
        loaded = pipe.unet.get_submodule(layer.module)
        adapter = loaded.active_adapters[0]
        assert loaded.r[adapter] == layer.rank and loaded.scaling[adapter] == pytest.approx(
            1 / layer.rank if weight_name == export.KOHYA_FILE else 1.0)  # kohya's α / r, its lora_up times r
        torch.testing.assert_close(_effective_weight(pipe, layer.module),
                                   unet.get_submodule(layer.module).weight.detach(), atol=1e-6, rtol=1e-5)
    assert not hasattr(pipe.unet.get_submodule(KV.format("q")), "base_layer")  # unchanged: no adapter


def test_the_diffusers_file_carries_every_layers_rank_and_alpha_as_diffusers_saves_them(erased, tmp_path):
    """The PEFT config under diffusers' own metadata key, its fields prefixed "unet." as `save_lora_weights`
    packs them: each module's rank, and alpha equal to it."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata

    base, unet, _ = erased
    export.write_lora(export.decompose(unet, export.unet_delta(base, unet)), tmp_path / "lora")
    assert export.PEFT_METADATA_KEY == LORA_ADAPTER_METADATA_KEY
    config = _load_sft_state_dict_metadata(str(tmp_path / "lora" / export.DIFFUSERS_FILE))  # diffusers' reader
    ranks = {f"^{KV.format('k')}": 3, f"^{KV.format('v')}": 2, f"^{CONV}": 2}
    assert config == {"unet.r": 2, "unet.lora_alpha": 2, "unet.rank_pattern": ranks, "unet.alpha_pattern": ranks,
                      "unet.target_modules": sorted([KV.format("k"), KV.format("v"), CONV])}


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
    decomposition = export.decompose(unet, delta)
    keys = set(export.kohya_state_dict(decomposition.layers, unet.config))
    blocks = ([f"down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)] + ["mid_block_attentions_0"]
              + [f"up_blocks_{b}_attentions_{a}" for b in range(1, 4) for a in range(3)])
    expected = {f"lora_unet_{block}_transformer_blocks_0_attn2_to_{kv}" for block in blocks for kv in "kv"}
    expected.add("lora_unet_down_blocks_0_resnets_0_conv1")
    assert len(expected) == 33
    assert keys == {f"{name}.{tensor}" for name in expected for tensor in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(KOHYA_KEY.fullmatch(key) for key in keys)
    assert not KOHYA_KEY.fullmatch("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight")
    # diffusers' kohya converter finds every one of these modules in the SD v1 layout.
    pipe.load_lora_weights(export.kohya_state_dict(decomposition.layers, unet.config))
    assert sum(hasattr(module, "base_layer") for module in unet.modules()) == 33


def test_the_kohya_scale_alpha_over_rank_gives_back_the_change(erased):
    base, unet, _ = erased
    decomposition = export.decompose(unet, export.unet_delta(base, unet), energy=1.0)
    state = export.kohya_state_dict(decomposition.layers, unet.config)
    name = export.kohya_name(KV.format("k"), unet.config)
    down, up, alpha = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"], state[f"{name}.alpha"]
    assert alpha.dim() == 0 and down.shape[0] == up.shape[1] == 3
    change = unet.get_submodule(KV.format("k")).weight - base.get_submodule(KV.format("k")).weight
    torch.testing.assert_close(alpha / down.shape[0] * up @ down, change.detach(), atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """The SDXL-shaped pipeline (tiny widths, SDXL's depths and block types) and the folder it is saved in."""
    pipe = sd_shaped.make_sdxl_pipeline("tiny")
    folder = tmp_path_factory.mktemp("sdxl") / "sdxl"
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder


# kohya's names (those of its SDXL LoRAs, which A1111 and ComfyUI look up) of SDXL UNet modules, one of each kind.
SDXL_KOHYA_NAMES = {
    "conv_in": "input_blocks_0_0", "conv_out": "out_2",
    "time_embedding.linear_1": "time_embed_0", "time_embedding.linear_2": "time_embed_2",
    "add_embedding.linear_1": "label_emb_0_0", "add_embedding.linear_2": "label_emb_0_2",
    "down_blocks.0.resnets.1.conv1": "input_blocks_2_0_in_layers_2",
    "down_blocks.0.resnets.1.time_emb_proj": "input_blocks_2_0_emb_layers_1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
    "down_blocks.2.resnets.0.conv_shortcut": "input_blocks_7_0_skip_connection",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks_4_1_transformer_blocks_0_attn2_to_k",
    "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj":
        "input_blocks_8_1_transformer_blocks_9_ff_net_0_proj",
    "mid_block.resnets.0.conv2": "middle_block_0_out_layers_3",
    "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
    "mid_block.resnets.1.conv1": "middle_block_2_in_layers_2",
    "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0":
        "output_blocks_2_1_transformer_blocks_0_attn1_to_out_0",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks_5_2_conv",
    "up_blocks.2.resnets.2.conv_shortcut": "output_blocks_8_0_skip_connection",
}


def test_sdxl_modules_get_their_ldm_names_one_to_one_as_diffusers_reads_sdxl_checkpoints():
    """Every parameter of the SDXL-shaped UNet renamed by `ldm_module_name` is an SDXL checkpoint that diffusers'
    single-file converter (`convert_ldm_unet_checkpoint`) turns back into exactly this UNet's state dict; kohya's
    names are those LDM paths."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel(**{**sd_shaped.SDXL_UNET, **sd_shaped.SDXL_TINY["unet"]})
    state = unet.state_dict()
    modules = {name.rpartition(".")[0] for name in state}
    ldm = {module: export.ldm_module_name(module, unet.config) for module in modules}
    assert len(set(ldm.values())) == len(ldm)  # one-to-one
    checkpoint = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        checkpoint[f"model.diffusion_model.{ldm[module]}.{leaf}"] = tensor
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert converted.keys() == state.keys() and all(converted[name] is state[name] for name in state)

    assert export.uses_ldm_names(unet.config)
    for module, name in SDXL_KOHYA_NAMES.items():
        assert export.kohya_name(module, unet.config) == f"lora_unet_{name}", module
    with pytest.raises(ParamsError, match=r"'mid_block.resnets.0.nonlinearity': no LDM name"):
        export.ldm_module_name("mid_block.resnets.0.nonlinearity", unet.config)


def test_the_sdxl_kohya_file_loads_into_an_sdxl_pipeline_with_the_erased_weights(sdxl, tmp_path):
    """A change of rank 1, 2 or 3 to every Linear and Conv2d of the SDXL-shaped UNet (the upsamplers' and the
    added embedding's included), exported as a kohya file alone: its names are LDM names, and diffusers'
    `load_lora_weights` on the SDXL pipeline (which maps them back) gives every layer its erased weight."""
    pipe, _ = sdxl
    pipe = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)}, add_watermarker=False)
    generator, delta = torch.Generator().manual_seed(0), {}
    for i, (name, module) in enumerate(pipe.unet.named_modules()):
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            rank, shape = 1 + i % 3, module.weight.shape
            up, down = torch.randn(shape[0], rank, generator=generator), torch.randn(rank, shape[1:].numel(),
                                                                                     generator=generator)
            delta[f"{name}.weight"] = 1e-2 * (up @ down).reshape(shape)
    decomposition = export.decompose(pipe.unet, delta, energy=1.0)
    report = export.write_lora(decomposition, tmp_path / "lora", formats="kohya")
    names = {key.partition(".")[0] for key in load_file(str(tmp_path / "lora" / export.KOHYA_FILE))}
    assert {f"lora_unet_{name}" for name in SDXL_KOHYA_NAMES.values()} <= names
    assert not any(re.search("down_blocks|mid_block|up_blocks|add_embedding|upsamplers", name) for name in names)
    assert report["kohya_names"] == "ldm" and len(names) == len(decomposition.layers) == len(delta)

    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=export.KOHYA_FILE)
    for name, change in delta.items():
        module = name.removesuffix(".weight")
        layer = pipe.unet.get_submodule(module)
        torch.testing.assert_close(layer.get_delta_weight(layer.active_adapters[0]).detach(), change,
                                   atol=1e-7, rtol=1e-4, msg=module)


def test_the_default_energys_lora_keeps_the_unet_output_within_the_stated_error(tmp_path, one_torch_thread):
    """A trained change (DoCo, 3 iterations: K/V changes of full rank 32, of which the default energy 0.99 kept
    ranks 9-23 when written) and its LoRA, loaded by `load_lora_weights`: on random latents and timesteps, with
    random text states and with the toy prompts', the LoRA's output is off the full weights' by at most
    √(1 − 0.99) = 10% of the erasure's own change of the output: ‖out_LoRA − out_full‖ ≤ 0.1 ‖out_full − out_base‖.

    Why that tolerance: each layer's dropped part has ‖ΔW − BA‖_F ≤ √(1 − energy) ‖ΔW‖_F (Eckart–Young and the
    rank choice), and to first order in the (small) change the output moves linearly in the layers' changes, so
    the output error is the same fraction of the output change unless the UNet responds more strongly to a
    change's smallest singular directions than to its largest. Measured when written: 2.9% (random states) and
    1.2% (the prompts')."""
    energy = 0.99
    trainer = tiny_trainer(tmp_path, "energy", iterations=3, checkpoint_every=3, n_anchor_images=4)
    trainer.run(progress=False)
    base = load_pipeline("toy", "cpu", dtype=torch.float32)
    decomposition = export.decompose(trainer.unet, export.unet_delta(base.unet, trainer.unet), energy)
    report = export.write_lora(decomposition, tmp_path / "lora")
    assert report["left_out"] == {} and all(layer["energy_kept"] >= energy for layer in report["per_layer"])
    assert any(layer["rank"] < layer["full_rank"] for layer in report["per_layer"])  # something was dropped
    with_lora = load_pipeline("toy", "cpu", dtype=torch.float32)
    with_lora.load_lora_weights(str(tmp_path / "lora"), weight_name=export.DIFFUSERS_FILE)

    generator = torch.Generator().manual_seed(0)
    prompts = encode_prompts(base, ["a star", "a red star on a dotted background", "a pentagon", "a circle",
                                    "a heart", "a cross", "a square", "a hexagon"])
    random_states = prompts.std() * torch.randn(prompts.shape, generator=generator)
    config = base.unet.config
    latents = torch.randn(len(prompts), config.in_channels, config.sample_size, config.sample_size, generator=generator)
    timesteps = torch.randint(0, 1000, (len(prompts),), generator=generator)
    for states in (random_states, prompts):
        with torch.no_grad():
            base_out, full_out, lora_out = (unet(latents, timesteps, states).sample
                                            for unet in (base.unet, trainer.unet, with_lora.unet))
        change = (full_out - base_out).norm()
        assert change > 0 and (lora_out - full_out).norm() <= math.sqrt(1 - energy) * change


def test_doco_export_lora_judge_records_the_toy_judges_table(erased, tmp_path, doco, one_torch_thread):
    """`--judge` samples the original model, the full erased weights and the base model with the LoRA loaded
    (one image per prompt set here) and keeps the table as judged.csv, in the report and in the card."""
    import pandas as pd

    _, _, folder = erased
    lora = tmp_path / "lora"
    result = doco("export-lora", "--unet", folder / "unet", "--model", "toy", "--out", lora, "--judge",
                  "--samples", "1")
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(lora / export.JUDGED_FILE, index_col=0)
    assert list(table.columns) == ["original", "full weights", "LoRA", "LoRA − full (pts)"]
    assert list(table.index) == ["star", "pentagram", "circle", "square", "triangle", "pentagon", "hexagon",
                                 "heart", "cross"]  # the target, its synonym, then every other toy shape
    assert table[["original", "full weights", "LoRA"]].isin([0.0, 100.0]).all().all()  # 1 image: seen or not
    assert (table["LoRA − full (pts)"] == table["LoRA"] - table["full weights"]).all()
    assert "star" in result.stdout and "LoRA − full (pts)" in result.stdout
    report = json.loads((lora / export.REPORT_FILE).read_text())
    assert report["judged"].startswith("1 images per prompt set")
    card = (lora / export.CARD_FILE).read_text()
    assert report["judged"] in card
    assert f"- `{export.JUDGED_FILE}`: the toy judge's table below" in card


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
                                                             "trainable_params": 20, "changed_params": 10,
                                                             "unet_params": 100}))
    export.record_evaluation(hub, "| concept | toy base | DoCo |\n|---|---|---|\n| star | 100 | 7.8 |")
    card = (hub / export.CARD_FILE).read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == "CompVis/stable-diffusion-v1-4" and meta["license"] == "creativeml-openrail-m"
    assert "| star | 100 | 7.8 |" in card and "| training | 12.5 | 1.00 GiB RSS |" in card
    assert "changed 10 of its 20 trainable parameters in 3 iterations; the UNet has 100." in card
    export.write_model_card(hub)  # a later rewrite (a LoRA export, say) keeps the measured table
    assert "| star | 100 | 7.8 |" in (hub / export.CARD_FILE).read_text()


def _snippet(card: str, folder) -> str:
    """The card's first Python block, for the folder the card is in."""
    return re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("<this folder>", str(folder))


def _listed_files(card: str) -> set[str]:
    """The names the card's Files section lists (none without one)."""
    section = re.search(r"^## Files\n(.*?)(^## |\Z)", card, re.S | re.M)
    return set(re.findall(r"^- `([^`]+)`", section.group(1), re.M)) if section else set()


def test_the_cards_snippets_load_an_sdxl_erasure_into_sdxl_s_own_pipeline(sdxl, tmp_path):
    """An erasure of an SDXL base (a pipeline folder, as a hub id would be): the model card's snippet builds the
    SDXL pipeline with the erased UNet, the LoRA card's the SDXL pipeline with the LoRA, both with the erased
    weights of the changed layers (an upsampler and the added embedding)."""
    pipe, folder = sdxl
    unet = copy.deepcopy(pipe.unet)
    changed = ("up_blocks.0.upsamplers.0.conv", "add_embedding.linear_1")
    with torch.no_grad():
        for i, module in enumerate(changed):
            weight = unet.get_submodule(module).weight
            weight += _low_rank(weight.shape[0], weight[0].numel(), [0.2, 0.1], seed=i).float().reshape(weight.shape)
    erasure = tmp_path / "uce"
    unet.save_pretrained(erasure / "unet")
    (erasure / "erasure.json").write_text(json.dumps({"method": "uce", "base_model": str(folder), "target": "star"}))
    export.write_lora(export.decompose(unet, export.unet_delta(pipe.unet, unet), energy=1.0), erasure / "lora",
                      metadata={"base_model": str(folder)})
    for card, where in ((export.model_card(erasure), erasure),
                        ((erasure / "lora" / export.CARD_FILE).read_text(), erasure / "lora")):
        namespace = {}
        exec(_snippet(card, where), namespace)
        loaded = namespace["pipe"]
        assert type(loaded).__name__ == "StableDiffusionXLPipeline"
        for module in changed:
            layer = loaded.unet.get_submodule(module)
            weight = (layer.base_layer.weight + layer.get_delta_weight(layer.active_adapters[0])
                      if hasattr(layer, "base_layer") else layer.weight)
            torch.testing.assert_close(weight.detach(), unet.get_submodule(module).weight.detach(), atol=1e-6,
                                       rtol=1e-5)
    assert _listed_files(export.model_card(erasure)) == {"unet/", "lora/"}  # no delta, discriminator or adapter


@pytest.mark.parametrize("method, files", [("uce", {"unet/", "delta.safetensors"}),
                                           ("spm", {"unet/", "spm.safetensors"})])
def test_each_methods_card_lists_the_files_its_export_wrote(tmp_path, one_torch_thread, method, files):
    """UCE (through the harness's export) writes a delta; SPM its adapter and no delta, its UNet the adapter
    merged. Each card lists what is there and names no file that is not; SPM's trained parameters are the
    adapter's, not the UNet's."""
    trainer = tiny_trainer(tmp_path, method, method=method, iterations=1, checkpoint_every=1, n_anchor_images=4,
                           spm_denoising_steps=2)
    trainer.run(progress=False)
    trainer.export(base_model="toy")
    card = (trainer.run_dir / export.CARD_FILE).read_text()
    assert _listed_files(card) == files and all((trainer.run_dir / name).exists() for name in files)
    record = json.loads((trainer.run_dir / "costs" / "training.json").read_text())
    assert (f"changed {record['changed_params']:,} of its {record['trainable_params']:,} trainable parameters in 1 "
            f"iterations; the UNet has {record['unet_params']:,}.") in card
    if method == "spm":
        assert "delta.safetensors" not in card and "merged at strength 1" in card
        adapter = load_file(str(trainer.run_dir / "spm.safetensors"))  # what SPM trains: the adapter, not the UNet
        assert record["trainable_params"] == sum(v.numel() for k, v in adapter.items() if k.endswith(".weight"))


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
    # the label notebook 04 gives the export: its run folder's name (erased0, or erasedN after other modules' folders)
    assert list(measured.index) == ["toy base", f"DoCo ({folder.parent.name})"]
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
    assert _listed_files((run / export.CARD_FILE).read_text()) == {
        "unet/", "delta.safetensors", "discriminator.safetensors", "lora/"}
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
            metadata = handle.metadata()
        assert (export.PEFT_METADATA_KEY in metadata) == (name == export.DIFFUSERS_FILE)
        assert {k: v for k, v in metadata.items() if k != export.PEFT_METADATA_KEY} == {"target": "star",
                                                                                          "lora_energy": "0.99"}


@pytest.mark.parametrize("args, message", [
    (["--energy", "1.5"], "--energy: 1.5 must be in (0, 1]"),
    (["--samples", "0"], "--samples: 0 images per prompt set"),
    (["--set", "model=CompVis/stable-diffusion-v1-4"], "is not the toy world"),
])
def test_the_lora_export_study_refuses_bad_input_before_training(doco, tmp_path, args, message):
    result = doco("toy", "lora-export", "--set", f"output_root={tmp_path}", *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not any(tmp_path.iterdir())  # nothing trained
