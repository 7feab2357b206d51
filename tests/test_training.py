"""DoCo training in the toy world on tiny settings: presets, resume after SIGKILL, exports."""

import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from tiny_training import tiny_trainer, train, write_params

from doco_lib.methods.harness import FIDELITY_PRESETS, TrainingConfig, select_trainable
from doco_lib.methods.prediction import predicted_x0

SIX_ITERATIONS = dict(iterations=6, warmup_iterations=2, checkpoint_every=6)  # 2 of them the warm-up


def test_presets_then_overrides():
    official = TrainingConfig.from_params({"fidelity": "official", "disc_layers": 3, "retain_weight": None})
    assert official.disc_input == "x0" and official.disc_real_source == "frozen"
    assert official.surgery_scope == "per_tensor" and official.projection == "official"
    assert official.retain_weight == FIDELITY_PRESETS["official"]["retain_weight"] and official.disc_layers == 3
    paper = TrainingConfig.from_params({"fidelity": "paper", "surgery_scope": "per_tensor"})
    assert paper.disc_input == "eps" and paper.surgery_scope == "per_tensor"


def test_trainable_selection_counts():
    from doco_lib.models import load_pipeline

    unet = load_pipeline("toy", "cpu").unet
    counts = {mode: sum(p.numel() for p in select_trainable(unet, mode).values())
              for mode in ("cross_attention_kv", "cross_attention", "non_cross_attention", "full")}
    assert 0 < counts["cross_attention_kv"] < counts["cross_attention"] < counts["full"]
    assert counts["cross_attention"] + counts["non_cross_attention"] < counts["full"]  # time embedding, conv_out
    names = select_trainable(unet, "cross_attention_kv")
    assert all("attn2.to_k" in n or "attn2.to_v" in n for n in names)


def test_predicted_x0_inverts_the_forward_process():
    alphas = torch.linspace(0.99, 0.01, 1000)
    z0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    assert torch.allclose(predicted_x0(x_t, eps, alphas, t), z0, atol=1e-5)


@pytest.mark.parametrize("fidelity, retain_mode", [("official", "cp"), ("paper", "l2"), ("paper", "none")])
def test_modes_and_presets_run_end_to_end(tmp_path, fidelity, retain_mode):
    params = write_params(tmp_path, f"{fidelity}_{retain_mode}", fidelity=fidelity, retain_mode=retain_mode,
                          iterations=6, warmup_iterations=2, checkpoint_every=3)
    result = train(params)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "outputs" / f"{fidelity}_{retain_mode}" / "doco"
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(run / "unet")
    delta = load_file(str(run / "delta.safetensors"))
    assert delta and all(("attn2.to_k" in n or "attn2.to_v" in n) for n in delta)
    assert any(v.abs().max() > 0 for v in delta.values()), "training changed nothing"
    log = (run / "training_log.csv").read_text().splitlines()
    assert len(log) == 7  # header + 6 iterations


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_equals_an_uninterrupted_run(tmp_path, doco_command):
    straight = write_params(tmp_path, "straight")
    assert train(straight).returncode == 0

    killed = write_params(tmp_path, "killed")
    run = tmp_path / "outputs" / "killed" / "doco"
    process = subprocess.Popen(doco_command + ["train", "--params", str(killed), "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoint.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "delta.safetensors").exists(), "the run finished before it could be killed"
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 40

    resumed = train(killed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "outputs" / "straight" / "doco" / "delta.safetensors"))
    b = load_file(str(run / "delta.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    d_a = load_file(str(tmp_path / "outputs" / "straight" / "doco" / "discriminator.safetensors"))
    d_b = load_file(str(run / "discriminator.safetensors"))
    assert all(torch.allclose(d_a[k].float(), d_b[k].float(), atol=1e-6) for k in d_a)


def test_changed_settings_refuse_to_resume(tmp_path):
    params = write_params(tmp_path, "changed", iterations=6, warmup_iterations=2)
    assert train(params).returncode == 0
    params.write_text(params.read_text().replace("batch_size: 4", "batch_size: 2"))
    result = train(params)
    assert result.returncode != 0 and "batch_size" in result.stderr


def test_another_methods_settings_do_not_refuse_a_resume(tmp_path):
    """A DoCo checkpoint does not depend on SPM's keys; the check still covers DoCo's own (disc_lr)."""
    params = write_params(tmp_path, "other", iterations=4, warmup_iterations=2, checkpoint_every=2)
    assert train(params).returncode == 0
    params.write_text(params.read_text().replace("iterations: 4", "iterations: 6") + "spm_alpha: 2.5\nuce_lambda: 0.3\n")
    resumed = train(params)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    params.write_text(params.read_text().replace("iterations: 6", "iterations: 8") + "disc_lr: 0.123\n")
    refused = train(params)
    assert refused.returncode != 0 and "disc_lr" in refused.stderr


def test_a_runs_identity_keeps_the_keys_it_reads_and_only_those():
    """DoCo's fourth retain mode reads RGD's α, so its checkpoint depends on rgd_*; cp's does not; SPM's on spm_*."""
    assert "rgd_alpha" in TrainingConfig(method="doco", retain_mode="rgd").training_identity()
    cp = TrainingConfig(method="doco", retain_mode="cp").training_identity()
    assert "rgd_alpha" not in cp and "spm_alpha" not in cp and "disc_lr" in cp
    assert "spm_alpha" in TrainingConfig(method="spm").training_identity()


def test_a_second_run_on_the_same_folder_refuses(tmp_path):
    from doco_lib.io import run_lock

    params = write_params(tmp_path, "locked", iterations=6, warmup_iterations=2)
    with run_lock(tmp_path / "outputs" / "locked"):
        result = train(params)
    assert result.returncode == 2 and "in use by another run" in result.stderr
    assert not (tmp_path / "outputs" / "locked" / "doco").exists()


@pytest.mark.parametrize("method, extra", [("esd", {"trainable": "cross_attention", "esd_steps": 4}),
                                           ("conabl", {"conabl_variant": "model"}),
                                           ("conabl", {"conabl_variant": "noise", "conabl_retain": False})])
def test_baselines_train_in_the_same_harness(tmp_path, method, extra):
    run_name = f"{method}_{extra.get('conabl_variant', 'x')}"
    params = write_params(tmp_path, run_name, method=method, iterations=4, warmup_iterations=0, checkpoint_every=2,
                          **extra)
    result = train(params)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "outputs" / run_name / method
    from doco_lib.methods.deltas import read_delta_metadata

    assert read_delta_metadata(run / "delta.safetensors")["method"] == method
    delta = load_file(str(run / "delta.safetensors"))
    assert any(v.abs().max() > 0 for v in delta.values())
    assert not (run / "discriminator.safetensors").exists()
    assert len((run / "training_log.csv").read_text().splitlines()) == 5
    anchors = json.loads((run.parent / "costs" / "anchors.json").read_text())  # every phase's cost is recorded
    training = json.loads((run / "costs" / "training.json").read_text())
    assert anchors["seconds"] > 0 and training["method"] == method and training["iterations"] == 4


def test_sequential_erasure_starts_from_the_previous_unet(tmp_path):
    first = write_params(tmp_path, "stage1", iterations=4, warmup_iterations=2, checkpoint_every=2)
    assert train(first).returncode == 0
    stage1_unet = tmp_path / "outputs" / "stage1" / "doco" / "unet"
    second = write_params(tmp_path, "stage2", iterations=4, warmup_iterations=2, checkpoint_every=2, target="heart",
                          base_unet=str(stage1_unet))
    result = train(second)
    assert result.returncode == 0, result.stderr[-2000:]
    from diffusers import UNet2DConditionModel

    stage1 = dict(UNet2DConditionModel.from_pretrained(stage1_unet).named_parameters())
    stage2 = dict(UNet2DConditionModel.from_pretrained(tmp_path / "outputs" / "stage2" / "doco" / "unet")
                  .named_parameters())
    delta2 = load_file(str(tmp_path / "outputs" / "stage2" / "doco" / "delta.safetensors"))
    name = next(iter(delta2))
    assert torch.allclose(stage1[name] + delta2[name], stage2[name], atol=1e-6), "stage 2 builds on stage 1"
    untrained = next(n for n in stage1 if n not in delta2)
    assert torch.equal(stage1[untrained], stage2[untrained])


def test_rgd_method_and_retain_mode_train(tmp_path):
    rgd = write_params(tmp_path, "rgd", method="rgd", trainable="full", iterations=3, warmup_iterations=0,
                       checkpoint_every=3, rgd_prompts=4)
    result = train(rgd)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "outputs" / "rgd"
    assert (run / "forget_latents" / "manifest.json").is_file() and (run / "anchor_latents" / "manifest.json").is_file()
    import json

    forget = json.loads((run / "forget_latents" / "manifest.json").read_text())["images"]
    retain = json.loads((run / "anchor_latents" / "manifest.json").read_text())["images"]
    assert [f["seed"] for f in forget] == [r["seed"] for r in retain]
    assert all(f["prompt"].replace("star", "shape") == r["prompt"] for f, r in zip(forget, retain)), "paired twins"
    log = (run / "rgd" / "training_log.csv").read_text().splitlines()
    assert log[0].startswith("step,phase,g_loss,retain_loss,truncated,cosine,fired") and len(log) == 4

    doco_rgd = write_params(tmp_path, "doco_rgd", retain_mode="rgd", iterations=4, warmup_iterations=2,
                            checkpoint_every=2)
    assert train(doco_rgd).returncode == 0


def test_a_preservation_set_joins_the_retaining_batch(tmp_path, repo_root):
    from doco_lib import config
    from doco_lib.studies import runs

    preserve = repo_root / "params" / "prompts" / "toy_preserve.txt"
    params_file = write_params(tmp_path, "preserve", preservation_prompts_file=str(preserve), n_preservation_images=6,
                               iterations=4, warmup_iterations=2, checkpoint_every=2)
    assert train(params_file).returncode == 0
    params = config.load_params(params_file)
    manifest = runs.preservation_dir(params) / "manifest.json"
    import json

    prompts = [image["prompt"] for image in json.loads(manifest.read_text())["images"]]
    assert len(prompts) == 6 and not any("star" in p for p in prompts)

    trainer = runs.make_trainer(params, runs.starting_pipeline(params))
    x_t, t, noise, c, _ = trainer._batch(trainer._sample_index(), trainer.generator)
    x_r, t_r, noise_r, c_r = trainer._retain_batch(x_t, t, noise, c)
    batch = len(x_t)
    assert len(x_r) == len(t_r) == len(noise_r) == len(c_r) == 2 * batch
    assert torch.equal(x_r[:batch], x_t) and torch.equal(c_r[:batch], c)
    encoded = trainer._encode(runs.starting_pipeline(params), sorted(set(prompts)))
    assert all(any(torch.equal(row, e) for e in encoded) for row in c_r[batch:]), "preservation prompts' embeddings"

    without = {**params, "preservation_prompts_file": ""}
    with pytest.raises(ValueError, match="other settings \\(training_data\\)"):
        runs.make_trainer(without, runs.starting_pipeline(without))


def _state(trainer) -> list:
    """Everything a training step may change, copied."""
    import copy

    return [{n: p.detach().clone() for n, p in trainer.params.items()}, copy.deepcopy(trainer.opt_g.state_dict()),
            copy.deepcopy(trainer.discriminator.state_dict()), copy.deepcopy(trainer.opt_d.state_dict()),
            trainer.generator.get_state(), torch.get_rng_state(), trainer.step, [dict(r) for r in trainer.history]]


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_the_memory_check_runs_an_adversarial_iteration_and_leaves_no_trace(tmp_path, monkeypatch):
    from doco_lib.methods.harness import TrainingDoesNotFit

    checked, plain = (tiny_trainer(tmp_path, name, **SIX_ITERATIONS) for name in ("checked", "plain"))
    for trainer in (checked, plain):
        trainer.run(until=1, progress=False)  # D and its optimizer have state, the generator has moved
    before = _state(checked)
    updates = []
    monkeypatch.setattr(checked, "apply_update", lambda update: updates.append(update))
    checked.check_memory()
    assert len(updates) == 1 and any(u.abs().max() > 0 for u in updates[0]), "an adversarial update was computed"
    _assert_same(before, _state(checked))

    def out_of_memory(update):  # after D's step and the generator update: everything changed but the weights
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 23.55 GiB of which 1.20 GiB is free. Of the allocated memory ...")

    monkeypatch.setattr(checked, "apply_update", out_of_memory)
    with pytest.raises(TrainingDoesNotFit, match=r"from iteration 3\) does not fit .*Tried to allocate 2\.00 GiB.*"
                       r"set any of: gradient_checkpointing: true; mixed_precision: auto; a smaller batch_size "
                       r"\(now 4\).*; weight_dtype: bfloat16"):
        checked.check_memory()
    _assert_same(before, _state(checked))

    monkeypatch.undo()
    checked.run(progress=False)
    plain.run(progress=False)
    _assert_same([r | {"seconds": 0} for r in plain.history], [r | {"seconds": 0} for r in checked.history])
    _assert_same(_state(plain)[:5], _state(checked)[:5])


def test_gradient_checkpointing_auto_turns_it_on_only_when_the_largest_iteration_does_not_fit(tmp_path, monkeypatch):
    """`auto` is off on a CPU; on a GPU (simulated: the check pending, an out-of-memory error without checkpointing)
    the memory check turns it on, with the pass-per-loss path it needs, and leaves no trace; when even that fails,
    the error names the keys left to set."""
    from doco_lib.methods.harness import TrainingDoesNotFit

    fits, tight, too_big = (tiny_trainer(tmp_path, name, **SIX_ITERATIONS, gradient_checkpointing="auto")
                            for name in ("fits", "tight", "too_big"))
    assert not fits.gradient_checkpointing and not fits.checkpointing_undecided and fits.joint is not None
    fits.run(until=1, progress=False)
    for trainer in (fits, tight, too_big):
        trainer.checkpointing_undecided = True  # as on a GPU
    fits.fit_memory()
    assert not fits.gradient_checkpointing and not fits.unet.is_gradient_checkpointing and fits.joint is not None

    train_step = type(tight).train_step

    def short_of_memory(trainer):
        if not trainer.gradient_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.")
        return train_step(trainer)

    monkeypatch.setattr(tight, "train_step", lambda: short_of_memory(tight))
    before = _state(tight)
    tight.fit_memory()
    assert tight.gradient_checkpointing and tight.unet.is_gradient_checkpointing and tight.joint is None
    assert not tight.checkpointing_undecided
    _assert_same(before, _state(tight))

    def never_fits():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 90.00 GiB.")

    monkeypatch.setattr(too_big, "train_step", never_fits)
    with pytest.raises(TrainingDoesNotFit, match=r"from iteration 3\) does not fit .*90\.00 GiB.*set any of: "
                       r"mixed_precision: auto; a smaller batch_size"):
        too_big.fit_memory()


def test_the_fp16_loss_scale_is_divided_out_exactly(tmp_path):
    from doco_lib.methods.harness import FP16_LOSS_SCALE

    scaled, plain = (tiny_trainer(tmp_path, name, **{**SIX_ITERATIONS, "iterations": 4}) for name in ("scaled", "plain"))
    scaled.loss_scale = FP16_LOSS_SCALE  # as under fp16 on a GPU; float32 scales by a power of two exactly
    scaled.run(progress=False)
    plain.run(progress=False)
    assert scaled.history[-1]["phase"] == "adversarial"
    _assert_same(_state(plain)[:4], _state(scaled)[:4])


def test_mixed_precision_auto_follows_the_device(monkeypatch):
    from doco_lib import config
    from doco_lib.methods.harness import resolve_precision

    assert config.validate({"mixed_precision": "auto"})["mixed_precision"] == "auto"
    with pytest.raises(config.ParamsError, match="mixed_precision: 'fp8' is not one of"):
        config.validate({"mixed_precision": "fp8"})
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    assert resolve_precision("auto", cpu) == "no" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    for native, auto in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
        assert resolve_precision("auto", gpu) == auto and resolve_precision("fp16", gpu) == "fp16"
    with pytest.raises(config.ParamsError, match="mixed_precision: bf16 needs .*Tesla V100-SXM2-32GB has none: use "
                       "auto"):
        resolve_precision("bf16", gpu)
