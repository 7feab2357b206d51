"""Faults and untrusted files: each must give a clear error and lose nothing."""

import os
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from doco_lib.io import atomic_save_json
from doco_lib.pipeline import ModelLoadError, check_safetensors_only, toy_weights_dir


def test_pickle_only_weights_are_refused_unless_trusted(tmp_path, doco_command):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text((toy_weights_dir() / "pipeline" / "unet" / "config.json").read_text())
    state = load_file(str(toy_weights_dir() / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="holds only pickle weights"):
        check_safetensors_only(unet)
    check_safetensors_only(unet, trust_pickle=True)
    result = subprocess.run(doco_command + ["sample", "--unet", str(unet), "--prompt", "a star", "-n", "1", "--steps",
                                            "2", "--device", "cpu", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--trust-pickle" in result.stderr and "Traceback" not in result.stderr
    trusted = subprocess.run(doco_command + ["sample", "--unet", str(unet), "--prompt", "a star", "-n", "1",
                                             "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "o"),
                                             "--trust-pickle"], capture_output=True, text=True, timeout=300)
    assert trusted.returncode == 0, trusted.stderr[-1000:]


def test_checkpoints_are_read_without_unpickling_objects(tmp_path):
    from doco_lib.io import load_torch_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|Unsupported"):
        load_torch_checkpoint(tmp_path / "evil.pt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_output_is_a_clear_error(tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    atomic_save_json({"a": 1}, target / "kept.json")
    target.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            atomic_save_json({"a": 2}, target / "kept.json")
        assert (target / "kept.json").read_text().strip().endswith("}")
    finally:
        target.chmod(0o700)


def test_a_full_disk_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    atomic_save_json({"version": 1}, tmp_path / "state.json")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        atomic_save_json({"version": 2}, tmp_path / "state.json")
    assert yaml.safe_load((tmp_path / "state.json").read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"], "no temporary file left behind"


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    from doco_lib import config, experiment
    from doco_lib.pipeline import load_pipeline
    from doco_lib.training import TrainingDiverged

    params = config.validate({"output_root": str(tmp_path), "run_name": "nan", "n_anchor_images": 8,
                              "anchor_shard_size": 4, "num_inference_steps": 2, "iterations": 10,
                              "warmup_iterations": 2, "checkpoint_every": 3, "batch_size": 4, "device": "cpu"})
    pipe = load_pipeline("toy", "cpu")
    experiment.prepare_anchors(params, pipe)
    trainer = experiment.make_trainer(params, pipe)
    trainer.run(until=3, progress=False)
    saved = (trainer.checkpoint_path).read_bytes()
    with torch.no_grad():
        next(iter(trainer.params.values())).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="non-finite .* at step 3.*checkpoint.pt"):
        trainer.run(progress=False)
    assert trainer.checkpoint_path.read_bytes() == saved, "the last good checkpoint is kept"
