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
  no alphas (diffusers then sets alpha = rank per module); `pipe.load_lora_weights(folder)` reads it.
- kohya, `lora_kohya.safetensors`: `lora_unet_<module path, '.' → '_'>.lora_down.weight` (= A),
  `.lora_up.weight` (= B · r / α) and `.alpha` (α = 1; readers scale lora_up · lora_down by α / r). For SD
  v1/v2 UNets kohya's sd-scripts name the modules as diffusers does
  (`lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k`; only its SDXL LoRAs use the original
  `input_blocks_…` names); A1111 converts these names to its own, ComfyUI keeps a map of them, and diffusers'
  `load_lora_weights` converts them back (`lora_conversion_utils._convert_unet_lora_key`).

**Model card.** `write_model_card(erasure_dir)` writes README.md beside the exported UNet (the Hugging Face
Hub's format: YAML front matter with license, base_model when it is a hub id, tags, library_name), from the
export's `erasure.json`, the run's cost records, the LoRA report and the evaluation table once measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from doco_lib import costs
from doco_lib.errors import ModelLoadError, ParamsError
from doco_lib.io import atomic_directory, atomic_save_json, atomic_write_bytes, atomic_write_text
from doco_lib.models import HUB_ID, check_model_reference, is_toy, load_judge, load_pipeline, resolve_model
from doco_lib.toy import render
from doco_lib.toy.erasure import judged_rates, prompt_sets

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name `load_lora_weights(folder)` looks for first
KOHYA_FILE = "lora_kohya.safetensors"
REPORT_FILE = "lora_report.json"
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
    """The LoRA of a weight change `delta` (UNet parameter name → W − W0) of `unet`: Linear and Conv2d
    weights factorised (`factorise`), tensors that are exactly unchanged skipped, any other changed tensor
    left out and reported."""
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
    return LoraDecomposition(layers, {name: e / total for name, e in left_out.items()}, energy, total)


def diffusers_state_dict(layers: list[LoraLayer]) -> dict[str, torch.Tensor]:
    """PEFT keys under the pipeline's `unet.` prefix, as `StableDiffusionLoraLoaderMixin` reads them."""
    state = {}
    for layer in layers:
        state[f"unet.{layer.module}.lora_A.weight"] = layer.down
        state[f"unet.{layer.module}.lora_B.weight"] = layer.up
    return state


def kohya_name(module: str) -> str:
    """kohya's LoRA name of a UNet module: `lora_unet_` + its diffusers path with '.' → '_'."""
    return "lora_unet_" + module.replace(".", "_")


KOHYA_ALPHA = 1.0


def kohya_state_dict(layers: list[LoraLayer]) -> dict[str, torch.Tensor]:
    """lora_down = A, lora_up = B · r / α and alpha = α = 1 for every module, so that the readers' scale α / r
    gives back W0 + BA. One α for all: diffusers maps per-module alphas of kohya files to names PEFT does not
    match (0.42.1 warns "alpha_pattern keys did not match any targeted module" and scales by the most common
    alpha), which would mis-scale every layer whose rank differs from it."""
    state = {}
    for layer in layers:
        name = kohya_name(layer.module)
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
    metadata = {k: str(v) for k, v in (metadata or {}).items()} | {"lora_energy": str(decomposition.energy)}
    files = {}
    if formats in ("diffusers", "both"):
        files[DIFFUSERS_FILE] = save(diffusers_state_dict(decomposition.layers), metadata=metadata)
    if formats in ("kohya", "both"):
        files[KOHYA_FILE] = save(kohya_state_dict(decomposition.layers), metadata=metadata)
    report = {**metadata, **decomposition.report(), "files": {name: len(data) for name, data in files.items()}}
    with atomic_directory(Path(out_dir)) as tmp:
        for name, data in files.items():
            atomic_write_bytes(data, tmp / name)
        atomic_save_json(report, tmp / REPORT_FILE)
        atomic_write_text(lora_card(report), tmp / CARD_FILE)
    return report


def load_unet(folder: str, what: str, subfolder: str | None = None):
    """A diffusers UNet from safetensors, in float32 on the CPU, with a one-line error naming `what`."""
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(folder, subfolder=subfolder, use_safetensors=True,
                                                    dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{what}: no diffusers UNet could be loaded from {folder!r} ({str(error).splitlines()[0]}"
                             "); offline, a hub id only works if it is already in the Hugging Face cache.") from None


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
    base = load_unet(resolve_model(model), "--model", subfolder="unet")
    erased = load_unet(str(unet_dir), "--unet")
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
    """Keep a `judged_comparison` table in the LoRA folder (judged.csv), its report and its card."""
    lora_dir = Path(lora_dir)
    atomic_write_text(table.to_csv(float_format="%.2f"), lora_dir / "judged.csv")
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
        if "changed_params" in record:
            notes.append(f"Training changed {record['changed_params']:,} of the UNet's {record['unet_params']:,} "
                         f"parameters in {record['iterations']} iterations.\n")
    if not rows:
        return "No cost records (`costs/*.json`) were written for this run.\n"
    return "| phase | seconds | peak memory | measured on |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n" + "".join(notes)


def _loading(base_model: str, unet: str | None = None, lora: str | None = None) -> str:
    """Python that loads the base model with an erased UNet folder or a LoRA folder."""
    if is_toy(base_model):
        lines = ["from doco_lib.models import load_pipeline\n",
                 f"pipe = load_pipeline({base_model!r}" + (f", unet={unet!r})" if unet else ")")]
    else:
        lines = ["from diffusers import StableDiffusionPipeline, UNet2DConditionModel\n"]
        if unet:
            lines.append(f"unet = UNet2DConditionModel.from_pretrained({unet!r})")
        lines.append(f"pipe = StableDiffusionPipeline.from_pretrained({base_model!r}" + (", unet=unet)" if unet else ")"))
    if lora:
        lines.append(f"pipe.load_lora_weights({lora!r}, weight_name={DIFFUSERS_FILE!r})")
    return "```python\n" + "\n".join(lines) + "\n```\n"


def model_card(erasure_dir: Path) -> str:
    """README.md of an exported erasure (module docstring), from the files beside the UNet folder."""
    erasure_dir = Path(erasure_dir)
    info = erasure_metadata(erasure_dir)
    base_model = info.get("base_model", "unknown")
    method = info.get("method", "unknown")
    settings = json.loads(info["config"]) if "config" in info else {}
    tags = ["stable-diffusion", "text-to-image", "concept-erasure", "diffusers", f"erasure-{method}"]
    evaluation = erasure_dir / EVALUATION_FILE
    lines = [_front_matter(base_model, tags),
             f"# {method} erasure of “{info.get('target', '?')}” ({info.get('kind', '?')})\n",
             f"The UNet of `{base_model}` with the concept **{info.get('target', '?')}** erased by **{method}**, "
             f"mapped to the anchor **{info.get('anchor', '?')}**; trained parameters: `{info.get('trainable', '?')}`. "
             "Written by DoCo lab at export.\n",
             "## Use\n", _loading(base_model, unet="<this folder>/unet"),
             "`delta.safetensors` holds W − W0 of the trained tensors; "
             + ("`lora/` holds the change as a LoRA (diffusers and kohya files, with its own card).\n"
                if (erasure_dir / "lora" / REPORT_FILE).is_file() else
                f"`doco export-lora --unet <this folder>/unet --model {base_model} --out <folder>` writes it as a LoRA.\n"),
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
    """README.md of an exported LoRA: what it was made from, ranks, sizes, how to load it."""
    base_model = report.get("base_model", "unknown")
    tags = ["stable-diffusion", "text-to-image", "lora", "concept-erasure", "diffusers"]
    files = "\n".join(f"- `{name}`: {size / 1024:.1f} KiB" for name, size in report["files"].items())
    left_out = (f"{len(report['left_out'])} changed tensors have no LoRA form (biases, norms) and are left out: "
                f"{100 * report['left_out_energy_share']:.3f}% of the change's energy.\n" if report["left_out"] else
                "Every changed tensor is a Linear or Conv2d weight: nothing was left out.\n")
    use = []
    if DIFFUSERS_FILE in report["files"]:
        use.append(_loading(base_model, lora="<this folder>"))
    if KOHYA_FILE in report["files"]:
        use.append(f"A1111 and ComfyUI: copy `{KOHYA_FILE}` into their LoRA folder (kohya format, strength 1).\n")
    judged = report.get("judged")
    return "\n".join([
        _front_matter(base_model, tags),
        f"# LoRA: {report.get('method', 'erasure')} erasure of “{report.get('target', '?')}”\n",
        f"The weight change of an erased UNet of `{base_model}` as a LoRA by truncated SVD per layer, keeping "
        f"{100 * report['energy']:g}% of each layer's change energy: {report['layers']} layers, rank "
        f"{report['rank_min']}–{report['rank_max']} (mean {report['rank_mean']:.1f}), {report['lora_parameters']:,} "
        f"parameters for a change of {report['full_delta_parameters']:,}.\n",
        left_out, "## Files\n", files + "\n", "## Use\n", *use,
        "## Erasure, LoRA against the full weights (toy judge)\n" + judged + "\n" if judged else ""])
