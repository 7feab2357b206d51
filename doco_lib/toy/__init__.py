"""The toy world: procedural images with captions, a tiny Stable-Diffusion-shaped pipeline and its judge
(see notebook 00). Nothing here imports the rest of doco_lib but `io`, `errors` and `sampling`."""

from pathlib import Path

TOY_WEIGHTS = Path(__file__).resolve().parent / "weights"


def toy_weights_dir() -> Path:
    """Folder of the shipped toy world (pipeline/, judge/, eval_clip/, build_report.json)."""
    if not (TOY_WEIGHTS / "pipeline" / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The toy world weights are missing from {TOY_WEIGHTS}. They ship with the repository; "
            "rebuild them with `doco toy build` if you removed them.")
    return TOY_WEIGHTS
