"""Sampling for speed without changing what is sampled: float16 copies that leave trained weights alone, the
sampler as a named setting, batches that follow the free memory and halve on an out-of-memory error, PNGs
written beside the sampling, each text embedded once, NudeNet in batches, and cache keys that hold every
setting that changes an image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from doco_lib import config, sampling
from doco_lib.evaluation import cache as image_cache
from doco_lib.evaluation.cache import ImageCache
from doco_lib.evaluation.runner import EvaluatedModel
from doco_lib.models import load_pipeline
from doco_lib.studies import runs
from doco_lib.toy import toy_weights_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy_pipe():
    return load_pipeline("toy", "cpu")


def test_a_half_precision_copy_leaves_the_original_as_it_is(toy_pipe):
    encoder = toy_pipe.text_encoder
    before = {name: (p.dtype, p.data_ptr(), p.detach().clone()) for name, p in encoder.named_parameters()}
    half = sampling.half_precision_copy(encoder)
    for name, p in encoder.named_parameters():
        dtype, pointer, value = before[name]
        assert p.dtype == dtype == torch.float32 and p.data_ptr() == pointer and torch.equal(p, value), name
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    halves = dict(half.named_parameters())
    assert all(torch.equal(halves[name], p.half()) for name, p in encoder.named_parameters())
    # Integer buffers (CLIP's position ids) keep their dtype; a copy shares no storage with the original.
    assert dict(half.named_buffers())["embeddings.position_ids"].dtype == torch.int64
    assert not {p.data_ptr() for p in half.parameters()} & {p.data_ptr() for p in encoder.parameters()}
    ids = toy_pipe.tokenizer(["a red star"], return_tensors="pt").input_ids
    assert torch.allclose(half.float()(ids)[0], encoder(ids)[0], atol=5e-2)


def test_the_sampler_is_swapped_for_the_call_and_put_back(toy_pipe, monkeypatch):
    used = []
    call = type(toy_pipe).__call__
    monkeypatch.setattr(type(toy_pipe), "__call__",
                        lambda self, prompt, **k: used.append(type(self.scheduler).__name__) or call(self, prompt, **k))
    prompts, seeds = ["a red star"] * 2, [0, 1]
    own = sampling.generate(toy_pipe, prompts, seeds, steps=4, guidance=5.0)
    dpm = sampling.generate(toy_pipe, prompts, seeds, steps=4, guidance=5.0, sampler="dpmsolver++")
    assert used == ["DDIMScheduler", "DPMSolverMultistepScheduler"]
    assert type(toy_pipe.scheduler).__name__ == "DDIMScheduler"
    assert dpm.shape == own.shape and not torch.equal(dpm, own)
    with pytest.raises(ValueError, match="sampler 'euler' is not one of"):
        sampling.generate(toy_pipe, prompts, seeds, steps=4, guidance=5.0, sampler="euler")


def test_the_batch_that_fits_is_a_power_of_two_within_the_free_memory():
    gib = 2 ** 30
    # 10 GiB free, 1 GiB fixed, 0.5 GiB per image: 0.85 · 10 − 1 = 7.5 GiB → 15 images → 8.
    assert sampling.batch_that_fits(10 * gib, gib, gib // 2) == 8
    assert sampling.batch_that_fits(100 * gib, gib, gib // 100) == sampling.MAX_BATCH
    assert sampling.batch_that_fits(gib, 2 * gib, gib) == 1  # nothing fits: one image, halving can do no more


def test_a_batch_that_runs_out_of_memory_is_halved_and_every_image_drawn_in_order(toy_pipe, monkeypatch):
    expected = sampling.generate(toy_pipe, ["a red star", "a blue heart", "a green cross"] * 2, list(range(6)),
                                 steps=2, guidance=5.0, batch_size=1)
    sizes = []
    call = type(toy_pipe).__call__

    def short_of_memory(self, prompt, **kwargs):
        sizes.append(len(prompt))
        if len(prompt) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return call(self, prompt, **kwargs)

    monkeypatch.setattr(type(toy_pipe), "__call__", short_of_memory)
    images = sampling.generate(toy_pipe, ["a red star", "a blue heart", "a green cross"] * 2, list(range(6)),
                               steps=2, guidance=5.0, batch_size=4)
    assert sizes == [4, 2, 2, 2]
    assert torch.allclose(images, expected, atol=1e-5)


def _cpu_and_gpu_settings(monkeypatch, gpu_name="NVIDIA H100 80GB HBM3"):
    monkeypatch.setattr(sampling, "pick_device", lambda device: torch.device("cuda" if "cuda" in device else "cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu_name)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_mmdits_sample_and_stay_frozen_in_bfloat16_where_the_gpu_has_it(monkeypatch, native_bf16):
    """SD 3.5's and FLUX.1's transformers and T5 overflow float16: on a GPU with native bfloat16 they sample, and
    their frozen original runs, in bfloat16; UNets keep float16; CPUs float32."""
    from doco_lib.methods.harness import frozen_dtype
    from doco_lib.models import half_dtype, sampling_dtype

    _cpu_and_gpu_settings(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)
    mmdit = torch.bfloat16 if native_bf16 else torch.float16
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert half_dtype("mmdit") == sampling_dtype(cuda, "mmdit") == frozen_dtype("auto", cuda, "mmdit") == mmdit
    assert half_dtype("unet") == sampling_dtype(cuda, "unet") == frozen_dtype("auto", cuda, "unet") == torch.float16
    assert sampling_dtype(cpu, "mmdit") == frozen_dtype("auto", cpu, "mmdit") == torch.float32
    assert sampling.sampling_settings("cuda", 8, kind="mmdit")["dtype"] == str(mmdit).removeprefix("torch.")


def test_every_setting_that_changes_an_image_changes_its_cache_key(monkeypatch):
    _cpu_and_gpu_settings(monkeypatch)
    base = sampling.sampling_settings("cuda", 8)
    assert base == {"device": "cuda", "dtype": "float16", "sampler": "pipeline", "gpu": "NVIDIA H100 80GB HBM3",
                    "batch_size": 8, "compiled": False}
    changed = {"device and dtype": sampling.sampling_settings("cpu", 8),
               "sampler": sampling.sampling_settings("cuda", 8, "dpmsolver++"),
               "batch size": sampling.sampling_settings("cuda", 16),
               "batch size by free memory": sampling.sampling_settings("cuda", None),
               "compilation": sampling.sampling_settings("cuda", 8, compiled=True)}
    _cpu_and_gpu_settings(monkeypatch, "NVIDIA A100-SXM4-40GB")
    changed["GPU"] = sampling.sampling_settings("cuda", 8)
    key = image_cache.model_key("toy", None, base)
    for what, settings in changed.items():
        assert image_cache.model_key("toy", None, settings) != key, what
    # On a CPU the batch size changes no float32 image: runs with other batch sizes share the images.
    assert sampling.sampling_settings("cpu", 8) == sampling.sampling_settings("cpu", 64)
    cache = ImageCache("/nonexistent", key, pipe_factory=None)
    path = cache.path("a star", 0, 25, 5.0)
    assert len({path, cache.path("a star", 0, 50, 5.0), cache.path("a star", 0, 25, 7.5),
                cache.path("a star", 1, 25, 5.0), cache.path("a stars", 0, 25, 5.0)}) == 5


def test_changing_the_sampler_misses_the_evaluation_cache_and_the_anchor_cache(tmp_path, toy_pipe):
    params = config.validate({"output_root": str(tmp_path), "device": "cpu", "n_anchor_images": 4,
                              "anchor_shard_size": 4, "num_inference_steps": 2})
    base = [EvaluatedModel("toy base")]
    runs.image_caches(params, base)["toy base"].ensure(["a red star"], [0], 2, 5.0)
    for change in ({"eval_sampler": "dpmsolver++"}, {"sample_batch_size": 0}):
        again = runs.image_caches({**params, **change}, base)["toy base"]
        generated = []
        again.pipe_factory = lambda: generated.append(1) or toy_pipe
        again.ensure(["a red star"], [0], 2, 5.0)
        assert generated == ([1] if "eval_sampler" in change else []), change

    runs.prepare_anchors(params, toy_pipe)
    caches = {path.name for path in (tmp_path / "latent_cache").iterdir()}
    for change in ({"anchor_sampler": "dpmsolver++"}, {"anchor_steps": 3}):
        runs.prepare_anchors({**params, **change, "run_name": "other"}, toy_pipe)
        now = {path.name for path in (tmp_path / "latent_cache").iterdir()}
        assert len(now - caches) == 1, change
        caches = now
    manifest = json.loads(next((tmp_path / "latent_cache").glob("*/manifest.json")).read_text())
    assert manifest["settings"]["sampling"]["sampler"] in sampling.SAMPLERS


def test_pngs_are_written_by_a_background_thread_and_a_failed_write_is_raised(tmp_path, toy_pipe, monkeypatch):
    cache = ImageCache(tmp_path, "model", pipe_factory=lambda: toy_pipe, batch_size=2)
    threads = []
    write = image_cache.write_pngs
    monkeypatch.setattr(image_cache, "write_pngs", lambda images, paths: threads.append(
        __import__("threading").current_thread().name) or write(images, paths))
    paths = cache.ensure(["a red star"] * 5, list(range(5)), 2, 5.0)
    assert all(path.is_file() for path in paths) and cache.generated == 5
    assert len(threads) == 3 and all(name.startswith("png-writer") for name in threads)
    expected = sampling.generate(toy_pipe, ["a red star"] * 5, list(range(5)), 2, 5.0)
    assert torch.allclose(cache.images(["a red star"] * 5, list(range(5)), 2, 5.0), expected, atol=1 / 255)

    def full_disk(images, paths):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image_cache, "write_pngs", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cache.ensure(["a blue heart"], [0], 2, 5.0)


def test_each_distinct_text_is_embedded_once(monkeypatch):
    from doco_lib.evaluation.clip_metrics import ClipScorer

    scorer = ClipScorer.from_pretrained(str(toy_weights_dir() / "eval_clip"))
    fresh = ClipScorer.from_pretrained(str(toy_weights_dir() / "eval_clip"))
    images = torch.rand(6, 3, 32, 32)
    texts, anchors = ["a photo of a star"] * 3 + ["a photo of a heart"] * 3, ["a photo of a shape"] * 6
    embedded = []
    features = scorer.model.get_text_features
    monkeypatch.setattr(scorer.model, "get_text_features",
                        lambda input_ids, **k: embedded.append(len(input_ids)) or features(input_ids, **k))
    first = scorer.scores(images, texts, anchors)
    second = scorer.scores(images.flip(0), texts, anchors)  # a second model's images of the same prompts
    assert embedded == [2, 1], "three distinct texts, each embedded once over both models"
    assert first == pytest.approx(fresh.scores(images, texts, anchors))
    assert second == pytest.approx(fresh.scores(images.flip(0), texts, anchors))


def test_nudenet_in_batches_gives_each_image_its_own_output():
    from doco_lib.evaluation.nudity import NudityDetector

    session = NudityDetector().detector.onnx_session
    name = session.get_inputs()[0].name
    inputs = np.random.default_rng(0).random((3, 3, 320, 320), dtype=np.float32)
    batched = session.run(None, {name: inputs})[0]
    for i in range(3):
        alone = session.run(None, {name: inputs[i:i + 1]})[0]
        np.testing.assert_allclose(batched[i:i + 1], alone, rtol=1e-4, atol=1e-4)
