"""Notebook 05's method comparison recorded seed by seed (doco_lib/studies/method_comparison.py, `doco toy
methods`): its rows at a tiny budget, the journal's table of them, and the pin of the code its numbers come from."""

import pandas as pd
import pytest

from doco_lib import config
from doco_lib.app import journal
from doco_lib.studies import method_comparison, versions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rows_at_a_tiny_budget_name_each_sets_role(tmp_path):
    """UCE (closed form, no training loop) and the original, 2 images per set at 4 steps."""
    params = config.validate({"output_root": str(tmp_path), "device": "cpu", "num_inference_steps": 4,
                              "related_concepts": ["pentagon", "circle"], "n_anchor_images": 4,
                              "anchor_shard_size": 4})
    studies = method_comparison.study_rows({**params, "sweep_guidance_scales": [2.0, 5.0], "sweep_steps": [3]},
                                           ["UCE"], [1], samples=2)
    rows = studies["methods"]
    assert list(rows.columns) == method_comparison.COLUMNS
    assert list(dict.fromkeys(rows.model)) == ["original", "UCE"] and set(rows.seed) == {1}
    roles = rows.drop_duplicates("prompt set").set_index("prompt set")["role"].to_dict()
    assert roles == {"star": "target", "pentagram": "erased", "pentagon": "retained", "circle": "retained"}
    assert rows.rate.between(0, 1).all() and (rows.samples == 2).all()
    assert rows.equals(method_comparison.method_rows(params, ["UCE"], [1], samples=2))  # reused, judged the same
    costs = studies["method_costs"]
    assert list(costs.columns) == method_comparison.COST_COLUMNS and list(costs.variant) == ["UCE"]
    assert costs["changed params"].iloc[0] > 0
    swept = studies["sampling_sweep"]  # each guidance at the params' 4 steps, then 3 steps at guidance 5
    assert set(zip(swept.guidance, swept.steps)) == {(2.0, 4), (5.0, 4), (5.0, 3)}
    assert set(swept.role) == {"target", "erased"} and list(dict.fromkeys(swept.model)) == ["original", "UCE"]
    lines = journal.sampling_sweep_table(swept).splitlines()
    assert lines[0] == "| model (w = guidance at 4 steps; steps at w 5) | w 2 | w 5 | 3 steps |"


def test_the_journal_table_has_each_sets_rate_then_ua_ira_cra():
    rows = pd.DataFrame([
        {"model": model, "seed": seed, "prompt set": prompt_set, "role": role, "rate": rate, "colour rate": 1.0,
         "style rate": 1.0, "samples": 64}
        for seed in (0, 1)
        for model, star, circle in (("original", 1.0, 1.0), ("DoCo (cp)", 0.1 * seed, 0.9))
        for prompt_set, role, rate in (("star", "target", star), ("pentagram", "erased", star),
                                       ("circle", "retained", circle))])
    lines = journal.methods_table(rows).splitlines()
    assert lines[0] == "| model | star | pentagram | circle | UA ↑ | IRA ↑ | CRA ↑ |"
    assert lines[1] == "|---|---|---|---|---|---|---|"
    # DoCo's star: 0 and 10 % → 5 ± t(0.975, 1) · 5 = 63.5; UA = 100 − star per seed: 95 ± 63.5; IRA = circle 90
    assert lines[3] == "| DoCo (cp) | 5.0 ± 63.5 | 5.0 ± 63.5 | 90.0 ± 0.0 | 95.0 ± 63.5 | 90.0 ± 0.0 | 100.0 ± 0.0 |"
    # One seed recorded: its rates alone, with no "± 0.0" posing as an interval over seeds.
    one_seed = journal.methods_table(rows[rows.seed == 1]).splitlines()
    assert one_seed[3] == "| DoCo (cp) | 10.0 | 10.0 | 90.0 | 90.0 | 90.0 | 100.0 |"


def test_the_journal_tables_of_the_sweep_and_the_costs():
    swept = pd.DataFrame([{"model": model, "seed": seed, "prompt set": "star", "role": "target", "guidance": g,
                           "steps": steps, "rate": rate, "samples": 64}
                          for seed in (0, 1) for model, rate in (("original", 1.0), ("UCE", 0.25 * seed))
                          for g, steps in ((1.5, 25), (5.0, 25), (5.0, 50))])
    lines = journal.sampling_sweep_table(swept).splitlines()
    assert lines[0] == "| model (w = guidance at 25 steps; steps at w 5) | w 1.5 | w 5 | 50 steps |"
    assert lines[3] == "| UCE | 12.5 ± 158.8 | 12.5 ± 158.8 | 12.5 ± 158.8 |"
    costs = pd.DataFrame([{"variant": "UCE", "seed": seed, "method": "uce", "seconds": seconds, "iterations": 1,
                           "peak memory (MB)": 1000.0, "memory": "CPU resident", "trainable params": 10,
                           "changed params": 10, "stored delta (MB)": 0.09, "stored UNet (MB)": 4.1,
                           "machine": "2 CPU cores"} for seed, seconds in ((0, 1.0), (1, 3.0))])
    lines = journal.method_costs_table(costs).splitlines()
    assert lines[0].startswith("| variant | time (s) | peak memory (MB) | trainable params |")
    assert lines[2].startswith("| UCE | 2.0 ± 12.7 | 1,000 | 10 | 10 | 0.09 | 4.1 | 2 |")


def test_the_params_file_compares_every_method_and_the_robust_variants(repo_root):
    params = config.load_params(repo_root / "params" / "toy_methods.yaml")
    attacks = config.load_params(repo_root / "params" / "toy_attacks.yaml")
    assert params["ablation_variants"] == attacks["attack_variants"] and params["eval_samples"] >= 64


def test_toy_mmdit_compares_every_method_that_trains_its_transformer_as_its_own_artefact(repo_root):
    unet = config.load_params(repo_root / "params" / "toy_methods.yaml")
    mmdit = config.load_params(repo_root / "params" / "toy_mmdit_methods.yaml")
    assert mmdit["model"] == "toy-mmdit" and mmdit["eval_samples"] >= 64
    left_out = [v for v in unet["ablation_variants"] if v not in mmdit["ablation_variants"]]
    assert left_out == ["DoCo (cp) + adv prompts", "ESD-x + adv prompts", "SepME"]
    names = [versions.artefact_name("methods", p) for p in (unet, mmdit)]
    assert names == ["methods", "methods_toy_mmdit"] and all(journal.RENDERERS[n] is journal.methods_table for n in names)



# The digest of method_comparison.CODE when STUDY_VERSION was last decided on.
PINNED_CODE_DIGEST = "7db59a0af0caab69a38463b70075eeb80467d8c3d1c973ef97839c8c2c00f1ee"


def test_every_change_to_the_studys_code_is_a_decision_on_its_version():
    digest = method_comparison.code_digest()
    assert digest == PINNED_CODE_DIGEST, versions.pin_message("method_comparison", digest)
