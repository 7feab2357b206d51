"""Per-iteration time of DoCo against a plain diffusion fine-tuning step, measured side by side.

Machines are noisy, so variants are timed in interleaved rounds and reported as ratios of medians to
the reference step (same batch, same trainable parameters). Results go to
benchmarks/results/<device>-<date>.json and .md, with the environment recorded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from doco_lib.concepts import ConceptSpec
from doco_lib.data import prepare_anchor_latents
from doco_lib.pipeline import load_pipeline
from doco_lib.surgery import concept_preserving_gradient
from doco_lib.training import TrainingConfig, DocoTrainer, FIDELITY_PRESETS

RESULTS = Path(__file__).resolve().parent / "results"
TOY_PROMPTS = ["a photo of a pentagon", "a red pentagon on a striped background", "a pentagon in dotted style"]


def make_trainer(pipe, anchors, work: Path, name: str, **settings) -> DocoTrainer:
    values = dict(FIDELITY_PRESETS[settings.pop("fidelity", "paper")])
    values.update(disc_layers=3, iterations=10**6, warmup_iterations=0, batch_size=8, lr=1e-4, disc_lr=1e-4,
                  checkpoint_every=10**6, **settings)
    config = TrainingConfig(**{k: v for k, v in values.items() if k in TrainingConfig.__dataclass_fields__})
    return DocoTrainer(pipe, anchors, ConceptSpec("instance", "pentagon", "star"), config, work / name, pipe.device)


def reference_step(trainer: DocoTrainer):
    """Plain diffusion fine-tuning of the same parameters on the same batch size."""
    optimizer = torch.optim.Adam(trainer.params.values(), lr=1e-4)

    def step():
        index = trainer.train_index[torch.randint(0, len(trainer.train_index), (trainer.config.batch_size,),
                                                  generator=trainer.generator)]
        x_t, t, noise, c, _ = trainer._batch(index, trainer.generator)
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    pipe = load_pipeline("toy", args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        anchors = prepare_anchor_latents(pipe, TOY_PROMPTS, 64, work / "anchors", model="toy", seed=0, steps=5,
                                         guidance=5.0, shard_size=32, save_images=False, progress=False)
        trainers = {f"doco {fidelity} {mode}": make_trainer(pipe, anchors, work, f"{fidelity}_{mode}",
                                                            fidelity=fidelity, retain_mode=mode)
                    for fidelity in ("paper", "official") for mode in ("none", "l2", "cp")}
        variants = {"reference (diffusion fine-tuning)": reference_step(trainers["doco paper cp"])}
        variants.update({name: trainer.train_step for name, trainer in trainers.items()})
        grads_u = [torch.randn_like(p) for p in trainers["doco paper cp"].params.values()]
        grads_r = [torch.randn_like(p) for p in grads_u]
        for scope in ("global", "per_tensor"):
            variants[f"surgery alone ({scope})"] = (
                lambda scope=scope: concept_preserving_gradient(grads_u, grads_r, 1.0, scope, "exact"))
        seconds = time_variants(variants, args.rounds, args.steps, warmup=3)

    reference = seconds["reference (diffusion fine-tuning)"]
    rows = [{"variant": name, "seconds_per_step": s, "ratio_to_reference": s / reference} for name, s in seconds.items()]
    for row in rows:
        if row["variant"].startswith("surgery alone"):
            row["fraction_of_doco_cp_step"] = row["seconds_per_step"] / seconds["doco paper cp"]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {"benchmark": "step_time", "world": "toy", "date": date.today().isoformat(), "device": args.device,
              "device_name": device_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "diffusers": __import__("diffusers").__version__, "dtype": "float32", "batch_size": 8,
              "trainable": "cross_attention_kv", "rounds": args.rounds, "steps_per_round": args.steps, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{args.device.replace(':', '')}-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Step time, toy world, {args.device} ({device_name}), {result['date']}", "",
             "| variant | s/step | × reference |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['seconds_per_step']:.4f} | {r['ratio_to_reference']:.2f} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
