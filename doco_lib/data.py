"""Anchor data: images the *original* model generates for the anchor prompts, cached as VAE latents.

The paper generates 1000 images from 200 anchor prompts. Image i uses prompt i mod P and the noise of
seed `seed + i`, so every image is fixed by its index alone. Images are generated in shards; each shard's
latents (posterior mean and std of the VAE encoder) go to a safetensors file whose SHA-256 is recorded
in `manifest.json`. A rerun skips shards whose file matches its checksum and regenerates the rest, so a
killed run continues where it stopped and ends with the same cache; a corrupt shard is redone, never used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from doco_lib.io import atomic_save_json, atomic_write_bytes, remove_stale_temporaries
from doco_lib.sampling import generate

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class AnchorLatents:
    """The cache, loaded: latents are unscaled VAE posteriors; multiply samples by `scaling_factor`."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    scaling_factor: float

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def concatenate(cls, caches: list["AnchorLatents"]) -> "AnchorLatents":
        """One pool of several caches of the same model (multi-concept erasure)."""
        if len({c.scaling_factor for c in caches}) != 1:
            raise ValueError("caches of different VAEs (scaling factors differ) cannot be pooled")
        return cls(torch.cat([c.latent_mean for c in caches]), torch.cat([c.latent_std for c in caches]),
                   [p for c in caches for p in c.prompts], [s for c in caches for s in c.seeds],
                   caches[0].scaling_factor)

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents z0 for `index`, drawn from the cached posteriors (as SD training samples them)."""
        mean, std = self.latent_mean[index], self.latent_std[index]
        return (mean + std * torch.randn(mean.shape, generator=generator)) * self.scaling_factor


def cache_settings(model: str, prompts: list[str], n_images: int, seed: int, steps: int, guidance: float,
                   shard_size: int) -> dict:
    """What determines the cache's content; a change of any of these rebuilds it."""
    return {"model": model, "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "n_prompts": len(prompts), "n_images": n_images, "seed": seed, "steps": steps, "guidance": guidance,
            "shard_size": shard_size}


def _valid_shards(directory: Path, manifest: dict) -> set[int]:
    valid = set()
    for shard, checksum in manifest.get("shards", {}).items():
        path = directory / f"shard_{int(shard):05d}.safetensors"
        if path.is_file() and _sha256(path) == checksum:
            valid.add(int(shard))
    return valid


def prepare_anchor_latents(pipe, prompts: list[str], n_images: int, directory: Path, *, model: str, seed: int,
                           steps: int, guidance: float, shard_size: int = 32, save_images: bool = True,
                           progress: bool = True) -> AnchorLatents:
    """Generate (or finish generating) the anchor latent cache in `directory` and load it."""
    from tqdm.auto import tqdm

    from doco_lib.figures import to_pil

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)  # of a killed earlier run; a cache may be shared beyond one run's lock
    settings = cache_settings(model, prompts, n_images, seed, steps, guidance, shard_size)
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("settings") != settings:
        if manifest:
            print(f"{directory}: cache settings changed; regenerating all shards")
        manifest = {"settings": settings, "shards": {}, "images": [
            {"index": i, "prompt": prompts[i % len(prompts)], "seed": seed + i, "shard": i // shard_size}
            for i in range(n_images)]}
        atomic_save_json(manifest, manifest_path)
    done = _valid_shards(directory, manifest)
    n_shards = (n_images + shard_size - 1) // shard_size
    todo = [k for k in range(n_shards) if k not in done]
    vae = pipe.vae
    for shard in tqdm(todo, desc="anchor images", unit="shard", disable=not progress):
        entries = manifest["images"][shard * shard_size:(shard + 1) * shard_size]
        images = generate(pipe, [e["prompt"] for e in entries], [e["seed"] for e in entries], steps, guidance,
                          batch_size=shard_size)
        with torch.no_grad():
            posterior = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist
        path = directory / f"shard_{shard:05d}.safetensors"
        atomic_write_bytes(save({"latent_mean": posterior.mean.float().cpu().contiguous(),
                                 "latent_std": posterior.std.float().cpu().contiguous()}), path)
        if save_images:
            image_dir = directory / "images"
            image_dir.mkdir(exist_ok=True)
            for entry, image in zip(entries, images):
                to_pil(image).save(image_dir / f"{entry['index']:05d}.png")
        manifest["shards"][str(shard)] = _sha256(path)
        atomic_save_json(manifest, manifest_path)
    return load_anchor_latents(directory, scaling_factor=vae.config.scaling_factor)


def cache_is_complete(directory: Path) -> bool:
    """Whether `directory` holds a manifest and every shard it lists, each matching its checksum."""
    manifest_path = Path(directory) / MANIFEST
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    n_shards = -(-manifest["settings"]["n_images"] // manifest["settings"]["shard_size"])
    return _valid_shards(Path(directory), manifest) == set(range(n_shards))


def load_anchor_latents(directory: Path, scaling_factor: float) -> AnchorLatents:
    """Load a complete cache, checking every shard against the manifest's checksum."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no anchor latent cache in {directory} (run notebook 01, data preparation, first).")
    manifest = json.loads(manifest_path.read_text())
    n_shards = (manifest["settings"]["n_images"] + manifest["settings"]["shard_size"] - 1) // \
        manifest["settings"]["shard_size"]
    missing = sorted(set(range(n_shards)) - _valid_shards(directory, manifest))
    if missing:
        raise FileNotFoundError(f"anchor latent cache in {directory} is incomplete or corrupt (shards {missing}); "
                                "rerun data preparation to regenerate them.")
    shards = [load_file(str(directory / f"shard_{k:05d}.safetensors")) for k in range(n_shards)]
    return AnchorLatents(latent_mean=torch.cat([s["latent_mean"] for s in shards]),
                         latent_std=torch.cat([s["latent_std"] for s in shards]),
                         prompts=[e["prompt"] for e in manifest["images"]],
                         seeds=[e["seed"] for e in manifest["images"]], scaling_factor=scaling_factor)
