import os
import sys
from pathlib import Path

import pytest
import torch

from offroadseg.sampling import usable_cpus

# tests/helpers.py is imported as a plain module by the test files.
sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_small_dataset  # noqa: E402  (after the path it is found on)

# Under pytest-xdist (./run_all.sh --test runs the fast tier with -n): each worker process takes its
# share of the cores as torch threads, so that the workers do not oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: threads gain nothing there, and on busy
    shared cores torch's OpenMP threads wait on each other (a step went from 0.1 s to 6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root of its own (OFFROADSEG_ROOT) holding a small dataset in data/ (4 train, 2 val,
    1 test pairs), for tests that run notebook steps (`context.start`) against it."""
    monkeypatch.setenv("OFFROADSEG_ROOT", str(tmp_path))
    monkeypatch.delenv("OFFROADSEG_RUN", raising=False)
    make_small_dataset(tmp_path / "data", 4, 2, 1)
    return tmp_path
