"""The attack study (notebook 07, `doco toy attacks`): every method's erasure, over seeds, under every attack.

Replicate s trains each method of `attack_variants` with seed s exactly as notebook 05 does (`ablation.train_grid`:
runs `<run>/ablation/<variant>_s<s>/`, reused once finished), then attacks the original model and every erased one
with the attacks' own seed s (start prompts, search, evaluation and target-image seeds, `robustness.attack_targets`),
so the original model's replicates differ by the attacks' randomness alone. Every attack of `attacks` runs beside
`none`, the start prompts themselves: the rate before any attack. SepME's erasure lives on `sepme_model`, so it is
attacked beside that model's own original ("original (toy-wide)").

The control (`attack_control`, `attack_controls`): the same start prompts with the target replaced by another
concept (circle in the toy world), attacked and judged as the *target*. An attack that brings the concept back
leaves the control at its own `none` rate; one that draws the target whatever the prompt asks, or makes images the
judge misreads, raises it too. The toy judge calls the original model's circles at twice the initial noise stars
(7 of 8, tests/test_attack.py), so the noise probe's rate reads only beside its control.

A row per (method, seed, prompts, attack): attempts, successes, ASR with its 95% Wilson interval, the mean fraction
of evaluation images judged as the target, and the attack's cost over all its attempts: wall seconds and UNet steps
(images through the UNet, sampling and optimisation alike; `robustness.measured`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from scipy import stats

from doco_lib import config
from doco_lib.evaluation.rating import model_label, record_model, student_t_interval
from doco_lib.io import atomic_write_bytes, atomic_write_text
from doco_lib.models import load_pipeline
from doco_lib.studies import ablation, robustness
from doco_lib.studies.attacks.common import AttackSettings, make_judge

COLUMNS = ["method", "seed", "prompts", "attack", "attempts", "successes", "asr", "asr_low", "asr_high",
           "judged_target", "seconds", "steps"]


def check_study(params: dict) -> None:
    """Refuse, before any training, a control that is the target itself."""
    if params["attack_controls"] and params["attack_control"] == params["target"]:
        raise config.ParamsError(f"attack_control: {params['attack_control']!r} is the target; the control's prompts "
                                 "must name another concept, e.g. circle in the toy world.")


def train_models(params: dict, variants: list[str], seeds: list[int], unets: list[str] = ()) -> pd.DataFrame:
    """The attacked models, a row per (variant, seed, unet): each variant trained per seed as notebook 05 trains it,
    and each further erased UNet folder (`attack_unets`, labelled by `robustness.label_unets`) at every seed."""
    robustness.check_unets(list(unets), key="attack_unets")
    check_study(params)
    further = [{"variant": label, "seed": seed, "unet": unet}
               for label, unet in robustness.label_unets(list(unets)).items() for seed in seeds]
    return pd.concat([ablation.train_grid(params, variants, seeds), pd.DataFrame(further)], ignore_index=True)


@dataclass
class Study:
    """What `attack_study` measured: `attempts`, a row per attempt (the table `rows` sums); `examples`, the
    evaluation images of each (method, prompts, attack)'s first successful attempt, with a caption."""

    attempts: pd.DataFrame
    examples: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    @property
    def rows(self) -> pd.DataFrame:
        return asr_rows(self.attempts)


def attack_study(params: dict, models: pd.DataFrame, progress: bool = True) -> Study:
    """Every attack of `attacks` (and `none`, and the control's) on the original model and every model of `models`
    (`train_models`' rows), replicate by replicate: the seed of a row's training is the attacks' seed."""
    check_study(params)
    judge = make_judge(params)
    controls = params["attack_controls"]
    prompt_sets = {"target": (params["target"], params["attacks"]),
                   **({f"control ({params['attack_control']})": (params["attack_control"], controls)} if controls
                      else {})}
    records, examples = [], {}
    for seed in sorted(set(models["seed"])):
        replicate = models[models.seed == seed].to_dict("records")
        for model in dict.fromkeys(record_model(params, r) for r in replicate):
            run = {**params, "seed": int(seed), "model": model}
            settings = AttackSettings.from_params(run)
            base = load_pipeline(model, params["device"])
            targets = {prompts: (names, robustness.attack_targets(run, base, settings, names, concept))
                       for prompts, (concept, names) in prompt_sets.items()}
            attacked = {model_label(params, model, "original"): None} | {
                model_label(params, model, r["variant"]): r["unet"] for r in replicate if record_model(params, r) == model}
            for label, unet in attacked.items():
                pipe = base if unet is None else load_pipeline(model, params["device"], unet=unet)
                for prompts, (names, chosen) in targets.items():
                    for attempt, seconds, steps in robustness.attacked(pipe, judge, chosen, names, settings):
                        records.append({"method": label, "seed": int(seed), "prompts": prompts, **attempt.row(),
                                        "seconds": seconds, "steps": steps})
                        key = (label, prompts, attempt.attack)
                        if attempt.attack != "none" and attempt.success and key not in examples:
                            examples[key] = (f"{label} · {prompts} · {attempt.attack}, seed {seed}: {attempt.prompt!r} "
                                             f"({100 * attempt.judged_target:.0f}%)", attempt.images)
                if progress:
                    done = asr_rows(pd.DataFrame(records)).query("method == @label and seed == @seed")
                    print(f"seed {seed} · {label}: " + "; ".join(
                        f"{prompts}: " + ", ".join(f"{r.attack} {100 * r.asr:.0f}%" for r in group.itertuples())
                        for prompts, group in done.groupby("prompts", sort=False)), flush=True)
    return Study(pd.DataFrame(records), list(examples.values()))


def asr_rows(attempts: pd.DataFrame) -> pd.DataFrame:
    """A row per (method, seed, prompts, attack) of an attempts table (columns `COLUMNS`; ASR and judged target as
    fractions): the artefact's rows."""
    grouped = attempts.groupby(["method", "seed", "prompts", "attack"], sort=False)
    rows = grouped.agg(attempts=("success", "size"), successes=("success", "sum"),
                       judged_target=("judged target", "mean"), seconds=("seconds", "sum"),
                       steps=("steps", "sum")).reset_index()
    intervals = [stats.binomtest(int(k), int(n)).proportion_ci(0.95, method="wilson")
                 for k, n in zip(rows.successes, rows.attempts)]
    return rows.assign(asr=rows.successes / rows.attempts, asr_low=[i.low for i in intervals],
                       asr_high=[i.high for i in intervals], seconds=rows.seconds.round(2))[COLUMNS]


def asr_figure(rows: pd.DataFrame):
    """ASR (%) per attack, a bar per method: mean over seeds with its 95% Student-t interval (the journal table's);
    a second panel for the control's prompts, when the study ran them."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    panels = list(dict.fromkeys(rows["prompts"]))
    methods = list(dict.fromkeys(rows["method"]))
    widths = [rows[rows.prompts == p].attack.nunique() for p in panels]
    figure, axes = plt.subplots(1, len(panels), figsize=(2.2 + 0.9 * sum(widths), 4.2), squeeze=False,
                                gridspec_kw={"width_ratios": widths})
    for ax, prompts in zip(axes[0], panels):
        shown = rows[rows.prompts == prompts].assign(percent=lambda r: 100 * r.asr)
        sns.barplot(data=shown, x="attack", y="percent", hue="method", hue_order=methods, errorbar=student_t_interval,
                    capsize=0.1, err_kws={"linewidth": 1}, ax=ax, legend=ax is axes[0][-1])
        ax.set(ylim=(0, 105), xlabel="", ylabel="ASR (%)",
               title="start prompts of the target" if prompts == "target" else f"{prompts}, judged as the target")
        ax.tick_params(axis="x", labelrotation=30)
    axes[0][-1].legend(title="model", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    seeds = rows["seed"].nunique()
    figure.suptitle(f"attack success rate, mean over {seeds} seed{'s' if seeds > 1 else ''} ± 95% Student-t interval "
                    "(higher: less robust)", fontsize=10)
    figure.tight_layout()
    return figure


def write_study(study: Study, out_dir: Path) -> dict[str, Path]:
    """attacks.csv (the rows), attempts.csv and attacks.png in `out_dir`, each written atomically."""
    import matplotlib.pyplot as plt

    paths = {name: Path(out_dir) / name for name in ("attacks.csv", "attempts.csv", "attacks.png")}
    atomic_write_text(study.rows.to_csv(index=False), paths["attacks.csv"])
    atomic_write_text(study.attempts.to_csv(index=False), paths["attempts.csv"])
    figure, buffer = asr_figure(study.rows), io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(buffer.getvalue(), paths["attacks.png"])
    return paths
