"""Notebook 05's comparison of the methods, recorded seed by seed (`doco toy methods`, artefact `methods`): every
variant of `ablation_variants` trained on a seed as notebook 05 trains it (`ablation.train_grid`: runs shared with
notebook 05 and the attack study), and the original model, judged on every shape's prompts (`eval_samples` images
per set; the target's synonym too), with the judge's colour and style heads on the same images. The journal's table
is notebook 05's: each shape's judged rate and UnlearnCanvas's UA / IRA / CRA (`unlearn_canvas.table`), mean over
seeds ± 95% Student-t interval.

A row per (model, seed, prompt set): the judged rate of the prompted shape, the colour and style rates, the images
judged, and the set's role in UA / IRA / CRA: the target, an erased set (its synonym), a retained shape or a
cross-domain concept (`cross_domain_concepts`).
"""

from __future__ import annotations

import pandas as pd

from doco_lib.evaluation import rating
from doco_lib.studies import ablation, versions
from doco_lib.toy.render import SYNONYMS

COLUMNS = ["model", "seed", "prompt set", "role", "rate", "colour rate", "style rate", "samples"]
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


def method_rows(params: dict, variants: list[str], seeds: list[int], samples: int) -> pd.DataFrame:
    """Train (or reuse) each variant per seed and judge it beside the original: the artefact's rows."""
    grid = ablation.train_grid(params, variants, seeds)
    judged = rating.rate_models(params, grid, judged_shapes(params), samples)
    target = params["target"]
    roles = {target: "target", SYNONYMS.get(target, target): "erased",
             **{c: "cross-domain" for c in params["cross_domain_concepts"]}}
    judged = judged.assign(role=[roles.get(s, "retained") for s in judged["prompt set"]], samples=samples)
    return judged[COLUMNS]


def code_digest() -> str:
    return versions.code_digest(CODE)


def study_identity(params: dict) -> str:
    return versions.identity(STUDY_VERSION, params)
