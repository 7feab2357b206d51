"""Papermill batch runs, one concept per params file: `doco batch` and `doco run`.

Layout: `outputs/<run_id>/<concept>/NN_name.ipynb` (executed notebooks) next to each concept's
artefacts, and `outputs/<run_id>/manifest.json`, rewritten atomically after every notebook, with per
concept and notebook: status (pending / running / done / failed), times, the params hash, output paths,
and for a failure the exception and the cell. Rerunning the same command skips notebooks that are done
with the same params hash, reruns failed or changed ones, and lets training resume from its checkpoint.
One concept failing never stops the others.
"""

from __future__ import annotations

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

from doco_lib import config
from doco_lib.io import atomic_save_json, run_lock
from doco_lib.notebooks import REPO_ROOT, notebook_path

BATCH_NOTEBOOKS = ("01_data_preparation", "02_discriminator_warmup", "03_adversarial_training", "04_evaluation")
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "papermill")


def expand_params_files(inputs: list[str]) -> list[Path]:
    """Params files named directly, every *.yaml in a named folder, or a glob's matches; sorted, unique."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(path.glob("*.yaml"))
        elif any(ch in item for ch in "*?["):
            files += sorted(Path().glob(item))
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
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def lock():
            with open(self.path.with_suffix(".lock"), "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                yield
        return lock()

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


def _resolve(params_file: Path, run_id: str, output_root: Path, device: str | None) -> dict:
    overrides = {"output_root": str(output_root / run_id), "run_name": params_file.stem}
    if device:
        overrides["device"] = device
    return config.load_params(params_file, overrides)


def run_concept(params_file: Path, run_id: str, output_root: Path, manifest: Manifest, notebooks=BATCH_NOTEBOOKS,
                force: bool = False, device: str | None = None, save=lambda: None) -> bool:
    """Run one concept's notebooks in order, recording each in the manifest; returns success."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    name = params_file.stem
    entry = manifest.concept(name)
    entry.update(params_file=str(params_file))
    try:
        resolved = _resolve(params_file, run_id, output_root, device)
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
                papermill.execute_notebook(str(notebook_path(notebook)), str(target),
                                           parameters=config.notebook_params(resolved, notebook), kernel_name="python3",
                                           cwd=os.getcwd(), progress_bar=False)
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
              force: bool = False, device: str | None = None, notebooks=BATCH_NOTEBOOKS) -> list[str]:
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
                        lambda name=params_file.stem: manifest.save_concept(name))
    else:
        _run_parallel(files, run_id, Path(output_root), jobs, force, device, notebooks)
    concepts = Manifest(manifest.path).data["concepts"]
    return [f"{name}: {entry.get('error')} (failed notebook: {_failed_output(entry)})"
            for name, entry in concepts.items() if name in {f.stem for f in files} and entry.get("status") != "done"]


def _failed_output(entry: dict) -> str:
    failed = [r.get("output") for r in entry.get("notebooks", {}).values() if r.get("status") == "failed"]
    return failed[0] if failed else "none ran (params file rejected)"


def _run_parallel(files, run_id, output_root, jobs, force, device, notebooks) -> None:
    """One `doco run` process per concept, at most `jobs` at once, each on its own GPU when there are GPUs."""
    import torch

    gpus = torch.cuda.device_count()

    def launch(slot_and_file):
        slot, params_file = slot_and_file
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
        command = [sys.executable, "-m", "doco_lib.cli", "run", "--params", str(params_file), "--run-id", run_id,
                   "--output-root", str(output_root), "--notebooks", *notebooks] + (["--force"] if force else []) + \
                  (["--device", device] if device else [])
        subprocess.run(command, env=env, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(launch, enumerate(files)))
