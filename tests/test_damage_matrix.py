"""The collateral-damage matrix (doco_lib/studies/damage_matrix.py): its arithmetic on hand-made rates, the
correlation with similarity and its shape-relabelling permutation test, the settings it refuses before any run, and
the matrix recorded seed by seed (`doco toy damage-matrix`): its rows at a tiny budget, the journal's table and figure
of them, and the pin of the code its numbers come from."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from doco_lib import config
from doco_lib.app import journal
from doco_lib.studies import damage_matrix, versions

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
    assert row["p (permutation)"] == damage_matrix.mantel_spearman(matrix, similarity)[1]
    assert "p" not in row.index  # scipy's p, which treats the cells as independent, is no longer reported


def _off_diagonal(matrix: pd.DataFrame) -> pd.Series:
    return pd.Series({(e, s): matrix.loc[e, s] for e in matrix.index for s in matrix.columns if e != s}).dropna()


def _naive_spearman(damage: pd.DataFrame, similarity: pd.DataFrame):
    """scipy's test on the off-diagonal cells as independent pairs: what entanglement_correlation reported before."""
    off = _off_diagonal(damage)
    return stats.spearmanr(off, _off_diagonal(similarity).reindex(off.index))


def _brute_force_p(damage: pd.DataFrame, similarity: pd.DataFrame, alternative: str) -> float:
    """The permutation p by its definition, independently of the library: relabel the similarity's shapes (rows
    and columns together) by every permutation, recompute scipy's Spearman ρ, count the ones as extreme."""
    shapes = list(similarity.index)
    observed = _naive_spearman(damage, similarity).statistic
    extreme = 0
    perms = list(itertools.permutations(shapes))
    for perm in perms:
        relabelled = similarity.rename(index=dict(zip(shapes, perm)), columns=dict(zip(shapes, perm)))
        rho = _naive_spearman(damage, relabelled).statistic
        extreme += {"two-sided": abs(rho) >= abs(observed) - 1e-9, "greater": rho >= observed - 1e-9,
                    "less": rho <= observed + 1e-9}[alternative]
    return extreme / len(perms)


def _symmetric(values: np.ndarray, shapes: list[str]) -> pd.DataFrame:
    return pd.DataFrame((values + values.T) / 2, index=shapes, columns=shapes)


FOUR = ["star", "pentagon", "circle", "heart"]


def test_the_permutation_p_is_exact_on_four_shapes():
    """4 shapes, 24 relabellings. Damage equal to a similarity whose 6 pairs all differ: ρ = 1, and a relabelling
    reaches ρ = 1 only if it maps every pair to itself, which only the identity does, so p ('greater') = 1/24,
    the smallest an exact test over 4 shapes can give. Two-sided too: ρ = −1 would need a relabelling that maps
    the pairs onto their reverse order, an involution of the 6 pairs fixing none, and every involution of 4 shapes
    (a transposition or two) fixes two pairs. scipy's test on the 12 cells says p ≈ 0. On random
    matrices every alternative equals the brute-force count over the 24 relabellings. Fails on the old code,
    which returned scipy's p."""
    pairs = np.zeros((4, 4))
    pairs[np.triu_indices(4, 1)] = [0.6, 0.1, -0.2, 0.4, 0.3, -0.5]
    similarity = _symmetric(pairs + pairs.T + 2 * np.eye(4), FOUR)
    damage = 50 * similarity
    assert damage_matrix.entanglement_correlation(damage, similarity) == (pytest.approx(1.0), 1 / 24)
    assert damage_matrix.mantel_spearman(damage, similarity, "greater") == (pytest.approx(1.0), 1 / 24)
    assert _naive_spearman(damage, similarity).pvalue < 1e-9
    rng = np.random.default_rng(0)
    for _ in range(5):
        similarity = _symmetric(rng.normal(size=(4, 4)), FOUR)
        damage = pd.DataFrame(rng.integers(-20, 60, size=(4, 4)).astype(float), index=FOUR, columns=FOUR)
        for alternative in ("two-sided", "greater", "less"):
            rho, p = damage_matrix.mantel_spearman(damage, similarity, alternative)
            assert rho == pytest.approx(_naive_spearman(damage, similarity).statistic)
            assert p == pytest.approx(_brute_force_p(damage, similarity, alternative))
            assert round(p * 24) == pytest.approx(p * 24)  # a count of relabellings


def test_the_permutation_test_does_not_depend_on_the_shapes_names_or_order():
    """Reordering the shapes (rows and columns of both matrices together) or renaming them changes neither ρ nor
    the exact p, a count of the 6! = 720 relabellings; a missing damage cell is left out as before. Fails on the
    old code (no mantel_spearman)."""
    shapes = ["circle", "square", "triangle", "star", "pentagon", "hexagon"]
    rng = np.random.default_rng(1)
    similarity = _symmetric(rng.normal(size=(6, 6)), shapes)
    damage = pd.DataFrame(rng.normal(size=(6, 6)) * 10 + 15 * similarity.to_numpy(), index=shapes, columns=shapes)
    damage.loc["star", "circle"] = np.nan
    rho, p = damage_matrix.mantel_spearman(damage, similarity)
    assert rho == pytest.approx(_naive_spearman(damage, similarity).statistic)
    assert round(p * 720) == pytest.approx(p * 720) and p >= 1 / 720
    order = [shapes[i] for i in rng.permutation(6)]
    assert damage_matrix.mantel_spearman(damage.loc[order, order], similarity) == (pytest.approx(rho), pytest.approx(p))
    assert damage_matrix.mantel_spearman(damage, similarity.loc[order, order]) == (pytest.approx(rho), pytest.approx(p))
    names = dict(zip(shapes, "ABCDEF"))
    renamed = damage_matrix.mantel_spearman(damage.rename(index=names, columns=names),
                                            similarity.rename(index=names, columns=names))
    assert renamed == (pytest.approx(rho), pytest.approx(p))


def test_scipy_overstates_a_hub_that_the_permutation_test_finds_once_in_five():
    """5 shapes; "star" is like every other shape (similarity 0.9, the others 0.1 among themselves), every run
    damages star and erasing star damages everything (40-54 points; the 12 cells without star 0-11). The 20
    cells correlate strongly (ρ ≈ 0.78) and scipy, counting them as 20 independent pairs, finds p < 0.001; but
    the evidence is one fact, that the hub is also the damaged shape, and a relabelling puts the hub on the
    damaged shape 1 time in 5: the 4! = 24 relabellings that fix star reach the same ρ, the 96 others less,
    so p = 24/120 = 0.2 exactly. Fails on the old code, which returned scipy's p."""
    shapes = ["star", "pentagon", "circle", "heart", "cross"]
    similarity = pd.DataFrame(0.1, index=shapes, columns=shapes)
    similarity.loc["star"] = similarity["star"] = 0.9
    damage = pd.DataFrame(np.arange(25, dtype=float).reshape(5, 5) % 12, index=shapes, columns=shapes)
    damage.loc["star"] = 40 + np.arange(5.0)
    damage["star"] = 50 + np.arange(5.0)
    naive = _naive_spearman(damage, similarity)
    assert naive.statistic > 0.75 and naive.pvalue < 1e-3
    rho, p = damage_matrix.entanglement_correlation(damage, similarity)
    assert rho == pytest.approx(naive.statistic) and p == pytest.approx(24 / 120)
    assert damage_matrix.mantel_spearman(damage, similarity, "greater")[1] == pytest.approx(24 / 120)


def test_more_than_eight_shapes_are_sampled_with_the_observed_labelling_counted():
    """Past EXACT_UP_TO shapes the p-value is a seeded Monte Carlo one, (1 + hits) / (1 + permutations), never
    0; on 6 shapes forced to sample it lands near the exact count."""
    shapes = [f"s{i}" for i in range(6)]
    rng = np.random.default_rng(2)
    similarity = _symmetric(rng.normal(size=(6, 6)), shapes)
    damage = pd.DataFrame(rng.normal(size=(6, 6)) * 10 + 8 * similarity.to_numpy(), index=shapes, columns=shapes)
    _, exact = damage_matrix.mantel_spearman(damage, similarity)
    _, sampled = damage_matrix.mantel_spearman(damage, similarity, exact_up_to=0, permutations=4999, seed=3)
    assert round(sampled * 5000) == pytest.approx(sampled * 5000) and sampled >= 1 / 5000
    assert sampled == pytest.approx(exact, abs=0.03)
    assert damage_matrix.mantel_spearman(damage, similarity, exact_up_to=0, permutations=4999, seed=3)[1] == sampled
    assert damage_matrix.mantel_spearman(10 * similarity, similarity)[1] == pytest.approx(1 / 720)  # ρ = 1, exact
    nine = [f"s{i}" for i in range(9)]  # past EXACT_UP_TO: ρ = 1, which no other of 99 sampled relabellings reaches
    similarity9 = _symmetric(rng.normal(size=(9, 9)), nine)
    assert damage_matrix.mantel_spearman(10 * similarity9, similarity9, permutations=99)[1] == pytest.approx(1 / 100)


def test_a_constant_side_gives_no_correlation_and_bad_input_is_refused():
    similarity = _symmetric(np.random.default_rng(4).normal(size=(4, 4)), FOUR)
    rho, p = damage_matrix.mantel_spearman(pd.DataFrame(5.0, index=FOUR, columns=FOUR), similarity)
    assert math.isnan(rho) and math.isnan(p)
    with pytest.raises(ValueError, match="alternative"):
        damage_matrix.mantel_spearman(similarity, similarity, "both")
    with pytest.raises(ValueError, match="not the damage matrix's"):
        damage_matrix.mantel_spearman(similarity, similarity.iloc[:3, :3])


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


@pytest.mark.usefixtures("one_torch_thread")
def test_recorded_rows_at_a_tiny_budget_hold_every_run_and_the_shapes_similarity(tmp_path):
    """UCE (closed form, no training loop) erasing each of three shapes, on two seeds, 2 images per shape."""
    params = config.validate({"output_root": str(tmp_path), "device": "cpu", "num_inference_steps": 4,
                              "n_anchor_images": 4, "anchor_shard_size": 4, "eval_samples": 2})
    rows = damage_matrix.matrix_rows(params, ["UCE"], SHAPES, [0, 1])
    assert list(rows.columns) == damage_matrix.COLUMNS and set(rows.seed) == {0, 1} and (rows.samples == 2).all()
    assert len(rows) == 2 * (3 + 3 * 3)  # per seed: the original's 3 shapes, then 3 runs × 3 shapes
    assert rows[rows.model == "original"].similarity.isna().all()
    runs = rows[rows.model == "UCE"]
    similarity = runs.drop_duplicates(["erased", "judged"]).pivot(index="erased", columns="judged", values="similarity")
    assert np.allclose(similarity.to_numpy(), similarity.to_numpy().T) and np.allclose(np.diag(similarity), 1)
    per_seed, _ = damage_matrix.matrices_from_rows(rows)
    assert set(per_seed["UCE"]) == {0, 1} and per_seed["UCE"][0].notna().all().all()


def _recorded(similarity: dict[tuple[str, str], float]) -> pd.DataFrame:
    """Rows as `matrix_rows` writes them: the original draws every shape; M erases its shape fully on seed 0 and to
    20% on seed 1, and damages each other shape by a share of their similarity (0.5 on seed 0, 0.3 on seed 1)."""
    sim = {**similarity, **{(b, a): v for (a, b), v in similarity.items()}, **{(s, s): 1.0 for s in SHAPES}}
    rows = []
    for seed, erased_rate, share in ((0, 0.0, 0.5), (1, 0.2, 0.3)):
        rows += [{"model": "original", "seed": seed, "erased": "", "judged": s, "rate": 1.0,
                  "similarity": math.nan, "samples": 64} for s in SHAPES]
        rows += [{"model": "M", "seed": seed, "erased": e, "judged": s,
                  "rate": erased_rate if e == s else 1 - share * sim[e, s], "similarity": sim[e, s], "samples": 64}
                 for e in SHAPES for s in SHAPES]
    return pd.DataFrame(rows)


def test_the_journal_table_gives_each_seeds_numbers_with_intervals_and_the_mean_matrixs_permutation_p():
    rows = _recorded({("star", "pentagon"): 0.9, ("star", "circle"): 0.1, ("pentagon", "circle"): 0.5})
    lines = journal.damage_matrix_table(rows).splitlines()
    assert lines[0] == ("| method | erasure (diagonal, pts) | damage (off the diagonal, pts) | ρ (damage, similarity) | "
                        "ρ of the mean matrix | p (permutation) |")
    # Erasure 100 and 80 → 90 ± t(0.975, 1) · 10 = 127.1; damage 50 · sim and 30 · sim, off-diagonal means 25 and 15
    # → 20 ± 63.5; the damage ranks as the similarity on both seeds, ρ = 1. Of the 3! relabellings of three shapes,
    # the identity and the one that swaps the most and least alike pairs reach |ρ| = 1: p = 2/6.
    assert lines[2] == "| M | 90.0 ± 127.1 | 20.0 ± 63.5 | 1.00 ± 0.00 | 1.00 | 0.333 |"
    assert journal.RENDERERS["damage_matrix"] is journal.damage_matrix_table


def test_the_figure_is_drawn_from_the_artefacts_seed_mean_matrices():
    import matplotlib.pyplot as plt

    rows = _recorded({("star", "pentagon"): 0.9, ("star", "circle"): 0.1, ("pentagon", "circle"): 0.5})
    matrices, similarity = damage_matrix.mean_matrices(rows)
    assert matrices["M"].loc["star", "pentagon"] == pytest.approx((45 + 27) / 2)
    assert matrices["M"].loc["circle", "circle"] == pytest.approx(90)
    assert similarity.loc["pentagon", "star"] == 0.9 and list(similarity.index) == SHAPES
    figure = journal.FIGURES["damage_matrix"][1](rows)
    assert [ax.get_title() for ax in figure.axes] == ["M", "text-encoder similarity"]
    assert figure.get_suptitle() == "points of judged rate lost, mean over seeds [0, 1]"  # plain ints, not np.int64(0)
    plt.close(figure)



def test_the_settings_that_do_not_change_a_seeds_matrix_leave_its_identity():
    params = config.validate({})
    assert damage_matrix.study_identity(params) == damage_matrix.study_identity({**params, "damage_seed": 3,
                                                                                  "run_name": "elsewhere"})
    assert damage_matrix.study_identity(params) != damage_matrix.study_identity({**params, "eval_samples": 16})


# The digest of damage_matrix.CODE when STUDY_VERSION was last decided on.
PINNED_CODE_DIGEST = "51937945c3f8a1afa105b511081bb325fc62bc4e86b3cb98b003d8bdd8c62b70"


def test_every_change_to_the_studys_code_is_a_decision_on_its_version():
    digest = damage_matrix.code_digest()
    assert digest == PINNED_CODE_DIGEST, versions.pin_message("damage_matrix", digest)
