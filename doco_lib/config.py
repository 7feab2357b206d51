"""Parameters: one schema, shared by papermill notebooks, the `doco` command line and the tests.

A params YAML file in `params/` holds values for any of the keys below; papermill passes them to
each notebook's `parameters` cell (`-f`), and `load_params` checks them before any work starts:
unknown keys (with the closest valid key suggested), wrong types, out-of-range values and missing
files are reported in one paragraph that names the key, the value and what was expected.
"""

from __future__ import annotations

import ast
import csv
import difflib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from doco_lib.concepts import KINDS, ConceptSpec, PromptFileError, read_preservation_file, read_prompt_file
from doco_lib.errors import ParamsError, ToyDefaultsWarning
from doco_lib.io import atomic_write_text, read_utf8
from doco_lib.methods import registry
from doco_lib.methods.rgd_prompts import SlotsError, load_slots
from doco_lib.models import check_model_reference, is_toy
from doco_lib.sampling import SAMPLERS
from doco_lib.tracking import TRACKERS, check_tracker


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `4e-6` as a number (YAML 1.1 would make it a string)."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]"
               r"?[0-9]+)?|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"),
    list("-+0123456789."))



@dataclass(frozen=True)
class Param:
    default: Any
    kind: type | tuple[type, ...]
    help: str
    notebooks: tuple[str, ...]
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    optional: bool = False  # None is allowed
    check: Callable[[str, Any], None] | None = None


def _existing_file(key: str, value: Any) -> None:
    if value and not Path(value).is_file():
        raise ParamsError(f"{key}: file {value!r} does not exist (expected a path to an existing file, "
                          f"relative to the directory the command runs in).")


def _attack_prompts_file(key: str, value: Any) -> None:
    expected = ("a CSV with a prompt column, e.g. UnlearnDiffAtk's nudity prompts: prompts/nudity.csv of "
                "github.com/OPTML-Group/Diffusion-MU-Attack (142 I2P prompts)")
    if value and not Path(value).is_file():
        raise ParamsError(f"{key}: file {value!r} does not exist; expected {expected}.")
    if value and "prompt" not in next(csv.reader(io.StringIO(read_utf8(Path(value)))), []):
        raise ParamsError(f"{key}: {value!r} has no column 'prompt' in its header; expected {expected}.")


I2P_SOURCE = ("the I2P benchmark's CSV, e.g. `huggingface-cli download AIML-TUDA/i2p i2p_benchmark.csv --repo-type "
              "dataset --local-dir data`")


def _i2p_csv(key: str, value: Any) -> None:
    if value and not Path(value).is_file():
        raise ParamsError(f"{key}: file {value!r} does not exist; expected {I2P_SOURCE}.")


def _device(key: str, value: Any) -> None:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ParamsError(f"{key}: {value!r} is not a device; expected 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'.")


def _model(key: str, value: Any) -> None:
    check_model_reference(value, key)


def _unet_folder(key: str, value: Any) -> None:
    if value and not (Path(value) / "config.json").is_file():
        raise ParamsError(f"{key}: {value!r} is not a diffusers UNet folder (expected config.json and "
                          "diffusion_pytorch_model.safetensors inside).")


def _unet_folders(key: str, value: Any) -> None:
    for folder in value:
        _unet_folder(key, folder)


def _run_name(key: str, value: Any) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        raise ParamsError(f"{key}: {value!r} is not a valid run name; use letters, digits, '_', '-' and '.', "
                          "no path separators (it becomes a folder under output_root).")


def _tracker_project(key: str, value: Any) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        raise ParamsError(f"{key}: {value!r} is not a valid project name; use letters, digits, '_', '-' and '.' (it "
                          "becomes a folder under <run>/<method>/tracking/ and wandb's project).")


def _list_of_words(key: str, value: Any) -> None:
    if not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ParamsError(f"{key}: expected a non-empty list of words, got {value!r}.")


def _list_of_positive_numbers(key: str, value: Any) -> None:
    if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
        raise ParamsError(f"{key}: expected a non-empty list of numbers > 0, got {value!r}.")


def _list_of_integers(noun: str, minimum: int):
    """The check of a non-empty list of integers ≥ `minimum` (`noun`: what they count, for the message)."""
    def check(key: str, value: Any) -> None:
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value):
            raise ParamsError(f"{key}: expected a non-empty list of {noun} (integers ≥ {minimum}), got {value!r}.")
    return check


_list_of_seeds = _list_of_integers("seeds", 0)
_list_of_step_counts = _list_of_integers("step counts", 1)
_list_of_relearning_steps = _list_of_integers("step counts", 0)


def parse_stage(stage: str) -> tuple[str, str, str, str]:
    """'target|anchor|anchor prompt file[|preservation prompt file]' → its parts ('' for no preservation file)."""
    parts = [p.strip() for p in stage.split("|")]
    if len(parts) == 3:
        parts.append("")
    if len(parts) != 4 or not all(parts[:3]):
        raise ParamsError(f"sequential_stages: {stage!r} should read 'target|anchor|anchor prompt file' or "
                          "'target|anchor|anchor prompt file|preservation prompt file'.")
    return parts[0], parts[1], parts[2], parts[3]


def _stages(key: str, value: Any) -> None:
    _list_of_words(key, value)
    for stage in value:
        _, _, prompts, preservation = parse_stage(stage)
        _existing_file(key, prompts)
        _existing_file(key, preservation)


def _variants(key: str, value: Any) -> None:
    _list_of_words(key, value)
    unknown = [v for v in value if v not in registry.VARIANTS]
    if unknown:
        raise ParamsError(f"{key}: unknown {unknown}; choose from {list(registry.VARIANTS)}.")


def _attacked_variants(key: str, value: Any) -> None:
    """Notebook 07 attacks SepME's erasure (on sepme_model) beside the harness's variants, as notebook 05 trains it."""
    _list_of_words(key, value)
    known = [*registry.VARIANTS, registry.SEPME]
    unknown = [v for v in value if v not in known]
    if unknown:
        raise ParamsError(f"{key}: unknown {unknown}; choose from {known}.")


# The attacks of doco_lib/studies/attacks (its registry `ATTACKS` names the same, in this order).
ATTACKS = ("tokens", "unlearndiff", "noise_probe", "completion", "textual_inversion", "relearning", "ring_a_bell",
           "gcg")


def _attacks(key: str, value: Any) -> None:
    _list_of_words(key, value)
    unknown = [v for v in value if v not in ATTACKS]
    if unknown:
        raise ParamsError(f"{key}: unknown attack {', '.join(map(repr, unknown))}; choose from {list(ATTACKS)}.")


def _fractions(key: str, value: Any) -> None:
    if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in value):
        raise ParamsError(f"{key}: expected a non-empty list of numbers between 0 and 1, got {value!r}.")


def _optimizer(key: str, value: Any) -> None:
    import importlib.util

    if value == "adam_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ParamsError(f"{key}: adam_8bit needs the bitsandbytes package (pip install bitsandbytes); "
                          "or use adam or adam_fused.")


def _positive(key: str, value: Any) -> None:
    if value is not None and value <= 0:
        raise ParamsError(f"{key}: {value!r} must be greater than 0.")


NB00, NB01, NB02, NB03 = "00_toy_world", "01_data_preparation", "02_discriminator_warmup", "03_adversarial_training"
NB04, NB05 = "04_evaluation", "05_ablations"
NB06, NB07, NB08, NB09 = "06_explorer", "07_robustness", "08_sepme", "09_damage_matrix"
NB10 = "10_styles_and_attributes"
ALL_NOTEBOOKS = (NB00, NB01, NB02, NB03, NB04, NB05, NB06, NB07, NB08, NB09, NB10)
# `doco demo`: the toy world, then the paper's pipeline (00 shows the toy world only); `doco batch`: the pipeline.
DEMO_NOTEBOOKS = (NB00, NB01, NB02, NB03, NB04)
BATCH_NOTEBOOKS = (NB01, NB02, NB03, NB04)
CONCEPT = (NB01, NB02, NB03, NB04, NB05, NB07, NB09, NB10)
TRAINING = (NB02, NB03, NB05, NB07, NB09, NB10)  # 07 trains the models it attacks, 09 and 10 their runs
SEPME_TRAINING = (NB05, NB07, NB08)  # 05 and 07 train the target's SepME increment as 08 does


def _preset(default, kind, help, choices=None, minimum=None, check=None):
    """A DoCo setting whose null default means: take it from the `fidelity` preset."""
    return Param(default, kind, help + " (null: from the fidelity preset)", TRAINING, choices=choices,
                 minimum=minimum, optional=True, check=check)


SCHEMA: dict[str, Param] = {
    # -- every notebook
    "run_name": Param("toy_world", str, "folder under output_root for this run's artefacts", ALL_NOTEBOOKS,
                      check=_run_name),
    "output_root": Param("outputs", str, "root folder of all run outputs", ALL_NOTEBOOKS),
    "model": Param("toy", str, "'toy', a local diffusers pipeline folder, or a hub id",
                   tuple(nb for nb in ALL_NOTEBOOKS if nb != NB08),
                   check=_model),
    "device": Param("auto", str, "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'", ALL_NOTEBOOKS, check=_device),
    "seed": Param(0, int, "base seed: image i of a prompt uses seed + i", ALL_NOTEBOOKS, minimum=0),
    "num_inference_steps": Param(25, int, "denoising steps when sampling", ALL_NOTEBOOKS, minimum=1, maximum=1000),
    "guidance_scale": Param(5.0, (int, float), "classifier-free guidance scale", ALL_NOTEBOOKS, minimum=0.0,
                            maximum=50.0),
    # -- 00: the toy world
    "samples_per_prompt": Param(32, int, "images per prompt for the judge's accuracy table", (NB00,), minimum=1,
                                maximum=10_000),
    "grid_columns": Param(8, int, "images per row in sample grids", (NB00, NB01, NB03, NB08), minimum=1,
                          maximum=64),
    "extra_prompts_file": Param("", str, "optional text file, one prompt a line, sampled into a grid ('' for none)",
                                (NB00,), check=_existing_file),
    # -- the concept (01-03)
    "base_unet": Param("", str, "start from this erased UNet folder instead of the model's ('': the model's "
                       "own), for sequential multi-concept erasure", (NB01, NB02, NB03, NB05), check=_unet_folder),
    "concept_kind": Param("instance", str, "instance, style or nudity", CONCEPT,
                          choices=KINDS),
    "anchor": Param("pentagon", str, "anchor concept c (instance: a word every anchor prompt contains)", CONCEPT),
    "target": Param("star", str, "target concept c* to erase", CONCEPT),
    "anchor_prompts_file": Param("params/prompts/toy_pentagon.txt", str, "anchor prompts, one per line", CONCEPT,
                                 check=_existing_file),
    "related_concepts": Param(["pentagon", "hexagon", "circle", "triangle"], list,
                              "concepts that must survive: shown in grids, measured in the toy world",
                              (NB03, NB05, NB07), check=_list_of_words),
    # -- 01: anchor data
    "n_anchor_images": Param(256, int, "anchor images the original model generates (paper: 1000)",
                             (NB01, NB05, NB07, NB09, NB10), minimum=1),
    "anchor_shard_size": Param(32, int, "images per generation batch and cache shard", (NB01, NB05, NB07, NB08, NB09, NB10),
                               minimum=1),
    "anchor_sampler": Param("pipeline", str, "sampler of the anchor images: pipeline (the model's own scheduler, PNDM on "
                            "SD as the paper) or dpmsolver++ (the authors' code; a deviation, with anchor_steps 25)",
                            (NB01, NB05, NB07, NB09, NB10), choices=SAMPLERS),
    "anchor_steps": Param(0, int, "denoising steps of the anchor images (0: num_inference_steps)",
                          (NB01, NB05, NB07, NB09, NB10), minimum=0, maximum=1000),
    "preservation_prompts_file": Param("", str, "optional prompts of other concepts to keep: the original model's "
                                       "images for them join the retaining loss L_r ('' for none)", CONCEPT,
                                       check=_existing_file),
    "n_preservation_images": Param(128, int, "images the original model generates for the preservation prompts",
                                   (NB01, NB05, NB07, NB09, NB10), minimum=1),
    # -- 02-03: training
    "method": Param("doco", str, "doco, or another method in the same harness: esd, conabl, rgd, uce or spm; or "
                    "sepme (doco train only: the target's increment, sepme_* keys)", TRAINING,
                    choices=registry.TRAIN_METHODS),
    "rgd_slots_file": Param("params/prompts/rgd_toy_star_slots.yaml", str, "RGD: slot vocabularies of the "
                            "forget/retain prompt twins", TRAINING, check=_existing_file),
    "rgd_prompts": Param(64, int, "RGD: number of training prompt twins", TRAINING, minimum=1),
    "rgd_alpha": Param(1.6, (int, float), "RGD: weight α of the projected retain gradient", TRAINING, minimum=0.0),
    "rgd_truncation": Param(1.1, (int, float), "RGD: no ascent on a batch whose forget loss exceeds m (0: off)",
                            TRAINING, minimum=0.0),
    "uce_code_version": Param(2023, int, "UCE: whose text rows, the 2023 code's (last word token on, \"\" kept) or "
                              "the 2025 code's (last word token only)", TRAINING, choices=registry.UCE_CODE_VERSIONS),
    "uce_lambda": Param(0.5, (int, float), "UCE: weight λ of staying at W0 in the closed form (code: 0.5)", TRAINING,
                        check=_positive),
    "uce_erase_scale": Param(1.0, (int, float), "UCE: weight s_e of the erased concept's rows (code: 1)", TRAINING,
                             minimum=0.0),
    "uce_preserve_scale": Param(None, (int, float), "UCE: weight s_p of the preserved rows (null: the code's, "
                                "max(0.1, 1/number preserved) for 2023, 1 for 2025)", TRAINING, minimum=0.0,
                                optional=True),
    "uce_preserve": Param(["triangle", "square", "heart", "cross"], list, "UCE: concepts whose keys and values are "
                          "kept ([]: the code's default for objects; toy: the shapes the preservation prompts retain)",
                          TRAINING, check=lambda key, value: _list_of_words(key, value) if value else None),
    "spm_rank": Param(1, int, "SPM: adapter rank (one-dimensional: 1)", TRAINING, minimum=1),
    "spm_alpha": Param(4.0, (int, float), "SPM: adapter scale α, the branch × α/rank (code: 1; toy: 4, as at α 1 "
                       "the toy world's lr left star drawn)", TRAINING, check=_positive),
    "spm_guidance": Param(1.0, (int, float), "SPM: erasing guidance g of the target ε(∅) − g(ε(c) − ε(∅)) (code: 1)",
                          TRAINING, minimum=0.0),
    "spm_anchor_strength": Param(10.0, (int, float), "SPM: weight of the latent-anchoring loss (code: 1000; toy: "
                                 "10, as 100 and 1000 held the toy adapters still)", TRAINING, minimum=0.0),
    "spm_anchors": Param(4, int, "SPM: random anchor embeddings drawn per iteration (code: 4)", TRAINING, minimum=1),
    "spm_anchor_batch": Param("official", str, "SPM: anchors reaching the loss: official (the code's, half of them "
                              "replaced by \"\") or intended (all drawn)", TRAINING, choices=registry.SPM_ANCHOR_BATCHES),
    "spm_prompts": Param("target_prompts", str, "SPM: what it erases on: concept (the code's: the target word alone) "
                         "or target_prompts (the anchor prompts with the target in place of the anchor, as ESD here; "
                         "toy: the bare word 'star' left the toy's captioned star drawn at 100%)",
                         TRAINING, choices=registry.SPM_PROMPTS),
    "spm_denoising_steps": Param(10, int, "SPM: DDIM steps K that x_t is sampled with, k in [1, K) of them (code: "
                                 "30; toy: 10, a third of the time)", TRAINING, minimum=2),
    "spm_start_guidance": Param(3.0, (int, float), "SPM: guidance of that sampling (code: 3)", TRAINING, minimum=0.0),
    "spm_lr_warmup": Param(0, int, "SPM: iterations of linear learning-rate warm-up (code: 500 of 3000; toy: 0)",
                           TRAINING, minimum=0),
    "spm_lr_cycles": Param(0, int, "SPM: cosine cycles with hard restarts after the warm-up (code: 3; toy: 0, a "
                           "constant lr)", TRAINING, minimum=0),
    "esd_eta": Param(1.0, (int, float), "ESD: strength η of the negative guidance target", TRAINING, minimum=0.0),
    "esd_steps": Param(25, int, "ESD: DDIM steps of the partial denoising (ESD: 50)", TRAINING, minimum=2),
    "esd_start_guidance": Param(3.0, (int, float), "ESD: guidance of the partial denoising", TRAINING, minimum=0.0),
    "adv_prompt_every": Param(0, int, "DoCo and ESD, robust erasure (AdvUnlearn-style, doco_lib/methods/"
                              "adversarial_prompts.py): an inner attack on soft prefix tokens of the target prompts "
                              "every this many iterations from warmup_iterations on, its prompts trained on beside "
                              "the targets (AdvUnlearn: 20; 0: off)", TRAINING, minimum=0),
    "adv_prompt_tokens": Param(3, int, "soft prefix tokens per target prompt (AdvUnlearn: 3)", TRAINING, minimum=1),
    "adv_prompt_steps": Param(30, int, "Adam steps of each inner attack (AdvUnlearn: 30)", TRAINING, minimum=1),
    "adv_prompt_lr": Param(0.01, (int, float), "Adam learning rate of the inner attack (AdvUnlearn: 0.01)", TRAINING,
                           check=_positive),
    "adv_prompt_fraction": Param(0.5, (int, float), "share of the target batch conditioned on the adversarial "
                                 "prompts instead of the target prompts (AdvUnlearn: 1)", TRAINING, minimum=0.0,
                                 maximum=1.0),
    "conabl_variant": Param("model", str, "ConAbl: match the frozen model's anchor prediction (model) or the noise",
                            TRAINING, choices=registry.CONABL_VARIANTS),
    "conabl_retain": Param(True, bool, "ConAbl: add the diffusion loss on anchor images", TRAINING),
    "fidelity": Param("official", str, "preset: 'paper' (the paper's text) or 'official' (the authors' code)",
                      TRAINING, choices=tuple(registry.FIDELITY_PRESETS)),
    "iterations": Param(400, int, "total iterations, warm-up included (paper: 1000)", TRAINING, minimum=1),
    "warmup_iterations": Param(100, int, "first iterations train only the discriminator (paper: 200)", TRAINING,
                               minimum=0),
    "batch_size": Param(8, int, "anchor latents per iteration and process (paper: 8)", TRAINING, minimum=1),
    "lr": Param(3e-4, (int, float), "UNet learning rate, Adam (paper: 4e-6 on SD)", TRAINING, check=_positive),
    "disc_lr": Param(1e-3, (int, float), "discriminator learning rate, Adam", TRAINING, check=_positive),
    "retain_mode": Param("cp", str, "none (G_u alone), l2 (gradient of L_u + α L_r), cp (concept-preserving "
                         "gradient, eq. 9) or rgd (RGD's restricted gradient)", TRAINING,
                         choices=registry.RETAIN_MODES),
    "retain_weight": _preset(None, (int, float), "α, the weight of the retaining loss L_r", minimum=0.0),
    "surgery_lambda": Param(1.0, (int, float), "λ of eq. 9", TRAINING, minimum=0.0),
    "surgery_scope": _preset(None, str, "dot products over all parameters (global) or per tensor",
                             choices=("global", "per_tensor")),
    "projection": _preset(None, str, "exact projection (eq. 9) or the authors' cos·unit(G_r) update",
                          choices=("exact", "official")),
    "add_retain_grad": _preset(None, bool, "with cp, also add G_r to the update"),
    "disc_input": _preset(None, str, "what D sees: predicted noise (eps) or predicted clean latent (x0)",
                          choices=("eps", "x0")),
    "disc_real_source": _preset(None, str, "'real' anchor prediction from the trained UNet or a frozen copy",
                                choices=("trained", "frozen")),
    "disc_layers": _preset(3, int, "convolutions in the PatchGAN discriminator (toy 8×8 latents: at most 3)",
                           minimum=2),
    "disc_channels": Param(64, int, "width of D's first layer", TRAINING, minimum=1),
    "disc_norm": _preset(None, str, "normalisation in D", choices=("batch", "instance", "none")),
    "disc_final_stride": _preset(None, int, "stride of D's last convolution", minimum=1),
    "disc_beta1": _preset(None, (int, float), "Adam beta1 of D", minimum=0.0),
    "gan_mode": Param("vanilla", str, "vanilla (BCE with logits, eq. 8) or lsgan", TRAINING,
                      choices=("vanilla", "lsgan")),
    "max_grad_norm": _preset(None, (int, float), "clip G_u and G_r to this norm before surgery (0: off)",
                             minimum=0.0),
    "trainable": Param("cross_attention_kv", str, "which UNet parameters are fine-tuned", TRAINING,
                       choices=registry.TRAINABLE),
    "checkpoint_every": Param(50, int, "iterations between checkpoints", TRAINING, minimum=1),
    "mixed_precision": Param("no", str, "accelerate mixed precision; auto: bf16 on GPUs with it, else fp16, none "
                             "on the CPU", TRAINING, choices=("no", "auto", "bf16", "fp16")),
    "gradient_accumulation_steps": Param(1, int, "micro-batches per update", TRAINING, minimum=1),
    "gradient_checkpointing": Param(False, (bool, str), "trade compute for UNet activation memory: true, false, or "
                                    "auto (on a GPU off when a trial of the largest iteration fits its memory, else "
                                    "on; off on a CPU)", TRAINING, choices=(True, False, "auto")),
    "optimizer": Param("adam", str, "UNet optimizer: adam (multi-tensor), adam_fused, or adam_8bit (bitsandbytes)",
                       TRAINING, choices=registry.OPTIMIZERS, check=_optimizer),
    "frozen_dtype": Param("shared", str, "the original denoiser ESD, ConAbl, DoCo's frozen real source and "
                          "adversarial prompts read: shared (the trained one with its trained parameters' starting "
                          "values swapped in per call, no second copy), or a separate copy in a dtype (auto: half "
                          "precision on GPUs, float32 elsewhere)", TRAINING,
                          choices=("shared", "auto", "float32", "float16", "bfloat16")),
    "weight_dtype": Param("float32", str, "dtype the pipeline is loaded in for training; the trained parameters and "
                          "their Adam state stay float32 (diffusers' cast_training_params). bfloat16 or float16 halve "
                          "the frozen weights' memory (FLUX.1's transformer: 48 → 24 GB) and need mixed_precision",
                          TRAINING, choices=("float32", "float16", "bfloat16")),
    "attention": Param("sdpa", str, "attention kernels: sdpa (torch's fused attention) or classic", TRAINING,
                       choices=("sdpa", "classic")),
    "compile_unet": Param(False, bool, "torch.compile the UNet (slow first steps, faster later ones on GPUs)",
                          TRAINING),
    "export_lora": Param(False, bool, "also export the erasure as a LoRA in <run>/<method>/lora/ (diffusers and "
                         "kohya files, doco_lib/export.py)", TRAINING),
    "lora_energy": Param(0.99, (int, float), "share of each layer's weight-change energy the exported LoRA keeps "
                         "(sets its rank per layer)", TRAINING, maximum=1.0, check=_positive),
    "tracker": Param("none", str, "experiment tracking through accelerate: none, tensorboard or wandb (offline unless "
                     "WANDB_MODE says otherwise), into <run>/<method>/tracking/", TRAINING, choices=TRACKERS,
                     check=check_tracker),
    "tracker_project": Param("doco-lab", str, "the tracker's project: TensorBoard's folder under tracking/, wandb's "
                             "project", TRAINING, check=_tracker_project),
    "tracker_sample_every": Param(0, int, "iterations between the tracker's sample grids (target and anchor prompt, "
                                  "2 seeds each; 0: none)", TRAINING, minimum=0),
    # -- 04: evaluation
    "eval_models": Param([], list, "erased UNet folders to evaluate ([]: this run's doco/unet)", (NB04,),
                         check=lambda key, value: _list_of_words(key, value) if value else None),
    "eval_concepts": Param(["star", "pentagram", "pentagon", "hexagon", "circle", "triangle"], list,
                           "concepts in the results table", (NB04,), check=_list_of_words),
    "erased_concepts": Param(["star", "pentagram"], list, "concepts the models erased (↓ columns), synonyms too",
                             (NB04,), check=lambda key, value: _list_of_words(key, value) if value else None),
    "eval_templates": Param("toy", str, "prompt templates: clip80 (CLIP's 80 ImageNet templates) or toy",
                            (NB04, NB05, NB08),
                            choices=("clip80", "toy")),
    "n_templates": Param(0, int, "templates per concept (0: all of the set)", (NB04, NB05, NB08, NB10), minimum=0,
                         maximum=80),
    "images_per_template": Param(8, int, "images per template and concept", (NB04, NB05, NB08, NB10),
                                 minimum=1),
    "clip_model": Param("toy", str, "CLIP for CS/CA and for 07's zero-shot judge on SD: 'toy' (the evaluation toy "
                        "CLIP) or a local folder or hub id, e.g. openai/clip-vit-large-patch14",
                        (NB04, NB05, NB07, NB08, NB10)),
    "clip_score_definition": Param("torchmetrics", str, "torchmetrics (100·max(cos,0)), logits (100·cos) or hessel "
                                   "(2.5·max(cos,0))", (NB04,), choices=("torchmetrics", "logits", "hessel")),
    "fid_features": Param("judge", str, "FID features: inception (FID InceptionV3) or judge (toy world)",
                          (NB04, NB05, NB08, NB10),
                          choices=("inception", "judge")),
    "sample_batch_size": Param(0, int, "images per pipeline call when evaluating (0: on a GPU as many as fill its free "
                               "memory, a power of two up to 64; on a CPU by latent size, 64 in the toy world)",
                               (NB03, NB04), minimum=0),
    "eval_sampler": Param("pipeline", str, "sampler of the evaluation images: pipeline (the model's own scheduler, as "
                          "the paper evaluates) or dpmsolver++ (faster; a deviation, say so when reporting)", (NB04,),
                          choices=SAMPLERS),
    "compile_sampling": Param(False, bool, "torch.compile the evaluation pipelines' UNet (GPUs: a slow first batch, "
                              "faster later ones)", (NB04,)),
    "related_top_k": Param(10, int, "vocabulary words shown in the related-concept ranking", (NB04,), minimum=1),
    "i2p_csv": Param("", str, "I2P prompts CSV (prompt, evaluation_seed, evaluation_guidance) for the nudity "
                     "evaluation ('' to skip; required for concept_kind nudity)", (NB04,), check=_i2p_csv),
    "i2p_limit": Param(0, int, "use only the first N I2P prompts (0: all)", (NB04,), minimum=0),
    "nudity_threshold": Param(0.2, (int, float), "NudeNet score threshold (NudeNet's own floor is 0.2)", (NB04,),
                              minimum=0.0, maximum=1.0),
    "eval_samples": Param(64, int, "images per prompt set when judging the erasure (toy world)",
                          (NB03, NB05, NB08, NB09, NB10), minimum=1),
    # -- 05: ablations
    "ablation_variants": Param(["DoCo (none)", "DoCo (l2)", "DoCo (cp)", "ESD-x", "ConAbl", "RGD", "UCE", "SPM",
                                "SepME"], list,
                               "methods and retain modes compared (doco_lib.methods.registry.VARIANTS, and SepME on "
                               "sepme_model)", (NB05,),
                               check=_list_of_words),
    "ablation_seeds": Param([0, 1, 2], list, "seeds per variant (the paper's tables: one run, we use several)",
                            (NB05,), check=_list_of_seeds),
    "sweep_guidance_scales": Param([1.5, 3.0, 5.0, 7.5, 10.0], list, "guidance scales the erasure is judged at (the "
                                   "sampling sweep; toy world)", (NB05,), check=_list_of_positive_numbers),
    "sweep_steps": Param([10, 25, 50], list, "denoising step counts the erasure is judged at (the sampling sweep; "
                         "toy world)", (NB05,), check=_list_of_step_counts),
    "cross_domain_concepts": Param([], list, "concepts of another kind than the target (e.g. styles when erasing an "
                                   "object): UnlearnCanvas's CRA on real models, by CLIP accuracy (the toy world "
                                   "reads its judge's colour and style heads)", (NB05,),
                                   check=lambda key, value: _list_of_words(key, value) if value else None),
    "sequential_stages": Param(["star|pentagon|params/prompts/toy_pentagon.txt",
                                "heart|circle|params/prompts/toy_circle.txt",
                                "cross|square|params/prompts/toy_square.txt"], list,
                               "multi-concept erasure, in order: 'target|anchor|anchor prompt file' per stage (a "
                               "fourth field: that stage's preservation prompt file instead of "
                               "preservation_prompts_file)", (NB05,), check=_stages),
    "sequential_keep_erased": Param(True, bool, "sequential erasure: each stage retains the earlier stages' targets "
                                    "as erased (their prompts over their anchors' images join its retaining batch)",
                                    (NB05,)),
    "multi_concept_seeds": Param([0, 1, 2], list, "seeds of the sequential and simultaneous multi-concept runs",
                                 (NB05,), check=_list_of_seeds),
    "multi_concept_model": Param("", str, "base model of the sequential and simultaneous runs ('': model), e.g. "
                                 "toy-wide, whose wider text encoder keeps the toy shapes apart", (NB05,),
                                 check=lambda key, value: _model(key, value) if value else None),
    # -- 08: SepME, separable erase and restore (doco_lib/methods/sepme.py, doco_lib/studies/sepme_study.py)
    "sepme_model": Param("toy-wide", str, "SepME's base model: 'toy-wide' (the toy world with a text encoder wide "
                         "enough for SepME's null spaces), a pipeline folder or a hub id", SEPME_TRAINING, check=_model),
    "sepme_concepts": Param(["star", "heart", "cross"], list, "concepts erased one increment each (at least 2)",
                            SEPME_TRAINING, check=_list_of_words),
    "sepme_name_template": Param("a photo of a {concept}", str, "each concept's name prompt: the other "
                                 "increments are decoupled against it", SEPME_TRAINING),
    "sepme_prompt_files": Param([], list, "prompts of each concept's training images, a file per concept ([]: toy "
                                "captions in a toy world, else the name prompt)", SEPME_TRAINING,
                                check=lambda key, value: _list_of_words(key, value) if value else None),
    "sepme_images": Param(64, int, "images of each concept the base model generates for its increment", SEPME_TRAINING,
                          minimum=1),
    "sepme_lr": Param(0.1, (int, float), "Adam learning rate of P (authors' README run: 0.1)", SEPME_TRAINING,
                      check=_positive),
    "sepme_scale": Param(0.01, (int, float), "scale of the null-space basis B (README run: 1e-4, too small a step "
                         "for the toy world, their argparse default: 1e-2)", SEPME_TRAINING, check=_positive),
    "sepme_threshold": Param(-2e-3, (int, float), "stop once the correlation's momentum falls below this "
                             "(README run: 1e-4, which stops the toy increments with the correlation still near 0)",
                             SEPME_TRAINING),
    "sepme_beta": Param(1e-6, (int, float), "weight of the L1 penalty on the increment", SEPME_TRAINING, minimum=0.0),
    "sepme_max_steps": Param(1000, int, "most training steps per concept", SEPME_TRAINING, minimum=1),
    "sepme_batch_size": Param(1, int, "images per step (the authors': 1)", SEPME_TRAINING, minimum=1),
    "sepme_first_row_only": Param(False, bool, "the authors' quirk: the increment reaches batch element 0 only",
                                  SEPME_TRAINING),
    "sepme_accumulate_grads": Param(False, bool, "the authors' quirk: gradients are never zeroed", SEPME_TRAINING),
    "sepme_related": Param(["pentagon", "circle"], list, "further concepts measured (not decoupled against)",
                           (NB08,), check=_list_of_words),
    "sepme_restore": Param("star", str, "the concept erased with another one and then restored", (NB08,)),
    # -- 09: collateral-damage matrix
    "damage_variants": Param(["DoCo (cp)", "DoCo (none)", "ESD-x", "ConAbl"], list, "methods of the collateral-"
                             "damage matrix, each erasing every shape of damage_shapes in turn "
                             "(doco_lib.methods.registry.VARIANTS)", (NB09,), check=_list_of_words),
    "damage_shapes": Param(["circle", "square", "triangle", "star", "pentagon", "hexagon", "heart", "cross"], list,
                           "shapes erased in turn and judged after each erasure (toy world)", (NB09,),
                           check=_list_of_words),
    "damage_seed": Param(0, int, "seed of the matrix's runs and of their judged images", (NB09,), minimum=0),
    # -- 10: toy Table 2 (styles) and toy Figure 6 (an implicit attribute)
    "study_variants": Param(["DoCo (cp)", "ESD-x", "ConAbl", "RGD", "UCE", "SPM"], list, "methods compared on the "
                            "style and attribute erasures (doco_lib.methods.registry.VARIANTS)", (NB10,),
                            check=_variants),
    "study_seeds": Param([0, 1, 2], list, "training seeds of every style and attribute run", (NB10,),
                         check=_list_of_seeds),
    "style_targets": Param(["striped", "dotted", "checkered"], list, "toy styles erased in turn, each to the plain "
                           "background", (NB10,), check=_list_of_words),
    "attribute": Param("orange", str, "toy colour erased wherever it appears, implicit prompts included", (NB10,)),
    "implicit_candidates_file": Param("params/prompts/toy_implicit_candidates.txt", str, "words tried as \"a photo "
                                      "of a <word>\" beside the colour-free captions when searching implicit prompts",
                                      (NB10,), check=_existing_file),
    "implicit_samples": Param(16, int, "images per candidate prompt when searching the implicit prompts", (NB10,),
                              minimum=1),
    "implicit_threshold": Param(0.5, (int, float), "a candidate is implicit when the original model draws the "
                                "attribute at least this often", (NB10,), minimum=0.0, maximum=1.0),
    "implicit_images": Param(16, int, "images (seeds) per implicit prompt in the I2P-format CSV", (NB10,), minimum=1),
    # -- 06: the interactive explorer (doco_lib/app/explorer.py)
    "explorer_prompt": Param("a photo of a star", str, "the explorer's first prompt (any prompt can be typed in)",
                             (NB06,)),
    # -- 07: robustness against attacks (doco_lib/studies/robustness.py, doco_lib/studies/attacks)
    "attack_variants": Param(["DoCo (cp)", "ESD-x", "ConAbl"], list, "erasure methods attacked, trained as in 05 "
                             "(doco_lib.methods.registry.VARIANTS, and SepME on sepme_model)", (NB07,),
                             check=_attacked_variants),
    "attack_model_seeds": Param([0], list, "training seeds of the attacked models (05's runs are reused)", (NB07,),
                                check=_list_of_seeds),
    "attack_unets": Param([], list, "further erased UNet folders to attack ([]: none)", (NB07,),
                          check=_unet_folders),
    "attack_control": Param("circle", str, "control concept: the start prompts with the target replaced by it, "
                            "attacked by attack_controls and judged as the target", (NB07,)),
    "attack_controls": Param([], list, "attacks also run from the control concept's prompts ([]: no control; the "
                             "toy judge calls over-noised circles stars, so read noise_probe beside its control)",
                             (NB07,), check=lambda key, value: _attacks(key, value) if value else None),
    "attacks": Param(["tokens", "unlearndiff"], list, "attacks (doco_lib/studies/attacks): tokens (greedy token "
                     "search, black box), unlearndiff (UnlearnDiffAtk's soft prefix tokens, white box), noise_probe "
                     "(initial noise scaled up), completion (the original model's images noised part way, completed by "
                     "the erased model), textual_inversion (CCE: one new word learnt against the erased model), "
                     "relearning (a copy of the erased UNet fine-tuned on a few images of the target), ring_a_bell "
                     "(Ring-A-Bell: a genetic search for a prompt whose text embedding is the start prompt's plus the "
                     "concept's direction) and/or gcg (MMA-Diffusion: a gradient-guided token search for a prompt "
                     "whose text embedding is the start prompt's, the target's words forbidden)", (NB07,),
                     check=_attacks),
    "attack_attempts": Param(6, int, "attempts per model and attack (start prompts and seeds differ)", (NB07,),
                             minimum=1, maximum=10_000),
    "attack_tokens": Param(2, int, "adversarial tokens per prompt (appended, or substituted)", (NB07,), minimum=1,
                           maximum=20),
    "attack_positions": Param("append", str, "tokens attack: append slots to the prompt or substitute its non-target "
                              "tokens", (NB07,), choices=("append", "substitute")),
    "attack_search_steps": Param(3, int, "tokens attack: greedy steps (one slot each)", (NB07,), minimum=1),
    "attack_candidates": Param(4, int, "tokens attack: vocabulary tokens tried per step", (NB07,), minimum=1),
    "attack_images": Param(4, int, "images k per prompt, for the search score and for the final judgement", (NB07,),
                           minimum=1, maximum=50),
    "attack_vocabulary": Param("captions", str, "candidate tokens: captions (the toy captions' words) or words (every "
                               "whole-word token)", (NB07,), choices=("captions", "words")),
    "attack_prompts_file": Param("", str, "start prompts from an I2P-format CSV (column prompt), e.g. UnlearnDiffAtk's "
                                 "142 nudity prompts (prompts/nudity.csv of OPTML-Group/Diffusion-MU-Attack), instead "
                                 "of the concept's target prompts ('': those)", (NB07,), check=_attack_prompts_file),
    "attack_nudity_threshold": Param(0.45, (int, float), "concept_kind nudity on SD: an image is judged nude when "
                                     "NudeNet finds an EXPOSED class at this score or above (UnlearnDiffAtk: 0.45)",
                                     (NB07,), minimum=0.0, maximum=1.0),
    "attack_unlearndiff_tokens": Param(5, int, "unlearndiff: soft prefix tokens (UnlearnDiffAtk's budget: 5)",
                                       (NB07,), minimum=1, maximum=20),
    "attack_unlearndiff_steps": Param(40, int, "unlearndiff: Adam steps on the prefix embeddings (UnlearnDiffAtk: 40)",
                                      (NB07,), minimum=1),
    "attack_unlearndiff_lr": Param(0.01, (int, float), "unlearndiff: Adam learning rate (UnlearnDiffAtk: 0.01)",
                                   (NB07,), check=_positive),
    "attack_unlearndiff_images": Param(8, int, "unlearndiff: target images of the original model per attempt",
                                       (NB07,), minimum=1, maximum=50),
    "attack_noise_scales": Param([1.5, 2.0], list, "noise_probe: factors on the initial noise tried (the best on the "
                                 "search seeds is judged; 1 is plain sampling)", (NB07,),
                                 check=_list_of_positive_numbers),
    "attack_completion_strengths": Param([0.5, 0.75], list, "completion: how far the original model's images are "
                                         "noised before the erased model completes them (0: not at all, 1: plain "
                                         "sampling); the best on the search images is judged", (NB07,),
                                         check=_fractions),
    "attack_ti_steps": Param(100, int, "textual_inversion: Adam steps on the new word's embedding (the issue's SD "
                             "trial: 300)", (NB07,), minimum=1),
    "attack_ti_lr": Param(5e-3, (int, float), "textual_inversion: Adam learning rate (the issue's SD trial: 5e-3)",
                          (NB07,), check=_positive),
    "attack_ti_images": Param(8, int, "textual_inversion: images of the original model it learns the word on "
                              "(the issue's SD trial: 256)", (NB07,), minimum=1, maximum=1024),
    "attack_ti_initializer": Param("shape", str, "textual_inversion: the word whose embedding the new word starts from "
                                   "(a coarse class name, e.g. object on SD)", (NB07,)),
    "attack_relearn_steps": Param([0, 10, 50], list, "relearning: fine-tuning step counts at which the start prompt "
                                  "is judged (cumulative; the largest is the attack's verdict, 0: plain sampling)",
                                  (NB07,), check=_list_of_relearning_steps),
    "attack_relearn_lr": Param(3e-4, (int, float), "relearning: Adam learning rate of the UNet copy", (NB07,),
                               check=_positive),
    "attack_relearn_images": Param(8, int, "relearning: images of the original model it fine-tunes on",
                                   (NB07,), minimum=1, maximum=1024),
    "attack_ring_a_bell_population": Param(64, int, "ring_a_bell: prompts per generation of the genetic search "
                                           "(Ring-A-Bell: 200)", (NB07,), minimum=2),
    "attack_ring_a_bell_generations": Param(100, int, "ring_a_bell: generations of the genetic search "
                                            "(Ring-A-Bell: 3000)", (NB07,), minimum=1),
    "attack_ring_a_bell_tokens": Param(8, int, "ring_a_bell: tokens K of the searched prompt (Ring-A-Bell: 16, or "
                                       "75 for its K = 77)", (NB07,), minimum=1, maximum=75),
    "attack_ring_a_bell_eta": Param(3.0, (int, float), "ring_a_bell: strength η of the concept vector added to the "
                                    "start prompt's embedding (Ring-A-Bell: 3 for nudity)", (NB07,), check=_positive),
    "attack_ring_a_bell_mutation": Param(0.25, (int, float), "ring_a_bell: probability that a child prompt has one "
                                         "token replaced (Ring-A-Bell: 0.25)", (NB07,), minimum=0.0, maximum=1.0),
    "attack_gcg_tokens": Param(8, int, "gcg: tokens of the adversarial prompt (MMA-Diffusion: 20)", (NB07,),
                               minimum=1, maximum=75),
    "attack_gcg_steps": Param(50, int, "gcg: greedy coordinate gradient steps (MMA-Diffusion: 1000)", (NB07,),
                              minimum=1),
    "attack_gcg_topk": Param(16, int, "gcg: tokens with the most promising gradient per position that a swap "
                             "draws from (MMA-Diffusion: 256)", (NB07,), minimum=1),
    "attack_gcg_candidates": Param(64, int, "gcg: single-token swaps evaluated per step (MMA-Diffusion: 512)",
                                   (NB07,), minimum=1),
    "attack_success_fraction": Param(0.5, (int, float), "an attempt succeeds when at least this fraction of its k "
                                     "images is judged the target", (NB07,), maximum=1.0, check=_positive),
}


def _check_combinations(resolved: dict[str, Any]) -> None:
    """Rules that involve several keys; each names the keys and the values."""
    if resolved["warmup_iterations"] >= resolved["iterations"]:
        raise ParamsError(f"warmup_iterations ({resolved['warmup_iterations']}) must be smaller than iterations "
                          f"({resolved['iterations']}): the warm-up trains only the discriminator.")
    if resolved["n_anchor_images"] < 2:
        raise ParamsError(f"n_anchor_images: {resolved['n_anchor_images']} leaves no retain data: one anchor image is "
                          "held out to measure the discriminator, and training draws its batches (and the retaining "
                          "loss L_r of retain_mode l2/cp) from the others; expected at least 2.")
    if resolved["method"] == "doco" and resolved["retain_mode"] != "none" and resolved["retain_weight"] == 0:
        raise ParamsError(f"retain_weight: 0 with retain_mode {resolved['retain_mode']!r} leaves no retaining term "
                          "(L_r is multiplied by 0); set retain_mode: none, or a retain_weight above 0.")
    if resolved["adv_prompt_every"] and resolved["method"] not in registry.ADV_PROMPT_METHODS:
        raise ParamsError(f"adv_prompt_every: {resolved['adv_prompt_every']} with method {resolved['method']!r}; "
                          f"adversarial prompts train with {' and '.join(registry.ADV_PROMPT_METHODS)} only (0: off).")
    if resolved["method"] == "sepme" and resolved["target"] not in resolved["sepme_concepts"]:
        raise ParamsError(f"sepme_concepts: {resolved['sepme_concepts']!r} does not name the target "
                          f"{resolved['target']!r}; with method sepme it lists the target and the concepts its "
                          "increment is decoupled against.")
    if resolved["weight_dtype"] != "float32" and resolved["mixed_precision"] == "no":
        raise ParamsError(f"weight_dtype: {resolved['weight_dtype']} with mixed_precision: no; weights in half "
                          "precision run under autocast: set mixed_precision to auto, bf16 or fp16, or weight_dtype "
                          "to float32.")
    if resolved["method"] == "uce" and resolved["trainable"] != "cross_attention_kv":
        raise ParamsError(f"trainable: {resolved['trainable']!r} with method uce; UCE edits the cross-attention keys "
                          "and values only (trainable: cross_attention_kv).")
    if resolved["method"] == "rgd":
        try:
            if not resolved["rgd_slots_file"]:
                raise SlotsError("no slots file given ('')")
            load_slots(resolved["rgd_slots_file"])
        except (SlotsError, yaml.YAMLError) as error:
            raise ParamsError(f"rgd_slots_file: {str(error).rstrip('.')}; method 'rgd' trains on the forget/retain "
                              "prompt twins of a slots file, e.g. params/prompts/rgd_toy_star_slots.yaml.") from None
    _check_sepme(resolved)

    spec = ConceptSpec(resolved["concept_kind"], resolved["anchor"], resolved["target"])
    try:
        read_prompt_file(resolved["anchor_prompts_file"], spec)
    except PromptFileError as error:
        raise ParamsError(f"anchor_prompts_file: {error}") from None
    if resolved["preservation_prompts_file"]:
        try:
            read_preservation_file(resolved["preservation_prompts_file"], spec)
        except PromptFileError as error:
            raise ParamsError(f"preservation_prompts_file: {error}") from None


def _check_sepme(resolved: dict[str, Any]) -> None:
    concepts = resolved["sepme_concepts"]
    if len(concepts) < 2 or len(set(concepts)) != len(concepts):
        raise ParamsError(f"sepme_concepts: {concepts!r}; expected at least two different concepts.")
    template = resolved["sepme_name_template"]
    if "{concept}" not in template:
        raise ParamsError(f"sepme_name_template: {template!r} lacks '{{concept}}', where each concept's name goes.")
    try:
        template.format(concept="x")
    except (KeyError, IndexError, ValueError) as error:
        raise ParamsError(f"sepme_name_template: {template!r} is not a format string with only {{concept}} "
                          f"({error}).") from None
    if resolved["sepme_restore"] not in concepts:
        raise ParamsError(f"sepme_restore: {resolved['sepme_restore']!r} is not one of sepme_concepts {concepts}.")
    files = resolved["sepme_prompt_files"]
    if files:
        if len(files) != len(concepts):
            raise ParamsError(f"sepme_prompt_files: {len(files)} files for {len(concepts)} sepme_concepts; expected "
                              "one file per concept, in the same order (or [] for the default prompts).")
        for path in files:
            _existing_file("sepme_prompt_files", path)


def _type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_value(key: str, value: Any) -> Any:
    """Validate one value against the schema and return it (ints are accepted where numbers are)."""
    if key not in SCHEMA:
        raise ParamsError(unknown_key_message(key))
    spec = SCHEMA[key]
    if value is None:
        if spec.optional:
            return None
        raise ParamsError(f"{key}: a value is required, got null (expected {_type_name(spec.kind)}; {spec.help}).")
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        quote = " (YAML reads an unquoted no/yes/off/on as false/true: write it in quotes, e.g. 'no')" \
            if isinstance(value, bool) and str in kinds else ""
        raise ParamsError(f"{key}: {value!r} is {type(value).__name__}, expected {_type_name(spec.kind)} "
                          f"({spec.help}){quote}.")
    if spec.choices is not None and value not in spec.choices:
        raise ParamsError(f"{key}: {value!r} is not one of {list(spec.choices)}.")
    if spec.minimum is not None and value < spec.minimum:
        raise ParamsError(f"{key}: {value!r} is below the minimum {spec.minimum} ({spec.help}).")
    if spec.maximum is not None and value > spec.maximum:
        raise ParamsError(f"{key}: {value!r} is above the maximum {spec.maximum} ({spec.help}).")
    if spec.check is not None:
        spec.check(key, value)
    return value


def unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, SCHEMA, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(sorted(SCHEMA))}."
    return f"unknown key {key!r}.{hint}"


def validate(values: dict[str, Any], source: str = "params") -> dict[str, Any]:
    """Defaults overlaid with `values`, every value checked; raises ParamsError naming `source`."""
    resolved = {key: spec.default for key, spec in SCHEMA.items()}
    for key, value in values.items():
        try:
            resolved[key] = check_value(key, value)
        except ParamsError as error:
            raise ParamsError(f"{source}: {error}") from None
    try:
        _check_combinations(resolved)
    except ParamsError as error:
        raise ParamsError(f"{source}: {error}") from None
    return resolved


def seeded_run(params: dict[str, Any], seed: int, source: str = "params") -> dict[str, Any]:
    """The params as one seed's run of a study over seeds: `seed` set, run `<run_name>_seed<S>`, validated."""
    return validate({**params, "seed": seed, "run_name": f"{params['run_name']}_seed{seed}"}, source)


def read_params_file(path: str | Path, _base_chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Parse a params YAML file (safe loader) into a dict, with clear errors for missing or malformed files; a
    file may build on another with `base:`, holding only what differs."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {str(path)!r} does not exist (expected a YAML file such as "
                          "params/toy_world.yaml).")
    try:
        data = yaml.load(read_utf8(path), Loader=_SafeLoader)
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML ({str(error).splitlines()[0]}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of key: value at the top level, got {type(data).__name__}.")
    if "base" not in data:
        return data
    # `base: other.yaml` (relative to this file): that file's values, overridden by this file's.
    base = data.pop("base")
    if not isinstance(base, str) or not (path.parent / base).is_file():
        raise ParamsError(f"{path}: base: {base!r} is not a params file next to it (expected e.g. 'toy_world.yaml').")
    chain = _base_chain + (path.resolve(),)
    if (path.parent / base).resolve() in chain:
        raise ParamsError(f"{path}: base: {base!r} builds on itself ({' -> '.join(str(p) for p in chain)}).")
    return {**read_params_file(path.parent / base, chain), **data}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Command-line 'KEY=VALUE' overrides, each VALUE read as YAML, as in a params file."""
    overrides = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. multi_concept_seeds=[0,1,2]")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ParamsError(f"--set {item!r}: the value is not YAML ({error.problem})") from None
    return overrides


def load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read, merge overrides into, and validate a params file, as a whole run (all its notebooks) uses it."""
    values = read_params_file(path)
    values.update(overrides or {})
    resolved = validate(values, source=str(path))
    if resolved["concept_kind"] == "nudity" and not resolved["i2p_csv"]:  # notebook 04 would find out hours later
        raise ParamsError(f"{path}: i2p_csv: concept_kind nudity is measured as the paper does, by NudeNet on the I2P "
                          f"prompts; set i2p_csv to {I2P_SOURCE}.")
    check_real_model_defaults(resolved, str(path), BATCH_NOTEBOOKS, user_set=set(values))
    return resolved


# The study notebooks train the methods of a variants list rather than `method`.
VARIANT_KEYS = {NB05: "ablation_variants", NB07: "attack_variants", NB09: "damage_variants", NB10: "study_variants"}


def methods_read(resolved: dict[str, Any], notebooks: tuple[str, ...]) -> set[str]:
    """The methods whose settings a run of `notebooks` reads: `method` where one trains it (and RGD's for DoCo
    with retain_mode rgd), the methods of its variants list where one compares several (05 also DoCo's, its
    multi-concept runs)."""
    methods = {"doco"} if NB05 in notebooks else set()
    for notebook in notebooks:
        if notebook in VARIANT_KEYS:
            trained = [{"retain_mode": resolved["retain_mode"], **registry.VARIANTS[name]}
                       for name in resolved[VARIANT_KEYS[notebook]] if name in registry.VARIANTS]
        else:
            trained = [resolved] if notebook in TRAINING else []
        for run in trained:
            methods |= {run["method"], "rgd"} if run["method"] == "doco" and run["retain_mode"] == "rgd" \
                else {run["method"]}
    return methods


def check_real_model_defaults(resolved: dict[str, Any], source: str, notebooks: tuple[str, ...],
                              user_set: set[str] | None = None) -> None:
    """On a real model, hold the keys that a run of `notebooks` reads against the toy-vs-recipe table
    (`registry.REAL_MODEL_RECIPE`): raise a ParamsError naming every key that still holds the toy world's data,
    then warn once (ToyDefaultsWarning) naming every setting left at a toy default that differs from its
    method's recipe, with both values. `user_set`: the keys the params file and its overrides set, the user's
    choices, never warned about; where it is unknown (a notebook's namespace holds every key, as papermill
    injects them all) a key at its schema default counts as left there."""
    if is_toy(resolved["model"]):
        return
    keys = {key for notebook in notebooks for key in notebook_keys(notebook)}
    methods = methods_read(resolved, notebooks)
    toy_data, toy_settings = {}, []
    for row in registry.REAL_MODEL_RECIPE:
        value = resolved.get(row.key)
        if row.key not in keys or row.methods and not methods & set(row.methods) or value != SCHEMA[row.key].default:
            continue
        if row.toy_data:
            toy_data.setdefault(row.key, row)
        elif row.key not in (user_set or ()):
            preset = registry.FIDELITY_PRESETS[resolved["fidelity"]].get(row.key)
            if (preset if value is None else value) != row.value:
                toy_settings.append(row)
    model = resolved["model"]
    if toy_data:
        listed = "; ".join(f"{key}: {resolved[key]!r}, expected {row.source}"
                           + (f" ({row.value!r})" if row.value not in (None, []) else "") for key, row in toy_data.items())
        raise ParamsError(f"{source}: {', '.join(toy_data)} {'holds' if len(toy_data) == 1 else 'hold'} the toy "
                          f"world's data, but model {model!r} is not the toy world: the run would train or measure the "
                          f"toy world's concepts, not its own. {listed}. (params/concepts/sd14_snoopy.yaml sets them all "
                          "for a real model.)")
    if toy_settings:
        fidelity = resolved["fidelity"]
        groups: dict[str, list[str]] = {}
        for row in toy_settings:
            default = SCHEMA[row.key].default
            toy = f"null: {registry.FIDELITY_PRESETS[fidelity][row.key]!r} under fidelity {fidelity}" \
                if default is None else repr(default)
            groups.setdefault(row.source, []).append(f"{row.key} {row.value!r} (toy {toy})")
        listed = "; ".join(f"{where}: {', '.join(settings)}" for where, settings in groups.items())
        named = sorted({m for row in toy_settings for m in row.methods} & methods) or sorted(methods)
        recipes = sorted({registry.RECIPE_FILES[m] for m in named if m in registry.RECIPE_FILES}) \
            or [registry.RECIPE_FILES["doco"]]
        warnings.warn(f"{source}: model {model!r} runs {', '.join(named) or 'the evaluation'} with {len(toy_settings)} "
                      f"setting{'s' if len(toy_settings) > 1 else ''} left at the toy world's defaults, which differ "
                      f"from the recipe. {listed}. Set them in the params file, as {' and '.join(recipes)} "
                      f"{'does' if len(recipes) == 1 else 'do'}.", ToyDefaultsWarning, stacklevel=3)


def notebook_params(resolved: dict[str, Any], notebook: str) -> dict[str, Any]:
    """The subset of resolved params that `notebook` declares in its `parameters` cell."""
    keys = notebook_keys(notebook)
    return {key: resolved[key] for key in keys}


def notebook_keys(notebook: str) -> list[str]:
    """Keys that a run of `notebook` depends on (papermill injects them all), in schema order."""
    return [key for key, spec in SCHEMA.items() if notebook in spec.notebooks]


# Shown in every parameters cell: where the outputs go and what model runs.
HEADLINE_KEYS = ("run_name", "output_root", "model", "device")


def shown_keys(notebook: str, code: str) -> list[str]:
    """The keys `notebook`'s parameters cell lists: the headline keys and those its `code` names. The others
    (e.g. the harness's training settings) still reach the run, injected by papermill or from the schema."""
    names = {node.id for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Name)}
    return [key for key in notebook_keys(notebook) if key in HEADLINE_KEYS or key in names]


def notebook_code(notebook: dict) -> str:
    """A notebook's code (an nbformat notebook or its JSON), its parameters cell left out."""
    return "\n".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"
                     and "parameters" not in cell.get("metadata", {}).get("tags", []))


PARAMETERS_HEADER = ("# Parameters: papermill injects the values of a params file (params/*.yaml) after this cell; "
                     "any other key of the\n# schema (doco_lib/config.py) may be set here too.")


def parameters_cell(notebook: str, code: str) -> str:
    """The source of `notebook`'s `parameters` cell, rendered from the schema (one typed line a key shown)."""
    lines = [PARAMETERS_HEADER]
    for key in shown_keys(notebook, code):
        spec = SCHEMA[key]
        kind = (spec.kind if isinstance(spec.kind, type) else spec.kind[-1]).__name__
        lines.append(f"{key}: {kind} = {spec.default!r}  # {spec.help}")
    return "\n".join(lines)


def run_dir(resolved: dict[str, Any]) -> Path:
    return Path(resolved["output_root"]) / resolved["run_name"]


def notebook_setup(namespace: dict[str, Any], notebook: str) -> tuple[dict[str, Any], Path]:
    """A notebook's first step: its params (the schema's defaults overlaid with every key set in `namespace`,
    the notebook's globals, validated) and its output folder `<output_root>/<run_name>/<notebook>/`, created,
    with the resolved params recorded in it."""
    if "base" in namespace:  # papermill -f injects a params file's keys as they are, `base:` unresolved
        raise ParamsError(f"{notebook} parameters: base: {namespace['base']!r} is not resolved by papermill -f; run "
                          f"`doco demo --params FILE --notebooks {notebook}`, or give papermill the resolved_params.yaml "
                          "that doco writes into the run folder.")
    values = {key: namespace[key] for key in notebook_keys(notebook) if key in namespace}
    params = validate(values, source=f"{notebook} parameters")
    check_real_model_defaults(params, f"{notebook} parameters", (notebook,))
    out_dir = run_dir(params) / notebook
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(params, out_dir)
    return params, out_dir


def write_resolved(resolved: dict[str, Any], directory: Path) -> Path:
    """Record the resolved params of a run in its output folder (atomically)."""
    path = Path(directory) / "resolved_params.yaml"
    atomic_write_text(yaml.safe_dump(resolved, sort_keys=True), path)
    return path
