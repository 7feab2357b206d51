import subprocess

import pytest
import yaml

from doco_lib import config
from doco_lib.config import ParamsError


def write(tmp_path, values, name="params.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def test_shipped_params_files_are_valid(repo_root):
    for path in sorted((repo_root / "params").glob("*.yaml")):
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
def test_cli_rejects_bad_params_with_one_paragraph_and_no_traceback(tmp_path, doco_command, values, expected):
    path = write(tmp_path, {"output_root": str(tmp_path / "out"), **values})
    result = subprocess.run(doco_command + ["demo", "--params", str(path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert expected in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists(), "nothing may be written before the params are valid"


def test_command_line_overrides_are_read_as_yaml_and_validated_with_the_params(tmp_path, doco_command):
    assert config.parse_overrides(["multi_concept_seeds=[0, 1, 2]", "device=cpu", "sequential_keep_erased=false",
                                   "run_name=a=b"]) == {"multi_concept_seeds": [0, 1, 2], "device": "cpu",
                                                        "sequential_keep_erased": False, "run_name": "a=b"}
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        config.parse_overrides(["multi_concept_seeds"])
    with pytest.raises(ParamsError, match="is not YAML"):
        config.parse_overrides(["multi_concept_seeds=[0, 1"])
    path = write(tmp_path, {"output_root": str(tmp_path / "out")})
    result = subprocess.run(doco_command + ["demo", "--params", str(path), "--set", "seed=zero"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "seed" in result.stderr and "expected an integer" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing may be written before the overrides are valid"


def test_a_preservation_prompt_naming_the_target_is_rejected(tmp_path):
    prompts = tmp_path / "keep.txt"
    prompts.write_text("a red square\na blue star\n")
    with pytest.raises(ParamsError, match=r"preservation_prompts_file: .*keep.txt: prompt 2 names the target 'star'"):
        config.validate({"preservation_prompts_file": str(prompts)})
