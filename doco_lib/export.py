"""Erasures that load anywhere: an erased UNet's weight change as a LoRA, and a model card beside every export.

**LoRA by truncated SVD.** An erasure changes the UNet's weights W0 → W = W0 + ΔW. Per layer, ΔW (a Linear's
out × in matrix, or a Conv2d's out × in·kh·kw reshaping) has the singular value decomposition
ΔW = U diag(s) Vᵀ, s₁ ≥ s₂ ≥ …; the LoRA keeps the first r triplets,

    B = U_r diag(√s_r)   (out × r),    A = diag(√s_r) V_rᵀ   (r × in),    W0 + BA ≈ W,

the best rank-r approximation of ΔW (Eckart–Young), with ‖ΔW − BA‖²_F = Σ_{i>r} s_i². The rank of each layer
is the smallest r whose share of the change's energy Σ_{i≤r} s_i² / Σ_i s_i² reaches `energy` (default 0.99,
a relative error of at most √(1 − energy) = 10% per layer), capped at the numerical rank of ΔW (singular
values above s₁ · max(out, in) · ε of its dtype). A Conv2d's A is a convolution with the layer's own kernel,
stride and padding and B a 1×1 convolution, as PEFT and kohya's LoCon build them. Changed tensors that are
not the weight of a Linear or Conv2d (biases, normalisation scales) have no LoRA form: they are left out and
reported with their share of the change's energy.

**Formats** (scale 1: W_eff = W0 + BA in both):
- diffusers/PEFT, `pytorch_lora_weights.safetensors`: `unet.<module path>.lora_A.weight` / `.lora_B.weight`,
  and in the metadata the PEFT LoraConfig as diffusers' `save_lora_weights(unet_lora_adapter_metadata=…)` writes
  it (key `lora_adapter_metadata`, fields prefixed `unet.`): every module's rank in `rank_pattern` and alpha = rank
  in `alpha_pattern`. `pipe.load_lora_weights(folder)` builds the adapter from that config, so every layer has
  scale 1 whatever its rank; without it diffusers infers ranks and alphas from the tensors, and some of its
  versions then scale a layer of rank r_i by r_first / r_i.
- kohya, `lora_kohya.safetensors`: `lora_unet_<module path, '.' → '_'>.lora_down.weight` (= A),
  `.lora_up.weight` (= B · r / α) and `.alpha` (α = 1; readers scale lora_up · lora_down by α / r). The module
  paths are those kohya's sd-scripts writes: for SD v1/v2 UNets the diffusers paths
  (`lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k`), which A1111 converts to its own and
  ComfyUI keeps a map of; for SDXL the original LDM paths (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`,
  `…_output_blocks_2_2_conv`, `…_label_emb_0_0`; `ldm_module_name`), which A1111 and ComfyUI look up directly.
  diffusers' `load_lora_weights` converts both back (`lora_conversion_utils`).
- SD 3.x and FLUX.1: the erased denoiser is the MMDiT transformer, so the diffusers file's keys and metadata fields
  take its prefix (`transformer.<module path>.lora_A.weight`, as `save_lora_weights(transformer_lora_adapter_metadata
  =…)` writes them); kohya's names are UNet modules', so no kohya file is written for them.

**Model card.** `write_model_card(erasure_dir)` writes README.md beside the exported UNet (the Hugging Face
Hub's format: YAML front matter with license, base_model when it is a hub id, tags, library_name), from the
export's `erasure.json`, the files the method wrote (a delta, SPM's adapter, DoCo's discriminator, a LoRA
folder: each listed only where it exists), the run's cost records and the evaluation table once measured; a LoRA
folder gets its own card from its report. Their loading snippets use `DiffusionPipeline`, which builds the
pipeline class the base model names (SD v1/v2, SDXL, SD 3.x or FLUX.1), and load an erased transformer by
`AutoModel`.
"""

from __future__ import annotations

import collections
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from doco_lib import costs
from doco_lib.errors import ModelLoadError, ParamsError
from doco_lib.io import atomic_directory, atomic_save_json, atomic_write_bytes, atomic_write_text
from doco_lib.models import (
    HUB_ID,
    check_model_reference,
    denoiser_class,
    denoiser_family,
    is_toy,
    load_judge,
    load_pipeline,
    resolve_model,
)
from doco_lib.toy import render
from doco_lib.toy.erasure import judged_rates, prompt_sets

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name `load_lora_weights(folder)` looks for first
# The safetensors metadata key under which diffusers keeps a LoRA's PEFT LoraConfig (diffusers.loaders.lora_base
# .LORA_ADAPTER_METADATA_KEY), each field prefixed with the component, as `save_lora_weights` writes it.
PEFT_METADATA_KEY = "lora_adapter_metadata"
KOHYA_FILE = "lora_kohya.safetensors"
REPORT_FILE = "lora_report.json"
JUDGED_FILE = "judged.csv"  # `export-lora --judge`'s table
CARD_FILE = "README.md"
EVALUATION_FILE = "evaluation.md"  # the measured table, kept beside the card so that a rewrite keeps it
FORMATS = ("diffusers", "kohya", "both")
# Licenses of SD base models (v1, v2, XL); a derivative carries its base model's license.
LICENSES = {"CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
            "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
            "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
            "stabilityai/stable-diffusion-2-1": "openrail++",
            "stabilityai/stable-diffusion-2-1-base": "openrail++",
            "stabilityai/stable-diffusion-xl-base-1.0": "openrail++"}


@dataclass(frozen=True)
class LoraLayer:
    """One layer's factors: W_eff = W0 + B @ A (A, B reshaped to convolutions for a Conv2d)."""

    module: str  # the module's path in the UNet, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k
    kind: str  # linear | conv
    down: torch.Tensor  # A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    full_rank: int  # min(out, in·kh·kw)
    energy_kept: float  # Σ_{i≤r} s_i² / Σ s_i²

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def check_energy(energy: float, key: str = "lora_energy") -> None:
    if not 0 < energy <= 1:
        raise ParamsError(f"{key}: {energy!r} must be in (0, 1] (the share of each layer's change energy the LoRA "
                          "keeps, e.g. 0.99).")


def choose_rank(singular_values: torch.Tensor, energy: float, rtol: float = 0.0) -> int:
    """The smallest r with Σ_{i≤r} s_i² ≥ energy · Σ s_i², capped at the numerical rank: the number of
    s_i > rtol · s₁."""
    check_energy(energy)
    s = singular_values.double()
    numerical = int((s > rtol * s[0]).sum())
    cumulative = torch.cumsum(s**2, 0)
    needed = int((cumulative < energy * cumulative[-1]).sum()) + 1
    return max(1, min(needed, numerical))


def factorise(delta: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, energy kept) of a 2-D change ΔW ≈ B A by truncated SVD in float64 (module docstring); the rank is
    capped at ΔW's numerical rank in its own precision (rtol = max(out, in) · ε of its dtype, as
    `torch.linalg.matrix_rank`), so rounding noise never adds rank."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = choose_rank(s, energy, rtol=max(delta.shape) * torch.finfo(delta.dtype).eps)
    root = s[:rank].sqrt()
    kept = float((s[:rank] ** 2).sum() / (s**2).sum())
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float(), kept


@dataclass
class LoraDecomposition:
    """Every changed tensor, as a LoRA layer or as left out (name → its share of the change's energy)."""

    layers: list[LoraLayer]
    left_out: dict[str, float]
    energy: float
    total_energy: float  # Σ over every changed tensor of ‖Δ‖²_F
    unet_config: Mapping  # the denoiser's config: SDXL's kohya file names its modules by the LDM layout
    component: str = "unet"  # the pipeline component the LoRA applies to: unet, or transformer (SD 3.x, FLUX.1)

    def report(self) -> dict:
        ranks = [layer.rank for layer in self.layers]
        lora_params = sum(layer.down.numel() + layer.up.numel() for layer in self.layers)
        full_params = sum(layer.up.shape[0] * math.prod(layer.down.shape[1:]) for layer in self.layers)
        return {"energy": self.energy, "layers": len(self.layers),
                "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0),
                "rank_mean": sum(ranks) / len(ranks) if ranks else 0.0,
                "lora_parameters": lora_params, "full_delta_parameters": full_params,
                "left_out": self.left_out, "left_out_energy_share": sum(self.left_out.values()),
                "per_layer": [{"module": layer.module, "kind": layer.kind, "rank": layer.rank,
                               "full_rank": layer.full_rank, "energy_kept": layer.energy_kept}
                              for layer in self.layers]}


def decompose(unet, delta: dict[str, torch.Tensor], energy: float = 0.99) -> LoraDecomposition:
    """The LoRA of a weight change `delta` (parameter name → W − W0) of the denoiser `unet` (a UNet, or the MMDiT
    transformer of SD 3.x or FLUX.1): Linear and Conv2d weights factorised (`factorise`), tensors that are exactly
    unchanged skipped, any other changed tensor left out and reported."""
    layers, left_out, energies = [], {}, {}
    for name, change in sorted(delta.items()):
        energy_of_change = float(change.double().pow(2).sum())
        if energy_of_change == 0:
            continue
        energies[name] = energy_of_change
        module_name, _, leaf = name.rpartition(".")
        module = unet.get_submodule(module_name) if module_name else None
        if leaf == "weight" and isinstance(module, torch.nn.Linear):
            up, down, kept = factorise(change, energy)
            layers.append(LoraLayer(module_name, "linear", down.contiguous(), up.contiguous(), min(change.shape), kept))
        elif leaf == "weight" and isinstance(module, torch.nn.Conv2d) and module.groups == 1:
            out_channels = change.shape[0]
            up, down, kept = factorise(change.reshape(out_channels, -1), energy)
            layers.append(LoraLayer(module_name, "conv", down.reshape(-1, *change.shape[1:]).contiguous(),
                                    up[:, :, None, None].contiguous(), min(out_channels, change[0].numel()), kept))
        else:
            left_out[name] = energy_of_change
    total = sum(energies.values())
    if not layers:
        raise ParamsError("the erased UNet's change has no Linear or Conv2d weight to express as a LoRA "
                          f"({len(left_out)} changed tensors, none of them such a weight): was it trained at all?")
    component = "unet" if denoiser_family(unet) == "unet" else "transformer"
    return LoraDecomposition(layers, {name: e / total for name, e in left_out.items()}, energy, total,
                             dict(unet.config), component)


def diffusers_state_dict(layers: list[LoraLayer], component: str = "unet") -> dict[str, torch.Tensor]:
    """PEFT keys under the pipeline's component prefix (`unet.`, or `transformer.` for SD 3.x and FLUX.1), as
    diffusers' LoRA loaders read them."""
    state = {}
    for layer in layers:
        state[f"{component}.{layer.module}.lora_A.weight"] = layer.down
        state[f"{component}.{layer.module}.lora_B.weight"] = layer.up
    return state


def peft_config(layers: list[LoraLayer]) -> dict:
    """The PEFT LoraConfig fields of the diffusers file: every module's rank in `rank_pattern` and alpha = rank in
    `alpha_pattern` (scale α/r = 1), keyed "^<module path>" as diffusers keys them (PEFT matches a key against
    the end of a module's path; "^" makes it the whole path). With them in the file, `load_lora_weights` builds
    the config from them instead of inferring ranks and alphas from the tensors, which diffusers versions do
    differently (some scale a layer of rank r_i by r_first / r_i)."""
    ranks = {f"^{layer.module}": layer.rank for layer in layers}
    most_common = collections.Counter(ranks.values()).most_common(1)[0][0]
    return {"r": most_common, "lora_alpha": most_common, "rank_pattern": ranks, "alpha_pattern": dict(ranks),
            "target_modules": sorted(layer.module for layer in layers)}


def peft_metadata(layers: list[LoraLayer], component: str = "unet") -> dict[str, str]:
    """`peft_config` in the safetensors metadata as diffusers' `save_lora_weights(<component>_lora_adapter_metadata=…)`
    writes it: one JSON object under PEFT_METADATA_KEY, each field prefixed with the component ("unet.")."""
    fields = {f"{component}.{key}": value for key, value in peft_config(layers).items()}
    return {PEFT_METADATA_KEY: json.dumps(fields, indent=2, sort_keys=True)}


# The original (LDM/SGM) names of SDXL's UNet modules, which kohya's SDXL LoRAs use and A1111 and ComfyUI read:
# the modules outside the blocks, and the layers inside a ResNet block (a transformer's keep their names).
LDM_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                 "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                 "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
BLOCK_MODULE = re.compile(r"(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?"
                          r"(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")


def ldm_module_name(module: str, unet_config: Mapping) -> str:
    """The LDM path of a diffusers UNet module (`convert_ldm_unet_checkpoint` maps the other way). With L =
    layers_per_block: level b's j-th ResNet and transformer are input_blocks.{1 + b(L+1) + j}.0 and .1, its
    downsampler input_blocks.{(b+1)(L+1)}.0.op; the mid block's ResNets middle_block.0 and .2, its transformer
    middle_block.1; up level b's j-th ResNet and transformer output_blocks.{b(L+1) + j}.0 and .1, its upsampler
    output_blocks.{b(L+1) + L}.2.conv (.1.conv in an up block without transformers)."""
    if module in LDM_TOP_LEVEL:
        return LDM_TOP_LEVEL[module]
    layers = unet_config["layers_per_block"]
    if not isinstance(layers, int):
        raise ParamsError(f"UNet config layers_per_block: {layers!r}; LDM names need one number for every level.")
    match = BLOCK_MODULE.fullmatch(module)
    part, level, kind, index, inner = match.groups() if match else (None,) * 5
    level, index, per_level = int(level or 0), int(index or 0), layers + 1
    if part == "down_blocks" and kind == "downsamplers" and inner == "conv":
        return f"input_blocks.{(level + 1) * per_level}.0.op"
    if part == "up_blocks" and kind == "upsamplers" and inner == "conv":
        slot = 2 if unet_config["up_block_types"][level].startswith("CrossAttn") else 1
        return f"output_blocks.{level * per_level + layers}.{slot}.conv"
    if kind == "resnets" and inner in LDM_RESNET:
        slot, inner = 0, LDM_RESNET[inner]
    elif kind == "attentions":
        slot = 1
    else:
        raise ParamsError(f"{module!r}: no LDM name for this UNet module (expected conv_in, conv_out, the time or "
                          "added embedding, or a ResNet, transformer, down- or upsampler of a block).")
    if part == "mid_block":  # ResNet, transformer, ResNet
        return f"middle_block.{1 if slot else 2 * index}.{inner}"
    if part == "down_blocks":
        return f"input_blocks.{1 + level * per_level + index}.{slot}.{inner}"
    return f"output_blocks.{level * per_level + index}.{slot}.{inner}"


def uses_ldm_names(unet_config: Mapping) -> bool:
    """Whether kohya names this UNet's modules by the LDM layout: its sd-scripts trains SDXL (the UNet with the
    `text_time` added embedding) on its own LDM-layout UNet, SD v1/v2 on diffusers' UNet."""
    return unet_config.get("addition_embed_type") == "text_time"


def kohya_name(module: str, unet_config: Mapping) -> str:
    """kohya's LoRA name of a UNet module: `lora_unet_` + its path ('.' → '_'), the LDM path for SDXL
    (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`), the diffusers path for SD v1/v2
    (`lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k`)."""
    path = ldm_module_name(module, unet_config) if uses_ldm_names(unet_config) else module
    return "lora_unet_" + path.replace(".", "_")


KOHYA_ALPHA = 1.0


def kohya_state_dict(layers: list[LoraLayer], unet_config: Mapping) -> dict[str, torch.Tensor]:
    """lora_down = A, lora_up = B · r / α and alpha = α = 1 for every module, so that the readers' scale α / r
    gives back W0 + BA. One α for all: diffusers maps per-module alphas of kohya files to names PEFT does not
    match (0.42.1 warns "alpha_pattern keys did not match any targeted module" and scales by the most common
    alpha), which would mis-scale every layer whose rank differs from it."""
    state = {}
    for layer in layers:
        name = kohya_name(layer.module, unet_config)
        state[f"{name}.lora_down.weight"] = layer.down
        state[f"{name}.lora_up.weight"] = layer.up * (layer.rank / KOHYA_ALPHA)
        state[f"{name}.alpha"] = torch.tensor(KOHYA_ALPHA)
    return state


def unet_delta(base_unet, erased_unet) -> dict[str, torch.Tensor]:
    """W − W0 for every parameter of two UNets of one architecture (a ParamsError naming the first mismatch)."""
    base, erased = base_unet.state_dict(), erased_unet.state_dict()
    if set(base) != set(erased):
        extra = sorted(set(base) ^ set(erased))
        raise ParamsError(f"--unet: the erased UNet and the base model's UNet have different layers (first: "
                          f"{extra[0]!r}); was it made from another base model?")
    mismatched = [n for n in base if base[n].shape != erased[n].shape]
    if mismatched:
        name = mismatched[0]
        raise ParamsError(f"--unet: {name} is {tuple(erased[name].shape)} in the erased UNet but "
                          f"{tuple(base[name].shape)} in the base model; was it made from another base model?")
    return {name: erased[name].float().cpu() - base[name].float().cpu() for name in base}


def write_lora(decomposition: LoraDecomposition, out_dir: Path, formats: str = "both",
               metadata: dict | None = None) -> dict:
    """The LoRA files of `formats` (diffusers | kohya | both), `lora_report.json` and a model card, written as
    one folder (atomically). Returns the report, file sizes included."""
    from safetensors.torch import save

    if formats not in FORMATS:
        raise ParamsError(f"--format: {formats!r} is not one of {FORMATS}.")
    component = decomposition.component
    if component != "unet" and formats == "kohya":
        raise ParamsError(f"--format: kohya names UNet modules; an SD 3.x or FLUX.1 {component}'s LoRA is written in "
                          "the diffusers format (--format diffusers).")
    metadata = {k: str(v) for k, v in (metadata or {}).items()} | {"lora_energy": str(decomposition.energy)}
    files, naming = {}, {}
    if formats in ("diffusers", "both"):
        files[DIFFUSERS_FILE] = save(diffusers_state_dict(decomposition.layers, component),
                                     metadata=metadata | peft_metadata(decomposition.layers, component))
    if formats in ("kohya", "both") and component == "unet":
        files[KOHYA_FILE] = save(kohya_state_dict(decomposition.layers, decomposition.unet_config), metadata=metadata)
        naming = {"kohya_names": "ldm" if uses_ldm_names(decomposition.unet_config) else "diffusers"}
    report = {**metadata, **decomposition.report(), **naming, "component": component,
              "files": {name: len(data) for name, data in files.items()}}
    with atomic_directory(Path(out_dir)) as tmp:
        for name, data in files.items():
            atomic_write_bytes(data, tmp / name)
        atomic_save_json(report, tmp / REPORT_FILE)
        atomic_write_text(lora_card(report), tmp / CARD_FILE)
    return report


def load_denoiser(folder: str, what: str, model_class: type, subfolder: str | None = None):
    """A diffusers denoiser of `model_class` (a UNet, or an SD 3.x or FLUX.1 transformer) from safetensors, in
    float32 on the CPU, with a one-line error naming `what`."""
    try:
        return model_class.from_pretrained(folder, subfolder=subfolder, use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{what}: no diffusers {model_class.__name__} could be loaded from {folder!r} "
                             f"({str(error).splitlines()[0]}); offline, a hub id only works if it is already in the "
                             "Hugging Face cache.") from None


def export_from_folders(unet_dir: str | Path, model: str, out_dir: str | Path, energy: float = 0.99,
                        formats: str = "both") -> dict:
    """`doco export-lora`: the LoRA of an erased UNet folder against the UNet of `model` (toy, a pipeline
    folder or a cached hub id). The erasure's `erasure.json` beside the UNet folder, if any, goes into the
    files' metadata and must name the same base model."""
    unet_dir = Path(unet_dir)
    check_energy(energy, "--energy")
    check_model_reference(model, "--model")
    if not (unet_dir / "config.json").is_file():
        raise ParamsError(f"--unet: {str(unet_dir)!r} is not a diffusers UNet folder (expected config.json and "
                          "diffusion_pytorch_model.safetensors inside).")
    info = erasure_metadata(unet_dir.parent)
    if info.get("base_model") not in (None, model):
        raise ParamsError(f"--model: {model!r}, but {unet_dir.parent / 'erasure.json'} says the UNet was erased "
                          f"from {info['base_model']!r}; pass --model {info['base_model']}.")
    component, model_class = denoiser_class(str(unet_dir))
    if component != "unet" and formats == "kohya":  # before loading anything
        raise ParamsError(f"--format: kohya names UNet modules; an SD 3.x or FLUX.1 {component}'s LoRA is written in "
                          "the diffusers format (--format diffusers).")
    base = load_denoiser(resolve_model(model), "--model", model_class, subfolder=component)
    erased = load_denoiser(str(unet_dir), "--unet", model_class)
    decomposition = decompose(erased, unet_delta(base, erased), energy)
    keep = ("method", "target", "anchor", "kind", "trainable")
    return write_lora(decomposition, Path(out_dir), formats,
                      {"base_model": model, **{k: info[k] for k in keep if k in info}})


def judged_comparison(model: str, unet_dir: str | Path, lora_dir: str | Path, target: str, n: int = 64,
                      steps: int = 25, guidance: float = 5.0, seed: int = 0, device: str = "cpu"):
    """Toy world: the judged rate of each toy shape's prompt set (`n` images each, the same prompts and seeds
    for every model) for the original model, the full erased weights and the base model with the LoRA loaded
    by `pipe.load_lora_weights` (its diffusers file, else its kohya file); a DataFrame with the LoRA's
    difference from the full weights in points."""
    import pandas as pd

    if not is_toy(model):
        raise ParamsError(f"--judge: the toy judge only knows the toy world, not {model!r}; evaluate an SD LoRA "
                          "with notebook 04.")
    judge = load_judge(device)
    sets = prompt_sets(target, list(render.SHAPES), n, seed)
    rates = {"original": judged_rates(load_pipeline(model, device), judge, sets, steps, guidance, seed),
             "full weights": judged_rates(load_pipeline(model, device, unet=str(unet_dir)), judge, sets, steps,
                                          guidance, seed)}
    with_lora = load_pipeline(model, device)
    written = DIFFUSERS_FILE if (Path(lora_dir) / DIFFUSERS_FILE).is_file() else KOHYA_FILE
    with_lora.load_lora_weights(str(lora_dir), weight_name=written)
    rates["LoRA"] = judged_rates(with_lora, judge, sets, steps, guidance, seed)
    table = pd.DataFrame({label: {name: 100 * rate for name, rate in r.items()} for label, r in rates.items()})
    table["LoRA − full (pts)"] = table["LoRA"] - table["full weights"]
    table.index.name = "prompt set (judged %)"
    return table


def record_judged(lora_dir: Path, table, n: int) -> None:
    """Keep a `judged_comparison` table in the LoRA folder (JUDGED_FILE), its report and its card."""
    lora_dir = Path(lora_dir)
    atomic_write_text(table.to_csv(float_format="%.2f"), lora_dir / JUDGED_FILE)
    report = json.loads((lora_dir / REPORT_FILE).read_text())
    report["judged"] = f"{n} images per prompt set, judged %:\n\n" + table.to_markdown(floatfmt=".1f")
    atomic_save_json(report, lora_dir / REPORT_FILE)
    atomic_write_text(lora_card(report), lora_dir / CARD_FILE)


# ---------------------------------------------------------------- model cards

def erasure_metadata(erasure_dir: Path) -> dict:
    """The export's `erasure.json` (method, base model, target, anchor, settings), or {} where there is none."""
    path = Path(erasure_dir) / "erasure.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _front_matter(base_model: str, tags: list[str]) -> str:
    """The Hub's YAML block: base_model only for a hub id (the Hub rejects any other value)."""
    from huggingface_hub import ModelCardData

    hub_id = HUB_ID.fullmatch(base_model) is not None and not Path(base_model).exists()
    license = LICENSES.get(base_model, "mit" if is_toy(base_model) else "other")
    data = ModelCardData(license=license, base_model=base_model if hub_id else None, library_name="diffusers",
                         tags=tags)
    return f"---\n{data.to_yaml()}\n---\n"


def _costs_section(erasure_dir: Path) -> str:
    """The cost records (doco_lib/costs.py): the trainer's `costs/training.json` and the run's phases
    (`<run>/costs/*.json`), wall time and peak memory each."""
    rows, notes = [], []
    for path in sorted((erasure_dir / "costs").glob("*.json")) + sorted((erasure_dir.parent / "costs").glob("*.json")):
        record = json.loads(path.read_text())
        gpu, rss = record.get("peak_gpu_bytes"), record.get("peak_rss_bytes")
        peak = f"{gpu / 2**30:.2f} GiB GPU" if gpu else f"{rss / 2**30:.2f} GiB RSS" if rss else "–"
        where = costs.machine_label(record["machine"]) if "machine" in record else record.get("gpu") or "–"
        rows.append(f"| {record.get('phase', path.stem)} | {record['seconds']:.1f} | {peak} | {where} |")
        if "changed_params" in record:  # of its own trainable parameters: SPM's are an adapter's, not the UNet's
            notes.append(f"Training changed {record['changed_params']:,} of its {record['trainable_params']:,} "
                         f"trainable parameters in {record['iterations']} iterations; the UNet has "
                         f"{record['unet_params']:,}.\n")
    if not rows:
        return "No cost records (`costs/*.json`) were written for this run.\n"
    return "| phase | seconds | peak memory | measured on |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n" + "".join(notes)


def _loading(base_model: str, unet: str | None = None, lora: str | None = None,
             weight_name: str = DIFFUSERS_FILE, component: str = "unet") -> str:
    """Python that loads the base model with an erased denoiser folder (`component`: unet, or transformer for SD 3.x
    and FLUX.1) or a LoRA file; `DiffusionPipeline` builds the class the base model's model_index.json names."""
    if is_toy(base_model):
        lines = ["from doco_lib.models import load_pipeline\n",
                 f"pipe = load_pipeline({base_model!r}" + (f", unet={unet!r})" if unet else ")")]
    else:
        model_class = "UNet2DConditionModel" if component == "unet" else "AutoModel"
        lines = ["from diffusers import DiffusionPipeline" + (f", {model_class}\n" if unet else "\n")]
        if unet:
            lines.append(f"{component} = {model_class}.from_pretrained({unet!r})")
        lines.append(f"pipe = DiffusionPipeline.from_pretrained({base_model!r}"
                     + (f", {component}={component})" if unet else ")"))
    if lora:
        lines.append(f"pipe.load_lora_weights({lora!r}, weight_name={weight_name!r})")
    return "```python\n" + "\n".join(lines) + "\n```\n"


def _export_files(erasure_dir: Path, info: dict) -> str:
    """What the export folder holds, each entry only where its file exists (SPM writes its adapter and no
    delta, DoCo its discriminator, `export_lora` a LoRA folder)."""
    adapter = info.get("adapter")
    lora_report = erasure_dir / "lora" / REPORT_FILE
    lora_files = json.loads(lora_report.read_text())["files"] if lora_report.is_file() else {}
    described = {
        "unet/": f"the UNet with the adapter `{adapter}` merged at strength 1, which is what the evaluation measures "
                 "(SPM's facilitated transport scales the adapter per prompt, so it needs the adapter file)"
                 if adapter else "the erased UNet (diffusers format, safetensors)",
        "delta.safetensors": "W − W0 of every trained tensor (float32), the erasure's settings in its metadata",
        "discriminator.safetensors": "the PatchGAN discriminator trained beside the UNet (not needed to sample)",
    }
    if adapter:
        described[adapter] = ("the SPM adapter in the SPM code's format (`lora_unet_<module>` `.lora_down`, "
                              "`.lora_up`, `.alpha`; rank, alpha and erased prompts in its metadata), for "
                              "`doco_lib.methods.spm.generate_with_transport`")
    if lora_files:
        listed = ", ".join(f"`{name}`" for name in lora_files)
        described["lora/"] = f"the change as a LoRA ({listed}), with its own card"
    return "".join(f"- `{name}`: {text}\n" for name, text in described.items() if (erasure_dir / name).exists())


def model_card(erasure_dir: Path) -> str:
    """README.md of an exported erasure (module docstring), from the files beside the UNet folder."""
    erasure_dir = Path(erasure_dir)
    info = erasure_metadata(erasure_dir)
    base_model = info.get("base_model", "unknown")
    method = info.get("method", "unknown")
    settings = json.loads(info["config"]) if "config" in info else {}
    tags = ["stable-diffusion", "text-to-image", "concept-erasure", "diffusers", f"erasure-{method}"]
    evaluation = erasure_dir / EVALUATION_FILE
    # The exported denoiser's pipeline component: a UNet, or an SD 3.x or FLUX.1 transformer.
    component = denoiser_class(str(erasure_dir / "unet"))[0] if (erasure_dir / "unet" / "config.json").is_file() \
        else "unet"
    as_lora = ("" if (erasure_dir / "lora" / REPORT_FILE).is_file() else
               f"`doco export-lora --unet <this folder>/unet --model {base_model} --out <folder>` writes the UNet's "
               "change as a LoRA.\n")
    lines = [_front_matter(base_model, tags),
             f"# {method} erasure of “{info.get('target', '?')}” ({info.get('kind', '?')})\n",
             f"The UNet of `{base_model}` with the concept **{info.get('target', '?')}** erased by **{method}** (the "
             f"run's anchor concept: **{info.get('anchor', '?')}**; trained: `{info.get('trainable', '?')}`). "
             "Written by DoCo lab at export.\n",
             "## Files\n", _export_files(erasure_dir, info),
             "## Use\n", _loading(base_model, unet="<this folder>/unet", component=component) + as_lora,
             "## Evaluation\n",
             evaluation.read_text() if evaluation.is_file() else
             "Not evaluated yet: notebook 04 (or `doco eval`) writes the measured table here.\n",
             "## Cost\n", _costs_section(erasure_dir),
             "## Settings\n", "```yaml\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()) + "```\n"]
    return "\n".join(lines)


def write_model_card(erasure_dir: Path) -> Path:
    path = Path(erasure_dir) / CARD_FILE
    atomic_write_text(model_card(erasure_dir), path)
    return path


def record_evaluation(erasure_dir: Path, table_markdown: str) -> Path:
    """Keep the measured table beside the export and rewrite its model card with it."""
    atomic_write_text(table_markdown.rstrip() + "\n", Path(erasure_dir) / EVALUATION_FILE)
    return write_model_card(erasure_dir)


def lora_card(report: dict) -> str:
    """README.md of an exported LoRA: what it was made from, ranks, its files, how to load it."""
    base_model = report.get("base_model", "unknown")
    tags = ["stable-diffusion", "text-to-image", "lora", "concept-erasure", "diffusers"]
    layout = ("LDM names (`lora_unet_input_blocks_…`), as kohya's SDXL LoRAs" if report.get("kohya_names") == "ldm"
              else "diffusers names (`lora_unet_down_blocks_…`), as kohya's SD v1/v2 LoRAs")
    roles = {DIFFUSERS_FILE: "diffusers/PEFT format, every layer's rank and alpha (scale 1) in its metadata",
             KOHYA_FILE: f"kohya format, alpha 1 per layer, {layout}"}
    files = [f"- `{name}`: {roles[name]}; {size / 1024:.1f} KiB\n" for name, size in report["files"].items()]
    files.append(f"- `{REPORT_FILE}`: rank, full rank and energy kept of every layer\n")
    if "judged" in report:
        files.append(f"- `{JUDGED_FILE}`: the toy judge's table below\n")
    left_out = (f"{len(report['left_out'])} changed tensors have no LoRA form (biases, norms) and are left out: "
                f"{100 * report['left_out_energy_share']:.3f}% of the change's energy.\n" if report["left_out"] else
                "Every changed tensor is a Linear or Conv2d weight: nothing was left out.\n")
    loaded = DIFFUSERS_FILE if DIFFUSERS_FILE in report["files"] else KOHYA_FILE  # diffusers reads either
    use = [_loading(base_model, lora="<this folder>", weight_name=loaded)]
    if "component" in report and report["component"] != "unet":
        use.append(f"The LoRA applies to the pipeline's `{report['component']}` (kohya's format names UNet modules, so "
                   "only the diffusers file is written).\n")
    if KOHYA_FILE in report["files"] and not is_toy(base_model):
        use.append(f"A1111 and ComfyUI: copy `{KOHYA_FILE}` into their LoRA folder (strength 1).\n")
    judged = report.get("judged")
    return "\n".join([
        _front_matter(base_model, tags),
        f"# LoRA: {report.get('method', 'erasure')} erasure of “{report.get('target', '?')}”\n",
        f"The weight change of an erased UNet of `{base_model}` as a LoRA by truncated SVD per layer, keeping "
        f"{100 * report['energy']:g}% of each layer's change energy (a relative error of at most "
        f"{100 * math.sqrt(1 - report['energy']):.3g}% per layer): {report['layers']} layers, rank "
        f"{report['rank_min']}–{report['rank_max']} (mean {report['rank_mean']:.1f}), {report['lora_parameters']:,} "
        f"parameters for a change of {report['full_delta_parameters']:,}.\n",
        left_out, "## Files\n", "".join(files), "## Use\n", *use,
        "## Erasure, LoRA against the full weights (toy judge)\n\n" + judged + "\n" if judged else ""])
