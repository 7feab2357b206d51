"""Concepts to erase: what the target is, what it is anchored to, and the prompt pairs for training.

- `instance` ("dog" → "Snoopy"): anchor prompts contain the anchor word; target prompts substitute it.
- `style` ("painting" → "Van Gogh"): target prompts append "in the style of {target}" to generic
  painting prompts.
- `nudity`: a target concept ("nudity") prefixed to anchor prompts of clothed people, as the authors'
  code builds them ("{target}, {prompt}").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from doco_lib.errors import PromptFileError
from doco_lib.io import read_utf8

KINDS = ("instance", "style", "nudity")



@dataclass(frozen=True)
class ConceptSpec:
    kind: str
    anchor: str
    target: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"concept_kind {self.kind!r} is not one of {KINDS}")
        if not self.anchor.strip() or not self.target.strip():
            raise ValueError("anchor and target must be non-empty words or phrases")

    def anchor_pattern(self) -> re.Pattern:
        return re.compile(rf"\b{re.escape(self.anchor)}\b", re.IGNORECASE)

    def target_pattern(self) -> re.Pattern:
        return re.compile(rf"\b{re.escape(self.target)}\b", re.IGNORECASE)

    def target_prompt(self, anchor_prompt: str) -> str:
        if self.kind == "instance":
            return self.anchor_pattern().sub(self.target, anchor_prompt)
        if self.kind == "style":
            return f"{anchor_prompt}, in the style of {self.target}"
        return f"{self.target}, {anchor_prompt}"

    def prompt_pairs(self, anchor_prompts: list[str]) -> list[tuple[str, str]]:
        """(anchor prompt c, target prompt c*) pairs, in file order."""
        return [(p, self.target_prompt(p)) for p in anchor_prompts]


def read_prompt_file(path: str | Path, spec: ConceptSpec | None = None) -> list[str]:
    """Prompts one per line; lines starting with '#' are comments. Empty lines, repeated prompts and (for
    instance concepts) prompts without the anchor word are errors that name the line."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} does not exist.")
    prompts: list[str] = []
    first_seen: dict[str, int] = {}
    lines = read_utf8(path).split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]  # the final newline
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if text.startswith("#"):
            continue
        if not text:
            raise PromptFileError(f"{path}: line {number} is empty (expected one prompt per line).")
        key = text.lower()
        if key in first_seen:
            raise PromptFileError(f"{path}: line {number} repeats the prompt of line {first_seen[key]}: {text!r}.")
        if spec is not None and spec.kind == "instance" and not spec.anchor_pattern().search(text):
            raise PromptFileError(f"{path}: line {number} does not contain the anchor word {spec.anchor!r}: {text!r}.")
        first_seen[key] = number
        prompts.append(text)
    if not prompts:
        raise PromptFileError(f"{path}: no prompts (expected one prompt per line).")
    return prompts


def read_preservation_file(path: str | Path, spec: ConceptSpec) -> list[str]:
    """Prompts of concepts the erasure must keep; the rules of `read_prompt_file`, and none may name the target
    (retaining the target's own images would fight the erasure)."""
    prompts = read_prompt_file(path)
    for number, prompt in enumerate(prompts, start=1):
        if spec.target_pattern().search(prompt):
            raise PromptFileError(f"{path}: prompt {number} names the target {spec.target!r}, which is being "
                                  f"erased: {prompt!r}.")
    return prompts
