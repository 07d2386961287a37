import sys
from pathlib import Path

import pytest
import torch

# tests/helpers.py is imported as a plain module by the test files.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: threads gain nothing there, and on busy
    shared cores torch's OpenMP threads wait on each other (a step went from 0.1 s to 6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
