"""Notebook 10's two studies, recorded seed by seed (`doco toy styles-attributes`), on the runs, images and caches
notebook 10 uses, `eval_samples` images per judged prompt set:

- artefact `styles`, toy Table 2: every method of `study_variants` erases each of `style_targets` to plain
  (`style_table`); rows `style_table.measures` (erased, model, seed, measure, value);
- artefact `implicit_attribute`, toy Figure 6: every method erases `attribute`; rows the images judged in it on the
  implicit prompts, per shape and in total (`implicit_attribute.count_implicit`: model, seed, class, count), with the
  attribute and the number of implicit prompts and images per prompt;
- artefact `attribute_colours`: the same runs judged where each colour is named (`rating.judge_kind`: the colour
  head's rate per colour, the shape and style heads beside it for CRA).

The implicit prompts come from notebook 10's search with the params' `seed`, so every seed's part counts the same
prompts on the same held-out seeds.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from doco_lib import config
from doco_lib.evaluation import rating
from doco_lib.studies import implicit_attribute, style_table, versions

ARTEFACTS = ("styles", "implicit_attribute", "attribute_colours")
# Bump when a change alters what this study measures (training, the toy world, its judge, CLIP, sampling, a
# default); tests/test_styles_attributes.py pins the contents of `CODE`, so that every change there is that decision.
STUDY_VERSION = 1
CODE = ("doco_lib/methods", "doco_lib/toy", "doco_lib/studies/styles_attributes.py", "doco_lib/studies/style_table.py",
        "doco_lib/studies/implicit_attribute.py", "doco_lib/studies/ablation.py", "doco_lib/studies/runs.py",
        "doco_lib/evaluation", "doco_lib/models.py", "doco_lib/sampling.py", "doco_lib/anchors.py",
        "doco_lib/config.py", "doco_lib/studies/versions.py")


def implicit_prompts_csv(params: dict) -> tuple[Path, int]:
    """Notebook 10's implicit prompts (searched on the original model with the params' `seed`), written in I2P's
    format under the run folder with `implicit_images` held-out seeds each; the file and the number of prompts."""
    words = implicit_attribute.read_candidate_words(params["implicit_candidates_file"])
    rates = implicit_attribute.colour_rates(params, implicit_attribute.candidate_prompts(words),
                                            params["implicit_samples"], params["seed"])
    found = implicit_attribute.implicit_prompts(rates, params["attribute"], params["implicit_threshold"])
    path = implicit_attribute.write_i2p_csv(list(found.index), params["implicit_images"],
                                            params["seed"] + params["implicit_samples"], params["guidance_scale"],
                                            config.run_dir(params) / "implicit" /
                                            f"implicit_{params['attribute']}_prompts.csv")
    return path, len(found)


def study_rows(params: dict, seeds: list[int]) -> dict[str, pd.DataFrame]:
    """Train (or reuse) every style and attribute run on each seed and measure them: each artefact's rows."""
    variants, styles, attribute = params["study_variants"], params["style_targets"], params["attribute"]
    samples = params["eval_samples"]
    style_table.check_settings(params, variants, styles)  # both studies' settings before any run
    implicit_attribute.check_settings(params, variants, attribute)
    styles_trained = style_table.train_styles(params, variants, styles, seeds)
    style_rows = style_table.measures(rating.judge_kind(params, styles_trained, "style", samples),
                                      style_table.clip_metrics(params, styles_trained), styles)
    i2p_csv, prompts = implicit_prompts_csv(params)
    attribute_trained = implicit_attribute.train_attribute(params, variants, attribute, seeds)
    counts = implicit_attribute.count_implicit(params, attribute_trained, i2p_csv, attribute)
    colours = rating.judge_kind(params, attribute_trained, "colour", samples)
    return {"styles": style_rows.assign(samples=samples),
            "implicit_attribute": counts.assign(attribute=attribute, prompts=prompts, images=params["implicit_images"]),
            "attribute_colours": colours.assign(attribute=attribute, samples=samples)}


def code_digest() -> str:
    return versions.code_digest(CODE)


def study_identity(params: dict) -> str:
    return versions.identity(STUDY_VERSION, params)
