"""Measuring an erasure in the toy world: how often the judge sees each shape when it is asked for.

A prompt set for a shape cycles through the caption templates that mention a shape, with colours and
styles drawn from a fixed seed, so the original and the erased model see the same prompts and seeds.
"""

from __future__ import annotations

import numpy as np

from doco_lib.sampling import generate
from doco_lib.toy import render
from doco_lib.toy.quality import images_to_judge_input

SHAPE_TEMPLATES = [i for i, (_, attributes) in enumerate(render.CAPTION_TEMPLATES) if "shape" in attributes]


def shape_prompts(shape_word: str, n: int, seed: int = 0) -> list[str]:
    """`n` prompts naming `shape_word` (a shape or its synonym), over all shape-bearing templates."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        template = render.CAPTION_TEMPLATES[SHAPE_TEMPLATES[i % len(SHAPE_TEMPLATES)]][0]
        prompts.append(render.with_articles(template.format(
            shape=shape_word, colour=render.COLOURS[rng.integers(len(render.COLOURS))],
            style=render.STYLES[rng.integers(len(render.STYLES))])))
    return prompts


def prompt_sets(target: str, shapes: list[str], n: int, seed: int = 0) -> dict[str, tuple[list[str], str]]:
    """Prompt set name → (prompts, shape the judge should see): the target, its synonym, other shapes."""
    sets = {target: (shape_prompts(target, n, seed), target)}
    synonym = render.SYNONYMS.get(target)
    if synonym:
        sets[synonym] = (shape_prompts(synonym, n, seed), target)
    for shape in shapes:
        if shape != target:
            sets[shape] = (shape_prompts(shape, n, seed), shape)
    return sets


def judged_rates(pipe, judge, sets: dict[str, tuple[list[str], str]], steps: int, guidance: float,
                 seed: int = 0) -> dict[str, float]:
    """For each prompt set, the fraction of images the judge names as the set's shape."""
    rates = {}
    for name, (prompts, shape) in sets.items():
        images = generate(pipe, prompts, [seed + i for i in range(len(prompts))], steps, guidance)
        predicted = judge.predict(images_to_judge_input(images))["shape"]
        rates[name] = (predicted == render.SHAPES.index(shape)).float().mean().item()
    return rates


def erasure_table(before: dict[str, float], after: dict[str, dict[str, float]]):
    """Judged rates per prompt set: the original model, then each erased model, with changes in points."""
    import pandas as pd

    rows = []
    for name, original in before.items():
        row = {"prompt set": name, "original": original}
        for label, rates in after.items():
            row[label] = rates[name]
            row[f"{label} Δ (pts)"] = 100 * (rates[name] - original)
        rows.append(row)
    return pd.DataFrame(rows)


def retain_mode_study(params: dict, retain_modes: list[str], samples: int | None = None):
    """Train DoCo once per retain mode (runs `<run_name>_<mode>`), then judge every model on the same
    prompt sets and seeds: the toy version of the paper's Table 3. Returns (table, erased UNet folders)."""
    from doco_lib import config, experiment
    from doco_lib.pipeline import load_judge, load_pipeline

    base = load_pipeline(params["model"], params["device"])
    judge = load_judge(params["device"])
    words = [params["target"], params["anchor"]] + [w for w in params["related_concepts"]
                                                   if w not in (params["target"], params["anchor"])]
    sets = prompt_sets(params["target"], words, samples or params["eval_samples"], params["seed"])
    steps, guidance, seed = params["num_inference_steps"], params["guidance_scale"], params["seed"]
    before = judged_rates(base, judge, sets, steps, guidance, seed)
    after, unets = {}, {}
    for mode in retain_modes:
        run = config.validate({**params, "run_name": f"{params['run_name']}_{mode}", "retain_mode": mode})
        pipe = experiment.starting_pipeline(run)
        experiment.prepare_anchors(run, pipe)
        trainer = experiment.make_trainer(run, pipe)
        trainer.run(progress=False)
        unets[mode] = trainer.export(base_model=run["model"])["unet"]
        erased = load_pipeline(run["model"], run["device"], unet=str(unets[mode]))
        after[f"DoCo ({mode})"] = judged_rates(erased, judge, sets, steps, guidance, seed)
    return erasure_table(before, after), unets
