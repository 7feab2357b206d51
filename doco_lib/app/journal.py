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
from doco_lib.evaluation.rating import mean_ci
from doco_lib.io import atomic_write_text

REPO = Path(__file__).resolve().parents[2]
ARTEFACTS = REPO / "docs" / "results"
JOURNAL = REPO / "docs" / "results.md"
BLOCK = re.compile(r"(<!-- artefact: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /artefact -->)", re.S)


def record(name: str, rows: pd.DataFrame, command: str, started: float, folder: Path = ARTEFACTS) -> None:
    """Write artefact `name`: `rows` as CSV and how they were measured (`started`: the study's time.time())."""
    folder.mkdir(parents=True, exist_ok=True)
    run = environment()
    changed = subprocess.run(["git", "status", "--porcelain", "--", "doco_lib", "params", "notebooks"], cwd=REPO,
                             capture_output=True, text=True).stdout.strip()
    provenance = {"name": name, "date": date.today().isoformat(), "commit": run["git_commit"],
                  "uncommitted_changes": changed.splitlines(), "command": command,
                  "machine": costs.machine(), "wall_seconds": round(time.time() - started, 1),
                  "python": run["python"], "packages": run["packages"]}
    atomic_write_text(rows.to_csv(index=False), folder / f"{name}.csv")
    atomic_write_text(json.dumps(provenance, indent=2) + "\n", folder / f"{name}.json")


def load(name: str, folder: Path = ARTEFACTS) -> tuple[pd.DataFrame, dict]:
    return pd.read_csv(folder / f"{name}.csv"), json.loads((folder / f"{name}.json").read_text())


def _cell(values: pd.Series) -> str:
    mean, half = mean_ci(values)
    return f"{mean:.1f} ± {half:.1f}"


def _rate_table(rows: pd.DataFrame, row_key: str, column_key: str, corner: str) -> str:
    """Judged rate (%) per value of `row_key` (rows) and `column_key` (columns): mean ± 95% Student-t half-width
    over seeds; `corner` heads the first column."""
    rows = rows.assign(percent=100 * rows["rate"])
    columns = list(dict.fromkeys(rows[column_key]))
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, group in rows.groupby(row_key, sort=False):
        cells = [_cell(group[group[column_key] == column]["percent"]) for column in columns]
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
    `none` first: before any attack): mean ± 95% Student-t half-width over seeds. Then each attack's cost per attempt,
    over every model and seed: wall seconds and UNet steps."""
    rows = rows.assign(percent=100 * rows["asr"],
                       label=[m if p == "target" else f"{m}, {p}" for m, p in zip(rows["method"], rows["prompts"])])
    attacks = list(dict.fromkeys(rows["attack"]))
    lines = ["| model | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
    for label, group in rows.groupby("label", sort=False):
        cells = [_cell(group[group.attack == attack]["percent"]) if (group.attack == attack).any() else "–"
                 for attack in attacks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| attack | seconds per attempt | UNet steps per attempt |", "|---|---|---|"]
    for attack, group in rows.groupby("attack", sort=False):
        attempts = group["attempts"].sum()
        lines.append(f"| {attack} | {group['seconds'].sum() / attempts:.1f} | {group['steps'].sum() / attempts:,.0f} |")
    return "\n".join(lines)


RENDERERS: dict[str, Callable[[pd.DataFrame], str]] = {"retain_modes": retain_modes_table,
                                                       "lora_export": lora_export_table,
                                                       "toy_world": toy_world_table, "sepme": sepme_table,
                                                       "attacks": attacks_table}


def render(name: str, folder: Path = ARTEFACTS) -> str:
    """The block of artefact `name`: where it comes from, then its table."""
    rows, how = load(name, folder)
    seeds = sorted(rows["seed"].unique()) if "seed" in rows else []
    samples = sorted(rows["samples"].unique()) if "samples" in rows else []
    attempts = sorted(rows["attempts"].unique()) if "attempts" in rows else []
    counts = (f"{len(seeds)} seeds ({', '.join(map(str, seeds))})" if seeds else "") + \
        (f", {', '.join(map(str, samples))} judged images per prompt set and seed" if samples else "") + \
        (f", {', '.join(map(str, attempts))} attempts per model, attack and seed" if attempts else "")
    return (f"Artefact [`docs/results/{name}.csv`](results/{name}.csv) ({how['date']}, git "
            f"`{(how['commit'] or 'unknown')[:7]}`, {costs.machine_label(how['machine'])}, "
            f"{how['wall_seconds'] / 60:.0f} min): `{how['command']}`. {counts}; mean ± 95% Student-t interval "
            f"over seeds.\n\n{RENDERERS[name](rows)}\n")


def sync(journal: Path = JOURNAL, folder: Path = ARTEFACTS, check: bool = False) -> list[str]:
    """Rewrite the artefact blocks of `journal` from `folder` (or with `check`, leave it as it is); returns the
    names of the blocks that differed. A block naming an artefact that does not exist is an error."""
    text = journal.read_text(encoding="utf-8")
    differing = []

    def block(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS or not (folder / f"{name}.csv").is_file():
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
