"""`doco batch --jobs 2` against `--jobs 1` on the same two toy concepts (`python -m benchmarks.batch_jobs`).

Both batches run the shipped toy params files (params/concepts/toy_star.yaml, toy_heart.yaml) with small
iteration counts, side by side in one invocation (with --rounds > 1 the order alternates), each into a fresh
run folder. Reported: wall time of each batch, their ratio, and the summed notebook time from the manifests
(with two concepts at once each notebook runs slower, but the batch ends sooner). Results go to
benchmarks/results/batch_jobs-<device>-<date>.json and .md. Takes a few minutes on a 2-core CPU, so it is
not part of `python -m benchmarks`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

from doco_lib.config import BATCH_NOTEBOOKS, read_params_file

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CONCEPTS = ("toy_star", "toy_heart")
SMALL = {"n_anchor_images": 16, "anchor_shard_size": 8, "num_inference_steps": 5, "iterations": 20,
         "warmup_iterations": 5, "checkpoint_every": 10, "batch_size": 4, "eval_samples": 4, "grid_columns": 4,
         "images_per_template": 2, "n_templates": 2}


def small_params_files(folder: Path, device: str) -> list[Path]:
    """The shipped toy concepts with SMALL overrides, written to `folder` under their own names."""
    files = []
    for name in CONCEPTS:
        values = read_params_file(REPO / "params" / "concepts" / f"{name}.yaml")
        values.update(SMALL, device=device)
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        files.append(path)
    return files


def timed_batch(files: list[Path], jobs: int, run_id: str, output_root: Path, notebooks: list[str],
                device: str) -> dict:
    command = [sys.executable, "-m", "doco_lib", "batch", *map(str, files), "--run-id", run_id,
               "--output-root", str(output_root), "--jobs", str(jobs), "--notebooks", *notebooks]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"batch --jobs {jobs} failed:\n{finished.stderr[-3000:]}")
    manifest = json.loads((output_root / run_id / "manifest.json").read_text())
    notebook_seconds = sum(record["duration_s"] for entry in manifest["concepts"].values()
                           for record in entry["notebooks"].values())
    return {"jobs": jobs, "run_id": run_id, "wall_s": wall, "notebook_s": notebook_seconds}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="pairs of batches; the order alternates")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--notebooks", nargs="+", default=list(BATCH_NOTEBOOKS[:3]),
                        help="notebooks per concept (04 adds a vocabulary ranking of about half a minute)")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = small_params_files(work, args.device)
        for round_ in range(args.rounds):
            for jobs in ((1, 2) if round_ % 2 == 0 else (2, 1)):
                runs.append(timed_batch(files, jobs, f"jobs{jobs}-r{round_}", work / "out", args.notebooks,
                                        args.device))
                print(runs[-1], flush=True)
    wall = {jobs: sum(r["wall_s"] for r in runs if r["jobs"] == jobs) / args.rounds for jobs in (1, 2)}
    result = {"benchmark": "batch_jobs", "world": "toy", "date": date.today().isoformat(), "device": args.device,
              "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "concepts": CONCEPTS,
              "settings": SMALL, "notebooks": args.notebooks, "rounds": args.rounds, "runs": runs,
              "mean_wall_s": wall, "speedup_jobs2_over_jobs1": wall[1] / wall[2]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"batch_jobs-{args.device.replace(':', '')}-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# `doco batch --jobs 1` vs `--jobs 2`, two toy concepts, {args.device}, {result['date']}", "",
             f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={result['omp_num_threads']}, load average before "
             f"{load_before[0]:.2f}; notebooks {', '.join(args.notebooks)}; settings {SMALL}.", "",
             "| run | jobs | wall (s) | summed notebook time (s) |", "|---|---|---|---|"]
    lines += [f"| {r['run_id']} | {r['jobs']} | {r['wall_s']:.1f} | {r['notebook_s']:.1f} |" for r in runs]
    lines += ["", f"Mean wall time: {wall[1]:.1f} s with --jobs 1, {wall[2]:.1f} s with --jobs 2: "
              f"**{result['speedup_jobs2_over_jobs1']:.2f}×** faster with two jobs."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
