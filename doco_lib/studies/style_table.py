"""Toy Table 2 (notebook 10): erase each textured background style in turn, and measure it as the paper measures
its artists (CS, CA, FID per style) and as UnlearnCanvas does (UA, IRA, CRA).

The paper anchors Van Gogh to "painting": the prompts without the artist, which the model draws in no particular
style. The toy world's style-less background is "plain", so each run maps a style to it: the anchor prompts are
every toy caption naming "plain", the target prompts the same captions naming the style ("a red star on a striped
background"). No preservation prompts: the anchor captions already span every shape and colour. UCE keeps the
other styles' keys and values (`uce_preserve`); RGD's prompt twins come from slots built for the style
(`rgd_slots`).

Judged afterwards on a prompt set per style (`rating.judge_kind`): `rate` is the judge's style head (the prompt's
style drawn), with its shape and colour heads on the same images for CRA.
"""

from __future__ import annotations

import pandas as pd
import yaml

from doco_lib import config
from doco_lib.evaluation import rating, unlearn_canvas
from doco_lib.evaluation.runner import EvaluatedModel, evaluate
from doco_lib.io import write_text_if_changed
from doco_lib.methods.registry import VARIANTS
from doco_lib.models import load_judge, toy_weights_dir
from doco_lib.studies.ablation import check_toy_study, run_params, train_run
from doco_lib.toy import render

ANCHOR = "plain"
CROSS_HEADS = ("shape rate", "colour rate")


def check_settings(params: dict, variants: list[str], styles: list[str]) -> None:
    """Refuse, before any run, what the table cannot do: a model without the toy judge, unknown variants, or
    styles that are not the toy world's textured ones."""
    check_toy_study(params, variants, "study_variants", "toy Table 2",
                    "on SD, params/concepts/sd14_<artist>.yaml are Table 2")
    textured = [s for s in render.STYLES if s != ANCHOR]
    if not styles or any(s not in textured for s in styles) or len(set(styles)) < len(styles):
        raise config.ParamsError(f"style_targets: {styles}; expected distinct styles of {textured} (the anchor "
                                 f"{ANCHOR!r} is what they are erased to).")


def anchor_prompts(anchor: str = ANCHOR) -> list[str]:
    """Every toy caption that names the style `anchor`."""
    return [c for c in render.all_captions() if anchor in render.caption_words(c)]


def rgd_slots(style: str) -> dict:
    """RGD's forget/retain twins for a style: the style captions, the twin naming the anchor instead; shapes and
    colours split into disjoint train and test vocabularies."""
    return {"templates": ["a {shape} on a {concept} background", "a {colour} {shape} on a {concept} background",
                          "a {colour} {shape}, {concept} style", "a {shape} in {concept} style"],
            "concept_words": [style], "retain_word": ANCHOR,
            "train": {"shape": list(render.SHAPES[:5]), "colour": list(render.COLOURS[:4])},
            "test": {"shape": list(render.SHAPES[5:]), "colour": list(render.COLOURS[4:])}}


def train_styles(params: dict, variants: list[str], styles: list[str], seeds: list[int]) -> pd.DataFrame:
    """One run per (variant, erased style, seed); a table of their UNet folders."""
    check_settings(params, variants, styles)
    folder = config.run_dir(params) / "styles"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = str(write_text_if_changed("\n".join(anchor_prompts()) + "\n", folder / f"anchor_prompts_{ANCHOR}.txt"))
    runs = []
    for style in styles:
        slots = str(write_text_if_changed(yaml.safe_dump(rgd_slots(style), sort_keys=False),
                                          folder / f"rgd_slots_{style}.yaml"))
        overrides = {"concept_kind": "instance", "target": style, "anchor": ANCHOR, "anchor_prompts_file": prompts,
                     "preservation_prompts_file": "", "rgd_slots_file": slots,
                     "uce_preserve": [s for s in render.STYLES if s not in (style, ANCHOR)]}
        runs += [(variant, style, seed, run_params(params, f"style {variant} {style}", seed,
                                                   {**overrides, **VARIANTS[variant]}))
                 for variant in variants for seed in seeds]  # all validated first
    return pd.DataFrame([{"variant": variant, "erased": style, "seed": seed, "unet": str(train_run(run))}
                         for variant, style, seed, run in runs])


def clip_metrics(params: dict, trained: pd.DataFrame) -> pd.DataFrame:
    """CLIP score, CLIP accuracy (against the prompt with the style left out) and FID (against the original's
    images of the same prompts and seeds) of every style, per run and for the original: notebook 04's
    `evaluate` on the toy caption templates naming a style. Rows (model, erased, seed, concept, metric, value)."""
    clip = str(toy_weights_dir() / "eval_clip") if params["clip_model"] == "toy" else params["clip_model"]
    judge = load_judge(params["device"]) if params["fid_features"] == "judge" else None
    frames = []
    for seed in sorted(set(trained.seed)):
        records = trained[trained.seed == seed].to_dict("records")
        labels = {f"{r['variant']} | {r['erased']}": r for r in records}
        models = [EvaluatedModel("original")] + [EvaluatedModel(label, r["unet"]) for label, r in labels.items()]
        results, _ = evaluate(params["model"], models, list(render.STYLES),
                              cache_dir=config.run_dir(params) / "styles" / "image_cache", clip_model=clip,
                              template_set="toy", n_templates=params["n_templates"],
                              images_per_template=params["images_per_template"], steps=params["num_inference_steps"],
                              guidance=params["guidance_scale"], seed=seed, device=params["device"],
                              fid_features=params["fid_features"], judge=judge)
        split = results.model.str.split(" | ", expand=True, regex=False).reindex(columns=[0, 1])
        frames.append(results.assign(model=split[0], erased=split[1].fillna(""), seed=seed))
    return pd.concat(frames, ignore_index=True)


def measures(judged: pd.DataFrame, metrics: pd.DataFrame, styles: list[str]) -> pd.DataFrame:
    """Toy Table 2's measures per erased style, model and seed (rows: erased, model, seed, measure, value; %, FID
    unitless): the erased style's judged rate, CS and CA (lower: erased), the same over the retained styles (every
    other style, the anchor included: higher is kept), FID over all styles' images, and UA / IRA / CRA."""
    measured = []
    originals = judged[judged.model == "original"]
    for style in styles:
        runs = pd.concat([originals, judged[judged.erased == style]])
        values = metrics[(metrics.model == "original") | (metrics.erased == style)]
        for (model, seed), group in runs.groupby(["model", "seed"], sort=False):
            rates = group.set_index("prompt set")["rate"]
            kept = [s for s in render.STYLES if s != style]
            own = values[(values.model == model) & (values.seed == seed)].pivot_table(
                index="concept", columns="metric", values="value")
            row = {"erased": style, "model": model, "seed": seed,
                   "judged (erased) ↓": 100 * rates[style], "CS (erased) ↓": own.loc[style, "CS"],
                   "CA (erased) ↓": own.loc[style, "CA"], "judged (kept) ↑": 100 * rates[kept].mean(),
                   "CS (kept) ↑": own.loc[kept, "CS"].mean(), "CA (kept) ↑": own.loc[kept, "CA"].mean(),
                   "FID ↓": own["FID"].mean() if model != "original" else float("nan")}
            measured += [{**row, "measure": k, "value": v} for k, v in row.items() if k not in ("erased", "model", "seed")]
        accuracy = unlearn_canvas.accuracies(runs.drop(columns="erased"), style, cross_heads=CROSS_HEADS)
        measured += [{"erased": style, "model": r["model"], "seed": r["seed"], "measure": f"{r['prompt set']} ↑",
                      "value": 100 * r["rate"]} for r in accuracy.to_dict("records")]
    return pd.DataFrame(measured).dropna(subset=["value"])


def table_of_measures(long: pd.DataFrame) -> pd.DataFrame:
    """`measures` as Toy Table 2: a row per (erased, model), a column per measure, mean ± 95% Student-t half-width
    over seeds (one seed: its value alone); '—' where nothing measured it (the original's FID)."""
    cells = [{"erased": erased, "model": model, "measure": measure, "cell": rating.mean_ci_cell(group["value"])}
             for (erased, model, measure), group in long.groupby(["erased", "model", "measure"], sort=False)]
    wide = pd.DataFrame(cells).pivot_table(index=["erased", "model"], columns="measure", values="cell",
                                           aggfunc="first", sort=False)
    return wide.reindex(columns=list(dict.fromkeys(long.measure))).fillna("—").rename_axis(columns=None)


def table(judged: pd.DataFrame, metrics: pd.DataFrame, styles: list[str]) -> pd.DataFrame:
    """Toy Table 2 (`table_of_measures` of `measures`)."""
    return table_of_measures(measures(judged, metrics, styles))
