"""Evaluation metrics: each checked against a reference implementation or a hand-made case."""

import numpy as np
import pytest
import torch

from doco_lib.evaluation import nudity, templates
from doco_lib.evaluation.clip_metrics import ClipScorer
from doco_lib.evaluation.fid import feature_statistics, fid_from_features, frechet_distance
from doco_lib.models import toy_weights_dir
from doco_lib.toy import render


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer.from_pretrained(str(toy_weights_dir() / "eval_clip"))


def rendered(shape: str, n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    images = [render.render_image(render.SHAPES.index(shape), rng.integers(6), rng.integers(4), rng)
              for _ in range(n)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def test_80_templates_and_concept_free_counterparts():
    assert len(templates.IMAGENET_TEMPLATES) == 80 == len(set(templates.IMAGENET_TEMPLATES))
    assert templates.concept_prompts("Snoopy")[0] == "a bad photo of a Snoopy."
    anchors = templates.anchor_prompts()
    assert len(anchors) == 80 and anchors[1] == "a photo of many things."
    with pytest.raises(ValueError, match="n_templates"):
        templates.concept_prompts("x", 81)


class TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects `get_*_features` to return tensors; transformers 5 returns model outputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_clip_score_equals_torchmetrics(scorer):
    from torchmetrics.multimodal.clip_score import CLIPScore

    images = rendered("star", 6)
    texts = ["a photo of a star", "a red star", "a photo of a circle", "a star on a dotted background",
             "a shape", "a photo of a heart"]
    metric = CLIPScore(model_name_or_path=lambda: (TensorFeatures(scorer.model), scorer.processor))
    expected = metric((images * 255).to(torch.uint8), texts).item()
    assert abs(scorer.clip_score(images, texts) - expected) < 1e-3
    assert scorer.clip_score(images, texts, "hessel") == pytest.approx(
        scorer.clip_score(images, texts) * 2.5 / 100, rel=1e-4)


def test_clip_accuracy_hand_made_case(scorer):
    """Rendered stars vs pentagons: CLIP should prefer the true concept over the concept-free prompt."""
    stars, pentagons = rendered("star", 40, 1), rendered("pentagon", 40, 2)
    star_prompts = ["a photo of a star"] * 40
    anchor = ["a photo of a shape"] * 40
    on_target = scorer.clip_accuracy(stars, star_prompts, ["a photo of a pentagon"] * 40)
    on_anchor = scorer.clip_accuracy(pentagons, star_prompts, ["a photo of a pentagon"] * 40)
    assert on_target >= 0.95, on_target
    assert on_anchor <= 0.05, on_anchor
    assert 0 <= scorer.clip_accuracy(stars, star_prompts, anchor) <= 1


def test_frechet_distance_equals_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(loc=0.3, scale=1.2, size=(300, 16))
    ours = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    theirs = calculate_frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-8)


def test_fid_is_zero_on_itself_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 8))
    assert abs(fid_from_features(a, a)) < 1e-8
    distances = [fid_from_features(a, a + shift) for shift in (0.1, 0.5, 1.0)]
    assert distances[0] < distances[1] < distances[2]
    assert distances[2] == pytest.approx(8 * 1.0**2, rel=1e-6)  # a pure mean shift adds ‖Δμ‖²


def test_inception_features_load_offline():
    from doco_lib.evaluation.fid import InceptionFeatures

    features = InceptionFeatures()(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()


def test_inception_features_match_pytorch_fid_when_its_weights_are_available():
    from pytorch_fid.inception import FID_WEIGHTS_URL

    cached = torch.hub.get_dir() + "/checkpoints/" + FID_WEIGHTS_URL.split("/")[-1]
    import os

    if not os.path.exists(cached):
        pytest.skip("pytorch-fid's Inception weights are not cached (they download from the internet)")
    from pytorch_fid.inception import InceptionV3

    from doco_lib.evaluation.fid import InceptionFeatures

    images = torch.rand(4, 3, 64, 64)
    reference = InceptionV3([3]).eval()(images)[0].squeeze(-1).squeeze(-1)
    assert torch.allclose(InceptionFeatures()(images), reference, atol=1e-3)


def test_i2p_csv_reading_and_errors(repo_root, tmp_path):
    rows = nudity.read_i2p_csv(repo_root / "tests" / "fixtures" / "i2p_small.csv")
    assert rows[1] == nudity.I2PPrompt("a red heart on a striped background", 12, 7.5)
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,seed\nx,1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['evaluation_seed', 'evaluation_guidance'\]"):
        nudity.read_i2p_csv(bad)
    with pytest.raises(FileNotFoundError):
        nudity.read_i2p_csv(tmp_path / "absent.csv")


def test_nudenet_plumbing_on_fixture_images():
    detector = nudity.NudityDetector(threshold=0.2)
    counts = detector.count(rendered("circle", 2))
    assert len(counts) == 2 and set(counts[0]) == set(nudity.EXPOSED_CLASSES)
    assert nudity.totals(counts) == {c: 0 for c in nudity.EXPOSED_CLASSES}  # toy shapes expose nothing
    assert nudity.reduction_percent(200, 50) == 75.0


def eval_params(tmp_path, **overrides):
    from doco_lib import config

    values = {"output_root": str(tmp_path), "run_name": "ev", "n_templates": 1, "images_per_template": 2,
              "num_inference_steps": 3, "eval_concepts": ["star", "pentagram", "circle"], "device": "cpu"}
    values.update(overrides)
    return config.validate(values)


def test_second_evaluation_reads_the_cache_and_is_much_faster(tmp_path):
    from doco_lib.models import load_judge
    from doco_lib.studies import runs

    base_unet = toy_weights_dir() / "pipeline" / "unet"  # the base UNet standing in for an erased one
    params = eval_params(tmp_path, eval_models=[str(base_unet)])
    judge = load_judge("cpu")
    first, timing_first = runs.run_evaluation(params, judge=judge)
    second, timing_second = runs.run_evaluation(params, judge=judge)
    assert timing_first["images_generated"] > 0 and timing_second["images_generated"] == 0
    assert first.equals(second)
    star_fid = first[(first.metric == "FID") & (first.concept == "star")].value.dropna()
    assert (star_fid.abs() < 1e-3).all(), "the same UNet gives the same images: FID 0 (up to eigensolver rounding)"


@pytest.mark.parametrize("overrides, message", [
    ({"eval_models": ["/no/such/unet"]}, "is not a trained UNet folder"),
    ({"erased_concepts": ["dragon"]}, "are not in eval_concepts"),
    ({"eval_concepts": ["circle"], "erased_concepts": []}, "the target 'star' is missing"),
])
def test_bad_evaluation_inputs_fail_before_generation(tmp_path, overrides, message):
    from doco_lib import config
    from doco_lib.studies import runs

    with pytest.raises(config.ParamsError, match=message):
        runs.evaluated_models(eval_params(tmp_path, **overrides))
    assert not (tmp_path / "ev" / "evaluation").exists()


def test_unreadable_i2p_csv_fails_before_generation(tmp_path):
    from doco_lib import config
    from doco_lib.studies import runs

    bad = tmp_path / "i2p.csv"
    bad.write_text("text\nsomething\n")
    with pytest.raises(config.ParamsError, match="i2p_csv: .*missing column"):
        runs.evaluated_models(eval_params(tmp_path, i2p_csv=str(bad)))


def test_paper_reference_rows_fit_the_table_layout():
    from doco_lib.evaluation import tables
    from doco_lib.evaluation.paper_results import reference_rows

    rows = reference_rows("Snoopy", ["Snoopy", "Mickey"])
    table = tables.paper_table(rows, {"Snoopy"})
    assert table.loc["paper: DoCo", ("Snoopy", "CS ↓")] == 49.29
    assert table.loc["paper: ESD", ("Mickey", "FID ↓")] == 141.35
    assert reference_rows("Elsa").empty
