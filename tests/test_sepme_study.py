"""Notebook 08's study (doco_lib/studies/sepme_study.py) on the shipped 'toy-wide' pipeline, with tiny settings."""

import json

import pandas as pd
import pytest
import torch

from doco_lib import config
from doco_lib.models import load_pipeline
from doco_lib.studies import sepme_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    params = config.validate({"output_root": str(tmp_path_factory.mktemp("sepme")), "run_name": "study",
                              "device": "cpu", "num_inference_steps": 2, "sepme_images": 2, "anchor_shard_size": 2,
                              "sepme_max_steps": 3, "sepme_threshold": -1.0, "sepme_concepts": ["star", "heart"]})
    pipe = load_pipeline(params["sepme_model"], "cpu")
    return params, pipe, sepme_study.train_increments(params, pipe, progress=False)


def test_increments_are_trained_once_and_decoupled(study):
    params, pipe, trained = study
    assert list(trained.concept) == ["star", "heart"] and (trained.steps == 3).all()
    assert list(trained["decoupled against"]) == ["a photo of a heart", "a photo of a star"]
    path = sepme_study.increment_path(params, "star")
    written = path.stat().st_mtime_ns
    again = sepme_study.train_increments(params, pipe, progress=False)
    assert path.stat().st_mtime_ns == written and again.equals(trained)  # reused, not retrained
    leak = sepme_study.decoupling_leakage(params, pipe)
    assert (leak["max leak, decoupled rows"] <= 1e-5).all() and (leak["max leak, own name prompt"] > 1e-3).all()


def test_subsets_compose_and_restore_exactly(study):
    params, pipe, _ = study
    composed = sepme_study.compose_subsets(params)
    assert list(composed.erased) == ["star", "heart", "star + heart"]
    record = json.loads((sepme_study.folder(params) / "subsets" / "star_heart" / "sepme_compose.json").read_text())
    assert record["erased"] == ["star", "heart"] and set(record["increment_sha256"]) == {"star", "heart"}
    eraser = sepme_study.load_eraser(params, pipe)
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    check = sepme_study.restore_check(params, eraser)
    assert check["weights changed by erasing it"] and check["restored weights equal erasing the other alone"]
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())  # left with nothing erased


def test_criteria_read_the_subset_rates():
    params = config.validate({"sepme_concepts": ["star", "heart", "cross"]})
    rates = pd.DataFrame([{"model": m, "prompt set": s, "seed": 0, "rate": r} for m, s, r in [
        ("original", "star", 1.0), ("original", "heart", 1.0), ("original", "cross", 0.9),
        ("star", "star", 0.25), ("star", "heart", 0.97), ("star", "cross", 0.95),
        ("heart", "star", 0.98), ("heart", "heart", 0.1), ("heart", "cross", 0.9),
        ("cross", "star", 1.0), ("cross", "heart", 1.0), ("cross", "cross", 0.0)]])
    checks = sepme_study.criteria(rates, params).set_index("concept A")
    assert checks.loc["star", "A, A erased"] == 25 and checks.loc["star", "B"] == "heart"
    assert checks.loc["star", "largest change of another concept, A erased"] == pytest.approx(5)
    assert checks.loc["star", "A after erasing A + B and restoring A"] == 98
    assert checks.loc["cross", "largest change of another concept, A erased"] == 0


def test_bad_sepme_settings_are_named(tmp_path):
    for values, message in [({"sepme_concepts": ["star"]}, "at least two different concepts"),
                            ({"sepme_name_template": "a photo of a"}, "lacks '{concept}'"),
                            ({"sepme_name_template": "a {shape} {concept}"}, "only {concept}"),
                            ({"sepme_restore": "zebra"}, "'zebra' is not one of sepme_concepts"),
                            ({"sepme_prompt_files": ["params/prompts/toy_heart.txt"]}, "1 files for 3"),
                            ({"sepme_model": str(tmp_path)}, "sepme_model")]:
        with pytest.raises(config.ParamsError, match=message.replace("{", "\\{").replace("}", "\\}")):
            config.validate(values)
