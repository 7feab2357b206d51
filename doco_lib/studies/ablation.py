"""The ablation study and the method comparison (paper Tables 1 and 3), over several seeds.

Each (variant, seed) is an ordinary run under `<run>/ablation/<variant>_s<seed>/`, trained through the
same harness as `doco train`, which records each run's cost (`doco_lib.costs`); a finished run (its UNet
exported) is never retrained, and an interrupted one resumes from its checkpoint — in both cases only with
the same settings, else the run is refused.
Sequential multi-concept erasure chains runs: stage k starts from the UNet of stage k−1 (`base_unet`)
and, with `sequential_keep_erased`, retains the earlier targets as erased, so that it cannot quietly undo
them; multi-concept runs use `multi_concept_model`, and a run erasing several targets at once is long
enough to give each the samples of a single run. In the toy world every model is then judged on the same
prompt sets and seeds, and results are summarised as mean ± 95% confidence interval (Student's t) over seeds.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from doco_lib import config, costs
from doco_lib.concepts import ConceptSpec, read_prompt_file
from doco_lib.config import parse_stage
from doco_lib.io import atomic_save_json, atomic_write_text, slug
from doco_lib.methods.harness import TrainingConfig
from doco_lib.methods.registry import SEPME, VARIANTS
from doco_lib.methods.rgd_prompts import load_slots, prompt_pairs
from doco_lib.models import is_toy, load_judge, load_pipeline
from doco_lib.studies import runs, sepme_study
from doco_lib.toy.erasure import attribute_accuracy


def run_params(params: dict, name: str, seed: int, overrides: dict) -> dict:
    return config.validate({**params, **overrides, "seed": seed, "output_root": str(config.run_dir(params) / "ablation"),
                            "run_name": f"{slug(name)}_s{seed}"}, source=f"ablation run {name} seed {seed}")


RUN_DATA_KEYS = ("model", "base_unet", "seed", "concept_kind", "target", "anchor", "anchor_prompts_file",
                 "preservation_prompts_file", "n_anchor_images", "n_preservation_images", "num_inference_steps",
                 "guidance_scale", "rgd_slots_file", "rgd_prompts")


def run_identity(run: dict, concepts: list[tuple[str, str, str]] | None = None,
                 rehearse: list[tuple[str, str, str]] | None = None) -> dict:
    """What a finished run must have been trained with to be reused: its training settings and data."""
    return {**TrainingConfig.from_params(run).training_identity(), **{k: run[k] for k in RUN_DATA_KEYS},
            "concepts": [list(c) for c in concepts or []],
            **({"rehearsed": [list(c) for c in rehearse]} if rehearse else {}),
            "images drawn by": "the original model"}  # since 2026-11-26; earlier runs used a stage's start


def train_run(run: dict, concepts: list[tuple[str, str, str]] | None = None,
              rehearse: list[tuple[str, str, str]] | None = None) -> Path:
    """Train one run unless it is already finished with the same settings; returns the UNet folder. With
    `concepts` (target, anchor, anchor prompt file), the run erases them all at once. With `rehearse` (the
    same form: concepts erased before), it erases its own target and retains those as erased
    (`runs.make_trainer`)."""
    import json

    unet = runs.training_dir(run) / "unet"
    record = runs.training_dir(run) / "ablation_run.json"
    identity = json.loads(json.dumps(run_identity(run, concepts, rehearse)))  # as it reads back from the file
    if (unet / "config.json").is_file():
        if not record.is_file():
            raise config.ParamsError(f"{unet.parent} holds a finished run without a record of its settings "
                                     f"({record.name}); delete it to train it again, or use another run_name.")
        saved = json.loads(record.read_text())
        # A setting added after the run was recorded counts as its default then, as in a checkpoint.
        defaults = json.loads(json.dumps({key: param.default for key, param in config.SCHEMA.items()}))
        changed = sorted(k for k in identity if saved.get(k, defaults.get(k)) != identity[k])
        if changed:
            raise config.ParamsError(f"{unet.parent} was trained with other settings ({', '.join(changed)}); delete "
                                     "it to train it again, or use another run_name.")
        return unet
    pipe = runs.starting_pipeline(run)
    if concepts:
        trainer = runs.make_multi_concept_trainer(run, concepts, pipe)
    else:
        with costs.phase("anchors", config.run_dir(run)) as cost:  # a cached seed's images are only linked
            cost["images"] = len(runs.prepare_anchors(run, pipe))
        trainer = runs.make_trainer(run, pipe, rehearse)
    trainer.run(progress=False)
    exported = trainer.export(base_model=run["model"])["unet"]  # with its cost record, costs/training.json
    atomic_save_json(identity, record)
    return exported


def train_grid(params: dict, variants: list[str], seeds: list[int]) -> pd.DataFrame:
    """One run per (variant, seed); returns a table of their UNet folders (and, for SepME, of the base
    model they belong to)."""
    unknown = [v for v in variants if v not in [*VARIANTS, SEPME]]
    if unknown:
        raise config.ParamsError(f"ablation_variants: unknown {unknown}; choose from {[*VARIANTS, SEPME]}.")
    if SEPME in variants and params["target"] not in params["sepme_concepts"]:
        raise config.ParamsError(f"ablation_variants: SepME erases the target {params['target']!r} with its "
                                 f"notebook-08 increment, so sepme_concepts must name it (now "
                                 f"{params['sepme_concepts']}).")
    check_real_model_settings(params, variants)
    runs = [(v, s, run_params(params, v, s, VARIANTS[v])) for v in variants if v != SEPME
            for s in seeds]  # all validated first
    rows = [{"variant": v, "seed": s, "unet": str(train_run(run))} for v, s, run in runs]
    if SEPME in variants:
        rows += train_sepme(params, seeds)
    return pd.DataFrame(rows)


def check_toy_study(params: dict, variants: list[str], variants_key: str, study: str, on_real_models: str) -> None:
    """Refuse, before any run, a study that reads the toy judge on a model without it, or unknown variants (of the
    key `variants_key`)."""
    if not is_toy(params["model"]):
        raise config.ParamsError(f"model: {params['model']!r}; {study} reads the toy judge, so it runs on the toy world "
                                 f"('toy' or 'toy-wide'); {on_real_models}.")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise config.ParamsError(f"{variants_key}: unknown {unknown}; choose from {list(VARIANTS)}.")


def check_real_model_settings(params: dict, variants: list[str]) -> None:
    """On a real model, refuse the toy world's defaults that would otherwise train RGD on the toy star's prompt
    slots or SepME on the toy pipeline, before any run starts."""
    if is_toy(params["model"]):
        return
    uses_rgd = any(VARIANTS[v].get("method") == "rgd" or VARIANTS[v].get("retain_mode") == "rgd"
                   for v in variants if v in VARIANTS)
    if uses_rgd and params["rgd_slots_file"] == config.SCHEMA["rgd_slots_file"].default:
        raise config.ParamsError(f"rgd_slots_file: {params['rgd_slots_file']!r} holds the toy world's star prompts; "
                                 f"on {params['model']!r} give RGD slots for {params['target']!r} (as "
                                 "params/prompts/rgd_nudity_slots.yaml does for nudity), or leave RGD out of "
                                 "ablation_variants.")
    if SEPME in variants and is_toy(params["sepme_model"]):
        raise config.ParamsError(f"sepme_model: {params['sepme_model']!r} is a toy world, but model is "
                                 f"{params['model']!r}; set sepme_model to the model, or leave SepME out of "
                                 "ablation_variants.")


def train_sepme(params: dict, seeds: list[int]) -> list[dict]:
    """Per seed, the target's SepME increment (decoupled against "" and the other `sepme_concepts`' name
    prompts, as in notebook 08) composed onto `sepme_model`'s UNet."""
    pipe = load_pipeline(params["sepme_model"], params["device"], dtype=torch.float32)  # its increments train
    rows = []
    for seed in seeds:
        run = {**params, "seed": seed, "output_root": str(config.run_dir(params) / "ablation"),
               "run_name": f"sepme_s{seed}"}
        trained = sepme_study.train_increments(run, pipe, progress=False, concepts=[params["target"]])
        composed = sepme_study.compose_subsets(run, chosen=[(params["target"],)])
        unet = Path(composed.unet.iloc[0])
        sepme_study.write_cost_record(trained.iloc[0], sepme_study.increment_path(run, params["target"]), unet,
                                      pipe.unet)
        rows.append({"variant": SEPME, "seed": seed, "unet": str(unet), "model": params["sepme_model"]})
    return rows


def stage_preservation_prompts(params: dict, stages: list[str], k: int) -> list[str]:
    """Preservation prompts of sequential stage k (0-based): the stage's own file, or else the params'
    `preservation_prompts_file`, without the prompts that name its target or an earlier one (retaining the
    original model's images of an erased concept would teach it back)."""
    parsed = [parse_stage(s) for s in stages]
    return prompts_naming_none(params, parsed[k][3] or params["preservation_prompts_file"], parsed[: k + 1])


def prompts_naming_none(params: dict, prompt_file: str, erased: list[tuple]) -> list[str]:
    """The prompts of `prompt_file` ('': none) that name none of the erased (target, anchor, …) concepts."""
    if not prompt_file:
        return []
    patterns = [ConceptSpec(params["concept_kind"], anchor, target).target_pattern() for target, anchor, *_ in erased]
    return [p for p in read_prompt_file(prompt_file) if not any(pattern.search(p) for pattern in patterns)]


def write_preservation(params: dict, name: str, heading: str, prompts: list[str]) -> str:
    """A multi-concept run's preservation prompts as a file in the run folder ('' when there are none)."""
    if not prompts:
        return ""
    path = config.run_dir(params) / "ablation" / "multi_concept_preservation" / f"{name}.txt"
    atomic_write_text(f"# {heading}\n" + "\n".join(prompts) + "\n", path)
    return str(path)


def simultaneous_iterations(params: dict, n_concepts: int) -> int:
    """Iterations of a run erasing `n_concepts` at once: the warm-up, then the adversarial iterations of a
    single-concept run for each concept, so that each is trained on as many samples as when erased alone."""
    return params["warmup_iterations"] + n_concepts * (params["iterations"] - params["warmup_iterations"])


def train_sequential(params: dict, stages: list[str], seeds: list[int], variant: str = "DoCo (cp)") -> pd.DataFrame:
    """Erase the stages' targets one after another on `multi_concept_model`, each stage on top of the previous
    one's UNet, with a single run's settings. With `sequential_keep_erased`, stage k retains the earlier
    targets as erased: their target prompts over the original model's images of their anchors join its
    retaining batch (`runs.make_trainer`), so that under eq. 9 its own unlearning gradient may not undo
    them. Every stage's anchor and preservation images are the original model's."""
    parsed = [parse_stage(s) for s in stages]
    model = params["multi_concept_model"] or params["model"]
    if params["sequential_keep_erased"] and len(parsed) > 1:
        runs.check_can_rehearse({**params, **VARIANTS[variant]})  # before any stage is trained
    preservation_files = [write_preservation(params, f"stage{k + 1}_{slug(target)}", f"Preservation prompts of "
                                             f"sequential stage {k + 1} (erasing {target!r}).",
                                             stage_preservation_prompts(params, stages, k))
                          for k, (target, *_) in enumerate(parsed)]  # written once, before any training
    rows = []
    for seed in seeds:
        previous = ""
        for k, ((target, anchor, prompts, _), preservation) in enumerate(zip(parsed, preservation_files), start=1):
            run = run_params(params, f"sequential {k} {target}", seed,
                             {**VARIANTS[variant], "model": model, "target": target, "anchor": anchor,
                              "anchor_prompts_file": prompts, "preservation_prompts_file": preservation,
                              "base_unet": previous})
            rehearse = [stage[:3] for stage in parsed[:k - 1]] if params["sequential_keep_erased"] else None
            previous = str(train_run(run, rehearse=rehearse))
            rows.append({"stage": k, "erased so far": ", ".join(t for t, *_ in parsed[:k]), "seed": seed,
                         "unet": previous, "model": model})
    return pd.DataFrame(rows)


def train_simultaneous(params: dict, stages: list[str], seeds: list[int], variant: str = "DoCo (cp)") -> pd.DataFrame:
    """Erase all the stages' targets in one run per seed on `multi_concept_model` (the concepts' anchor images
    pooled, every batch mixing them), long enough to give each target a single run's samples. It retains the
    params' preservation prompts that name none of the targets; the stages' own preservation files are not
    used."""
    concepts = [parse_stage(s)[:3] for s in stages]
    targets = [t for t, _, _ in concepts]
    model = params["multi_concept_model"] or params["model"]
    preservation = write_preservation(params, "simultaneous", f"Preservation prompts of the simultaneous run "
                                      f"(erasing {', '.join(targets)}).",
                                      prompts_naming_none(params, params["preservation_prompts_file"], concepts))
    rows = []
    for seed in seeds:
        target, anchor, prompts = concepts[0]
        run = run_params(params, f"simultaneous {' '.join(targets)}", seed,
                         {**VARIANTS[variant], "model": model, "target": target, "anchor": anchor,
                          "anchor_prompts_file": prompts, "preservation_prompts_file": preservation,
                          "iterations": simultaneous_iterations(params, len(concepts))})
        unet = train_run(run, concepts)
        rows.append({"stage": "all at once", "erased so far": ", ".join(targets), "seed": seed, "unet": str(unet),
                     "model": model})
    return pd.DataFrame(rows)


def heldout_retain_alignment(params: dict, unets: pd.DataFrame, samples: int) -> pd.DataFrame:
    """Toy world, RGD's retain criterion: on the held-out retain twins (the slots file's disjoint test
    vocabulary, concept word removed), how often the judge sees the named colour and style — the original
    model and each listed UNet, per seed."""
    judge = load_judge(params["device"])
    steps, guidance = params["num_inference_steps"], params["guidance_scale"]
    prompts = [retain for _, retain in prompt_pairs(load_slots(params["rgd_slots_file"]), "test", samples)]
    models = [("original", "")] + [(record["variant"], record["unet"]) for record in unets.to_dict("records")]
    rows = []
    for seed in sorted(set(unets["seed"])):
        for label, unet in models:
            if unet and unets[(unets.unet == unet)].seed.iloc[0] != seed:
                continue
            pipe = load_pipeline(params["model"], params["device"], unet=unet or None)
            accuracy = attribute_accuracy(pipe, judge, prompts, steps, guidance, seed)
            rows += [{"model": label, "seed": seed, "prompt set": f"held-out retain: {attribute}", "rate": rate}
                     for attribute, rate in accuracy.items()]
    return pd.DataFrame(rows)
