"""RGD's diverse prompt sets: forget/retain twins built combinatorially from slot vocabularies.

A slots file (YAML) gives templates with `{concept}` and other `{slot}` fields, the concept words, the
word that replaces the concept in the retain twin ('' removes it), and two slot vocabularies: `train`
and a disjoint `test`, so held-out prompts share no context word with training. Forget prompt i and
retain prompt i differ only in the concept word, which keeps both gradients on the concept itself.
"""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import yaml

from doco_lib.errors import SlotsError
from doco_lib.io import read_utf8
from doco_lib.toy.render import with_articles


def load_slots(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SlotsError(f"slots file {str(path)!r} does not exist.")
    slots = yaml.safe_load(read_utf8(path))
    for key in ("templates", "concept_words", "train", "test"):
        if not slots or key not in slots or not slots[key]:
            raise SlotsError(f"{path}: missing or empty key {key!r} (expected templates, concept_words, "
                             "retain_word, train, test).")
    fields = {f for t in slots["templates"] for f in re.findall(r"{(\w+)}", t)} - {"concept"}
    for split in ("train", "test"):
        missing = fields - set(slots[split])
        if missing:
            raise SlotsError(f"{path}: {split} has no vocabulary for slot(s) {sorted(missing)}.")
    for field in fields:
        shared = set(slots["train"][field]) & set(slots["test"][field])
        if shared:
            raise SlotsError(f"{path}: slot {field!r} shares {sorted(shared)} between train and test; held-out "
                             "prompts must use a disjoint vocabulary.")
    slots.setdefault("retain_word", "")
    return slots


def _fill(template: str, values: dict, concept: str) -> str:
    text = template.format(concept=concept, **values)
    return with_articles(re.sub(r"\s+", " ", text).replace(" ,", ",").replace(" .", ".").strip())


def prompt_pairs(slots: dict, split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` distinct (forget, retain) prompt twins from the `split` vocabulary (fewer if fewer exist)."""
    vocabulary = slots[split]
    combos = []
    for template in slots["templates"]:
        fields = [f for f in re.findall(r"{(\w+)}", template) if f != "concept"]
        for values in itertools.product(*(vocabulary[f] for f in fields)):
            for word in slots["concept_words"]:
                combos.append((template, dict(zip(fields, values)), word))
    random.Random(seed).shuffle(combos)
    pairs = [(_fill(t, v, w), _fill(t, v, slots["retain_word"])) for t, v, w in combos[:n]]
    return list(dict.fromkeys(pairs))
