"""Generated images cached per model and sampling settings, one PNG per (prompt, seed, steps, guidance), so a
second evaluation of the same models only reads PNG files. Every model gets the same seeds, so comparisons are
paired. PNGs are encoded and written by a background thread while the next batch is drawn."""

from __future__ import annotations

import functools
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from doco_lib.figures import write_pngs
from doco_lib.io import CorruptFileError
from doco_lib.models import load_pipeline, pipeline_kind
from doco_lib.sampling import generate_batches, sampling_settings


def file_digest(path: Path) -> str:
    """SHA-256 (16 hex digits) of a file, computed once per process for each (path, size, modification time):
    an SD UNet is 3.4 GB, and every notebook cell that names a model asks for its key."""
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def model_key(model: str, unet_dir: str | None, sampling: dict | None = None) -> str:
    """Identifies a model by its base id and, for an erased UNet, the hash of its weights, together with the
    `sampling_settings` its images are drawn with."""
    parts = [model]
    if unet_dir:
        parts.append(file_digest(Path(unet_dir) / "diffusion_pytorch_model.safetensors"))
    if sampling:
        parts.append(json.dumps(sampling, sort_keys=True))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class ImageCache:
    """PNG files of one model under `directory/key/`, one per (prompt, seed, steps, guidance). The pipeline is
    loaded on first need and released with `release()`, so that one model at a time occupies the device."""

    def __init__(self, directory: Path, key: str, pipe_factory: Callable[[], object], batch_size: int | None = None,
                 sampler: str = "pipeline"):
        self.directory = Path(directory) / key
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pipe_factory = pipe_factory
        self.batch_size = batch_size
        self.sampler = sampler
        self._pipe = None
        self.generated = 0

    def path(self, prompt: str, seed: int, steps: int, guidance: float) -> Path:
        name = hashlib.sha1(f"{prompt}|{seed}|{steps}|{guidance}".encode()).hexdigest()
        return self.directory / f"{name}.png"

    def ensure(self, prompts: list[str], seeds: list[int], steps: int, guidance: float | list[float]) -> list[Path]:
        """Generate what is not cached yet (one guidance scale per pipeline call) and return the PNG paths. Each
        batch is handed to a writer thread as it comes, so the device draws the next one meanwhile; nothing is
        held in memory beyond the batches waiting to be written, and every file is in place when this returns."""
        guidances = guidance if isinstance(guidance, list) else [guidance] * len(prompts)
        paths = [self.path(p, s, steps, g) for p, s, g in zip(prompts, seeds, guidances)]
        missing = [i for i, path in enumerate(paths) if not path.is_file()]
        if not missing:
            return paths
        if self._pipe is None:
            self._pipe = self.pipe_factory()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="png-writer") as writer:
            written = []
            for scale in dict.fromkeys(guidances[i] for i in missing):
                todo = [i for i in missing if guidances[i] == scale]
                for start, images in generate_batches(self._pipe, [prompts[i] for i in todo],
                                                      [seeds[i] for i in todo], steps, scale, self.batch_size,
                                                      self.sampler):
                    written.append(writer.submit(write_pngs, images, [paths[i] for i in todo[start:]]))
                    self.generated += len(images)
            for future in written:
                future.result()  # a failed write raises here
        return paths

    def images(self, prompts: list[str], seeds: list[int], steps: int, guidance: float | list[float]) -> torch.Tensor:
        """Images in [0, 1] for each (prompt, seed): read when cached, generated (and cached) otherwise."""
        return read_images(self.ensure(prompts, seeds, steps, guidance))

    def release(self) -> None:
        """Drop the pipeline (and its device memory); a later miss loads it again."""
        self._pipe = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def model_caches(directory: Path, base_model: str, models: list, device: str, batch_size: int | None = None,
                 sampler: str = "pipeline", compiled: bool = False) -> dict[str, ImageCache]:
    """An `ImageCache` per evaluated model (label → cache) under `directory`, keyed by `model_key` with the
    `sampling_settings`, each loading its pipeline (the base model with the model's UNet) only when it must
    generate."""
    settings = sampling_settings(device, batch_size, sampler, compiled, pipeline_kind(base_model))
    return {m.label: ImageCache(directory, model_key(base_model, m.unet, settings),
                                lambda m=m: load_pipeline(base_model, device, unet=m.unet, compile_unet=compiled),
                                batch_size, sampler)
            for m in models}


def read_image(path: Path) -> Image.Image:
    """An RGB image from `path`, or an error naming the file when it is not a (complete) image."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError) as error:  # PIL raises SyntaxError for some malformed PNG chunks
        raise CorruptFileError(f"{path} is not a readable image ({error}); delete it and rerun: the evaluation "
                               "regenerates missing images.") from None


def read_images(paths: list[Path]) -> torch.Tensor:
    """The images of `paths` as one (N, 3, H, W) tensor in [0, 1]."""
    arrays = [np.asarray(read_image(path), dtype=np.float32) / 255 for path in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
