"""`doco batch`: failure isolation, manifest, resume of only what failed, resume of a killed batch from its
training checkpoint, `doco report`, and the shipped params files (toy world, tiny settings)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from doco_lib import config
from doco_lib.app.batch import _duration
from doco_lib.io import load_torch_checkpoint

TINY = {"num_inference_steps": 2, "n_anchor_images": 8, "anchor_shard_size": 4, "iterations": 4,
        "warmup_iterations": 2, "checkpoint_every": 2, "batch_size": 4, "eval_samples": 2, "images_per_template": 1,
        "n_templates": 1, "grid_columns": 2, "device": "cpu", "eval_concepts": ["star", "pentagram", "circle"]}


@pytest.mark.slow
def test_batch_isolates_a_broken_concept_and_reruns_only_it(tmp_path, doco_command, repo_root):
    concepts = tmp_path / "concepts"
    concepts.mkdir()
    (concepts / "erase_star.yaml").write_text(yaml.safe_dump({**TINY, "target": "star"}))
    (concepts / "erase_heart.yaml").write_text(yaml.safe_dump({**TINY, "target": "heart",
                                                                "eval_concepts": ["heart", "circle"],
                                                                "erased_concepts": ["heart"]}))
    broken = concepts / "erase_cross.yaml"
    broken.write_text(yaml.safe_dump({**TINY, "target": "cross", "iteratons": 4}))
    command = doco_command + ["batch", str(concepts), "--run-id", "b1", "--output-root", str(tmp_path / "out"),
                              "--notebooks", "01_data_preparation", "02_discriminator_warmup",
                              "03_adversarial_training"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=repo_root)
    assert first.returncode != 0
    assert "erase_cross" in first.stderr and "Did you mean 'iterations'" in first.stderr
    manifest = json.loads((tmp_path / "out" / "b1" / "manifest.json").read_text())
    assert manifest["git_commit"] and manifest["packages"]["torch"]
    assert manifest["concepts"]["erase_star"]["status"] == "done"
    assert manifest["concepts"]["erase_heart"]["status"] == "done"
    assert manifest["concepts"]["erase_cross"]["status"] == "failed"
    star = manifest["concepts"]["erase_star"]["notebooks"]["03_adversarial_training"]
    assert star["status"] == "done" and star["duration_s"] > 0 and star["params_hash"]
    assert (tmp_path / "out" / "b1" / "erase_star" / "doco" / "unet" / "config.json").is_file()
    report = (tmp_path / "out" / "b1" / "report.md").read_text()  # refreshed at the end of every batch
    assert "| erase_star | done | done " in report and "| erase_heart | done | done " in report
    assert "| erase_cross | failed |" in report and "Did you mean 'iterations'" in report
    assert "Judged erasure, toy world" in report  # each finished concept's table from notebook 03

    broken.write_text(yaml.safe_dump({**TINY, "target": "cross"}))
    done_before = {name: manifest["concepts"][name]["notebooks"]["03_adversarial_training"]["ended"]
                   for name in ("erase_star", "erase_heart")}
    second = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=repo_root)
    assert second.returncode == 0, second.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "b1" / "manifest.json").read_text())
    assert all(entry["status"] == "done" for entry in manifest["concepts"].values())
    for name, ended in done_before.items():
        assert manifest["concepts"][name]["notebooks"]["03_adversarial_training"]["ended"] == ended, \
            f"{name} was rerun although nothing changed"


def test_parallel_batch_logs_each_concept_and_records_its_failure(tmp_path, doco):
    """`--jobs 2` runs each concept as a `doco run` process; rejected params fail fast, so no notebook runs."""
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**TINY, "iteratons": 4}))
    (tmp_path / "no_prompts.yaml").write_text(yaml.safe_dump({**TINY, "anchor_prompts_file": "absent.txt"}))
    finished = doco("batch", tmp_path / "*.yaml", "--run-id", "p1", "--output-root", tmp_path / "out", "--jobs", "2")
    assert finished.returncode != 0
    run = tmp_path / "out" / "p1"
    concepts = json.loads((run / "manifest.json").read_text())["concepts"]
    assert concepts["typo"]["status"] == "failed" and "Did you mean 'iterations'" in concepts["typo"]["error"]
    assert concepts["no_prompts"]["status"] == "failed" and "absent.txt" in concepts["no_prompts"]["error"]
    assert "Did you mean 'iterations'" in (run / "logs" / "typo.log").read_text()
    assert "absent.txt" in (run / "logs" / "no_prompts.log").read_text()
    assert "| typo | failed |" in (run / "report.md").read_text()


# Training long enough (about 0.2 s an adversarial step on a CPU) to be killed between two checkpoints.
KILLABLE = {**TINY, "iterations": 40, "checkpoint_every": 2, "images_per_template": 2,
            "eval_concepts": ["star", "circle"], "erased_concepts": ["star"]}
# Notebook 03 trains from step 0 when 02 (the warm-up alone) is left out: one kernel start less.
KILL_NOTEBOOKS = ["01_data_preparation", "03_adversarial_training"]


def _alive_descendants(pid: int) -> set[int]:
    """Live processes below `pid` (Linux /proc): papermill's Jupyter kernels run in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if state not in "ZX":
            children.setdefault(int(parent), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _run_parsing_manifest(command, cwd, manifest: Path, log: Path, stop=lambda data: False, timeout=600):
    """Run `command` in a process group of its own (output to `log`), parsing `manifest` as JSON every few
    milliseconds (a half-written file would raise) until the command ends or `stop(manifest data)`; returns
    (process, parses)."""
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=cwd, start_new_session=True, stdout=handle, stderr=subprocess.STDOUT)
    parses, deadline = 0, time.monotonic() + timeout
    try:
        while process.poll() is None:
            assert time.monotonic() < deadline, f"{command} took over {timeout} s"
            if manifest.is_file():
                data = json.loads(manifest.read_text())
                parses += 1
                if stop(data):
                    break
            time.sleep(0.01)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return process, parses


@pytest.fixture(scope="module")
def killed_and_rerun(tmp_path_factory, doco_command, repo_root) -> dict:
    """A one-concept batch (notebooks 01 and 03) SIGKILLed during training, then the same command again."""
    tmp = tmp_path_factory.mktemp("killed")
    params = tmp / "erase_star.yaml"
    params.write_text(yaml.safe_dump({**KILLABLE, "target": "star"}))
    command = doco_command + ["batch", str(params), "--run-id", "k1", "--output-root", str(tmp / "out"),
                              "--notebooks", *KILL_NOTEBOOKS]
    run = tmp / "out" / "k1"
    checkpoint = run / "erase_star" / "doco" / "checkpoint.pt"

    def training_past_warmup(data) -> bool:
        record = data["concepts"].get("erase_star", {}).get("notebooks", {}).get("03_adversarial_training", {})
        return record.get("status") == "running" and checkpoint.is_file() and \
            load_torch_checkpoint(checkpoint)["step"] >= KILLABLE["warmup_iterations"] + 4

    batch, parses = _run_parsing_manifest(command, repo_root, run / "manifest.json", tmp / "first.log",
                                          training_past_warmup)
    assert batch.poll() is None, "the batch ended before it was killed during training:\n" + \
        (tmp / "first.log").read_text()[-2000:]
    kernels = _alive_descendants(batch.pid)
    os.killpg(batch.pid, signal.SIGKILL)
    batch.wait()
    deadline = time.monotonic() + 30  # an orphaned kernel notices its parent is gone within a second or two
    while any(_alive(pid) for pid in kernels) and time.monotonic() < deadline:
        time.sleep(0.2)
    observed = {"run": run, "kernels": kernels, "kernels_left": [pid for pid in kernels if _alive(pid)],
                "parses_first": parses, "killed_step": load_torch_checkpoint(checkpoint)["step"],
                "manifest_after_kill": json.loads((run / "manifest.json").read_text()), "params": params}
    rerun, parses = _run_parsing_manifest(command, repo_root, run / "manifest.json", tmp / "rerun.log")
    observed.update(rerun_code=rerun.wait(), rerun_output=(tmp / "rerun.log").read_text(), parses_rerun=parses,
                    final_step=load_torch_checkpoint(checkpoint)["step"])
    return observed


@pytest.mark.slow
def test_killed_batch_resumes_training_from_its_checkpoint(killed_and_rerun):
    seen = killed_and_rerun
    assert seen["kernels"] and not seen["kernels_left"], "the training kernel outlived the killed batch"
    assert seen["parses_first"] > 20 and seen["parses_rerun"] > 20  # manifest parsed as JSON throughout
    killed = seen["manifest_after_kill"]["concepts"]["erase_star"]
    assert killed["notebooks"]["03_adversarial_training"]["status"] == "running"  # as the kill left it
    assert KILLABLE["warmup_iterations"] < seen["killed_step"] < KILLABLE["iterations"]

    assert seen["rerun_code"] == 0, seen["rerun_output"][-2000:]
    manifest = json.loads((seen["run"] / "manifest.json").read_text())
    entry = manifest["concepts"]["erase_star"]
    assert entry["status"] == "done"
    data = "01_data_preparation"  # done before the kill: not rerun
    assert entry["notebooks"][data]["ended"] == killed["notebooks"][data]["ended"]
    executed = (seen["run"] / "erase_star" / "03_adversarial_training.ipynb").read_text()
    assert f"resuming at step {seen['killed_step']} of {KILLABLE['iterations']}" in executed
    assert seen["final_step"] == KILLABLE["iterations"]
    log = (seen["run"] / "erase_star" / "doco" / "training_log.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in log[1:]] == list(range(1, KILLABLE["iterations"] + 1))


@pytest.mark.slow  # on the killed-and-rerun batch
def test_report_gathers_statuses_durations_and_evaluation_tables(killed_and_rerun, doco, repo_root):
    run = killed_and_rerun["run"]
    evaluate = ["run", "--params", str(killed_and_rerun["params"]), "--run-id", "k1",
                               "--output-root", str(run.parent), "--notebooks", "04_evaluation"]
    finished = doco(*evaluate)
    assert finished.returncode == 0, finished.stderr[-2000:]
    (run / "report.md").unlink()

    made = doco("report", str(run))
    assert made.returncode == 0, made.stderr[-2000:]
    report = (run / "report.md").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    durations = {nb: record["duration_s"] for nb, record in manifest["concepts"]["erase_star"]["notebooks"].items()}
    notebooks = [*KILL_NOTEBOOKS, "04_evaluation"]
    assert list(durations) == notebooks
    row = next(line for line in report.splitlines() if line.startswith("| erase_star |"))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells == ["erase_star", "done", *(f"done {_duration(durations[nb])}" for nb in notebooks),
                     _duration(sum(durations.values())), ""]
    assert f"| concept | status | {' | '.join(notebooks)} | total | failure |" in report
    assert manifest["git_commit"] in report
    table = (run / "erase_star" / "04_evaluation" / "results.md").read_text().strip()
    assert "star CS ↓" in table and table in report  # notebook 04's table, verbatim
    assert "Judged erasure, toy world" in report

    missing = doco("report", str(run / "erase_star"))
    assert missing.returncode == 2 and "no manifest.json" in missing.stderr


# The paper's concepts (section 4, Tables 1-2, I2P nudity) and the toy concepts, one params file each.
PAPER_TARGETS = {"instance": {"Snoopy", "Mickey", "SpongeBob", "Pikachu"},
                 "style": {"Van Gogh", "Picasso", "Rembrandt", "Andy Warhol", "Caravaggio"}, "nudity": {"nudity"}}


def test_shipped_params_files_validate_without_loading_models(repo_root):
    files = sorted((repo_root / "params").glob("*.yaml")) + sorted((repo_root / "params" / "concepts").glob("*.yaml"))
    files.remove(repo_root / "params" / "sd14_paper.yaml")  # the SD files' base, no concept (test_config checks it)
    # Checks keys, types, prompt files, anchors. The I2P prompts are downloaded by the user (sd14_nudity names
    # data/i2p_benchmark.csv; test_sd_path checks that it is asked for): a file of the same format stands in.
    i2p = {"i2p_csv": str(repo_root / "tests" / "fixtures" / "i2p_small.csv")}
    resolved = {path: config.load_params(path, i2p if path.stem == "sd14_nudity" else None) for path in files}
    concepts = {path: params for path, params in resolved.items() if path.parent.name == "concepts"}
    for path, params in concepts.items():
        assert params["run_name"] == path.stem, path
        assert params["target"] in params["eval_concepts"], path  # what notebook 04 checks before generating
        assert set(params["erased_concepts"]) <= set(params["eval_concepts"]), path
    sd = [p for path, p in concepts.items() if path.stem.startswith("sd14_")]
    assert {kind: {p["target"] for p in sd if p["concept_kind"] == kind} for kind in PAPER_TARGETS} == PAPER_TARGETS
    assert {p["anchor"] for p in sd if p["concept_kind"] == "style"} == {"painting"}
    snoopy = next(p for p in sd if p["target"] == "Snoopy")
    assert snoopy["anchor"] == "dog" and snoopy["iterations"] == 1000 and snoopy["lr"] == 4e-6  # paper, 4.1
    toy = [p for path, p in concepts.items() if path.stem.startswith("toy_")]
    assert len(toy) >= 2 and all(p["model"] == "toy" for p in toy)
