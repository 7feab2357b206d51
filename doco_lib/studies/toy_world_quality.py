"""How well the shipped toy pipelines follow prompts, over seeds (`doco toy quality`, the results journal's
`toy_world` artefact): `toy.quality.pipeline_quality` of each model from several disjoint seed ranges."""

from __future__ import annotations

import pandas as pd

from doco_lib.errors import ParamsError
from doco_lib.models import load_judge, load_pipeline
from doco_lib.toy.quality import pipeline_quality, quality_table


def quality_rows(models: list[str], seeds: list[int], n_per_prompt: int, steps: int, guidance: float,
                 device: str = "cpu") -> pd.DataFrame:
    """One row per model ('toy', 'toy-wide', 'toy-mmdit'), seed, attribute and value: the share of `n_per_prompt`
    samples the judge names as prompted. Seeds closer than `n_per_prompt` share images, so they are refused."""
    ordered = sorted(seeds)
    if any(b - a < n_per_prompt for a, b in zip(ordered, ordered[1:])):
        raise ParamsError(f"--seeds: {seeds}; image i of a seed uses seed + i, so seeds must lie at least --samples "
                          f"({n_per_prompt}) apart to give independent images, e.g. 0 1000 2000.")
    judge = load_judge(device)
    parts = []
    for model in models:
        pipe = load_pipeline(model, device)
        for seed in seeds:
            table = quality_table(pipeline_quality(pipe, judge, n_per_prompt, steps, guidance, seed))
            parts.append(table.assign(model=model, seed=seed, samples=n_per_prompt))
    rows = pd.concat(parts, ignore_index=True).rename(columns={"accuracy": "rate"})
    return rows[["model", "seed", "attribute", "value", "samples", "rate"]]
