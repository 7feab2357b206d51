"""The toy world: procedural images with captions, a tiny Stable-Diffusion-shaped pipeline and its judge
(see notebook 00). Nothing here imports the rest of doco_lib but `io`, `errors` and `sampling`."""

import json
from pathlib import Path

TOY_WEIGHTS = Path(__file__).resolve().parent / "weights"
# The toy worlds by name: the shipped pipeline, the SepME one (a text encoder wider than its token rows), and the
# MMDiT one (an SD 3-style flow-matching transformer on the same judge, VAE and text encoder); with the flag of
# `doco toy build` that rebuilds each.
TOY_PIPELINES = {"toy": "pipeline", "toy-wide": "pipeline_wide", "toy-mmdit": "pipeline_mmdit"}
TOY_BUILD_FLAGS = {"toy": "", "toy-wide": " --wide", "toy-mmdit": " --mmdit"}


def toy_weights_dir() -> Path:
    """Folder of the shipped toy world (pipeline/, judge/, eval_clip/, build_report.json)."""
    if not (TOY_WEIGHTS / "pipeline" / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The toy world weights are missing from {TOY_WEIGHTS}. They ship with the repository; "
            "rebuild them with `doco toy build` if you removed them.")
    return TOY_WEIGHTS


def build_report(world: str) -> dict:
    """How the toy world `world` (a key of `TOY_PIPELINES`) was built: the build_report.json in its pipeline
    folder, or the whole world's beside it ('toy')."""
    folder = toy_weights_dir() / TOY_PIPELINES[world]
    own = folder / "build_report.json"
    return json.loads((own if own.is_file() else TOY_WEIGHTS / "build_report.json").read_text())
