"""Measuring an erasure in the toy world: how often the judge sees each shape when it is asked for.

A prompt set for a shape cycles through the caption templates that mention a shape, with colours and
styles drawn from a fixed seed, so the original and the erased model see the same prompts and seeds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from doco_lib.io import atomic_write_text
from doco_lib.sampling import denoiser, generate
from doco_lib.toy import render
from doco_lib.toy.quality import images_to_judge_input

KINDS = ("shape", "colour", "style")
VALUES = {"shape": render.SHAPES, "colour": render.COLOURS, "style": render.STYLES}
SHAPE_OF_SYNONYM = {synonym: shape for shape, synonym in render.SYNONYMS.items()}  # "pentagram" → "star"


def kind_of(word: str, default: str | None = None) -> str:
    """'shape', 'colour' or 'style': which of the toy world's attributes `word` names (a shape's synonym counts);
    `default` for any other word, if given."""
    for kind in KINDS:
        if SHAPE_OF_SYNONYM.get(word, word) in VALUES[kind]:
            return kind
    if default is not None:
        return default
    raise ValueError(f"{word!r} is not a toy shape, colour or style ({[*render.SHAPES, *render.COLOURS, *render.STYLES]})")


def attribute_prompts(kind: str, word: str, n: int, seed: int = 0) -> list[str]:
    """`n` prompts naming `word` as their `kind` ('shape', 'colour' or 'style'), cycling through the caption
    templates that name one, the other attributes drawn from `seed`. `word` may be any text: "shape" gives
    generic shape prompts, and "" drops the attribute ("a star on a background")."""
    templates = [text for text, attributes in render.CAPTION_TEMPLATES if kind in attributes]
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        values = {other: VALUES[other][rng.integers(len(VALUES[other]))] for other in KINDS if other != kind}
        text = " ".join(templates[i % len(templates)].format(**values, **{kind: word}).split())
        prompts.append(render.with_articles(text.replace(" ,", ",")))
    return prompts


def shape_prompts(shape_word: str, n: int, seed: int = 0) -> list[str]:
    """`n` prompts naming `shape_word` (a shape or its synonym), over all shape-bearing templates."""
    return attribute_prompts("shape", shape_word, n, seed)


def prompt_sets(target: str, shapes: list[str], n: int, seed: int = 0) -> dict[str, tuple[list[str], str]]:
    """Prompt set name → (prompts, shape the judge should see): the target, its synonym, other shapes."""
    sets = {target: (shape_prompts(target, n, seed), target)}
    synonym = render.SYNONYMS.get(target)
    if synonym:
        sets[synonym] = (shape_prompts(synonym, n, seed), target)
    for shape in shapes:
        if shape != target:
            sets[shape] = (shape_prompts(shape, n, seed), shape)
    return sets


def attribute_sets(kind: str, words: list[str], n: int, seed: int = 0) -> dict[str, tuple[list[str], None]]:
    """Prompt sets naming each colour or style of `words` (`attribute_prompts`), in the form of `prompt_sets`;
    no single shape is expected of them, so the judge's shape head is scored on the shapes they name."""
    return {word: (attribute_prompts(kind, word, n, seed), None) for word in words}


def _named_attribute_hits(predicted: dict, prompts: list[str]) -> dict[str, list[bool]]:
    """For each of shape, colour and style, whether the judge saw the value each prompt names (prompts naming
    none are left out; a shape's synonym names the shape)."""
    words = [render.caption_words(prompt) for prompt in prompts]
    hits = {}
    for attribute in KINDS:
        values = VALUES[attribute]
        named = [(i, SHAPE_OF_SYNONYM.get(word, word)) for i, w in enumerate(words) for word in w
                 if SHAPE_OF_SYNONYM.get(word, word) in values]
        hits[attribute] = [predicted[attribute][i].item() == values.index(value) for i, value in named]
    return hits


def judged_heads(pipe, judge, sets: dict[str, tuple[list[str], str | None]], steps: int, guidance: float,
                 seed: int = 0) -> dict[str, dict[str, float | None]]:
    """For each prompt set, what the judge's three heads see on the same images: `shape`, the fraction drawn as
    the set's shape (for a set of colour or style prompts, shape None: as the shape each prompt names);
    `colour` and `style`, the fraction drawn in the colour / style their prompt names (None when no prompt of
    the set names one)."""
    rates = {}
    for name, (prompts, shape) in sets.items():
        images = generate(pipe, prompts, [seed + i for i in range(len(prompts))], steps, guidance)
        predicted = judge.predict(images_to_judge_input(images))
        hits = _named_attribute_hits(predicted, prompts)
        if shape is not None:
            hits["shape"] = (predicted["shape"] == render.SHAPES.index(shape)).tolist()
        rates[name] = {head: sum(h) / len(h) if h else None for head, h in hits.items()}
    return rates


def judged_rates(pipe, judge, sets: dict[str, tuple[list[str], str]], steps: int, guidance: float,
                 seed: int = 0) -> dict[str, float]:
    """For each prompt set, the fraction of images the judge names as the set's shape."""
    return {name: heads["shape"] for name, heads in judged_heads(pipe, judge, sets, steps, guidance, seed).items()}


def attribute_accuracy(pipe, judge, prompts: list[str], steps: int, guidance: float, seed: int = 0) -> dict[str, float]:
    """For prompts that name a colour and/or a style (e.g. RGD's held-out retain twins, "a purple shape on a
    dotted background"), how often the judge sees the named colour and style: prompt alignment, toy world."""
    images = generate(pipe, prompts, [seed + i for i in range(len(prompts))], steps, guidance)
    hits = _named_attribute_hits(judge.predict(images_to_judge_input(images)), prompts)
    return {attribute: sum(h) / len(h) for attribute, h in hits.items() if h}


def cached_judged_heads(pipe, judge, sets: dict[str, tuple[list[str], str]], steps: int, guidance: float,
                        seed: int, cache_file: Path) -> dict[str, dict[str, float | None]]:
    """`judged_heads`, remembering each prompt set's result in `cache_file` (JSON) under a hash of everything
    that determines it, the UNet's weights included; only sets not measured before are generated."""
    cache_file = Path(cache_file)
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    weights = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in denoiser(pipe).parameters())).hexdigest()
    keys = {name: hashlib.sha256(json.dumps([weights, prompts, shape, steps, guidance, seed, KINDS]).encode()).hexdigest()
            for name, (prompts, shape) in sets.items()}
    missing = {name: sets[name] for name, key in keys.items() if key not in cache}
    if missing:
        cache.update({keys[name]: heads for name, heads in judged_heads(pipe, judge, missing, steps, guidance,
                                                                        seed).items()})
        atomic_write_text(json.dumps(cache, indent=1) + "\n", cache_file)
    return {name: cache[key] for name, key in keys.items()}


def cached_judged_rates(pipe, judge, sets: dict[str, tuple[list[str], str]], steps: int, guidance: float,
                        seed: int, cache_file: Path) -> dict[str, float]:
    """`judged_rates` through the cache of `cached_judged_heads`."""
    heads = cached_judged_heads(pipe, judge, sets, steps, guidance, seed, cache_file)
    return {name: rates["shape"] for name, rates in heads.items()}


def erasure_table(before: dict[str, float], after: dict[str, dict[str, float]]):
    """Judged rates per prompt set: the original model, then each erased model, with changes in points."""
    import pandas as pd

    rows = []
    for name, original in before.items():
        row = {"prompt set": name, "original": original}
        for label, rates in after.items():
            row[label] = rates[name]
            row[f"{label} Δ (pts)"] = 100 * (rates[name] - original)
        rows.append(row)
    return pd.DataFrame(rows)
