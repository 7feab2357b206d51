"""SepME in the harness (notebook 08): one increment per concept, every subset of them, erase and restore.

Each concept i gets its own increment (`doco_lib.methods.sepme`), trained on the base model's images of its
prompts and decoupled against "" and the *name prompts* of the other concepts (`sepme_name_template`,
"a photo of a {concept}"), so that adding it leaves those prompts' token rows, and the unconditional
branch, where they were. Any subset of concepts is then a sum of increments: `compose_subsets` writes
each non-empty subset as a diffusers UNet folder, which notebook 05's `rate_models` judges (the toy
judge in a toy world, CLIP accuracy on a real model), and `SeparableEraser` switches subsets in memory
for the image grid, the rates on the name prompts themselves, and the restore check.

SepME needs a text encoder wider than the token rows it decouples against (77 a prompt on SD v1): the
toy world's own 32-wide encoder has no such room, so `sepme_model` is 'toy-wide' there, a toy pipeline
with a 96-wide encoder and 16-token prompts (`doco toy build --wide`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from doco_lib import config, costs
from doco_lib.anchors import prepare_anchor_latents
from doco_lib.concepts import PromptFileError, read_prompt_file
from doco_lib.config import ParamsError
from doco_lib.evaluation.rating import rate_models
from doco_lib.io import atomic_save_json, atomic_write_text, slug
from doco_lib.methods import sepme
from doco_lib.models import is_toy, load_judge, load_pipeline, pick_device
from doco_lib.sampling import generate
from doco_lib.toy.erasure import judged_rates, shape_prompts


def study_params(params: dict) -> dict:
    """The params with SepME's base model as `model` and the first concept as `target` (for the judge's
    prompt sets)."""
    return {**params, "model": params["sepme_model"], "target": params["sepme_concepts"][0]}


def folder(params: dict) -> Path:
    return config.run_dir(params) / "sepme"


def name_prompt(params: dict, concept: str) -> str:
    """The prompt the other concepts' increments are decoupled against, e.g. "a photo of a heart"."""
    return params["sepme_name_template"].format(concept=concept)


def concept_prompts(params: dict, concept: str) -> list[str]:
    """Prompts of the concept's training images: its file in `sepme_prompt_files`; else, in a toy world,
    16 toy captions naming it (colours, styles, templates; other draws than the judged prompts'); else its
    name prompt alone."""
    concepts = params["sepme_concepts"]
    if params["sepme_prompt_files"]:
        path = params["sepme_prompt_files"][concepts.index(concept)]
        try:
            return read_prompt_file(path)
        except PromptFileError as error:
            raise ParamsError(f"sepme_prompt_files: {error}") from None
    if is_toy(params["sepme_model"]):
        return sorted(set(shape_prompts(concept, 16, seed=params["seed"] + 1000)))
    return [name_prompt(params, concept)]


def sepme_config(params: dict) -> sepme.SepMEConfig:
    return sepme.preset("readme", lr=params["sepme_lr"], scale=params["sepme_scale"],
                        threshold=params["sepme_threshold"], beta=params["sepme_beta"],
                        max_steps=params["sepme_max_steps"], batch_size=params["sepme_batch_size"],
                        first_row_only=params["sepme_first_row_only"],
                        accumulate_grads=params["sepme_accumulate_grads"], seed=params["seed"])


def _settings(params: dict, concept: str) -> dict:
    """What determines a concept's increment; a saved increment is reused only if these match."""
    against = [name_prompt(params, c) for c in params["sepme_concepts"] if c != concept]
    return {"base_model": sepme.base_model_id(params["sepme_model"]), "prompts": concept_prompts(params, concept),
            "decoupled_against": against, "config": json.dumps(asdict(sepme_config(params)), sort_keys=True),
            "images": params["sepme_images"], "steps": params["num_inference_steps"],
            "guidance": params["guidance_scale"]}


def increment_path(params: dict, concept: str) -> Path:
    return folder(params) / "increments" / f"{slug(concept)}.safetensors"


def train_increments(params: dict, pipe, progress: bool = True, concepts: list[str] | None = None) -> pd.DataFrame:
    """Train (or reuse) the increment of every concept (or of `concepts`) on `pipe` (the `sepme_model`
    pipeline); one row per concept: null-space size, steps, held-out correlation before and after, seconds."""
    run = study_params(params)
    rows = []
    for concept in concepts or params["sepme_concepts"]:
        settings = _settings(params, concept)
        path = increment_path(params, concept)
        record = path.with_suffix(".json")
        saved = json.loads(record.read_text()) if path.is_file() and record.is_file() else {}
        if saved.get("settings") == settings:
            rows.append(saved["summary"])
            continue
        latents = prepare_anchor_latents(
            pipe, settings["prompts"], params["sepme_images"], folder(params) / "images" / slug(concept),
            model=run["model"], seed=params["seed"], steps=params["num_inference_steps"],
            guidance=params["guidance_scale"], shard_size=params["anchor_shard_size"], progress=progress)
        with costs.Meter() as meter:
            trainer = sepme.SepMETrainer(pipe, latents, settings["decoupled_against"], sepme_config(params),
                                         device=pick_device(params["device"]))
            before = trainer.heldout_correlation()
            trainer.run(progress)
        increment = trainer.result(concept, run["model"])
        summary = {"concept": concept, "decoupled against": ", ".join(settings["decoupled_against"]),
                   "null space": trainer.null_space_dim, "steps": trainer.step,
                   "correlation before": before, "correlation after": trainer.heldout_correlation(),
                   "seconds": round(meter.reading()["seconds"], 1),
                   "cost": {**meter.reading(), "machine": costs.machine(trainer.device),
                            "changed_params": sum(int((d != 0).sum()) for d in increment.deltas.values()),
                            "trainable_params": sum(d.numel() for d in increment.deltas.values())}}
        sepme.save_increment(increment, path)
        atomic_write_text(pd.DataFrame(trainer.history).to_csv(index=False), path.with_suffix(".history.csv"))
        atomic_write_text(json.dumps({"settings": settings, "summary": summary}, indent=1), record)
        rows.append(summary)
    return pd.DataFrame(rows)


def write_cost_record(summary: pd.Series | dict, increment: Path, unet: Path, base_denoiser) -> None:
    """SepME's increments are trained outside the harness: their cost record, in the harness's layout
    (`costs/training.json` beside the composed denoiser), from what `train_increments` measured."""
    cost = summary.get("cost")
    if not isinstance(cost, dict):  # an increment trained before costs were recorded
        return
    record = {"phase": "training", "method": "sepme", "trainable": "sepme increment (K/V)",
              "iterations": int(summary["steps"]), "measured_iterations": int(summary["steps"]), "sessions": 1,
              **{k: cost[k] for k in ("seconds", "peak_gpu_bytes", "peak_gpu_reserved_bytes", "peak_rss_bytes",
                                      "peak_rss_scope", "machine", "trainable_params", "changed_params")},
              "unet_params": sum(p.numel() for p in base_denoiser.parameters()),
              "stored_bytes": {"delta": costs.stored_bytes(increment), "unet": costs.stored_bytes(unet)}}
    atomic_save_json(record, unet.parent / "costs" / "training.json")


@contextmanager
def _decoupled_by_name():
    """Each increment is decoupled against the other concepts' name prompts, not against all of their
    training prompts, by design (the measurements show what it does to those); so SepME's warning about
    that, on every composition of two or more concepts, is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="SepME: the increment of")
        yield


def subsets(concepts: list[str]) -> list[tuple[str, ...]]:
    """All 2^k subsets, the empty one first, then by size."""
    return [s for k in range(len(concepts) + 1) for s in itertools.combinations(concepts, k)]


def subset_label(subset: tuple[str, ...]) -> str:
    return " + ".join(subset) if subset else "none"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compose_subsets(params: dict, chosen: list[tuple[str, ...]] | None = None) -> pd.DataFrame:
    """Every non-empty subset of the trained increments (or the `chosen` ones) as a UNet folder (base + Σ ΔW);
    a folder is reused while the increments it was composed from are unchanged. Columns: erased, seed, unet."""
    chosen = chosen or subsets(params["sepme_concepts"])[1:]
    increments = folder(params) / "increments"
    hashes = {c: _sha256(increment_path(params, c)) for c in dict.fromkeys(c for s in chosen for c in s)}
    rows = []
    for subset in chosen:
        out = folder(params) / "subsets" / slug(subset_label(subset))
        record = out / "sepme_compose.json"
        wanted = {c: hashes[c] for c in subset}
        if not (record.is_file() and json.loads(record.read_text()).get("increment_sha256") == wanted):
            with _decoupled_by_name():
                sepme.compose_to_folder(params["sepme_model"], increments, list(subset), out, params["device"])
            composed = json.loads(record.read_text())
            atomic_write_text(json.dumps({**composed, "increment_sha256": wanted}, indent=1), record)
        rows.append({"erased": subset_label(subset), "seed": params["seed"], "unet": str(out)})
    return pd.DataFrame(rows)


def rate_subsets(params: dict, composed: pd.DataFrame, samples: int) -> pd.DataFrame:
    """How often each subset's model draws each concept and each related concept (notebook 05's
    `rate_models`: varied prompts per concept, the toy judge or CLIP accuracy), the original included."""
    run = study_params(params)
    return rate_models(run, composed, params["sepme_concepts"] + params["sepme_related"], samples)


def load_eraser(params: dict, pipe) -> sepme.SeparableEraser:
    """The pipeline's UNet with every concept's increment loaded, none erased yet (changed in place)."""
    return sepme.SeparableEraser(pipe.unet, [sepme.load_increment(increment_path(params, c))
                                             for c in params["sepme_concepts"]], params["sepme_model"])


def name_prompt_rates(params: dict, pipe, eraser: sepme.SeparableEraser, samples: int) -> pd.DataFrame:
    """Toy world: the judged rate of every concept's *name prompt* (the exact prompt the other increments
    are decoupled against), `samples` seeds each, for every subset. Leaves nothing erased."""
    judge = load_judge(params["device"])
    shapes = params["sepme_concepts"] + params["sepme_related"]
    sets = {shape: ([name_prompt(params, shape)] * samples, shape) for shape in shapes}
    rows = []
    for subset in subsets(params["sepme_concepts"]):
        with _decoupled_by_name():
            eraser.set_erased(subset)
        rates = judged_rates(pipe, judge, sets, params["num_inference_steps"], params["guidance_scale"],
                             params["seed"])
        rows += [{"erased": subset_label(subset), "prompt": name_prompt(params, s), "concept": s, "rate": r}
                 for s, r in rates.items()]
    eraser.set_erased(())
    return pd.DataFrame(rows)


@torch.no_grad()
def subset_images(params: dict, pipe, eraser: sepme.SeparableEraser, per_concept: int) -> tuple[torch.Tensor, list]:
    """Images of every concept's name prompt (the same seeds) under every subset: rows = subsets, in
    `subsets` order; columns = concepts × `per_concept` seeds. Leaves nothing erased."""
    concepts = params["sepme_concepts"]
    prompts = [name_prompt(params, c) for c in concepts for _ in range(per_concept)]
    seeds = [params["seed"] + i for _ in concepts for i in range(per_concept)]
    rows, labels = [], []
    for subset in subsets(concepts):
        with _decoupled_by_name():
            eraser.set_erased(subset)
        rows.append(generate(pipe, prompts, seeds, params["num_inference_steps"], params["guidance_scale"]))
        labels.append(subset_label(subset))
    eraser.set_erased(())
    return torch.cat(rows), labels


def restore_check(params: dict, eraser: sepme.SeparableEraser) -> dict:
    """Erase the restored concept together with another one, then restore it: the K/V weights must be
    bit for bit those of erasing the other concept alone. Leaves nothing erased."""
    restored = params["sepme_restore"]
    other = next(c for c in params["sepme_concepts"] if c != restored)

    def kv() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in eraser.unet.named_parameters() if n in eraser.original}

    with _decoupled_by_name():
        eraser.set_erased([other])
        alone = kv()
        eraser.set_erased([restored, other])
        both = kv()
        eraser.restore(restored)
        after = kv()
        eraser.set_erased(())
    return {"restored": restored, "kept erased": other,
            "weights changed by erasing it": any(not torch.equal(both[n], alone[n]) for n in alone),
            "restored weights equal erasing the other alone": all(torch.equal(after[n], alone[n]) for n in alone)}


@torch.no_grad()
def decoupling_leakage(params: dict, pipe) -> pd.DataFrame:
    """For every trained increment: the largest ‖ΔW e‖ / (‖ΔW‖₂ ‖e‖) over its K/V layers and the token
    rows e of "" and of the prompts it was decoupled against (≈ 0: they are untouched), and the same on
    its own name prompt's rows (well above 0: the increment acts there)."""
    rows = []
    for concept in params["sepme_concepts"]:
        increment = sepme.load_increment(increment_path(params, concept))
        groups = {"decoupled rows": ["", *increment.decoupled_against], "own name prompt": [name_prompt(params,
                                                                                                    concept)]}
        row = {"concept": concept}
        for label, prompts in groups.items():
            e = sepme.token_rows(pipe, prompts).double().cpu()
            worst = 0.0
            for delta in increment.deltas.values():
                delta = delta.double()
                ratio = (e @ delta.T).norm(dim=1) / (torch.linalg.matrix_norm(delta, 2) * e.norm(dim=1))
                worst = max(worst, ratio.max().item())
            row[f"max leak, {label}"] = worst
        rows.append(row)
    return pd.DataFrame(rows)


def criteria(rates: pd.DataFrame, params: dict) -> pd.DataFrame:
    """Per concept A, from `rate_subsets`' rates (%, mean over seeds): A's rate before and after erasing A
    alone, the largest change of another concept when A alone is erased, and A's rate after erasing A
    with another concept and restoring A (= erasing that other concept alone)."""
    concepts = params["sepme_concepts"]
    mean = rates.groupby(["model", "prompt set"])["rate"].mean() * 100
    rows = []
    for concept in concepts:
        others = [c for c in concepts if c != concept]
        restored_with = others[0]
        rows.append({"concept A": concept, "A, original": mean["original", concept],
                     "A, A erased": mean[concept, concept],
                     "largest change of another concept, A erased": max(
                         (mean[concept, o] - mean["original", o] for o in others), key=abs),
                     "A after erasing A + B and restoring A": mean[restored_with, concept],
                     "B": restored_with})
    return pd.DataFrame(rows)


def write_table(table: pd.DataFrame, path: Path) -> None:
    atomic_write_text(table.to_csv(), path.with_suffix(".csv"))
    atomic_write_text(table.to_markdown() + "\n", path.with_suffix(".md"))


def subset_rates_over_seeds(params: dict, seeds: list[int], samples: int, progress: bool = False) -> pd.DataFrame:
    """`rate_subsets` with the increments trained once per seed (runs `<run_name>_seed<S>`): one row per seed,
    model (the erased subset, or the original) and prompt set (the results journal's `sepme` artefact)."""
    runs = [config.seeded_run(params, seed, f"SepME seed {seed}") for seed in seeds]  # all refused before any training
    pipe = load_pipeline(params["sepme_model"], params["device"], dtype=torch.float32)
    parts = []
    for run in runs:
        train_increments(run, pipe, progress)
        parts.append(rate_subsets(run, compose_subsets(run), samples).assign(samples=samples))
    rows = pd.concat(parts, ignore_index=True)
    return rows[["seed", "model", "prompt set", "samples", "rate"]]
