import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# Two threads at most (CI has 2 cores); fewer when OMP_NUM_THREADS asks, e.g. beside another torch job.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def doco_command() -> list[str]:
    """The console command as installed in the running interpreter's environment."""
    return [sys.executable, "-m", "doco_lib"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many tiny kernels (sampling, small matrices), where a second thread only adds
    synchronisation: on a busy 2-core machine two threads ran 6-40× slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
