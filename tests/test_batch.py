"""`doco batch`: failure isolation, manifest, and resume of only what failed (toy world, tiny settings)."""

import json
import subprocess

import yaml

TINY = {"num_inference_steps": 2, "n_anchor_images": 8, "anchor_shard_size": 4, "iterations": 4,
        "warmup_iterations": 2, "checkpoint_every": 2, "batch_size": 4, "eval_samples": 2, "images_per_template": 1,
        "n_templates": 1, "grid_columns": 2, "device": "cpu", "eval_concepts": ["star", "pentagram", "circle"]}


def test_batch_isolates_a_broken_concept_and_reruns_only_it(tmp_path, doco_command, repo_root):
    concepts = tmp_path / "concepts"
    concepts.mkdir()
    (concepts / "erase_star.yaml").write_text(yaml.safe_dump({**TINY, "target": "star"}))
    (concepts / "erase_heart.yaml").write_text(yaml.safe_dump({**TINY, "target": "heart",
                                                                "eval_concepts": ["heart", "circle"],
                                                                "erased_concepts": ["heart"]}))
    broken = concepts / "erase_cross.yaml"
    broken.write_text(yaml.safe_dump({**TINY, "target": "cross", "iteratons": 4}))
    command = doco_command + ["batch", str(concepts), "--run-id", "b1", "--output-root", str(tmp_path / "out"),
                              "--notebooks", "01_data_preparation", "02_discriminator_warmup",
                              "03_adversarial_training"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=repo_root)
    assert first.returncode != 0
    assert "erase_cross" in first.stderr and "Did you mean 'iterations'" in first.stderr
    manifest = json.loads((tmp_path / "out" / "b1" / "manifest.json").read_text())
    assert manifest["git_commit"] and manifest["packages"]["torch"]
    assert manifest["concepts"]["erase_star"]["status"] == "done"
    assert manifest["concepts"]["erase_heart"]["status"] == "done"
    assert manifest["concepts"]["erase_cross"]["status"] == "failed"
    star = manifest["concepts"]["erase_star"]["notebooks"]["03_adversarial_training"]
    assert star["status"] == "done" and star["duration_s"] > 0 and star["params_hash"]
    assert (tmp_path / "out" / "b1" / "erase_star" / "doco" / "unet" / "config.json").is_file()

    broken.write_text(yaml.safe_dump({**TINY, "target": "cross"}))
    done_before = {name: manifest["concepts"][name]["notebooks"]["03_adversarial_training"]["ended"]
                   for name in ("erase_star", "erase_heart")}
    second = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=repo_root)
    assert second.returncode == 0, second.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "b1" / "manifest.json").read_text())
    assert all(entry["status"] == "done" for entry in manifest["concepts"].values())
    for name, ended in done_before.items():
        assert manifest["concepts"][name]["notebooks"]["03_adversarial_training"]["ended"] == ended, \
            f"{name} was rerun although nothing changed"
