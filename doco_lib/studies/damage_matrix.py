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
"""

from __future__ import annotations

import pandas as pd
from scipy import stats

from doco_lib import config
from doco_lib.io import slug
from doco_lib.methods.registry import VARIANTS
from doco_lib.models import concept_similarity, load_judge, load_pipeline
from doco_lib.studies.ablation import check_toy_study, run_params, train_run
from doco_lib.toy.erasure import cached_judged_rates, prompt_sets
from doco_lib.toy.render import SHAPES

ANCHOR, ANCHOR_PROMPTS = "shape", "params/prompts/toy_shape.txt"


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


def entanglement_correlation(damage_matrix: pd.DataFrame, similarity_matrix: pd.DataFrame) -> tuple[float, float]:
    """Spearman's ρ (and its p-value) between the off-diagonal damage and the shapes' text similarity."""
    damage_off = damage_matrix.where(~_diagonal(damage_matrix)).stack().dropna()  # pandas 3 keeps NaN rows
    result = stats.spearmanr(damage_off, similarity_matrix.stack().reindex(damage_off.index))
    return float(result.statistic), float(result.pvalue)


def summary(matrices: dict[str, pd.DataFrame], similarity_matrix: pd.DataFrame) -> pd.DataFrame:
    """Per method: the erasure (mean of the diagonal), the mean collateral damage (off it), and Spearman's ρ of
    the off-diagonal damage against the similarity, with its p-value."""
    rows = []
    for variant, matrix in matrices.items():
        on_diagonal = _diagonal(matrix)
        rho, p = entanglement_correlation(matrix, similarity_matrix)
        rows.append({"method": variant, "erasure (diagonal, pts)": matrix.where(on_diagonal).stack().mean(),
                     "damage (off the diagonal, pts)": matrix.where(~on_diagonal).stack().mean(),
                     "Spearman ρ (damage, similarity)": rho, "p": p})
    return pd.DataFrame(rows).set_index("method")
