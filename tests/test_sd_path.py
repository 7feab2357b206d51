"""The Stable Diffusion path at small scale: an SD-v1.4-shaped pipeline (512-px images, 64×64 latents, PNDM)
with random weights, and the memory and throughput rules that keep real runs within a GPU's memory."""

import gc
import shutil
import weakref

import pytest
import torch

from doco_lib import config
from doco_lib.evaluation import cache as image_cache
from doco_lib.evaluation import nudity, related
from doco_lib.evaluation.runner import EvaluatedModel, evaluate
from doco_lib.models import load_judge, load_pipeline, toy_weights_dir
from doco_lib.sampling import default_batch_size, generate
from doco_lib.studies import runs
from doco_lib.toy import sd_shaped


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return sd_shaped.build_sd14_pipeline(tmp_path_factory.mktemp("sd") / "sd14")


def test_sd_shaped_pipeline_has_sd14_configs_but_widths(sd_folder):
    pipe = load_pipeline(str(sd_folder), "cpu")
    unet, vae = pipe.unet.config, pipe.vae.config
    assert unet.sample_size == 64 and unet.layers_per_block == 2 and len(unet.block_out_channels) == 4
    assert tuple(unet.down_block_types) == sd_shaped.SD14_UNET["down_block_types"]
    assert vae.scaling_factor == 0.18215 and 2 ** (len(vae.block_out_channels) - 1) == 8
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.skip_prk_steps
    assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) == 49408
    assert pipe.text_encoder.config.max_position_embeddings == 77
    assert sd_shaped.parameter_counts(sd_folder)["unet"] == sum(p.numel() for p in pipe.unet.parameters())


def test_hub_cache_install_loads_by_hub_id_offline(sd_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    sd_shaped.install_in_hub_cache(sd_folder, sd_shaped.SD14_ID, hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pipe = load_pipeline(sd_shaped.SD14_ID, "cpu")
    assert pipe.unet.config.sample_size == 64


def test_sampling_batches_and_vae_decodes_are_bounded(sd_folder, monkeypatch):
    """An SD pipeline samples at most default_batch_size images per call (8 at 64×64 latents, not 64) and
    decodes them one at a time (VAE slicing): 64 images of 512 px at once need tens of GB."""
    pipe = load_pipeline(str(sd_folder), "cpu")
    assert default_batch_size(pipe) == 8
    assert default_batch_size(load_pipeline("toy", "cpu")) == 64
    decoded, called = [], []
    decode, call = pipe.vae._decode, type(pipe).__call__  # _decode: one slice
    monkeypatch.setattr(pipe.vae, "_decode", lambda z, *a, **k: decoded.append(len(z)) or decode(z, *a, **k))
    monkeypatch.setattr(type(pipe), "__call__", lambda self, prompt, **k: called.append(len(prompt)) or
                        call(self, prompt, **k))
    images = generate(pipe, ["a photo of a dog"] * 3, [0, 1, 2], steps=1, guidance=7.5, batch_size=2)
    assert images.shape == (3, 3, 512, 512)
    assert called == [2, 1] and decoded == [1, 1, 1]


def test_evaluation_images_of_the_base_model_are_shared_by_the_runs_of_an_output_root(tmp_path):
    """The concepts of a batch share one output root; the base model's images are generated once for all."""
    first = config.validate({"output_root": str(tmp_path), "run_name": "snoopy", "device": "cpu"})
    second = config.validate({"output_root": str(tmp_path), "run_name": "mickey", "device": "cpu"})
    base = [EvaluatedModel("SD base")]
    cache = runs.image_caches(first, base)["SD base"]
    cache.ensure(["a photo of a star"], [0], 2, 5.0)
    assert cache.generated == 1
    again = runs.image_caches(second, base)["SD base"]
    again.pipe_factory = lambda: pytest.fail("the base model's image was generated a second time")
    assert again.ensure(["a photo of a star"], [0], 2, 5.0)[0].is_file()


def test_evaluation_holds_one_pipeline_at_a_time(tmp_path, monkeypatch):
    """Each model's pipeline is released before the next one is loaded (three fp32 SD pipelines do not fit)."""
    live = []

    def loading(model, device, unet=None, **options):
        gc.collect()
        assert not [ref for ref in live if ref() is not None], "a second pipeline while the first is held"
        pipe = load_pipeline(model, device, unet=unet, **options)
        live.append(weakref.ref(pipe))
        return pipe

    monkeypatch.setattr(image_cache, "load_pipeline", loading)
    unet = str(toy_weights_dir() / "pipeline" / "unet")
    models = [EvaluatedModel("base"), EvaluatedModel("erased", unet, ["star"])]
    results, timing = evaluate("toy", models, ["star", "circle"], cache_dir=tmp_path, template_set="toy",
                               clip_model=str(toy_weights_dir() / "eval_clip"), n_templates=1,
                               images_per_template=2, steps=2, device="cpu", fid_features="judge",
                               judge=load_judge("cpu"))
    assert len(live) == 2 and timing["images_generated"] == 8
    assert set(results.model) == {"base", "erased"} and set(results.concept) == {"star", "circle"}


def test_i2p_images_are_generated_per_row_and_counted_from_files(tmp_path, repo_root):
    """Each I2P row is sampled with its own seed and guidance, and NudeNet reads the cached files one by one."""
    rows = nudity.read_i2p_csv(repo_root / "tests" / "fixtures" / "i2p_small.csv")
    params = config.validate({"output_root": str(tmp_path), "device": "cpu", "num_inference_steps": 2})
    caches = runs.image_caches(params, [EvaluatedModel("base")])
    table = nudity.i2p_counts(caches, rows, 2, nudity.NudityDetector())
    assert list(table.columns) == ["base"] and table.index[-1] == "total"
    assert all(caches["base"].path(r.prompt, r.seed, 2, r.guidance).is_file() for r in rows)
    assert caches["base"].generated == len(rows) and caches["base"]._pipe is None  # released after its rows


def test_model_key_reads_a_unet_once_per_process(tmp_path):
    unet = tmp_path / "unet"
    shutil.copytree(toy_weights_dir() / "pipeline" / "unet", unet)
    before = image_cache._digest.cache_info().misses
    first = image_cache.model_key("toy", str(unet))
    assert image_cache.model_key("toy", str(unet)) == first
    assert image_cache._digest.cache_info().misses == before + 1
    with open(unet / "diffusion_pytorch_model.safetensors", "ab") as handle:  # changed weights, a new key
        handle.write(b" ")
    assert image_cache.model_key("toy", str(unet)) != first


def test_related_ranking_pads_to_the_longest_prompt_without_changing_the_embeddings():
    pipe = load_pipeline("toy", "cpu")
    prompts = ["a photo of a star", "a photo of a very small red pentagon on stripes"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        full = torch.nn.functional.normalize(pipe.text_encoder(ids).pooler_output, dim=-1)
    assert torch.allclose(related.pooled_embeddings(pipe, prompts), full, atol=1e-5)


def test_nudity_runs_must_name_the_i2p_prompts(repo_root, tmp_path):
    with pytest.raises(config.ParamsError, match=r"i2p_csv: .*does not exist.*AIML-TUDA/i2p"):
        config.load_params(repo_root / "params" / "concepts" / "sd14_nudity.yaml")  # data/ is not shipped
    with pytest.raises(config.ParamsError, match=r"i2p_csv: concept_kind nudity .*NudeNet"):
        config.load_params(repo_root / "params" / "concepts" / "sd14_nudity.yaml", {"i2p_csv": ""})


def test_unquoted_no_in_yaml_is_explained(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("mixed_precision: no\n")
    with pytest.raises(config.ParamsError, match="mixed_precision: False is bool.*quotes, e.g. 'no'"):
        config.load_params(params)


def test_fid_needs_two_images_per_concept(tmp_path):
    params = config.validate({"n_templates": 1, "images_per_template": 1, "output_root": str(tmp_path)})
    with pytest.raises(config.ParamsError, match="FID needs at least 2"):
        runs.evaluated_models(params)  # before anything is generated


def test_demo_on_a_real_model_skips_the_toy_world_notebook(repo_root):
    from doco_lib.app.notebooks import DEMO_NOTEBOOKS, demo_notebooks

    sd = config.load_params(repo_root / "params" / "concepts" / "sd14_snoopy.yaml")
    assert demo_notebooks(sd) == DEMO_NOTEBOOKS[1:] and demo_notebooks(config.validate({}))[0] == "00_toy_world"


def test_ablation_on_a_real_model_refuses_the_toy_rgd_slots_and_sepme_pipeline(repo_root, monkeypatch):
    from doco_lib.studies import ablation

    monkeypatch.setattr(ablation, "train_run", lambda run: pytest.fail("a run started before the check"))
    sd = config.load_params(repo_root / "params" / "concepts" / "sd14_snoopy.yaml")
    with pytest.raises(config.ParamsError, match="rgd_slots_file: .*toy world's star prompts"):
        ablation.train_grid(sd, ["DoCo (cp)", "RGD"], [0])
    with pytest.raises(config.ParamsError, match="sepme_model: 'toy-wide' is a toy world"):
        ablation.train_grid({**sd, "sepme_concepts": ["Snoopy", "Mickey"]}, ["DoCo (cp)", "SepME"], [0])


def test_clip_score_and_accuracy_embed_the_images_once(monkeypatch):
    from doco_lib.evaluation.clip_metrics import ClipScorer

    scorer = ClipScorer.from_pretrained(str(toy_weights_dir() / "eval_clip"))
    images = torch.rand(4, 3, 32, 32)
    texts, anchors = ["a photo of a star"] * 4, ["a photo of a shape"] * 4
    expected = (scorer.clip_score(images, texts), scorer.clip_accuracy(images, texts, anchors))
    calls = []
    embed = scorer.image_embeddings
    monkeypatch.setattr(scorer, "image_embeddings", lambda x: calls.append(len(x)) or embed(x))
    assert scorer.scores(images, texts, anchors) == pytest.approx(expected)
    assert calls == [4]


def test_notebooks_leave_cpu_threads_to_torch(repo_root):
    """A GPU node's CPU work (NudeNet, data loading) gets every core: no notebook caps torch's threads."""
    for notebook in sorted((repo_root / "notebooks").glob("*.ipynb")):
        assert "set_num_threads" not in notebook.read_text(), notebook.name


def test_sample_and_train_defaults_follow_the_model(monkeypatch, tmp_path):
    from doco_lib.app import cli

    seen = {}
    monkeypatch.setattr("doco_lib.app.cli.check_value", lambda key, value: seen.setdefault(key, value))
    def stop(*args, **kwargs):  # the defaults are resolved before anything loads
        raise SystemExit(0)

    monkeypatch.setattr("doco_lib.app.cli.load_pipeline", stop)
    for model, steps, guidance in (("toy", 25, 5.0), (sd_shaped.SD14_ID, 50, 7.5)):
        seen.clear()
        with pytest.raises(SystemExit):
            cli.main(["sample", "--model", model, "--prompt", "a dog", "--out", str(tmp_path)])
        assert (seen["num_inference_steps"], seen["guidance_scale"]) == (steps, guidance)
    args = cli.build_parser().parse_args(["train", "--params", "p.yaml", "--set", "batch_size=2"])
    assert config.parse_overrides(args.set) == {"batch_size": 2}
