"""`doco train` under torchrun: two gloo processes on the CPU, as on two GPUs.

As a script under torchrun, `tests/test_multiprocess.py RECORD_DIR KILL_AT train --params p.yaml` runs the `doco`
command line in each process and records, into RECORD_DIR/rank<R>.json when the process exits, what it did:
anchor shards generated, files renamed into place (every atomic write ends in one), the batch indices it drew,
and a digest of its trained weights (UNet and D) at export. With KILL_AT > 0, rank 0 SIGKILLs every process of
the launch (torchrun too) when it is about to run iteration KILL_AT, as a node lost mid-run would.
`tests/test_multiprocess.py lockstep ROOT` instead takes two steps of a tiny DoCo trainer in each process, each on
its share of one batch (`_steps_in_lockstep`), and saves the states after them into ROOT/lockstep_rank<R>.pt. The
library has no test hooks: the driver wraps the functions the run calls.
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

pytestmark = pytest.mark.slow  # five launches of two processes: about 65 s on two cores (13 s the lockstep test)

ITERATIONS, WARMUP, CHECKPOINT_EVERY, KILL_AT = 10, 2, 4, 7
LOCKSTEP_BATCH = 2  # one process's batch in the lockstep test, split between two processes at batch 1
LOCKSTEP_LR = {"UNet": 3e-4, "D": 1e-3}  # the lockstep test's learning rates (the params' defaults)


def _params(tmp_path: Path, run_name: str) -> Path:
    # One output root for all runs: the anchor images are generated once and shared through latent_cache/.
    return write_params(tmp_path, run_name, iterations=ITERATIONS, warmup_iterations=WARMUP,
                        checkpoint_every=CHECKPOINT_EVERY)


def _torchrun(entry: list[str], params: Path) -> subprocess.CompletedProcess:
    return _launch([*entry, "train", "--params", str(params), "--quiet"])


def _launch(arguments: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *arguments]
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


def test_two_processes_at_batch_1_take_the_steps_of_one_process_at_batch_2(tmp_path):
    # D's BatchNorm statistics span both processes' samples in each of its forward passes (backward and running
    # statistics included), and gradients are averaged: the same steps as one process over both samples.
    alone = _steps_in_lockstep(tmp_path, rank=0, processes=1)  # in this process; generates the anchor images
    launched = _launch([__file__, "lockstep", str(tmp_path)])
    assert launched.returncode == 0, launched.stderr[-3000:]
    main, other = (torch.load(tmp_path / f"lockstep_rank{r}.pt", weights_only=True) for r in (0, 1))
    for phase, one, two, two_other in zip(("warm-up", "adversarial"), alone, main, other):
        assert one.keys() == two.keys() == two_other.keys()
        assert any(name.startswith("UNet update") for name in one) == (phase == "adversarial")
        for name in one:
            assert torch.equal(two[name], two_other[name]), f"{name} after the {phase} step differs between processes"
            torch.testing.assert_close(two[name], one[name], **_lockstep_tolerance(name, one[name]),
                                       msg=lambda m, name=name, phase=phase: f"{name} after the {phase} step: {m}")


def _lockstep_tolerance(name: str, reference: torch.Tensor) -> dict:
    """Float rounding, as measured on this test: gradients within 3e-5 of their largest entry (plain BatchNorm: off
    by 2e-2 to 1.5 of it), running statistics within 5e-7 (plain BatchNorm: 7e-3 and more). Adam's first steps move
    every weight by about ±lr whatever its gradient's size, so a gradient within rounding of Adam's eps (BatchNorm
    leaves some at 1e-8) moves its weight by a fraction of lr: weights within lr/4 (measured: lr/20; plain
    BatchNorm flips the sign of steps: 2 lr)."""
    module, kind = name.split()[:2]
    if kind in ("gradient", "update"):
        return dict(rtol=0, atol=1e-3 * reference.abs().max().item())
    if kind == "weight":
        return dict(rtol=0, atol=LOCKSTEP_LR[module] / 4)
    return dict(rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ the driver
def _steps_in_lockstep(root: Path, rank: int, processes: int) -> list[dict[str, torch.Tensor]]:
    """A warm-up step and an adversarial step of a tiny DoCo trainer at batch LOCKSTEP_BATCH / `processes`, each
    process on its rows of the batch that one process at LOCKSTEP_BATCH draws (from one stream in every process).
    After each step: D's weights, running statistics and averaged gradients, the UNet's trained weights and the
    update Adam applied to them (adversarial step only)."""
    from tiny_training import tiny_trainer

    per_process = LOCKSTEP_BATCH // processes
    trainer = tiny_trainer(root, f"lockstep{processes}", batch_size=per_process, iterations=2, warmup_iterations=1,
                           lr=LOCKSTEP_LR["UNet"], disc_lr=LOCKSTEP_LR["D"])
    trainer.generator = torch.Generator().manual_seed(0)
    draw_batch, rows = trainer._batch, slice(rank * per_process, (rank + 1) * per_process)
    trainer._sample_index = lambda: trainer.train_index[torch.randint(0, len(trainer.train_index), (LOCKSTEP_BATCH,),
                                                                      generator=trainer.generator)]
    trainer._batch = lambda index, generator: tuple(part[rows] for part in draw_batch(index, generator))
    apply_update, updates = trainer.apply_update, {}

    def recorded_update(update):
        updates.update({f"UNet update {name}": u.clone() for name, u in zip(trainer.params, update)})
        apply_update(update)

    trainer.apply_update = recorded_update
    states = []
    for _ in range(2):
        updates.clear()
        trainer.train_step()
        weights = dict(trainer.discriminator.named_parameters())
        states.append({**{f"D {'weight' if k in weights else 'statistic'} {k}": v.clone()
                          for k, v in trainer.discriminator.state_dict().items()},
                       **{f"D gradient {k}": p.grad.clone() for k, p in weights.items()},
                       **{f"UNet weight {k}": p.detach().clone() for k, p in trainer.params.items()}, **updates})
    return states


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
    if sys.argv[1] == "lockstep":
        root = Path(sys.argv[2])
        torch.save(_steps_in_lockstep(root, int(rank), int(os.environ["WORLD_SIZE"])), root / f"lockstep_rank{rank}.pt")
        sys.exit(0)
    _instrument(Path(sys.argv[1]) / f"rank{rank}.json", int(sys.argv[2]) if rank == "0" else 0)
    sys.exit(cli.main(sys.argv[3:]))
