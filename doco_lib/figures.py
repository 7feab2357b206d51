"""Image grids and saved figures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from doco_lib.io import atomic_write_bytes


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] → PIL image."""
    array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def write_pngs(images: torch.Tensor, paths: list[Path]) -> None:
    """Each image as a PNG file at its path, written atomically (a kill leaves the file whole or absent)."""
    for image, path in zip(images, paths):
        buffer = io.BytesIO()
        to_pil(image).save(buffer, format="PNG")
        atomic_write_bytes(buffer.getvalue(), path)


def image_grid(images: torch.Tensor, columns: int, scale: int = 1, padding: int = 2) -> Image.Image:
    """Tile (N, 3, H, W) images in [0, 1] into rows of `columns`, upscaled by `scale` (nearest)."""
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = Image.new("RGB", (columns * (w + padding) + padding, rows * (h + padding) + padding), "white")
    for i, image in enumerate(images):
        grid.paste(to_pil(image), (padding + (i % columns) * (w + padding), padding + (i // columns) * (h + padding)))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid


def labelled_grid(rows: list[torch.Tensor], row_labels: list[str], title: str, scale: int = 3):
    """One grid of `rows` (each (N, 3, H, W), N images side by side) with each row's label written left of it and
    `title` above; a matplotlib figure at the grid's own resolution."""
    import matplotlib.pyplot as plt  # only where a figure is drawn: the CLI's imports stay light

    if len(rows) != len(row_labels):
        raise ValueError(f"labelled_grid: {len(rows)} rows of images but {len(row_labels)} row labels")
    grid = image_grid(torch.cat(rows), len(rows[0]), scale=scale)
    dpi = 100
    figure, axes = plt.subplots(figsize=(grid.width / dpi + 1.6, grid.height / dpi + 0.6), dpi=dpi)
    axes.imshow(grid, interpolation="nearest")
    row_height = grid.height / len(rows)
    axes.set_yticks([row_height * (i + 0.5) for i in range(len(rows))], row_labels, fontsize=10)
    axes.set_xticks([])
    axes.tick_params(length=0)
    axes.grid(False)  # a seaborn theme's grid would cross the images
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


def save_images(images: torch.Tensor, out_dir: Path, prefix: str = "image", columns: int = 8) -> list[Path]:
    """Write each image as PNG plus `grid.png`; returns the image paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out_dir / f"{prefix}_{i:04d}.png"
        to_pil(image).save(path)
        paths.append(path)
    scale = max(1, 256 // images.shape[-1])
    image_grid(images, min(columns, len(images)), scale=scale).save(out_dir / "grid.png")
    return paths


def preview(image: Image.Image, max_side: int = 1024) -> Image.Image:
    """A copy at most `max_side` pixels a side, for display in a notebook; the saved file keeps full size (a grid
    of 512-px images would otherwise embed megabytes in every executed notebook)."""
    if max(image.size) <= max_side:
        return image
    factor = max_side / max(image.size)
    return image.resize((round(image.width * factor), round(image.height * factor)), Image.LANCZOS)
