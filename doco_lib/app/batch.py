"""Papermill batch runs, one concept per params file: `doco batch` and `doco run`.

Layout: `outputs/<run_id>/<concept>/NN_name.ipynb` (executed notebooks) next to each concept's
artefacts, and `outputs/<run_id>/manifest.json`, rewritten atomically after every notebook, with per
concept and notebook: status (pending / running / done / failed), times, the params hash, output paths,
and for a failure the exception and the cell. Rerunning the same command skips notebooks that are done
with the same params hash, reruns failed or changed ones, and lets training resume from its checkpoint.
One concept failing never stops the others. `write_report` (`doco report`, also run at the end of every
`doco batch`) gathers the statuses, durations, every concept's evaluation tables and its cost records
(`doco_lib.costs`) into `report.md`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import yaml

from doco_lib import config
from doco_lib.app.notebooks import REPO_ROOT, execute_notebook, notebook_path
from doco_lib.evaluation.costs_table import phase_markdown
from doco_lib.io import WRITE_LOCK_STALE_AFTER_S, atomic_save_json, atomic_write_text, exclusive_lock, run_lock

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "papermill")


def expand_params_files(inputs: list[str]) -> list[Path]:
    """Params files named directly, every *.yaml in a named folder, or a glob's matches; sorted, unique."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(path.glob("*.yaml"))
        elif any(ch in item for ch in "*?["):
            files += sorted(Path(match) for match in glob.glob(item))  # relative or absolute patterns
        else:
            files.append(path)
    if not files:
        raise config.ParamsError(f"no params files found in {inputs}")
    return list(dict.fromkeys(files))


def params_hash(resolved: dict, notebook: str) -> str:
    relevant = config.notebook_params(resolved, notebook)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"git_commit": commit, "packages": versions, "python": platform.python_version(),
            "host": platform.node()}


class Manifest:
    """`manifest.json` of a batch. Writes are atomic (never half a file) and serialised by a lock file, and
    a concept's entry is merged into the latest file, so parallel `doco run` processes can share it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = self._read()

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {"concepts": {}}

    def _locked(self):
        return exclusive_lock(self.path.with_suffix(".lock"), wait=True, stale_after=WRITE_LOCK_STALE_AFTER_S)

    def save(self) -> None:
        """Write the header and every concept this process holds, keeping other concepts' latest entries."""
        with self._locked():
            latest = self._read()
            latest.update({k: v for k, v in self.data.items() if k != "concepts"})
            latest["concepts"].update(self.data["concepts"])
            atomic_save_json(latest, self.path)
            self.data = latest

    def save_concept(self, name: str) -> None:
        with self._locked():
            latest = self._read()
            latest["concepts"][name] = self.data["concepts"][name]
            atomic_save_json(latest, self.path)

    def concept(self, name: str) -> dict:
        return self.data["concepts"].setdefault(name, {"notebooks": {}})


def _resolve(params_file: Path, run_id: str, output_root: Path, device: str | None,
             overrides: dict | None) -> dict:
    """The params file with the batch's overrides (`--set`, then `--device`), in the batch's folder."""
    values = {**(overrides or {}), "output_root": str(output_root / run_id), "run_name": params_file.stem}
    if device:
        values["device"] = device
    return config.load_params(params_file, values)


def run_concept(params_file: Path, run_id: str, output_root: Path, manifest: Manifest, notebooks=config.BATCH_NOTEBOOKS,
                force: bool = False, device: str | None = None, save=lambda: None, overrides: dict | None = None) -> bool:
    """Run one concept's notebooks in order, recording each in the manifest; returns success."""
    from papermill.exceptions import PapermillExecutionError

    name = params_file.stem
    entry = manifest.concept(name)
    entry.update(params_file=str(params_file))
    try:
        resolved = _resolve(params_file, run_id, output_root, device, overrides)
    except (config.ParamsError, OSError) as error:
        entry.update(status="failed", error=str(error))
        save()
        return False
    out_dir = config.run_dir(resolved)
    with run_lock(out_dir):
        config.write_resolved(resolved, out_dir)
        entry.update(status="running", error=None, output_dir=str(out_dir))
        save()
        for notebook in notebooks:
            record = entry["notebooks"].setdefault(notebook, {"status": "pending"})
            digest = params_hash(resolved, notebook)
            target = out_dir / f"{notebook}.ipynb"
            if not force and record.get("status") == "done" and record.get("params_hash") == digest and target.exists():
                continue
            record.update(status="running", started=time.time(), params_hash=digest, output=str(target), error=None,
                          cell=None)
            save()
            try:
                execute_notebook(notebook_path(notebook), target, config.notebook_params(resolved, notebook))
            except PapermillExecutionError as error:
                record.update(status="failed", ended=time.time(), error=f"{error.ename}: {error.evalue}",
                              cell=error.exec_count)
                record["duration_s"] = record["ended"] - record["started"]
                entry.update(status="failed", error=f"{notebook}: {error.ename}: {error.evalue}")
                save()
                return False
            record.update(status="done", ended=time.time())
            record["duration_s"] = record["ended"] - record["started"]
            save()
    entry["status"] = "done"
    save()
    return True


def run_batch(inputs: list[str], run_id: str, output_root: Path = Path("outputs"), jobs: int = 1,
              force: bool = False, device: str | None = None, notebooks=config.BATCH_NOTEBOOKS,
              overrides: dict | None = None) -> list[str]:
    """Run every concept; returns one line per failed concept (empty: all succeeded)."""
    files = expand_params_files(inputs)
    manifest = Manifest(Path(output_root) / run_id / "manifest.json")
    manifest.data.update(run_id=run_id, **environment(), device=device or "from params")
    for params_file in files:
        manifest.concept(params_file.stem).setdefault("status", "pending")
    manifest.save()
    if jobs <= 1:
        for params_file in files:
            run_concept(params_file, run_id, Path(output_root), manifest, notebooks, force, device,
                        lambda name=params_file.stem: manifest.save_concept(name), overrides)
    else:
        _run_parallel(files, run_id, Path(output_root), jobs, force, device, notebooks, overrides)
    write_report(manifest.path.parent)
    concepts = Manifest(manifest.path).data["concepts"]
    return [f"{name}: {entry.get('error')} (failed notebook: {_failed_output(entry)})"
            for name, entry in concepts.items() if name in {f.stem for f in files} and entry.get("status") != "done"]


def _failed_output(entry: dict) -> str:
    failed = [r.get("output") for r in entry.get("notebooks", {}).values() if r.get("status") == "failed"]
    return failed[0] if failed else "none ran (params file rejected)"


def _run_parallel(files, run_id, output_root, jobs, force, device, notebooks, overrides=None,
                  gpus: list[str] | None = None) -> None:
    """One `doco run` process per concept, at most `jobs` at once. Each process's output goes to
    `<run>/logs/<concept>.log`.

    With GPUs, every process gets one GPU to itself (CUDA_VISIBLE_DEVICES): it takes a free one from a pool and
    gives it back when it ends, so no two concepts share a GPU while another idles. Two trainings on one GPU would
    compete for its memory, so `jobs` is capped at the number of GPUs, with a warning. Without GPUs, `jobs`
    processes run at once. `gpus`: the ids to hand out (default: the GPUs this process sees)."""
    import queue

    import torch

    if gpus is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = torch.cuda.device_count()
        # Ids as the children must name them: under CUDA_VISIBLE_DEVICES=2,3 device 0 here is GPU 2.
        gpus = visible.split(",")[:count] if visible else [str(index) for index in range(count)]
    if gpus and jobs > len(gpus):
        print(f"doco: warning: --jobs {jobs} but {len(gpus)} GPU(s): running {len(gpus)} concepts at once, one per "
              "GPU", file=sys.stderr)
        jobs = len(gpus)
    free = queue.Queue()
    for gpu in gpus:
        free.put(gpu)
    logs = output_root / run_id / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def launch(params_file):
        env = dict(os.environ)
        gpu = free.get() if gpus else None  # never waits: at most len(gpus) launches run at once
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        command = [sys.executable, "-m", "doco_lib", "run", "--params", str(params_file), "--run-id", run_id,
                   "--output-root", str(output_root), "--notebooks", *notebooks] + (["--force"] if force else []) + \
                  (["--device", device] if device else []) + \
                  [arg for key, value in (overrides or {}).items() for arg in ("--set", f"{key}={json.dumps(value)}")]
        log = logs / f"{params_file.stem}.log"
        try:
            with open(log, "w") as handle:
                code = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        finally:
            if gpu is not None:
                free.put(gpu)  # its process has ended
        manifest = Manifest(output_root / run_id / "manifest.json")
        entry = manifest.concept(params_file.stem)
        if code != 0 and entry.get("status") != "failed":  # it died before it could record why
            entry.update(status="failed", error=f"`doco run` exited with code {code}; see {log}")
            manifest.save_concept(params_file.stem)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(launch, files))


# Tables the notebooks write into a concept's folder, in report order: (title, path inside the folder).
REPORT_TABLES = (
    ("CS / CA / FID (notebook 04)", "04_evaluation/results.md"),
    ("CS / CA / FID (`doco eval`)", "evaluation/results.md"),
    ("NudeNet detections on I2P prompts (notebook 04)", "04_evaluation/nudity_counts.csv"),
    ("Judged erasure, toy world (notebook 03)", "03_adversarial_training/erasure_judged.csv"),
)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"


def _table_markdown(path: Path) -> str:
    """A Markdown table file as written (caption included), or a CSV table rendered as Markdown."""
    if path.suffix == ".md":
        return path.read_text().strip()
    import pandas as pd

    return pd.read_csv(path).to_markdown(index=False, floatfmt=".3f")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_report(run_folder: Path) -> Path:
    """`<run_folder>/report.md`: the batch's environment, each concept's status and per-notebook durations from
    the manifest, then every table of `REPORT_TABLES` each concept has written, then each concept's cost records
    (`costs_table.phase_markdown`). Written atomically; concept
    folders are found next to the manifest, so a moved run folder still reports."""
    run_folder = Path(run_folder)
    manifest_path = run_folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{run_folder}: no manifest.json (expected the folder of a `doco batch` or `doco run` "
                                "run, outputs/<run_id>).")
    manifest = json.loads(manifest_path.read_text())
    concepts = manifest.get("concepts", {})
    notebooks = sorted({name for entry in concepts.values() for name in entry.get("notebooks", {})})  # NN_ order

    packages = ", ".join(f"{name} {version}" for name, version in manifest.get("packages", {}).items())
    lines = [f"# Batch `{manifest.get('run_id', run_folder.name)}`", "",
             f"Report of `{manifest_path}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}. Git commit "
             f"`{manifest.get('git_commit')}`, device {manifest.get('device')}, host {manifest.get('host')}, "
             f"Python {manifest.get('python')}; {packages}.", "",
             "## Status and durations", "",
             "| concept | status | " + " | ".join(notebooks) + " | total | failure |",
             "|---|---|" + "---|" * len(notebooks) + "---|---|"]
    for name, entry in concepts.items():
        records = entry.get("notebooks", {})
        finished = {nb: r for nb, r in records.items() if r.get("status") in ("done", "failed")}
        cells = [f"{finished[nb]['status']} {_duration(finished[nb].get('duration_s'))}" if nb in finished
                 else records.get(nb, {}).get("status", "–") for nb in notebooks]
        total = sum(r.get("duration_s") or 0.0 for r in finished.values())
        failure = ""
        if entry.get("status") == "failed":
            failed = [f"cell {r.get('cell')} of `{r.get('output')}`" for r in records.values()
                      if r.get("status") == "failed"]
            failure = f"{entry.get('error')}" + (f" ({failed[0]})" if failed else "")
        lines.append(f"| {name} | {entry.get('status', 'pending')} | " + " | ".join(cells) +
                     f" | {_duration(total)} | {_cell(failure)} |")
    if any(entry.get("status") == "running" for entry in concepts.values()):
        lines += ["", "'running' also marks a notebook whose batch was killed: rerun the same command to resume it."]

    lines += ["", "## Evaluation tables"]
    for name, entry in concepts.items():
        folder = run_folder / name
        lines += ["", f"### {name}", ""]
        resolved = folder / "resolved_params.yaml"
        if resolved.is_file():
            params = yaml.safe_load(resolved.read_text())
            lines += [f"{params['method']}: erase \"{params['target']}\" ({params['concept_kind']}), anchor "
                      f"\"{params['anchor']}\", model `{params['model']}`.", ""]
        found = [(title, folder / relative) for title, relative in REPORT_TABLES if (folder / relative).is_file()]
        if not found:
            lines.append(f"No evaluation tables yet (status: {entry.get('status', 'pending')}).")
        for title, path in found:
            lines += [f"**{title}** (`{path.relative_to(run_folder)}`)", "", _table_markdown(path), ""]

    lines += ["", "## Costs", "", "Per concept, every phase's cost record (`doco_lib.costs`): wall time, peak memory "
              "(GPU allocated, else the process's resident set), and for training (written by the harness at export; "
              "it spans notebook 02's warmup and notebook 03's adversarial phases) the parameters trained and "
              "changed and the bytes stored."]
    for name in concepts:
        lines += ["", f"### {name}", "", phase_markdown(run_folder / name) or "No cost records yet."]
    report = run_folder / "report.md"
    atomic_write_text("\n".join(lines).rstrip() + "\n", report)
    return report
