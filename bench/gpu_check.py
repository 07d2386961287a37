"""The stages of bench/gpu_check.sh, their time guard, and its one table.

    python bench/gpu_check.py kernelspec WORK/jupyter          # a "python3" kernel: this python, this PYTHONPATH
    python bench/gpu_check.py run OUTDIR WORK [--dry-run]      # every stage under the guard, then the table
    python bench/gpu_check.py report OUTDIR WORK [--dry-run]   # OUTDIR/gpu_check.json + table.txt, printed

The measurements are the bench scripts' (train_speed, loader_vs_model, inference, onnx_latency)
and the notebook runner's, each called with its own command line (`main(argv)`) and its `--out`
JSON under WORK/json; `report` reads those files, the stage record WORK/stages.tsv and the
runner's log, and puts them in one file and one table against the issue's targets.

How `run` guards the time: this process imports torch, transformers and the library once (about
10 s of a busy 2-core CPU, paid once instead of per stage), never touches CUDA, and forks one
child per stage. The child gets a process group of its own (its DataLoader workers and compile
workers are in it) and initialises CUDA itself. A child past its budget gets SIGTERM, then
SIGKILL 10 s later, for its whole group; notebook kernels, which run in sessions of their own,
are found by the mark their kernelspec puts in their environment and killed too. A stage that would get
less than MIN_STAGE_S before the deadline is skipped. The scripts rewrite their JSON after each
row, so a cut stage keeps what it measured, and the report is rewritten after every stage.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# The targets (bench/RESULTS.md, "GPU check").
B2_TRAIN_MIN_IPS = 400
STUDENT_MAX_MS = 4.0
ENSEMBLE_MAX_MS = 10.0
RATIO_MAX = 0.35
NOTEBOOKS_MAX_S = 600
REFERENCE = {"student_ms": 40, "ensemble_ms": 85}
NOTEBOOK_LINE = re.compile(r"^(\d\d_\w+)\s+([\d.]+) s\s+(ok|FAILED)")
NOT_MEASURED = "not measured"
KERNEL_MARK = "GPU_CHECK_KERNEL_OF"
RESERVE_S = 8  # kept for the final report
MIN_STAGE_S = 15  # a stage that would get less is skipped
KILL_AFTER_S = 10  # SIGTERM, then SIGKILL this much later


# ----------------------------------------------------------------------------- set-up steps


def write_env(path: Path) -> dict:
    import platform

    import torch

    from offroadseg.files import write_json
    from offroadseg.runs import package_versions

    info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "versions": package_versions(),
            "pythonpath": os.environ.get("PYTHONPATH", ""), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    gpu_memory_GiB=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores)"
    try:
        import onnxruntime as ort

        info.update(onnxruntime=ort.__version__, onnxruntime_providers=ort.get_available_providers())
    except ImportError as error:
        info["onnxruntime"] = f"not importable: {error}"
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu",
                 "--format=csv,noheader"]
        info["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    for name in ("papermill", "nbclient", "ipykernel", "nbval"):
        try:
            module = __import__(name)
            info[name] = f"{getattr(module, '__version__', '?')} ({Path(module.__file__).parent})"
        except ImportError as error:
            info[name] = f"not importable: {error}"
    write_json(path, info)
    print(", ".join(f"{k}: {info[k]}" for k in ("device", "torch", "onnxruntime", "papermill", "ipykernel") if k in info))
    return info


def write_kernelspec(folder: Path) -> Path:
    """`folder`/kernels/python3/kernel.json: the kernel papermill starts (kernel_name="python3") runs
    this interpreter with this PYTHONPATH, whatever other kernelspecs the machine has. Put `folder`
    first on JUPYTER_PATH. Its environment names the check's WORK folder (`folder`'s parent), by
    which `reap` finds the kernels a cut stage left behind."""
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python 3 (gpu_check: {sys.executable})", "language": "python",
            "env": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), KERNEL_MARK: str(folder.resolve().parent)},
            "metadata": {"debugger": False}}
    path = folder / "kernels" / "python3" / "kernel.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    os.environ["JUPYTER_PATH"] = str(folder) + os.pathsep + os.environ.get("JUPYTER_PATH", "")
    from jupyter_client.kernelspec import KernelSpecManager

    found = KernelSpecManager().get_kernel_spec("python3")
    if found.argv[0] != sys.executable:
        raise SystemExit(f"kernelspec python3 resolves to {found.resource_dir} ({found.argv[0]}), not {path}: "
                         f"is {folder} first on JUPYTER_PATH?")
    print(f"kernel python3: {found.argv[0]} ({found.resource_dir})")
    return path


def make_desert(root: Path, dry_run: bool) -> dict:
    """The issue's desert (310 images at 960x540: the demo desert's counts) or, dry, 12 at 128x72."""
    from offroadseg.synth import make_demo_desert

    if dry_run:
        result = make_demo_desert(root, counts={"train": 8, "val": 2, "test": 2}, size=(128, 72), workers=1,
                                  progress=False)
    else:
        result = make_demo_desert(root, progress=False)
    print(f"desert: {root} {result['counts']} in {result['seconds']:.1f} s")
    return result


def reap(work: Path) -> list[int]:
    """Kill the kernels started for this check (the kernelspec puts KERNEL_MARK=WORK in their
    environment), which a notebook run cut by the time guard leaves behind: they run in sessions of
    their own, outside the stage's process group."""
    marker = f"{KERNEL_MARK}={Path(work).resolve()}".encode() + b"\0"
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes() + b"\0"
        except OSError:
            continue
        if marker in environ:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except OSError:
                pass
    if killed:
        print(f"killed leftover kernels: {killed}")
    return killed


# ----------------------------------------------------------------------------- stages


@dataclass
class Stage:
    name: str
    cap_s: int  # its budget; less when the deadline is nearer
    kind: str  # "script" (bench/<target>.py main(argv)), "runner" (offroadseg.runner), "call" (a function here)
    target: str
    argv: list = field(default_factory=list)


DEFAULT_TOTAL_S = {False: 530, True: 170}


def plan(work: Path, dry_run: bool, total_s: int | None = None) -> list[Stage]:
    """The stages in order, most telling first; compilation last, since it is the first to be cut.
    A deadline longer than the default (`total_s`) stretches every budget in proportion."""
    j = work / "json"
    roles = ["--models", "segformer", "deeplab", "student"]
    predictors = ["--models", "student", "ensemble", "ensemble_tta"]
    if dry_run:
        # The demo student is the DeepLab teacher's architecture: two roles cover both models.
        roles = ["--models", "segformer", "student"]
        train = ["--profile", "demo", *roles, "--size", "64x96", "--batches", "2", "--precision", "bf16", "--steps", "1",
                 "--warmup", "1"]
        loader = ["--profile", "demo", *roles, "--size", "64x96", "--batches", "2", "--workers", "1", "--steps", "1",
                  "--precision", "bf16", "--augment", "device"]
        infer = ["--profile", "demo", *predictors, "--channels-last", "--size", "64x96", "--native", "90x160", "--runs", "2",
                 "--warmup", "1", "--batches", "1,2"]
        # Dynamo's capture (backend eager: no code generation), one input shape: the DeepLab here,
        # the SegFormer in train_compiled; the GPU run compiles every predictor and model.
        compiled_infer = ["--compile", "--compile-backend", "eager", "--skip-model-native", "--batches", "1",
                          "--models", "student"]
        compiled_train = ["--compile", "--compile-backend", "eager", "--models", "segformer"]
        onnx = ["--profile", "demo", "--quick"]
        notebooks = ["--profile", "demo", "--set", "epochs=1", "--set", "pretrained=false", "--set", "image_size=[64, 96]",
                     "--set", "latency_input=[72, 128]", "--set", "throughput_batches=[1]", "--set", "speed_runs=1",
                     "--set", "grid_points=2", "--set", 'tta_candidates=[["h"]]', "--set", "batch_size=2",
                     # the export cell runs in every CPU demo run already; here it would cost 10 s of 170
                     "--set", "export=false"]
        cap = {"train": 30, "loader": 30, "infer": 25, "notebooks": 150, "onnx": 20, "compile": 30}
    else:
        train = ["--profile", "full", *roles, "--size", "512x512", "--batches", "16,32", "--precision", "bf16",
                 "--steps", "10"]
        loader = ["--profile", "full", *roles, "--size", "512x512", "--batches", "16,32", "--workers", "8",
                  "--steps", "10", "--precision", "bf16"]
        infer = ["--profile", "full", *predictors, "--channels-last"]
        compiled_infer = ["--compile", "--batches", "1", "--skip-model-native"]
        compiled_train = ["--compile"]
        onnx = ["--profile", "full"]
        # Random init (no hub there): pretrained=false reaches the plan of every training notebook
        # (02, 03, 05: model_plan keeps a False override, build_model reads False as "from scratch");
        # the full student has no init_from, so nothing needs weights that are not trained here.
        notebooks = ["--profile", "full", "--set", "epochs=2", "--set", "pretrained=false"]
        cap = {"train": 45, "loader": 75, "infer": 60, "notebooks": 270, "onnx": 30, "compile": 100}
    scale = max(1.0, (total_s or DEFAULT_TOTAL_S[dry_run]) / DEFAULT_TOTAL_S[dry_run])
    cap = {k: int(v * scale) for k, v in cap.items()}
    return [
        Stage("setup", 60, "call", "setup", [str(work), "1" if dry_run else ""]),
        Stage("train_eager", cap["train"], "script", "train_speed",
              [*train, "--channels-last", "off", "--out", str(j / "train_eager.json")]),
        Stage("train_channels_last", cap["train"], "script", "train_speed",
              [*train, "--channels-last", "on", "--out", str(j / "train_channels_last.json")]),
        Stage("loader", cap["loader"], "script", "loader_vs_model",
              [*loader, "--data", str(work / "desert"), "--cache-root", str(work / "cache"), "--out", str(j / "loader.json")]),
        Stage("infer_eager_bf16", cap["infer"], "script", "inference",
              [*infer, "--precision", "bf16", "--out", str(j / "infer_eager_bf16.json")]),
        Stage("infer_eager_fp32", cap["infer"], "script", "inference",
              [*infer, "--precision", "fp32", "--out", str(j / "infer_eager_fp32.json")]),
        # The runner prints one line per notebook (name, wall seconds, ok); outputs/ is WORK/project/outputs.
        Stage("notebooks", cap["notebooks"], "runner", str(j / "notebooks.log"),
              ["--data", str(work / "desert"), "--run", "gpucheck", *notebooks]),
        Stage("onnx", cap["onnx"], "script", "onnx_latency", [*onnx, "--out", str(j / "onnx.json")]),
        Stage("train_compiled", cap["compile"], "script", "train_speed",
              [*train, "--channels-last", "on", *compiled_train, "--out", str(j / "train_compiled.json")]),
        Stage("infer_compiled_bf16", cap["compile"], "script", "inference",
              [*infer, *compiled_infer, "--precision", "bf16", "--out", str(j / "infer_compiled_bf16.json")]),
        Stage("infer_compiled_fp32", cap["compile"], "script", "inference",
              [*infer, *compiled_infer, "--precision", "fp32", "--out", str(j / "infer_compiled_fp32.json")]),
    ]


def setup(work: str, dry_run: str) -> None:
    """The child's part of the set-up: versions and device (env.json), a project copy whose
    outputs/ lives in WORK (the runner's OFFROADSEG_ROOT), the desert."""
    import shutil

    work = Path(work)
    write_env(work / "json" / "env.json")
    project = work / "project"
    project.mkdir(parents=True, exist_ok=True)
    root = HERE.parent
    shutil.copy(root / "pyproject.toml", project / "pyproject.toml")
    shutil.copytree(root / "notebooks", project / "notebooks", dirs_exist_ok=True)
    if not (project / "lib").exists():
        (project / "lib").symlink_to(root / "lib")
    make_desert(work / "desert", bool(dry_run))


class _Tee:
    """stdout of the notebook stage, also written to its log (the report reads the runner's lines)."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "a", encoding="utf-8")

    def write(self, text):
        self.file.write(text)
        self.file.flush()
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child(stage: Stage, work: Path) -> int:
    """In the forked child: run the stage; its exit status."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        if stage.kind == "call":
            globals()[stage.target](*stage.argv)
            return 0
        if stage.kind == "runner":
            from offroadseg import runner

            os.environ["OFFROADSEG_ROOT"] = str(work / "project")
            sys.stdout = _Tee(sys.stdout, Path(stage.target))
            return int(runner.main(list(stage.argv)) or 0)
        module = SCRIPTS.get(stage.target) or _load_script(stage.target)
        sys.argv = [f"bench/{stage.target}.py", *stage.argv]
        module.main(list(stage.argv))
        return 0
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - the parent records the failure; the traceback goes to the log
        traceback.print_exc()
        return 1


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except OSError:
        pass


@dataclass
class Running:
    stage: Stage
    pid: int
    started: float
    budget: int
    killed_at: float | None = None


def start_stage(stage: Stage, work: Path, deadline: float, nice: int = 0) -> Running | dict:
    """Fork the stage's child, or the record of a stage skipped for want of time."""
    left = int(deadline - time.monotonic() - RESERVE_S)
    if left < MIN_STAGE_S:
        print(f"=== {stage.name}: skipped, {left} s left before the deadline", flush=True)
        return {"stage": stage.name, "status": "skipped", "seconds": 0, "budget_s": stage.cap_s, "note": "no time left"}
    budget = min(stage.cap_s, left)
    print(f"=== {stage.name} (budget {budget} s): {stage.kind} {stage.target} {' '.join(stage.argv)}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.nice(nice)
            code = _child(stage, work)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if 0 <= code < 256 else 1)
    return Running(stage, pid, time.monotonic(), budget)


def poll_stage(job: Running, work: Path) -> dict | None:
    """The stage's record once its child has ended, else None; cuts it once over its budget."""
    done, wait_status = os.waitpid(job.pid, os.WNOHANG)
    if not done:
        now = time.monotonic()
        if job.killed_at is None and now - job.started > job.budget:
            print(f"=== {job.stage.name}: over its {job.budget} s budget, stopping it", flush=True)
            _kill_group(job.pid, signal.SIGTERM)
            job.killed_at = now
        elif job.killed_at is not None and now - job.killed_at > KILL_AFTER_S:
            _kill_group(job.pid, signal.SIGKILL)
        return None
    code = os.waitstatus_to_exitcode(wait_status)
    if job.killed_at is not None:
        status, note = "cut", f"over its {job.budget} s budget: what it measured before is kept"
    elif code == 0:
        status, note = "ok", ""
    else:
        status, note = "failed", f"exit status {code} (see gpu_check.log)"
    _kill_group(job.pid, signal.SIGKILL)  # stragglers of its group (workers it left behind)
    if job.stage.kind == "runner":
        reap(work)
    seconds = int(round(time.monotonic() - job.started))
    print(f"=== {job.stage.name}: {status} in {seconds} s", flush=True)
    return {"stage": job.stage.name, "status": status, "seconds": seconds, "budget_s": job.budget, "note": note}


def run_lanes(lanes: list[list[Stage]], work: Path, deadline: float, record, nice: tuple = ()) -> None:
    """Each lane's stages one after another, the lanes side by side; `record(result)` as each ends.
    `nice[i]`: the niceness of lane i's children (0 if not given)."""
    queues = [list(lane) for lane in lanes]
    active: dict[int, Running] = {}
    while any(queues) or active:
        for index, queue in enumerate(queues):
            while index not in active and queue:
                started = start_stage(queue.pop(0), work, deadline, nice[index] if index < len(nice) else 0)
                if isinstance(started, Running):
                    active[index] = started
                else:
                    record(started)
        for index, job in list(active.items()):
            result = poll_stage(job, work)
            if result is not None:
                del active[index]
                record(result)
        time.sleep(0.1)


SCRIPTS: dict = {}


def run(outdir: Path, work: Path, dry_run: bool, total_s: int) -> int:
    """Set-up, then the stages. On the GPU one after another (the timings need a quiet device);
    dry, on a CPU, the notebooks (the long pole: six kernels, each importing torch) beside the
    others, so the whole stays under 3 minutes on 2 busy cores."""
    deadline = time.monotonic() + total_s
    (work / "json").mkdir(parents=True, exist_ok=True)
    (work / "stages.tsv").write_text("", encoding="utf-8")
    # Imported once here, shared by every forked stage (this process never initialises CUDA).
    import torch  # noqa: F401

    from offroadseg import augment, engine, ensemble, evaluate, export, models, synth, training  # noqa: F401

    for name in ("train_speed", "loader_vs_model", "inference", "onnx_latency"):
        SCRIPTS[name] = _load_script(name)
    if torch.cuda.is_initialized():  # a forked child could not use CUDA then
        raise SystemExit("gpu_check: CUDA was initialised while importing; the forked stages could not use it")
    results = []

    def record(result: dict) -> None:
        results.append(result)
        with open(work / "stages.tsv", "a", encoding="utf-8") as handle:
            handle.write("\t".join(str(result[k]) for k in ("stage", "status", "seconds", "budget_s", "note")) + "\n")
        build_report(outdir, work, dry_run)

    setup_stage, *stages = plan(work, dry_run, total_s)
    run_lanes([[setup_stage]], work, deadline, record)
    if results[-1]["status"] != "ok":
        for stage in stages:
            record({"stage": stage.name, "status": "skipped", "seconds": 0, "budget_s": stage.cap_s,
                    "note": "set-up failed"})
    elif dry_run:  # the notebook chain first on the CPU: the other lane gets what it leaves
        run_lanes([[s for s in stages if s.kind == "runner"], [s for s in stages if s.kind != "runner"]], work, deadline,
                  record, nice=(0, 10))
    else:
        run_lanes([stages], work, deadline, record)
    print(f"\n=== gpu_check: {total_s - (deadline - time.monotonic()):.0f} s in all (deadline {total_s} s); "
          f"files in {outdir}", flush=True)
    print(render(build_report(outdir, work, dry_run)))
    return 0 if results[0]["status"] == "ok" else 1


# ----------------------------------------------------------------------------- report


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_stages(work: Path) -> list[dict]:
    stages = []
    path = work / "stages.tsv"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            name, status, seconds, budget, *rest = line.split("\t")
            stages.append({"stage": name, "status": status, "seconds": int(seconds), "budget_s": int(budget),
                           "note": rest[0] if rest else ""})
    order = ["setup", *STAGE_FILES[:5], "notebooks", *STAGE_FILES[5:]]  # the plan's order (dry lanes end out of it)
    return sorted(stages, key=lambda s: order.index(s["stage"]) if s["stage"] in order else len(order))


def read_notebooks(log: Path) -> list[dict]:
    rows = []
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            match = NOTEBOOK_LINE.match(line.strip())
            if match:
                rows.append({"notebook": match[1], "seconds": float(match[2]), "status": match[3]})
    return rows


def _fmt(value, digits=1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def training_rows(results: dict) -> list[dict]:
    """One row per (role, model, size, batch): images/s per variant and the loader's side."""
    merged: dict[tuple, dict] = {}
    for stage, variant in (("train_eager", "eager"), ("train_channels_last", "channels_last"),
                           ("train_compiled", "compiled")):
        for row in (results.get(stage) or {}).get("rows", []):
            key = (row["role"], row["model"], row["size"], row["batch"])
            merged.setdefault(key, {})[variant] = row["images_per_s"]
    for row in (results.get("loader") or {}).get("rows", []):
        key = (row["role"], row["model"], row["size"], row["batch"])
        merged.setdefault(key, {}).update(loader_e2=row["loader_e2_ips"], augment=row["augment_ips"],
                                          loader_model=row["model_ips"], verdict=row["verdict"])
    return [{"role": k[0], "model": k[1], "size": k[2], "batch": k[3], **v} for k, v in merged.items()]


def latency_rows(results: dict) -> list[dict]:
    rows = []
    for stage in ("infer_eager_bf16", "infer_eager_fp32", "infer_compiled_bf16", "infer_compiled_fp32"):
        data = results.get(stage) or {}
        for row in data.get("rows", []):
            if row.get("predictor") == "preprocess":
                continue
            rows.append({"predictor": row["predictor"], "precision": row.get("precision"),
                         "mode": "compiled" if row.get("compiled") else "eager", "input": row.get("input"),
                         "native_ms": row.get("native_ms"), "native_p90": row.get("native_p90"),
                         "model_ms": row.get("model_ms"), "model_native_ms": row.get("model_native_ms"),
                         "best_batch": row.get("best_batch"), "images_per_s": row.get("images_per_s"),
                         "partial": bool(data.get("partial"))})
    return rows


def targets(training: list[dict], latency: list[dict], notebooks: list[dict]) -> list[dict]:
    out = []

    def verdict(value, ok):
        return NOT_MEASURED if value is None else ("met" if ok else "missed")

    b2 = [(v, f"{r['model']} batch {r['batch']} {name}") for r in training if r["role"] == "segformer"
          for name in ("eager", "channels_last", "compiled") if (v := r.get(name)) is not None]
    best = max(b2) if b2 else (None, "")
    out.append({"target": f"SegFormer-B2 training at 512x512 >= {B2_TRAIN_MIN_IPS} img/s (best variant)",
                "measured": None if best[0] is None else f"{best[0]:.1f} img/s ({best[1]})",
                "verdict": verdict(best[0], best[0] is not None and best[0] >= B2_TRAIN_MIN_IPS)})
    loaders = [r for r in training if r.get("verdict")]
    starved = [f"{r['role']} b{r['batch']}" for r in loaders if r["verdict"] != "ok"]
    out.append({"target": "the loader never the bottleneck (loader epoch 2 img/s >= model img/s, every row)",
                "measured": None if not loaders else (f"starved: {', '.join(starved)}" if starved else
                                                      f"ok in all {len(loaders)} rows"),
                "verdict": NOT_MEASURED if not loaders else ("missed" if starved else "met")})

    def best_of(name):
        found = [(r["native_ms"], f"{r['precision']} {r['mode']}") for r in latency
                 if r["predictor"] == name and r.get("native_ms") is not None]
        return min(found) if found else (None, "")

    student, ensemble = best_of("student"), best_of("ensemble")
    for label, (value, where), limit, ref in (("student", student, STUDENT_MAX_MS, REFERENCE["student_ms"]),
                                               ("ensemble", ensemble, ENSEMBLE_MAX_MS, REFERENCE["ensemble_ms"])):
        out.append({"target": f"{label} <= {limit:g} ms, 960x540 frame, batch 1, end to end (reference report: {ref} ms)",
                    "measured": None if value is None else f"{value:.2f} ms ({where})",
                    "verdict": verdict(value, value is not None and value <= limit)})
    ratio = None if student[0] is None or ensemble[0] is None else student[0] / ensemble[0]
    out.append({"target": f"student / ensemble latency <= {RATIO_MAX} (best of each)",
                "measured": None if ratio is None else f"{ratio:.2f}",
                "verdict": verdict(ratio, ratio is not None and ratio <= RATIO_MAX)})
    done = [r for r in notebooks if r["status"] == "ok"]
    total = sum(r["seconds"] for r in done) if len(done) == 6 else None
    out.append({"target": f"six notebooks (full profile, 2 epochs) on the desert < {NOTEBOOKS_MAX_S} s",
                "measured": (f"{total:.0f} s" if total is not None else
                             (f"{len(done)} of 6 finished ({sum(r['seconds'] for r in done):.0f} s)" if notebooks else None)),
                "verdict": NOT_MEASURED if total is None else ("met" if total < NOTEBOOKS_MAX_S else "missed")})
    return out


def render(report: dict) -> str:
    env = report.get("env") or {}
    lines = [f"GPU check ({'DRY RUN: toy sizes, figures mean nothing' if report['dry_run'] else 'full sizes'}) on "
             f"{env.get('device', '?')}, torch {env.get('torch', '?')}, onnxruntime {env.get('onnxruntime', '?')}",
             "", "stages (status, seconds / budget):"]
    lines.append(_table(["stage", "status", "s", "budget", "note"],
                        [[s["stage"], s["status"], s["seconds"], s["budget_s"], s["note"]] for s in report["stages"]]))
    lines += ["", "training images/s (bf16; loader: decode cache + BatchAugment on the device, epoch 2):"]
    lines.append(_table(["role", "model", "size", "batch", "eager", "chan_last", "compiled", "loader", "augment",
                         "verdict"],
                        [[r["role"], r["model"], r["size"], r["batch"], r.get("eager"), r.get("channels_last"),
                          r.get("compiled"), r.get("loader_e2"), r.get("augment"), r.get("verdict")]
                         for r in report["training"]]))
    lines += ["", "latency, batch 1, ms (e2e: 960x540 uint8 frame -> label map; model: at its input; "
                  "@960x540: the model fed the frame), throughput at the best batch:"]
    lines.append(_table(["predictor", "precision", "mode", "input", "e2e_med", "e2e_p90", "model", "@960x540",
                         "best_b", "img/s"],
                        [[r["predictor"], r["precision"], r["mode"], r["input"], r["native_ms"], r["native_p90"],
                          r["model_ms"], r["model_native_ms"], r["best_batch"], r["images_per_s"]]
                         for r in report["latency"]]))
    onnx = (report["results"].get("onnx") or {}).get("rows", [])
    lines += ["", "ONNX student, batch 1 (onnxruntime):"]
    lines.append(_table(["provider", "input", "median_ms", "p90_ms", "note"],
                        [[r["provider"], r.get("input"), r.get("median_ms"), r.get("p90_ms"), r.get("note", "")]
                         for r in onnx]))
    lines += ["", "notebooks (papermill, wall s):"]
    lines.append(_table(["notebook", "s", "status"], [[r["notebook"], r["seconds"], r["status"]]
                                                      for r in report["notebooks"]]))
    lines += ["", "targets:"]
    lines.append(_table(["target", "measured", "verdict"],
                        [[t["target"], t["measured"] or "-", t["verdict"]] for t in report["targets"]]))
    return "\n".join(lines)


STAGE_FILES = ("train_eager", "train_channels_last", "loader", "infer_eager_bf16", "infer_eager_fp32", "onnx",
               "train_compiled", "infer_compiled_bf16", "infer_compiled_fp32")


def build_report(outdir: Path, work: Path, dry_run: bool) -> dict:
    from offroadseg.files import atomic_open, write_json

    json_dir = work / "json"
    results = {name: data for name in STAGE_FILES if (data := _read(json_dir / f"{name}.json")) is not None}
    training, latency = training_rows(results), latency_rows(results)
    notebooks = read_notebooks(json_dir / "notebooks.log")
    report = {"dry_run": dry_run, "env": _read(json_dir / "env.json"), "stages": read_stages(work),
              "training": training, "latency": latency, "notebooks": notebooks,
              "targets": targets(training, latency, notebooks), "results": results}
    write_json(outdir / "gpu_check.json", report)
    with atomic_open(outdir / "table.txt", "w") as handle:
        handle.write(render(report) + "\n")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("kernelspec").add_argument("folder", type=Path)
    sub.add_parser("reap").add_argument("work", type=Path)
    for action in ("run", "report"):
        command = sub.add_parser(action)
        command.add_argument("outdir", type=Path)
        command.add_argument("work", type=Path)
        command.add_argument("--dry-run", action="store_true")
        if action == "run":
            command.add_argument("--total-s", type=int, default=None, help="deadline of the whole (default 530, dry 170)")
    args = parser.parse_args(argv)
    if args.action == "kernelspec":
        write_kernelspec(args.folder)
    elif args.action == "reap":
        reap(args.work)
    elif args.action == "run":
        total = args.total_s or DEFAULT_TOTAL_S[args.dry_run]
        return run(args.outdir.resolve(), args.work.resolve(), args.dry_run, total)
    else:
        print(render(build_report(args.outdir, args.work, args.dry_run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
