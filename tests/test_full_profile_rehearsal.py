"""Rehearsal of the full profile (issue 14): all six notebooks through ./run_all.sh --profile full,
offline, on the profile's own architectures and code paths (SegFormer-B2 with drop path and decoder
pruning, DeepLabV3+ ResNet-101, a SegFormer-B1 student distilled with feature matching, TTA, ONNX and
INT8 export, and the student adapted to the test images' desert by the honest three-part split),
from a --weights folder of stand-ins written in the real formats (random weights, the
published MiT-b1/b2 configurations, a torchvision ResNet-101 state dict), at a tiny image size and one
epoch. What a user would otherwise find out three hours into a Kaggle session, found here in minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import write_standin_weights

from offroadseg.adaptation import split_test_images
from offroadseg.checkpoints import load_checkpoint
from offroadseg.files import read_json
from offroadseg.profiles import FULL
from offroadseg.synth import make_desert

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_full_profile_runs_offline_from_a_weights_folder(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT / "notebooks", project / "notebooks")
    data = tmp_path / "falcon-small"
    make_desert(data, counts={"train": 8, "val": 4, "test": 6}, size=(192, 108), seed=3, workers=1, progress=False)
    # Adapting as the README says to on the real data: 3 test images adapted on, 1 held out, 2 scored.
    parts = tmp_path / "adaptation"
    assert split_test_images(data / "Offroad_Segmentation_testImages", parts, adapt=0.5, holdout=0.2) == {
        "adapt": 3, "holdout": 1, "scored": 2}
    weights = tmp_path / "weights"
    write_standin_weights(weights, FULL)  # mit-b2/, mit-b1/ (save_pretrained), resnet101-cd907fc2.pth
    env = {k: v for k, v in os.environ.items() if k != "OFFROADSEG_RUN"}
    # Offline as on a Kaggle session without internet: any hub access would fail, not download.
    env.update(OFFROADSEG_ROOT=str(project), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TORCH_HOME=str(tmp_path / "no-torch-hub"), HF_HOME=str(tmp_path / "no-hf-home"))
    started = time.perf_counter()
    result = subprocess.run(
        [str(ROOT / "run_all.sh"), "--profile", "full", "--weights", str(weights), "--data", str(data),
         "--set", "epochs=1", "--set", "batch_size=4", "--set", "image_size=[64, 96]", "--set", "latency_input=[64, 96]",
         # One epoch from random stand-ins is never confident: the threshold is forced, so that it adapts.
         "--set", f"adapt={parts / 'adapt'}", "--set", f"adapt_holdout={parts / 'holdout'}", "--set", "adapt_threshold=0.1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
    assert result.returncode == 0, result.stderr[-3000:]
    # The runner's table: one line a notebook ("02_train_segformer  19.9 s  ok"); the slowest-cells
    # lines after it start with a bare number ("05 cell 6") and are not steps.
    lines = [line for line in result.stdout.splitlines() if re.match(r"\d\d_\w+\s", line)]
    assert [line.split()[0] for line in lines] == ["01_data_scan", "02_train_segformer", "03_train_deeplab",
                                                    "04_ensemble", "05_distill", "06_evaluate"]
    assert all(line.rstrip().endswith("ok") for line in lines)
    run = project / "outputs" / "full-falcon-small"
    metrics = {(row["model"], row["split"]): row for row in read_json(run / "metrics.json")["models"]}
    # The full profile's architectures: SegFormer-B2 27.4M, DeepLabV3+ ResNet-101 ~58-59M, the B1 student 13.7M.
    assert round(metrics[("segformer", "val")]["params"] / 1e6, 1) == 27.4
    assert round(metrics[("student", "val")]["params"] / 1e6, 1) == 13.7
    assert 58e6 < metrics[("deeplab", "val")]["params"] < 60e6
    assert read_json(run / "models" / "segformer" / "history.json")[0]["epoch"] == 1
    assert (run / "exports" / "student.onnx").is_file() and (run / "exports" / "student_int8.onnx").is_file()
    assert sorted(p.name for p in (run / "predictions" / "test" / "raw").iterdir()) == sorted(
        p.name for p in (data / "Offroad_Segmentation_testImages" / "Color_Images").iterdir())
    # The adapted SegFormer-B1: its decode head's BatchNorm re-estimated (its encoder has LayerNorms only)
    # on both deserts (adapt_batchnorm="both": the 3 adaptation images and 3 training images),
    # scored by 06 on the 2 test images neither adapted on nor held out.
    adapted = load_checkpoint(run / "models" / "student_adapted" / "best.pt")
    assert adapted["batchnorm"] == {"images": 6, "layers": 1}
    record = read_json(run / "models" / "student_adapted" / "adaptation.json")
    assert len(record["images"]) == 3 and len(record["holdout"]) == 1 and record["selected_on"] == "holdout"
    assert {("student_adapted", "val"), ("student", "test"), ("student_adapted", "test")} <= set(metrics)
    print(f"rehearsal: {seconds:.0f} s in all")
