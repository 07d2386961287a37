import json
import subprocess
import sys

import pytest
from helpers import assert_names

from offroadseg import runs
from offroadseg.files import atomic_open, read_json, write_json
from offroadseg.runs import RunLock, RunMismatch


def test_record_step_writes_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFROADSEG_ROOT", str(tmp_path))
    run = runs.run_dir("demo")
    assert run.dir == tmp_path / "outputs" / "demo"
    runs.record_step(run, "01_data_scan", {"workers": 2}, profile="demo", data_root="/data", seed=0)
    manifest = runs.record_step(run, "01_data_scan", {}, profile="demo", data_root="/data", finished=True,
                                extra={"usable": 3})
    on_disk = read_json(run.manifest)
    assert on_disk == json.loads(json.dumps(manifest))
    step = on_disk["steps"]["01_data_scan"]
    assert step["parameters"] == {"workers": 2} and step["usable"] == 3 and step["seconds"] >= 0
    assert on_disk["profile"] == "demo" and on_disk["data_root"] == "/data" and on_disk["seeds"] == {"01_data_scan": 0}
    assert on_disk["packages"]["numpy"] and on_disk["packages"]["python"]
    assert set(on_disk["code_revision"]) == {"commit", "dirty"}


@pytest.mark.parametrize("bad", ["", "a/b", "..", "x\\y"])
def test_bad_run_names(bad):
    with pytest.raises(ValueError, match="run name"):
        runs.run_dir(bad)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as handle:
            handle.write("{half")
            raise RuntimeError("crash mid-write")
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_write_survives_a_killed_process(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"old")
    code = (
        "import os, sys\n"
        "from offroadseg.files import atomic_open\n"
        f"with atomic_open({str(path)!r}) as h:\n"
        "    h.write(b'x' * 1000)\n"
        "    h.flush()\n"
        "    os._exit(9)\n"  # dies without running any cleanup
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert path.read_bytes() == b"old"


def test_read_json_names_a_broken_file(tmp_path):
    path = tmp_path / "scan.json"
    path.write_text("{oops")
    with pytest.raises(ValueError, match="scan.json: not valid JSON"):
        read_json(path)


def test_rerun_keeps_the_earlier_step_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFROADSEG_ROOT", str(tmp_path))
    run = runs.run_dir("r")
    runs.record_step(run, "02_train_segformer", {"epochs": 5}, profile="demo", data_root=None)
    runs.record_step(run, "02_train_segformer", {}, profile="demo", data_root=None, finished=True)
    manifest = runs.record_step(run, "02_train_segformer", {"epochs": 8}, profile="demo", data_root=None)
    assert manifest["steps"]["02_train_segformer"]["parameters"] == {"epochs": 8}
    earlier = manifest["earlier_steps"]
    assert len(earlier) == 1 and earlier[0]["parameters"] == {"epochs": 5} and "finished" in earlier[0]


def test_snapshot_keeps_old_contents_while_the_run_rewrites_its_files(tmp_path):
    run = runs.Run(tmp_path / "r")
    assert runs.snapshot(run) is None  # no run there yet
    write_json(run.manifest, {"run": "r"})
    write_json(run.dir / "metrics.json", {"miou": 0.5})
    (run.dir / "models" / "segformer").mkdir(parents=True)
    (run.dir / "models" / "segformer" / "best.pt").write_bytes(b"weights v1")
    (run.dir / "models" / "segformer" / ".best.pt.x.tmp").write_bytes(b"half")
    (run.dir / "lock").write_text("")
    (run.dir / "lock.holder").write_text("./run_all.sh (pid 1 ...)")

    kept = runs.snapshot(run)
    assert kept.parent == run.dir / "earlier"
    assert not (kept / "lock").exists() and not (kept / "lock.holder").exists()  # the runner's now, not the run's
    assert (kept / "models" / "segformer" / "best.pt").stat().st_ino == (run.dir / "models" / "segformer" / "best.pt").stat().st_ino
    assert not (kept / "models" / "segformer" / ".best.pt.x.tmp").exists()

    (run.dir / "metrics.json").write_text("{\"miou\": 0.6}")  # even an in-place rewrite leaves the copy alone
    assert read_json(kept / "metrics.json") == {"miou": 0.5}
    assert read_json(run.dir / "metrics.json") == {"miou": 0.6}
    second = runs.snapshot(run)
    assert second != kept and not (second / "earlier").exists()  # snapshots never nest
    assert read_json(second / "metrics.json") == {"miou": 0.6}


def ensemble_record(run):
    """An ensemble.json as notebook 04 writes it (the figures are made up)."""
    scores = {"miou": 0.6, "pixel_acc": 0.9, "per_class_iou": {"Sky": 0.9}, "ms_per_image": 80.0, "params": 17}
    return runs.write_ensemble(run, weight=0.3, weight_grid=[{"weight": 0.3, "miou": 0.6}], flips=("h",), scales=None,
                               flip_candidates=[{"flips": ["h"], "miou": 0.61}], input_size=(16, 32),
                               val={"segformer": {**scores, "miou": 0.5}, "ensemble": scores})


def test_ensemble_json_round_trip(tmp_path):
    run = runs.Run(tmp_path / "r")
    written = ensemble_record(run)
    record = runs.read_ensemble(run)
    assert record == json.loads(json.dumps(written)) and run.ensemble == run.dir / "ensemble.json"
    assert runs.ensemble_weights(record) == pytest.approx([0.3, 0.7])  # segformer's weight, then deeplab's
    assert record["tta"] == {"flips": ["h"], "scales": None, "candidates": [{"flips": ["h"], "miou": 0.61}]}
    assert record["input_size"] == [16, 32] and record["val"]["ensemble"]["miou"] == 0.6
    assert record["members"]["deeplab"]["checkpoint"] == "models/deeplab/best.pt"


def test_a_missing_or_incomplete_ensemble_json_names_notebook_04(tmp_path):
    run = runs.Run(tmp_path / "r")
    with pytest.raises(FileNotFoundError) as error:
        runs.read_ensemble(run)
    assert_names(error, run.ensemble, "04_ensemble", "--only 04")
    record = ensemble_record(run)
    del record["tta"]["scales"], record["val"]["ensemble"]["ms_per_image"]  # as an older or hand-made file might be
    write_json(run.ensemble, record)
    with pytest.raises(ValueError) as error:
        runs.read_ensemble(run)
    assert_names(error, "ensemble.json", "tta.scales", "val.ensemble.ms_per_image", "04_ensemble", "'r'")


def test_require_names_the_producer_of_each_run_file(tmp_path):
    run = runs.Run(tmp_path / "r")
    (run.dir / "models" / "segformer").mkdir(parents=True)
    assert run.require("models/segformer") == run.dir / "models" / "segformer"
    for relative, notebook in (("models/student/best.pt", "05_distill"), ("scan.json", "01_data_scan"),
                               ("figures/x.png", "the earlier notebooks")):
        with pytest.raises(FileNotFoundError, match=f"{relative} not found: run notebook {notebook}"):
            run.require(relative)


def test_a_second_command_on_one_run_folder_refuses_and_a_killed_ones_lock_does_not_block(tmp_path):
    folder = tmp_path / "outputs" / "r"
    with RunLock(folder, holder="python -m offroadseg.train"):
        with pytest.raises(RunMismatch) as error:
            with RunLock(folder):
                pass
    assert_names(error, folder, "in use by python -m offroadseg.train (pid", "started", "--run NAME")
    # A command killed hard leaves its lock file behind; the OS released the lock with the process.
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from offroadseg.runs import RunLock\n"
                               f"lock = RunLock(Path({str(folder)!r})).__enter__(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunMismatch, match=f"pid {holder.pid}"):
        RunLock(folder).__enter__()
    holder.kill()
    holder.wait()
    assert (folder / "lock").exists()
    with RunLock(folder):
        pass
