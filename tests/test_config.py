
import re

import pytest
import yaml

from doco_lib import config
from doco_lib.config import ParamsError
from doco_lib.methods import registry


def write(tmp_path, values, name="params.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def test_shipped_params_files_are_valid(repo_root):
    for path in sorted((repo_root / "params").glob("*.yaml")):
        if path.name == "sd14_paper.yaml":  # the base of the SD concept files, no run: valid, but without a concept
            assert set(config.validate(config.read_params_file(path))) == set(config.SCHEMA)
            with pytest.raises(ParamsError, match="anchor_prompts_file, related_concepts, eval_concepts, "
                                                  "erased_concepts hold the toy world's data"):
                config.load_params(path)
            continue
        resolved = config.load_params(path)
        assert set(resolved) == set(config.SCHEMA)


def test_defaults_are_filled_in_and_overrides_win(tmp_path):
    resolved = config.load_params(write(tmp_path, {"seed": 5}), overrides={"grid_columns": 3})
    assert resolved["seed"] == 5 and resolved["grid_columns"] == 3
    assert resolved["num_inference_steps"] == config.SCHEMA["num_inference_steps"].default


def test_typo_key_is_rejected_with_the_closest_key(tmp_path):
    with pytest.raises(ParamsError, match=r"unknown key 'guidance_scal'.*Did you mean 'guidance_scale'"):
        config.load_params(write(tmp_path, {"guidance_scal": 3.0}))


def test_wrong_type_names_key_value_and_expected_type(tmp_path):
    with pytest.raises(ParamsError, match=r"seed: 'zero' is str, expected an integer"):
        config.load_params(write(tmp_path, {"seed": "zero"}))
    with pytest.raises(ParamsError, match="expected an integer"):
        config.load_params(write(tmp_path, {"samples_per_prompt": True}))


def test_numbers_accept_integers_but_not_strings():
    assert config.check_value("guidance_scale", 7) == 7
    with pytest.raises(ParamsError, match="guidance_scale"):
        config.check_value("guidance_scale", "7.5")


def test_out_of_range_values_are_rejected():
    with pytest.raises(ParamsError, match=r"num_inference_steps: 0 is below the minimum 1"):
        config.check_value("num_inference_steps", 0)
    with pytest.raises(ParamsError, match=r"guidance_scale: -1.0 is below the minimum"):
        config.check_value("guidance_scale", -1.0)


def test_missing_prompt_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"extra_prompts_file: file 'nowhere/prompts.txt' does not exist"):
        config.load_params(write(tmp_path, {"extra_prompts_file": "nowhere/prompts.txt"}))


def test_bad_model_device_and_run_name(tmp_path):
    with pytest.raises(ParamsError, match="no model_index.json"):
        config.check_value("model", str(tmp_path))
    with pytest.raises(ParamsError, match="is not a folder"):
        config.check_value("model", "./no/such/pipeline")
    assert config.check_value("model", "CompVis/stable-diffusion-v1-4")
    with pytest.raises(ParamsError, match="'gpu' is not a device"):
        config.check_value("device", "gpu")
    with pytest.raises(ParamsError, match="not a valid run name"):
        config.check_value("run_name", "../escape")


def test_missing_and_malformed_params_files(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        config.load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        config.load_params(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        config.load_params(bad)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        config.load_params(evil)


def test_resolved_params_are_written_to_the_run_folder(tmp_path):
    resolved = config.validate({"run_name": "r1", "output_root": str(tmp_path)})
    path = config.write_resolved(resolved, config.run_dir(resolved))
    assert path == tmp_path / "r1" / "resolved_params.yaml"
    assert yaml.safe_load(path.read_text()) == resolved


@pytest.mark.parametrize("values, expected", [
    ({"guidance_scal": 3.0}, "Did you mean 'guidance_scale'"),
    ({"seed": "zero"}, "expected an integer"),
    ({"extra_prompts_file": "missing_prompts.txt"}, "does not exist"),
])
def test_cli_rejects_bad_params_with_one_paragraph_and_no_traceback(tmp_path, doco, values, expected):
    path = write(tmp_path, {"output_root": str(tmp_path / "out"), **values})
    result = doco("demo", "--params", str(path))
    assert result.returncode == 2
    assert expected in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists(), "nothing may be written before the params are valid"


def test_command_line_overrides_are_read_as_yaml_and_validated_with_the_params(tmp_path, doco):
    assert config.parse_overrides(["multi_concept_seeds=[0, 1, 2]", "device=cpu", "sequential_keep_erased=false",
                                   "run_name=a=b"]) == {"multi_concept_seeds": [0, 1, 2], "device": "cpu",
                                                        "sequential_keep_erased": False, "run_name": "a=b"}
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        config.parse_overrides(["multi_concept_seeds"])
    with pytest.raises(ParamsError, match="is not YAML"):
        config.parse_overrides(["multi_concept_seeds=[0, 1"])
    path = write(tmp_path, {"output_root": str(tmp_path / "out")})
    result = doco("demo", "--params", str(path), "--set", "seed=zero")
    assert result.returncode == 2 and "seed" in result.stderr and "expected an integer" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing may be written before the overrides are valid"


def test_a_preservation_prompt_naming_the_target_is_rejected(tmp_path):
    prompts = tmp_path / "keep.txt"
    prompts.write_text("a red square\na blue star\n")
    with pytest.raises(ParamsError, match=r"preservation_prompts_file: .*keep.txt: prompt 2 names the target 'star'"):
        config.validate({"preservation_prompts_file": str(prompts)})


def test_a_params_file_builds_on_its_base(tmp_path, repo_root):
    (tmp_path / "base.yaml").write_text("run_name: base_run\nlr: 0.001\niterations: 7\nwarmup_iterations: 2\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nrun_name: child_run\niterations: 9\n")
    child = config.load_params(tmp_path / "child.yaml")
    assert (child["run_name"], child["lr"], child["iterations"]) == ("child_run", 0.001, 9)
    quick = config.read_params_file(repo_root / "params" / "toy_ablation_quick.yaml")
    assert quick["fidelity"] == "official" and quick["eval_samples"] == 16  # toy_world.yaml's, then its own


@pytest.mark.parametrize("text, message", [
    ("base: missing.yaml\n", "base: 'missing.yaml' is not a params file next to it"),
    ("base: loop.yaml\n", "builds on itself"),
])
def test_a_broken_base_is_named(tmp_path, text, message):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(config.ParamsError, match=message):
        config.load_params(tmp_path / "loop.yaml")


def test_notebook_setup_takes_every_key_of_the_run_shown_or_not(tmp_path):
    notebook = "03_adversarial_training"
    shown = config.shown_keys(notebook, "pipe = load(target, anchor)")
    assert {"target", "anchor", "run_name"} <= set(shown) and "iterations" not in shown
    namespace = {"output_root": str(tmp_path), "target": "heart", "iterations": 11, "warmup_iterations": 3, "print": print}
    params, out_dir = config.notebook_setup(namespace, notebook)
    assert (params["target"], params["iterations"], params["lr"]) == ("heart", 11, config.SCHEMA["lr"].default)
    assert out_dir == tmp_path / "toy_world" / notebook and (out_dir / "resolved_params.yaml").is_file()
    with pytest.raises(config.ParamsError, match="03_adversarial_training parameters: iterations"):
        config.notebook_setup({**namespace, "iterations": -1}, notebook)
    with pytest.raises(config.ParamsError, match="base: '../sd14_paper.yaml' is not resolved by papermill -f"):
        config.notebook_setup({**namespace, "base": "../sd14_paper.yaml"}, notebook)


def test_training_settings_default_to_the_schema():
    from dataclasses import fields

    from doco_lib.methods.harness import TrainingConfig
    from doco_lib.methods.registry import FIDELITY_PRESETS

    defaults = TrainingConfig()
    for field in fields(TrainingConfig):
        if field.name == "heldout_fraction":  # internal: the share of anchors held out to measure D
            continue
        expected = config.SCHEMA[field.name].default
        if expected is None and field.name in FIDELITY_PRESETS["paper"]:
            expected = FIDELITY_PRESETS["paper"][field.name]
        assert getattr(defaults, field.name) == (tuple(expected) if isinstance(expected, list) else expected), field.name
    assert TrainingConfig.from_params(config.validate({})).iterations == config.SCHEMA["iterations"].default


# -- a real model with the toy world's defaults (doco_lib.methods.registry.REAL_MODEL_RECIPE)
SD14 = "CompVis/stable-diffusion-v1-4"
# The SD file of a DoCo run on Snoopy without its base: concept and evaluation set, nothing of any method.
SD_SNOOPY = {"model": SD14, "target": "Snoopy", "anchor": "dog", "anchor_prompts_file": "params/prompts/dog.txt",
             "related_concepts": ["Mickey", "SpongeBob"], "eval_concepts": ["Snoopy", "Mickey", "SpongeBob", "dog"],
             "erased_concepts": ["Snoopy"], "clip_model": "openai/clip-vit-large-patch14", "fid_features": "inception",
             "eval_templates": "clip80", "images_per_template": 10}
# Where SPM's code and the toy world differ (spm_rank, spm_guidance, spm_anchors, ... agree).
SPM_TOY_KEYS = ("lr", "iterations", "batch_size", "max_grad_norm", "spm_alpha", "spm_anchor_strength", "spm_prompts",
                "spm_denoising_steps", "spm_lr_warmup", "spm_lr_cycles")


def toy_default_warnings(load) -> list[str]:
    """The ToyDefaultsWarning messages `load()` raises (every one, not Python's once per place)."""
    import warnings

    from doco_lib.errors import ToyDefaultsWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load()
    return [str(w.message) for w in caught if issubclass(w.category, ToyDefaultsWarning)]


def test_spm_on_sd_without_its_keys_warns_once_naming_each_toy_default_and_the_code_value(tmp_path):
    messages = toy_default_warnings(lambda: config.load_params(write(tmp_path, {**SD_SNOOPY, "method": "spm"})))
    assert len(messages) == 1
    named = re.findall(r"(\w+) \S+ \(toy ", messages[0])
    assert sorted(named) == sorted(SPM_TOY_KEYS)  # spm_rank, spm_anchors, ... agree with the code: not named
    for text in ("spm_alpha 1.0 (toy 4.0)", "spm_anchor_strength 1000.0 (toy 10.0)", "lr 0.0001 (toy 0.0003)",
                 "spm_prompts 'concept' (toy 'target_prompts')", "max_grad_norm 0.0 (toy null: 1.0 under fidelity "
                 "official)", "params/concepts/sd14_snoopy_spm.yaml"):
        assert text in messages[0], text
    notebook = toy_default_warnings(lambda: config.notebook_setup(
        {**SD_SNOOPY, "method": "spm", "output_root": str(tmp_path)}, "03_adversarial_training"))
    assert len(notebook) == 1 and notebook[0].startswith("03_adversarial_training parameters: ")
    assert sorted(re.findall(r"(\w+) \S+ \(toy ", notebook[0])) == sorted(SPM_TOY_KEYS)


def test_no_toy_default_warning_for_keys_the_params_set(tmp_path, repo_root):
    recipe = {k: v for k, v in config.read_params_file(repo_root / "params/concepts/sd14_snoopy_spm.yaml").items()
              if k in SPM_TOY_KEYS}
    assert set(recipe) == set(SPM_TOY_KEYS)
    spm = write(tmp_path, {**SD_SNOOPY, "method": "spm"}, "spm.yaml")
    with_recipe = write(tmp_path, {**SD_SNOOPY, "method": "spm", **recipe}, "recipe.yaml")
    assert not toy_default_warnings(lambda: config.load_params(with_recipe))
    assert not toy_default_warnings(lambda: config.load_params(spm, overrides=recipe))
    # Set to the toy values themselves: the user's choice.
    toy = {key: config.SCHEMA[key].default for key in SPM_TOY_KEYS}
    assert not toy_default_warnings(lambda: config.load_params(spm, overrides=toy))
    partly = toy_default_warnings(lambda: config.load_params(spm, overrides={"spm_alpha": 2.0}))
    assert len(partly) == 1 and "spm_alpha" not in partly[0] and "spm_anchor_strength" in partly[0]


@pytest.mark.parametrize("method", registry.METHODS)
def test_the_toy_world_runs_every_method_on_its_defaults_silently(tmp_path, method):
    assert not toy_default_warnings(lambda: config.load_params(write(tmp_path, {"method": method})))
    assert not toy_default_warnings(lambda: config.notebook_setup({"output_root": str(tmp_path), "method": method},
                                                                  "03_adversarial_training"))
    assert not toy_default_warnings(lambda: config.load_params(write(tmp_path, {"model": "toy-wide", "method": method})))


def test_the_shipped_sd_files_hold_their_methods_recipes(repo_root):
    i2p = {"i2p_csv": str(repo_root / "tests" / "fixtures" / "i2p_small.csv")}
    methods = set()
    for path in sorted((repo_root / "params" / "concepts").glob("sd*.yaml")):
        overrides = i2p if path.stem == "sd14_nudity" else None
        assert not toy_default_warnings(lambda: methods.add(config.load_params(path, overrides)["method"])), path
    assert methods == {"doco", "spm", "uce"}


@pytest.mark.parametrize("values, keys", [
    ({"method": "rgd"}, "rgd_slots_file holds"),
    ({"method": "doco", "retain_mode": "rgd"}, "rgd_slots_file holds"),  # DoCo with RGD's restricted gradient
    ({"method": "uce"}, "uce_preserve holds"),
    ({"clip_model": "toy", "fid_features": "judge"}, "clip_model, fid_features hold"),
])
def test_toy_data_on_a_real_model_is_refused_before_any_work(tmp_path, doco, values, keys):
    path = write(tmp_path, {**SD_SNOOPY, "output_root": str(tmp_path / "out"), **values})
    with pytest.raises(ParamsError, match=rf"{keys} the toy world's data, but model '{SD14}' is not the toy world"):
        config.load_params(path)
    result = doco("train", "--params", path)
    assert result.returncode == 2 and keys in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists(), "nothing may be written before the params are valid"
    config.load_params(write(tmp_path, {**SD_SNOOPY, **values, "model": "toy"}))  # the toy world's own data


def test_an_sd_file_without_a_concept_or_an_sd_study_without_its_stages_is_refused(tmp_path):
    with pytest.raises(ParamsError, match="anchor_prompts_file, related_concepts, eval_concepts, erased_concepts, "
                                          "clip_model, fid_features, eval_templates hold the toy world's data"):
        config.load_params(write(tmp_path, {"model": SD14}))
    namespace = {**SD_SNOOPY, "output_root": str(tmp_path), "ablation_variants": ["DoCo (cp)", "SPM"]}
    with pytest.raises(ParamsError, match="05_ablations parameters: sequential_stages holds the toy world's data"):
        config.notebook_setup(namespace, "05_ablations")
    # With its own stages, 05 warns about the toy defaults of what it trains: SPM's settings and DoCo's schedule.
    stages = ["Snoopy|dog|params/prompts/dog.txt", "Mickey|mouse|params/prompts/mouse.txt"]
    messages = toy_default_warnings(lambda: config.notebook_setup({**namespace, "sequential_stages": stages},
                                                                  "05_ablations"))
    assert len(messages) == 1 and "runs doco, spm with" in messages[0]
    assert "spm_alpha 1.0 (toy 4.0)" in messages[0] and "n_anchor_images 1000 (toy 256)" in messages[0]
