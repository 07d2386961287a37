"""Smoke test of the benchmark scripts: each main() runs end to end with --quick (tiny sizes, one or
two steps) and writes its JSON (date, machine, versions, rows) into tmp_path. No speed is asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from offroadseg.files import read_json

BENCH = Path(__file__).resolve().parent.parent / "bench"

# script -> extra arguments that keep the smoke run to a few seconds
SCRIPTS = {
    "scan": [],
    "train_speed": ["--models", "segformer"],
    "loader_vs_model": ["--models", "segformer", "deeplab"],
    "inference": ["--models", "student", "ensemble_tta", "--skip-model-native"],
}


def _load(name: str):
    sys.path.insert(0, str(BENCH))  # the scripts import bench/common.py (and each other) by module name
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_bench_script_quick_run(name, tmp_path, capsys, one_thread):
    out = tmp_path / f"{name}.json"
    _load(name).main(["--quick", "--out", str(out), *SCRIPTS[name]])
    result = read_json(out)
    assert result["benchmark"] == name and result["quick"] is True
    assert {"date", "machine", "versions"} <= set(result) and result["rows"]
    printed = capsys.readouterr().out
    assert f"results: {out}" in printed
    first_column = {"scan": "method", "train_speed": "role", "loader_vs_model": "role", "inference": "predictor"}[name]
    assert any(line.startswith(first_column) for line in printed.splitlines())  # the table's header


@pytest.mark.slow
def test_loader_vs_model_device_augmentation(tmp_path, one_thread):
    """The GPU training path (uint8 batches from the decode cache, BatchAugment after the transfer)
    also runs on a CPU with --augment device, so the smoke test covers it without a GPU."""
    out = tmp_path / "loader_vs_model.json"
    _load("loader_vs_model").main(["--quick", "--out", str(out), "--models", "segformer", "--augment", "device"])
    result = read_json(out)
    assert result["augment"] == "device" and result["persistent_workers"] is True
    row = result["rows"][0]
    assert row["augment"] == "device" and row["augment_ips"] > 0
    assert row["cache_build_s"] > 0 and row["decode_ips"] > 0 and row["loader_e2_ips"] > 0
    assert row["cache_build"]["cache_size"] == [96, 144]  # 1.5x the quick 64x96 model input


def test_inference_bench_takes_the_ensemble_settings_from_ensemble_json(tmp_path, monkeypatch):
    from offroadseg import runs

    inference = _load("inference")
    monkeypatch.setattr(inference, "ROOT", tmp_path)
    assert inference.ensemble_settings("r")["source"] == "defaults"  # no such run: equal weights, flips ("h",)
    val = {"ensemble": {"miou": 0.5, "ms_per_image": 30.0, "params": 10}}
    runs.write_ensemble(runs.Run(tmp_path / "outputs" / "r"), 0.25, [], flips=["h", "v"], scales=[0.75, 1.25],
                        flip_candidates=[], input_size=(16, 24), val=val)
    settings = inference.ensemble_settings("r")
    assert settings == {"weights": [0.25, 0.75], "flips": ("h", "v"), "scales": [0.75, 1.25], "input_size": [16, 24],
                        "source": "outputs/r/ensemble.json"}


def test_predict_overhead_rows_for_each_model_and_their_ensemble(tmp_path, capsys, one_thread):
    out = tmp_path / "predict_overhead.json"
    _load("predict_overhead").main(["--models", "segformer-b0", "deeplabv3plus-resnet18", "--calls", "3",
                                    "--out", str(out)])
    rows = read_json(out)["rows"]
    assert [row["predictor"] for row in rows] == ["segformer-b0", "deeplabv3plus-resnet18",
                                                 "ensemble(segformer-b0+deeplabv3plus-resnet18)"]
    assert all(row["calls"] == 3 and 0 < row["median_ms"] <= row["p90_ms"] for row in rows)
    assert rows[2]["modules"] > rows[0]["modules"] + rows[1]["modules"]  # the ensemble holds both trees
    assert "median ms" in capsys.readouterr().out


def test_demo_seeds_reuse_links_the_teachers_and_only_with_the_flag_the_student(tmp_path):
    demo_seeds = _load("demo_seeds")
    source = tmp_path / "outputs" / "seeds-demo-s0"
    for part in ("scan.json", "cache/train/0.npy", "models/segformer/best.pt", "models/deeplab/last.pt",
                 "models/student/best.pt", "models/student_adapted/best.pt"):
        (source / part).parent.mkdir(parents=True, exist_ok=True)
        (source / part).write_text(part)
    demo_seeds.reuse_run("seeds-demo-s0", "seeds-b-s0", root=tmp_path)
    target = tmp_path / "outputs" / "seeds-b-s0"
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "cache/train/0.npy", "models/deeplab/last.pt", "models/segformer/best.pt", "scan.json"]
    assert (target / "models/segformer/best.pt").stat().st_ino == (source / "models/segformer/best.pt").stat().st_ino
    with pytest.raises(SystemExit, match="exists"):
        demo_seeds.reuse_run("seeds-demo-s0", "seeds-b-s0", root=tmp_path)
    demo_seeds.reuse_run("seeds-demo-s0", "seeds-c-s0", student=True, root=tmp_path)
    assert (tmp_path / "outputs/seeds-c-s0/models/student/best.pt").read_text() == "models/student/best.pt"
    assert not (tmp_path / "outputs/seeds-c-s0/models/student_adapted").exists()
    with pytest.raises(SystemExit):
        demo_seeds.main(["--reuse-student", "--seeds", "0"])  # whose student? refused before any training
    (source / "scan.json").unlink()
    with pytest.raises(SystemExit, match="scan.json is missing"):
        demo_seeds.reuse_run("seeds-demo-s0", "seeds-d-s0", root=tmp_path)
