"""Toy Figure 6 (notebook 10): an attribute erased wherever it would appear, standing in for nudity.

Nudity is an attribute that appears across subjects and is triggered by prompts that never name it; the paper
counts it with NudeNet on I2P's prompts. Here the attribute is a colour (`attribute`, e.g. "orange"):

- **Implicit prompts, found by sampling** (I2P's role). Candidates are every toy caption that names no colour
  plus "a photo of a <word>" for the words of `implicit_candidates_file` (words the toy model never saw in
  training, whose text states are whatever its encoder makes of them). The original model draws each candidate
  `implicit_samples` times; the judge's colour head names the colour of every image; the candidates drawn in the
  attribute at least `implicit_threshold` of the time become the implicit prompts, written as an I2P-format CSV
  (prompt, evaluation_seed, evaluation_guidance), each prompt with `implicit_images` seeds.
- **Training** as the authors' code trains nudity (`concept_kind: nudity`): anchor prompts are captions naming
  any other colour (the toy "clothed people"), target prompts "<attribute>, <anchor prompt>". The anchor word,
  which only UCE reads (it maps the attribute's keys and values onto it), is "shape", the toy world's word for
  no colour in particular. RGD's twins drop the colour word.
- **Counting** goes through the nudity evaluation's own code (`nudity.read_i2p_csv`, `nudity.i2p_counts`,
  `nudity.reduction_percent`) with `AttributeDetector` in NudeNet's place: one "detection" per image judged in
  the attribute, classed by the shape it is drawn on, as NudeNet classes exposed body parts.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd
import torch
import yaml

from doco_lib import config
from doco_lib.evaluation import nudity
from doco_lib.evaluation.cache import model_caches, read_images
from doco_lib.evaluation.rating import mean_ci_cell, student_t_interval
from doco_lib.evaluation.runner import EvaluatedModel
from doco_lib.io import atomic_write_text, read_utf8, slug, write_text_if_changed
from doco_lib.methods.registry import VARIANTS
from doco_lib.models import load_judge, load_pipeline
from doco_lib.sampling import generate
from doco_lib.studies.ablation import check_toy_study, run_params, train_run
from doco_lib.toy import render
from doco_lib.toy.quality import images_to_judge_input

ANCHOR = "shape"
CROSS_HEADS = ("shape rate", "style rate")


def check_settings(params: dict, variants: list[str], attribute: str) -> None:
    """Refuse, before any run, a model without the toy judge, unknown variants or an attribute that is not a toy
    colour."""
    check_toy_study(params, variants, "study_variants", "the implicit-attribute study",
                    "on SD, nudity is params/concepts/sd14_nudity.yaml")
    if attribute not in render.COLOURS:
        raise config.ParamsError(f"attribute: {attribute!r}; expected one of the toy colours {list(render.COLOURS)}.")


def read_candidate_words(path: str | Path) -> list[str]:
    """One word per line ('#' starts a comment); the words must name no toy colour."""
    words = [line.strip() for line in read_utf8(Path(path)).splitlines()
             if line.strip() and not line.strip().startswith("#")]
    named = [w for w in words if w in render.COLOURS]
    if not words or named:
        raise config.ParamsError(f"implicit_candidates_file: {str(path)!r} " + (
            f"names colours {named}: candidates must not name one" if named else "holds no words"))
    return list(dict.fromkeys(words))


def candidate_prompts(words: list[str]) -> list[str]:
    """Every toy caption naming no colour, then "a photo of a <word>" for each word."""
    captions = [c for c in render.all_captions() if not set(render.caption_words(c)) & set(render.COLOURS)]
    return captions + [render.with_articles(f"a photo of a {word}") for word in words]


def colour_rates(params: dict, prompts: list[str], samples: int, seed: int) -> pd.DataFrame:
    """How often the original model draws each colour for each prompt (`samples` images, seeds seed…seed+samples−1),
    by the judge's colour head: rows the prompts, columns the colours. Cached under the run folder."""
    cache = config.run_dir(params) / "implicit" / f"candidate_colours_{slug(params['model'])}_{samples}_{seed}.csv"
    steps, guidance = params["num_inference_steps"], params["guidance_scale"]
    known = pd.read_csv(cache, index_col="prompt") if cache.is_file() else pd.DataFrame(columns=render.COLOURS)
    key = f"steps {steps} guidance {guidance}"
    known = known[known.get("settings", pd.Series(index=known.index, dtype=str)) == key]
    missing = [p for p in prompts if p not in known.index]
    if missing:
        pipe, judge = load_pipeline(params["model"], params["device"]), load_judge(params["device"])
        rows = {}
        for prompt in missing:
            images = generate(pipe, [prompt] * samples, list(range(seed, seed + samples)), steps, guidance)
            colours = judge.predict(images_to_judge_input(images))["colour"].cpu()
            rows[prompt] = torch.bincount(colours, minlength=len(render.COLOURS)).float().div(samples).tolist()
        new = pd.DataFrame.from_dict(rows, orient="index", columns=list(render.COLOURS)).assign(settings=key)
        known = pd.concat([known, new.rename_axis("prompt")])
        atomic_write_text(known.rename_axis("prompt").to_csv(), cache)
    return known.loc[prompts, list(render.COLOURS)].astype(float).rename_axis("prompt")


def implicit_prompts(rates: pd.DataFrame, attribute: str, threshold: float) -> pd.DataFrame:
    """The candidates the original model draws in `attribute` at least `threshold` of the time, most often first."""
    found = rates[rates[attribute] >= threshold].sort_values(attribute, ascending=False, kind="stable")
    if found.empty:
        raise config.ParamsError(f"implicit_threshold: no candidate prompt is drawn {attribute} at least "
                                 f"{threshold:.0%} of the time (the most: {rates[attribute].max():.0%}); lower it, "
                                 "add candidate words, or pick another attribute.")
    return found


def write_i2p_csv(prompts: list[str], images: int, first_seed: int, guidance: float, path: Path) -> Path:
    """The implicit prompts in I2P's format, `images` rows per prompt with seeds first_seed…first_seed+images−1
    (past the search's seeds, so the counts are not measured on the images that selected the prompts)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(nudity.I2P_COLUMNS)
    writer.writerows((prompt, first_seed + i, guidance) for prompt in prompts for i in range(images))
    atomic_write_text(text.getvalue(), path)
    return path


class AttributeDetector:
    """NudeNet's interface (`classes`, `count_files`) over the toy judge: an image "exposes" the attribute when the
    colour head names it, and the detection is classed by the shape the shape head names."""

    def __init__(self, judge, attribute: str):
        self.judge, self.attribute = judge, attribute
        self.classes = tuple(f"{attribute.upper()}_{shape.upper()}" for shape in render.SHAPES)

    def count_files(self, paths: list[Path]) -> list[dict[str, int]]:
        counts = []
        for start in range(0, len(paths), 64):
            predicted = self.judge.predict(images_to_judge_input(read_images(paths[start:start + 64])))
            for colour, shape in zip(predicted["colour"].tolist(), predicted["shape"].tolist()):
                found = dict.fromkeys(self.classes, 0)
                if render.COLOURS[colour] == self.attribute:
                    found[self.classes[shape]] = 1
                counts.append(found)
        return counts


def anchor_prompts(attribute: str) -> list[str]:
    """Every toy caption naming a colour other than `attribute`."""
    others = set(render.COLOURS) - {attribute}
    return [c for c in render.all_captions() if set(render.caption_words(c)) & others]


def rgd_slots(attribute: str) -> dict:
    """RGD's forget/retain twins for a colour: captions naming it, the twin without it; shapes and styles split
    into disjoint train and test vocabularies."""
    return {"templates": ["a photo of a {concept} {shape}", "a {concept} {shape} on a {style} background",
                          "a {concept} {shape}, {style} style"],
            "concept_words": [attribute], "retain_word": "",
            "train": {"shape": list(render.SHAPES[:5]), "style": list(render.STYLES[:2])},
            "test": {"shape": list(render.SHAPES[5:]), "style": list(render.STYLES[2:])}}


def train_attribute(params: dict, variants: list[str], attribute: str, seeds: list[int]) -> pd.DataFrame:
    """One run per (variant, seed) erasing `attribute`; a table of their UNet folders."""
    check_settings(params, variants, attribute)
    folder = config.run_dir(params) / "implicit"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = write_text_if_changed("\n".join(anchor_prompts(attribute)) + "\n",
                                    folder / f"anchor_prompts_not_{attribute}.txt")
    slots = write_text_if_changed(yaml.safe_dump(rgd_slots(attribute), sort_keys=False),
                                  folder / f"rgd_slots_{attribute}.yaml")
    overrides = {"concept_kind": "nudity", "target": attribute, "anchor": ANCHOR, "anchor_prompts_file": str(prompts),
                 "preservation_prompts_file": "", "rgd_slots_file": str(slots),
                 "uce_preserve": [c for c in render.COLOURS if c != attribute]}
    runs = [(variant, seed, run_params(params, f"attribute {variant} {attribute}", seed,
                                       {**overrides, **VARIANTS[variant]}))
            for variant in variants for seed in seeds]  # all validated first
    return pd.DataFrame([{"variant": variant, "seed": seed, "unet": str(train_run(run))} for variant, seed, run in runs])


def count_implicit(params: dict, trained: pd.DataFrame, i2p_csv: Path, attribute: str) -> pd.DataFrame:
    """Detections per class on the implicit prompts for the original model and every run, per seed: rows
    (model, seed, class, count), 'total' among the classes. The images of each model go into an image cache
    under the run folder, as notebook 04's I2P images do."""
    rows = nudity.read_i2p_csv(i2p_csv)
    detector = AttributeDetector(load_judge(params["device"]), attribute)
    cache_dir = config.run_dir(params) / "implicit" / "image_cache"
    frames = []
    for seed in sorted(set(trained.seed)):
        records = trained[trained.seed == seed].to_dict("records")
        models = [EvaluatedModel("original")] + [EvaluatedModel(r["variant"], r["unet"]) for r in records]
        counts = nudity.i2p_counts(model_caches(cache_dir, params["model"], models, params["device"]), rows,
                                   params["num_inference_steps"], detector)
        long = counts.rename_axis("class").reset_index().melt(id_vars="class", var_name="model", value_name="count")
        frames.append(long.assign(seed=seed))
    return pd.concat(frames, ignore_index=True)[["model", "seed", "class", "count"]]


def reduction(counts: pd.DataFrame) -> pd.DataFrame:
    """Per method: images drawn in the attribute on the implicit prompts (the 'total' class) and their reduction
    against the original model's (`nudity.reduction_percent`, the paper's Figure 6 number), mean ± 95% Student-t
    interval over seeds (`rating.mean_ci_cell`: one seed its value alone)."""
    totals = counts[counts["class"] == "total"].pivot_table(index="seed", columns="model", values="count")
    rows = []
    for model in (m for m in dict.fromkeys(counts.model) if m != "original"):
        drops = pd.Series([nudity.reduction_percent(totals.loc[s, "original"], totals.loc[s, model])
                           for s in totals.index])
        rows.append({"method": model, "detections": mean_ci_cell(totals[model]),
                     "reduction (%) ↑": mean_ci_cell(drops), "reduction mean": float(drops.mean())})
    original = totals["original"].iloc[0]
    return pd.DataFrame([{"method": "original", "detections": f"{original:.0f}", "reduction (%) ↑": "—",
                          "reduction mean": 0.0}, *rows]).set_index("method")


def counts_plot(counts: pd.DataFrame, attribute: str, n_prompts: int, n_images: int):
    """The toy Figure 6: per shape the attribute is drawn on (NudeNet's body parts), the images judged in the
    attribute on the implicit prompts, one bar per model: mean over seeds, 95% Student-t interval
    (`rating.student_t_interval`, the tables' `mean_ci`; none for a single seed); a matplotlib figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    per_shape = counts[counts["class"] != "total"].assign(shape=lambda t: t["class"].str.split("_").str[1].str.lower())
    figure, axes = plt.subplots(figsize=(10, 4))
    sns.barplot(data=per_shape, x="shape", y="count", hue="model", errorbar=student_t_interval, ax=axes)
    axes.set(xlabel=f"shape the {attribute} is drawn on", ylabel=f"images judged {attribute}",
             title=f"'{attribute}' on {n_prompts} implicit prompts × {n_images} images\n"
                   "(mean over seeds, 95% Student-t interval)")
    axes.legend(title="model", bbox_to_anchor=(1.01, 1), loc="upper left")
    figure.tight_layout()
    return figure


def artefact_figure(rows: pd.DataFrame):
    """`counts_plot` of artefact `implicit_attribute`'s rows (its attribute, number of prompts and images)."""
    return counts_plot(rows, rows["attribute"].iloc[0], int(rows["prompts"].iloc[0]), int(rows["images"].iloc[0]))
