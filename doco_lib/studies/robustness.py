"""Robustness of an erasure against attacks (UnlearnDiffAtk and AdvUnlearn evaluate it so): the study level.

An erased model passes the usual evaluation when prompts that name the target stop drawing it. An attacker
can instead search for a prompt, or a way of sampling, that still does. The attacks live in
doco_lib/studies/attacks/, one module each (its docstring states its objective); this module runs the
chosen ones (`attacks`) on the original and each erased model with the same start prompts, seeds and
candidate tokens, and writes the tables and the plot.

Each attempt starts from a target prompt P (a training target prompt, e.g. "a blue star on a dotted
background"). The judge is the toy judge's shape head in the toy world, CLIP zero-shot classification for SD.
An attempt succeeds when the images of its final prompt on k *evaluation* seeds (never used by a search) are
judged as the target on at least `success_fraction` of them; the attack success rate (ASR) is the fraction
of successful attempts. The attack `none` judges the start prompts themselves on the same seeds, i.e. the
erasure without any attack.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from doco_lib import config
from doco_lib.io import atomic_write_bytes, atomic_write_text
from doco_lib.models import denoiser, load_pipeline
from doco_lib.studies import attacks
from doco_lib.studies.attacks.common import (
    TARGET_IMAGE_SEEDS,
    AttackSettings,
    Attempt,
    Judge,
    Target,
    check_pipeline,
    make_judge,
    no_attack,
    target_latents,
    vocabulary_ids,
)
from doco_lib.studies.runs import concept


# ---------------------------------------------------------------- across models
def start_prompts(params: dict, attempts: int) -> list[str]:
    """The attempts' start prompts, drawn with the seed: the prompts of `attack_prompts_file` (UnlearnDiffAtk's I2P
    nudity prompts, say), else target prompts of the run's concept."""
    if params["attack_prompts_file"]:
        targets = list(dict.fromkeys(pd.read_csv(params["attack_prompts_file"])["prompt"].astype(str).str.strip()))
    else:
        spec, anchor_prompts = concept(params)
        targets = list(dict.fromkeys(t for _, t in spec.prompt_pairs(anchor_prompts)))
    order = np.random.default_rng(params["seed"]).permutation(len(targets))
    return [targets[order[i % len(targets)]] for i in range(attempts)]


def check_unets(unets: list[str], key: str = "--unet") -> None:
    for unet in unets:
        if not (Path(unet) / "config.json").is_file():
            raise config.ParamsError(f"{key}: {unet!r} is not a diffusers UNet folder (expected config.json and "
                                     "diffusion_pytorch_model.safetensors inside, e.g. outputs/<run>/doco/unet).")


def label_unets(unets: list[str]) -> dict[str, str]:
    """Short labels: 'outputs/toy_world/ablation/esd_x_s0/esd/unet' → 'esd (esd_x_s0)'; the full path where
    two would read the same."""
    labels = [f"{Path(u).parent.name} ({Path(u).parent.parent.name})" for u in unets]
    return {label if labels.count(label) == 1 else unet: unet for label, unet in zip(labels, unets)}


def attack_targets(params: dict, base, settings: AttackSettings, names: list[str], concept: str | None = None
                   ) -> list[Target]:
    """The attempts' targets: start prompts of `concept` (default: the target; another concept's are the study's
    control), the candidate tokens (never the target's), and the original model `base`'s images of each start
    prompt where an attack of `names` reads them. A pipeline the attacks cannot read is refused first."""
    check_pipeline(base, names)
    concept = concept or params["target"]
    prompts = start_prompts({**params, "target": concept}, settings.attempts)
    vocabulary = vocabulary_ids(base.tokenizer, settings.vocabulary, [params["target"]])
    count = attacks.original_images(names, settings)
    return [Target(p, concept, vocabulary,
                   target_latents(base, p, settings.seeds(a, TARGET_IMAGE_SEEDS, count), settings.num_inference_steps,
                                  settings.guidance_scale) if count else None)
            for a, p in enumerate(prompts)]


def measured(name: str, pipe, judge: Judge, target: Target, attempt: int, settings: AttackSettings
             ) -> tuple[Attempt, float, int]:
    """Attack `name` (`none`: the start prompt itself) for one attempt, with its cost: wall seconds and UNet steps,
    the images that went through the denoiser (one per image and call: sampling, search and optimisation alike; a
    copy of it made inside, e.g. relearning's, counts too, as its hooks are copied with it)."""
    steps = [0]

    def count(module, args, kwargs):  # a UNet's latents come first, a transformer's as `hidden_states`
        steps[0] += len(args[0] if args else kwargs["hidden_states" if "hidden_states" in kwargs else "sample"])

    handle = denoiser(pipe).register_forward_pre_hook(count, with_kwargs=True)
    started = time.perf_counter()
    try:
        result = no_attack(pipe, judge, target, attempt, settings) if name == "none" else \
            attacks.run(name, pipe, judge, target, attempt, settings)
    finally:
        handle.remove()
    return result, time.perf_counter() - started, steps[0]


def attacked(pipe, judge: Judge, targets: list[Target], names: list[str], settings: AttackSettings
             ) -> Iterator[tuple[Attempt, float, int]]:
    """`none`, then each attack of `names`, on every target in turn: `measured`'s (attempt, seconds, UNet steps)."""
    for a, target in enumerate(targets):
        for name in ["none", *names]:
            yield measured(name, pipe, judge, target, a, settings)


def attack_models(params: dict, models: dict[str, str | None], judge: Judge | None = None,
                  progress: bool = True) -> list[tuple[str, Attempt]]:
    """Every attack of `attacks` (and `none`) on every model (label → erased UNet folder, None for the base
    model), with the same start prompts, seeds, candidate tokens and original images for every model."""
    names = params["attacks"]
    check_unets([u for u in models.values() if u is not None], key="models")  # before any generation
    settings = AttackSettings.from_params(params)
    judge = judge or make_judge(params)
    base = load_pipeline(params["model"], params["device"])
    targets = attack_targets(params, base, settings, names)
    results = []
    for label, unet in models.items():
        pipe = base if unet is None else load_pipeline(params["model"], params["device"], unet=unet)
        done = [attempt for attempt, _, _ in attacked(pipe, judge, targets, names, settings)]
        results += [(label, attempt) for attempt in done]
        if progress:
            print(f"{label}: " + ", ".join(f"{k} ASR {100 * np.mean([r.success for r in done if r.attack == k]):.0f}%"
                                           for k in ["none", *names]), flush=True)
    return results


def attempts_table(results: list[tuple[str, Attempt]]) -> pd.DataFrame:
    return pd.DataFrame([{"model": label, **attempt.row()} for label, attempt in results])


def asr_table(attempts: pd.DataFrame) -> pd.DataFrame:
    """ASR (%) per model and attack, with the mean judged-target rate of the final prompts (%)."""
    grouped = attempts.groupby(["model", "attack"], sort=False)
    return pd.DataFrame({"attempts": grouped.size(), "ASR (%)": 100 * grouped["success"].mean(),
                         "judged target (%)": 100 * grouped["judged target"].mean()}).reset_index()


def asr_plot(table: pd.DataFrame):
    """Bar plot of ASR per model, one bar per attack."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    figure, axes = plt.subplots(figsize=(1.6 + 1.3 * table.model.nunique(), 3.6))
    sns.barplot(data=table, x="model", y="ASR (%)", hue="attack", ax=axes)
    axes.set(ylim=(0, 105), xlabel="", title="attack success rate (higher: less robust)")
    axes.tick_params(axis="x", labelrotation=20)
    axes.legend(title="attack", bbox_to_anchor=(1.01, 1), loc="upper left")
    figure.tight_layout()
    return figure


def write_results(results: list[tuple[str, Attempt]], out_dir: Path) -> tuple[pd.DataFrame, dict[str, Path]]:
    """attempts.csv, asr.csv, asr.md and asr.png in `out_dir`, each written atomically; returns the ASR table."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    attempts = attempts_table(results)
    table = asr_table(attempts)
    paths = {name: out_dir / name for name in ("attempts.csv", "asr.csv", "asr.md", "asr.png")}
    atomic_write_text(attempts.to_csv(index=False), paths["attempts.csv"])
    atomic_write_text(table.to_csv(index=False), paths["asr.csv"])
    atomic_write_text(table.to_markdown(index=False, floatfmt=".1f") + "\n", paths["asr.md"])
    figure, buffer = asr_plot(table), io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(buffer.getvalue(), paths["asr.png"])
    return table, paths
