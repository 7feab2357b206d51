"""Every numbered notebook executes headlessly under papermill (tiny settings, the shipped toy world)."""

import subprocess

import nbformat
import pytest
import yaml

TINY = {"samples_per_prompt": 1, "grid_columns": 2, "num_inference_steps": 2, "n_anchor_images": 8,
        "anchor_shard_size": 4, "iterations": 4, "warmup_iterations": 2, "checkpoint_every": 2, "batch_size": 4,
        "eval_samples": 2, "images_per_template": 1, "n_templates": 2, "esd_steps": 3,
        "ablation_variants": ["DoCo (cp)", "ConAbl", "SepME"], "ablation_seeds": [0, 1], "multi_concept_seeds": [0],
        "multi_concept_model": "toy-wide",
        "sequential_stages": ["star|pentagon|params/prompts/toy_pentagon.txt",
                              "heart|circle|params/prompts/toy_circle.txt"],
        "extra_prompts_file": "params/prompts/toy_extra.txt", "attack_variants": ["DoCo (cp)"], "attack_attempts": 1,
        "attack_search_steps": 1, "attack_candidates": 2, "attack_images": 2, "attack_soft_steps": 2,
        "attack_soft_images": 2, "sepme_images": 2, "sepme_max_steps": 3}


@pytest.mark.slow
def test_all_notebooks_run_with_papermill(tmp_path, doco_command, repo_root):
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"run_name": "nb", "output_root": str(tmp_path / "out"), **TINY}))
    notebooks = ["00_toy_world", "01_data_preparation", "02_discriminator_warmup", "03_adversarial_training",
                 "04_evaluation", "05_ablations", "07_robustness", "08_sepme"]
    result = subprocess.run(doco_command + ["demo", "--params", str(params), "--notebooks", *notebooks],
                            capture_output=True, text=True, timeout=900, cwd=repo_root)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "out" / "nb"
    for name in notebooks:
        executed = nbformat.read(run / f"{name}.ipynb", as_version=4)
        injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1
        assert not any(o.get("output_type") == "error" for c in executed.cells for o in c.get("outputs", []))
    assert (run / "resolved_params.yaml").is_file()
    for artefact in ("00_toy_world/judge_accuracy.csv", "01_data_preparation/anchor_images.png",
                     "02_discriminator_warmup/heldout_accuracy_by_timestep.csv", "doco/unet/config.json",
                     "03_adversarial_training/original_vs_erased.png", "04_evaluation/results.md",
                     "05_ablations/table3.md", "05_ablations/sequential.md", "05_ablations/multi_concept.md",
                     "08_sepme/subset_rates.md", "08_sepme/criteria.md", "08_sepme/subsets_grid.png"):
        assert (run / artefact).exists(), artefact
    sequential = (run / "05_ablations" / "sequential.md").read_text()
    assert "2 star, heart (toy-wide)" in sequential and "original (toy-wide)" in sequential
