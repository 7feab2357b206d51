"""The Stable Diffusion path end to end, as a researcher runs it: `doco batch` over the shipped SD v1.4 params
files, with the model and CLIP ids resolved offline from a Hugging Face cache that holds SD-v1.4-shaped random
pipelines. Only counts are cut (`--set`): 512-px images, 64×64 latents, PNDM sampling, CLIP score and accuracy,
FID Inception at 299 px and NudeNet all run as on a GPU node. It takes about 6 minutes on 2 idle cores and
over 15 in CI, on one thread beside another worker (`make test-all` prints durations); the timeout only catches a hang."""

import os
import subprocess
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

# Counts only: anchor images, iterations, batch, templates, images per template, I2P rows, denoising steps, grids.
COUNTS = {"n_anchor_images": 2, "iterations": 3, "warmup_iterations": 1, "batch_size": 2, "n_templates": 1,
          "images_per_template": 2, "i2p_csv": "tests/fixtures/i2p_small.csv", "i2p_limit": 2,
          "num_inference_steps": 2, "grid_columns": 2}


def test_doco_batch_runs_the_sd14_files_end_to_end(sd_clip_hub, tmp_path, repo_root):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    env = {"OMP_NUM_THREADS": "2", **os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(sd_clip_hub)}
    files = [repo_root / "params" / "concepts" / f"sd14_{name}.yaml" for name in ("snoopy", "nudity")]
    overrides = [arg for key, value in COUNTS.items() for arg in ("--set", f"{key}={value}")]
    done = subprocess.run([sys.executable, "-m", "doco_lib", "batch", *map(str, files), "--run-id", "sd",
                           "--output-root", str(tmp_path), "--device", "cpu", *overrides],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "sd"

    # Each concept's erased UNet loads into a StableDiffusionPipeline of the base model.
    for concept in ("sd14_snoopy", "sd14_nudity"):
        unet = UNet2DConditionModel.from_pretrained(run / concept / "doco" / "unet")
        pipe = StableDiffusionPipeline.from_pretrained(
            sd_clip_hub / "models--CompVis--stable-diffusion-v1-4" / "snapshots" / ("0" * 40), unet=unet,
            safety_checker=None, requires_safety_checker=False)
        assert pipe.unet.config.sample_size == 64
        for phase in ("anchors", "warmup", "adversarial", "evaluation"):
            assert (run / concept / "costs" / f"{phase}.json").is_file(), phase

    # The results table has every concept and both models; the nudity run has its NudeNet table.
    results = pd.read_csv(run / "sd14_snoopy" / "04_evaluation" / "results_long.csv")
    assert set(results.concept) == {"Snoopy", "Mickey", "SpongeBob", "Pikachu", "dog"}
    assert set(results.model) == {"SD base", "DoCo (sd14_snoopy)"}
    assert results[results.metric == "FID"].value.notna().sum() == 5  # the erased model's, per concept
    counts = pd.read_csv(run / "sd14_nudity" / "04_evaluation" / "nudity_counts.csv", index_col=0)
    assert list(counts.columns) == ["SD base", "DoCo (sd14_nudity)"] and "total" in counts.index
    assert (run / "sd14_nudity" / "costs" / "i2p.json").is_file()

    # Evaluation images are cached per model under the batch's folder: one base model shared by both concepts.
    assert len(list((run / "image_cache").iterdir())) == 3  # the base model and two erased UNets
    report = (run / "report.md").read_text()
    assert "sd14_snoopy | done" in report and "sd14_nudity | done" in report and "NudeNet" in report
