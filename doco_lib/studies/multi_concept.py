"""Notebook 05's multi-concept erasure, recorded seed by seed (`doco toy multi-concept`, artefact `multi_concept`):
the targets of `sequential_stages` erased one after another and all at once on `multi_concept_model` (DoCo cp,
`ablation.train_sequential` and `ablation.train_simultaneous`: the runs notebook 05 trains and reuses), then the
original model, every stage and the run that erased them at once judged on each stage's target and the other shapes
(`eval_samples` images per prompt set and seed). A row per (model, seed, prompt set): the judged rate of the
prompted shape and the images judged.
"""

from __future__ import annotations

import pandas as pd

from doco_lib.evaluation import rating
from doco_lib.studies import ablation, versions

COLUMNS = ["model", "seed", "prompt set", "rate", "samples"]
# Bump when a change alters what this study measures (training, the toy world, its judge, sampling, a default);
# tests/test_multi_concept.py pins the contents of `CODE`, so that every change there is that decision.
STUDY_VERSION = 1
CODE = ("doco_lib/methods", "doco_lib/toy", "doco_lib/studies/multi_concept.py", "doco_lib/studies/ablation.py",
        "doco_lib/studies/runs.py", "doco_lib/models.py", "doco_lib/sampling.py", "doco_lib/anchors.py",
        "doco_lib/evaluation/rating.py", "doco_lib/config.py", "doco_lib/studies/versions.py")


def watched_shapes(params: dict) -> list[str]:
    """The prompt sets judged after each stage: the stages' targets in order, then notebook 05's target, anchor and
    related shapes that no stage erases."""
    targets = [ablation.parse_stage(stage)[0] for stage in params["sequential_stages"]]
    others = [params["target"], params["anchor"], *params["related_concepts"]]
    return list(dict.fromkeys(targets + [s for s in others if s not in targets]))


def multi_concept_rows(params: dict, seeds: list[int]) -> pd.DataFrame:
    """Train (or reuse) the sequential stages and the all-at-once run on each seed and judge them beside the
    original: the artefact's rows."""
    ablation.check_toy_study(params, ["DoCo (cp)"], "ablation_variants", "the multi-concept table",
                             "on SD, judge the stages with notebook 05")
    stages, samples = params["sequential_stages"], params["eval_samples"]
    runs = pd.concat([ablation.train_sequential(params, stages, seeds), ablation.train_simultaneous(params, stages, seeds)],
                     ignore_index=True)
    judged = rating.rate_models(params, runs[["stage", "erased so far", "seed", "unet", "model"]],
                                watched_shapes(params), samples)
    return judged.assign(samples=samples)[COLUMNS]


def code_digest() -> str:
    return versions.code_digest(CODE)


def study_identity(params: dict) -> str:
    return versions.identity(STUDY_VERSION, params)
