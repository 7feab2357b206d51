"""Toy-world benchmarks, measured side by side in one run and reported as ratios (machines are noisy):

- per-iteration time of DoCo (each preset and retain mode; with the option variants, and with L_u and L_r
  in separate UNet passes instead of the joint one), ESD-x, ConAbl and RGD against a plain diffusion
  fine-tuning step of the same trainable parameters and batch (interleaved rounds, medians);
- the peak memory each variant adds (its trainer, optimizer states, frozen copies, activations), each in a
  process of its own: resident set on a CPU (Linux), allocated tensors on a GPU;
- the concept-preserving gradient alone, as a fraction of a DoCo (cp) iteration, global and per tensor;
- anchor-data generation throughput, and evaluation throughput on a first pass against a second pass
  over the same models (which reads the image cache).
Results go to benchmarks/results/<device>-<date>.json and .md, with the environment recorded.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from doco_lib.anchors import prepare_anchor_latents
from doco_lib.concepts import ConceptSpec
from doco_lib.config import SCHEMA
from doco_lib.methods.baselines import ConAblTrainer, EsdTrainer, RgdTrainer
from doco_lib.methods.harness import FIDELITY_PRESETS, DocoTrainer, TrainingConfig, select_trainable
from doco_lib.methods.surgery import concept_preserving_gradient
from doco_lib.models import load_pipeline

RESULTS = Path(__file__).resolve().parent / "results"
TOY_PROMPTS = ["a photo of a pentagon", "a red pentagon on a striped background", "a pentagon in dotted style"]


def make_trainer(pipe, anchors, work: Path, name: str, trainer_class=DocoTrainer, **settings):
    values = dict(FIDELITY_PRESETS[settings.pop("fidelity", "paper")])
    values.update(disc_layers=3, iterations=10**6, warmup_iterations=0, batch_size=8, lr=1e-4, disc_lr=1e-4,
                  checkpoint_every=10**6, esd_steps=25, **settings)
    config = TrainingConfig(**{k: v for k, v in values.items() if k in TrainingConfig.__dataclass_fields__})
    extra = {"forget": anchors} if trainer_class is RgdTrainer else {}  # timing only: any paired cache will do
    # Each trainer fine-tunes its own copy of the UNet (trainers set requires_grad on the UNet they get).
    own = SimpleNamespace(unet=copy.deepcopy(pipe.unet), scheduler=pipe.scheduler, tokenizer=pipe.tokenizer,
                          text_encoder=pipe.text_encoder)
    return trainer_class(own, anchors, ConceptSpec("instance", "pentagon", "star"), config, work / name,
                         pipe.device, **extra)


def _slug(text: str) -> str:
    return text.replace(" ", "_")


def reference_step(trainer: DocoTrainer):
    """Plain diffusion fine-tuning of the same parameters on the same batch size."""
    optimizer = torch.optim.Adam(trainer.params.values(), lr=1e-4)

    def step():
        x_t, t, noise, c, _ = trainer._batch(trainer._sample_index(), trainer.generator)
        loss = F.mse_loss(trainer.unet(x_t, t, encoder_hidden_states=c).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def time_variants(variants: dict, rounds: int, steps: int, warmup: int) -> dict[str, float]:
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure_throughput(pipe, work: Path) -> dict[str, float]:
    """Anchor generation (images/s, 25 steps) and evaluation: first pass vs second (cached) pass."""
    from doco_lib.evaluation.runner import EvaluatedModel, evaluate
    from doco_lib.models import load_judge, toy_weights_dir

    start = time.perf_counter()
    prepare_anchor_latents(pipe, TOY_PROMPTS, 64, work / "throughput_anchors", model="toy", seed=1, steps=25,
                           guidance=5.0, shard_size=32, save_images=False, progress=False)
    generation = 64 / (time.perf_counter() - start)
    models = [EvaluatedModel("base"), EvaluatedModel("same UNet", str(toy_weights_dir() / "pipeline" / "unet"))]
    per_template = SCHEMA["images_per_template"].default  # notebook 04's default evaluation size
    passes = []
    for _ in range(2):
        _, timing = evaluate("toy", models, ["star", "circle"], cache_dir=work / "eval_cache",
                             clip_model=str(toy_weights_dir() / "eval_clip"), template_set="toy", n_templates=0,
                             images_per_template=per_template, steps=25, device=str(pipe.device),
                             fid_features="judge", judge=load_judge(str(pipe.device)))
        passes.append(timing["seconds"])
    images = 2 * 2 * 7 * per_template
    return {"anchor generation (images/s)": generation, "evaluation first pass (images/s)": images / passes[0],
            "evaluation second pass (images/s)": images / passes[1],
            "evaluation speed-up from the cache (×)": passes[0] / passes[1]}


def variant_factories() -> dict:
    """Variant name → a function (pipe, anchors, work) → one training step of that variant, with its own trainer."""
    def doco(fidelity, mode, joint=True, **option):
        def build(pipe, anchors, work):
            trainer = make_trainer(pipe, anchors, work, "_".join([fidelity, mode, *option, "joint" if joint else "separate"]),
                                   fidelity=fidelity, retain_mode=mode, **option)
            if not joint:
                trainer.joint = None  # L_u and L_r in a UNet pass each, as before the joint pass
            return trainer.train_step
        return build

    def baseline(trainer_class, **settings):
        return lambda pipe, anchors, work: make_trainer(pipe, anchors, work, settings["method"], trainer_class,
                                                        **settings).train_step

    factories = {"reference (diffusion fine-tuning)": lambda pipe, anchors, work: reference_step(
        make_trainer(pipe, anchors, work, "reference", fidelity="paper", retain_mode="none"))}
    factories.update({f"doco {fidelity} {mode}": doco(fidelity, mode)
                      for fidelity in ("paper", "official") for mode in ("none", "l2", "cp")})
    for label, option in (("adam_fused", dict(optimizer="adam_fused")), ("classic attention", dict(attention="classic")),
                          ("gradient checkpointing", dict(gradient_checkpointing=True))):
        factories[f"doco official cp + {label}"] = doco("official", "cp", **option)
    factories["doco official cp, separate passes"] = doco("official", "cp", joint=False)
    factories["esd-x"] = baseline(EsdTrainer, method="esd", trainable="cross_attention")
    factories["conabl"] = baseline(ConAblTrainer, method="conabl")
    factories["rgd (cross_attention_kv)"] = baseline(RgdTrainer, method="rgd")
    return factories


def _anchors(pipe, work: Path):
    return prepare_anchor_latents(pipe, TOY_PROMPTS, 64, work / "anchors", model="toy", seed=0, steps=5, guidance=5.0,
                                  shard_size=32, save_images=False, progress=False)


def _status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak(device: str) -> int:
    """Start a fresh peak; returns the memory in use now."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets the resident-set high-water mark (VmHWM)
    return _status_bytes("VmRSS")


def _peak_bytes(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else _status_bytes("VmHWM")


def peak_memory_of(name: str, device: str, steps: int = 5) -> float:
    """MiB that one variant adds to the process's peak memory (its trainer, optimizer states, frozen copies and
    activations over a few steps): resident set on a CPU, allocated tensors on a GPU. Run in a fresh process."""
    pipe = load_pipeline("toy", device)
    with tempfile.TemporaryDirectory() as tmp:
        anchors = _anchors(pipe, Path(tmp))
        gc.collect()
        before = _reset_peak(device)
        step = variant_factories()[name](pipe, anchors, Path(tmp))
        for _ in range(steps):
            step()
        return (_peak_bytes(device) - before) / 2**20


def measure_memory(names: list[str], device: str) -> dict[str, float]:
    """`peak_memory_of` for each variant, each in a subprocess of its own (a peak cannot be reset in-process
    on a CPU)."""
    memory = {}
    for name in names:
        out = subprocess.run([sys.executable, "-m", "benchmarks.step_time", "--peak-memory-of", name, "--device",
                              device], capture_output=True, text=True, check=True).stdout
        memory[name] = float(out.strip().splitlines()[-1])
    return memory


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-memory-of", metavar="VARIANT", help=argparse.SUPPRESS)  # the child of measure_memory
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.peak_memory_of:
        print(peak_memory_of(args.peak_memory_of, args.device))
        return {}
    pipe = load_pipeline("toy", args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        anchors = _anchors(pipe, work)
        variants = {name: build(pipe, anchors, work) for name, build in variant_factories().items()}
        params = list(select_trainable(pipe.unet, "cross_attention_kv").values())
        grads_u = [torch.randn_like(p) for p in params]
        grads_r = [torch.randn_like(p) for p in params]
        for scope in ("global", "per_tensor"):
            variants[f"surgery alone ({scope})"] = (
                lambda scope=scope: concept_preserving_gradient(grads_u, grads_r, 1.0, scope, "exact"))
        seconds = time_variants(variants, args.rounds, args.steps, warmup=3)
        throughput = measure_throughput(pipe, work)
    memory = measure_memory(list(variant_factories()), args.device)

    reference = seconds["reference (diffusion fine-tuning)"]
    rows = [{"variant": name, "seconds_per_step": s, "ratio_to_reference": s / reference,
             "peak_memory_mib": memory.get(name)} for name, s in seconds.items()]
    for row in rows:
        if row["variant"].startswith("surgery alone"):
            row["fraction_of_doco_cp_step"] = row["seconds_per_step"] / seconds["doco paper cp"]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {"benchmark": "step_time", "world": "toy", "date": date.today().isoformat(), "device": args.device,
              "device_name": device_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "diffusers": __import__("diffusers").__version__, "dtype": "float32", "batch_size": 8,
              "trainable": "cross_attention_kv", "rounds": args.rounds, "steps_per_round": args.steps, "rows": rows,
              "throughput": throughput}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{args.device.replace(':', '')}-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Step time, toy world, {args.device} ({device_name}), {result['date']}", "",
             "| variant | s/step | × reference | peak memory added (MiB) |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['seconds_per_step']:.4f} | {r['ratio_to_reference']:.2f} | "
              + ("" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.1f}") + " |" for r in rows]
    lines += ["", "| throughput | value |", "|---|---|"] + [f"| {k} | {v:.3g} |" for k, v in throughput.items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
