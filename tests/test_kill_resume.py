"""A training process killed hard (SIGKILL) mid-epoch resumes with the same command.

Issue 6, point 1: the run loses at most the unfinished epoch and ends with the history
of a run that was never interrupted. The child (kill_resume_child.py) trains a tiny
demo-profile SegFormer on a tiny generated desert.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from offroadseg.checkpoints import load_checkpoint
from offroadseg.files import read_json

CHILD = Path(__file__).with_name("kill_resume_child.py")
# fit reads one sample for its size line, then 16 train + 4 val samples per epoch: the 26th
# sample served is the 5th of epoch 2's training.
KILL_AFTER = 26


def run_child(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(CHILD), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_same_command_resumes(tmp_path):
    data, marker = tmp_path / "desert", tmp_path / "killed"
    killed_run = tmp_path / "killed_run"

    first = run_child(data, killed_run, KILL_AFTER, marker)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    model_dir = killed_run / "models" / "segformer"
    # Epoch 1 finished and was saved; epoch 2 died half way and left nothing behind.
    assert load_checkpoint(model_dir / "last.pt")["epoch"] == 1
    assert [row["epoch"] for row in read_json(model_dir / "history.json")] == [1]
    assert not list(model_dir.glob("*.tmp*")), "a partial file survived the kill"

    again = run_child(data, killed_run, KILL_AFTER, marker)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout + again.stderr and "at epoch 2/3" in again.stdout + again.stderr

    straight_run = tmp_path / "straight_run"
    straight = run_child(data, straight_run)
    assert straight.returncode == 0, straight.stderr[-2000:]

    resumed_history = read_json(model_dir / "history.json")
    straight_history = read_json(straight_run / "models" / "segformer" / "history.json")
    assert [row["epoch"] for row in resumed_history] == [row["epoch"] for row in straight_history] == [1, 2, 3]
    assert load_checkpoint(model_dir / "last.pt")["epoch"] == 3
    # Same seeds, same data order: the resumed run retraces the uninterrupted one.
    for resumed, uninterrupted in zip(resumed_history, straight_history):
        assert abs(resumed["val_miou"] - uninterrupted["val_miou"]) < 1e-4, (resumed, uninterrupted)
