"""`doco train` under torchrun: two gloo processes on the CPU, as on two GPUs.

As a script under torchrun, `tests/test_multiprocess.py RECORD_DIR KILL_AT train --params p.yaml` runs the `doco`
command line in each process and records, into RECORD_DIR/rank<R>.json when the process exits, what it did:
anchor shards generated, files renamed into place (every atomic write ends in one), the batch indices it drew,
and a digest of its trained weights (UNet and D) at export. With KILL_AT > 0, rank 0 SIGKILLs every process of
the launch (torchrun too) when it is about to run iteration KILL_AT, as a node lost mid-run would. The library
has no test hooks: the driver wraps the functions the run calls.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tiny_training import write_params

pytestmark = pytest.mark.slow  # four launches of two processes: about 50 s on two cores

ITERATIONS, WARMUP, CHECKPOINT_EVERY, KILL_AT = 10, 2, 4, 7


def _params(tmp_path: Path, run_name: str) -> Path:
    # One output root for all runs: the anchor images are generated once and shared through latent_cache/.
    return write_params(tmp_path, run_name, iterations=ITERATIONS, warmup_iterations=WARMUP,
                        checkpoint_every=CHECKPOINT_EVERY)


def _torchrun(entry: list[str], params: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry,
               "train", "--params", str(params), "--quiet"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _recorded(params: Path, records: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    records.mkdir(exist_ok=True)
    return _torchrun([__file__, str(records), str(kill_at)], params)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of two processes, recorded: (output root, run folder, rank 0's and rank 1's records)."""
    root = tmp_path_factory.mktemp("multiprocess")
    result = _recorded(_params(root, "straight"), root / "records")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((root / "records" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return root, root / "outputs" / "straight" / "doco", ranks


def test_two_processes_share_the_work_and_stay_in_step(straight):
    root, run, (main, other) = straight
    assert main["generated_shards"] == 2 and other["generated_shards"] == 0, "anchor images generated once"
    assert other["renamed"] == [], "only the main process writes"
    for name in ("resolved_params.yaml", "manifest.json", "checkpoint.pt", "training_log.csv", "unet",
                 "delta.safetensors", "discriminator.safetensors"):
        assert name in main["renamed"], name
    assert main["renamed"].count("unet") == 1 and main["renamed"].count("checkpoint.pt") == 3  # steps 4, 8, 10
    assert not list(run.parent.rglob(".*.tmp")), "no temporary left behind"

    assert len(main["batches"]) == len(other["batches"]) == ITERATIONS
    assert all(a != b for a, b in zip(main["batches"], other["batches"])), "each process draws its own batches"
    assert main["weights"] == other["weights"], "averaged gradients keep the processes' weights identical"

    log = pd.read_csv(run / "training_log.csv")
    assert log.step.tolist() == list(range(1, ITERATIONS + 1))
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["generator"].shape[0] == 2 and not torch.equal(*checkpoint["generator"]), "both generators"
    assert json.loads(checkpoint["identity"])["processes"] == 2
    assert any(v.abs().max() > 0 for v in load_file(str(run / "delta.safetensors")).values())


def test_a_killed_launch_resumes_with_as_many_processes_to_the_uninterrupted_weights(straight, doco_command):
    root, reference, _ = straight
    params = _params(root, "killed")
    run = root / "outputs" / "killed" / "doco"
    killed = _recorded(params, root / "killed_records", kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == CHECKPOINT_EVERY
    assert not (run / "delta.safetensors").exists()
    logged = pd.read_csv(run / "training_log.csv")  # the checkpoint's log, wall times included

    alone = subprocess.run(doco_command + ["train", "--params", str(params), "--quiet"], capture_output=True, text=True,
                           timeout=300)
    error = alone.stderr.strip().splitlines()[-1]  # after the loading progress bars
    assert alone.returncode == 2 and error.startswith("doco: error:"), alone.stderr[-3000:]
    assert "written by a run of 2 process(es)" in error and "Traceback" not in alone.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == CHECKPOINT_EVERY

    resumed = _torchrun(["-m", "doco_lib"], params)  # the plain command line, as a user reruns it
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = pd.read_csv(run / "training_log.csv")
    assert log.step.tolist() == list(range(1, ITERATIONS + 1))
    assert log.iloc[:CHECKPOINT_EVERY].equals(logged), "the first iterations come from the checkpoint, not a restart"
    for name in ("delta.safetensors", "discriminator.safetensors"):
        a, b = load_file(str(reference / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ------------------------------------------------------------------------------------------ the driver
def _instrument(record_path: Path, kill_at: int) -> None:
    import atexit
    import hashlib

    import psutil

    from doco_lib import anchors
    from doco_lib.methods.harness import DocoTrainer, ErasureTrainer

    record = {"generated_shards": 0, "renamed": [], "batches": [], "weights": None}
    generate, replace, sample = anchors.generate, os.replace, ErasureTrainer._sample_index
    train_step, export = DocoTrainer.train_step, DocoTrainer.export

    def counted_generate(*args, **kwargs):
        record["generated_shards"] += 1
        return generate(*args, **kwargs)

    def recorded_replace(source, target, *args, **kwargs):
        record["renamed"].append(Path(target).name)
        return replace(source, target, *args, **kwargs)

    def recorded_sample(self):
        index = sample(self)
        record["batches"].append(index.tolist())
        return index

    def killing_train_step(self):
        if self.step + 1 == kill_at:
            launcher = psutil.Process(os.getppid())
            for process in [*launcher.children(), launcher]:
                if process.pid != os.getpid():
                    process.kill()
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(self)

    def digested_export(self, *args, **kwargs):
        weights = [*self.params.values(), *self.discriminator.parameters()]
        record["weights"] = hashlib.sha256(b"".join(w.detach().cpu().numpy().tobytes() for w in weights)).hexdigest()
        return export(self, *args, **kwargs)

    anchors.generate, os.replace, ErasureTrainer._sample_index = counted_generate, recorded_replace, recorded_sample
    DocoTrainer.train_step, DocoTrainer.export = killing_train_step, digested_export
    atexit.register(lambda: record_path.write_text(json.dumps(record)))


if __name__ == "__main__":
    from doco_lib.app import cli

    rank = os.environ["RANK"]
    _instrument(Path(sys.argv[1]) / f"rank{rank}.json", int(sys.argv[2]) if rank == "0" else 0)
    sys.exit(cli.main(sys.argv[3:]))
