"""Several processes and nodes on one shared filesystem (GPU nodes, Slurm arrays, `doco batch --jobs`): GPUs handed
out one job each, an anchor latent cache generated once by processes that share its shards, temporaries of live
writers on other nodes kept, and locks that work where the filesystem has no flock."""

import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from doco_lib import io
from doco_lib.anchors import cache_is_complete, load_anchor_latents
from doco_lib.app import batch
from doco_lib.io import RunLocked, exclusive_lock, remove_stale_temporaries, run_lock


def _dead_pid() -> int:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(gone.stdout)


# --------------------------------------------------------------------------------------------- GPU pool
def _fake_doco_run(monkeypatch, durations: dict[str, float]):
    """Replace the `doco run` processes by sleeps of `durations[concept]` seconds; returns the (concept, GPU, start,
    end) of each and the GPU clashes seen (a job starting on a GPU another running job holds)."""
    lock, running, jobs, clashes = threading.Lock(), {}, [], []

    def run(command, env, **kwargs):
        concept, gpu = Path(command[command.index("--params") + 1]).stem, env.get("CUDA_VISIBLE_DEVICES")
        with lock:
            if gpu in running.values():
                clashes.append((concept, gpu, dict(running)))
            running[concept] = gpu
            start = time.monotonic()
        time.sleep(durations[concept])
        with lock:
            del running[concept]
            jobs.append((concept, gpu, start, time.monotonic()))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(batch.subprocess, "run", run)
    return jobs, clashes


def test_parallel_jobs_take_a_free_gpu_each_and_give_it_back(tmp_path, monkeypatch, capsys):
    # c0 ends first, so c2 gets its GPU; c2 ends long before c1, so c3 must get that same GPU again, not c1's.
    durations = {"c0": 0.2, "c1": 3.0, "c2": 0.2, "c3": 0.2}
    jobs, clashes = _fake_doco_run(monkeypatch, durations)
    files = [tmp_path / f"{name}.yaml" for name in durations]
    batch._run_parallel(files, "r", tmp_path, 4, False, None, ("01_data_preparation",), gpus=["0", "1"])
    assert "--jobs 4 but 2 GPU(s): running 2 concepts at once" in capsys.readouterr().err
    assert clashes == [], "a job started on a GPU another running job held"
    gpu_of = {concept: gpu for concept, gpu, _, _ in jobs}
    assert len(jobs) == 4 and gpu_of["c0"] == gpu_of["c2"] == gpu_of["c3"] != gpu_of["c1"], gpu_of
    times = {concept: (start, end) for concept, _, start, end in jobs}
    assert times["c2"][0] >= times["c0"][1] and times["c3"][0] >= times["c2"][1], "a GPU is reused once it is free"


def test_gpu_ids_follow_the_visible_devices(tmp_path, monkeypatch):
    """Under CUDA_VISIBLE_DEVICES=2,3 the children must get GPUs 2 and 3, not 0 and 1."""
    jobs, clashes = _fake_doco_run(monkeypatch, {"a": 0.3, "b": 0.3})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    batch._run_parallel([tmp_path / "a.yaml", tmp_path / "b.yaml"], "r", tmp_path, 2, False, None, ("x",))
    assert sorted(gpu for _, gpu, _, _ in jobs) == ["2", "3"] and clashes == []


# ------------------------------------------------------------------------------------- shared latent cache
N_IMAGES, SEED, SHARD_SIZE = 11, 3, 2
N_SHARDS = 6
# A child process that prepares the cache in argv[1] (N_IMAGES, SEED, SHARD_SIZE: argv[5:8]) with a fake sampler (each
# call is logged to argv[2] with the shard's first seed) and a fake VAE; it writes `<argv[3]>.ready.<pid>` and starts
# once argv[3] exists. argv[4], words joined by "+": "kill" to SIGKILL itself while generating shard 1, "no-flock"
# for a filesystem without flock ("flock": neither).
CHILD = r"""
import errno, fcntl, os, signal, sys, time
from pathlib import Path
import torch
import doco_lib.anchors as data
import doco_lib.figures, tqdm.auto  # imported by prepare_anchor_latents: before the start, so both start at once

directory, calls, go, modes = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4].split("+")
n_images, seed, shard_size = map(int, sys.argv[5:8])
data.CLAIM_POLL_S = 0.1
if "no-flock" in modes:
    real_flock = fcntl.flock
    def flock(handle, operation):  # the shared filesystem has none; the local /tmp does
        if str(directory.parent) in handle.name:
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        return real_flock(handle, operation)
    fcntl.flock = flock

def generate(pipe, prompts, seeds, steps, guidance, batch_size, sampler):
    with open(calls, "a") as log:
        log.write(f"{os.getpid()} {seeds[0]}\n")
    if "kill" in modes and seeds[0] == seed + shard_size:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.3)
    return torch.stack([torch.full((3, 8, 8), seed / 100) for seed in seeds])

class Vae:
    device, dtype = torch.device("cpu"), torch.float32
    class config:
        scaling_factor = 0.5
    def encode(self, x):
        class Posterior:
            mean, std = x[:, :2] * 2, x[:, :2].abs() + 1
        class Encoded:
            latent_dist = Posterior
        return Encoded

class Pipe:
    vae = Vae()

data.generate = generate
Path(f"{go}.ready.{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.01)
cache = data.prepare_anchor_latents(Pipe(), ["a pentagon", "two pentagons"], n_images, directory, model="fake",
                                    seed=seed, steps=2, guidance=5.0, shard_size=shard_size, save_images=False,
                                    progress=False)
print("loaded", len(cache))
"""


def _prepare_in_processes(tmp_path, modes: list[str]) -> tuple[list[subprocess.CompletedProcess], list[tuple]]:
    """The CHILD in one process per mode, started together; returns them and the (pid, shard) of each sampler call."""
    cache, calls, go = tmp_path / "latent_cache" / "key", tmp_path / "calls.txt", tmp_path / "go"
    for gate in tmp_path.glob("go*"):  # of an earlier call
        gate.unlink()
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(cache), str(calls), str(go), mode,
                                  *map(str, (N_IMAGES, SEED, SHARD_SIZE))],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for mode in modes]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready.*"))) < len(modes) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # all imported: they start together
    finished = []
    for child in children:
        out, err = child.communicate(timeout=300)
        finished.append(subprocess.CompletedProcess(child.args, child.returncode, out, err))
    lines = [line.split() for line in calls.read_text().splitlines()]
    return finished, [(int(pid), (int(seed) - SEED) // SHARD_SIZE) for pid, seed in lines]


@pytest.mark.parametrize("mode", ["flock", "no-flock"])
def test_processes_sharing_a_cache_generate_each_shard_once(tmp_path, mode):
    children, calls = _prepare_in_processes(tmp_path, [mode, mode])
    for child in children:
        assert child.returncode == 0 and f"loaded {N_IMAGES}" in child.stdout, child.stderr[-2000:]
    assert Counter(shard for _, shard in calls) == {shard: 1 for shard in range(N_SHARDS)}, calls
    assert len({pid for pid, _ in calls}) == 2, f"one process generated every shard: {calls}"
    cache = tmp_path / "latent_cache" / "key"
    assert cache_is_complete(cache)
    assert list(json.loads((cache / "manifest.json").read_text())["shards"]) == [str(k) for k in range(N_SHARDS)]
    loaded = load_anchor_latents(cache, 0.5)
    seeds = torch.tensor(range(SEED, SEED + N_IMAGES), dtype=torch.float32) / 100
    assert torch.allclose(loaded.latent_mean[:, 0, 0, 0], (seeds * 2 - 1) * 2), "each image's latents, its own seed"
    assert not list(cache.glob("*.claim*")) and not list(cache.glob(".*.tmp"))


@pytest.mark.parametrize("mode", ["flock", "no-flock"])
def test_a_killed_process_claim_does_not_block_the_cache(tmp_path, mode):
    """Killed while generating shard 1: the next process takes its claim over and generates the rest."""
    (killed,), calls = _prepare_in_processes(tmp_path, [f"kill+{mode}"])
    assert killed.returncode == -9, killed.stderr[-2000:]
    (rerun,), calls = _prepare_in_processes(tmp_path, [mode])
    assert rerun.returncode == 0 and f"loaded {N_IMAGES}" in rerun.stdout, rerun.stderr[-2000:]
    killer = calls[0][0]
    assert [shard for pid, shard in calls if pid == killer] == [0, 1]
    assert [shard for pid, shard in calls if pid != killer] == list(range(1, N_SHARDS)), calls
    cache = tmp_path / "latent_cache" / "key"
    assert cache_is_complete(cache) and not list(cache.glob("*.claim*"))


# ---------------------------------------------------------------------------------- temporaries of other hosts
def test_only_this_hosts_dead_writers_and_old_foreign_temporaries_are_removed(tmp_path):
    dead, here = _dead_pid(), io._host()
    ours_dead = tmp_path / f".checkpoint.pt.{dead}@{here}.k3j4h5g6.tmp"
    ours_alive = tmp_path / f".checkpoint.pt.{os.getpid()}@{here}.zz99yy88.tmp"
    foreign_live = tmp_path / f".delta.safetensors.{dead}@gpu-node-17.a_b1c2d3.tmp"  # dead here, alive there
    foreign_old = tmp_path / f".manifest.json.{dead}@gpu-node-17.q1w2e3r4.tmp"
    foreign_old_folder = tmp_path / f".unet.{dead}@gpu-node-17.x9y8z7w6.tmp"
    foreign_old_folder.mkdir()
    for path in (ours_dead, ours_alive, foreign_live, foreign_old, foreign_old_folder / "config.json"):
        path.write_text("x")
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in (foreign_old, foreign_old_folder):
        os.utime(path, (two_days_ago, two_days_ago))
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([ours_dead, foreign_old, foreign_old_folder])
    assert ours_alive.exists() and foreign_live.exists() and not foreign_old_folder.exists()


def test_temporaries_are_named_after_their_host(tmp_path, monkeypatch):
    monkeypatch.setattr(io.socket, "gethostname", lambda: "gpu_node.cluster.example")
    names = []
    real_replace = os.replace

    def replace(source, target):
        names.append(Path(source).name)
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    io.atomic_save_json({"a": 1}, tmp_path / "x.json")
    assert names[0].startswith(f".x.json.{os.getpid()}@gpu-node-cluster-example.") and names[0].endswith(".tmp")
    assert io._TEMPORARY.fullmatch(names[0])["host"] == "gpu-node-cluster-example"


def test_a_run_links_a_shared_cache_while_another_process_still_writes_a_preview_into_it(tmp_path, monkeypatch):
    """A process whose anchor shards are all recorded links the cache into its run while the process that made the
    last shard still writes that shard's preview PNG (a temporary, renamed when done): the copy leaves the
    temporary out instead of failing on it (before: shutil.Error, "No such file or directory")."""
    from doco_lib.studies import runs

    shared, run = tmp_path / "latent_cache" / "key", tmp_path / "run" / "anchor_latents"
    (shared / "images").mkdir(parents=True)
    (shared / "manifest.json").write_text("{}")
    (shared / "images" / "00000.png").write_text("done")
    preview = shared / "images" / f".00001.png.{os.getpid() + 1}@{io._host()}.k3j4h5g6.tmp"
    preview.write_text("half")
    real_link = os.link

    def link(source, target):
        if preview.exists():  # the writer renames its temporary while the copy is under way
            preview.rename(shared / "images" / "00001.png")
        return real_link(source, target)

    monkeypatch.setattr(os, "link", link)
    runs._link_copy(shared, run)
    assert sorted(p.name for p in (run / "images").iterdir()) in (["00000.png"], ["00000.png", "00001.png"])
    assert (run / "manifest.json").read_text() == "{}"


# ------------------------------------------------------------------------------------ filesystems without flock
@pytest.fixture
def no_flock(monkeypatch, tmp_path):
    """flock fails with ENOSYS under tmp_path, as on Lustre mounted without `-o flock` (the local /tmp has it)."""
    real = fcntl.flock

    def flock(handle, operation):
        if str(tmp_path) in handle.name:
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        return real(handle, operation)

    monkeypatch.setattr(fcntl, "flock", flock)


def test_run_lock_without_flock_excludes_a_second_run_and_releases(tmp_path, no_flock):
    run = tmp_path / "run"
    holder = run / ".lock.holder"
    with run_lock(run):
        assert holder.read_text() == f"{io._host()} {os.getpid()}\n"
        with pytest.raises(RunLocked, match=rf"{run} is in use by another run \({holder} is held by process "
                                            rf"{os.getpid()} on host {io._host()}.*delete {holder}"):
            with run_lock(run):
                pass
    assert not holder.exists()
    with run_lock(run):  # released on exit
        pass


def test_a_lock_without_flock_is_taken_over_from_a_dead_holder_on_this_host_only(tmp_path, no_flock):
    lock = tmp_path / "x.lock"
    holder = tmp_path / "x.lock.holder"
    holder.write_text(f"{io._host()} {_dead_pid()}\n")  # killed while holding it
    with exclusive_lock(lock):
        assert holder.read_text() == f"{io._host()} {os.getpid()}\n"
    holder.write_text(f"gpu-node-17 {_dead_pid()}\n")  # its pid means nothing here
    with pytest.raises(RunLocked, match=rf"held by process \d+ on host gpu-node-17 .*delete {holder}"):
        with exclusive_lock(lock, stale_after=3600):
            pass
    two_hours_ago = time.time() - 7200
    os.utime(holder, (two_hours_ago, two_hours_ago))
    with pytest.raises(RunLocked):
        with exclusive_lock(lock):  # no age limit: never taken from another host
            pass
    with exclusive_lock(lock, stale_after=3600):
        assert holder.read_text() == f"{io._host()} {os.getpid()}\n"


def test_manifest_saves_without_flock_and_waits_for_the_holder(tmp_path, no_flock):
    manifest = batch.Manifest(tmp_path / "manifest.json")
    manifest.concept("star")["status"] = "done"
    other = batch.Manifest(tmp_path / "manifest.json")
    other.concept("heart")["status"] = "running"
    with exclusive_lock(tmp_path / "manifest.lock"):  # another writer holds it for a moment
        saver = threading.Thread(target=manifest.save)
        saver.start()
        time.sleep(0.3)
        assert saver.is_alive() and not (tmp_path / "manifest.json").exists(), "the save waits for the lock"
    saver.join(timeout=10)
    other.save()
    concepts = json.loads((tmp_path / "manifest.json").read_text())["concepts"]
    assert concepts == {"star": {"notebooks": {}, "status": "done"}, "heart": {"notebooks": {}, "status": "running"}}
    assert not (tmp_path / "manifest.lock.holder").exists()
