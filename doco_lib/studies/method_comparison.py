"""Notebook 05's comparison of the methods, recorded seed by seed (`doco toy methods`, artefact `methods`): every
variant of `ablation_variants` trained on a seed as notebook 05 trains it (`ablation.train_grid`: runs shared with
notebook 05 and the attack study), and the original model, judged on every shape's prompts (`eval_samples` images
per set; the target's synonym too), with the judge's colour and style heads on the same images. The journal's table
is notebook 05's: each shape's judged rate and UnlearnCanvas's UA / IRA / CRA (`unlearn_canvas.table`), mean over
seeds ± 95% Student-t interval.

A row per (model, seed, prompt set): the judged rate of the prompted shape, the colour and style rates, the images
judged, and the set's role in UA / IRA / CRA: the target, an erased set (its synonym), a retained shape or a
cross-domain concept (`cross_domain_concepts`).

Beside it, from the same runs, two more of notebook 05's tables: the erasure across sampling settings (artefact
`sampling_sweep`: the target's and its synonym's judged rate at every guidance scale of `sweep_guidance_scales` and
step count of `sweep_steps`, `rating.sampling_sweep`) and what each run cost to train (artefact `method_costs`: its
cost record, `costs_table.training_records`).
"""

from __future__ import annotations

import pandas as pd

from doco_lib.evaluation import costs_table, rating
from doco_lib.studies import ablation, versions
from doco_lib.toy.render import SYNONYMS

COLUMNS = ["model", "seed", "prompt set", "role", "rate", "colour rate", "style rate", "samples"]
SWEEP_COLUMNS = ["model", "seed", "prompt set", "role", "guidance", "steps", "rate", "samples"]
COST_COLUMNS = [c for c in costs_table.TRAINING_COLUMNS if c != "record"]  # not where this machine kept it
# Bump when a change alters what this study measures (training, the toy world, its judge, sampling, a default);
# tests/test_method_comparison.py pins the contents of `CODE`, so that every change there is that decision.
STUDY_VERSION = 1
CODE = ("doco_lib/methods", "doco_lib/toy", "doco_lib/studies/method_comparison.py", "doco_lib/studies/ablation.py",
        "doco_lib/studies/runs.py", "doco_lib/studies/sepme_study.py", "doco_lib/models.py", "doco_lib/sampling.py",
        "doco_lib/anchors.py", "doco_lib/evaluation/rating.py", "doco_lib/config.py", "doco_lib/studies/versions.py")


def judged_shapes(params: dict) -> list[str]:
    """Notebook 05's prompt sets: the target, the anchor, the related shapes and the cross-domain concepts."""
    target, anchor = params["target"], params["anchor"]
    shapes = [target, anchor] + [w for w in params["related_concepts"] if w not in (target, anchor)]
    return shapes + [c for c in params["cross_domain_concepts"] if c not in shapes]


def _roles(params: dict, prompt_sets: pd.Series) -> list[str]:
    target = params["target"]
    roles = {target: "target", SYNONYMS.get(target, target): "erased",
             **{c: "cross-domain" for c in params["cross_domain_concepts"]}}
    return [roles.get(s, "retained") for s in prompt_sets]


def method_rows(params: dict, variants: list[str], seeds: list[int], samples: int) -> pd.DataFrame:
    """Train (or reuse) each variant per seed and judge it beside the original: artefact `methods`' rows."""
    return study_rows(params, variants, seeds, samples, sweep=False)["methods"]


def study_rows(params: dict, variants: list[str], seeds: list[int], samples: int,
               sweep: bool = True) -> dict[str, pd.DataFrame]:
    """Train (or reuse) each variant per seed, judge it beside the original and read its cost record; with `sweep`,
    judge the target across sampling settings too: the rows of artefacts `methods`, `method_costs` and
    `sampling_sweep`."""
    grid = ablation.train_grid(params, variants, seeds)
    judged = rating.rate_models(params, grid, judged_shapes(params), samples)
    studies = {"methods": judged.assign(role=_roles(params, judged["prompt set"]), samples=samples)[COLUMNS],
               "method_costs": costs_table.training_records(grid)[COST_COLUMNS]}
    if sweep:
        swept = rating.sampling_sweep(params, grid, params["sweep_guidance_scales"], params["sweep_steps"], samples)
        studies["sampling_sweep"] = swept.assign(role=_roles(params, swept["prompt set"]),
                                                 samples=samples)[SWEEP_COLUMNS]
    return studies


def code_digest() -> str:
    return versions.code_digest(CODE)


def study_identity(params: dict) -> str:
    return versions.identity(STUDY_VERSION, params)
