"""UnlearnCanvas's UA / IRA / CRA: the definition on hand-made rates (toy heads and CLIP concept lists), and the
toy judge's three heads measured on the same images."""

import math

import pandas as pd
import pytest

from doco_lib.evaluation import unlearn_canvas
from doco_lib.models import load_judge, load_pipeline
from doco_lib.toy import erasure


def _rows(model, seed, rates):
    return [{"model": model, "seed": seed, "prompt set": name, "rate": r[0], "colour rate": r[1], "style rate": r[2]}
            for name, r in rates.items()]


def test_toy_accuracies_follow_the_definition():
    rated = pd.DataFrame(_rows("erased", 0, {"star": (0.25, 0.9, 0.9), "pentagram": (0.5, 0.1, 0.1),
                                             "pentagon": (1.0, 0.8, 1.0), "circle": (0.5, 0.6, None)}))
    values = unlearn_canvas.accuracies(rated, "star", erased=["pentagram"]).set_index("prompt set")["rate"]
    assert values["UA"] == pytest.approx(0.75)  # 1 − star's rate
    assert values["IRA"] == pytest.approx(0.75)  # pentagon and circle; the synonym is an erased set
    assert values["CRA"] == pytest.approx((0.8 + 0.6 + 1.0) / 3)  # colour and style heads of the retained sets


def test_clip_accuracies_take_cross_domain_concepts_apart():
    rated = pd.DataFrame([{"model": "m", "seed": 0, "prompt set": c, "rate": r}
                          for c, r in {"Snoopy": 0.1, "dog": 0.9, "Garfield": 0.7, "Van Gogh": 0.4}.items()])
    values = unlearn_canvas.accuracies(rated, "Snoopy", cross_domain=["Van Gogh"]).set_index("prompt set")["rate"]
    assert values.to_dict() == pytest.approx({"UA": 0.9, "IRA": 0.8, "CRA": 0.4})
    no_cross = unlearn_canvas.accuracies(rated, "Snoopy").set_index("prompt set")["rate"]
    assert math.isnan(no_cross["CRA"]) and no_cross["IRA"] == pytest.approx(2 / 3)  # nothing of another kind


def test_the_table_averages_seeds_with_an_interval():
    rated = pd.DataFrame(_rows("erased", 0, {"star": (0.0, 1, 1), "circle": (1.0, 1, 1)})
                         + _rows("erased", 1, {"star": (0.5, 1, 1), "circle": (0.5, 1, 0.5)}))
    table = unlearn_canvas.table(rated, "star")
    assert list(table.columns) == ["UA ↑", "IRA ↑", "CRA ↑"]
    assert table.loc["erased", "UA ↑"].startswith("75.0 ± ") and table.loc["erased", "CRA ↑"].startswith("87.5 ± ")
    unmeasured = unlearn_canvas.table(rated.assign(**{"colour rate": None, "style rate": None}), "star")
    assert unmeasured.loc["erased", "CRA ↑"] == "—" and unmeasured.loc["erased", "IRA ↑"].startswith("75.0 ± ")
    with pytest.raises(ValueError, match="no rate for the target 'heart'"):
        unlearn_canvas.accuracies(rated, "heart")


def test_the_judge_heads_read_the_same_images(one_torch_thread):
    pipe, judge = load_pipeline("toy", "cpu"), load_judge("cpu")
    sets = erasure.prompt_sets("circle", [], 14, 0)
    heads = erasure.judged_heads(pipe, judge, sets, 10, 5.0)["circle"]
    assert heads["shape"] == erasure.judged_rates(pipe, judge, sets, 10, 5.0)["circle"] >= 0.75
    assert heads["colour"] >= 0.75 and heads["style"] >= 0.75  # the original model draws what it is asked for
