import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# One torch thread per pytest-xdist worker (`make test` runs one worker per core; the `doco` subprocesses and
# papermill kernels inherit it), else two at most (CI has 2 cores); OMP_NUM_THREADS, when set, wins.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, min(2, os.cpu_count() or 1)))

# The slow tier's longest files, longest first (`make test-all --durations`). `make test-all` keeps this order
# (--no-loadscope-reorder) so that they start first and the two workers end together; xdist's own order, by tests
# per file, started the one-test SD run last, alone on one thread for over 15 minutes in CI.
LONGEST_FILES_FIRST = ("test_sd_e2e.py", "test_attack_sd.py", "test_model_families.py", "test_flow_training.py",
                       "test_spm.py", "test_notebooks_run.py", "test_batch.py")


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def doco_command() -> list[str]:
    """The console command as a subprocess: for tests of what crosses a process boundary (kills, locks,
    several processes, exit codes of the real command). Everything else uses `doco`."""
    return [sys.executable, "-m", "doco_lib"]


@pytest.fixture(scope="session")
def doco():
    """`doco ARGS…` run in this process (no fresh interpreter importing torch and diffusers): returns a
    CompletedProcess with the exit status and what the command printed."""
    return run_doco


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many tiny kernels (sampling, small matrices), where a second thread only adds
    synchronisation: on a busy 2-core machine two threads ran 6-40× slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_doco(*args) -> subprocess.CompletedProcess:
    """`cli.main(args)` with its output captured, as `subprocess.run(doco_command + args, …)` would report it."""
    from doco_lib.app import cli

    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(args)
        except SystemExit as exit_:  # argparse's usage errors
            status = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(["doco", *args], status, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def sd_hub(tmp_path_factory):
    """A Hugging Face cache holding a tiny SD-v1.4-shaped pipeline under SD v1.4's hub id."""
    from doco_lib.toy import sd_shaped

    hub = tmp_path_factory.mktemp("hub")
    sd_shaped.install_in_hub_cache(sd_shaped.build_sd14_pipeline(tmp_path_factory.mktemp("sd") / "sd14"),
                                   sd_shaped.SD14_ID, hub)
    return hub


@pytest.fixture(scope="module")
def sd_clip_hub(tmp_path_factory):
    """A Hugging Face cache holding CompVis/stable-diffusion-v1-4 and openai/clip-vit-large-patch14 (both tiny)."""
    from doco_lib.toy import sd_shaped

    build = tmp_path_factory.mktemp("build")
    hub = tmp_path_factory.mktemp("hub")
    sd_shaped.install_in_hub_cache(sd_shaped.build_sd14_pipeline(build / "sd14"), sd_shaped.SD14_ID, hub)
    sd_shaped.install_in_hub_cache(sd_shaped.build_clip_model(build / "clip"), sd_shaped.CLIP_L_ID, hub)
    return hub
