"""How well a toy pipeline follows prompts, judged by the toy judge.

For each shape, colour and style we generate images for one prompt with fixed seeds and count how
often the judge sees the prompted attribute. This is the bar that makes erasure measurable: a model
that cannot draw a star on request cannot be shown to have forgotten one.
"""

from __future__ import annotations

import torch

from doco_lib.sampling import generate
from doco_lib.toy.render import COLOURS, SHAPES, STYLES, with_articles

# One prompt per attribute value, phrased as in the caption templates.
PROMPT_FORMATS = {
    "shape": ("a photo of a {}", SHAPES),
    "colour": ("a {} shape", COLOURS),
    "style": ("a shape on a {} background", STYLES),
}


def images_to_judge_input(images: torch.Tensor) -> torch.Tensor:
    """Pipeline output in [0, 1] (B, 3, H, W) → judge input in [-1, 1]."""
    return images.clamp(0, 1) * 2 - 1


def prompt_accuracy(pipe, judge, attribute: str, n_per_prompt: int, steps: int, guidance: float,
                    seed: int = 0) -> dict[str, float]:
    """Fraction of `n_per_prompt` samples judged as the prompted value, for every value of `attribute`."""
    template, values = PROMPT_FORMATS[attribute]
    prompts = [with_articles(template.format(v)) for v in values for _ in range(n_per_prompt)]
    seeds = [seed + i for _ in values for i in range(n_per_prompt)]
    images = generate(pipe, prompts, seeds, steps, guidance)
    predicted = judge.predict(images_to_judge_input(images))[attribute].view(len(values), n_per_prompt)
    return {v: (predicted[i] == i).float().mean().item() for i, v in enumerate(values)}


def pipeline_quality(pipe, judge, n_per_prompt: int, steps: int, guidance: float, seed: int = 0) -> dict:
    """Per-value accuracies for shapes, colours and styles, with their means and minima."""
    report = {}
    for attribute in PROMPT_FORMATS:
        per_value = prompt_accuracy(pipe, judge, attribute, n_per_prompt, steps, guidance, seed)
        report[attribute] = {"per_value": per_value, "mean": sum(per_value.values()) / len(per_value),
                             "min": min(per_value.values())}
    return report


def quality_table(report: dict):
    """`pipeline_quality` output as a long pandas table: attribute, value, accuracy."""
    import pandas as pd

    rows = [{"attribute": attribute, "value": value, "accuracy": accuracy}
            for attribute, result in report.items() for value, accuracy in result["per_value"].items()]
    return pd.DataFrame(rows)


def build_curve(build_report: dict):
    """The denoiser's judged prompt accuracy against build minutes (the UNet's, or toy-mmdit's transformer's), as
    a long pandas table."""
    import pandas as pd

    rows = [{"minutes": point["minutes"], "step": point["step"], "attribute": attribute, "accuracy": point[attribute]}
            for point in build_report.get("unet_curve") or build_report.get("transformer_curve", [])
            for attribute in PROMPT_FORMATS if attribute in point]
    return pd.DataFrame(rows)

