"""The stages of bench/gpu_check.sh in two phases, their time guard, and the one table.

    python bench/gpu_check.py kernelspec WORK/jupyter                      # a "python3" kernel: this python, this PYTHONPATH
    python bench/gpu_check.py run OUTDIR WORK --phase 1|2 [--dry-run]      # the phase's stages under the guard, then the tables
    python bench/gpu_check.py report OUTDIR WORK --phase 1|2 [--dry-run]   # OUTDIR/gpu_check.json + table.txt, printed
    python bench/gpu_check.py reap WORK                                    # kill the notebook kernels a cut stage left

Two phases, each one device call of at most 6 minutes (a GPU window is about 15 minutes in all,
each machine start a minute or more of it), each runnable alone:
  phase 1  setup; train (fit's step on each full-profile model: SegFormer-B2, DeepLabV3+ R101, the
           SegFormer-B1 student, 512x512, batch 16); precision (one fp16 step with its grad scaler,
           one bf16 step, on the student); infer (predict latency and throughput of the student and
           the ensemble, bf16, with the end-to-end predict rows: checkpoint, ONNX, INT8); infer_fp32;
           onnx (the student's ONNX export per onnxruntime provider).
  phase 2  setup (and the demo desert); notebooks (the six, demo profile, under papermill);
           loader (the training loader against each full-profile model: is the GPU starved?);
           ddp (two processes of fit under torchrun, where there are two GPUs).
The measurements are the bench scripts' (train_speed, inference, onnx_latency, loader_vs_model,
ddp_probe) and the notebook runner's, each called with its own command line (`main(argv)`).
Each script appends every row to OUTDIR/rows.jsonl as soon as it has measured it (`--jsonl`,
labelled with the stage), so a stage cut by the guard or a call cut by the device's limit still
brings back what it measured; `report` reads those rows, the stage record WORK/stages.tsv and the
environment, and writes OUTDIR/gpu_check.json and OUTDIR/table.txt after every stage.

How `run` guards the time: this process imports torch, transformers and the library once (paid
once instead of per stage), never touches CUDA, and forks one child per stage. The child gets a
process group of its own (its DataLoader workers and compile workers are in it) and initialises
CUDA itself. A child past its budget gets SIGTERM, then SIGKILL 10 s later, for its whole group;
notebook kernels, which run in sessions of their own, are found by the mark their kernelspec puts
in their environment and killed too. A stage that would get less than MIN_STAGE_S before the
deadline is not started ("late"). A stage whose needs are missing is "skipped" with the reason
(the notebooks without papermill, ddp on one GPU): that is no failure.

Exit status: 0 when every stage is ok or skipped for a stated reason; 1 when any failed, was cut
or came too late. The last thing printed is the summary table: stage, status, seconds, key figure.

Dry run (`--dry-run`, on a CPU): every stage end to end at toy sizes in fp32 (bf16 is emulated on
a CPU, seconds a step) with the same code paths as on the GPU: the ONNX rows ask for CUDA (so the
CPU fallback of an onnxruntime without it runs), the fp16 step gets a CPU grad scaler (so the
scaler's path runs), ddp runs two gloo processes. Both phases together stay under 3 minutes on
2 busy cores.
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
from common import read_jsonl  # noqa: E402

# The targets (bench/RESULTS.md, "GPU check").
B2_TRAIN_MIN_IPS = 400
STUDENT_MAX_MS = 4.0
ENSEMBLE_MAX_MS = 10.0
RATIO_MAX = 0.35
REFERENCE = {"student_ms": 40, "ensemble_ms": 85}
NOTEBOOKS = ("01_data_scan", "02_train_segformer", "03_train_deeplab", "04_ensemble", "05_distill", "06_evaluate")
NOTEBOOK_LINE = re.compile(r"^(\d\d_\w+)\s+([\d.]+) s\s+(ok|FAILED)")
NOT_MEASURED = "not measured"
KERNEL_MARK = "GPU_CHECK_KERNEL_OF"
ROWS = "rows.jsonl"
RESERVE_S = 5  # kept for the final report
MIN_STAGE_S = 10  # a stage that would get less is not started
KILL_AFTER_S = 10  # SIGTERM, then SIGKILL this much later
# Each phase's deadline, by (phase, dry run): on the GPU 300 s, inside a 360 s device call with room
# for the shell's set-up and the transfers; dry, both phases together under 3 minutes on 2 busy cores.
DEFAULT_TOTAL_S = {(1, False): 300, (2, False): 300, (1, True): 50, (2, True): 120}
# What each phase's report compares (the stages' names, in their order).
PHASES = {1: ("setup", "train", "precision", "infer", "infer_fp32", "onnx"),
          2: ("setup", "notebooks", "loader", "ddp")}
FAILED = ("failed", "cut", "late")  # statuses that make the check exit 1
# Set by gpu_check.sh when the notebooks cannot run here (papermill & co. neither importable nor in .whl/).
NO_NOTEBOOKS_ENV = "GPU_CHECK_NO_NOTEBOOKS"


# ----------------------------------------------------------------------------- set-up steps


def write_env(path: Path) -> dict:
    import platform
    import shutil
    import subprocess

    import torch

    from offroadseg.files import write_json
    from offroadseg.runs import package_versions

    info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "versions": package_versions(),
            "pythonpath": os.environ.get("PYTHONPATH", ""), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), capability=list(torch.cuda.get_device_capability(0)),
                    gpu_memory_GiB=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    else:
        info.update(device=f"cpu ({os.cpu_count()} cores)", gpus=0)
    try:
        import onnxruntime as ort

        info.update(onnxruntime=ort.__version__, onnxruntime_providers=ort.get_available_providers())
    except ImportError as error:
        info["onnxruntime"] = f"not importable: {error}"
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
    """The demo desert (310 images at 960x540) or, dry, 12 at 128x72."""
    from offroadseg.synth import make_demo_desert

    if dry_run:
        result = make_demo_desert(root, counts={"train": 8, "val": 2, "test": 2}, size=(128, 72), workers=1,
                                  progress=False)
    else:
        result = make_demo_desert(root, progress=False)
    print(f"desert: {root} {result['counts']} in {result['seconds']:.1f} s")
    return result


def setup(work: str, dry_run: str, phase: str) -> None:
    """The child's part of the set-up: versions and device (WORK/json/env.json); for phase 2 also a
    project copy whose outputs/ lives in WORK (the runner's OFFROADSEG_ROOT) and the desert."""
    import shutil

    work = Path(work)
    write_env(work / "json" / "env.json")
    if phase != "2":
        return
    project = work / "project"
    project.mkdir(parents=True, exist_ok=True)
    root = HERE.parent
    shutil.copy(root / "pyproject.toml", project / "pyproject.toml")
    shutil.copytree(root / "notebooks", project / "notebooks", dirs_exist_ok=True)
    if not (project / "lib").exists():
        (project / "lib").symlink_to(root / "lib")
    make_desert(work / "desert", bool(dry_run))


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
    lane: int = 0  # dry runs only: stages of other lanes run side by side (the GPU runs one at a time)
    skip: str | None = None  # why the stage cannot run here: recorded as "skipped", no failure


def gpu_count() -> int:
    """GPUs, without initialising CUDA (NVML answers; the forked stages need CUDA untouched here)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan(outdir: Path, work: Path, phase: int, dry_run: bool, total_s: int | None = None) -> list[Stage]:
    """The phase's stages in order, most telling first. A deadline longer than the default
    (`total_s`) stretches every budget in proportion."""
    rows = ["--jsonl", str(outdir / ROWS)]

    def out(name):
        return [*rows, "--label", name, "--out", str(work / "json" / f"{name}.json")]

    stages = [Stage("setup", 60, "call", "setup", [str(work), "1" if dry_run else "", str(phase)])]
    if dry_run:
        # toy sizes, fp32; the same stages and code paths as on the GPU (see the module's docstring)
        tiny = ["--size", "32x48", "--batches", "2"]
        train = ["--profile", "demo", "--models", "segformer", "student", *tiny, "--steps", "1", "--warmup", "1",
                 "--precision", "fp32"]
        precision = ["--profile", "demo", "--models", "student", *tiny, "--steps", "1", "--warmup", "0",
                     "--precision", "fp16,bf16", "--scaler-stand-in"]
        infer = ["--profile", "demo", "--models", "student", "ensemble", "--channels-last", "--size", "32x48",
                 "--native", "54x96", "--runs", "2", "--warmup", "1", "--batches", "1,2", "--onnx-device", "cuda"]
        infer_bf16 = [*infer, "--precision", "fp32", "--predict-images", "2"]
        infer_fp32 = [*infer, "--precision", "fp32", "--predict-images", "0"]
        onnx = ["--profile", "demo", "--quick"]
        notebooks = ["--profile", "demo", "--set", "epochs=1", "--set", "pretrained=false", "--set", "image_size=[64, 96]",
                     "--set", "latency_input=[72, 128]", "--set", "throughput_batches=[1]", "--set", "speed_runs=1",
                     "--set", "grid_points=2", "--set", 'tta_candidates=[["h"]]', "--set", "batch_size=2",
                     # the export cell runs in every CPU demo run already
                     "--set", "export=false"]
        loader = ["--profile", "demo", "--models", "segformer", "student", *tiny, "--workers", "1", "--steps", "1",
                  "--precision", "fp32", "--augment", "device"]
        ddp = ["--profile", "demo", "--size", "32x48", "--batch", "2", "--processes", "2", "--cpu"]
        cap = {"train": 30, "precision": 25, "infer": 30, "infer_fp32": 30, "onnx": 20, "notebooks": 110, "loader": 40,
               "ddp": 50}
    else:
        full = ["--profile", "full", "--size", "512x512", "--batches", "16"]
        train = [*full, "--models", "segformer", "deeplab", "student", "--steps", "10", "--warmup", "3"]
        precision = [*full, "--models", "student", "--steps", "2", "--warmup", "1", "--precision", "fp16,bf16"]
        infer = ["--profile", "full", "--models", "student", "ensemble", "--channels-last"]
        infer_bf16 = [*infer, "--precision", "auto"]
        infer_fp32 = [*infer, "--precision", "fp32", "--predict-images", "0", "--runs", "30"]
        onnx = ["--profile", "full", "--runs", "20"]
        notebooks = ["--profile", "demo"]  # the demo as a fresh clone runs it, here on the GPU
        loader = [*full, "--models", "segformer", "deeplab", "student", "--workers", "8", "--steps", "5"]
        ddp = ["--profile", "demo", "--processes", "2"]
        # Caps sum to at most the deadline less the set-up; what they are expected to take (H200): train
        # ~50 s, precision ~15, infer ~70 (the ONNX and INT8 predict rows run on its CPU), infer_fp32 ~25,
        # onnx ~30; notebooks ~100-150 (not measured yet), loader ~60, ddp ~40.
        cap = {"train": 80, "precision": 35, "infer": 75, "infer_fp32": 45, "onnx": 40, "notebooks": 150,
               "loader": 65, "ddp": 55}
    scale = max(1.0, (total_s or DEFAULT_TOTAL_S[phase, dry_run]) / DEFAULT_TOTAL_S[phase, dry_run])
    cap = {k: int(v * scale) for k, v in cap.items()}
    if phase == 1:
        stages += [
            Stage("train", cap["train"], "script", "train_speed", [*train, *out("train")]),
            Stage("precision", cap["precision"], "script", "train_speed", [*precision, *out("precision")], lane=1),
            Stage("infer", cap["infer"], "script", "inference", [*infer_bf16, *out("infer")], lane=1),
            Stage("infer_fp32", cap["infer_fp32"], "script", "inference", [*infer_fp32, *out("infer_fp32")]),
            Stage("onnx", cap["onnx"], "script", "onnx_latency", [*onnx, *out("onnx")], lane=1),
        ]
    elif phase == 2:
        desert = str(work / "desert")
        stages += [
            # The runner prints one line per notebook (name, wall seconds, ok); outputs/ is WORK/project/outputs.
            Stage("notebooks", cap["notebooks"], "runner", str(outdir / ROWS),
                  ["--data", desert, "--run", "gpucheck", *notebooks], skip=os.environ.get(NO_NOTEBOOKS_ENV) or None),
            Stage("loader", cap["loader"], "script", "loader_vs_model",
                  [*loader, "--data", desert, "--cache-root", str(work / "cache"), *out("loader")], lane=1),
            Stage("ddp", cap["ddp"], "script", "ddp_probe", [*ddp, "--data", desert, "--work", str(work / "ddp"),
                                                             *out("ddp")], lane=1,
                  skip=None if dry_run or gpu_count() >= 2 else
                  f"{gpu_count()} GPU here: DDP needs two (Kaggle's two T4s; an -x2 machine)"),
        ]
    else:
        raise ValueError(f"phase must be 1 or 2, not {phase!r}")
    return stages


class _Tee:
    """stdout of the notebook stage, also read line by line: each notebook's line (name, seconds,
    ok) is appended to the rows file as the runner prints it."""

    def __init__(self, stream, rows: Path):
        self.stream, self.rows, self.pending = stream, rows, ""

    def write(self, text):
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            match = NOTEBOOK_LINE.match(line.strip())
            if match:
                row = {"notebook": match[1], "seconds": float(match[2]), "status": match[3]}
                with open(self.rows, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"label": "notebooks", "benchmark": "runner", "row": row}) + "\n")
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
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


def _record(stage: Stage, status: str, note: str, seconds: int = 0, budget: int | None = None) -> dict:
    return {"stage": stage.name, "status": status, "seconds": seconds,
            "budget_s": stage.cap_s if budget is None else budget, "note": note}


def start_stage(stage: Stage, work: Path, deadline: float, nice: int = 0) -> Running | dict:
    """Fork the stage's child, or the record of a stage skipped (its reason) or too late to start."""
    if stage.skip:
        print(f"=== {stage.name}: skipped, {stage.skip}", flush=True)
        return _record(stage, "skipped", stage.skip)
    left = int(deadline - time.monotonic() - RESERVE_S)
    if left < MIN_STAGE_S:
        print(f"=== {stage.name}: not started, {left} s left before the deadline", flush=True)
        return _record(stage, "late", f"not started: {left} s left before the deadline")
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
        status, note = "cut", f"over its {job.budget} s budget: the rows it measured before are kept"
    elif code == 0:
        status, note = "ok", ""
    else:
        status, note = "failed", f"exit status {code} (see gpu_check.log)"
    _kill_group(job.pid, signal.SIGKILL)  # stragglers of its group (workers it left behind)
    if job.stage.kind == "runner":
        reap(work)
    seconds = int(round(time.monotonic() - job.started))
    print(f"=== {job.stage.name}: {status} in {seconds} s", flush=True)
    return _record(job.stage, status, note, seconds, job.budget)


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


def run(outdir: Path, work: Path, phase: int, dry_run: bool, total_s: int) -> int:
    """Set-up, then the phase's stages: on the GPU one after another (the timings need a quiet
    device); dry, on a CPU, the two lanes side by side (the notebooks' kernels, each importing torch,
    are the long pole). The exit status: 1 when any stage failed, was cut or came too late."""
    deadline = time.monotonic() + total_s
    (work / "json").mkdir(parents=True, exist_ok=True)
    (work / "stages.tsv").write_text("", encoding="utf-8")
    # Imported once here, shared by every forked stage (this process never initialises CUDA).
    import torch  # noqa: F401

    from offroadseg import augment, engine, ensemble, evaluate, export, models, synth  # noqa: F401
    from offroadseg.chapters import assembly, teachers  # noqa: F401

    for name in ("train_speed", "loader_vs_model", "inference", "onnx_latency", "ddp_probe"):
        SCRIPTS[name] = _load_script(name)
    stages = plan(outdir, work, phase, dry_run, total_s)
    if torch.cuda.is_initialized():  # a forked child could not use CUDA then
        raise SystemExit("gpu_check: CUDA was initialised while importing; the forked stages could not use it")
    results = []

    def record(result: dict) -> None:
        results.append(result)
        with open(work / "stages.tsv", "a", encoding="utf-8") as handle:
            handle.write("\t".join(str(result[k]) for k in ("stage", "status", "seconds", "budget_s", "note")) + "\n")
        build_report(outdir, work, phase, dry_run)

    setup_stage, *stages = stages
    run_lanes([[setup_stage]], work, deadline, record)
    if results[-1]["status"] != "ok":
        for stage in stages:
            record(_record(stage, "late", "set-up failed"))
    elif dry_run:
        run_lanes([[s for s in stages if s.lane == 0], [s for s in stages if s.lane == 1]], work, deadline, record,
                  nice=(0, 5))
    else:
        run_lanes([stages], work, deadline, record)
    print(f"\n=== gpu_check phase {phase}: {total_s - (deadline - time.monotonic()):.0f} s in all (deadline {total_s} s);"
          f" files in {outdir}", flush=True)
    report = build_report(outdir, work, phase, dry_run)
    print(render(report))
    return exit_status(report["stages"])


def exit_status(stages: list[dict]) -> int:
    """1 when any stage failed, was cut or came too late; 0 when each is ok or skipped for a stated reason."""
    return 1 if any(s["status"] in FAILED for s in stages) else 0


# ----------------------------------------------------------------------------- report


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_stages(work: Path, phase: int) -> list[dict]:
    stages = []
    path = work / "stages.tsv"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            name, status, seconds, budget, *rest = line.split("\t")
            stages.append({"stage": name, "status": status, "seconds": int(seconds), "budget_s": int(budget),
                           "note": rest[0] if rest else ""})
    order = PHASES[phase]  # the plan's order (dry lanes end out of it)
    return sorted(stages, key=lambda s: order.index(s["stage"]) if s["stage"] in order else len(order))


def read_rows(outdir: Path) -> dict[str, list[dict]]:
    """The rows of rows.jsonl by label (the stage that measured them)."""
    rows: dict[str, list[dict]] = {}
    for entry in read_jsonl(outdir / ROWS):
        rows.setdefault(entry.get("label", "?"), []).append(entry["row"])
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


def latency_rows(rows: dict) -> list[dict]:
    """Latency rows of the infer stages (the preprocess row left out)."""
    out = []
    for stage in ("infer", "infer_fp32"):
        for row in rows.get(stage, []):
            if row.get("kind") == "latency" and row.get("predictor") != "preprocess":
                out.append({**row, "stage": stage})
    return out


def targets(rows: dict, phase: int) -> list[dict]:
    """The issue's targets that this phase's rows measure, each met, missed or not measured."""
    out = []

    def verdict(value, ok):
        return NOT_MEASURED if value is None else ("met" if ok else "missed")

    if phase == 1:
        b2 = [(r["images_per_s"], f"{r['model']} batch {r['batch']} {r['precision']}") for r in rows.get("train", [])
              if r.get("role") == "segformer"]
        best = max(b2) if b2 else (None, "")
        out.append({"target": f"SegFormer-B2 training at 512x512 >= {B2_TRAIN_MIN_IPS} img/s (fit's step)",
                    "measured": None if best[0] is None else f"{best[0]:.1f} img/s ({best[1]})",
                    "verdict": verdict(best[0], best[0] is not None and best[0] >= B2_TRAIN_MIN_IPS)})
        latency = latency_rows(rows)

        def best_of(name):
            found = [(r["native_ms"], f"{r['precision']}") for r in latency
                     if r["predictor"] == name and r.get("native_ms") is not None]
            return min(found) if found else (None, "")

        student, ensemble = best_of("student"), best_of("ensemble")
        for label, (value, where), limit, ref in (("student", student, STUDENT_MAX_MS, REFERENCE["student_ms"]),
                                                   ("ensemble", ensemble, ENSEMBLE_MAX_MS, REFERENCE["ensemble_ms"])):
            out.append({"target": f"{label} <= {limit:g} ms, 960x540 frame, batch 1, end to end "
                                  f"(reference report: {ref} ms)",
                        "measured": None if value is None else f"{value:.2f} ms ({where})",
                        "verdict": verdict(value, value is not None and value <= limit)})
        ratio = None if student[0] is None or ensemble[0] is None else student[0] / ensemble[0]
        out.append({"target": f"student / ensemble latency <= {RATIO_MAX} (best of each)",
                    "measured": None if ratio is None else f"{ratio:.2f}",
                    "verdict": verdict(ratio, ratio is not None and ratio <= RATIO_MAX)})
        steps = {r["precision"]: r for r in rows.get("precision", [])}
        for name in ("fp16", "bf16"):
            row = steps.get(name)
            measured = None if row is None else (
                f"{row['applied']} of {row['applied'] + row['skipped']} steps applied"
                + (f", grad scale {row['grad_scale']:g}" if row.get("grad_scale") is not None else ""))
            out.append({"target": f"one {name} training step runs and applies (fit's step)", "measured": measured,
                        "verdict": verdict(row, row is not None and row["applied"] > 0)})
    else:
        loaders = rows.get("loader", [])
        starved = [f"{r['role']} b{r['batch']}" for r in loaders if r["verdict"] != "ok"]
        out.append({"target": "the loader never the bottleneck (loader epoch 2 img/s >= model img/s, every row)",
                    "measured": None if not loaders else (f"starved: {', '.join(starved)}" if starved else
                                                          f"ok in all {len(loaders)} rows"),
                    "verdict": NOT_MEASURED if not loaders else ("missed" if starved else "met")})
        notebooks = rows.get("notebooks", [])
        done = [r for r in notebooks if r["status"] == "ok"]
        out.append({"target": "the six notebooks (demo profile) run and pass their demo checks",
                    "measured": None if not notebooks else
                    f"{len(done)} of 6 ok in {sum(r['seconds'] for r in notebooks):.0f} s",
                    "verdict": NOT_MEASURED if not notebooks else ("met" if len(done) == len(NOTEBOOKS) else "missed")})
        ddp = rows.get("ddp", [])
        out.append({"target": "DDP: every process ends with the same weights",
                    "measured": None if not ddp else f"{ddp[-1]['processes']} processes, "
                                                     f"{ddp[-1]['images_per_s']:.1f} img/s",
                    "verdict": NOT_MEASURED if not ddp else ("met" if ddp[-1]["identical_weights"] else "missed")})
    return out


def key_figure(stage: str, rows: dict) -> str:
    """One line of what a stage measured, for the summary table."""
    got = rows.get(stage, [])
    if stage == "setup":
        return ""
    if not got:
        return "-"
    if stage in ("train", "precision"):
        return "; ".join(f"{r['model'].split()[0]} b{r['batch']} {r['precision']} {r['images_per_s']:.0f} img/s"
                         + (f" ({r['skipped']} skipped)" if r.get("skipped") else "") for r in got)
    if stage in ("infer", "infer_fp32"):
        latency = [f"{r['predictor']} {r['native_ms']:.2f} ms" for r in got
                   if r.get("kind") == "latency" and r.get("predictor") != "preprocess"]
        predict = [f"{r['backend']} {r['ms_per_image']:.1f} ms/img" for r in got if r.get("kind") == "predict"]
        return "; ".join(latency + predict)
    if stage == "onnx":
        return "; ".join(f"{r['provider'].replace('ExecutionProvider', '')} {r['input']} {_fmt(r.get('median_ms'))} ms"
                         if r.get("median_ms") is not None else f"{r['provider'].replace('ExecutionProvider', '')}: "
                         f"not in this build" for r in got)
    if stage == "notebooks":
        return f"{sum(r['status'] == 'ok' for r in got)} of 6 ok, {sum(r['seconds'] for r in got):.0f} s"
    if stage == "loader":
        return "; ".join(f"{r['role']} b{r['batch']} {r['verdict']} ({r['loader_e2_ips']:.0f} vs {r['model_ips']:.0f} img/s)"
                         for r in got)
    if stage == "ddp":
        r = got[-1]
        return (f"{r['processes']} processes, {r['images_per_s']:.1f} img/s, "
                f"weights {'identical' if r['identical_weights'] else 'DIFFER'}")
    return f"{len(got)} rows"


def render(report: dict) -> str:
    env = report.get("env") or {}
    rows = report["rows"]
    lines = [f"GPU check phase {report['phase']} ({'DRY RUN: toy sizes, figures mean nothing' if report['dry_run'] else 'full sizes'})"
             f" on {env.get('device', '?')}, torch {env.get('torch', '?')}, onnxruntime {env.get('onnxruntime', '?')} "
             f"{env.get('onnxruntime_providers', '')}", ""]
    if report["phase"] == 1:
        train = rows.get("train", []) + rows.get("precision", [])
        lines += ["training (fit's step on fit's set-up, random input):"]
        lines.append(_table(["stage", "role", "model", "size", "batch", "precision", "chan_last", "img/s", "ms/step",
                             "applied", "skipped", "scale"],
                            [[s, r["role"], r["model"].split()[0], r["size"], r["batch"], r["precision"],
                              r["channels_last"], r["images_per_s"], r["ms_per_step"], r["applied"], r["skipped"],
                              r.get("grad_scale")]
                             for s in ("train", "precision") for r in rows.get(s, [])] if train else []))
        lines += ["", "latency, batch 1, ms (e2e: 960x540 uint8 frame -> label map; model: at its input), "
                      "throughput at the best batch:"]
        lines.append(_table(["stage", "predictor", "precision", "input", "e2e_med", "e2e_p90", "model", "best_b", "img/s"],
                            [[r["stage"], r["predictor"], r["precision"], r["input"], r.get("native_ms"),
                              r.get("native_p90"), r.get("model_ms"), r.get("best_batch"), r.get("images_per_s")]
                             for r in latency_rows(rows)]))
        lines += ["", "predict end to end (decode, model, upsample + argmax, PNG encode), ms per image:"]
        lines.append(_table(["backend", "providers", "images", "ms/img", "model_%", "encode_%"],
                            [[r["backend"], ",".join(p.replace("ExecutionProvider", "") for p in r.get("providers", [])),
                              r["images"], r["ms_per_image"], r.get("model_%"), r.get("encode_%")]
                             for r in rows.get("infer", []) if r.get("kind") == "predict"]))
        lines += ["", "ONNX student, batch 1 (onnxruntime):"]
        lines.append(_table(["provider", "input", "median_ms", "p90_ms", "note"],
                            [[r["provider"], r.get("input"), r.get("median_ms"), r.get("p90_ms"), r.get("note", "")]
                             for r in rows.get("onnx", [])]))
    else:
        lines += ["notebooks (papermill, wall s):"]
        lines.append(_table(["notebook", "s", "status"], [[r["notebook"], r["seconds"], r["status"]]
                                                          for r in rows.get("notebooks", [])]))
        lines += ["", "loader against the model (images/s; the loader's epoch 2 with its persistent workers):"]
        lines.append(_table(["role", "model", "batch", "workers", "loader_e2", "augment", "model", "verdict"],
                            [[r["role"], r["model"].split()[0], r["batch"], r["workers"], r["loader_e2_ips"],
                              r.get("augment_ips"), r["model_ips"], r["verdict"]] for r in rows.get("loader", [])]))
    lines += ["", "targets:"]
    lines.append(_table(["target", "measured", "verdict"],
                        [[t["target"], t["measured"] or "-", t["verdict"]] for t in report["targets"]]))
    failed = [s["stage"] for s in report["stages"] if s["status"] in FAILED]
    lines += ["", f"summary, phase {report['phase']}" + (f": NOT OK ({', '.join(failed)})" if failed else ": ok")
              + " (stage, status, seconds / budget, key figure):"]
    lines.append(_table(["stage", "status", "s", "budget", "key figure / note"],
                        [[s["stage"], s["status"], s["seconds"], s["budget_s"],
                          key_figure(s["stage"], rows) if s["status"] in ("ok", "cut") else s["note"]]
                         for s in report["stages"]]))
    return "\n".join(lines)


def build_report(outdir: Path, work: Path, phase: int, dry_run: bool) -> dict:
    from offroadseg.files import atomic_open, write_json

    rows = read_rows(outdir)
    report = {"phase": phase, "dry_run": dry_run, "env": _read(work / "json" / "env.json"),
              "stages": read_stages(work, phase), "targets": targets(rows, phase), "rows": rows,
              "results": {name: data for name in PHASES[phase] if (data := _read(work / "json" / f"{name}.json"))}}
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
        command.add_argument("--phase", type=int, choices=(1, 2), required=True)
        command.add_argument("--dry-run", action="store_true")
        if action == "run":
            command.add_argument("--total-s", type=int, default=None,
                                 help="the phase's deadline (default 300; dry: phase 1 50, phase 2 120)")
            command.add_argument("--spent-s", type=int, default=0, help="seconds of it the caller already spent")
    args = parser.parse_args(argv)
    if args.action == "kernelspec":
        write_kernelspec(args.folder)
    elif args.action == "reap":
        reap(args.work)
    elif args.action == "run":
        total = (args.total_s or DEFAULT_TOTAL_S[args.phase, args.dry_run]) - args.spent_s
        return run(args.outdir.resolve(), args.work.resolve(), args.phase, args.dry_run, total)
    else:
        print(render(build_report(args.outdir, args.work, args.phase, args.dry_run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
