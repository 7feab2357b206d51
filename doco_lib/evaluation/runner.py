"""Evaluate a base model and erased models on a list of concepts, with cached, paired generations.

For each concept: prompts from the 80 CLIP ImageNet templates (or, in the toy world, the toy caption
templates), `images_per_template` images each, the same seeds for every model. Per (model, concept):
CLIP score against the concept prompt, CLIP accuracy against the concept-free prompt, and FID of the
model's images against the base model's images for the same prompts and seeds (as the paper does).
In the toy world the judge adds its own accuracy (the shape it names) and provides the FID features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from doco_lib.evaluation import templates
from doco_lib.evaluation.cache import model_caches
from doco_lib.evaluation.clip_metrics import ClipScorer
from doco_lib.evaluation.fid import InceptionFeatures, fid_from_features
from doco_lib.models import pick_device
from doco_lib.toy import render
from doco_lib.toy.erasure import SHAPE_OF_SYNONYM, VALUES, attribute_prompts, kind_of
from doco_lib.toy.quality import images_to_judge_input


@dataclass
class EvaluatedModel:
    label: str
    unet: str | None = None  # an erased UNet folder; None for the base model
    erased: list[str] = field(default_factory=list)


def concept_prompts(concept: str, template_set: str, n_templates: int, images_per_template: int) -> tuple[list, list]:
    """(concept prompts, concept-free prompts), one entry per image."""
    if template_set == "toy":  # captions naming the concept's kind (other words: as a shape); concept-free: "shape",
        kind = kind_of(concept, default="shape")  # or the colour / style left out
        count = n_templates or sum(kind in attributes for _, attributes in render.CAPTION_TEMPLATES)
        prompts = attribute_prompts(kind, concept, count)
        anchors = attribute_prompts(kind, "shape" if kind == "shape" else "", count)
    else:
        count = n_templates or len(templates.IMAGENET_TEMPLATES)
        prompts, anchors = templates.concept_prompts(concept, count), templates.anchor_prompts(count)
    repeat = lambda items: [p for p in items for _ in range(images_per_template)]  # noqa: E731
    return repeat(prompts), repeat(anchors)


def evaluate(base_model: str, models: list[EvaluatedModel], concepts: list[str], *, cache_dir: Path, clip_model: str,
             template_set: str = "clip80", n_templates: int = 80, images_per_template: int = 1, steps: int = 25,
             guidance: float = 5.0, seed: int = 0, device: str = "auto", clip_score_definition: str = "torchmetrics",
             fid_features: str = "inception", judge=None, sample_batch_size: int | None = None,
             sampler: str = "pipeline", compile_sampling: bool = False) -> tuple[pd.DataFrame, dict]:
    """Long-form results (model, concept, metric, value) and timing information.

    Each model's missing images are generated first, one pipeline on the device at a time (released before the
    next is loaded); then the metrics are computed from the cached PNGs, one (model, concept) at a time. Caches
    are keyed by model, so runs that share `cache_dir` (the concepts of a batch) share the base model's images."""
    started = time.perf_counter()
    requests = {concept: concept_prompts(concept, template_set, n_templates, images_per_template)
                for concept in concepts}
    seeds = {concept: [seed + i for i in range(len(prompts))] for concept, (prompts, _) in requests.items()}
    caches = model_caches(Path(cache_dir), base_model, models, device, sample_batch_size, sampler, compile_sampling)
    for m in models:
        for concept, (prompts, _) in requests.items():
            caches[m.label].ensure(prompts, seeds[concept], steps, guidance)
        caches[m.label].release()

    compute_device = str(pick_device(device))
    scorer = ClipScorer.from_pretrained(clip_model, device=compute_device)
    featurize = _feature_extractor(fid_features, judge, compute_device)
    rows = []
    for concept, (prompts, anchor_texts) in requests.items():
        reference = None
        for m in models:
            images = caches[m.label].images(prompts, seeds[concept], steps, guidance)
            features = featurize(images)
            reference = features if reference is None else reference
            clip_score, clip_accuracy = scorer.scores(images, prompts, anchor_texts, clip_score_definition)
            values = {"CS": clip_score, "CA": 100 * clip_accuracy,
                      "FID": fid_from_features(features, reference) if m is not models[0] else None}
            if judge is not None:
                values["judge acc"] = 100 * _judge_accuracy(judge, images, concept)
            rows += [{"model": m.label, "concept": concept, "metric": k, "value": v} for k, v in values.items()]
    generated = sum(c.generated for c in caches.values())
    return pd.DataFrame(rows), {"seconds": time.perf_counter() - started, "images_generated": generated}


def _feature_extractor(kind: str, judge, device: str = "cpu"):
    if kind == "judge":
        if judge is None:
            raise ValueError("fid_features='judge' needs the toy judge")

        return lambda images: judge.embed(images_to_judge_input(images).to(next(judge.parameters()).device)).detach().cpu()
    if kind == "inception":
        return InceptionFeatures(device)
    raise ValueError(f"fid_features {kind!r} is not 'inception' or 'judge'")


def _judge_accuracy(judge, images: torch.Tensor, concept: str) -> float:
    """How often the judge's head for the concept's kind (shape, colour or style) names it; NaN for words that
    are none of the toy world's."""
    kind = kind_of(concept, default="")
    if not kind:
        return float("nan")
    value = SHAPE_OF_SYNONYM.get(concept, concept)
    predicted = judge.predict(images_to_judge_input(images).to(next(judge.parameters()).device))[kind].cpu()
    return (predicted == VALUES[kind].index(value)).float().mean().item()
