"""Erased models as weight deltas: load, apply, and build a pipeline with an erased UNet."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def read_delta_metadata(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


@torch.no_grad()
def apply_delta(unet, path: str | Path, scale: float = 1.0) -> None:
    """Add a saved weight delta (safetensors) to `unet` in place; every name must exist in the UNet."""
    delta = load_file(str(path))
    params = dict(unet.named_parameters())
    unknown = sorted(set(delta) - set(params))
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} tensors do not belong to this UNet (first: {unknown[0]!r}); "
                         "was the delta made for another base model?")
    for name, value in delta.items():
        params[name].add_(value.to(params[name].device, params[name].dtype), alpha=scale)


def erasure_info(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "erasure.json").read_text())
