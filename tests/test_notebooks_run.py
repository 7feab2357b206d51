"""Every numbered notebook executes headlessly under papermill (tiny settings, the shipped toy world); the explorer's
widgets (06) are built without a front end here, and driven in a browser by `make ui-check`."""

import nbformat
import pandas as pd
import pytest
import yaml

TINY = {"samples_per_prompt": 1, "grid_columns": 2, "num_inference_steps": 2, "n_anchor_images": 8,
        "anchor_shard_size": 4, "iterations": 4, "warmup_iterations": 2, "checkpoint_every": 2, "batch_size": 4,
        "eval_samples": 2, "images_per_template": 1, "n_templates": 2, "esd_steps": 3,
        "ablation_variants": ["DoCo (cp)", "ConAbl", "UCE", "SPM", "SepME"], "ablation_seeds": [0, 1], "multi_concept_seeds": [0],
        "multi_concept_model": "toy-wide",
        "sequential_stages": ["star|pentagon|params/prompts/toy_pentagon.txt",
                              "heart|circle|params/prompts/toy_circle.txt"],
        "extra_prompts_file": "params/prompts/toy_extra.txt", "attack_variants": ["DoCo (cp)", "SepME"],
        "attack_attempts": 1, "attack_controls": ["noise_probe"], "attack_search_steps": 1, "attack_candidates": 2, "attack_images": 2, "attack_unlearndiff_steps": 2,
        "attack_unlearndiff_images": 2, "sepme_images": 2, "sepme_max_steps": 3, "sweep_guidance_scales": [2.0, 7.5],
        "sweep_steps": [3], "damage_variants": ["DoCo (cp)", "ConAbl"], "damage_shapes": ["star", "circle"]}


def _run_notebooks(doco, tmp_path, notebooks: list[str], **settings):
    """`doco demo --notebooks …` on tiny params (and `settings`); checks every notebook ran without an error; the run
    folder."""
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"run_name": "nb", "output_root": str(tmp_path / "out"), **TINY, **settings}))
    result = doco("demo", "--params", params, "--notebooks", *notebooks)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Passed unknown parameter" not in result.stderr  # the keys a parameters cell does not show are expected
    run = tmp_path / "out" / "nb"
    for name in notebooks:
        executed = nbformat.read(run / f"{name}.ipynb", as_version=4)
        injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1
        assert not any(o.get("output_type") == "error" for c in executed.cells for o in c.get("outputs", []))
    assert (run / "resolved_params.yaml").is_file()
    return run


def test_the_demo_notebooks_run_with_papermill(tmp_path, doco):
    """What `make demo` runs (00-04), on tiny params: the fast tier's end-to-end check."""
    run = _run_notebooks(doco, tmp_path, ["00_toy_world", "01_data_preparation", "02_discriminator_warmup",
                                          "03_adversarial_training", "04_evaluation"])
    for artefact in ("00_toy_world/judge_accuracy.csv", "01_data_preparation/anchor_images.png",
                     "02_discriminator_warmup/heldout_accuracy_by_timestep.csv", "doco/unet/config.json",
                     "03_adversarial_training/original_vs_erased.png", "04_evaluation/results.md"):
        assert (run / artefact).exists(), artefact
    resolved = yaml.safe_load((run / "03_adversarial_training" / "resolved_params.yaml").read_text())
    assert resolved["iterations"] == TINY["iterations"]  # injected though 03's parameters cell does not show it


@pytest.mark.slow
def test_the_demo_notebooks_run_on_the_toy_mmdit(tmp_path, doco):
    """`doco demo --params params/toy_mmdit.yaml` on tiny params: 00-04 on the SD 3-style toy transformer, judged."""
    run = _run_notebooks(doco, tmp_path, ["00_toy_world", "01_data_preparation", "02_discriminator_warmup",
                                          "03_adversarial_training", "04_evaluation"], model="toy-mmdit")
    assert (run / "00_toy_world" / "build_curve.png").is_file()
    assert "SD3Transformer2DModel" in (run / "doco" / "unet" / "config.json").read_text()
    judged = (run / "03_adversarial_training" / "erasure_judged.csv").read_text()
    assert "star" in judged
    assert "toy base" in (run / "04_evaluation" / "results.md").read_text()


@pytest.mark.slow
def test_the_study_notebooks_run_with_papermill(tmp_path, doco):
    run = _run_notebooks(doco, tmp_path, ["05_ablations", "06_explorer", "07_robustness", "08_sepme", "09_damage_matrix"])
    for artefact in ("05_ablations/table3.md", "05_ablations/ua_ira_cra.csv", "05_ablations/sampling_sweep.png",
                     "05_ablations/sequential.md", "05_ablations/multi_concept.md",
                     "07_robustness/attacks.png", "08_sepme/subset_rates.md", "08_sepme/criteria.md",
                     "08_sepme/subsets_grid.png",
                     "09_damage_matrix/damage_matrix.png", "09_damage_matrix/similarity.csv"):
        assert (run / artefact).exists(), artefact
    attacked = pd.read_csv(run / "07_robustness" / "attacks.csv")  # SepME beside its own base model's original
    assert set(attacked.method) == {"original", "DoCo (cp)", "original (toy-wide)", "SepME (toy-wide)"}
    assert set(attacked.prompts) == {"target", "control (circle)"}
    table3 = (run / "05_ablations" / "table3.md").read_text()
    assert "UA ↑" in table3 and "CRA ↑" in table3
    swept = pd.read_csv(run / "05_ablations" / "sampling_sweep.csv")
    assert set(zip(swept.guidance, swept.steps)) == {(2.0, 2), (7.5, 2), (5.0, 3)}  # TINY's 2 steps, guidance 5
    summary = (run / "09_damage_matrix" / "summary.md").read_text()
    assert "DoCo (cp)" in summary and "ConAbl" in summary and "Spearman" in summary
    sequential = (run / "05_ablations" / "sequential.md").read_text()
    assert "2 star, heart (toy-wide)" in sequential and "original (toy-wide)" in sequential


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uce", "spm"])
def test_notebook_03_trains_and_judges_uce_and_spm(tmp_path, doco, method):
    """Notebooks 01 and 03 with another method than DoCo (02, the discriminator's warm-up, refuses it): its
    export, curves and judged table."""
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"run_name": "nb", "output_root": str(tmp_path / "out"), **TINY, "method": method,
                                      "spm_denoising_steps": 3}))
    result = doco("demo", "--params", params, "--notebooks", "01_data_preparation", "03_adversarial_training")
    assert result.returncode == 0, result.stderr[-3000:]
    judged = pd.read_csv(tmp_path / "out" / "nb" / "03_adversarial_training" / "erasure_judged.csv")
    assert method in judged.columns and (tmp_path / "out" / "nb" / method / "unet" / "config.json").is_file()


@pytest.mark.slow
def test_notebook_10_styles_and_attribute_run_with_papermill(tmp_path, doco):
    """Toy Table 2 and toy Figure 6 on tiny settings: every artefact, a row per method, and the implicit prompts
    counted for the original model and each run (implicit_threshold 0: every candidate qualifies at 2 steps)."""
    words = tmp_path / "words.txt"
    words.write_text("apple\nocean\n")
    run = _run_notebooks(doco, tmp_path, ["10_styles_and_attributes"], study_variants=["DoCo (cp)", "UCE"],
                         study_seeds=[0, 1], style_targets=["striped"], implicit_candidates_file=str(words),
                         implicit_samples=1, implicit_threshold=0.0, implicit_images=1) / "10_styles_and_attributes"
    for artefact in ("table2.md", "styles_same_seeds.png", "candidate_colour_rates.csv", "implicit_orange_prompts.csv",
                     "implicit_counts.png", "implicit_reduction.md", "attribute_table.md"):
        assert (run / artefact).exists(), artefact
    table2 = pd.read_csv(run / "table2.csv", index_col=[0, 1])
    assert list(table2.index) == [("striped", "original"), ("striped", "DoCo (cp)"), ("striped", "UCE")]
    assert {"CS (erased) ↓", "CA (kept) ↑", "FID ↓", "UA ↑", "IRA ↑", "CRA ↑"} <= set(table2.columns)
    counts = pd.read_csv(run / "implicit_counts.csv")
    assert set(counts.model) == {"original", "DoCo (cp)", "UCE"} and set(counts.seed) == {0, 1}
    candidates = pd.read_csv(run / "candidate_colour_rates.csv")
    assert "a photo of an apple" in set(candidates.prompt) and len(counts[counts["class"] == "total"]) == 6
