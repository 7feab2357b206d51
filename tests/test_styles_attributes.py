"""Notebook 10's two studies: toy Table 2 (styles erased to the plain background) and toy Figure 6 (a colour erased
wherever it appears, counted on implicit prompts through the nudity evaluation's code), and both recorded seed by
seed (`doco toy styles-attributes`): the rows at a tiny budget, the journal's tables and figure of them, and the pin
of the code their numbers come from."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from doco_lib import config
from doco_lib.app import journal
from doco_lib.evaluation import nudity, unlearn_canvas
from doco_lib.evaluation.runner import _judge_accuracy, concept_prompts
from doco_lib.figures import labelled_grid
from doco_lib.models import load_judge
from doco_lib.studies import implicit_attribute, style_table, styles_attributes, versions
from doco_lib.toy import erasure, render

TOY = {"model": "toy"}


def _words(prompt):
    return set(prompt.replace(",", " ").split())


def test_attribute_prompts_name_their_word_and_keep_shape_prompts_as_they_were():
    styles = erasure.attribute_prompts("style", "dotted", 10, seed=3)
    assert all("dotted" in _words(p) for p in styles) and len(set(styles)) > 5
    dropped = erasure.attribute_prompts("style", "", 10, seed=3)  # the concept-free twins: same draws, no style
    assert [p.replace("dotted ", "").replace(" dotted", "") for p in styles] == dropped
    assert not any(_words(p) & set(render.STYLES) for p in dropped) and "  " not in "".join(dropped)
    colours = erasure.attribute_prompts("colour", "orange", 4)
    assert all(p.count("an orange") == 1 for p in colours)  # articles agree
    assert erasure.shape_prompts("star", 9, 2) == erasure.attribute_prompts("shape", "star", 9, 2)
    assert erasure.shape_prompts("star", 3, 0) == ["a photo of a star", "a star", "a photo of a green star"]  # as before: caches keep
    assert [erasure.kind_of(w) for w in ("pentagram", "orange", "checkered")] == \
        ["shape", "colour", "style"]
    assert erasure.kind_of("dog", default="shape") == "shape"
    with pytest.raises(ValueError, match="'dog' is not a toy shape, colour or style"):
        erasure.kind_of("dog")


def test_the_heads_score_what_each_prompt_names():
    prompts = ["a photo of a pentagram", "a red circle on a dotted background", "a shape on a striped background"]
    predicted = {"shape": torch.tensor([render.SHAPES.index("star"), render.SHAPES.index("square"), 0]),
                 "colour": torch.tensor([0, render.COLOURS.index("red"), 0]),
                 "style": torch.tensor([0, render.STYLES.index("plain"), render.STYLES.index("striped")])}
    hits = erasure._named_attribute_hits(predicted, prompts)
    assert hits == {"shape": [True, False], "colour": [True], "style": [False, True]}  # synonym → star


def test_toy_templates_measure_styles_and_colours(one_torch_thread):
    prompts, anchors = concept_prompts("checkered", "toy", 0, 2)
    assert len(prompts) == 2 * 5 and all("checkered" in _words(p) for p in prompts)  # five templates name a style
    assert not any(_words(a) & set(render.STYLES) for a in anchors)
    shapes, shape_anchors = concept_prompts("star", "toy", 2, 1)
    assert shapes == ["a photo of a star", "a star"] and shape_anchors == ["a photo of a shape", "a shape"]
    judge = load_judge("cpu")
    rng = np.random.default_rng(0)
    dotted = np.stack([render.render_image(i % 8, i % 6, render.STYLES.index("dotted"), rng) for i in range(12)])
    images = torch.from_numpy(dotted).permute(0, 3, 1, 2).float() / 255
    assert _judge_accuracy(judge, images, "dotted") >= 0.9 and _judge_accuracy(judge, images, "striped") <= 0.1
    assert np.isnan(_judge_accuracy(judge, images, "dog"))


def test_style_table_settings_are_refused_before_any_run():
    with pytest.raises(config.ParamsError, match="style_targets: .*'plain'"):
        style_table.check_settings(TOY, ["UCE"], ["plain"])
    with pytest.raises(config.ParamsError, match="style_targets"):
        style_table.check_settings(TOY, ["UCE"], ["striped", "striped"])
    with pytest.raises(config.ParamsError, match="study_variants: unknown"):
        style_table.check_settings(TOY, ["DoCo"], ["striped"])
    with pytest.raises(config.ParamsError, match="model: 'CompVis/stable-diffusion-v1-4'"):
        style_table.check_settings({"model": "CompVis/stable-diffusion-v1-4"}, ["UCE"], ["striped"])
    style_table.check_settings(TOY, ["UCE", "DoCo (cp)"], ["striped", "checkered"])


def test_style_anchor_prompts_are_the_plain_captions():
    prompts = style_table.anchor_prompts()
    assert all("plain" in _words(p) for p in prompts) and len(prompts) == len(set(prompts))
    assert not any(_words(p) & {"striped", "dotted", "checkered"} for p in prompts)
    assert {s for p in prompts for s in render.SHAPES if s in _words(p)} == set(render.SHAPES)  # every shape
    slots = style_table.rgd_slots("dotted")
    assert slots["concept_words"] == ["dotted"] and slots["retain_word"] == "plain"
    assert not set(slots["train"]["shape"]) & set(slots["test"]["shape"])


def _style_rows(model, erased, seed, rates, cross=1.0):
    return [{"model": model, "erased": erased, "seed": seed, "prompt set": s, "rate": r, "shape rate": cross,
             "colour rate": cross} for s, r in rates.items()]


def _metric_rows(model, erased, seed, cs, fid):
    return [{"model": model, "erased": erased, "seed": seed, "concept": s, "metric": metric, "value": value}
            for s in render.STYLES
            for metric, value in (("CS", cs[s]), ("CA", 2 * cs[s]), ("FID", None if model == "original" else fid))]


def test_table2_reads_the_erased_style_against_the_kept_ones():
    full = dict.fromkeys(render.STYLES, 1.0)
    judged = pd.DataFrame(_style_rows("original", "", 0, full) + _style_rows("original", "", 1, full)
                          + _style_rows("UCE", "striped", 0, {**full, "striped": 0.2, "dotted": 0.7}, cross=0.5)
                          + _style_rows("UCE", "striped", 1, {**full, "striped": 0.4, "dotted": 0.7}, cross=0.5))
    cs = {"plain": 30.0, "striped": 10.0, "dotted": 20.0, "checkered": 30.0}
    metrics = pd.DataFrame(_metric_rows("original", "", 0, dict.fromkeys(render.STYLES, 30.0), 0)
                           + _metric_rows("original", "", 1, dict.fromkeys(render.STYLES, 30.0), 0)
                           + _metric_rows("UCE", "striped", 0, cs, 4.0) + _metric_rows("UCE", "striped", 1, cs, 6.0))
    table = style_table.table(judged, metrics, ["striped"])
    row = table.loc[("striped", "UCE")]
    assert row["judged (erased) ↓"].startswith("30.0 ± ") and row["judged (kept) ↑"] == "90.0 ± 0.0"
    assert row["CS (erased) ↓"] == "10.0 ± 0.0" and row["CA (kept) ↑"] == "53.3 ± 0.0"  # 2·mean(30, 20, 30)
    assert row["FID ↓"].startswith("5.0 ± ") and table.loc[("striped", "original"), "FID ↓"] == "—"
    assert row["UA ↑"].startswith("70.0 ± ") and row["IRA ↑"] == "90.0 ± 0.0" and row["CRA ↑"] == "50.0 ± 0.0"
    accuracy = unlearn_canvas.accuracies(judged[judged.model == "UCE"].drop(columns="erased"), "striped",
                                         cross_heads=style_table.CROSS_HEADS)
    assert accuracy.set_index(["seed", "prompt set"]).loc[(0, "CRA"), "rate"] == pytest.approx(0.5)


def test_implicit_candidates_name_no_colour(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# comment\napple\nocean\napple\n")
    assert implicit_attribute.read_candidate_words(words) == ["apple", "ocean"]
    words.write_text("apple\norange\n")
    with pytest.raises(config.ParamsError, match=r"names colours \['orange'\]"):
        implicit_attribute.read_candidate_words(words)
    prompts = implicit_attribute.candidate_prompts(["apple"])
    assert prompts[-1] == "a photo of an apple" and not any(_words(p) & set(render.COLOURS) for p in prompts)
    assert "a photo of a star" in prompts and "a shape on a dotted background" in prompts
    others = implicit_attribute.anchor_prompts("orange")
    assert not any("orange" in _words(p) for p in others) and all(_words(p) & set(render.COLOURS) for p in others)
    with pytest.raises(config.ParamsError, match="attribute: 'teal'"):
        implicit_attribute.check_settings(TOY, ["UCE"], "teal")


def test_implicit_prompts_are_those_above_the_threshold_and_go_out_as_i2p(tmp_path):
    rates = pd.DataFrame({"orange": [0.9, 0.4, 0.6], "red": [0.1, 0.6, 0.4]}, index=["a", "b", "c"])
    found = implicit_attribute.implicit_prompts(rates, "orange", 0.5)
    assert list(found.index) == ["a", "c"]
    with pytest.raises(config.ParamsError, match="no candidate prompt is drawn orange at least 95%.*the most: 90%"):
        implicit_attribute.implicit_prompts(rates, "orange", 0.95)
    path = implicit_attribute.write_i2p_csv(["a photo of an apple", "a star"], 3, 16, 5.0, tmp_path / "i2p.csv")
    rows = nudity.read_i2p_csv(path)
    assert [(r.prompt, r.seed, r.guidance) for r in rows[:4]] == [
        ("a photo of an apple", 16, 5.0), ("a photo of an apple", 17, 5.0), ("a photo of an apple", 18, 5.0),
        ("a star", 16, 5.0)]


def test_the_attribute_detector_counts_what_the_judge_sees(tmp_path, one_torch_thread):
    from PIL import Image

    rng = np.random.default_rng(1)
    drawn = [("heart", "orange"), ("star", "orange"), ("heart", "red"), ("circle", "blue")]
    paths = []
    for i, (shape, colour) in enumerate(drawn):
        paths.append(tmp_path / f"{i}.png")
        image = render.render_image(render.SHAPES.index(shape), render.COLOURS.index(colour), 0, rng)
        Image.fromarray(image).save(paths[-1])
    detector = implicit_attribute.AttributeDetector(load_judge("cpu"), "orange")
    counts = detector.count_files(paths)
    assert [sum(c.values()) for c in counts] == [1, 1, 0, 0]
    assert counts[0]["ORANGE_HEART"] == 1 and counts[1]["ORANGE_STAR"] == 1
    assert nudity.totals(counts, detector.classes)["ORANGE_HEART"] == 1


def test_reduction_is_the_papers_number_per_seed():
    counts = pd.DataFrame([{"model": m, "seed": s, "class": "total", "count": c}
                           for m, s, c in [("original", 0, 40), ("original", 1, 40), ("UCE", 0, 10), ("UCE", 1, 30)]])
    table = implicit_attribute.reduction(counts)
    assert table.loc["original", "detections"] == "40" and table.loc["original", "reduction (%) ↑"] == "—"
    assert table.loc["UCE", "detections"].startswith("20.0 ± ") and table.loc["UCE", "reduction mean"] == 50.0
    one_seed = implicit_attribute.reduction(counts[counts.seed == 0])  # no interval to give: no "± 0.0"
    assert one_seed.loc["UCE", ["detections", "reduction (%) ↑"]].tolist() == ["10.0", "75.0"]


def test_the_counts_plot_has_a_bar_per_shape_and_model_without_the_total():
    counts = pd.DataFrame([{"model": m, "seed": s, "class": c, "count": n}
                           for m in ("original", "UCE") for s in (0, 1)
                           for c, n in (("ORANGE_STAR", 3 + s), ("ORANGE_HEART", 1), ("total", 4 + s))])
    figure = implicit_attribute.counts_plot(counts, "orange", 13, 16)
    axes = figure.axes[0]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["star", "heart"]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["original", "UCE"]
    assert sorted(round(bar.get_height(), 2) for bar in axes.patches if bar.get_height()) == [1, 1, 3.5, 3.5]
    assert "13 implicit prompts × 16 images" in axes.get_title()


def test_the_counts_plot_bars_are_means_over_seeds_with_student_t_intervals():
    """Each bar is the mean over seeds and its error bar mean ± the 95% Student-t half-width (t with 2 degrees of
    freedom for 3 seeds, as the tables' `rating.mean_ci`), read from the axes' lines. Seeds 2, 5, 11 make the t
    interval (−5.4, 17.4) reach past every count; the bootstrap the plot drew before stays inside [2, 11], so
    this fails on the old code."""
    per_seed = {("original", "ORANGE_STAR"): [2, 5, 11], ("original", "ORANGE_HEART"): [7, 7, 7],
                ("UCE", "ORANGE_STAR"): [0, 1, 5], ("UCE", "ORANGE_HEART"): [3, 4, 8]}
    counts = pd.DataFrame([{"model": m, "seed": s, "class": c, "count": n}
                           for (m, c), values in per_seed.items() for s, n in enumerate(values)])
    axes = implicit_attribute.counts_plot(counts, "orange", 13, 16).axes[0]
    bars = [bar for bar in axes.patches if bar.get_width() > 0 and bar.get_height() > 0]
    lines = {round(float(np.mean(line.get_xdata())), 6): sorted(line.get_ydata()) for line in axes.lines
             if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]}
    expected = {}
    for values in per_seed.values():
        values = np.array(values, dtype=float)
        half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
        expected[values.mean()] = (values.mean() - half, values.mean() + half)
    assert len(bars) == len(per_seed) and sorted(bar.get_height() for bar in bars) == sorted(expected)
    for bar in bars:
        low, high = lines[round(bar.get_x() + bar.get_width() / 2, 6)]
        assert (low, high) == pytest.approx(expected[bar.get_height()])
    assert lines and "Student-t" in axes.get_title()
    assert expected[6.0][0] < 2 and expected[6.0][1] > 11  # wider than the counts: no bootstrap gives this


def test_the_labelled_grid_writes_each_rows_label_beside_it():
    rows = [torch.full((4, 3, 8, 8), value) for value in (0.0, 1.0)]
    figure = labelled_grid(rows, ["original", "DoCo (cp)"], "a title", scale=2)
    axes = figure.axes[0]
    assert [label.get_text() for label in axes.get_yticklabels()] == ["original", "DoCo (cp)"]
    image = axes.get_images()[0].get_array()
    assert image.shape[:2] == (2 * (2 * 10 + 2), 2 * (4 * 10 + 2))  # 2 rows × 4 columns of 8 px, 2 px padding
    assert image[5, 5].tolist() == [0, 0, 0] and image[25, 5].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="2 rows of images but 1 row labels"):
        labelled_grid(rows, ["original"], "a title")


def test_candidate_colour_rates_are_cached_per_sampling_setting(tmp_path, one_torch_thread, monkeypatch):
    params = {"model": "toy", "device": "cpu", "output_root": str(tmp_path), "run_name": "r",
              "num_inference_steps": 2, "guidance_scale": 5.0}
    prompts = ["a photo of an apple", "a star"]
    first = implicit_attribute.colour_rates(params, prompts, 3, seed=0)
    assert list(first.index) == prompts and first.index.name == "prompt" and list(first.columns) == list(render.COLOURS)
    assert np.allclose(first.sum(axis=1), 1.0) and set(np.round(first.values * 3, 4).ravel()) <= {0.0, 1.0, 2.0, 3.0}
    monkeypatch.setattr(implicit_attribute, "generate", lambda *a, **k: pytest.fail("regenerated a cached prompt"))
    assert implicit_attribute.colour_rates(params, prompts[::-1], 3, seed=0).equals(first.loc[prompts[::-1]])
    with pytest.raises(pytest.fail.Exception, match="regenerated"):  # other sampling settings are not the cache's
        implicit_attribute.colour_rates({**params, "guidance_scale": 7.5}, prompts, 3, seed=0)


def test_judge_kind_reads_every_head_for_the_original_and_each_run(tmp_path, one_torch_thread):
    from doco_lib.evaluation import rating
    from doco_lib.models import toy_weights_dir

    params = {"model": "toy", "device": "cpu", "output_root": str(tmp_path), "run_name": "r",
              "num_inference_steps": 3, "guidance_scale": 5.0}
    unchanged = tmp_path / "run" / "unet"  # a "run" that left the UNet as it was (its cache goes beside it)
    unchanged.parent.mkdir()
    unchanged.symlink_to(toy_weights_dir() / "pipeline" / "unet")
    trained = pd.DataFrame([{"variant": "UCE", "erased": "striped", "seed": 0, "unet": str(unchanged)}])
    judged = rating.judge_kind(params, trained, "style", 2)
    assert list(judged.columns) == ["model", "erased", "seed", "prompt set", "rate", "shape rate", "colour rate"]
    assert list(judged["prompt set"]) == list(render.STYLES) * 2 and list(judged.erased) == [""] * 4 + ["striped"] * 4
    original, run = (judged[judged.model == m].drop(columns=["model", "erased"]).reset_index(drop=True)
                     for m in ("original", "UCE"))
    pd.testing.assert_frame_equal(original, run)  # same weights, same prompts and seeds: the same images
    assert (tmp_path / "run" / "judged_style.json").is_file() and (tmp_path / "r" / "judged").is_dir()


@pytest.mark.usefixtures("one_torch_thread")
def test_recorded_rows_at_a_tiny_budget_feed_the_journals_tables(tmp_path):
    """UCE (closed form) erasing striped and orange on seed 1, 2 judged images per set at 2 steps; every candidate
    prompt is implicit at threshold 0, each counted on 1 held-out image."""
    words = tmp_path / "words.txt"
    words.write_text("apple\n")
    params = config.validate({"output_root": str(tmp_path), "device": "cpu", "num_inference_steps": 2,
                              "n_anchor_images": 4, "anchor_shard_size": 4, "eval_samples": 2, "n_templates": 2,
                              "images_per_template": 1, "study_variants": ["UCE"], "style_targets": ["striped"],
                              "implicit_candidates_file": str(words), "implicit_samples": 1,
                              "implicit_threshold": 0.0, "implicit_images": 1})
    studies = styles_attributes.study_rows(params, [1])
    assert list(studies) == list(styles_attributes.ARTEFACTS)
    styles, counts, colours = studies.values()
    assert set(styles.model) == {"original", "UCE"} and set(styles.seed) == {1} and (styles.samples == 2).all()
    assert {"judged (erased) ↓", "CS (kept) ↑", "FID ↓", "UA ↑"} <= set(styles.measure)
    prompts = counts.prompts.iloc[0]
    assert prompts == len(implicit_attribute.candidate_prompts(["apple"])) and (counts.attribute == "orange").all()
    totals = counts[counts["class"] == "total"].set_index("model")["count"]
    assert set(totals.index) == {"original", "UCE"} and totals.between(0, prompts).all()
    assert set(colours["prompt set"]) == set(render.COLOURS) and colours.rate.between(0, 1).all()
    for name, rows in studies.items():  # each renders, a row per model
        assert "UCE" in journal.RENDERERS[name](rows)


def test_the_journals_figure_6_tables_read_counts_and_named_colours():
    counts = pd.DataFrame([{"model": m, "seed": s, "class": "total", "count": c, "attribute": "orange",
                            "prompts": 13, "images": 16}
                           for m, s, c in [("original", 0, 40), ("original", 1, 40), ("UCE", 0, 10), ("UCE", 1, 30)]])
    lines = journal.implicit_attribute_table(counts).splitlines()
    assert lines[0] == "| model | images judged orange on the implicit prompts (of 208) | reduction (%) ↑ | per seed |"
    assert lines[2] == "| original | 40 | — | 40, 40 |"
    # UCE: 10 and 30 → 20 ± t(0.975, 1) · 10 = 127.1; reductions 75 and 25 % → 50 ± 317.7
    assert lines[3] == "| UCE | 20.0 ± 127.1 | 50.0 ± 317.7 | 10, 30 |"
    colours = pd.DataFrame([{"model": m, "seed": 0, "prompt set": c, "rate": r, "shape rate": 1.0, "style rate": 0.5,
                             "attribute": "orange"}
                            for m, orange, red in (("original", 1.0, 1.0), ("UCE", 0.25, 0.75))
                            for c, r in (("red", red), ("orange", orange))])
    lines = journal.attribute_colours_table(colours).splitlines()
    assert lines[0] == "| model | red | orange | UA ↑ | IRA ↑ | CRA ↑ |"
    assert lines[3] == "| UCE | 75.0 | 25.0 | 75.0 | 75.0 | 75.0 |"  # CRA: shape 100, style 50 on red's images


def test_the_journals_table_2_has_a_row_per_erased_style_and_model():
    long = pd.DataFrame([{"erased": "striped", "model": m, "seed": s, "measure": k, "value": v, "samples": 64}
                         for m, s, k, v in [("original", 0, "judged (erased) ↓", 100.0), ("UCE", 0, "judged (erased) ↓", 20.0),
                                            ("UCE", 0, "FID ↓", 4.0)]])
    lines = journal.styles_table(long).splitlines()
    assert lines[0] == "| erased | model | judged (erased) ↓ | FID ↓ |"
    assert lines[2:] == ["| striped | original | 100.0 | — |", "| striped | UCE | 20.0 | 4.0 |"]  # one seed: no ±


def test_the_implicit_attribute_figure_is_drawn_from_the_artefact():
    import matplotlib.pyplot as plt

    counts = pd.DataFrame([{"model": m, "seed": 0, "class": c, "count": n, "attribute": "orange", "prompts": 13,
                            "images": 16} for m in ("original", "UCE") for c, n in (("ORANGE_STAR", 3), ("total", 3))])
    figure = journal.FIGURES["implicit_attribute"][1](counts)
    assert "'orange' on 13 implicit prompts × 16 images" in figure.axes[0].get_title()
    plt.close(figure)



# The digest of styles_attributes.CODE when STUDY_VERSION was last decided on.
PINNED_CODE_DIGEST = "653b0c1fd91deeb8b4e35c65c258bf56518f92d2024da0803a278033dd6174da"


def test_every_change_to_the_studys_code_is_a_decision_on_its_version():
    digest = styles_attributes.code_digest()
    assert digest == PINNED_CODE_DIGEST, versions.pin_message("styles_attributes", digest)
