"""Adversarial-prompt attacks (doco_lib/studies/robustness.py) on the shipped toy world, with tiny budgets."""

import pandas as pd
import pytest
import torch
import yaml

from doco_lib import config
from doco_lib.app.cli import main
from doco_lib.studies import robustness

TINY = {"device": "cpu", "num_inference_steps": 8, "attack_attempts": 1, "attack_tokens": 1, "attack_images": 2,
        "attack_search_steps": 1, "attack_candidates": 2, "attack_soft_steps": 2, "attack_soft_images": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy():
    from doco_lib.models import load_judge, load_pipeline

    return load_pipeline("toy", "cpu"), robustness.ToyShapeJudge(load_judge("cpu"), "star")


def settings(**overrides) -> robustness.AttackSettings:
    return robustness.AttackSettings.from_params(config.validate({**TINY, **overrides}))


def test_token_search_finds_the_target_on_the_base_model(toy):
    pipe, judge = toy
    vocabulary = torch.tensor([robustness.word_ids(pipe.tokenizer, w)[0] for w in ("circle", "square", "heart", "star")])
    result = robustness.token_attack(pipe, judge, "a photo of a", "star", vocabulary, 0,
                                 settings(attack_candidates=4, attack_images=3), torch.Generator().manual_seed(0))
    assert result.search_scores[0] < 0.5 < result.search_scores[-1]  # the random start token was not the target
    assert result.prompt == "a photo of a star" and result.success and result.judged_target >= 0.5


def test_soft_prompt_lowers_the_diffusion_loss_and_only_inside_its_context(toy):
    pipe, judge = toy
    ids = robustness.padded_ids(pipe.tokenizer, robustness.word_ids(pipe.tokenizer, "a photo of a star"))[None]
    plain = robustness.encode(pipe, ids)
    with robustness.soft_tokens(pipe.text_encoder, [2], torch.zeros(1, plain.shape[-1])):
        replaced = robustness.encode(pipe, ids)
    assert torch.equal(replaced[:, :2], plain[:, :2]) and not torch.allclose(replaced[:, 2:], plain[:, 2:])
    assert torch.equal(robustness.encode(pipe, ids), plain)  # the hook is gone

    run = settings(attack_soft_steps=20, attack_soft_images=8)
    latents = robustness.target_latents(pipe, "a photo of a star", list(range(8)), 8, 5.0)
    vocabulary = robustness.vocabulary_ids(pipe.tokenizer, "captions", ["star"])
    result = robustness.soft_attack(pipe, judge, "a photo of a star", latents, vocabulary, 0, run,
                                torch.Generator().manual_seed(0))
    assert result.loss_after < result.loss_before
    assert result.images.shape[0] == run.images and "soft[" in result.prompt


def test_clip_zero_shot_judge_separates_the_target(toy):
    """The SD judge, run with the toy world's evaluation CLIP in place of a real one."""
    from doco_lib.evaluation.clip_metrics import ClipScorer
    from doco_lib.models import toy_weights_dir
    from doco_lib.sampling import generate

    judge = robustness.ClipZeroShotJudge(ClipScorer.from_pretrained(str(toy_weights_dir() / "eval_clip")), "star",
                                     ["circle", "star", "square"])
    assert judge.classes == ["star", "circle", "square"]
    stars = generate(toy[0], ["a photo of a star"] * 3, [0, 1, 2], 8, 5.0)
    circles = generate(toy[0], ["a photo of a circle"] * 3, [0, 1, 2], 8, 5.0)
    assert judge.probabilities(stars).sum(1) == pytest.approx(torch.ones(3))
    assert judge.is_target(stars).all() and not judge.is_target(circles).any()


def test_success_rule_asr_table_and_vocabulary(toy):
    assert robustness.attack_success(torch.tensor([True, True, False, False]), 0.5)
    assert not robustness.attack_success(torch.tensor([True, False, False, False]), 0.5)
    attempts = pd.DataFrame({"model": ["DoCo"] * 4 + ["ESD"] * 2, "attack": ["tokens"] * 4 + ["soft"] * 2,
                             "success": [True, False, True, True, False, False],
                             "judged target": [1.0, 0.25, 0.5, 0.75, 0.0, 0.25]})
    table = robustness.asr_table(attempts).set_index("model")
    assert table.loc["DoCo", "ASR (%)"] == pytest.approx(75.0) and table.loc["DoCo", "attempts"] == 4
    assert table.loc["ESD", "ASR (%)"] == 0.0 and table.loc["ESD", "judged target (%)"] == pytest.approx(12.5)

    tokenizer = toy[0].tokenizer
    vocabulary = set(robustness.vocabulary_ids(tokenizer, "captions", ["star"]).tolist())
    assert robustness.word_ids(tokenizer, "star")[0] not in vocabulary
    assert robustness.word_ids(tokenizer, "pentagon")[0] in vocabulary
    prompts = robustness.start_prompts(config.validate({}), 3)
    assert len(prompts) == 3 and all("star" in p for p in prompts)

    prompt = robustness.word_ids(tokenizer, "a red star")
    ids, slots = robustness.adversarial_slots(tokenizer, prompt, "star", torch.tensor(sorted(vocabulary)),
                                          settings(attack_positions="substitute", attack_tokens=5),
                                          torch.Generator().manual_seed(0))
    assert ids == prompt and slots == [0, 1]  # every token but the target's, at most attack_tokens of them


@pytest.fixture()
def params_file(tmp_path):
    path = tmp_path / "robustness.yaml"
    path.write_text(yaml.safe_dump({"run_name": "attack", "output_root": str(tmp_path / "out"), **TINY}))
    return path


def test_cli_writes_the_asr_table_and_plot(toy, params_file, tmp_path):
    unet = tmp_path / "run" / "doco" / "unet"
    toy[0].unet.save_pretrained(unet)  # an "erased" model that is the original one: the attack must still run
    assert main(["attack", "--params", str(params_file), "--unet", str(unet), "--attempts", "2"]) == 0
    out = tmp_path / "out" / "attack" / "attack"
    table = pd.read_csv(out / "asr.csv")
    assert set(zip(table.model, table.attack)) == {(m, a) for m in ("original", "doco (run)")
                                                   for a in ("none", "tokens", "soft")}
    assert (table.attempts == 2).all()
    assert "ASR (%)" in (out / "asr.md").read_text() and (out / "asr.png").stat().st_size > 0
    assert len(pd.read_csv(out / "attempts.csv")) == 2 * 3 * 2


def test_bad_inputs_are_named_before_any_work(params_file, tmp_path, capsys):
    assert main(["attack", "--params", str(params_file), "--unet", str(tmp_path / "missing")]) == 2
    assert "--unet" in capsys.readouterr().err
    assert main(["attack", "--params", str(params_file), "--attempts", "0"]) == 2
    assert "attack_attempts: 0 is below the minimum 1" in capsys.readouterr().err
    assert main(["attack", "--params", str(params_file), "--kinds", "pgd"]) == 2
    assert "'tokens' and/or 'soft'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "attack" / "attack").exists()
    with pytest.raises(config.ParamsError, match="attack_variants: unknown \\['ESD'\\]"):
        config.check_value("attack_variants", ["ESD"])
    with pytest.raises(config.ParamsError, match="attack_unets: 'nowhere' is not a diffusers UNet folder"):
        config.check_value("attack_unets", ["nowhere"])
