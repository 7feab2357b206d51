import json

import pandas as pd
import pytest
import torch
from scipy import stats

from doco_lib import config
from doco_lib.concepts import read_prompt_file
from doco_lib.evaluation import costs_table, rating
from doco_lib.studies import ablation


def test_confidence_interval_is_student_t():
    values = pd.Series([10.0, 12.0, 17.0])
    mean, half = rating.mean_ci(values)
    low, high = stats.t.interval(0.95, 2, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(13.0) and half == pytest.approx((high - low) / 2)
    assert rating.mean_ci(pd.Series([4.0])) == (4.0, 0.0)


def test_summary_and_tradeoff_from_judged_rates():
    judged = pd.DataFrame([
        {"model": "original", "seed": s, "prompt set": p, "rate": r}
        for s in (0, 1) for p, r in (("star", 0.9), ("circle", 0.8))
    ] + [
        {"model": "DoCo (cp)", "seed": s, "prompt set": p, "rate": r}
        for s, (star, circle) in ((0, (0.1, 0.8)), (1, (0.3, 0.7))) for p, r in (("star", star), ("circle", circle))
    ])
    summary = rating.summarise(judged)
    row = summary[(summary.model == "DoCo (cp)") & (summary["prompt set"] == "star")].iloc[0]
    assert row["mean"] == pytest.approx(20.0) and row["seeds"] == 2
    points = rating.tradeoff(judged, "star", ["circle"]).set_index("seed")
    assert points.loc[0, "target drop (pts)"] == pytest.approx(80.0)
    assert points.loc[1, "related drop (pts)"] == pytest.approx(10.0)


def test_bad_stages_and_variants_are_named(tmp_path):
    with pytest.raises(config.ParamsError, match="target\\|anchor\\|anchor prompt file"):
        ablation.parse_stage("star|pentagon")
    with pytest.raises(config.ParamsError, match="sequential_stages"):
        config.check_value("sequential_stages", ["star|pentagon|nowhere.txt"])
    with pytest.raises(config.ParamsError, match="unknown \\['DoCo \\(l1\\)'\\]"):
        ablation.train_grid(config.validate({"output_root": str(tmp_path)}), ["DoCo (l1)"], [0])
    with pytest.raises(config.ParamsError, match="list of seeds"):
        config.check_value("ablation_seeds", [0, -1])


def test_rgd_prompt_twins_and_disjoint_test_vocabulary(repo_root, tmp_path):
    from doco_lib.methods.rgd_prompts import SlotsError, load_slots, prompt_pairs

    slots = load_slots(repo_root / "params" / "prompts" / "rgd_nudity_slots.yaml")
    train = prompt_pairs(slots, "train", 800)
    test = prompt_pairs(slots, "test", 100)
    assert len(train) == 800 and len(test) == 100
    forget, retain = train[0]
    assert any(w in forget.split() for w in slots["concept_words"]) and not any(
        w in retain.split() for w in slots["concept_words"])
    train_words = {w for f, _ in train for w in f.split()}
    assert "melancholic" not in train_words and "guitar" not in train_words
    assert prompt_pairs(slots, "train", 5, seed=1) == prompt_pairs(slots, "train", 5, seed=1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("templates: ['a {colour} {concept}']\nconcept_words: [star]\ntrain: {colour: [red]}\n"
                   "test: {colour: [red]}\n")
    with pytest.raises(SlotsError, match="shares \\['red'\\] between train and test"):
        load_slots(bad)


def test_simultaneous_erasure_pools_the_concepts_and_pairs_each_with_its_target(tmp_path):
    from doco_lib.studies import runs

    params = config.validate({"output_root": str(tmp_path), "run_name": "both", "device": "cpu", "n_anchor_images": 4,
                              "anchor_shard_size": 4, "num_inference_steps": 2, "iterations": 3,
                              "warmup_iterations": 1, "batch_size": 4, "checkpoint_every": 3})
    concepts = [("star", "pentagon", "params/prompts/toy_pentagon.txt"),
                ("heart", "circle", "params/prompts/toy_circle.txt")]
    trainer = runs.make_multi_concept_trainer(params, concepts, runs.starting_pipeline(params))
    assert len(trainer.anchors) == 8
    pairs = dict(trainer.prompt_pairs)
    assert all(("pentagon" in a and t == a.replace("pentagon", "star")) or
               ("circle" in a and t == a.replace("circle", "heart")) for a, t in pairs.items())
    assert {"pentagon", "circle"} <= {w for a in pairs for w in a.split()}
    trainer.run(progress=False)
    assert (trainer.export("toy")["unet"] / "config.json").is_file()

    clash = [("star", "pentagon", "params/prompts/toy_pentagon.txt"),
             ("heart", "pentagon", "params/prompts/toy_pentagon.txt")]
    with pytest.raises(config.ParamsError, match="paired with two targets"):
        runs.make_multi_concept_trainer({**params, "run_name": "clash"}, clash,
                                              runs.starting_pipeline(params))


def test_a_sequential_stage_retains_the_earlier_targets_drawn_as_their_anchors(tmp_path):
    from doco_lib.studies import runs

    settings = {"output_root": str(tmp_path), "device": "cpu", "n_anchor_images": 8, "anchor_shard_size": 8,
                "num_inference_steps": 2, "batch_size": 4}
    star_run = config.validate({**settings, "run_name": "star"})  # star|pentagon, the defaults
    heart_run = config.validate({**settings, "run_name": "heart", "target": "heart", "anchor": "circle",
                                 "anchor_prompts_file": "params/prompts/toy_circle.txt"})
    pipe = runs.starting_pipeline(heart_run)
    star_images = runs.prepare_anchors(star_run, pipe)
    runs.prepare_anchors(heart_run, pipe)
    erased = [("star", "pentagon", "params/prompts/toy_pentagon.txt")]
    trainer = runs.make_trainer(heart_run, pipe, rehearse=erased)
    # Star's own run's anchor images, each captioned with the star prompt it was paired with there.
    assert torch.equal(trainer.rehearsal.latent_mean, star_images.latent_mean)
    assert trainer.rehearsal.prompts == [p.replace("pentagon", "star") for p in star_images.prompts]

    x_t, t, noise, c, _ = trainer._batch(trainer._sample_index(), trainer.generator)
    x_r, _, _, c_r = trainer._retain_batch(x_t, t, noise, c)
    assert len(x_r) == 2 * len(x_t)  # the anchor batch, then as many rehearsal images (no preservation set)
    captions = trainer._encode(pipe, sorted(set(trainer.rehearsal.prompts)))
    assert all(any(torch.equal(row, caption) for caption in captions) for row in c_r[len(x_t):])
    assert trainer.identity()["training_data"] != runs.make_trainer(heart_run, pipe).identity()["training_data"]
    assert ablation.run_identity(heart_run, rehearse=erased) != ablation.run_identity(heart_run)
    with pytest.raises(config.ParamsError, match="sequential_keep_erased: .* method 'esd'"):
        ablation.train_sequential(heart_run, config.SCHEMA["sequential_stages"].default, [0], "ESD-x")


def test_a_simultaneous_run_gives_each_target_a_single_runs_samples():
    params = config.validate({"iterations": 400, "warmup_iterations": 100})
    assert ablation.simultaneous_iterations(params, 1) == 400
    assert ablation.simultaneous_iterations(params, 3) == 1000  # the warm-up once, then 3 × 300


def test_real_models_are_rated_by_clip_accuracy_in_the_judges_layout(tmp_path):
    from test_evaluation import star_drawn_as_pentagon

    params = config.validate({"output_root": str(tmp_path), "device": "cpu", "num_inference_steps": 10,
                              "n_templates": 2, "images_per_template": 2})
    unet = str(star_drawn_as_pentagon(tmp_path / "erased"))  # stars erased in closed form
    grid = pd.DataFrame([{"variant": "erased", "seed": 0, "unet": unet}])
    rates = rating.clip_rates(params, grid, ["star", "circle"])
    assert set(rates.columns) == {"model", "seed", "prompt set", "rate"}
    assert set(rates.model) == {"original", "erased"} and set(rates["prompt set"]) == {"star", "circle"}
    assert rates.rate.between(0, 1).all()
    by_model = rates.pivot_table(index="prompt set", columns="model", values="rate")
    assert by_model.loc["star", "erased"] < by_model.loc["star", "original"], "CLIP accuracy sees the erasure"
    assert abs(by_model.loc["circle", "erased"] - by_model.loc["circle", "original"]) <= 0.25, "not on a kept shape"


def test_sequential_stages_retain_other_concepts_but_no_target_erased_so_far(tmp_path):
    stages = config.SCHEMA["sequential_stages"].default  # star|pentagon, heart|circle, cross|square
    params = config.validate({"output_root": str(tmp_path), "preservation_prompts_file": "params/prompts/toy_preserve.txt"})
    first, second, third = (ablation.stage_preservation_prompts(params, stages, k) for k in range(3))
    assert first == read_prompt_file("params/prompts/toy_preserve.txt")  # nothing in it names 'star'
    assert not any("heart" in p for p in second) and any("cross" in p for p in second)
    assert not any("heart" in p or "cross" in p for p in third) and any("square" in p for p in third)
    alone = config.validate({**params, "sequential_keep_erased": False})  # stage 3 trains on cross only,
    assert ablation.stage_preservation_prompts(alone, stages, 2) == third  # yet must not teach heart back
    own = tmp_path / "own.txt"
    own.write_text("a photo of a hexagon\na photo of a heart\n")
    assert ablation.stage_preservation_prompts(params, [stages[0], stages[1] + f"|{own}"], 1) == ["a photo of a hexagon"]


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    params = config.validate({"output_root": str(tmp_path), "device": "cpu", "n_anchor_images": 4,
                              "anchor_shard_size": 4, "num_inference_steps": 2, "iterations": 3,
                              "warmup_iterations": 1, "batch_size": 4, "checkpoint_every": 3})
    run = ablation.run_params(params, "DoCo (cp)", 0, ablation.VARIANTS["DoCo (cp)"])
    unet = ablation.train_run(run)
    written = (unet / "config.json").stat().st_mtime_ns
    assert ablation.train_run(run) == unet and (unet / "config.json").stat().st_mtime_ns == written
    changed = ablation.run_params({**params, "lr": 1e-3}, "DoCo (cp)", 0, ablation.VARIANTS["DoCo (cp)"])
    with pytest.raises(config.ParamsError, match="trained with other settings \\(lr\\)"):
        ablation.train_run(changed)
    # A run recorded before a setting existed was trained as its default: reused at the default, refused otherwise.
    record = unet.parent / "ablation_run.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "weight_dtype"}))
    assert ablation.train_run(run) == unet
    half = ablation.run_params({**params, "weight_dtype": "bfloat16", "mixed_precision": "bf16"}, "DoCo (cp)", 0,
                               ablation.VARIANTS["DoCo (cp)"])
    with pytest.raises(config.ParamsError, match="trained with other settings \\(.*weight_dtype\\)"):
        ablation.train_run(half)


def test_a_run_from_an_erased_unet_trains_on_the_original_models_images(tmp_path):
    from doco_lib.anchors import load_anchor_latents, prepare_anchor_latents
    from doco_lib.models import load_pipeline
    from doco_lib.studies import runs

    original = load_pipeline("toy", "cpu")
    erased = tmp_path / "erased_unet"
    with torch.no_grad():
        for name, p in original.unet.named_parameters():
            if ".attn2.to_k." in name:
                p.add_(0.5 * torch.randn_like(p))
    original.unet.save_pretrained(erased)
    params = config.validate({"output_root": str(tmp_path / "out"), "device": "cpu", "n_anchor_images": 2,
                              "anchor_shard_size": 2, "num_inference_steps": 2, "base_unet": str(erased)})
    latents = runs.prepare_anchors(params, runs.starting_pipeline(params))
    prompts = runs.concept(params)[1]
    settings = dict(model="toy", seed=0, steps=2, guidance=params["guidance_scale"], shard_size=2, progress=False)
    by_original = prepare_anchor_latents(load_pipeline("toy", "cpu"), prompts, 2, tmp_path / "a", **settings)
    by_erased = prepare_anchor_latents(runs.starting_pipeline(params), prompts, 2, tmp_path / "b", **settings)
    assert torch.equal(latents.latent_mean, by_original.latent_mean)
    assert not torch.allclose(latents.latent_mean, by_erased.latent_mean)  # the erased UNet draws otherwise
    assert load_anchor_latents(runs.anchor_dir(params), 1.0).prompts == by_original.prompts


def test_sepme_joins_the_method_grid_beside_its_own_base_model(tmp_path):
    params = config.validate({"output_root": str(tmp_path), "device": "cpu", "num_inference_steps": 2,
                              "sepme_images": 2, "anchor_shard_size": 2, "sepme_max_steps": 2,
                              "sepme_threshold": -1.0})
    grid = ablation.train_grid(params, ["SepME"], [0])
    assert list(grid.variant) == ["SepME"] and list(grid.model) == ["toy-wide"]
    assert ablation.train_grid(params, ["SepME"], [0]).equals(grid)  # the increment is reused
    cost = costs_table.training_records(grid).iloc[0]  # SepME's cost, beside the harness's methods
    assert cost["method"] == "sepme" and 0 < cost["changed params"] <= cost["trainable params"]
    assert 0 < cost["stored delta (MB)"] < cost["stored UNet (MB)"] and cost["seconds"] > 0
    judged = rating.judge_models(params, grid, ["star", "heart"], 2)
    assert set(judged.model) == {"original (toy-wide)", "SepME (toy-wide)"}  # only the base its rows use
    points = rating.tradeoff(judged, "star", ["heart"])
    wide = judged[judged.model == "original (toy-wide)"].set_index("prompt set")["rate"]
    erased = judged[judged.model == "SepME (toy-wide)"].set_index("prompt set")["rate"]
    assert list(points.model) == ["SepME (toy-wide)"]
    assert points["target drop (pts)"].iloc[0] == pytest.approx(100 * (wide["star"] - erased["star"]))
    other = config.validate({**params, "sepme_concepts": ["heart", "cross"], "sepme_restore": "heart"})
    with pytest.raises(config.ParamsError, match="sepme_concepts must name it"):
        ablation.train_grid(other, ["DoCo (cp)", "SepME"], [0])
