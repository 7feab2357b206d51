"""UnlearnCanvas's three accuracies (Zhang et al., 2024) for every run, from the rates `rating.rate_models`
measured; one definition for the toy world and for real models.

    UA  (unlearning accuracy)          = 1 − acc(target): the target is no longer recognised where it is asked
                                         for (higher: stronger erasure);
    IRA (in-domain retain accuracy)    = mean acc over the other concepts of the target's kind;
    CRA (cross-domain retain accuracy) = mean acc over concepts of the other kinds.

UnlearnCanvas classifies its images with a style and an object classifier (shared/methods/evaluation_practice.md).
Here `acc` is, in the toy world, the judge's: its shape head on each prompt set's images for UA and IRA (the
erased sets, the target and its synonym, left out of IRA), for CRA the mean of its colour and style heads'
accuracies on the images of the retained sets (on the prompts that name a colour, a style). On
real models it is CLIP accuracy: the concepts of `cross_domain` (`cross_domain_concepts`, e.g. styles for an
object erasure) give CRA, the other non-erased concepts IRA.
"""

from __future__ import annotations

import pandas as pd

from doco_lib.evaluation.rating import summarise

METRICS = ("UA", "IRA", "CRA")


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else float("nan")


def accuracies(rated: pd.DataFrame, target: str, erased: list[str] | tuple[str, ...] = (),
               cross_domain: list[str] | tuple[str, ...] = (),
               cross_heads: tuple[str, ...] = ("colour rate", "style rate")) -> pd.DataFrame:
    """UA, IRA and CRA of every (model, seed) of `rated` (rows: model, seed, prompt set, rate; the toy judge's
    also the other heads' columns, `cross_heads`: for shape sets `colour rate` and `style rate`, for style sets
    `shape rate` and `colour rate`), as rows (model, [base,] seed, prompt set = the metric, rate), the layout
    `rating.summarise` averages over seeds. `erased`: further prompt sets of the target (its synonym)."""
    erased = {target, *erased}
    group_by = [c for c in ("model", "base", "seed") if c in rated]
    rows = []
    for keys, group in rated.groupby(group_by, sort=False):
        by_set = group.set_index("prompt set")
        if target not in by_set.index:
            raise ValueError(f"no rate for the target {target!r} among the prompt sets {list(by_set.index)}")
        retained = by_set[~by_set.index.isin(erased)]
        in_domain = retained[~retained.index.isin(cross_domain)]
        cross = [retained.loc[retained.index.isin(cross_domain), "rate"]]
        cross += [in_domain[column] for column in cross_heads if column in in_domain]
        cross_values = pd.concat(cross).astype(float)
        values = {"UA": 1.0 - float(by_set.loc[target, "rate"]), "IRA": _mean(in_domain["rate"].astype(float)),
                  "CRA": _mean(cross_values)}
        label = dict(zip(group_by, keys if isinstance(keys, tuple) else (keys,)))
        rows += [{**label, "prompt set": metric, "rate": value} for metric, value in values.items()]
    return pd.DataFrame(rows)


def table(rated: pd.DataFrame, target: str, erased=(), cross_domain=(),
          cross_heads: tuple[str, ...] = ("colour rate", "style rate")) -> pd.DataFrame:
    """UA / IRA / CRA in percent, 'mean ± CI' over seeds, one row per model; '—' where nothing measured it (CRA
    without cross-domain concepts, or toy prompt sets too small to name a colour or a style)."""
    summary = summarise(accuracies(rated, target, erased, cross_domain, cross_heads).dropna(subset=["rate"]))
    wide = summary.pivot_table(index="model", columns="prompt set", values="cell", aggfunc="first", sort=False)
    wide = wide.reindex(index=list(dict.fromkeys(rated["model"])), columns=list(METRICS)).fillna("—")
    return wide.rename(columns={m: f"{m} ↑" for m in METRICS}).rename_axis(columns=None)
