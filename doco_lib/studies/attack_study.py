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
(images through the UNet, sampling and optimisation alike; `robustness.measured`). The relearning attack's curve
(the rate after each number of fine-tuning steps, the original model's beside every erasure's) is a second table.

The study takes hours on a CPU, so it keeps each (seed, model)'s attempts as a chunk the moment they are measured
(`store`): a killed study loses at most the model it was attacking, shards of the models (`shard_variants`) run
side by side, and a study too long for one session is recorded seed by seed as parts of its artefacts, joined only
when their settings and `STUDY_VERSION` (`study_identity`) are the same.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save
from scipy import stats

from doco_lib import config
from doco_lib.evaluation.rating import model_label, record_model, student_t_interval
from doco_lib.io import atomic_write_bytes, atomic_write_text, slug
from doco_lib.models import load_pipeline
from doco_lib.studies import ablation, robustness, versions
from doco_lib.studies.attacks.common import AttackSettings, make_judge

COLUMNS = ["method", "seed", "prompts", "attack", "attempts", "successes", "asr", "asr_low", "asr_high",
           "judged_target", "seconds", "steps"]


def check_study(params: dict) -> None:
    """Refuse, before any training, a control that is the target itself, or one beside a prompts file."""
    if params["attack_controls"] and params["attack_prompts_file"]:
        raise config.ParamsError(f"attack_controls: {params['attack_controls']} with attack_prompts_file "
                                 f"{params['attack_prompts_file']!r}; the control replaces the target in the concept's "
                                 "own prompts, which a prompts file replaces. Set attack_controls: [].")
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
    relearn_steps: tuple[int, ...] = ()

    @property
    def rows(self) -> pd.DataFrame:
        return asr_rows(self.attempts)

    @property
    def relearning(self) -> pd.DataFrame:
        return relearning_rows(self.attempts, self.relearn_steps)


def shard_variants(variants: list[str], shard: int, shards: int) -> tuple[list[str], bool]:
    """Shard `shard` of `shards` (1-based) of the study: the variants it trains and attacks, and whether it attacks
    the params' original model. Round robin over [original, *variants], so shards run side by side (a process per
    core) on disjoint runs and chunks; SepME's own original model goes with SepME."""
    if not 1 <= shard <= shards:
        raise config.ParamsError(f"--shard {shard}/{shards}: expected K/N with 1 <= K <= N.")
    units = ["original", *variants]
    mine = [unit for i, unit in enumerate(units) if i % shards == shard - 1]
    return [unit for unit in mine if unit != "original"], "original" in mine


# The version of what the study measures. Bump it when a change alters its numbers (an attack's algorithm, training,
# the toy world or its judge, sampling, a default setting): parts of its artefacts recorded under different versions
# are not joined. A change that does not (orchestration, another model family's path, a new key at a default that
# changes nothing) keeps it. tests/test_attack_study.py pins the contents of `CODE`, so that every change there is
# that decision.
STUDY_VERSION = 1
CODE = ("doco_lib/methods", "doco_lib/toy", "doco_lib/studies/attacks", "doco_lib/studies/attack_study.py",
        "doco_lib/studies/robustness.py", "doco_lib/studies/ablation.py", "doco_lib/studies/runs.py",
        "doco_lib/studies/sepme_study.py", "doco_lib/models.py", "doco_lib/sampling.py", "doco_lib/anchors.py",
        "doco_lib/prompt_tokens.py", "doco_lib/evaluation/rating.py", "doco_lib/config.py",
        "doco_lib/studies/versions.py")


def code_digest() -> str:
    """A digest of the contents of `CODE`'s Python files."""
    return versions.code_digest(CODE)


def study_identity(params: dict) -> str:
    """What a recorded part of the study depends on: `STUDY_VERSION` and every setting but the seeds and where
    outputs go. Parts recorded in different sessions join only when it is equal."""
    return versions.identity(STUDY_VERSION, params)


def chunk_identity(params: dict, label: str, unet: str | None) -> str:
    """What a chunk's attempts depend on besides the code: its settings (`versions.settings`, the seed included),
    the model's label and its UNet folder's weights' modification time (a retrained run is another model)."""
    kept = versions.settings(params)
    weights = sorted(Path(unet).glob("*.safetensors")) if unet else []
    stamp = [(w.name, w.stat().st_size, int(w.stat().st_mtime)) for w in weights]
    return hashlib.sha256(json.dumps([kept, label, stamp], sort_keys=True, default=str).encode()).hexdigest()


def _chunk_paths(store: Path, seed: int, label: str) -> tuple[Path, Path, Path]:
    stem = Path(store) / f"seed{seed}" / slug(label)
    return stem.with_suffix(".csv"), stem.with_suffix(".json"), stem.with_suffix(".examples.safetensors")


def _read_chunk(store: Path, seed: int, label: str, identity: str):
    """A finished chunk's attempts and examples, or None when it is missing or was measured under other settings."""
    rows_path, meta_path, examples_path = _chunk_paths(store, seed, label)
    if not (rows_path.is_file() and meta_path.is_file()):
        return None
    if json.loads(meta_path.read_text())["identity"] != identity:
        print(f"{rows_path}: measured under other settings or weights; measuring it again", flush=True)
        return None
    examples = []
    if examples_path.is_file():
        with safe_open(str(examples_path), "pt") as tensors:
            captions = json.loads(tensors.metadata()["captions"])
            examples = [(caption, tensors.get_tensor(str(i))) for i, caption in enumerate(captions)]
    rows = pd.read_csv(rows_path, keep_default_na=False, na_values=[""], dtype={"search scores": str})
    return rows.fillna({"search scores": ""}), examples


def _write_chunk(store: Path, seed: int, label: str, identity: str, records: list[dict],
                 examples: list[tuple[str, torch.Tensor]]) -> None:
    """A chunk's attempts (its CSV last, the mark of a finished chunk), each file atomically."""
    rows_path, meta_path, examples_path = _chunk_paths(store, seed, label)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    if examples:
        tensors = {str(i): images.contiguous() for i, (_, images) in enumerate(examples)}
        atomic_write_bytes(save(tensors, metadata={"captions": json.dumps([c for c, _ in examples])}), examples_path)
    atomic_write_text(json.dumps({"identity": identity, "seed": seed, "model": label}) + "\n", meta_path)
    atomic_write_text(pd.DataFrame(records).to_csv(index=False), rows_path)


def attack_study(params: dict, models: pd.DataFrame, progress: bool = True, store: Path | None = None,
                 original: bool = True, seeds: list[int] | None = None) -> Study:
    """Every attack of `attacks` (and `none`, and the control's) on the original model (unless `original` is
    False: another shard attacks it) and every model of `models` (`train_models`' rows), replicate by replicate:
    the seed of a row's training is the attacks' seed. With `store`, each (seed, model)'s attempts are a chunk
    written there as soon as it is measured and reused when it is there already, so a killed study resumes and
    shards (`shard_variants`) combine: a last run without shards measures nothing new. `seeds`: the replicates
    (default: the seeds of `models`)."""
    check_study(params)
    judge = make_judge(params)
    controls = params["attack_controls"]
    prompt_sets = {"target": (params["target"], params["attacks"]),
                   **({f"control ({params['attack_control']})": (params["attack_control"], controls)} if controls
                      else {})}
    attempts, examples = [], []
    for seed in sorted(seeds if seeds is not None else set(models["seed"])):
        replicate = models[models.seed == seed].to_dict("records")
        bases = list(dict.fromkeys(([params["model"]] if original else []) + [record_model(params, r) for r in replicate]))
        for model in bases:
            run = {**params, "seed": int(seed), "model": model}
            settings = AttackSettings.from_params(run)
            attacked = ({model_label(params, model, "original"): None} if original or model != params["model"] else {}) | {
                model_label(params, model, r["variant"]): r["unet"] for r in replicate if record_model(params, r) == model}
            base, targets = None, None
            for label, unet in attacked.items():
                identity = chunk_identity(run, label, unet)
                done = _read_chunk(store, int(seed), label, identity) if store else None
                if done is None:
                    if base is None:  # the original model's images of the targets, once per base model and seed
                        base = load_pipeline(model, params["device"])
                        targets = {prompts: (names, robustness.attack_targets(run, base, settings, names, concept))
                                   for prompts, (concept, names) in prompt_sets.items()}
                    done = _measure(params, base if unet is None else load_pipeline(model, params["device"], unet=unet),
                                    judge, targets, settings, label, int(seed))
                    if store:
                        _write_chunk(store, int(seed), label, identity, *done)
                    done = (pd.DataFrame(done[0]), done[1])
                attempts.append(done[0])
                examples += done[1]
                if progress:
                    rows = asr_rows(done[0])
                    print(f"seed {seed} · {label}: " + "; ".join(
                        f"{prompts}: " + ", ".join(f"{r.attack} {100 * r.asr:.0f}%" for r in group.itertuples())
                        for prompts, group in rows.groupby("prompts", sort=False)), flush=True)
    return Study(pd.concat(attempts, ignore_index=True) if attempts else pd.DataFrame(), examples,
                 tuple(sorted(params["attack_relearn_steps"])))


def _measure(params: dict, pipe, judge, targets: dict, settings: AttackSettings, label: str, seed: int
             ) -> tuple[list[dict], list[tuple[str, torch.Tensor]]]:
    """One model's attempts under every attack of every prompt set, and its examples: the evaluation images of each
    (prompts, attack)'s first successful attempt, with a caption."""
    records, examples = [], {}
    for prompts, (names, chosen) in targets.items():
        for attempt, seconds, steps in robustness.attacked(pipe, judge, chosen, names, settings):
            records.append({"method": label, "seed": seed, "prompts": prompts, **attempt.row(),
                            "seconds": seconds, "steps": steps})
            key = (prompts, attempt.attack)
            if attempt.attack != "none" and attempt.success and key not in examples:
                examples[key] = (f"{label} · {prompts} · {attempt.attack}, seed {seed}: {attempt.prompt!r} "
                                 f"({100 * attempt.judged_target:.0f}%)", attempt.images)
    return records, list(examples.values())


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


def relearning_rows(attempts: pd.DataFrame, steps: tuple[int, ...]) -> pd.DataFrame:
    """The relearning curve (`relearning` attempts' `search scores`: the judged-target rate after each of `steps`
    fine-tuning steps): a row per (method, seed, steps) with the mean rate over the attempts, as a fraction."""
    relearnt = attempts[(attempts.attack == "relearning") & (attempts.prompts == "target")]
    rows = [{"method": method, "seed": seed, "steps": count, "rate": float(score)}
            for method, seed, scores in relearnt[["method", "seed", "search scores"]].itertuples(index=False)
            for count, score in zip(steps, str(scores).split())]
    columns = ["method", "seed", "steps", "attempts", "rate"]
    if not rows:
        return pd.DataFrame(columns=columns)
    grouped = pd.DataFrame(rows).groupby(["method", "seed", "steps"], sort=False)["rate"]
    return grouped.agg(attempts="size", rate="mean").reset_index()[columns]


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


def relearning_figure(rows: pd.DataFrame):
    """The relearning curve (`relearning_rows`): judged-target rate (%) of the start prompts after each number of
    fine-tuning steps, a line per model, mean over seeds ± 95% Student-t interval; the originals dashed."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    figure, ax = plt.subplots(figsize=(7, 4.2))
    methods = list(dict.fromkeys(rows["method"]))
    sns.lineplot(data=rows.assign(percent=100 * rows["rate"]), x="steps", y="percent", hue="method", hue_order=methods,
                 style="method", dashes={m: (4, 2) if m.startswith("original") else "" for m in methods},
                 errorbar=student_t_interval, marker="o", ax=ax)
    ax.set(ylim=(-3, 103), xlabel="fine-tuning steps on the original model's images of the target",
           ylabel="judged target (%)", title="relearning: how fast the erased concept comes back")
    ax.legend(title="model", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure


def write_study(study: Study, out_dir: Path) -> dict[str, Path]:
    """attacks.csv (the rows), attempts.csv, relearning.csv, attacks.png and relearning.png in `out_dir`, each
    written atomically."""
    import matplotlib.pyplot as plt

    names = ("attacks.csv", "attempts.csv", "relearning.csv", "attacks.png", "relearning.png")
    paths = {name: Path(out_dir) / name for name in names}
    atomic_write_text(study.rows.to_csv(index=False), paths["attacks.csv"])
    atomic_write_text(study.attempts.to_csv(index=False), paths["attempts.csv"])
    atomic_write_text(study.relearning.to_csv(index=False), paths["relearning.csv"])
    figures = {"attacks.png": asr_figure(study.rows)}
    if not study.relearning.empty:
        figures["relearning.png"] = relearning_figure(study.relearning)
    for name, figure in figures.items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        plt.close(figure)
        atomic_write_bytes(buffer.getvalue(), paths[name])
    return {name: path for name, path in paths.items() if path.suffix == ".csv" or name in figures}
