"""Cost records (`doco_lib.costs`) of run folders collected into tables.

`phase_table`: every record of one run folder, a row per phase (`doco report`). `training_records` and
`efficiency_table`: the training cost of each run of a method comparison (notebook 05), then one row per
variant, UnlearnCanvas's columns (time, memory, storage) with the parameters trained and changed, as
mean ± half-width of the 95% Student-t interval over seeds (a single value where all seeds agree).
Peak memory is the GPU's `max_memory_allocated` for runs on a GPU, else the process's peak resident set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from doco_lib.costs import MB, machine_label
from doco_lib.errors import CorruptFileError
from doco_lib.evaluation.rating import mean_ci

RECORD = Path("costs") / "training.json"  # a trainer folder's record, next to its `unet/`


def read_record(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"{path}: not a cost record (JSON expected: {error}); delete it, the next run of "
                               "its phase writes it again.") from None
    if not isinstance(record, dict) or "phase" not in record:
        raise CorruptFileError(f"{path}: not a cost record (a JSON object with a 'phase' expected).")
    return record


def read_records(run_dir: Path) -> list[dict]:
    """The cost records of a run folder: its phases (`costs/*.json`), then each method folder's training
    (`*/costs/*.json`), each with `path` relative to the folder."""
    run_dir = Path(run_dir)
    paths = sorted(run_dir.glob("costs/*.json")) + sorted(run_dir.glob("*/costs/*.json"))
    return [{**read_record(path), "path": str(path.relative_to(run_dir))} for path in paths]


def _peak_mb(record: dict) -> tuple[float | None, str]:
    """The record's peak memory in MB and what it is: GPU allocated where measured, else CPU resident set."""
    if record.get("peak_gpu_bytes") is not None:
        return record["peak_gpu_bytes"] / MB, "GPU allocated"
    if record.get("peak_rss_bytes") is not None:
        scope = "" if record.get("peak_rss_scope", "phase") == "phase" else " (process lifetime)"
        return record["peak_rss_bytes"] / MB, "CPU resident" + scope
    return None, ""


def _stored_mb(record: dict, name: str) -> float | None:
    stored = record.get("stored_bytes", {})
    return stored[name] / MB if name in stored else None


PHASE_COLUMNS = ["phase", "method", "seconds", "peak memory (MB)", "memory", "trainable params", "changed params",
                 "stored UNet (MB)", "stored delta (MB)", "machine", "record"]


def phase_table(run_dir: Path) -> pd.DataFrame:
    """One row per cost record of `run_dir` (see `read_records`)."""
    rows = []
    for record in read_records(run_dir):
        peak, kind = _peak_mb(record)
        rows.append({"phase": record["phase"], "method": record.get("method", ""), "seconds": record.get("seconds"),
                     "peak memory (MB)": peak, "memory": kind,
                     "trainable params": record.get("trainable_params"), "changed params": record.get("changed_params"),
                     "stored UNet (MB)": _stored_mb(record, "unet"), "stored delta (MB)": _stored_mb(record, "delta"),
                     "machine": machine_label(record["machine"]) if "machine" in record else "", "record": record["path"]})
    table = pd.DataFrame(rows, columns=PHASE_COLUMNS)
    return table.astype({"trainable params": "Int64", "changed params": "Int64"})


def phase_markdown(run_dir: Path) -> str:
    """`phase_table` as Markdown, blank where a phase has no such value ('' when there is no record)."""
    table = phase_table(run_dir)
    if table.empty:
        return ""
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=".1f")


TRAINING_COLUMNS = ["variant", "seed", "method", "seconds", "iterations", "peak memory (MB)", "memory",
                    "trainable params", "changed params", "stored delta (MB)", "stored UNet (MB)", "machine", "record"]


def training_records(runs: pd.DataFrame) -> pd.DataFrame:
    """The training cost of each run of a grid (`variant`, `seed`, `unet` columns, as `ablation.train_grid`
    returns): the record `costs/training.json` beside each UNet folder, one row per run that has one (SepME's
    is written by `ablation.train_sepme`). Time and peak memory are left blank (NaN) for a
    run some of whose iterations were not measured (resumed from a checkpoint older than cost records)."""
    rows = []
    for run in runs.to_dict("records"):
        path = Path(run["unet"]).parent / RECORD
        if not path.is_file():
            continue
        record = read_record(path)
        peak, kind = _peak_mb(record)
        complete = record["measured_iterations"] == record["iterations"]
        rows.append({"variant": run["variant"], "seed": run["seed"], "method": record["method"],
                     "seconds": record["seconds"] if complete else None, "iterations": record["iterations"],
                     "peak memory (MB)": peak if complete else None,
                     "memory": kind, "trainable params": record["trainable_params"],
                     "changed params": record["changed_params"], "stored delta (MB)": _stored_mb(record, "delta"),
                     "stored UNet (MB)": _stored_mb(record, "unet"), "machine": machine_label(record["machine"]),
                     "record": str(path)})
    return pd.DataFrame(rows, columns=TRAINING_COLUMNS)


def _summary(values: pd.Series, digits: int) -> str:
    """'mean ± half-width' over seeds, or the value where they all agree ('–' for none)."""
    values = values.dropna()
    if values.empty:
        return "–"
    if values.nunique() == 1:
        return f"{values.iloc[0]:,.{digits}f}"
    mean, half = mean_ci(values)
    return f"{mean:,.{digits}f} ± {half:,.{digits}f}"


EFFICIENCY_COLUMNS = {"time (s)": ("seconds", 1), "peak memory (MB)": ("peak memory (MB)", 0),
                      "trainable params": ("trainable params", 0), "changed params": ("changed params", 0),
                      "storage: delta (MB)": ("stored delta (MB)", 2), "storage: full UNet (MB)": ("stored UNet (MB)", 1)}


def efficiency_table(records: pd.DataFrame, by: str = "variant") -> pd.DataFrame:
    """One row per `by` (in order of appearance) from `training_records`: each EFFICIENCY_COLUMNS over its
    seeds, the number of seeds, what the memory is, and the machine(s)."""
    rows = []
    for name, group in records.groupby(by, sort=False):
        rows.append({by: name, **{column: _summary(group[source], digits)
                                  for column, (source, digits) in EFFICIENCY_COLUMNS.items()},
                     "seeds": len(group), "memory": "; ".join(group["memory"].unique()),
                     "machine": "; ".join(group["machine"].unique())})
    return pd.DataFrame(rows, columns=[by, *EFFICIENCY_COLUMNS, "seeds", "memory", "machine"]).set_index(by)
