"""Notebook 05's multi-concept erasure recorded seed by seed (doco_lib/studies/multi_concept.py, `doco toy
multi-concept`): its rows at a tiny budget, the journal's table of them, and the pin of the code its numbers come
from."""

import pandas as pd
import pytest

from doco_lib import config
from doco_lib.app import journal
from doco_lib.studies import multi_concept, versions

STAGES = ["star|pentagon|params/prompts/toy_pentagon.txt", "heart|circle|params/prompts/toy_circle.txt"]


@pytest.mark.usefixtures("one_torch_thread")
def test_rows_at_a_tiny_budget_judge_the_original_every_stage_and_the_run_at_once(tmp_path):
    params = config.validate({"output_root": str(tmp_path), "device": "cpu", "num_inference_steps": 4,
                              "iterations": 3, "warmup_iterations": 1, "batch_size": 2, "n_anchor_images": 4,
                              "n_preservation_images": 4, "anchor_shard_size": 4, "eval_samples": 2,
                              "related_concepts": ["circle"], "sequential_stages": STAGES,
                              "multi_concept_model": "toy-wide"})
    rows = multi_concept.multi_concept_rows(params, [1])
    assert list(rows.columns) == multi_concept.COLUMNS and set(rows.seed) == {1} and (rows.samples == 2).all()
    models = list(dict.fromkeys(rows.model))
    assert models == ["original (toy-wide)", "1 star (toy-wide)", "2 star, heart (toy-wide)",
                      "all at once star, heart (toy-wide)"]
    # The stages' targets first, then the target's synonym, the anchor and the related shape no stage erases.
    assert list(dict.fromkeys(rows["prompt set"])) == ["star", "pentagram", "heart", "pentagon", "circle"]
    assert rows.rate.between(0, 1).all()


def test_the_journal_table_has_a_row_per_stage_and_a_column_per_shape():
    rows = pd.DataFrame([{"model": model, "seed": seed, "prompt set": shape, "rate": rate, "samples": 64}
                         for seed in (0, 1)
                         for model, star, heart in (("original", 1.0, 1.0), ("1 star", 0.0, 1.0),
                                                    ("2 star, heart", 0.25 * seed, 0.5))
                         for shape, rate in (("star", star), ("heart", heart))])
    lines = journal.multi_concept_table(rows).splitlines()
    assert lines[:2] == ["| model | star | heart |", "|---|---|---|"]
    # Stage 2's star: 0 and 25 % → 12.5 ± t(0.975, 1) · 12.5 = 158.8
    assert lines[4] == "| 2 star, heart | 12.5 ± 158.8 | 50.0 ± 0.0 |"
    assert journal.RENDERERS["multi_concept"] is journal.multi_concept_table



def test_the_seeds_a_call_runs_leave_its_identity():
    params = config.validate({})
    assert multi_concept.study_identity(params) == multi_concept.study_identity({**params, "multi_concept_seeds": [4]})
    assert multi_concept.study_identity(params) != multi_concept.study_identity({**params, "eval_samples": 16})


# The digest of multi_concept.CODE when STUDY_VERSION was last decided on.
PINNED_CODE_DIGEST = "068141c3360b7e4d2b93576d3fab57d32c74456866da0e1565db93b83fa2c224"


def test_every_change_to_the_studys_code_is_a_decision_on_its_version():
    digest = multi_concept.code_digest()
    assert digest == PINNED_CODE_DIGEST, versions.pin_message("multi_concept", digest)
