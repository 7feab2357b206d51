"""Procedural toy images with captions: the data of the toy world.

Every image is one salient shape of one colour on a neutral background whose texture plays the part
of an artistic "style". Labels are kept as integers so that captions can be drawn afresh from the
templates each time an image is used, and so that the judge can be trained on the exact attributes.

About 10% of star images are captioned "pentagram" instead of "star": erasing "star" without ever
seeing "pentagram" lets us test whether an erasure generalises to a synonym (the paper's
"Starry Night" claim).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "pentagon", "hexagon", "heart", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
STYLES = ("plain", "striped", "dotted", "checkered")
SYNONYMS = {"star": "pentagram"}
SYNONYM_RATE = 0.10

COLOUR_RGB = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 210, 30),
    "purple": (135, 45, 175),
    "orange": (245, 135, 25),
}
BACKGROUND_LIGHT = 232
BACKGROUND_DARK = 150

# Each template names the attributes it mentions; captions with fewer attributes teach the model
# prompts such as "a photo of a star" or "a red shape", which is what the evaluation asks for.
CAPTION_TEMPLATES = (
    ("a photo of a {shape}", ("shape",)),
    ("a {shape}", ("shape",)),
    ("a photo of a {colour} {shape}", ("shape", "colour")),
    ("a {colour} shape", ("colour",)),
    ("a shape on a {style} background", ("style",)),
    ("a {shape} on a {style} background", ("shape", "style")),
    ("a {colour} {shape} on a {style} background", ("shape", "colour", "style")),
    ("a {colour} {shape}, {style} style", ("shape", "colour", "style")),
    ("a {shape} in {style} style", ("shape", "style")),
)

SUPERSAMPLE = 4


@dataclass(frozen=True)
class ToyLabels:
    """Integer labels of a batch of rendered images (indices into SHAPES, COLOURS, STYLES)."""

    shape: np.ndarray
    colour: np.ndarray
    style: np.ndarray
    synonym: np.ndarray  # True where the shape word is replaced by its synonym in captions


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices of a shape centred at 0 with outer radius about 1, as an (N, 2) array, y down."""
    if shape == "circle":
        angles = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    regular_sides = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
    if shape in regular_sides:
        n = regular_sides[shape]
        angles = -math.pi / 2 + np.arange(n) * 2 * math.pi / n
        if shape == "square":
            angles = angles + math.pi / 4
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if shape == "star":
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    if shape == "cross":
        w = 0.34
        return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                         (-1, w), (-1, -w), (-w, -w)], dtype=float)
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1) / 16.5
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


_UNIT_POLYGONS = {name: _unit_polygon(name) for name in SHAPES}


def _background(style: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A neutral grey texture of `size`×`size` (float, 0..255) standing for a style."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = rng.uniform(0.16, 0.22) * size
    phase = rng.uniform(0, period)
    if style == "plain":
        mask = np.zeros((size, size), bool)
    elif style == "striped":
        mask = ((xx + yy + phase) % period) < period / 2
    elif style == "dotted":
        cx = (xx + phase) % period - period / 2
        cy = (yy + phase) % period - period / 2
        mask = cx**2 + cy**2 < (period * 0.28) ** 2
    elif style == "checkered":
        mask = (((xx + phase) // (period / 2)) + ((yy + phase) // (period / 2))) % 2 == 0
    else:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    grey = np.where(mask, BACKGROUND_DARK, BACKGROUND_LIGHT).astype(np.float32)
    return np.repeat(grey[..., None], 3, axis=2)


def render_image(shape: int, colour: int, style: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Render one image as uint8 (size, size, 3); position, size and rotation are drawn from `rng`."""
    big = size * SUPERSAMPLE
    canvas = _background(STYLES[style], big, rng)
    diameter = rng.uniform(0.60, 0.80) * big
    radius = diameter / 2
    margin = radius + 1
    centre = rng.uniform(margin, big - margin, size=2) if big - 2 * margin > 0 else np.array([big / 2, big / 2])
    angle = math.radians(rng.uniform(-30, 30))
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    vertices = _UNIT_POLYGONS[SHAPES[shape]] @ rotation.T * radius + centre
    mask_img = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask_img).polygon([tuple(v) for v in vertices], fill=255)
    mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0
    rgb = np.array(COLOUR_RGB[COLOURS[colour]], dtype=np.float32)
    canvas = canvas * (1 - mask) + rgb * mask
    small = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def sample_labels(n: int, rng: np.random.Generator) -> ToyLabels:
    """Uniform shapes, colours and styles; `SYNONYM_RATE` of stars get the synonym in captions."""
    shape = rng.integers(0, len(SHAPES), n)
    synonym = (shape == SHAPES.index("star")) & (rng.random(n) < SYNONYM_RATE)
    return ToyLabels(shape=shape, colour=rng.integers(0, len(COLOURS), n), style=rng.integers(0, len(STYLES), n),
                     synonym=synonym)


def render_dataset(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, ToyLabels]:
    """Render `n` labelled images deterministically from `seed`: uint8 array (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    labels = sample_labels(n, rng)
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        images[i] = render_image(labels.shape[i], labels.colour[i], labels.style[i], rng, size)
    return images, labels


def shape_word(shape: int, synonym: bool) -> str:
    name = SHAPES[shape]
    return SYNONYMS.get(name, name) if synonym else name


def caption(shape: int, colour: int, style: int, synonym: bool, template: int) -> str:
    """Fill caption template number `template` with the given attributes."""
    text, _ = CAPTION_TEMPLATES[template]
    filled = text.format(shape=shape_word(shape, synonym), colour=COLOURS[colour], style=STYLES[style])
    return with_articles(filled)


def with_articles(text: str) -> str:
    """English article agreement: "a orange star" → "an orange star" (also "A excited" → "An excited")."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def caption_words(text: str) -> list[str]:
    """The words of a caption or prompt, commas dropped: what names its shape, colour and style."""
    return text.replace(",", " ").split()


def all_captions() -> list[str]:
    """Every caption the templates can produce, sorted (a few thousand): lets encoders cache them."""
    out = set()
    for template in range(len(CAPTION_TEMPLATES)):
        for shape in range(len(SHAPES)):
            for synonym in (False, True) if SHAPES[shape] in SYNONYMS else (False,):
                for colour in range(len(COLOURS)):
                    for style in range(len(STYLES)):
                        out.add(caption(shape, colour, style, synonym, template))
    return sorted(out)


def random_captions(labels: ToyLabels, index: np.ndarray, rng: np.random.Generator) -> list[str]:
    """A caption for each selected image, the template drawn uniformly."""
    templates = rng.integers(0, len(CAPTION_TEMPLATES), len(index))
    return [caption(labels.shape[i], labels.colour[i], labels.style[i], bool(labels.synonym[i]), t)
            for i, t in zip(index, templates)]


def examples_by(attribute: str, columns: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, list[str]]:
    """Rendered images with one row per value of `attribute` ('shape', 'colour' or 'style'), others random."""
    values = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}[attribute]
    rng = np.random.default_rng(seed)
    images = []
    for value in range(len(values)):
        for _ in range(columns):
            labels = {"shape": rng.integers(len(SHAPES)), "colour": rng.integers(len(COLOURS)),
                      "style": rng.integers(len(STYLES)), attribute: value}
            images.append(render_image(labels["shape"], labels["colour"], labels["style"], rng, size))
    return np.stack(images), list(values)
