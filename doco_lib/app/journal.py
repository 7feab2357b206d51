"""The results journal's artefacts: what a study measured, committed, and the tables of docs/results.md made from it.

An artefact is two files in docs/results/: `<name>.csv`, the measured rows (one per seed, model and prompt set,
say), and `<name>.json`, how they were measured (git commit, command, machine, date, wall time, packages). A table
of docs/results.md generated from one sits between the lines `<!-- artefact: NAME -->` and `<!-- /artefact -->`:
`doco results` rewrites every such block from its artefact, and `doco results --check` lists the blocks that
differ (tests/test_results_journal.py runs it), so a number in a block is the artefact's.

Intervals throughout: the mean over seeds with a 95% Student-t interval (`rating.mean_ci`).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pandas as pd

from doco_lib import costs
from doco_lib.app.batch import environment  # the batch manifest's record of the code and packages
from doco_lib.evaluation import costs_table, unlearn_canvas
from doco_lib.evaluation.rating import mean_ci_cell
from doco_lib.io import atomic_write_bytes, atomic_write_text
from doco_lib.studies import attack_study, damage_matrix, implicit_attribute, style_table, versions

REPO = Path(__file__).resolve().parents[2]
ARTEFACTS = REPO / "docs" / "results"
JOURNAL = REPO / "docs" / "results.md"
BLOCK = re.compile(r"(<!-- artefact: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /artefact -->)", re.S)


def record(name: str, rows: pd.DataFrame, command: str, started: float, folder: Path = ARTEFACTS,
           part: str | None = None, identity: str | None = None) -> bool:
    """Write artefact `name`: `rows` as CSV and how they were measured (`started`: the study's time.time()). With
    `part`, one part of it (`<name>/<part>.csv`, say one seed of a study too long for one session): `load` joins
    the parts, which must share `identity` (what the rows depend on: settings and code) and no seed. Rows equal to
    those recorded, under the same identity, leave the record as it was (its date, commit and wall time: a rerun
    that reused everything measured nothing new); returns whether it wrote."""
    run = environment()
    changed = subprocess.run(["git", "status", "--porcelain", "--", "doco_lib", "params", "notebooks"], cwd=REPO,
                             capture_output=True, text=True).stdout.strip()
    provenance = {"name": name, "date": date.today().isoformat(), "commit": run["git_commit"],
                  "uncommitted_changes": changed.splitlines(), "command": command,
                  "machine": costs.machine(), "wall_seconds": round(time.time() - started, 1),
                  "python": run["python"], "packages": run["packages"]}
    stem = Path(folder) / name
    if part is not None:
        provenance.update(part=part, identity=identity)
        stem = stem / part
    text = rows.to_csv(index=False)
    table = stem.with_suffix(".csv")
    if table.is_file() and table.read_text() == text and _identity(stem) == identity:
        return False  # the same rows again (a rerun that reused every run and image): their first record stands
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(text, table)
    atomic_write_text(json.dumps(provenance, indent=2) + "\n", stem.with_suffix(".json"))
    return True


def _identity(stem: Path) -> str | None:
    path = stem.with_suffix(".json")
    return json.loads(path.read_text()).get("identity") if path.is_file() else None


def names(folder: Path = ARTEFACTS) -> set[str]:
    """The artefacts of `folder`: a `<name>.csv`, or a folder `<name>/` of parts."""
    return {path.stem for path in Path(folder).glob("*.csv")} | {path.name for path in Path(folder).iterdir()
                                                                 if path.is_dir()}


def load(name: str, folder: Path = ARTEFACTS) -> tuple[pd.DataFrame, dict]:
    """An artefact's rows and provenance; for one in parts, the parts' rows joined and `{"parts": [provenance of
    each part]}`, refused when the parts differ in identity or share a seed."""
    if (Path(folder) / f"{name}.csv").is_file():
        return pd.read_csv(Path(folder) / f"{name}.csv"), json.loads((Path(folder) / f"{name}.json").read_text())
    paths = sorted((Path(folder) / name).glob("*.csv"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no artefact {name!r} ({name}.csv or parts under {name}/)")
    parts = [(pd.read_csv(path), json.loads(path.with_suffix(".json").read_text())) for path in paths]
    identities = {how["identity"] for _, how in parts}
    if len(identities) > 1:
        raise ValueError(f"{folder / name}: its parts were measured under other settings or code "
                         f"({', '.join(how['part'] + ': ' + how['identity'][:12] for _, how in parts)}); "
                         "measure them again at one commit.")
    seen: dict[int, str] = {}
    for rows, how in parts:
        for seed in sorted(rows["seed"].unique()):
            if seed in seen:
                raise ValueError(f"{folder / name}: parts {seen[seed]} and {how['part']} both hold seed {seed}.")
            seen[seed] = how["part"]
    return pd.concat([rows for rows, _ in parts], ignore_index=True), {"parts": [how for _, how in parts]}


def _rate_table(rows: pd.DataFrame, row_key: str, column_key: str, corner: str) -> str:
    """Judged rate (%) per value of `row_key` (rows) and `column_key` (columns): mean ± 95% Student-t half-width
    over seeds; `corner` heads the first column."""
    rows = rows.assign(percent=100 * rows["rate"])
    columns = list(dict.fromkeys(rows[column_key]))
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, group in rows.groupby(row_key, sort=False):
        cells = [mean_ci_cell(group[group[column_key] == column]["percent"]) for column in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def retain_modes_table(rows: pd.DataFrame) -> str:
    """Judged rate (%) per prompt set (rows) and model (columns)."""
    return _rate_table(rows, "prompt set", "model", "prompt set")


def lora_export_table(rows: pd.DataFrame) -> str:
    """`retain_modes_table` of the original, full-weight and LoRA models, with the LoRA's difference from the full
    weights taken per seed before averaging, then the export's size per seed."""
    wide = rows.pivot_table(index=["seed", "prompt set"], columns="model", values="rate", sort=False).reset_index()
    difference = wide.assign(model="LoRA − full (pts)", rate=wide["LoRA"] - wide["full weights"])
    table = retain_modes_table(pd.concat([rows, difference[["seed", "prompt set", "model", "rate"]]]))
    sizes = rows.drop_duplicates("seed")
    per_seed = "; ".join(f"seed {r.seed}: {r.lora_layers} layers, mean rank {r.rank_mean:g}, {r.diffusers_kib:g} KiB"
                         for r in sizes.itertuples())
    return f"{table}\n\nThe LoRA at {sizes['energy'].iloc[0]:.0%} of each layer's change energy ({per_seed})."


def sepme_table(rows: pd.DataFrame) -> str:
    """Judged rate (%) of each prompt set (columns) under each erased subset of SepME's increments (rows)."""
    return _rate_table(rows, "model", "prompt set", "erased")


def toy_world_table(rows: pd.DataFrame) -> str:
    """How often the judge names the prompted shape, colour or style (rows) of each toy model's samples (columns)."""
    named = rows.assign(value=rows["attribute"] + ": " + rows["value"])
    return _rate_table(named, "value", "model", "prompted value")


def attacks_table(rows: pd.DataFrame) -> str:
    """Attack success rate (%) per model (rows; the control's prompts on rows of their own) and attack (columns,
    `none` first: before any attack): mean ± 95% Student-t half-width over seeds; with one seed, its rate and the
    95% Wilson interval of its attempts in brackets. Then each attack's cost per attempt,
    over every model and seed: wall seconds and UNet steps."""
    rows = rows.assign(percent=100 * rows["asr"],
                       label=[m if p == "target" else f"{m}, {p}" for m, p in zip(rows["method"], rows["prompts"])])
    attacks = list(dict.fromkeys(rows["attack"]))
    lines = ["| model | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
    def cell(chosen: pd.DataFrame) -> str:
        if len(chosen) == 1:  # one seed: its attempts' Wilson interval
            row = chosen.iloc[0]
            return f"{row.percent:.0f} [{100 * row.asr_low:.0f}–{100 * row.asr_high:.0f}]"
        return mean_ci_cell(chosen["percent"]) if len(chosen) else "–"

    for label, group in rows.groupby("label", sort=False):
        cells = [cell(group[group.attack == attack]) for attack in attacks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| attack | seconds per attempt | UNet steps per attempt |", "|---|---|---|"]
    for attack, group in rows.groupby("attack", sort=False):
        attempts = group["attempts"].sum()
        lines.append(f"| {attack} | {group['seconds'].sum() / attempts:.1f} | {group['steps'].sum() / attempts:,.0f} |")
    return "\n".join(lines)


def _rates_with_accuracy(rows: pd.DataFrame, accuracy: pd.DataFrame) -> str:
    """Each prompt set's judged rate (%) per model (rows), then the columns of `accuracy` (a row per model)."""
    rates = _rate_table(rows, "model", "prompt set", "model").splitlines()
    lines = [rates[0] + " " + " | ".join(accuracy.columns) + " |", rates[1] + "---|" * len(accuracy.columns)]
    for line, (_, metrics) in zip(rates[2:], accuracy.iterrows()):
        lines.append(line + " " + " | ".join(metrics) + " |")
    return "\n".join(lines)


def methods_table(rows: pd.DataFrame) -> str:
    """Notebook 05's comparison: each prompt set's judged rate (%) per model (rows), then UnlearnCanvas's UA, IRA and
    CRA (`unlearn_canvas.table`), mean ± 95% Student-t half-width over seeds."""
    target = rows.loc[rows.role == "target", "prompt set"].iloc[0]
    return _rates_with_accuracy(rows, unlearn_canvas.table(
        rows, target, erased=list(rows.loc[rows.role == "erased", "prompt set"].unique()),
        cross_domain=list(rows.loc[rows.role == "cross-domain", "prompt set"].unique())))


def styles_table(rows: pd.DataFrame) -> str:
    """Toy Table 2 (`style_table.table_of_measures`): a row per erased style and model, a column per measure."""
    table = style_table.table_of_measures(rows).reset_index()
    lines = ["| " + " | ".join(table.columns) + " |", "|---" * len(table.columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)])


def implicit_attribute_table(rows: pd.DataFrame) -> str:
    """Toy Figure 6's numbers: per model the images judged in the attribute on the implicit prompts (all shapes) and
    their reduction against the original's (`implicit_attribute.reduction`), then each seed's count."""
    reduction = implicit_attribute.reduction(rows)
    totals = rows[rows["class"] == "total"]
    attribute, images = rows["attribute"].iloc[0], rows["prompts"].iloc[0] * rows["images"].iloc[0]
    lines = [f"| model | images judged {attribute} on the implicit prompts (of {images}) | reduction (%) ↑ | per seed |",
             "|---|---|---|---|"]
    for model, row in reduction.iterrows():
        per_seed = ", ".join(f"{count:g}" for count in totals[totals.model == model].sort_values("seed")["count"])
        lines.append(f"| {model} | {row['detections']} | {row['reduction (%) ↑']} | {per_seed} |")
    return "\n".join(lines)


def attribute_colours_table(rows: pd.DataFrame) -> str:
    """The attribute runs where each colour is named: the colour head's judged rate (%) per colour, then UA (the
    attribute's prompts), IRA (the other colours') and CRA (the shape and style heads on their images)."""
    return _rates_with_accuracy(rows, unlearn_canvas.table(rows, rows["attribute"].iloc[0],
                                                           cross_heads=implicit_attribute.CROSS_HEADS))


def damage_matrix_table(rows: pd.DataFrame) -> str:
    """The collateral-damage matrix per method: the erasure (mean of the diagonal) and the damage (off it) in points
    and Spearman's ρ of the damage against the shapes' similarity, each per seed, then mean ± 95% Student-t
    half-width over seeds; beside them ρ of the seed-mean matrix and its shape-relabelling permutation p
    (`damage_matrix.mantel_spearman`)."""
    per_seed = damage_matrix.seed_summaries(rows)
    of_mean = damage_matrix.summary(*damage_matrix.mean_matrices(rows))
    lines = ["| method | erasure (diagonal, pts) | damage (off the diagonal, pts) | ρ (damage, similarity) | "
             "ρ of the mean matrix | p (permutation) |", "|---" * 6 + "|"]
    for method, group in per_seed.groupby("method", sort=False):
        rho, p = of_mean.loc[method, "Spearman ρ (damage, similarity)"], of_mean.loc[method, "p (permutation)"]
        lines.append(f"| {method} | {mean_ci_cell(group['erasure (diagonal, pts)'])} | "
                     f"{mean_ci_cell(group['damage (off the diagonal, pts)'])} | "
                     f"{mean_ci_cell(group['Spearman ρ (damage, similarity)'], digits=2)} | {rho:.2f} | "
                     f"{'< 0.001' if p < 0.001 else f'{p:.3f}'} |")
    return "\n".join(lines)


def multi_concept_table(rows: pd.DataFrame) -> str:
    """Judged rate (%) of each prompt set (columns) after each sequential stage and the all-at-once run (rows)."""
    return _rate_table(rows, "model", "prompt set", "model")


def sampling_sweep_table(rows: pd.DataFrame) -> str:
    """The target's judged rate (%) per model (rows) at each sampling setting (columns: each guidance scale at the
    base step count, then each other step count at the base guidance; the base setting is the one both sweeps
    share), mean ± 95% Student-t half-width over seeds."""
    target = rows[rows.role == "target"]
    base_steps, base_guidance = target["steps"].mode().iloc[0], target["guidance"].mode().iloc[0]
    labels = [f"w {g:g}" if s == base_steps else f"{s} steps" for g, s in zip(target["guidance"], target["steps"])]
    return _rate_table(target.assign(setting=labels), "model", "setting",
                       f"model (w = guidance at {base_steps} steps; steps at w {base_guidance:g})")


def method_costs_table(rows: pd.DataFrame) -> str:
    """What each run cost to train (`costs_table.efficiency_table`): a row per variant, each measure over its seeds
    (mean ± 95% Student-t half-width; one value where the seeds agree), the memory measured and the machine."""
    table = costs_table.efficiency_table(rows).reset_index()
    lines = ["| " + " | ".join(table.columns) + " |", "|---" * len(table.columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)])


def relearning_table(rows: pd.DataFrame) -> str:
    """The relearning curve: judged-target rate (%) of each model's start prompts (rows) after each number of
    fine-tuning steps (columns), the mean over attempts per seed, then over seeds."""
    return _rate_table(rows.assign(steps=[f"{steps} steps" for steps in rows["steps"]]), "method", "steps", "model")


# The toy worlds whose studies of `WORLD_STUDIES` are recorded, each as artefacts of its own: `<study>` for the UNet
# world, `<study>_toy_mmdit` for toy-mmdit (`versions.artefact_name`).
WORLDS = ("toy", "toy-mmdit")
WORLD_STUDIES: dict[str, Callable[[pd.DataFrame], str]] = {"attacks": attacks_table, "relearning": relearning_table,
                                                           "methods": methods_table,
                                                           "sampling_sweep": sampling_sweep_table,
                                                           "method_costs": method_costs_table}
RENDERERS: dict[str, Callable[[pd.DataFrame], str]] = {
    "retain_modes": retain_modes_table, "lora_export": lora_export_table, "toy_world": toy_world_table,
    "sepme": sepme_table, "damage_matrix": damage_matrix_table,
    "multi_concept": multi_concept_table, "styles": styles_table, "implicit_attribute": implicit_attribute_table,
    "attribute_colours": attribute_colours_table, **{versions.artefact_name(study, {"model": world}): table
                             for world in WORLDS for study, table in WORLD_STUDIES.items()}}


# Artefact → (figure file in docs/figures/, the study's function that draws it from the artefact's rows).
FIGURES: dict[str, tuple[str, Callable]] = {
    **{name: (f"{name}.png", draw) for world in WORLDS
       for name, draw in ((versions.artefact_name("attacks", {"model": world}), attack_study.asr_figure),
                          (versions.artefact_name("relearning", {"model": world}), attack_study.relearning_figure))},
    "damage_matrix": ("damage_matrix.png", damage_matrix.artefact_figure),
    "implicit_attribute": ("implicit_attribute.png", implicit_attribute.artefact_figure)}


def draw_figures(folder: Path = ARTEFACTS, figures: Path = REPO / "docs" / "figures") -> list[Path]:
    """Draw every figure made from an artefact of `folder` (its rows, all parts joined) into `figures`."""
    import io

    import matplotlib.pyplot as plt

    drawn = []
    for name, (file, draw) in FIGURES.items():
        if name not in names(folder):
            continue
        figure, buffer = draw(load(name, folder)[0]), io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        plt.close(figure)
        atomic_write_bytes(buffer.getvalue(), Path(figures) / file)
        drawn.append(Path(figures) / file)
    return drawn


def render(name: str, folder: Path = ARTEFACTS) -> str:
    """The block of artefact `name`: where it comes from, then its table."""
    rows, how = load(name, folder)
    seeds = sorted(rows["seed"].unique()) if "seed" in rows else []
    samples = sorted(rows["samples"].unique()) if "samples" in rows else []
    attempts = sorted(rows["attempts"].unique()) if "attempts" in rows else []
    counts = (f"{len(seeds)} seed{'s' * (len(seeds) != 1)} ({', '.join(map(str, seeds))})" if seeds else "") + \
        (f", {', '.join(map(str, samples))} judged images per prompt set and seed" if samples else "") + \
        (f", {', '.join(map(str, attempts))} attempts per model, attack and seed" if attempts else "")
    spread = "mean ± 95% Student-t interval over seeds" if len(seeds) != 1 else "one seed, so no interval over seeds" + \
        (" (an attack's cell: its rate [the 95% Wilson interval of its attempts])" if attempts else "")
    return f"{_provenance(name, how)} {counts}; {spread}.\n\n{RENDERERS[name](rows)}\n"


def _provenance(name: str, how: dict) -> str:
    """Where an artefact comes from: its file, date, commit, machine, wall time and command (per part)."""
    def measured(how: dict, path: str) -> str:
        return (f"[`docs/results/{path}`](results/{path}) ({how['date']}, git `{(how['commit'] or 'unknown')[:7]}`, "
                f"{costs.machine_label(how['machine'])}, {how['wall_seconds'] / 60:.0f} min): `{how['command']}`")

    if "parts" not in how:
        return f"Artefact {measured(how, f'{name}.csv')}."
    count = len(how["parts"])
    return f"Artefact `{name}` in {count} part{'s' * (count != 1)}: " + "; ".join(
        measured(part, f"{name}/{part['part']}.csv") for part in how["parts"]) + "."


def sync(journal: Path = JOURNAL, folder: Path = ARTEFACTS, check: bool = False) -> list[str]:
    """Rewrite the artefact blocks of `journal` from `folder` (or with `check`, leave it as it is); returns the
    names of the blocks that differed. A block naming an artefact that does not exist is an error."""
    text = journal.read_text(encoding="utf-8")
    differing = []

    def block(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS or name not in names(folder):
            raise FileNotFoundError(f"{journal}: a block names artefact {name!r}, which {folder} does not hold "
                                    f"(known: {', '.join(RENDERERS)}).")
        body = render(name, folder)
        if body != match["body"]:
            differing.append(name)
        return match.group(1) + body + match.group(4)

    updated = BLOCK.sub(block, text)
    if not check and updated != text:
        atomic_write_text(updated, journal)
    return differing
