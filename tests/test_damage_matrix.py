"""The collateral-damage matrix (doco_lib/studies/damage_matrix.py): its arithmetic on hand-made rates, the
correlation with similarity, and the settings it refuses before any run."""

import pandas as pd
import pytest

from doco_lib import config
from doco_lib.studies import damage_matrix

SHAPES = ["star", "pentagon", "circle"]


def _judged():
    rates = {"original": {"": {"star": 1.0, "pentagon": 1.0, "circle": 0.5}},
             "M": {"star": {"star": 0.0, "pentagon": 0.5, "circle": 0.5},
                   "pentagon": {"star": 0.75, "pentagon": 0.25, "circle": 0.5},
                   "circle": {"star": 1.0, "pentagon": 1.0, "circle": 0.0}}}
    return pd.DataFrame([{"model": model, "erased": erased, "judged": s, "rate": r}
                         for model, runs in rates.items() for erased, row in runs.items() for s, r in row.items()])


def test_damage_is_the_fall_from_the_original_per_erased_and_judged_shape():
    matrix = damage_matrix.damage(_judged(), "M", SHAPES)
    assert list(matrix.index) == SHAPES and list(matrix.columns) == SHAPES
    assert matrix.loc["star", "star"] == 100 and matrix.loc["star", "pentagon"] == 50
    assert matrix.loc["pentagon", "star"] == 25 and matrix.loc["circle", "circle"] == 50
    assert matrix.loc["circle", "pentagon"] == 0 and matrix.loc["star", "circle"] == 0


def test_summary_splits_the_diagonal_from_the_damage_and_ranks_it_against_similarity():
    matrix = damage_matrix.damage(_judged(), "M", SHAPES)
    similarity = pd.DataFrame([[1.0, 0.9, -0.5], [0.8, 1.0, -0.4], [-0.5, -0.4, 1.0]], index=SHAPES, columns=SHAPES)
    row = damage_matrix.summary({"M": matrix}, similarity).loc["M"]
    assert row["erasure (diagonal, pts)"] == pytest.approx((100 + 75 + 50) / 3)
    assert row["damage (off the diagonal, pts)"] == pytest.approx((50 + 0 + 25 + 0 + 0 + 0) / 6)
    assert row["Spearman ρ (damage, similarity)"] > 0.8  # the two damaged pairs are the two most similar


@pytest.mark.parametrize("overrides, variants, shapes, message", [
    ({"model": "CompVis/stable-diffusion-v1-4"}, ["DoCo (cp)"], SHAPES, "reads the toy judge"),
    ({}, ["DoCo (cp)", "ESD-y"], SHAPES, "damage_variants: unknown \\['ESD-y'\\]"),
    ({}, ["DoCo (cp)"], ["star", "octagon"], "damage_shapes"),
    ({}, ["DoCo (cp)"], ["star"], "two or more"),
])
def test_the_settings_it_cannot_run_are_refused_first(overrides, variants, shapes, message):
    params = {**config.validate({}), **overrides}
    with pytest.raises(config.ParamsError, match=message):
        damage_matrix.check_settings(params, variants, shapes)
