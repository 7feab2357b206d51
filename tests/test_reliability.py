"""Reliability and security (issue 9): bad inputs, injected faults and untrusted files. Each must give a
clear error before expensive work, or be survived with nothing lost.

Every bullet of the issue is a test here, or points to one elsewhere:
- Params: test_bad_params_exit_before_any_model_is_loaded (one case per kind of mistake); the type, range and
  YAML details in tests/test_config.py.
- Data: a corrupt or truncated latent shard is regenerated, tests/test_data.py::
  test_cache_is_deterministic_and_repairs_missing_and_corrupt_shards; an image that is not an image,
  test_an_image_file_that_is_not_an_image_is_named; an I2P CSV with missing columns, tests/test_evaluation.py::
  test_i2p_csv_reading_and_errors and ::test_unreadable_i2p_csv_fails_before_generation.
- Training faults: test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint;
  test_sigkill_at_six_points_then_rerun_ends_with_the_uninterrupted_weights (kills at chosen calls, during
  checkpoint writes too); tests/test_training.py::test_sigkill_mid_training_then_rerun_equals_an_uninterrupted_run
  (a kill at a moment in time).
- Disk: test_unwritable_output_is_a_clear_error, test_a_full_disk_leaves_the_previous_file_intact,
  test_a_read_only_output_folder_is_a_clear_error_before_any_model_is_loaded, and the full disk during a
  checkpoint write in the SIGKILL test.
- Untrusted files: test_pickle_only_weights_are_refused_unless_trusted,
  test_checkpoints_are_read_without_unpickling_objects, test_every_torch_load_in_the_library_passes_weights_only;
  the safe YAML loader, tests/test_config.py::test_yaml_is_loaded_safely;
  test_params_cannot_send_writes_outside_the_run_folder.
- Concurrency: tests/test_training.py::test_a_second_run_on_the_same_folder_refuses; a killed run's lock and
  temporaries do not block its rerun, test_temporaries_of_killed_writers_are_removed_when_the_folder_is_locked.
- Determinism: test_same_params_and_seed_give_identical_cache_weights_and_metrics.
"""

import ast
import errno
import json
import math
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_training import train, train_with_fault, write_params

from doco_lib.io import CorruptFileError, atomic_directory, atomic_save_json, load_torch_checkpoint, run_lock
from doco_lib.models import ModelLoadError, check_safetensors_only, toy_weights_dir

# A run small enough to fault seven times: 12 iterations (4 of warm-up), a checkpoint every 3.
SHORT = dict(iterations=12, warmup_iterations=4, checkpoint_every=3)


# ---------------------------------------------------------------------------------------------- params
def _train_in_process(params, monkeypatch, capsys) -> tuple[int, str]:
    """`doco train --params params` in this process, failing the test if any model is loaded."""
    from diffusers import DiffusionPipeline, ModelMixin

    from doco_lib.app import cli

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_loading)
    monkeypatch.setattr(ModelMixin, "from_pretrained", no_loading)
    code = cli.main(["train", "--params", str(params), "--quiet"])
    return code, capsys.readouterr().err


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
BAD_PARAMS = [  # (values, what the message must say); {tmp} is the test's folder, with empty.txt and cats.txt
    pytest.param({"guidance_scal": 3.0}, r"unknown key 'guidance_scal'\. Did you mean 'guidance_scale'\?",
                 id="unknown-key"),
    pytest.param({"lr": "fast"}, r"lr: 'fast' is str, expected an integer or a number", id="wrong-type"),
    pytest.param({"lr": -1e-4}, r"lr: -0\.0001 must be greater than 0", id="negative-lr"),
    pytest.param({"iterations": 50, "warmup_iterations": 50},
                 r"warmup_iterations \(50\) must be smaller than iterations \(50\)", id="warmup-not-below-iterations"),
    pytest.param({"batch_size": 0}, r"batch_size: 0 is below the minimum 1", id="batch-0"),
    pytest.param({"surgery_lambda": -0.5}, r"surgery_lambda: -0\.5 is below the minimum 0\.0", id="negative-lambda"),
    pytest.param({"retain_mode": "cp", "n_anchor_images": 1}, r"n_anchor_images: 1 leaves no retain data",
                 id="cp-without-retain-images"),
    pytest.param({"retain_mode": "cp", "retain_weight": 0},
                 r"retain_weight: 0 with retain_mode 'cp' leaves no retaining term", id="cp-with-zero-retain-weight"),
    pytest.param({"method": "rgd", "rgd_slots_file": ""},
                 r"rgd_slots_file: no slots file given \(''\); method 'rgd' trains on the forget/retain prompt twins",
                 id="rgd-without-retain-prompts"),
    pytest.param({"anchor_prompts_file": "{tmp}/absent.txt"},
                 r"anchor_prompts_file: file '\S+/absent\.txt' does not exist", id="missing-prompt-file"),
    pytest.param({"anchor_prompts_file": "{tmp}/empty.txt"}, r"anchor_prompts_file: \S+/empty\.txt: no prompts",
                 id="empty-prompt-file"),
    pytest.param({"anchor_prompts_file": "{tmp}/cats.txt"},
                 r"cats\.txt: line 2 does not contain the anchor word 'pentagon': 'a photo of a cat'",
                 id="prompt-without-the-anchor-word"),
    pytest.param({"model": "{tmp}/no_such_model"}, r"model: '\S+/no_such_model' is not a folder",
                 id="model-path-missing"),
    pytest.param({"model": "{tmp}"}, r"model: '\S+' has no model_index\.json, so it is not a diffusers pipeline",
                 id="model-not-a-pipeline"),
    pytest.param({"device": "gpu"}, r"device: 'gpu' is not a device; expected 'auto', 'cpu'", id="unknown-device"),
    pytest.param({"device": "cuda"}, r"device 'cuda' was asked for but CUDA is not available", id="absent-cuda",
                 marks=NO_CUDA),
    pytest.param({"run_name": "../../etc"}, r"run_name: '\.\./\.\./etc' is not a valid run name",
                 id="run-name-escaping"),
]


@pytest.mark.parametrize("values, message", BAD_PARAMS)
def test_bad_params_exit_before_any_model_is_loaded(tmp_path, monkeypatch, capsys, values, message):
    (tmp_path / "empty.txt").write_text("# no prompt yet\n")
    (tmp_path / "cats.txt").write_text("a photo of a pentagon\na photo of a cat\n")
    values = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in values.items()}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"output_root": str(tmp_path / "outputs"), "device": "cpu", **values}))
    code, err = _train_in_process(params, monkeypatch, capsys)
    assert code == 2 and re.search(message, err), err
    assert err.startswith("doco: error:") and len(err.strip().splitlines()) == 1, "one paragraph, no traceback"
    if values.get("device") != "cuda":  # the device is checked when loading starts, after the run folder is made
        assert str(params) in err, "the message names the params file"
        assert not (tmp_path / "outputs").exists(), "nothing is written before the params are valid"


@pytest.mark.parametrize("run_name", ["../../etc", "/etc", "a/../../b", "..", ".", "~", "runs/inner", "a\\b", ""])
def test_params_cannot_send_writes_outside_the_run_folder(tmp_path, run_name):
    from doco_lib import config

    with pytest.raises(config.ParamsError, match="is not a valid run name; use letters, digits"):
        config.validate({"output_root": str(tmp_path), "run_name": run_name})
    resolved = config.validate({"output_root": str(tmp_path), "run_name": "a..b-1_c"})
    assert config.run_dir(resolved).resolve().parent == tmp_path.resolve()


def test_a_read_only_output_folder_is_a_clear_error_before_any_model_is_loaded(tmp_path, monkeypatch, capsys):
    import tempfile

    def read_only(*args, **kwargs):  # what mkstemp meets on a read-only mount (root ignores chmod)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    params = write_params(tmp_path, "ro", **SHORT)
    code, err = _train_in_process(params, monkeypatch, capsys)
    target = tmp_path / "outputs" / "ro" / "resolved_params.yaml"
    assert code == 2 and f"doco: error: {target}: Read-only file system" in err, err
    assert "rerun" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ data
def test_an_image_file_that_is_not_an_image_is_named(tmp_path):
    from PIL import Image

    from doco_lib.evaluation.cache import ImageCache

    cache = ImageCache(tmp_path, "model", pipe_factory=lambda: pytest.fail("a cached image was regenerated"))
    good, bad = cache.path("a star", 0, 2, 5.0), cache.path("a star", 1, 2, 5.0)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(good)
    assert cache.images(["a star"], [0], 2, 5.0).shape == (1, 3, 32, 32)
    for content in (b"<html>not an image</html>", good.read_bytes()[:50]):  # not an image; a truncated PNG
        bad.write_bytes(content)
        with pytest.raises(CorruptFileError, match=rf"{re.escape(str(bad))} is not a readable image .*delete it"):
            cache.images(["a star", "a star"], [0, 1], 2, 5.0)


# -------------------------------------------------------------------------------------- untrusted files
def test_pickle_only_weights_are_refused_unless_trusted(tmp_path, doco):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text((toy_weights_dir() / "pipeline" / "unet" / "config.json").read_text())
    state = load_file(str(toy_weights_dir() / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="holds only pickle weights"):
        check_safetensors_only(unet)
    check_safetensors_only(unet, trust_pickle=True)
    result = doco("sample", "--unet", str(unet), "--prompt", "a star", "-n", "1", "--steps",
                                            "2", "--device", "cpu", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "--trust-pickle" in result.stderr and "Traceback" not in result.stderr
    trusted = doco("sample", "--unet", str(unet), "--prompt", "a star", "-n", "1",
                                             "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "o"),
                                             "--trust-pickle")
    assert trusted.returncode == 0, trusted.stderr[-1000:]


def test_checkpoints_are_read_without_unpickling_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|Unsupported"):
        load_torch_checkpoint(tmp_path / "evil.pt")


def test_every_torch_load_in_the_library_passes_weights_only(repo_root):
    calls = []
    for path in sorted((repo_root / "doco_lib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{path.relative_to(repo_root)}:{node.lineno}", safe))
    assert calls, "the library loads its checkpoints with torch.load somewhere"
    assert [where for where, safe in calls if not safe] == []


# ------------------------------------------------------------------------------------------------ disk


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_output_is_a_clear_error(tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    atomic_save_json({"a": 1}, target / "kept.json")
    target.chmod(0o500)
    try:
        with pytest.raises(PermissionError) as error:
            atomic_save_json({"a": 2}, target / "kept.json")
        assert error.value.filename == str(target / "kept.json"), "the error names the file, not its temporary"
        assert (target / "kept.json").read_text().strip().endswith("}")
    finally:
        target.chmod(0o700)


def test_a_full_disk_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    atomic_save_json({"version": 1}, tmp_path / "state.json")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space") as error:
        atomic_save_json({"version": 2}, tmp_path / "state.json")
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "state.json")
    assert yaml.safe_load((tmp_path / "state.json").read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"], "no temporary file left behind"


def test_a_failed_folder_export_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "unet"
    with atomic_directory(target) as folder:
        (folder / "config.json").write_text("first")
    with pytest.raises(OSError, match="No space"):
        with atomic_directory(target) as folder:
            (folder / "config.json").write_text("second, half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (target / "config.json").read_text() == "first" and os.listdir(tmp_path) == ["unet"]
    with atomic_directory(target) as folder:
        (folder / "config.json").write_text("second")
    assert (target / "config.json").read_text() == "second" and os.listdir(tmp_path) == ["unet"]


# ------------------------------------------------------------------------------------- training faults
def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    from doco_lib import config
    from doco_lib.methods.harness import TrainingDiverged
    from doco_lib.models import load_pipeline
    from doco_lib.studies import runs

    params = config.validate({"output_root": str(tmp_path), "run_name": "nan", "n_anchor_images": 8,
                              "anchor_shard_size": 4, "num_inference_steps": 2, "iterations": 10,
                              "warmup_iterations": 2, "checkpoint_every": 3, "batch_size": 4, "device": "cpu"})
    pipe = load_pipeline("toy", "cpu")
    runs.prepare_anchors(params, pipe)
    trainer = runs.make_trainer(params, pipe)
    trainer.run(until=3, progress=False)
    saved = (trainer.checkpoint_path).read_bytes()
    with torch.no_grad():
        next(iter(trainer.params.values())).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="non-finite .* at step 3.*checkpoint.pt"):
        trainer.run(progress=False)
    assert trainer.checkpoint_path.read_bytes() == saved, "the last good checkpoint is kept"
    resumed = runs.make_trainer(params, load_pipeline("toy", "cpu"))
    assert resumed.step == 3
    resumed.run(until=4, progress=False)
    assert resumed.step == 4 and all(torch.isfinite(p).all() for p in resumed.params.values())


def _short_run(root, name):
    """Params of a SHORT run with an output root of its own (no cache shared with other runs), and its folder."""
    (root / name).mkdir()
    return write_params(root / name, name, **SHORT), root / name / "outputs" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder holding one uninterrupted SHORT run, `straight`; the tests add runs beside it."""
    root = tmp_path_factory.mktemp("runs")
    params, _ = _short_run(root, "straight")
    result = train(params)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def _temporaries(root):
    return sorted(p.name for p in root.rglob(".*.tmp"))


def _assert_every_file_is_whole(root):
    """Every checkpoint, weight file and manifest under `root` reads back (temporaries aside)."""
    for path in root.rglob("*"):
        if any(part.endswith(".tmp") for part in path.relative_to(root).parts):
            continue
        if path.suffix == ".pt":
            load_torch_checkpoint(path)
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".json":
            json.loads(path.read_text())


# Each fault hits the run where the previous one left it; the checkpoint step left behind shows that each
# rerun resumed (a rerun from scratch would leave another step). 7 faults, 6 of them SIGKILLs.
FAULTS = [  # (where, action, at its nth time in that run, checkpoint step left, temporary left)
    ("rename:manifest.json", "kill", 2, None, ".manifest.json."),  # anchor shard 0 written, not yet recorded
    ("step", "kill", 2, None, None),  # warm-up iteration 2, before any checkpoint
    ("torch.save", "kill", 2, 3, ".checkpoint.pt."),  # half of the step-6 checkpoint written
    ("rename:checkpoint.pt", "kill", 1, 3, ".checkpoint.pt."),  # step-6 checkpoint complete, not renamed
    ("torch.save", "disk-full", 1, 3, None),  # the disk fills during the step-6 checkpoint: a clear error
    ("step", "kill", 5, 6, None),  # adversarial iteration 8 of a run resumed at step 3
    ("rename:delta.safetensors", "kill", 1, 12, ".delta.safetensors."),  # export: UNet written, delta not renamed
]


@pytest.mark.slow
def test_sigkill_at_six_points_then_rerun_ends_with_the_uninterrupted_weights(runs):
    params, run = _short_run(runs, "killed")
    outputs = run.parent  # caches may live beside the run folder
    for where, action, nth, step, temporary in FAULTS:
        fault = f"{action} at {where} #{nth}"
        result = train_with_fault(params, where, action, nth)
        if action == "kill":
            assert result.returncode == -9, f"{fault}: {result.stderr[-2000:]}"
        else:
            assert result.returncode == 2 and "Traceback" not in result.stderr, f"{fault}: {result.stderr[-2000:]}"
            assert f"{run / 'doco' / 'checkpoint.pt'}: No space left on device" in result.stderr
        _assert_every_file_is_whole(outputs)
        checkpoint = run / "doco" / "checkpoint.pt"
        assert (load_torch_checkpoint(checkpoint)["step"] if checkpoint.exists() else None) == step, fault
        # Those of earlier faults are gone: the writers' processes are dead. The anchor previews (PNGs) are written by
        # a background thread beside the shards (doco_lib/anchors.py), so a kill may catch one mid-write: a preview,
        # not cached data ('kill at rename:manifest.json #2' left '.00000.png.<pid>@….tmp' in one of two full runs).
        left = [name for name in _temporaries(outputs) if ".png." not in name]
        assert left == [] if temporary is None else len(left) == 1 and left[0].startswith(temporary), (fault, left)
    assert not (run / "doco" / "delta.safetensors").exists()

    assert train(params).returncode == 0
    assert _temporaries(outputs) == []
    straight = runs / "straight" / "outputs" / "straight" / "doco"
    for name in ("delta.safetensors", "discriminator.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(run / "doco" / name))
        assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a), name
    steps = [int(line.split(",")[0]) for line in (run / "doco" / "training_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 13)), "every iteration logged once"


# ----------------------------------------------------------------------------------------- concurrency
def test_temporaries_of_killed_writers_are_removed_when_the_folder_is_locked(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(gone.stdout), os.getpid()
    stale = tmp_path / "doco" / f".checkpoint.pt.{dead}.k3j4h5g6.tmp"
    stale_folder = tmp_path / "doco" / f".unet.{dead}.a_b1c2d3.tmp"
    in_progress = tmp_path / "doco" / f".checkpoint.pt.{alive}.zz99yy88.tmp"
    users_own = tmp_path / ".notes.tmp"
    stale_folder.mkdir(parents=True)
    for path in (stale, stale_folder / "config.json", in_progress, users_own):
        path.write_text("x")
    with run_lock(tmp_path):
        assert not stale.exists() and not stale_folder.exists()
        assert in_progress.exists() and users_own.exists(), "a live writer's temporary and other files stay"


# ----------------------------------------------------------------------------------------- determinism
def test_same_params_and_seed_give_identical_cache_weights_and_metrics(runs):
    from doco_lib import config
    from doco_lib.models import load_judge
    from doco_lib.studies.runs import run_evaluation

    params, b = _short_run(runs, "again")
    assert train(params).returncode == 0
    a = runs / "straight" / "outputs" / "straight"

    shards = sorted(p.name for p in (a / "anchor_latents").glob("shard_*.safetensors"))
    assert len(shards) == 2
    assert all((a / "anchor_latents" / s).read_bytes() == (b / "anchor_latents" / s).read_bytes() for s in shards)
    manifest = json.loads((a / "anchor_latents" / "manifest.json").read_text())
    assert manifest == json.loads((b / "anchor_latents" / "manifest.json").read_text()) and manifest["shards"]

    for name in ("delta.safetensors", "discriminator.safetensors"):
        x, y = load_file(str(a / "doco" / name)), load_file(str(b / "doco" / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    logs = [pd.read_csv(run / "doco" / "training_log.csv").drop(columns="seconds") for run in (a, b)]
    assert len(logs[0]) == 12 and logs[0].equals(logs[1]), "the same losses at every step (wall time aside)"

    judge, metrics = load_judge("cpu"), []
    for run in (a, b):
        params = config.validate({"output_root": str(run), "run_name": "evaluation", "device": "cpu",
                                  "eval_models": [str(run / "doco" / "unet")], "n_templates": 1,
                                  "images_per_template": 2, "num_inference_steps": 2,
                                  "eval_concepts": ["star"], "erased_concepts": ["star"]})
        results, timing = run_evaluation(params, judge=judge)
        assert timing["images_generated"] > 0, "each evaluation generates its own images"
        metrics.append(results)
    x, y = (m["value"].astype(float).tolist() for m in metrics)
    assert len(x) == len(y) > 0 and all(u == v or math.isnan(u) and math.isnan(v) for u, v in zip(x, y)), (x, y)
    assert metrics[0][["concept", "metric"]].equals(metrics[1][["concept", "metric"]])
