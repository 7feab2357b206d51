"""DoCo on a Stable-Diffusion-v1.4-sized UNet: seconds per iteration and peak GPU memory per option.

`python -m benchmarks.sd_unet` (on a GPU) builds `UNet2DConditionModel` from the SD v1.4 configuration with
random weights (no download), a CLIP-ViT-L-sized text encoder, and random 64×64×4 anchor latents, then times
one configuration per subprocess (clean memory statistics, one accelerate state each):

- the reference: a plain diffusion fine-tuning step of the same parameters and batch;
- DoCo (official preset, cp) in fp32, then with the memory options added one at a time and all together:
  bf16 mixed precision, gradient checkpointing, 8-bit Adam, the frozen UNet in fp16, full-UNet training.

Results (s/iteration, peak memory, an estimate of the paper's 1000 iterations) go to
benchmarks/results/<device>-<date>-sd_unet.{json,md}. `--tiny` runs the same code on a small UNet (CPU
smoke run of the script itself; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
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

RESULTS = Path(__file__).resolve().parent / "results"

SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408)
TINY_UNET = dict(SD14_UNET, sample_size=16, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32,
                 attention_head_dim=2, layers_per_block=1)
TINY_TEXT = dict(SD14_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

BASE = dict(method="doco", retain_mode="cp", batch_size=8, iterations=10**6, warmup_iterations=0, lr=4e-6,
            disc_lr=1e-4, checkpoint_every=10**6, trainable="cross_attention_kv", frozen_dtype="float32")
CONFIGURATIONS = {
    "reference (diffusion fine-tuning), fp32": dict(reference=True, disc_real_source="trained"),  # no frozen copy
    "DoCo official cp, fp32": {},
    "+ bf16 mixed precision": dict(mixed_precision="bf16"),
    "+ gradient checkpointing": dict(gradient_checkpointing=True),
    "+ 8-bit Adam": dict(optimizer="adam_8bit"),
    "+ frozen UNet fp16": dict(frozen_dtype="float16"),
    "+ shared original (no frozen copy)": dict(frozen_dtype="shared"),
    "bf16 + checkpointing + frozen fp16": dict(mixed_precision="bf16", gradient_checkpointing=True,
                                              frozen_dtype="float16"),
    "full UNet, fp32": dict(trainable="full"),
    "full UNet, bf16 + checkpointing + 8-bit Adam + frozen fp16": dict(
        trainable="full", mixed_precision="bf16", gradient_checkpointing=True, optimizer="adam_8bit",
        frozen_dtype="float16"),
}


def _pipe(tiny: bool, device: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from doco_lib.models import load_pipeline

    torch.manual_seed(0)
    tokenizer = load_pipeline("toy", "cpu").tokenizer  # the real CLIP BPE vocabulary
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD14_UNET)).to(device)
    text_encoder = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if tiny else SD14_TEXT))).to(device)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000)
    return SimpleNamespace(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                           device=torch.device(device))


def measure(name: str, tiny: bool, device: str, steps: int, warmup: int) -> dict:
    """Build one trainer for configuration `name` and time `steps` iterations after `warmup`."""
    import torch.nn.functional as F

    from doco_lib.anchors import AnchorLatents
    from doco_lib.concepts import ConceptSpec
    from doco_lib.methods.harness import FIDELITY_PRESETS, DocoTrainer, TrainingConfig

    options = dict(CONFIGURATIONS[name])
    reference = options.pop("reference", False)
    pipe = _pipe(tiny, device)
    size = pipe.unet.config.sample_size
    n = 64
    anchors = AnchorLatents(torch.randn(n, 4, size, size), torch.full((n, 4, size, size), 0.1),
                            [f"a photo of a dog, number {i % 8}" for i in range(n)], list(range(n)), 0.18215)
    values = {**FIDELITY_PRESETS["official"], **BASE, "disc_layers": 3 if tiny else 5, **options}
    config = TrainingConfig(**{k: v for k, v in values.items() if k in TrainingConfig.__dataclass_fields__})
    with tempfile.TemporaryDirectory() as work:
        trainer = DocoTrainer(pipe, anchors, ConceptSpec("instance", "dog", "Snoopy"), config, Path(work), device)
        if reference:
            optimizer = trainer.opt_g

            def step():
                x_t, t, noise, c, _ = trainer._batch(trainer._sample_index(), trainer.generator)
                with trainer.accelerator.autocast():
                    loss = F.mse_loss(trainer.unet(x_t, t, encoder_hidden_states=c).sample.float(), noise)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            step = trainer.train_step
        cuda = device.startswith("cuda")
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        trainable = sum(p.numel() for p in trainer.params.values())
    seconds = statistics.median(times)
    return {"configuration": name, "seconds_per_iteration": seconds, "peak_memory_gib": peak,
            "trainable_parameters": trainable, "estimated_1000_iterations_min": 1000 * seconds / 60}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small UNet: checks the script, not performance")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", help="one configuration, printed as JSON (used by the parent process)")
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    args = parser.parse_args(argv)
    if args.only:
        print(json.dumps(measure(args.only, args.tiny, args.device, args.steps, args.warmup)))
        return {}
    rows = []
    for name in args.configurations:
        command = [sys.executable, "-m", "benchmarks.sd_unet", "--only", name, "--device", args.device,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:  # e.g. out of memory, or bitsandbytes missing: recorded, not fatal
            rows.append({"configuration": name, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {"benchmark": "sd_unet", "tiny": args.tiny, "date": date.today().isoformat(), "device": args.device,
              "device_name": device_name, "torch": torch.__version__,
              "diffusers": __import__("diffusers").__version__, "batch_size": BASE["batch_size"], "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{args.device.replace(':', '')}-{result['date']}-sd_unet{'-tiny' if args.tiny else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# DoCo on an SD v1.4-sized UNet, {device_name}, {result['date']}" + (" (tiny smoke run)" if args.tiny
                                                                                    else ""), "",
             "| configuration | s/iteration | peak memory (GiB) | 1000 iterations (min) |", "|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['configuration']} | failed: {' '.join(row['error'])} | | |")
        else:
            lines.append(f"| {row['configuration']} | {row['seconds_per_iteration']:.3f} | "
                         f"{row['peak_memory_gib']:.1f} | {row['estimated_1000_iterations_min']:.1f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
