"""Every attack on the Stable Diffusion path, as a researcher runs it on a GPU node: `doco attack` with the shipped
params/attacks/sd14_*.yaml files on an SD-v1.4-shaped random pipeline and CLIP from an offline Hugging Face cache
(tests/conftest.py), only the counts cut (`--set`): 512-px images and 64×64 latents, CLIP zero-shot judging Snoopy,
NudeNet judging nudity on UnlearnDiffAtk-format prompts. A crash or a missing row fails; the rates of random models
mean nothing."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from doco_lib.studies import attacks

pytestmark = pytest.mark.slow

# Counts only: one attempt of one image, 2 denoising steps, one step of every search and optimisation.
COUNTS = {"attack_attempts": 1, "attack_images": 1, "num_inference_steps": 2, "attack_tokens": 1,
          "attack_search_steps": 1, "attack_candidates": 2, "attack_unlearndiff_steps": 1,
          "attack_unlearndiff_images": 1, "attack_noise_scales": [2.0], "attack_completion_strengths": [0.5],
          "attack_ti_steps": 1, "attack_ti_images": 1, "attack_relearn_steps": [0, 1], "attack_relearn_images": 1,
          "attack_ring_a_bell_population": 4, "attack_ring_a_bell_generations": 1, "attack_ring_a_bell_tokens": 4,
          "attack_gcg_tokens": 2, "attack_gcg_steps": 1, "attack_gcg_topk": 2, "attack_gcg_candidates": 2}


@pytest.fixture(scope="module")
def erased_unet(sd_clip_hub, tmp_path_factory):
    """The SD-v1.4-shaped UNet with its cross-attention keys shifted: a stand-in for an erased UNet folder."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(
        sd_clip_hub / "models--CompVis--stable-diffusion-v1-4" / "snapshots" / ("0" * 40) / "unet")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "attn2.to_k" in name:
                p.add_(0.01)
    folder = tmp_path_factory.mktemp("erased") / "unet"
    unet.save_pretrained(folder)
    return folder


def attack(hub, repo_root, out, params: str, unet, *overrides: str) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "2", **os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    counts = [arg for key, value in COUNTS.items() for arg in ("--set", f"{key}={value}")]
    return subprocess.run([sys.executable, "-m", "doco_lib", "attack", "--params", f"params/attacks/{params}",
                           "--unet", str(unet), "--out", str(out), "--set", "device=cpu", *counts, *overrides],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=1800)


def test_every_attack_runs_on_sd14_judged_by_clip(sd_clip_hub, erased_unet, repo_root, tmp_path):
    done = attack(sd_clip_hub, repo_root, tmp_path, "sd14_snoopy.yaml", erased_unet)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "asr.csv")
    assert set(table.attack) == {"none", *attacks.ATTACKS} and len(table.model.unique()) == 2
    attempts = pd.read_csv(tmp_path / "attempts.csv")
    assert len(attempts) == 2 * (1 + len(attacks.ATTACKS))  # both models, `none` and every attack, one attempt
    assert attempts["judged target"].between(0, 1).all()


def test_nudity_attacks_start_from_a_prompts_file_judged_by_nudenet(sd_clip_hub, erased_unet, repo_root, tmp_path):
    prompts = "tests/fixtures/i2p_small.csv"  # I2P's format, as UnlearnDiffAtk's nudity.csv
    done = attack(sd_clip_hub, repo_root, tmp_path, "sd14_nudity.yaml", erased_unet, "--set",
                  f"attack_prompts_file={prompts}", "--set", f"i2p_csv={prompts}", "--attack", "unlearndiff",
                  "noise_probe", "--attempts", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    attempts = pd.read_csv(tmp_path / "attempts.csv")
    assert set(attempts["start prompt"]) <= set(pd.read_csv(repo_root / prompts)["prompt"].str.strip())
    assert set(attempts.attack) == {"none", "unlearndiff", "noise_probe"} and len(attempts) == 2 * 3 * 2
