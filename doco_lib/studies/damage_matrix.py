"""The collateral-damage matrix (notebook 09): erase each toy shape in turn with a method, judge every shape
afterwards, and set the damage beside how alike the text encoder encodes the shapes.

Run (method, erased shape e): an ordinary ablation run (`ablation.train_run`, cached and resumable) with
target e and the anchor "shape" over `params/prompts/toy_shape.txt` ("a red shape", "a shape on a dotted
background": captions whose shape the model leaves to chance), so that no other shape is the anchor and
favoured by construction; no preservation prompts, so that no shape is protected by being retained. Judged
afterwards on the prompt sets of every shape (`eval_samples` images each, the seed of the run):

    damage[e, s] = rate_original(s) − rate_erased_e(s)     (points; the diagonal is the erasure itself)

and beside it `models.concept_similarity`, the cosine of the shapes' text states. Damage that follows
entanglement shows as a positive rank correlation between the off-diagonal damage and similarity.

The off-diagonal cells are not independent observations (the similarity is symmetric, so each pair of shapes
appears twice; a row shares one run, a column one judged shape), so the correlation's p-value comes from a
Mantel-style permutation test (`mantel_spearman`): under the null hypothesis the shapes' labels are exchangeable,
so the rows and columns of the similarity matrix are permuted together and Spearman's ρ recomputed against the
fixed damage; exact over all n! relabellings for up to `EXACT_UP_TO` shapes (8 shapes: 40,320), otherwise a
seeded Monte Carlo sample with the observed labelling counted in (p = (1 + hits) / (1 + permutations)).

Recorded seed by seed (`doco toy damage-matrix`, artefact `damage_matrix`): a row per (model, seed, erased shape,
judged shape), with the two shapes' similarity beside the rate, so that the journal's table (`seed_summaries`,
`summary` of the seed-mean matrices) and figure (`artefact_figure`) are made from the rows alone.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

from doco_lib import config
from doco_lib.io import slug
from doco_lib.methods.registry import VARIANTS
from doco_lib.models import concept_similarity, load_judge, load_pipeline
from doco_lib.studies import versions
from doco_lib.studies.ablation import check_toy_study, run_params, train_run
from doco_lib.toy.erasure import cached_judged_rates, prompt_sets
from doco_lib.toy.render import SHAPES

ANCHOR, ANCHOR_PROMPTS = "shape", "params/prompts/toy_shape.txt"
EXACT_UP_TO = 8  # shapes: up to 8! = 40,320 relabellings are enumerated; more are sampled
MONTE_CARLO_PERMUTATIONS = 9999
ALTERNATIVES = ("two-sided", "greater", "less")
COLUMNS = ["model", "seed", "erased", "judged", "rate", "similarity", "samples"]
# Bump when a change alters what the recorded matrix measures (training, the toy world, its judge, sampling, a
# default); tests/test_damage_matrix.py pins the contents of `CODE`, so that every change there is that decision.
STUDY_VERSION = 1
CODE = ("doco_lib/methods", "doco_lib/toy", "doco_lib/studies/damage_matrix.py", "doco_lib/studies/ablation.py",
        "doco_lib/studies/runs.py", "doco_lib/models.py", "doco_lib/sampling.py", "doco_lib/anchors.py",
        "doco_lib/config.py", "doco_lib/studies/versions.py")


def check_settings(params: dict, variants: list[str], shapes: list[str]) -> None:
    """Refuse, before any run, what the matrix cannot do: a model without the toy judge, unknown variants or
    shapes."""
    check_toy_study(params, variants, "damage_variants", "the collateral-damage matrix",
                    "on SD, compare concepts with notebook 04")
    if len(shapes) < 2 or any(s not in SHAPES for s in shapes):
        raise config.ParamsError(f"damage_shapes: {shapes}; expected two or more of the toy shapes {list(SHAPES)}.")


def train_matrix(params: dict, variants: list[str], shapes: list[str], seed: int) -> pd.DataFrame:
    """One run per (variant, erased shape); a table of their UNet folders."""
    check_settings(params, variants, shapes)
    runs = [(variant, shape, run_params(params, f"damage {variant} {shape}", seed,
                                        {**VARIANTS[variant], "target": shape, "anchor": ANCHOR,
                                         "anchor_prompts_file": ANCHOR_PROMPTS, "preservation_prompts_file": ""}))
            for variant in variants for shape in shapes]  # all validated first
    return pd.DataFrame([{"variant": variant, "erased": shape, "seed": seed, "unet": str(train_run(run))}
                         for variant, shape, run in runs])


def judge_matrix(params: dict, trained: pd.DataFrame, shapes: list[str], samples: int) -> pd.DataFrame:
    """Judged rate of every shape's prompt set for the original model and each run (rows: model, erased,
    judged, rate); the target's synonym set is left out, so each run is judged on the same sets."""
    judge = load_judge(params["device"])
    steps, guidance, seed = params["num_inference_steps"], params["guidance_scale"], int(trained.seed.iloc[0])
    sets = {shape: prompt_sets(shape, [], samples, seed)[shape] for shape in shapes}
    cache = config.run_dir(params) / "damage_matrix" / f"original_judged_rates_{slug(params['model'])}.json"
    original = cached_judged_rates(load_pipeline(params["model"], params["device"]), judge, sets, steps, guidance,
                                   seed, cache)
    rows = [{"model": "original", "erased": "", "judged": s, "rate": rate} for s, rate in original.items()]
    for record in trained.to_dict("records"):
        erased = load_pipeline(params["model"], params["device"], unet=record["unet"])
        rates = cached_judged_rates(erased, judge, sets, steps, guidance, seed,
                                    config.run_dir(params) / "damage_matrix" / "judged" /
                                    f"{slug(record['variant'])}_{record['erased']}.json")
        rows += [{"model": record["variant"], "erased": record["erased"], "judged": s, "rate": rate}
                 for s, rate in rates.items()]
    return pd.DataFrame(rows)


def damage(judged: pd.DataFrame, variant: str, shapes: list[str]) -> pd.DataFrame:
    """damage[e, s] in points for one variant: rows the erased shape, columns the judged one."""
    original = judged[judged.model == "original"].set_index("judged")["rate"]
    runs = judged[judged.model == variant]
    matrix = runs.pivot_table(index="erased", columns="judged", values="rate", sort=False)
    return (100 * (original - matrix)).reindex(index=shapes, columns=shapes)


def similarity(params: dict, shapes: list[str]) -> pd.DataFrame:
    return concept_similarity(load_pipeline(params["model"], params["device"]), shapes)


def _diagonal(matrix: pd.DataFrame) -> pd.DataFrame:
    """True where the row's shape is the column's (erased = judged)."""
    return pd.DataFrame([[e == s for s in matrix.columns] for e in matrix.index], index=matrix.index,
                        columns=matrix.columns)


def relabellings(n: int, exact_up_to: int = EXACT_UP_TO, permutations: int = MONTE_CARLO_PERMUTATIONS,
                 seed: int = 0) -> np.ndarray:
    """Relabellings of n shapes as rows of indices, the identity (the observed labelling) first: all n! of them
    when n ≤ exact_up_to, else the identity and `permutations` drawn uniformly with `seed`."""
    if n <= exact_up_to:
        return np.array(list(itertools.permutations(range(n))), dtype=np.intp)  # lexicographic: identity first
    rng = np.random.default_rng(seed)
    return np.vstack([np.arange(n), rng.permuted(np.tile(np.arange(n), (permutations, 1)), axis=1)])


def mantel_spearman(damage_matrix: pd.DataFrame, similarity_matrix: pd.DataFrame, alternative: str = "two-sided",
                    exact_up_to: int = EXACT_UP_TO, permutations: int = MONTE_CARLO_PERMUTATIONS,
                    seed: int = 0) -> tuple[float, float]:
    """Spearman's ρ between the off-diagonal damage and the shapes' similarity, and its p-value from a
    Mantel-style permutation test that respects the matrices' structure.

    Null hypothesis: the shapes' labels are exchangeable. Each relabelling π permutes the similarity's rows and
    columns together, sim_π[e, s] = sim[π(e), π(s)], so the matrix stays symmetric and every run keeps its own
    row; ρ_π is Spearman's ρ of the fixed damage against sim_π over the same off-diagonal cells (cells whose
    damage is missing left out). The p-value is the share of relabellings with ρ_π at least as extreme as the
    observed ρ (`alternative`: "two-sided" |ρ_π| ≥ |ρ|, "greater" ρ_π ≥ ρ, "less" ρ_π ≤ ρ), the observed
    labelling counted among them: exact over all n! relabellings for n ≤ `exact_up_to` shapes, otherwise over
    `permutations` seeded random ones plus the observed, (1 + hits) / (1 + permutations). The exact p is never
    below 1/n! (1/24 for 4 shapes), however many cells there are, unlike scipy's test, which treats the n(n − 1)
    cells as independent pairs. ρ and p are NaN where either side's off-diagonal values are all equal."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative {alternative!r}; expected one of {ALTERNATIVES}")
    shapes = list(damage_matrix.index)
    if list(damage_matrix.columns) != shapes or len(set(shapes)) != len(shapes):
        raise ValueError(f"the damage matrix's rows {shapes} and columns {list(damage_matrix.columns)} must be the "
                         "same shapes in the same order")
    if set(similarity_matrix.index) != set(shapes) or set(similarity_matrix.columns) != set(shapes):
        raise ValueError(f"the similarity matrix's shapes {list(similarity_matrix.index)} are not the damage "
                         f"matrix's {shapes}")
    damage_values = damage_matrix.to_numpy(dtype=float)
    sim = similarity_matrix.reindex(index=shapes, columns=shapes).to_numpy(dtype=float)
    n = len(shapes)
    rows, cols = np.nonzero(~np.eye(n, dtype=bool) & np.isfinite(damage_values))
    x = stats.rankdata(damage_values[rows, cols])
    perms = relabellings(n, exact_up_to, permutations, seed)
    y = stats.rankdata(sim[perms[:, rows], perms[:, cols]], axis=1)  # row k: the similarity's ranks under π_k
    x, y = x - x.mean(), y - y.mean(axis=1, keepdims=True)
    norms = np.sqrt((x**2).sum()) * np.sqrt((y**2).sum(axis=1))
    if len(x) < 2 or norms[0] == 0:
        return math.nan, math.nan
    with np.errstate(invalid="ignore", divide="ignore"):  # a relabelling that makes y constant: NaN, never a hit
        rho = (y @ x) / norms  # the observed ρ first
    observed, tolerance = rho[0], 1e-9  # ranks are exact halves: a tie is a tie
    hits = {"two-sided": np.abs(rho) >= abs(observed) - tolerance, "greater": rho >= observed - tolerance,
            "less": rho <= observed + tolerance}[alternative]
    return float(observed), float(hits.sum() / len(rho))


def entanglement_correlation(damage_matrix: pd.DataFrame, similarity_matrix: pd.DataFrame,
                             alternative: str = "two-sided") -> tuple[float, float]:
    """Spearman's ρ between the off-diagonal damage and the shapes' text similarity, with the p-value of the
    shape-relabelling permutation test (`mantel_spearman`), not scipy's, which treats the n(n − 1) off-diagonal
    cells as independent pairs although each pair of shapes appears twice and each row shares one run."""
    return mantel_spearman(damage_matrix, similarity_matrix, alternative)


def summary(matrices: dict[str, pd.DataFrame], similarity_matrix: pd.DataFrame) -> pd.DataFrame:
    """Per method: the erasure (mean of the diagonal), the mean collateral damage (off it), and Spearman's ρ of
    the off-diagonal damage against the similarity, with its two-sided p-value from the shape-relabelling
    permutation test (`mantel_spearman`; column "p (permutation)")."""
    rows = []
    for variant, matrix in matrices.items():
        on_diagonal = _diagonal(matrix)
        rho, p = entanglement_correlation(matrix, similarity_matrix)
        rows.append({"method": variant, "erasure (diagonal, pts)": matrix.where(on_diagonal).stack().mean(),
                     "damage (off the diagonal, pts)": matrix.where(~on_diagonal).stack().mean(),
                     "Spearman ρ (damage, similarity)": rho, "p (permutation)": p})
    return pd.DataFrame(rows).set_index("method")


def matrix_rows(params: dict, variants: list[str], shapes: list[str], seeds: list[int]) -> pd.DataFrame:
    """Train (or reuse) and judge the matrix on each seed, `eval_samples` images per shape: the artefact's rows,
    the original model's with no erased shape and no similarity."""
    check_settings(params, variants, shapes)
    text_similarity = similarity(params, shapes)
    rows = pd.concat([judge_matrix(params, train_matrix(params, variants, shapes, seed), shapes,
                                   params["eval_samples"]).assign(seed=seed) for seed in seeds], ignore_index=True)
    rows["similarity"] = [text_similarity.loc[e, s] if e else math.nan for e, s in zip(rows.erased, rows.judged)]
    return rows.assign(samples=params["eval_samples"])[COLUMNS]


def matrices_from_rows(rows: pd.DataFrame) -> tuple[dict[str, dict[int, pd.DataFrame]], pd.DataFrame]:
    """From the artefact's rows: each method's damage matrix per seed, and the shapes' similarity."""
    shapes = list(dict.fromkeys(rows.judged))
    variants = [m for m in dict.fromkeys(rows.model) if m != "original"]
    per_seed = {v: {seed: damage(group, v, shapes) for seed, group in rows.groupby("seed")} for v in variants}
    runs = rows[rows.model != "original"]
    text_similarity = runs.pivot_table(index="erased", columns="judged", values="similarity", aggfunc="first")
    return per_seed, text_similarity.reindex(index=shapes, columns=shapes)


def seed_summaries(rows: pd.DataFrame) -> pd.DataFrame:
    """`summary` of each seed's matrices, a row per (method, seed)."""
    per_seed, text_similarity = matrices_from_rows(rows)
    seeds = sorted(rows.seed.unique())
    return pd.concat([summary({v: m[seed] for v, m in per_seed.items()}, text_similarity).assign(seed=seed)
                      for seed in seeds]).reset_index()


def mean_matrices(rows: pd.DataFrame) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Each method's damage matrix averaged over seeds, and the similarity."""
    per_seed, text_similarity = matrices_from_rows(rows)
    return {v: sum(m.values()) / len(m) for v, m in per_seed.items()}, text_similarity


def damage_figure(matrices: dict[str, pd.DataFrame], text_similarity: pd.DataFrame, title: str = ""):
    """A heatmap per method of its damage (rows erased, columns judged, points), then the similarity's."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    figure, axes = plt.subplots(1, len(matrices) + 1, figsize=(4.2 * (len(matrices) + 1), 4))
    for ax, (variant, matrix) in zip(axes, matrices.items()):
        sns.heatmap(matrix, ax=ax, cmap="RdBu_r", center=0, vmin=-100, vmax=100, annot=True, fmt=".0f", cbar=False,
                    annot_kws={"size": 7}, square=True)
        ax.set(title=variant, xlabel="judged", ylabel="erased")
    sns.heatmap(text_similarity, ax=axes[-1], cmap="RdBu_r", center=0, vmin=-1, vmax=1, annot=True, fmt=".1f",
                cbar=False, annot_kws={"size": 7}, square=True)
    axes[-1].set(title="text-encoder similarity", xlabel="", ylabel="")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def artefact_figure(rows: pd.DataFrame):
    """`damage_figure` of the artefact's matrices averaged over its seeds."""
    seeds = sorted(int(seed) for seed in rows.seed.unique())
    return damage_figure(*mean_matrices(rows), title=f"points of judged rate lost, mean over seeds {seeds}")


def code_digest() -> str:
    return versions.code_digest(CODE)


def study_identity(params: dict) -> str:
    return versions.identity(STUDY_VERSION, params)
