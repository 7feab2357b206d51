"""What a study recorded seed by seed depends on, so that its parts (`journal.record(..., part=...)`), measured in
different sessions, are joined only when they measure the same thing: the study's version, which a change that
alters its numbers bumps, and its settings. `code_digest` fingerprints the code a study's numbers come from; the
tests pin it, so that each change to that code is a decision on the version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from doco_lib.config import SCHEMA

REPO = Path(__file__).resolve().parents[2]
# Keys that say where outputs go or which seeds a call runs, not what a seed measures.
NOT_MEASURED = ("attack_model_seeds", "ablation_seeds", "damage_seed", "multi_concept_seeds", "study_seeds", "output_root",
                "run_name")


def artefact_name(study: str, params: dict) -> str:
    """The artefact a toy study is recorded as: `study` on the toy UNet world, `<study>_<model>` on another world
    (`methods_toy_mmdit`), so that each world's table stands in docs/results.md beside the other's."""
    return study if params["model"] == "toy" else f"{study}_{params['model'].replace('-', '_')}"


def settings(params: dict, also_measured: tuple[str, ...] = ()) -> dict:
    """The settings a measurement depends on: every key of `params` set away from its schema default, but
    `NOT_MEASURED` (`also_measured` of those kept). A key added to the schema later, at its default, leaves it as it
    was; changing a default changes what is measured, which bumps a study's version."""
    return {k: v for k, v in params.items()
            if (k not in NOT_MEASURED or k in also_measured) and (k not in SCHEMA or v != SCHEMA[k].default)}


def identity(version: int, params: dict) -> str:
    """The identity of a study's part: its `version` and `settings(params)` but the seed."""
    kept = {k: v for k, v in settings(params).items() if k != "seed"}
    return hashlib.sha256(json.dumps([version, kept], sort_keys=True, default=str).encode()).hexdigest()


def code_digest(paths: tuple[str, ...]) -> str:
    """A digest of the contents of the Python files at `paths` (files or folders, relative to the repository)."""
    digest = hashlib.sha256()
    for path in paths:
        root = REPO / path
        for file in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(file.relative_to(REPO).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def pin_message(study: str, digest: str) -> str:
    """What the test pinning the code digest of study module `study` says when that code changed."""
    return (f"the code of {study}.CODE changed: if the change alters what the study measures, bump "
            f"{study}.STUDY_VERSION (recorded parts of other versions are then not joined); either way set "
            f"PINNED_CODE_DIGEST to {digest!r}.")
