"""docs/results.md's tables come from committed artefacts (docs/results/, doco_lib/app/journal.py): each
generated block equals what its artefact renders, a changed number is caught, and every table sits in such a
block."""

import re
import shutil
import time

import pandas as pd
import pytest

from doco_lib.app import journal
from doco_lib.evaluation.rating import mean_ci_cell
from doco_lib.studies.retain_modes import judged_rows


def test_every_block_of_results_md_is_what_its_artefact_renders(doco):
    result = doco("results", "--check")
    assert result.returncode == 0, result.stderr
    assert journal.BLOCK.search(journal.JOURNAL.read_text()), "results.md has no table made from an artefact"


def test_every_artefact_has_a_block_and_says_how_it_was_measured():
    text = journal.JOURNAL.read_text()
    blocks = {match["name"] for match in journal.BLOCK.finditer(text)}
    artefacts = journal.names()
    assert artefacts == blocks
    for name in artefacts:
        _, how = journal.load(name)
        for part in how.get("parts", [how]):
            assert re.fullmatch(r"[0-9a-f]{40}", part["commit"]) and part["command"].startswith(("doco ", "make "))
            assert part["machine"]["torch"] and part["wall_seconds"] > 0 and part["uncommitted_changes"] == []


def test_every_table_of_results_md_comes_from_an_artefact():
    outside = journal.BLOCK.sub("", journal.JOURNAL.read_text())
    stray = re.findall(r"^\|.*$", outside, flags=re.M)
    assert not stray, f"a table that no artefact generates: {stray[0]!r}"


@pytest.fixture
def copied(tmp_path):
    """A copy of the journal and its artefacts, to change."""
    shutil.copytree(journal.ARTEFACTS, tmp_path / "results")
    shutil.copy(journal.JOURNAL, tmp_path / "results.md")
    return tmp_path / "results.md", tmp_path / "results"


def test_a_changed_number_is_caught_and_regenerated(copied):
    journal_md, folder = copied
    original = journal_md.read_text()
    block = journal.BLOCK.search(original)
    cell = re.search(r"\| (\d+\.\d) ± ", block["body"])
    changed = original[:block.start("body") + cell.start(1)] + "99.9" + original[block.start("body") + cell.end(1):]
    journal_md.write_text(changed)
    assert journal.sync(journal_md, folder, check=True) == [block["name"]]
    assert journal_md.read_text() == changed  # --check changes nothing
    assert journal.sync(journal_md, folder) == [block["name"]] and journal_md.read_text() == original


def test_a_block_naming_a_missing_artefact_is_an_error(copied):
    journal_md, folder = copied
    journal_md.write_text("## A\n\n<!-- artefact: nowhere -->\n| x |\n<!-- /artefact -->\n")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        journal.sync(journal_md, folder, check=True)


def test_retain_mode_cells_are_means_with_student_t_intervals_over_seeds():
    table = pd.DataFrame({"prompt set": ["star", "circle"] * 3, "seed": [0, 0, 1, 1, 2, 2],
                          "original": [1.0, 1.0, 1.0, 0.9, 1.0, 1.0], "DoCo (cp)": [0.5, 1, 0.6, 1, 0.7, 1],
                          "DoCo (cp) Δ (pts)": [-50, 0, -40, 10, -30, 0]})
    rows = judged_rows(table, samples=64)
    assert list(rows.columns) == ["seed", "model", "prompt set", "samples", "rate"] and len(rows) == 12
    lines = journal.retain_modes_table(rows).splitlines()
    assert lines[0] == "| prompt set | original | DoCo (cp) |"
    # star under cp: 50, 60, 70 % → mean 60, half-width t(0.975, 2) · s / √3 = 4.303 · 10 / 1.732 = 24.8
    assert lines[2] == "| star | 100.0 ± 0.0 | 60.0 ± 24.8 |"
    assert lines[3] == "| circle | 96.7 ± 14.3 | 100.0 ± 0.0 |"


def test_the_loras_difference_from_the_full_weights_is_taken_per_seed_then_averaged():
    rates = {"original": [1.0, 1.0, 1.0], "full weights": [0.10, 0.20, 0.30], "LoRA": [0.10, 0.25, 0.30]}
    rows = pd.DataFrame([{"seed": seed, "model": model, "prompt set": "star", "samples": 64, "rate": rate[seed],
                          "energy": 0.99, "lora_layers": 14, "rank_mean": 11.5 + seed, "diffusers_kib": 55.0}
                         for model, rate in rates.items() for seed in range(3)])
    text = journal.lora_export_table(rows)
    lines = text.splitlines()
    assert lines[0] == "| prompt set | original | full weights | LoRA | LoRA − full (pts) |"
    # LoRA − full: 0, 5, 0 points → mean 1.7, half-width 4.303 · 2.887 / √3 = 7.2
    assert lines[2] == "| star | 100.0 ± 0.0 | 20.0 ± 24.8 | 21.7 ± 25.9 | 1.7 ± 7.2 |"
    assert "99% of each layer's change energy" in text and "seed 2: 14 layers, mean rank 13.5, 55 KiB" in text


def test_the_toy_world_table_has_one_row_per_prompted_value_and_one_column_per_model():
    rows = pd.DataFrame([{"model": model, "seed": seed, "attribute": "shape", "value": "star", "samples": 64,
                          "rate": rate} for model, rates in {"toy": [1.0, 1.0, 1.0], "toy-wide": [0.9, 1.0, 0.95]}.items()
                         for seed, rate in zip([0, 1000, 2000], rates)])
    lines = journal.toy_world_table(rows).splitlines()
    assert lines[0] == "| prompted value | toy | toy-wide |"
    assert lines[2] == "| shape: star | 100.0 ± 0.0 | 95.0 ± 12.4 |"  # 90, 100, 95: s = 5, 4.303 · 5 / √3 = 12.4


def test_the_sepme_table_has_one_row_per_erased_subset_and_one_column_per_prompt_set():
    rows = pd.DataFrame([{"seed": seed, "model": model, "prompt set": prompt_set, "samples": 64, "rate": rate}
                         for seed in range(3) for model, prompt_set, rate in
                         [("original", "star", 1.0), ("original", "heart", 1.0), ("star", "star", 0.1 * seed),
                          ("star", "heart", 1.0)]])
    lines = journal.sepme_table(rows).splitlines()
    assert lines[0] == "| erased | star | heart |"
    assert lines[2:] == ["| original | 100.0 ± 0.0 | 100.0 ± 0.0 |", "| star | 10.0 ± 24.8 | 100.0 ± 0.0 |"]


def _attack_rows(seed: int, asr: float) -> pd.DataFrame:
    return pd.DataFrame([{"method": "UCE", "seed": seed, "prompts": "target", "attack": "tokens", "attempts": 20,
                          "successes": int(20 * asr), "asr": asr, "asr_low": 0.0, "asr_high": 1.0,
                          "judged_target": asr, "seconds": 1.0, "steps": 10}])


def test_an_artefact_in_parts_joins_them_and_names_each_part_where_it_came_from(tmp_path):
    for seed, asr in ((0, 0.5), (1, 0.7)):
        journal.record("attacks", _attack_rows(seed, asr), f"doco toy attacks --seeds {seed} --record", time.time() - 60,
                       folder=tmp_path, part=f"seeds_{seed}", identity="same settings and code")
    rows, how = journal.load("attacks", tmp_path)
    assert list(rows.seed) == [0, 1] and [part["part"] for part in how["parts"]] == ["seeds_0", "seeds_1"]
    assert journal.names(tmp_path) == {"attacks"}
    block = journal.render("attacks", tmp_path)
    assert block.startswith("Artefact `attacks` in 2 parts: [`docs/results/attacks/seeds_0.csv`]")
    assert "`doco toy attacks --seeds 1 --record`" in block and "| UCE | 60.0 ± " in block


def test_parts_measured_under_other_code_or_holding_one_seed_twice_are_refused(tmp_path):
    def parts(*recorded):
        for seed, part, identity in recorded:
            journal.record("attacks", _attack_rows(seed, 0.5), "doco toy attacks", time.time(), folder=tmp_path,
                           part=part, identity=identity)

    parts((0, "seeds_0", "before"), (1, "seeds_1", "after a change"))
    with pytest.raises(ValueError, match="measured under other settings or code"):
        journal.load("attacks", tmp_path)
    parts((0, "seeds_1", "before"), (0, "seeds_0_again", "before"))
    with pytest.raises(ValueError, match="both hold seed 0"):
        journal.load("attacks", tmp_path)


def test_one_seed_shows_no_interval_over_seeds_but_an_attacks_wilson_interval(tmp_path):
    rows = _attack_rows(0, 0.35).assign(asr_low=0.18, asr_high=0.57)
    lines = journal.attacks_table(rows).splitlines()
    assert lines[2] == "| UCE | 35 [18–57] |"
    journal.record("attacks", rows, "doco toy attacks --seeds 0", time.time() - 60, folder=tmp_path, part="seeds_0",
                   identity="one")
    assert "1 seed (0), 20 attempts per model, attack and seed; one seed, so no interval over seeds" in \
        journal.render("attacks", tmp_path)
    assert mean_ci_cell(pd.Series([12.5])) == "12.5" and mean_ci_cell(pd.Series([10.0, 20.0])).startswith("15.0 ± ")


def test_recording_the_same_rows_again_keeps_their_first_record(tmp_path):
    """A rerun that reused every run and image (say `doco toy methods --record` again, for a new artefact beside it)
    leaves the part's date, commit and wall time as first measured; other rows or another identity replace it."""
    rows = _attack_rows(0, 0.5)
    assert journal.record("attacks", rows, "first", time.time() - 600, folder=tmp_path, part="seeds_0", identity="a")
    first = (tmp_path / "attacks" / "seeds_0.json").read_text()
    assert not journal.record("attacks", rows, "again", time.time(), folder=tmp_path, part="seeds_0", identity="a")
    assert (tmp_path / "attacks" / "seeds_0.json").read_text() == first
    assert journal.record("attacks", rows, "other code", time.time(), folder=tmp_path, part="seeds_0", identity="b")
    assert journal.load("attacks", tmp_path)[1]["parts"][0]["command"] == "other code"
    assert journal.record("attacks", _attack_rows(0, 0.25), "new rows", time.time(), folder=tmp_path, part="seeds_0",
                          identity="b")
    assert journal.load("attacks", tmp_path)[1]["parts"][0]["command"] == "new rows"


@pytest.mark.parametrize("command, artefacts", [
    ("methods", "methods or method_costs or sampling_sweep"), ("damage-matrix", "damage_matrix"),
    ("multi-concept", "multi_concept"), ("styles-attributes", "styles or implicit_attribute or attribute_colours")])
def test_recording_a_world_without_the_studys_artefacts_is_refused_before_any_run(doco, tmp_path, command, artefacts):
    done = doco("toy", command, "--set", "model=toy-wide", "--set", f"output_root={tmp_path}", "--record")
    assert done.returncode != 0 and f"'toy-wide' has no artefact {artefacts} in docs/results.md" in done.stderr
    assert not any(tmp_path.iterdir())
