"""Child process of test_kill_resume.py: train a tiny demo-profile teacher, optionally SIGKILL itself.

    python kill_resume_child.py DATA RUN_DIR [KILL_AFTER MARKER]

With KILL_AFTER, the process sends itself SIGKILL (no cleanup, no atexit, no finally)
when the datasets have served that many samples, unless MARKER exists; it creates
MARKER first, so the same command run again trains through and must resume.
"""

import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

from offroadseg.chapters import assembly, teachers
from offroadseg.dataset import SegmentationDataset
from offroadseg.profiles import DEMO
from offroadseg.runs import Run
from offroadseg.scan import load_or_scan
from offroadseg.synth import make_desert

data_root, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
kill_after, marker = (int(sys.argv[3]), Path(sys.argv[4])) if len(sys.argv) > 3 else (None, None)

if kill_after is not None and not marker.exists():
    served = {"n": 0}
    original = SegmentationDataset.__getitem__

    def getitem(self, index):
        served["n"] += 1
        if served["n"] == kill_after:
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, index)

    SegmentationDataset.__getitem__ = getitem

make_desert(data_root, {"train": 16, "val": 4}, size=(96, 54), workers=1, progress=False)
run = Run(run_dir)
scan = load_or_scan(data_root, run.scan, workers=1, progress=False)
profile = DEMO.with_overrides(image_size=(32, 64))
plan = assembly.model_plan(profile, "segformer", epochs=3, batch_size=4)
ctx = SimpleNamespace(profile=profile, run=run)
history = teachers.train_teacher(ctx, "segformer", scan, plan, assembly.train_config(profile, plan), progress=False)
print("epochs:", [row["epoch"] for row in history])
