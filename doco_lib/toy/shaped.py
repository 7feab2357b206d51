"""Every shaped random pipeline by name (`sd_shaped`: SD v1.4, 2.1, SDXL and CLIP ViT-L; `flow_shaped`: SD 3.5
medium, FLUX.1-dev and -schnell), and the command that installs them into a Hugging Face cache under their hub ids:
`python -m doco_lib.toy.shaped sd35 flux-dev --hub-cache DIR [--size full --device cuda]`, then run with
`HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1`."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from doco_lib.toy import flow_shaped, sd_shaped


def shaped_families() -> dict:
    """Every shaped family: name → (hub id, `build(folder, size=, seed=, device=)`)."""

    def flux(variant):
        return lambda folder, **kw: flow_shaped.build_flux_pipeline(folder, variant=variant, **kw)

    return {"sd14": (sd_shaped.SD14_ID, sd_shaped.build_sd14_pipeline),
            "sd21": (sd_shaped.SD21_ID, sd_shaped.build_sd21_pipeline),
            "sdxl": (sd_shaped.SDXL_ID, sd_shaped.build_sdxl_pipeline),
            "clip-l": (sd_shaped.CLIP_L_ID, sd_shaped.build_clip_model),
            "sd35": (flow_shaped.SD35_ID, flow_shaped.build_sd35_pipeline),
            "flux-dev": (flow_shaped.FLUX_DEV_ID, flux("dev")),
            "flux-schnell": (flow_shaped.FLUX_SCHNELL_ID, flux("schnell"))}


def install_shaped(family: str, cache_dir: Path, size: str = "tiny", seed: int = 0, device: str = "cpu") -> Path:
    """Build the shaped `family` (a name of `shaped_families`) and install it in the Hugging Face cache `cache_dir`
    under its real hub id; returns the snapshot folder."""
    families = shaped_families()
    if family not in families:
        raise ValueError(f"family {family!r} is none of {', '.join(families)}")
    repo_id, build = families[family]
    with tempfile.TemporaryDirectory() as work:
        folder = build(Path(work) / family, size=size, seed=seed, device=device)
        return sd_shaped.install_in_hub_cache(folder, repo_id, cache_dir)


def main(argv: list[str] | None = None) -> int:
    """Install shaped random pipelines in a Hugging Face cache under their hub ids.

    `python -m doco_lib.toy.shaped FAMILY… --hub-cache DIR`, for runs with `HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1`."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("families", nargs="+", choices=list(shaped_families()), metavar="FAMILY",
                        help=f"one or more of {', '.join(shaped_families())}")
    parser.add_argument("--hub-cache", type=Path, required=True, help="the Hugging Face cache folder (HF_HUB_CACHE)")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the weights are initialised (a GPU: seconds for full)")
    args = parser.parse_args(argv)
    for family in args.families:
        snapshot = install_shaped(family, args.hub_cache, args.size, args.seed, args.device)
        print(f"{family}: {shaped_families()[family][0]} → {snapshot}")
    print(f"use with HF_HUB_CACHE={args.hub_cache} HF_HUB_OFFLINE=1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
