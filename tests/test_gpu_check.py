"""bench/gpu_check.sh (issue 11): the one prepared GPU check, tested here through its --dry-run
(every stage at toy sizes on this CPU), plus its time guard, its target verdicts and the wheel set
it installs on the GPU image."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
STAGES = ["setup", "train_eager", "train_channels_last", "loader", "infer_eager_bf16", "infer_eager_fp32", "notebooks",
          "onnx", "train_compiled", "infer_compiled_bf16", "infer_compiled_fp32"]
NOTEBOOKS = ["01_data_scan", "02_train_segformer", "03_train_deeplab", "04_ensemble", "05_distill", "06_evaluate"]


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
gpu_wheels = _load("gpu_wheels")


# ----------------------------------------------------------------------------- the time guard


def _sleep(seconds: str) -> None:
    time.sleep(float(seconds))


def _fail() -> None:
    raise RuntimeError("planted failure")


@pytest.fixture
def guard(monkeypatch, tmp_path):
    """Stages of kind "call" that sleep or fail, run by the real fork-and-poll guard."""
    monkeypatch.setitem(gpu_check.__dict__, "_sleep", _sleep)
    monkeypatch.setitem(gpu_check.__dict__, "_fail", _fail)
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 1)
    monkeypatch.setattr(gpu_check, "RESERVE_S", 0)
    monkeypatch.setattr(gpu_check, "KILL_AFTER_S", 1)
    results = []

    def run(lanes, total_s=30):
        gpu_check.run_lanes(lanes, tmp_path, time.monotonic() + total_s, results.append)
        return {r["stage"]: r for r in results}

    return run


def test_guard_cuts_a_stage_over_its_budget_and_goes_on(guard):
    started = time.monotonic()
    done = guard([[gpu_check.Stage("slow", 1, "call", "_sleep", ["30"]), gpu_check.Stage("quick", 5, "call", "_sleep", ["0"])]])
    assert time.monotonic() - started < 10
    assert done["slow"]["status"] == "cut" and done["slow"]["budget_s"] == 1
    assert done["quick"]["status"] == "ok"


def test_guard_records_failures_and_skips_what_the_deadline_leaves_no_time_for(guard):
    done = guard([[gpu_check.Stage("broken", 5, "call", "_fail"), gpu_check.Stage("late", 5, "call", "_sleep", ["0"])]],
                 total_s=0)
    assert done["broken"]["status"] == "skipped" and done["late"]["status"] == "skipped"
    done = guard([[gpu_check.Stage("broken2", 5, "call", "_fail")]])
    assert done["broken2"]["status"] == "failed" and "exit status 1" in done["broken2"]["note"]


def test_guard_runs_lanes_side_by_side(guard):
    started = time.monotonic()
    done = guard([[gpu_check.Stage("a", 10, "call", "_sleep", ["1.5"])], [gpu_check.Stage("b", 10, "call", "_sleep", ["1.5"])]])
    assert {done["a"]["status"], done["b"]["status"]} == {"ok"}
    assert time.monotonic() - started < 2.9  # one after the other would take 3 s


def test_reap_kills_the_marked_kernels_only(tmp_path):
    """Kernels run in sessions of their own, outside a cut stage's process group: reap finds them by the
    mark the kernelspec puts in their environment."""
    marked = subprocess.Popen(["sleep", "60"], env=dict(os.environ, **{gpu_check.KERNEL_MARK: str(tmp_path)}))
    other = subprocess.Popen(["sleep", "60"], env=dict(os.environ, **{gpu_check.KERNEL_MARK: str(tmp_path / "x")}))
    try:
        assert gpu_check.reap(tmp_path) == [marked.pid]
        assert marked.wait(timeout=5) == -9
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


# ----------------------------------------------------------------------------- verdicts


def test_targets_verdicts():
    training = [{"role": "segformer", "model": "segformer-b2", "batch": 16, "eager": 380.0, "compiled": 410.0,
                 "verdict": "ok"},
                {"role": "deeplab", "model": "deeplabv3plus-resnet101", "batch": 16, "eager": 300.0, "verdict": "starved"}]
    latency = [{"predictor": "student", "precision": "bf16", "mode": "eager", "native_ms": 5.0},
               {"predictor": "student", "precision": "bf16", "mode": "compiled", "native_ms": 3.0},
               {"predictor": "ensemble", "precision": "bf16", "mode": "eager", "native_ms": 12.0}]
    notebooks = [{"notebook": n, "seconds": 50.0, "status": "ok"} for n in NOTEBOOKS]
    verdicts = [t["verdict"] for t in gpu_check.targets(training, latency, notebooks)]
    # B2 met (compiled 410), loader missed (deeplab starved), student met (3 ms), ensemble missed (12 ms),
    # ratio 3/12 = 0.25 met, notebooks 300 s met
    assert verdicts == ["met", "missed", "met", "missed", "met", "met"]
    assert all(t["verdict"] == "not measured" for t in gpu_check.targets([], [], notebooks[:5]))


def test_read_notebooks_reads_the_runner_lines(tmp_path):
    log = tmp_path / "notebooks.log"
    log.write_text("data: x\n01_data_scan              11.2 s  ok\n02_train_segformer         3.0 s  FAILED\n"
                   "all                       14.2 s  ok (2 notebooks, run 'x')\n")
    assert gpu_check.read_notebooks(log) == [{"notebook": "01_data_scan", "seconds": 11.2, "status": "ok"},
                                             {"notebook": "02_train_segformer", "seconds": 3.0, "status": "FAILED"}]


def test_kernelspec_runs_this_interpreter_with_this_pythonpath(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/some/where")
    monkeypatch.setenv("JUPYTER_PATH", "")
    path = gpu_check.write_kernelspec(tmp_path / "jupyter")
    spec = json.loads(path.read_text())
    assert spec["argv"][:3] == [sys.executable, "-m", "ipykernel_launcher"]
    assert spec["env"] == {"PYTHONPATH": "/some/where", gpu_check.KERNEL_MARK: str(tmp_path.resolve())}


# ----------------------------------------------------------------------------- the wheel set


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        meta = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
    return path


def test_wheel_set_names_what_is_neither_carried_nor_in_the_image(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_wheels, "ROOTS", ("papermill",))
    _wheel(tmp_path, "papermill", "2.7.0", ["tenacity>=5", "pyyaml", 'tomli; python_version < "3.11"',
                                            'black; extra == "black"'])
    image = gpu_wheels.image_packages()
    assert "pyyaml" in image and "tenacity" not in image
    assert gpu_wheels.missing(tmp_path, image) == {"tenacity": ["papermill"]}  # tomli: not on 3.12; black: an extra
    _wheel(tmp_path, "tenacity", "9.2.1", [])
    assert gpu_wheels.missing(tmp_path, image) == {}
    assert gpu_wheels.report(tmp_path, image) == 0
    _wheel(tmp_path, "tenacity", "9.0.0", [])
    assert gpu_wheels.report(tmp_path, image) == 1  # two versions stop `pip install .whl/*.whl`


# ----------------------------------------------------------------------------- options the check added


@pytest.mark.slow
def test_train_speed_batches_and_compile(tmp_path, one_thread):
    out = tmp_path / "train.json"
    _load("train_speed").main(["--profile", "demo", "--models", "student", "--size", "32x48", "--batches", "2,3",
                               "--steps", "1", "--warmup", "0", "--compile", "--compile-backend", "eager",
                               "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["batch"] for r in rows] == [2, 3] and result["compile"] is True
    assert all(r["compiled"] and r["compile_backend"] == "eager" for r in rows)
    assert all(r["warmup_steps"] == 1 and r["compile_s"] > 0 for r in rows)  # compiling needs a warm-up step


@pytest.mark.slow
def test_loader_vs_model_batches(tmp_path, one_thread):
    from offroadseg.synth import make_demo_desert

    make_demo_desert(tmp_path / "desert", counts={"train": 4, "val": 2, "test": 0}, size=(96, 54), workers=1,
                     progress=False)
    out = tmp_path / "loader.json"
    _load("loader_vs_model").main(["--models", "segformer", "--data", str(tmp_path / "desert"), "--size", "32x48",
                                   "--batches", "2,4,2", "--workers", "0", "--steps", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["role"], r["batch"]) for r in rows] == [("segformer", 2), ("segformer", 4)]  # one row per distinct batch
    assert all(r["loader_e2_ips"] > 0 and r["model_ips"] > 0 for r in rows)


@pytest.mark.slow
def test_onnx_latency_rows_per_provider(tmp_path, one_thread):
    import onnxruntime as ort

    out = tmp_path / "onnx.json"
    _load("onnx_latency").main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {(r["provider"], r["input"]): r for r in result["rows"]}
    assert rows[("CPUExecutionProvider", "64x96")]["median_ms"] > 0
    assert rows[("CPUExecutionProvider", "90x160")]["median_ms"] > 0
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "not in this onnxruntime build" in rows[("CUDAExecutionProvider", "-")]["note"]


# ----------------------------------------------------------------------------- the dry run


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    env["PYTHONPATH"] = str(ROOT / "lib") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("GPU_CHECK_TOTAL_S", None)
    env.pop("GPU_CHECK_WORK", None)
    started = time.monotonic()
    result = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(out), "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert seconds < 180  # the guard's deadline (170 s) holds whatever the load
    # Three files, none deeper: a device call brings back at most 8, two folders down.
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "table.txt"]
    assert not list(tmp_path.glob("gpu_check.*"))  # the work folder is removed
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == STAGES
    assert stages["setup"]["status"] == "ok" and stages["train_eager"]["status"] == "ok"
    # On busy cores the guard may cut or skip late stages; nothing may fail.
    assert not [s for s in report["stages"] if s["status"] == "failed"], report["stages"]
    for name in STAGES[1:]:
        if name != "notebooks" and stages[name]["status"] == "ok":
            assert report["results"][name]["rows"], name
    assert all(r.get("eager") for r in report["training"])
    assert all(r["status"] == "ok" for r in report["notebooks"])
    if stages["notebooks"]["status"] == "ok":
        assert [r["notebook"] for r in report["notebooks"]] == NOTEBOOKS
    assert [t["target"][:12] for t in report["targets"]][0].startswith("SegFormer-B2")
    # The table comes last in the output and is the one in table.txt.
    table = (out / "table.txt").read_text()
    assert "DRY RUN" in table and "targets:" in table and "stages" in table
    assert result.stdout.rstrip().endswith(table.rstrip().splitlines()[-1].rstrip())
