"""Cost records: the harness's record of a tiny run (parameters trained and changed, bytes stored, sessions of a
resumed run), peak memory that follows what a phase allocates, and the tables collected from run folders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from doco_lib import config, costs
from doco_lib.evaluation import costs_table, rating

BIG = 64 * 2**20  # float32 elements: 256 MiB


def _touch_big_tensor() -> None:
    big = torch.ones(BIG)  # written, so resident; freed (unmapped) on return
    assert big[-1] == 1


def _read(folder: Path, name: str) -> dict:
    return json.loads((folder / "costs" / f"{name}.json").read_text())


def _bytes_on_disk(path: Path) -> int:
    if path.is_file():
        return os.path.getsize(path)
    return sum(os.path.getsize(Path(root) / f) for root, _, files in os.walk(path) for f in files)


def test_the_harness_records_a_runs_cost_at_export(tmp_path, one_torch_thread):
    from doco_lib.studies import runs

    params = config.validate({"output_root": str(tmp_path), "run_name": "tiny", "device": "cpu",
                              "n_anchor_images": 4, "anchor_shard_size": 4, "num_inference_steps": 2,
                              "iterations": 3, "warmup_iterations": 1, "batch_size": 2, "checkpoint_every": 1})
    pipe = runs.starting_pipeline(params)
    runs.prepare_anchors(params, pipe)
    base = {name: tensor.clone() for name, tensor in pipe.unet.state_dict().items()}
    runs.make_trainer(params, pipe).run(until=2, progress=False)  # a first session, as notebook 02's warm-up
    trainer = runs.make_trainer(params, runs.starting_pipeline(params))  # resumed from the checkpoint at step 2
    trainer.run(progress=False)
    paths = trainer.export("toy")

    record = _read(runs.training_dir(params), "training")
    assert record["phase"] == "training" and record["method"] == "doco"
    assert record["sessions"] == 2 and record["measured_iterations"] == record["iterations"] == 3
    assert record["seconds"] > 0 and record["peak_rss_bytes"] > 0 and record["machine"]["torch"] == torch.__version__
    exported = load_file(str(paths["unet"] / "diffusion_pytorch_model.safetensors"))
    changed_anywhere = sum(int((exported[name] != base[name]).sum()) for name in base)
    assert 0 < record["changed_params"] == changed_anywhere <= record["trainable_params"]
    assert record["trainable_params"] == sum(p.numel() for p in trainer.params.values()) < record["unet_params"]
    assert set(record["stored_bytes"]) == {"unet", "delta", "discriminator"}
    assert record["stored_bytes"] == {name: _bytes_on_disk(path) for name, path in paths.items()}
    assert record["stored_bytes"]["delta"] < record["stored_bytes"]["unet"]


def _in_a_fresh_process(test) -> None:
    """Run `test` (a function of this module) in a new interpreter. A long-lived process, such as a pytest-xdist
    worker after other test files, measured the same high-water mark before and after a 256 MiB tensor (observed
    in `make test-all`, not in a fresh process), so the measurements are checked where the process's own memory
    history is known."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_costs; test_costs.{test.__name__}()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr


def phases_peak_memory_follows_what_it_allocates() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        with costs.phase("idle", folder):
            pass
        with costs.phase("big", folder) as record:
            _touch_big_tensor()
            record["tensors"] = 1
        with costs.phase("after", folder):
            pass
        idle, big, after = (_read(folder, name) for name in ("idle", "big", "after"))
    assert big["tensors"] == 1 and big["seconds"] > 0 and big["machine"]["cpu"]
    assert big["peak_rss_bytes"] - idle["peak_rss_bytes"] > 0.8 * 4 * BIG
    assert after["peak_rss_scope"] == "phase"  # Linux: the high-water mark is reset at each phase's start
    assert big["peak_rss_bytes"] - after["peak_rss_bytes"] > 0.8 * 4 * BIG, "a phase's peak is its own"


def outer_meter_keeps_its_peak_across_an_inner_reset() -> None:
    with costs.Meter() as outer:
        _touch_big_tensor()
        with costs.Meter() as inner:  # resets the high-water mark after the big tensor is gone
            pass
    assert outer.reading()["peak_rss_bytes"] - inner.reading()["peak_rss_bytes"] > 0.8 * 4 * BIG


def test_a_phases_peak_memory_follows_what_it_allocates():
    _in_a_fresh_process(phases_peak_memory_follows_what_it_allocates)


def test_an_outer_meter_keeps_its_peak_across_an_inner_reset():
    _in_a_fresh_process(outer_meter_keeps_its_peak_across_an_inner_reset)


def _training_record(folder: Path, seconds: float, changed: int, method: str = "doco", measured: int = 40) -> Path:
    """A record as `costs.training_record` writes it, with its folder's UNet and delta files."""
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"u" * 3 * 2**20)
    record = {"phase": "training", "method": method, "trainable": "cross_attention_kv", "iterations": 40,
              "measured_iterations": measured, "sessions": 1, "seconds": seconds, "peak_gpu_bytes": None,
              "peak_gpu_reserved_bytes": None, "peak_rss_bytes": 500 * 2**20, "peak_rss_scope": "phase",
              "trainable_params": 1000, "changed_params": changed, "unet_params": 90000,
              "stored_bytes": {"unet": 3 * 2**20, "delta": 2**19},
              "machine": {"cpu": "Some CPU", "cpu_threads": 2, "gpu": None, "torch": "2.0"}}
    path = folder / "costs" / "training.json"
    path.parent.mkdir()
    path.write_text(json.dumps(record))
    return folder / "unet"


def test_efficiency_table_from_run_folders(tmp_path):
    grid = pd.DataFrame([
        {"variant": "DoCo (cp)", "seed": 0, "unet": _training_record(tmp_path / "a_s0" / "doco", 10.0, 900)},
        {"variant": "DoCo (cp)", "seed": 1, "unet": _training_record(tmp_path / "a_s1" / "doco", 14.0, 1000)},
        {"variant": "ESD-x", "seed": 0, "unet": _training_record(tmp_path / "b_s0" / "esd", 5.0, 700, "esd", 20)},
        {"variant": "SepME", "seed": 0, "unet": tmp_path / "sepme_s0" / "unet"},  # no record (an old increment)
    ])
    records = costs_table.training_records(grid)
    assert list(records.variant) == ["DoCo (cp)", "DoCo (cp)", "ESD-x"]
    table = costs_table.efficiency_table(records)
    mean, half = rating.mean_ci(pd.Series([10.0, 14.0]))
    doco = table.loc["DoCo (cp)"]
    assert doco["time (s)"] == f"{mean:.1f} ± {half:.1f}" and doco["seeds"] == 2
    assert doco["trainable params"] == "1,000" and doco["peak memory (MB)"] == "500"
    assert doco["storage: delta (MB)"] == "0.50" and doco["storage: full UNet (MB)"] == "3.0"
    assert doco["memory"] == "CPU resident" and doco["machine"] == "Some CPU, 2 threads, torch 2.0"
    assert table.loc["ESD-x", "changed params"] == "700" and "SepME" not in table.index
    assert table.loc["ESD-x", "time (s)"] == table.loc["ESD-x", "peak memory (MB)"] == "–", "half its iterations unmeasured"


def test_phase_table_and_report_list_every_phase(tmp_path):
    from doco_lib.app.batch import write_report

    concept = tmp_path / "star"
    with costs.phase("anchors", concept) as record:
        record["images"] = 4
    _training_record(concept / "doco", 12.5, 800)
    table = costs_table.phase_table(concept)
    assert list(table.phase) == ["anchors", "training"] and list(table.method) == ["", "doco"]
    assert table.loc[1, "stored delta (MB)"] == pytest.approx(0.5) and table.loc[1, "changed params"] == 800
    assert list(table.record) == ["costs/anchors.json", "doco/costs/training.json"]

    (tmp_path / "manifest.json").write_text(json.dumps({"run_id": "b", "concepts": {"star": {"notebooks": {}},
                                                                                     "moon": {"notebooks": {}}}}))
    report = write_report(tmp_path).read_text()
    costs_section = report.split("## Costs", 1)[1]
    assert "| anchors" in costs_section and "| training" in costs_section and "doco/costs/training.json" in costs_section
    assert "### moon\n\nNo cost records yet." in costs_section


def test_each_ablation_run_has_its_cost_record_for_notebook_05(tmp_path, one_torch_thread):
    from doco_lib.studies import ablation

    params = config.validate({"output_root": str(tmp_path), "run_name": "grid", "device": "cpu",
                              "n_anchor_images": 4, "anchor_shard_size": 4, "num_inference_steps": 2,
                              "iterations": 2, "warmup_iterations": 0, "batch_size": 2, "esd_steps": 2})
    grid = ablation.train_grid(params, ["ESD-x"], [0, 1])
    for unet in grid.unet:
        run = Path(unet).parent.parent  # <run>/ablation/<variant>_s<seed>/
        assert run.parent == config.run_dir(params) / "ablation"
        assert [r["phase"] for r in costs_table.read_records(run)] == ["anchors", "training"]
    table = costs_table.efficiency_table(costs_table.training_records(grid))
    assert list(table.index) == ["ESD-x"] and table.loc["ESD-x", "seeds"] == 2
    assert table.loc["ESD-x", "memory"] == "CPU resident" and "torch" in table.loc["ESD-x", "machine"]
