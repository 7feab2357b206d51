"""Generated images cached per (model, prompt, seed, steps, guidance), so a second evaluation of the
same models only reads PNG files. Every model gets the same seeds, so comparisons are paired."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from doco_lib.figures import to_pil
from doco_lib.io import CorruptFileError, atomic_write_bytes
from doco_lib.sampling import generate


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def model_key(model: str, unet_dir: str | None) -> str:
    """Identifies a model by its base id and, for an erased UNet, the hash of its weights."""
    parts = [model]
    if unet_dir:
        parts.append(file_digest(Path(unet_dir) / "diffusion_pytorch_model.safetensors"))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class ImageCache:
    def __init__(self, directory: Path, key: str, pipe_factory: Callable[[], object]):
        self.directory = Path(directory) / key
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pipe_factory = pipe_factory
        self._pipe = None
        self.generated = 0

    def _path(self, prompt: str, seed: int, steps: int, guidance: float) -> Path:
        name = hashlib.sha1(f"{prompt}|{seed}|{steps}|{guidance}".encode()).hexdigest()
        return self.directory / f"{name}.png"

    def images(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
        """Images in [0, 1] for each (prompt, seed): read when cached, generated (and cached) otherwise."""
        paths = [self._path(p, s, steps, guidance) for p, s in zip(prompts, seeds)]
        missing = [i for i, path in enumerate(paths) if not path.is_file()]
        if missing:
            if self._pipe is None:
                self._pipe = self.pipe_factory()
            new = generate(self._pipe, [prompts[i] for i in missing], [seeds[i] for i in missing], steps, guidance)
            for i, image in zip(missing, new):
                buffer = io.BytesIO()
                to_pil(image).save(buffer, format="PNG")
                atomic_write_bytes(buffer.getvalue(), paths[i])
            self.generated += len(missing)
        arrays = [np.asarray(read_image(path), dtype=np.float32) / 255 for path in paths]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def read_image(path: Path) -> Image.Image:
    """An RGB image from `path`, or an error naming the file when it is not a (complete) image."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError) as error:  # PIL raises SyntaxError for some malformed PNG chunks
        raise CorruptFileError(f"{path} is not a readable image ({error}); delete it and rerun: the evaluation "
                               "regenerates missing images.") from None
