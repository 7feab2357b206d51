"""Evaluation metrics: each checked against a reference implementation, a hand-made case or a known erasure."""

from pathlib import Path

import numpy as np
import pytest
import torch

from doco_lib.evaluation import nudity, templates
from doco_lib.evaluation.clip_metrics import ClipScorer
from doco_lib.evaluation.fid import feature_statistics, fid_from_features, frechet_distance
from doco_lib.models import toy_weights_dir
from doco_lib.toy import render

# Toy-sized kernels (sampling, the toy CLIP and judge): on a busy 2-core machine a second thread only slows them.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


# No nude image exists offline. NudeNet's 320n detector also finds faces, and matplotlib (through seaborn, a
# dependency) ships a photograph of Grace Hopper: measured with nudenet 3.4.2, one detection, FACE_FEMALE at 0.615.
REGRESSION_MIN_FACE_SCORE = 0.5


def photograph() -> tuple[str, torch.Tensor]:
    """matplotlib's sample portrait: its path, and its pixels as a (1, 3, H, W) batch in [0, 1]."""
    from matplotlib import cbook
    from PIL import Image

    path = str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    pixels = np.array(Image.open(path).convert("RGB"))
    return path, torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255


def test_counted_classes_are_nudenets_exposed_labels():
    import nudenet.nudenet

    labels = getattr(nudenet.nudenet, "__labels")  # the detector's class list, indexed by its output
    assert set(nudity.EXPOSED_CLASSES) == {label for label in labels if label.endswith("_EXPOSED")}


def test_the_real_nudenet_fires_on_a_photographed_face_and_is_counted_per_class(monkeypatch):
    path, image = photograph()
    detector = nudity.NudityDetector()
    found = detector.detector.detect(path)
    assert [d["class"] for d in found] == ["FACE_FEMALE"] and found[0]["score"] >= REGRESSION_MIN_FACE_SCORE, found
    none = {c: 0 for c in nudity.EXPOSED_CLASSES}
    assert detector.count(image) == [none]  # a clothed portrait: no EXPOSED class
    assert detector.count(rendered("circle", 2)) == [none, none]  # toy shapes neither
    # Faces counted as if they were an EXPOSED class: the whole path with a real detection (the tensor written to
    # PNG and read by NudeNet, its class names and scores parsed, the threshold applied).
    monkeypatch.setattr(nudity, "EXPOSED_CLASSES", nudity.EXPOSED_CLASSES + ("FACE_FEMALE",))
    assert detector.count(image) == [{**none, "FACE_FEMALE": 1}]
    assert nudity.NudityDetector(threshold=0.9).count(image) == [{**none, "FACE_FEMALE": 0}]  # above its score


class KnownDetections:
    """Stands in for NudeNet's `NudeDetector`: fixed detections per image file name, in NudeNet's output schema."""

    DETECTIONS = {"base0.png": [("BELLY_EXPOSED", 0.9), ("BELLY_EXPOSED", 0.5), ("FEET_EXPOSED", 0.1),
                                ("FACE_FEMALE", 0.9), ("BELLY_COVERED", 0.8)],
                  "base1.png": [("MALE_GENITALIA_EXPOSED", 0.3)],
                  "erased0.png": [("FEET_EXPOSED", 0.25)],
                  "erased1.png": []}

    def detect(self, path):
        return [{"class": c, "score": s, "box": [0, 0, 8, 8]} for c, s in self.DETECTIONS[Path(path).name]]

    def detect_batch(self, paths, batch_size=4):
        return [self.detect(path) for path in paths]


class FilesCache:
    """Stands in for an `ImageCache`: the image files of the I2P rows, already generated."""

    def __init__(self, names):
        self.names, self.released = names, False

    def ensure(self, prompts, seeds, steps, guidances):
        assert len(prompts) == len(seeds) == len(guidances) == len(self.names)
        return [Path(name) for name in self.names]

    def release(self):
        self.released = True


def test_counts_equal_the_detections_per_class_above_the_threshold(monkeypatch, repo_root):
    import nudenet

    monkeypatch.setattr(nudenet, "NudeDetector", KnownDetections)
    detector = nudity.NudityDetector(threshold=0.2)
    none = {c: 0 for c in nudity.EXPOSED_CLASSES}
    assert detector.count_files([Path("base0.png"), Path("base1.png")]) == [  # FEET 0.1 below, FACE, COVERED uncounted
        {**none, "BELLY_EXPOSED": 2}, {**none, "MALE_GENITALIA_EXPOSED": 1}]

    rows = nudity.read_i2p_csv(repo_root / "tests" / "fixtures" / "i2p_small.csv")[:2]
    caches = {"base": FilesCache(["base0.png", "base1.png"]), "erased": FilesCache(["erased0.png", "erased1.png"])}
    table = nudity.i2p_counts(caches, rows, 2, detector)
    assert list(table.columns) == ["base", "erased"] and all(cache.released for cache in caches.values())
    assert table["base"].to_dict() == {**none, "BELLY_EXPOSED": 2, "MALE_GENITALIA_EXPOSED": 1, "total": 3}
    assert table["erased"].to_dict() == {**none, "FEET_EXPOSED": 1, "total": 1}
    assert nudity.reduction_percent(table.loc["total", "base"], table.loc["total", "erased"]) == pytest.approx(200 / 3)
    assert nudity.reduction_percent(200, 50) == 75.0 and nudity.reduction_percent(0, 0) == 0.0


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


def star_drawn_as_pentagon(directory: Path, preserve_weight: float = 10.0) -> Path:
    """A toy UNet that no longer draws stars, for the evaluation to measure: each cross-attention K/V weight W is
    replaced, in closed form (as UCE does), by the W' minimising Σ ‖W' h_star − W h_pentagon‖² + λ Σ ‖W' h_o − W h_o‖²
    over the text encoder's token states of paired star/pentagon prompts (h_star, h_pentagon) and of other shapes'
    prompts (h_o): W' = W (H_pᵀH_s + λ H_oᵀH_o)(H_sᵀH_s + λ H_oᵀH_o)⁻¹. Measured (judge, 16 prompts per shape, 10
    steps): star and pentagram 0%; circle, heart, pentagon and square 100%; triangle, which the toy encoder
    encodes like star, 25%."""
    from doco_lib.models import load_pipeline
    from doco_lib.toy.erasure import shape_prompts

    pipe = load_pipeline("toy", "cpu", dtype=torch.float32)

    def states(prompts):
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0].flatten(0, 1).double()

    h_s, h_p = states(shape_prompts("star", 64, seed=1)), states(shape_prompts("pentagon", 64, seed=1))
    h_o = states([p for shape in ("circle", "heart", "square", "hexagon", "cross", "pentagon")
                  for p in shape_prompts(shape, 32, seed=2)])
    kept = preserve_weight * h_o.T @ h_o
    with torch.no_grad():
        for name, layer in pipe.unet.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                w = layer.weight.double()
                layer.weight.copy_(torch.linalg.solve(h_s.T @ h_s + kept, (w @ (h_p.T @ h_s + kept)).T).T)
    pipe.unet.save_pretrained(directory)
    return directory


# Base vs star_drawn_as_pentagon on 4 toy templates × 4 images, 10 steps, measured: star judge accuracy 100 → 0%,
# CA 87.5 → 0%, CS 61.0 → 13.9, FID 177; circle judge accuracy 100 → 100%, CA 75 → 75%, CS 59.7 → 59.4, FID 3.7.
REGRESSION_MAX_ERASED_JUDGE_ACC, REGRESSION_MIN_KEPT_JUDGE_ACC = 25, 87.5
REGRESSION_MIN_CA_DROP, REGRESSION_MIN_CS_DROP = 50, 20  # the erased concept's, in points
REGRESSION_MAX_KEPT_CHANGE = {"CA": 20, "CS": 5}
REGRESSION_MIN_ERASED_FID, REGRESSION_MAX_KEPT_FID = 50, 20


def test_evaluation_measures_an_erasure_on_the_erased_concept_and_not_on_a_kept_one(tmp_path):
    from doco_lib.evaluation.runner import EvaluatedModel, evaluate
    from doco_lib.models import load_judge

    erased_unet = star_drawn_as_pentagon(tmp_path / "star_erased")
    models = [EvaluatedModel("base"), EvaluatedModel("erased", str(erased_unet), ["star"])]
    results, _ = evaluate("toy", models, ["star", "circle"], cache_dir=tmp_path / "cache", template_set="toy",
                          clip_model=str(toy_weights_dir() / "eval_clip"), n_templates=4, images_per_template=4,
                          steps=10, device="cpu", fid_features="judge", judge=load_judge("cpu"))
    value = results.set_index(["model", "concept", "metric"]).value
    assert value["base", "star", "judge acc"] == value["base", "circle", "judge acc"] == 100, results
    assert value["erased", "star", "judge acc"] <= REGRESSION_MAX_ERASED_JUDGE_ACC, results
    assert value["erased", "circle", "judge acc"] >= REGRESSION_MIN_KEPT_JUDGE_ACC, results
    assert value["base", "star", "CA"] - value["erased", "star", "CA"] >= REGRESSION_MIN_CA_DROP, results
    assert value["base", "star", "CS"] - value["erased", "star", "CS"] >= REGRESSION_MIN_CS_DROP, results
    for metric, change in REGRESSION_MAX_KEPT_CHANGE.items():
        assert abs(value["base", "circle", metric] - value["erased", "circle", metric]) <= change, results
    # FID against the base model's images of the same prompts and seeds: far apart where the drawings changed.
    assert value["erased", "star", "FID"] >= REGRESSION_MIN_ERASED_FID > REGRESSION_MAX_KEPT_FID >= \
        value["erased", "circle", "FID"] > 0, results


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
