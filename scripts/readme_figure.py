"""The README's figure: the original toy model and an erased one on the same prompts and seeds (`make readme-figure`).

Loads the toy pipeline twice, once as shipped and once with the erased UNet (default: the one `make demo` exports,
outputs/toy_world/doco/unet), samples every prompt with the same seeds from both (`doco_lib.sampling.generate`:
image i starts from the noise of its own seed in both models), and saves a labelled grid, original on the left
and erased on the right, to docs/figures/erasure.png. The default prompts are the demo's target (star), its
synonym that training never sees (pentagram), its anchor (pentagon) and a shape it should leave alone (heart).
Runs on the CPU by default, so the same UNet gives the same PNG bit for bit: about 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from doco_lib.figures import image_grid
from doco_lib.io import atomic_write_bytes
from doco_lib.models import load_pipeline
from doco_lib.sampling import generate

DEMO_UNET = "outputs/toy_world/doco/unet"
PROMPTS = ["a photo of a star", "a photo of a pentagram", "a photo of a pentagon", "a photo of a heart"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", default=DEMO_UNET, help=f"erased UNet folder (default: {DEMO_UNET}, from make demo)")
    parser.add_argument("--model", default="toy", help="base pipeline the UNet was erased from (default: toy)")
    parser.add_argument("--prompt", action="append", dest="prompts", help="a row of the grid; repeatable "
                        "(default: star, pentagram, pentagon, heart)")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt and model, seeds 0..N-1 (default: 4)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default: 25, as the demo)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (default: 5, as the demo)")
    parser.add_argument("--device", default="cpu", help="default cpu: GPU sampling runs under float16 autocast")
    parser.add_argument("--out", default="docs/figures/erasure.png", help="PNG to write (default: %(default)s)")
    return parser.parse_args(argv)


def sample(model: str, unet: str | None, prompts: list[str], n_seeds: int, steps: int, guidance: float,
           device: str) -> torch.Tensor:
    """(len(prompts) · n_seeds, 3, H, W): each prompt with seeds 0..n_seeds-1, prompt by prompt."""
    pipe = load_pipeline(model, device, unet=unet)
    shown = [p for p in prompts for _ in range(n_seeds)]
    seeds = [s for _ in prompts for s in range(n_seeds)]
    return generate(pipe, shown, seeds, steps, guidance)


def comparison_figure(original: torch.Tensor, erased: torch.Tensor, prompts: list[str], n_seeds: int, title: str):
    """Two grids side by side (rows: prompts, columns: seeds), original left and erased right, the prompts written
    left of each row; a matplotlib figure."""
    scale = max(1, 96 // original.shape[-1])
    grids = [image_grid(images, n_seeds, scale=scale) for images in (original, erased)]
    width, height = grids[0].size
    dpi = 100
    fig, axes = plt.subplots(1, 2, figsize=(2 * width / dpi + 2.2, height / dpi + 0.7), dpi=dpi)
    for ax, grid, name in zip(axes, grids, ("original", "erased")):
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(name, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
    row = height / len(prompts)
    axes[0].set_yticks([row * (i + 0.5) for i in range(len(prompts))], [f'"{p}"' for p in prompts], fontsize=9)
    axes[0].tick_params(length=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    plt.close(fig)
    return buffer.getvalue()


def erasure_label(unet: Path) -> str:
    """What the UNet erased, from the erasure.json its export wrote beside it (e.g. "doco: star → pentagon")."""
    record = unet.parent / "erasure.json"
    if not record.is_file():
        return f"erased UNet {unet.name}"
    meta = json.loads(record.read_text(encoding="utf-8"))
    return f"{meta['method']}: {meta['target']} → {meta['anchor']}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = args.prompts or PROMPTS
    unet = Path(args.unet)
    if not (unet / "config.json").is_file():
        print(f"readme_figure: error: {unet} is not an exported UNet folder (no config.json): run `make demo`, "
              "or pass --unet <run>/doco/unet", file=sys.stderr)
        return 2
    original = sample(args.model, None, prompts, args.seeds, args.steps, args.guidance, args.device)
    erased = sample(args.model, str(unet), prompts, args.seeds, args.steps, args.guidance, args.device)
    title = f"{erasure_label(unet)}; the same seeds (0-{args.seeds - 1}) in both models"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(png_bytes(comparison_figure(original, erased, prompts, args.seeds, title)), out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
