"""The GPU rehearsal's script, checked on the CPU (`--tiny`): every phase runs and is timed as documented, and the
per-concept totals are the sums the protocol defines. Its numbers measure nothing (narrow pipelines, 128 px)."""

from __future__ import annotations

import json

import pytest

from benchmarks import sd_rehearsal

pytestmark = pytest.mark.slow  # about 1.5 minutes on two idle cores (SD v1.4, SDXL, FLUX.1, SD 3.5)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    work = tmp_path_factory.mktemp("rehearsal")
    sd_rehearsal.main(["--tiny", "--mode", "direct", "--work", str(work), "--repeats", "3", "--seed", "1"])
    return json.loads(next(work.glob("sd_rehearsal-cpu-*.json")).read_text()), next(work.glob("sd_rehearsal-cpu-*.md"))


def test_every_phase_runs_a_discarded_warm_up_and_three_timed_batches_in_a_drawn_order(rehearsal):
    results, _ = rehearsal
    rows, order = results["direct"]["rows"], results["direct"]["order"]
    phases = {(r["family"], r["phase"]) for r in rows}
    for expected in [("sd14", "anchor images"), ("sd14", "anchor images, dpmsolver++ 2 steps (deviation)"),
                     ("sd14", "DoCo paper preset as shipped, warmup"), ("sd14", "DoCo paper preset as shipped, adversarial"),
                     ("sd14", "DoCo paper preset, gradient checkpointing (a 24 GB card), adversarial"),
                     ("sd14", "DoCo official preset, adversarial"), ("sd14", "evaluation sampling, batch by free memory"),
                     ("sd14", "evaluation sampling, batch 8 (a 24 GB card)"),
                     ("metrics", "PNG encoding and writing (the writer thread)"), ("metrics", "CLIP-L score and accuracy"),
                     ("metrics", "FID Inception features"), ("metrics", "NudeNet"), ("sdxl", "anchor images"),
                     ("sdxl", "DoCo paper preset as shipped, adversarial"),
                     ("sdxl", "evaluation sampling, batch by free memory")]:
        assert expected in phases, expected
    assert all(r["repeats"] == 3 == len(r["batch_seconds"]) for r in rows)
    assert all(r["units_per_s"] == pytest.approx(r["units"] * 3 / sum(r["batch_seconds"])) for r in rows)
    sd14 = [name for name in order if name.startswith("sd14: ")]
    assert sd14 != sorted(sd14) and order.index(sd14[-1]) < order.index(next(n for n in order if n.startswith("sdxl")))
    checkpointing = {r["phase"]: r["note"] for r in rows if r["family"] == "sd14" and r["unit"] == "iteration"}
    assert checkpointing["DoCo paper preset as shipped, adversarial"].endswith("False")  # auto, on a CPU: off
    assert checkpointing["DoCo paper preset, gradient checkpointing (a 24 GB card), adversarial"].endswith("True")


def test_the_per_concept_totals_are_the_protocols_counts_at_the_measured_rates(rehearsal):
    results, markdown = rehearsal
    rows = results["direct"]["rows"]
    rate = {r["phase"]: r["units_per_s"] for r in rows if r["family"] in ("sd14", "metrics")}
    instance, nudity = results["direct"]["per_concept"]
    assert instance["minutes"]["anchors"] == pytest.approx(1000 / rate["anchor images"] / 60)
    assert instance["minutes"]["training"] == pytest.approx(
        (200 / rate["DoCo paper preset as shipped, warmup"] + 800 / rate["DoCo paper preset as shipped, adversarial"]) / 60)
    sampling = min(rate["evaluation sampling, batch by free memory"], rate["PNG encoding and writing (the writer thread)"])
    scoring = 1 / (1 / rate["CLIP-L score and accuracy"] + 1 / rate["FID Inception features"])
    images = 800 * (1 + 1 / 4)  # the erased model's 80 × 10 images, the base model's shared by 4 concepts
    assert instance["minutes"]["evaluation"] == pytest.approx((images / sampling + images / scoring) / 60)
    i2p = 4703 * (1 + 1 / 4)
    assert nudity["minutes"]["I2P with NudeNet"] == pytest.approx((i2p / sampling + i2p / rate["NudeNet"]) / 60)
    assert nudity["total_min"] == pytest.approx(sum(nudity["minutes"].values()))
    assert (instance["budget_min"], nudity["budget_min"]) == (40, 60)
    assert "--tiny: narrow pipelines" in markdown.read_text()


def test_sd35_and_flux_run_doco_as_their_concept_files_ship_it_and_sd35_also_as_a_24_gb_card_would(rehearsal):
    """FLUX.1-dev's and SD 3.5's warm-up and adversarial iterations (tiny, on the CPU, in their concept files'
    weight_dtype: FLUX.1 bfloat16 under bf16 autocast, SD 3.5 float32), timed as the other
    families' are; SD 3.5 again as 8 accumulated micro-batches of 1 with gradient checkpointing. The report holds their rows."""
    results, markdown = rehearsal
    rows = results["mmdit"]["rows"]
    assert [(r["family"], r["phase"]) for r in rows] == [
        ("flux", "DoCo paper preset as shipped, warmup"), ("flux", "DoCo paper preset as shipped, adversarial"),
        ("sd35", "DoCo paper preset as shipped, warmup"), ("sd35", "DoCo paper preset as shipped, adversarial"),
        ("sd35", "DoCo batch 1 × 8 accumulated, checkpointing (a 24 GB card), warmup"),
        ("sd35", "DoCo batch 1 × 8 accumulated, checkpointing (a 24 GB card), adversarial")]
    assert results["mmdit"]["skipped"] == []
    for r in rows:
        assert len(r["batch_seconds"]) == 3 and all(s > 0 for s in r["batch_seconds"]) and r["units_per_s"] > 0
        assert r["fits_24gb"] is None and r["peak_gpu_gib"] is None  # no GPU: nothing measured against 24 GB
        weights = "bfloat16" if r["family"] == "flux" else "float32"
        assert f"weights {weights}, trained parameters float32" in r["note"]
    small = [r for r in rows if "24 GB card" in r["phase"]]
    assert all((r["batch_size"], r["accumulation"]) == (1, 8) and r["note"].startswith("gradient checkpointing: True")
               for r in small)
    assert all((r["batch_size"], r["accumulation"]) == (2, 1) for r in rows if r not in small)  # --tiny's batch; the paper's 8 on a GPU
    text = markdown.read_text()
    assert "## SD 3.5 medium and FLUX.1-dev" in text
    assert "| flux | DoCo paper preset as shipped, adversarial |" in text


def test_a_configuration_that_does_not_fit_gives_a_row_saying_so_and_the_rehearsal_goes_on(tmp_path, monkeypatch):
    from doco_lib.errors import TrainingDoesNotFit

    def refused(*args, **kwargs):
        raise TrainingDoesNotFit("iteration 1 does not fit in the memory of cuda")

    monkeypatch.setattr(sd_rehearsal, "training_rows", refused)
    [row] = sd_rehearsal.mmdit_direct("flux", tmp_path, "tiny", "cpu", 3)
    assert row["phase"] == "DoCo paper preset as shipped" and row["units_per_s"] is None
    assert row["note"].startswith("out of GPU memory: iteration 1 does not fit") and row["fits_24gb"] is None
    lines = sd_rehearsal._mmdit_lines({"rows": [row], "skipped": ["sd35"]}, {"repeats": 3})
    assert "| flux | DoCo paper preset as shipped | – | – | – | out of GPU memory" in "\n".join(lines)
    assert "Skipped (flag or time): sd35." in lines
