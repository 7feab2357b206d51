"""Rating erased models against their originals, over seeds: how often each model draws each concept
(the toy judge's rate in the toy world, CLIP accuracy on real models), mean ± 95% confidence interval
(Student's t) over seeds, and the erasure/preservation trade-off of every run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from scipy import stats

from doco_lib import config
from doco_lib.evaluation.runner import EvaluatedModel, evaluate
from doco_lib.io import slug
from doco_lib.models import is_toy, load_judge, load_pipeline, toy_weights_dir
from doco_lib.toy.erasure import KINDS, VALUES, attribute_sets, cached_judged_heads, prompt_sets


def record_model(params: dict, record: dict) -> str:
    """The base model of a grid row: its own (SepME's `sepme_model`) or the params' model."""
    model = record.get("model")
    return model if isinstance(model, str) and model else params["model"]


def model_label(params: dict, model: str, label: str) -> str:
    """'original', 'SepME' … with the base model named when it is not the params' model."""
    return label if model == params["model"] else f"{label} ({model})"


def _head_columns(heads: dict, kind: str = "shape") -> dict:
    """A prompt set's judged heads as columns: `rate` (the set's `kind` drawn as asked) and `<other kind> rate` for
    the other two heads (for shape sets `colour rate`, `style rate`)."""
    return {"rate": heads[kind], **{f"{other} rate": heads[other] for other in KINDS if other != kind}}


def judge_models(params: dict, unets: pd.DataFrame, shapes: list[str], samples: int) -> pd.DataFrame:
    """Toy world: judged rate of every prompt set for each listed UNet and for its base model (per seed), with
    the judge's colour and style heads on the same images (`colour rate`, `style rate`)."""

    judge = load_judge(params["device"])
    steps, guidance = params["num_inference_steps"], params["guidance_scale"]
    records = unets.to_dict("records")
    bases = dict.fromkeys(record_model(params, r) for r in records)
    rows = []
    for base_model in bases:
        base = load_pipeline(base_model, params["device"])
        name = "original_judged_rates.json" if base_model == params["model"] else \
            f"original_judged_rates_{slug(base_model)}.json"
        for seed in sorted(set(unets["seed"])):
            sets = prompt_sets(params["target"], shapes, samples, seed)
            cache = config.run_dir(params) / "ablation" / name
            for prompt_set, heads in cached_judged_heads(base, judge, sets, steps, guidance, seed, cache).items():
                rows.append({"model": model_label(params, base_model, "original"), "base": base_model, "seed": seed,
                             "prompt set": prompt_set, **_head_columns(heads)})
    for seed in sorted(set(unets["seed"])):
        sets = prompt_sets(params["target"], shapes, samples, seed)
        for record in (r for r in records if r["seed"] == seed):
            base_model = record_model(params, record)
            erased = load_pipeline(base_model, params["device"], unet=record["unet"])
            label = {k: v for k, v in record.items() if k not in ("seed", "unet", "model")}
            cache = Path(record["unet"]).parent / "judged_rates.json"
            for prompt_set, heads in cached_judged_heads(erased, judge, sets, steps, guidance, seed, cache).items():
                rows.append({**label, "model": model_label(params, base_model, " ".join(str(v) for v in
                                                                                       label.values())),
                             "base": base_model, "seed": seed, "prompt set": prompt_set, **_head_columns(heads)})
    return pd.DataFrame(rows)


def judge_kind(params: dict, trained: pd.DataFrame, kind: str, samples: int) -> pd.DataFrame:
    """Toy world: the judge's heads on a prompt set per value of `kind` ('colour' or 'style': prompts naming it,
    `erasure.attribute_sets`), for the original model and each run of `trained` (columns variant, seed, unet and
    any labels, such as `erased`), `samples` images each with the run's seed. Rows: model, the labels, seed, prompt
    set, `rate` (the kind's head: the value asked for drawn) and `<other kind> rate` for the other two heads."""
    judge = load_judge(params["device"])
    steps, guidance = params["num_inference_steps"], params["guidance_scale"]
    labels = [c for c in trained.columns if c not in ("variant", "seed", "unet")]
    original = load_pipeline(params["model"], params["device"])

    def rows(pipe, cache, label: dict, seed: int, sets) -> list[dict]:
        heads = cached_judged_heads(pipe, judge, sets, steps, guidance, seed, cache)
        return [{**label, "seed": seed, "prompt set": name, **_head_columns(h, kind)} for name, h in heads.items()]

    judged = []
    for seed in sorted(set(trained.seed)):
        sets = attribute_sets(kind, list(VALUES[kind]), samples, seed)
        judged += rows(original, config.run_dir(params) / "judged" / f"original_{kind}_{slug(params['model'])}.json",
                       {"model": "original", **dict.fromkeys(labels, "")}, seed, sets)
        for record in trained[trained.seed == seed].to_dict("records"):
            erased = load_pipeline(params["model"], params["device"], unet=record["unet"])
            judged += rows(erased, Path(record["unet"]).parent / f"judged_{kind}.json",
                           {"model": record["variant"], **{c: record[c] for c in labels}}, seed, sets)
    return pd.DataFrame(judged)


def clip_rates(params: dict, unets: pd.DataFrame, concepts: list[str]) -> pd.DataFrame:
    """Real models: the CLIP accuracy of every concept for each listed UNet and the base model (per seed), as
    a fraction — notebook 04's evaluation (templates, cached images), in the layout of `judge_models`."""

    clip = str(toy_weights_dir() / "eval_clip") if params["clip_model"] == "toy" else params["clip_model"]
    judge = load_judge(params["device"]) if params["fid_features"] == "judge" else None  # the toy FID features
    others = sorted({record_model(params, r) for r in unets.to_dict("records")} - {params["model"]})
    if others:
        raise config.ParamsError(f"sepme_model or multi_concept_model: {others} differs from model "
                                 f"{params['model']!r}; on real models every run is rated against the params' "
                                 "model (set them to it, or to '' where allowed).")
    rows = []
    for seed in sorted(set(unets["seed"])):
        records = unets[unets.seed == seed].to_dict("records")
        labels = [" ".join(str(v) for k, v in r.items() if k not in ("seed", "unet", "model") and v == v)
                  for r in records]
        models = [EvaluatedModel("original")] + [EvaluatedModel(label, r["unet"]) for label, r in zip(labels, records)]
        results, _ = evaluate(params["model"], models, concepts, cache_dir=config.run_dir(params) / "ablation" /
                              "image_cache", clip_model=clip, template_set=params["eval_templates"],
                              n_templates=params["n_templates"], images_per_template=params["images_per_template"],
                              steps=params["num_inference_steps"], guidance=params["guidance_scale"], seed=seed,
                              device=params["device"], fid_features=params["fid_features"], judge=judge)
        accuracy = results[results.metric == "CA"]
        rows += [{"model": r.model, "seed": seed, "prompt set": r.concept, "rate": r.value / 100}
                 for r in accuracy.itertuples()]
    return pd.DataFrame(rows)


def rate_models(params: dict, unets: pd.DataFrame, concepts: list[str], samples: int) -> pd.DataFrame:
    """How often each model draws each concept: the toy judge's rate in the toy world (`samples` images per
    prompt set, with the target's synonym), CLIP accuracy for real models."""
    if is_toy(params["model"]):
        return judge_models(params, unets, concepts, samples)
    return clip_rates(params, unets, concepts)


def sampling_sweep(params: dict, unets: pd.DataFrame, guidance_scales: list[float], step_counts: list[int],
                   samples: int) -> pd.DataFrame:
    """Toy world: how often each model (and its base) still draws the target and its synonym as the sampling
    settings change: every guidance scale at the params' steps, every step count at the params' guidance.
    Rows as `judge_models`', with the `guidance` and `steps` they were drawn at."""
    steps, guidance = params["num_inference_steps"], params["guidance_scale"]
    settings = dict.fromkeys([(g, steps) for g in guidance_scales] + [(guidance, s) for s in step_counts])
    return pd.concat([judge_models({**params, "guidance_scale": g, "num_inference_steps": s}, unets, [params["target"]],
                                   samples).assign(guidance=g, steps=s) for g, s in settings], ignore_index=True)


def mean_ci(values: pd.Series, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval (0 for a single value)."""
    n = len(values)
    if n < 2:
        return float(values.mean()), 0.0
    half = stats.t.ppf(0.5 + level / 2, n - 1) * values.std(ddof=1) / n**0.5
    return float(values.mean()), float(half)


def mean_ci_cell(values: pd.Series, digits: int = 1) -> str:
    """'mean ± half-width' of `mean_ci` for a table; one seed's value alone, as it has no interval to give."""
    return format_mean_ci(*mean_ci(values), seeds=len(values), digits=digits)


def format_mean_ci(mean: float, half: float, seeds: int, digits: int = 1) -> str:
    """`mean_ci_cell` of an interval already computed."""
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def student_t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """(low, high) = mean ∓ `mean_ci`'s half-width: the Student-t interval over seeds as seaborn's `errorbar`
    callable, so that a figure's bars show the interval its tables print (seaborn's default, ("ci", 95), is a
    bootstrap)."""
    mean, half = mean_ci(pd.Series(values, dtype=float), level)
    return mean - half, mean + half


def summarise(judged: pd.DataFrame, by: str = "model") -> pd.DataFrame:
    """Judged rate per (model, prompt set) as 'mean ± CI' strings (one seed: its rate alone, with no interval over
    seeds to show) and numeric columns, in percent."""
    rows = []
    for (model, prompt_set), group in judged.groupby([by, "prompt set"], sort=False):
        mean, half = mean_ci(100 * group["rate"])
        rows.append({by: model, "prompt set": prompt_set, "mean": mean, "ci95": half, "seeds": len(group),
                     "cell": format_mean_ci(mean, half, seeds=len(group))})
    return pd.DataFrame(rows)


def tradeoff(judged: pd.DataFrame, target: str, related: list[str]) -> pd.DataFrame:
    """Per run: drop of the target's judged rate and mean drop over related concepts, in points, against the
    original of the run's own base model (`base`, where the rates name one: SepME runs on `sepme_model`)."""
    judged = judged.assign(base=judged["base"] if "base" in judged else "")
    is_original = judged.model.str.startswith("original")
    originals = judged[is_original].set_index(["base", "seed", "prompt set"])["rate"]
    rows = []
    for (model, base, seed), group in judged[~is_original].groupby(["model", "base", "seed"], sort=False):
        original = originals[base]
        rates = group.set_index("prompt set")["rate"]
        rows.append({"model": model, "seed": seed,
                     "target drop (pts)": 100 * (original[(seed, target)] - rates[target]),
                     "related drop (pts)": 100 * sum(original[(seed, r)] - rates[r] for r in related) / len(related)})
    return pd.DataFrame(rows)
