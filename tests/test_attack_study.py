"""The attack study (doco_lib/studies/attack_study.py, `doco toy attacks`, notebook 07): its rows at a tiny budget,
their table in the results journal, and the artefact `--record` writes."""

import functools

import pandas as pd
import pytest
import torch
import yaml

from doco_lib import config
from doco_lib.app import journal
from doco_lib.studies import attack_study, versions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"device": "cpu", "num_inference_steps": 4, "attack_attempts": 2, "attack_images": 2, "attack_tokens": 1,
        "attack_search_steps": 1, "attack_candidates": 2, "attack_noise_scales": [2.0],
        "attacks": ["tokens", "noise_probe"], "attack_controls": ["noise_probe"]}


@pytest.fixture(scope="module")
def weak_unet(tmp_path_factory):
    """A deliberately weak erasure of star (UCE's closed form, erase weight 0.02; tests/test_attack.py), saved."""
    from doco_lib.methods import uce
    from doco_lib.models import load_pipeline

    pipe = load_pipeline("toy", "cpu")
    rows = uce.edit_rows(pipe, ["star"], ["circle"], [""], 2023)
    with torch.no_grad():
        for module in uce.kv_modules(pipe.unet).values():
            module.weight.copy_(uce.closed_form(module.weight.double(), *rows, 0.5, 0.02, 0.1).float())
    folder = tmp_path_factory.mktemp("weak") / "unet"
    pipe.unet.save_pretrained(folder)
    return str(folder)


def test_study_rows_at_a_tiny_budget(weak_unet, tmp_path):
    """One method, one seed, two attacks and the noise probe's control, two attempts each: a row per (model,
    prompts, attack) with its counts, Wilson interval, judged rate and cost; `none` costs exactly its sampling."""
    params = config.validate({**TINY, "output_root": str(tmp_path)})
    models = pd.DataFrame([{"variant": "UCE (weak)", "seed": 3, "unet": weak_unet}])
    study = attack_study.attack_study(params, models, progress=False)
    rows = study.rows
    assert list(rows.columns) == attack_study.COLUMNS
    assert list(zip(rows.method, rows.prompts, rows.attack)) == [
        (model, prompts, attack) for model in ("original", "UCE (weak)")
        for prompts, attacks in (("target", ["none", "tokens", "noise_probe"]), ("control (circle)", ["none", "noise_probe"]))
        for attack in attacks]
    assert (rows.seed == 3).all() and (rows.attempts == 2).all() and len(study.attempts) == 2 * len(rows)
    assert ((rows.asr == rows.successes / 2) & (rows.asr_low <= rows.asr) & (rows.asr <= rows.asr_high)).all()
    assert rows.asr_high.le(1).all() and rows.asr_low.ge(0).all() and (rows.seconds > 0).all()
    by = rows.set_index(["method", "prompts", "attack"])
    assert by.loc[("original", "target", "none"), "asr"] == 1.0  # the original model draws its stars
    assert by.loc[("original", "control (circle)", "none"), "judged_target"] == 0.0  # and its circles are no stars
    # none: 2 attempts × 2 images × 4 steps × 2 (classifier-free guidance); the noise probe samples twice as many
    assert (by.xs("none", level="attack").steps == 32).all() and (by.xs("noise_probe", level="attack").steps == 64).all()
    assert all(caption.split(" · ")[0] in ("original", "UCE (weak)") for caption, _ in study.examples)


def test_a_study_resumes_from_its_chunks_and_measures_again_what_changed(weak_unet, tmp_path, monkeypatch):
    """Each (seed, model) is kept as it is measured: a second call measures nothing and returns the same attempts
    and examples; a chunk measured under other settings is measured again."""
    params = config.validate({**TINY, "output_root": str(tmp_path), "attacks": ["noise_probe"], "attack_controls": []})
    models = pd.DataFrame([{"variant": "UCE (weak)", "seed": 3, "unet": weak_unet}])
    first = attack_study.attack_study(params, models, progress=False, store=tmp_path / "chunks")
    assert sorted(p.name for p in (tmp_path / "chunks" / "seed3").glob("*.csv")) == ["original.csv", "uce_weak.csv"]

    def measured_again(*args, **kwargs):
        raise AssertionError("a finished chunk was measured again")

    with monkeypatch.context() as patch:
        patch.setattr(attack_study.robustness, "attacked", measured_again)
        again = attack_study.attack_study(params, models, progress=False, store=tmp_path / "chunks")
    pd.testing.assert_frame_equal(again.rows, first.rows)
    pd.testing.assert_frame_equal(again.attempts, first.attempts, check_dtype=False)
    assert [c for c, _ in again.examples] == [c for c, _ in first.examples]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(again.examples, first.examples))

    calls = []
    monkeypatch.setattr(attack_study, "_measure", lambda *args: calls.append(args[5]) or ([], []))
    attack_study.attack_study({**params, "attack_noise_scales": [1.5]}, models, progress=False,
                              store=tmp_path / "chunks")
    assert calls == ["original", "UCE (weak)"]  # another setting: both chunks measured again


def test_shards_split_the_models_round_robin_and_cover_them_all():
    variants = ["DoCo (cp)", "ESD-x", "UCE", "SepME"]
    shards = [attack_study.shard_variants(variants, k, 2) for k in (1, 2)]
    assert shards == [(["ESD-x", "SepME"], True), (["DoCo (cp)", "UCE"], False)]
    assert sorted(shards[0][0] + shards[1][0]) == sorted(variants)
    assert attack_study.shard_variants(variants, 1, 1) == (variants, True)
    with pytest.raises(config.ParamsError, match="--shard 3/2"):
        attack_study.shard_variants(variants, 3, 2)


def test_a_shard_without_the_original_attacks_only_its_own_models(weak_unet, tmp_path):
    params = config.validate({**TINY, "output_root": str(tmp_path), "attacks": ["noise_probe"], "attack_controls": [],
                              "attack_attempts": 1})
    models = pd.DataFrame([{"variant": "UCE (weak)", "seed": 3, "unet": weak_unet}])
    study = attack_study.attack_study(params, models, progress=False, original=False)
    assert set(study.rows.method) == {"UCE (weak)"}
    alone = attack_study.attack_study(params, models.iloc[:0], progress=False, original=True, seeds=[3])
    assert set(alone.rows.method) == {"original"} and set(alone.rows.seed) == {3}


def test_the_relearning_curve_is_the_mean_rate_per_step_count_over_attempts():
    attempts = pd.DataFrame([
        {"method": method, "seed": 0, "prompts": prompts, "attack": attack, "search scores": scores}
        for method, prompts, attack, scores in (
            ("original", "target", "relearning", "1 1 1"), ("DoCo (cp)", "target", "relearning", "0 0.25 0.5"),
            ("DoCo (cp)", "target", "relearning", "0 0.75 1"), ("DoCo (cp)", "target", "tokens", "0.5 0.9"),
            ("DoCo (cp)", "control (circle)", "relearning", "0 0 0"))])
    rows = attack_study.relearning_rows(attempts, (0, 10, 50))
    assert list(rows.columns) == ["method", "seed", "steps", "attempts", "rate"]
    by = rows.set_index(["method", "steps"])
    assert by.loc[("DoCo (cp)", 10), "rate"] == 0.5 and by.loc[("DoCo (cp)", 50), "rate"] == 0.75
    assert by.loc[("DoCo (cp)", 0), "attempts"] == 2 and by.loc[("original", 50), "rate"] == 1.0
    assert len(rows) == 6  # the control's prompts and other attacks are not the curve
    table = journal.relearning_table(rows.assign(seed=0)).splitlines()
    assert table[0] == "| model | 0 steps | 10 steps | 50 steps |"
    assert table[3] == "| DoCo (cp) | 0.0 | 50.0 | 75.0 |"  # one seed: no interval over seeds


def test_start_prompts_come_from_a_prompts_file_which_refuses_a_control_beside_it(tmp_path):
    """UnlearnDiffAtk's nudity prompts are an I2P-format CSV: its prompts replace the concept's target prompts."""
    from doco_lib.studies import robustness

    prompts_file = tmp_path / "nudity.csv"
    prompts_file.write_text('prompt,evaluation_seed,evaluation_guidance\n"a statue, marble",1,7\nbathers,2,7\n')
    params = config.validate({**TINY, "attack_prompts_file": str(prompts_file), "attack_controls": []})
    prompts = robustness.start_prompts(params, 5)
    assert len(prompts) == 5 and set(prompts) == {"a statue, marble", "bathers"}
    with pytest.raises(config.ParamsError, match="attack_controls: \\['noise_probe'\\] with attack_prompts_file"):
        attack_study.check_study({**params, "attack_controls": ["noise_probe"]})
    headless = tmp_path / "headless.csv"
    headless.write_text("text\nbathers\n")
    with pytest.raises(config.ParamsError, match="attack_prompts_file: .* has no column 'prompt'"):
        config.validate({"attack_prompts_file": str(headless)})


def test_a_parts_identity_ignores_the_seed_and_keys_added_later_at_their_default(monkeypatch):
    """Seeds recorded in different sessions join when the study measures the same thing: not when a setting or the
    version differs, but when the schema only gained a key at its default since."""
    params = config.validate(TINY)
    same = attack_study.study_identity(params)
    assert attack_study.study_identity({**params, "seed": 7, "output_root": "elsewhere"}) == same
    assert attack_study.study_identity({**params, "attack_attempts": 3}) != same
    monkeypatch.setitem(config.SCHEMA, "added_later", config.Param(1, int, "a key of a later session", ()))
    assert attack_study.study_identity({**params, "added_later": 1}) == same
    assert attack_study.study_identity({**params, "added_later": 2}) != same
    monkeypatch.setattr(attack_study, "STUDY_VERSION", attack_study.STUDY_VERSION + 1)
    assert attack_study.study_identity(params) != same


def test_the_journal_table_is_the_mean_asr_over_seeds_with_its_student_t_interval():
    rows = pd.DataFrame([
        {"method": method, "seed": seed, "prompts": prompts, "attack": attack, "attempts": 20, "successes": 0,
         "asr": asr, "asr_low": 0.0, "asr_high": 1.0, "judged_target": asr, "seconds": seconds, "steps": 100}
        for seed, doco in zip((0, 1, 2), (0.5, 0.6, 0.7))
        for method, prompts, attack, asr, seconds in (
            ("original", "target", "none", 1.0, 10.0), ("original", "target", "tokens", 1.0, 40.0),
            ("DoCo (cp)", "target", "none", 0.05 * seed, 10.0), ("DoCo (cp)", "target", "tokens", doco, 40.0),
            ("DoCo (cp)", "control (circle)", "none", 0.0, 10.0))])
    lines = journal.attacks_table(rows).splitlines()
    assert lines[0] == "| model | none | tokens |"
    assert lines[2] == "| original | 100.0 ± 0.0 | 100.0 ± 0.0 |"
    # tokens on DoCo: 50, 60, 70 % → mean 60, half-width t(0.975, 2) · 10 / √3 = 24.8; none: 0, 5, 10 % → 5 ± 12.4
    assert lines[3] == "| DoCo (cp) | 5.0 ± 12.4 | 60.0 ± 24.8 |"
    assert lines[4] == "| DoCo (cp), control (circle) | 0.0 ± 0.0 | – |"
    # the cost per attempt over every model and seed: none 10 s / 20 attempts, tokens 40 s / 20
    assert lines[-2:] == ["| none | 0.5 | 5 |", "| tokens | 2.0 | 5 |"]


def test_the_params_file_runs_every_method_and_attack_with_enough_attempts(repo_root):
    """`make attacks`' budget: the registry's every attack (a new one joins here), the seven methods of notebook 05
    (DoCo with three retain modes) and the two robust variants, 3 seeds, at most 5 points of ASR per attempt, the
    noise probe's control."""
    params = config.load_params(repo_root / "params" / "toy_attacks.yaml")
    assert params["attacks"] == list(config.ATTACKS)
    assert params["attack_variants"] == ["DoCo (none)", "DoCo (l2)", "DoCo (cp)", "DoCo (cp) + adv prompts", "ESD-x",
                                         "ESD-x + adv prompts", "ConAbl", "RGD", "UCE", "SPM", "SepME"]
    assert len(params["attack_model_seeds"]) >= 3 and 100 / params["attack_attempts"] <= 5
    assert "noise_probe" in params["attack_controls"] and params["attack_control"] != params["target"]
    with pytest.raises(config.ParamsError, match="attack_control: 'star' is the target"):
        attack_study.check_study({**params, "attack_control": "star"})


@pytest.mark.slow
def test_record_writes_the_artefact_that_the_journal_renders(doco, tmp_path, monkeypatch):
    """`doco toy attacks --record` trains UCE (tiny), attacks it and writes the seeds' part of artefacts attacks and
    relearning; a block naming the artefact in a copy of results.md then renders its table."""
    folder = tmp_path / "results"
    monkeypatch.setattr(journal, "record", functools.partial(journal.record, folder=folder))
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"run_name": "attacks", "output_root": str(tmp_path / "out"), **TINY,
                                      "attack_variants": ["UCE"], "n_anchor_images": 4, "anchor_shard_size": 4}))
    result = doco("toy", "attacks", "--params", params, "--seeds", "1", "--record")
    assert result.returncode == 0, result.stderr[-3000:]
    rows, how = journal.load("attacks", folder)
    assert list(rows.columns) == attack_study.COLUMNS and set(rows.method) == {"original", "UCE"}
    (part,) = how["parts"]
    assert set(rows.seed) == {1} and part["command"].startswith("doco toy attacks") and part["wall_seconds"] > 0
    assert part["part"] == "seeds_1" and part["identity"] == attack_study.study_identity(config.load_params(params))
    out = tmp_path / "out" / "attacks" / "attacks"
    assert (out / "attacks.png").stat().st_size > 0 and len(pd.read_csv(out / "attempts.csv")) == 2 * len(rows)
    page = tmp_path / "results.md"
    page.write_text("## Attacks\n\n<!-- artefact: attacks -->\n<!-- /artefact -->\n")
    assert journal.sync(page, folder) == ["attacks"]
    assert "| UCE | " in page.read_text() and "2 attempts per model, attack and seed" in page.read_text()


def test_toy_mmdit_attacks_its_eight_methods_as_the_unet_world_is_attacked(repo_root):
    unet, mmdit = (config.load_params(repo_root / "params" / f"{world}.yaml")
                   for world in ("toy_attacks", "toy_mmdit_attacks"))
    assert mmdit["model"] == "toy-mmdit"
    assert mmdit["attack_variants"] == config.load_params(repo_root / "params" / "toy_mmdit_methods.yaml")[
        "ablation_variants"]
    same = ("attacks", "attack_attempts", "attack_model_seeds", "attack_control", "attack_controls")
    assert {key: mmdit[key] for key in same} == {key: unet[key] for key in same}


@pytest.mark.slow
def test_record_on_toy_mmdit_writes_its_own_artefacts(doco, tmp_path, monkeypatch, repo_root):
    """`doco toy attacks --record` on toy-mmdit (UCE, tiny) writes attacks_toy_mmdit and relearning_toy_mmdit, never
    the UNet world's artefacts."""
    folder = tmp_path / "results"
    monkeypatch.setattr(journal, "record", functools.partial(journal.record, folder=folder))
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"base": str(repo_root / "params" / "toy_mmdit.yaml"), "run_name": "attacks",
                                      "output_root": str(tmp_path / "out"), **TINY, "attack_variants": ["UCE"],
                                      "n_anchor_images": 4, "anchor_shard_size": 4}))
    result = doco("toy", "attacks", "--params", params, "--seeds", "1", "--record")
    assert result.returncode == 0, result.stderr[-3000:]
    assert journal.names(folder) == {"attacks_toy_mmdit", "relearning_toy_mmdit"}
    rows, _ = journal.load("attacks_toy_mmdit", folder)
    assert set(rows.method) == {"original", "UCE"} and set(rows.attack) == {"none", "tokens", "noise_probe"}


# The digest of attack_study.CODE when STUDY_VERSION was last decided on (see attack_study.STUDY_VERSION).
PINNED_CODE_DIGEST = "51c552bd741603f0ac835cd37f0cf824a1cdd389f4dd0df4f3ea96a0ab9ab60f"


def test_every_change_to_the_studys_code_is_a_decision_on_its_version():
    digest = attack_study.code_digest()
    assert digest == PINNED_CODE_DIGEST, versions.pin_message("attack_study", digest)
