"""Run folders, the run manifest (run.json) and the run files notebooks hand on (ensemble.json).

A run is `outputs/<run>/`; each notebook records in run.json the profile, its
parameters, the data root and fingerprint, the code revision, package versions,
seeds and its start/finish times, so any artifact can be traced to what made it.
`PRODUCERS` says which notebook writes which file, so a missing input names the
notebook to run first (`Run.require`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from filelock import FileLock, Timeout

from .files import read_json, write_bytes, write_json

PACKAGES = ("torch", "torchvision", "transformers", "accelerate", "numpy", "pillow", "matplotlib")
# The student adapted to a new desert (notebook 05's `adapt`): models/<this>/, beside models/student/.
ADAPTED_STUDENT = "student_adapted"
# Held by the command working on a run folder (`RunLock`), and who that command is.
LOCK_FILE = "lock"
LOCK_HOLDER_FILE = "lock.holder"
# Seconds a second command waits for a run folder's lock before it refuses (filelock polls every 0.05 s).
RUN_LOCK_WAIT = 0.5


class RunMismatch(ValueError):
    """A command or notebook asked to work on a run folder that belongs to other settings or data,
    or that another command is working on."""


def project_root() -> Path:
    """The repository root: $OFFROADSEG_ROOT, else the nearest folder above the cwd with
    pyproject.toml and lib/offroadseg (notebooks run from notebooks/), else the package's checkout."""
    env = os.environ.get("OFFROADSEG_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "lib" / "offroadseg").is_dir():
            return folder
    return Path(__file__).resolve().parents[2]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def code_revision(root: Path | None = None) -> dict:
    """Git commit and whether the tree had local changes (None outside a git checkout)."""
    root = root or project_root()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass
class Run:
    """Paths of one run folder."""

    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def manifest(self) -> Path:
        return self.dir / "run.json"

    @property
    def scan(self) -> Path:
        return self.dir / "scan.json"

    @property
    def figures(self) -> Path:
        return self.dir / "figures"

    @property
    def ensemble(self) -> Path:
        return self.dir / "ensemble.json"

    @property
    def profile(self) -> Path:
        """profile.json: where each notebook's time went, cell by cell (the runner writes it)."""
        return self.dir / "profile.json"

    @property
    def metrics(self) -> Path:
        """metrics.json: notebook 06's comparison of every model."""
        return self.dir / "metrics.json"

    @property
    def exports(self) -> Path:
        """exports/: the student as ONNX (fp32 and INT8), notebook 06."""
        return self.dir / "exports"

    @property
    def test_predictions(self) -> Path:
        """predictions/test/: notebook 06's predictions of the test split (raw IDs and colour)."""
        return self.dir / "predictions" / "test"

    @property
    def adaptation_record(self) -> Path:
        """models/student_adapted/adaptation.json: which images the adapted student learnt from and chose on."""
        return self.model_dir(ADAPTED_STUDENT) / "adaptation.json"

    def model_dir(self, name: str) -> Path:
        """models/<name>/: a model's checkpoints and history (segformer, deeplab, student, student_adapted)."""
        return self.dir / "models" / name

    def checkpoint(self, model: str, which: str = "best") -> Path:
        """models/<model>/<which>.pt: "best" (the epoch of the best val mIoU) or "last" (where a resume starts)."""
        return self.model_dir(model) / f"{which}.pt"

    def history(self, model: str) -> Path:
        """models/<model>/history.json: one row per epoch, the best epoch marked (`checkpoints.best_row`)."""
        return self.model_dir(model) / "history.json"

    def figure(self, name: str) -> Path:
        return self.figures / name

    def read_manifest(self) -> dict:
        return read_json(self.manifest) if self.manifest.exists() else {}

    def require(self, path: str | os.PathLike) -> Path:
        """`path` (relative to the run folder, or one of the paths below) when it exists; else a clear
        error naming the notebook that writes it (`PRODUCERS`)."""
        path = self.dir / path
        if not path.exists():
            relative = path.relative_to(self.dir).as_posix() if path.is_relative_to(self.dir) else str(path)
            raise FileNotFoundError(f"{path} not found: {self.run_first(relative)}")
        return path

    def run_first(self, relative: str) -> str:
        """What to do when `relative` is missing or unusable: run the notebook that writes it."""
        producer = next((nb for key, nb in PRODUCERS.items() if relative.startswith(key)), "the earlier notebooks")
        return f"run notebook {producer} for run '{self.name}' first (./run_all.sh --run {self.name} --only {producer[:2]})"


# Which notebook writes which artifact: a missing input names the notebook to run first.
PRODUCERS = {
    "scan.json": "01_data_scan",
    "models/segformer": "02_train_segformer",
    "models/deeplab": "03_train_deeplab",
    "ensemble.json": "04_ensemble",
    "models/student": "05_distill",
    "metrics.json": "06_evaluate",
}


def snapshot(run: Run) -> Path | None:
    """Keep the run folder as it is now under earlier/<UTC time>/ before a new run over it.

    Checkpoints (*.pt, the bulk of a run) are hard links: instant and no extra space, and safe
    because the engine replaces a checkpoint atomically (a new inode) and never edits one in
    place. Everything else is copied, since some writers (papermill's executed notebooks, ONNX
    exports) rewrite their file in place. (Copies too where the file system has no hard links.)
    None when the folder holds no run yet.
    """
    if not run.manifest.exists():
        return None
    target = run.dir / "earlier" / now().replace(":", "").replace("+0000", "Z")
    suffix = 1
    while target.exists():  # two runs within one second
        suffix += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")

    def link(source, destination):
        if Path(source).suffix == ".pt":
            try:
                return os.link(source, destination)
            except OSError:
                pass
        shutil.copy2(source, destination)

    def skip(folder, names):  # earlier snapshots and unfinished temporary files stay out
        top = Path(folder) == run.dir
        # The decode cache is rebuilt from the data whenever needed: no need to keep it.
        # The lock belongs to the runner holding it now, not to the run as it was.
        return [n for n in names if (top and n in ("earlier", "cache", LOCK_FILE, LOCK_HOLDER_FILE)) or (n.startswith(".") and n.endswith(".tmp"))]

    shutil.copytree(run.dir, target, copy_function=link, ignore=skip)
    return target



class RunLock:
    """A lock on outputs/<run>/lock while a command works on the run folder (a context manager):
    ./run_all.sh's runner and `python -m offroadseg.train` take it, so two never work on one folder.

    `filelock.FileLock`: flock on Unix, a msvcrt lock on Windows, both owned by the process, so one
    killed with SIGKILL releases its lock at once and a lock file left behind never blocks the next
    run (where neither exists, filelock's soft lock records the PID and reclaims a dead holder's
    file: filelock 3.22 removes it on one attempt and takes the lock on the next, hence the short
    wait, `RUN_LOCK_WAIT`, before a refusal). Who holds it (`holder`: the command) is written to
    `lock.holder` beside it, for the refusal: not into the lock file itself, which Windows keeps
    unreadable while it is locked and the soft lock fills itself.
    """

    def __init__(self, folder: Path, holder: str = "./run_all.sh"):
        self.path = Path(folder) / LOCK_FILE
        self.holder_path = Path(folder) / LOCK_HOLDER_FILE
        self.holder = holder
        self.lock = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path, timeout=RUN_LOCK_WAIT)
        try:
            lock.acquire()
        except Timeout:
            try:
                holder = self.holder_path.read_text(encoding="utf-8").strip()
            except OSError:
                holder = ""
            raise RunMismatch(f"run folder {self.path.parent} is in use by {holder or 'another process'}; wait for "
                              f"it to finish, stop it, or use another run name (--run NAME)") from None
        try:
            write_bytes(self.holder_path, f"{self.holder} (pid {os.getpid()} on {socket.gethostname()}, "
                                          f"started {now()})\n".encode())
        except BaseException:
            lock.release()
            raise
        self.lock = lock
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self.holder_path.unlink()
        self.lock.release()
        return False

def run_dir(run: str, root: Path | None = None) -> Run:
    if not run or any(sep in run for sep in ("/", "\\")) or run in (".", ".."):
        raise ValueError(f"run name {run!r}: use a plain folder name such as 'demo' or 'full-2026-11-24'")
    return Run((root or project_root()) / "outputs" / run)


def record_step(run: Run, step: str, parameters: dict, profile: str, data_root: str | os.PathLike | None,
                seed: int | None = None, finished: bool = False, extra: dict | None = None) -> dict:
    """Create or update run.json with this notebook's entry (atomic write)."""
    manifest = run.read_manifest()
    if not manifest:
        manifest = {"run": run.name, "created": now(), "steps": {}}
    manifest.update({
        "profile": profile,
        "data_root": None if data_root is None else str(data_root),
        "code_revision": code_revision(),
        "packages": package_versions(),
        "platform": {"system": platform.platform(), "cpus": os.cpu_count(), "executable": sys.executable},
        "updated": now(),
    })
    if seed is not None:
        manifest.setdefault("seeds", {})[step] = seed
    if finished:
        entry = manifest["steps"].get(step, {})
        entry["finished"] = now()
        if "started" in entry:
            start = _dt.datetime.fromisoformat(entry["started"])
            entry["seconds"] = round((_dt.datetime.now(_dt.timezone.utc) - start).total_seconds(), 1)
    else:
        if step in manifest["steps"]:  # a rerun: the earlier entry stays on record
            manifest.setdefault("earlier_steps", []).append({"step": step, **manifest["steps"][step]})
        entry = {"parameters": parameters, "started": now()}
    if extra:
        entry.update(extra)
    manifest["steps"][step] = entry
    write_json(run.manifest, manifest)
    return manifest


# ----------------------------------------------------------------------- ensemble.json (04)

# The fusion order of the members: Ensemble([segformer, deeplab], ensemble_weights(record)).
ENSEMBLE_MEMBERS = ("segformer", "deeplab")
# What the readers take from ensemble.json (05, 06, distillation, bench/inference.py), as key paths.
ENSEMBLE_FIELDS = ("members.segformer.weight", "members.deeplab.weight", "tta.flips", "tta.scales", "input_size",
                   "val.ensemble.miou", "val.ensemble.ms_per_image", "val.ensemble.params")


def write_ensemble(run: Run, weight: float, weight_grid: list[dict], flips, scales, flip_candidates: list[dict],
                   input_size, val: dict) -> dict:
    """Write the run's ensemble.json (notebook 04) atomically and return what was written.

    `weight`: SegFormer's share of the fused probabilities (DeepLab gets 1 - weight), chosen on val
    from `weight_grid` (rows of `ensemble.choose_weight`); `flips` and `scales`: the test-time
    augmentation, chosen from `flip_candidates` (rows of `evaluate.choose_tta`); `input_size`: the
    model input (height, width) it was chosen at; `val`: scores per predictor (segformer, deeplab,
    ensemble, ensemble_tta: miou, pixel_acc, per_class_iou, ms_per_image, params).
    """
    record = {
        "members": {"segformer": {"weight": weight, "checkpoint": "models/segformer/best.pt"},
                    "deeplab": {"weight": 1 - weight, "checkpoint": "models/deeplab/best.pt"}},
        "weight_grid": weight_grid,
        "tta": {"flips": list(flips), "scales": scales, "candidates": flip_candidates},
        "input_size": list(input_size),
        "val": val,
    }
    write_json(run.ensemble, record)
    return record


def read_ensemble(run: Run) -> dict:
    """The run's ensemble.json, as `write_ensemble` wrote it; a clear error naming notebook 04 when the
    file is missing or lacks a field its readers take (`ENSEMBLE_FIELDS`: a file from another version
    or edited by hand)."""
    path = run.require("ensemble.json")
    record = read_json(path)

    def has(field: str) -> bool:
        value = record
        for key in field.split("."):
            if not isinstance(value, dict) or key not in value:
                return False
            value = value[key]
        return True

    missing = [field for field in ENSEMBLE_FIELDS if not has(field)]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)} (written by another version, or edited): "
                         f"{run.run_first('ensemble.json')}")
    return record


def ensemble_weights(record: dict) -> list[float]:
    """The members' weights of an ensemble.json record, in the fusion order (`ENSEMBLE_MEMBERS`)."""
    return [record["members"][member]["weight"] for member in ENSEMBLE_MEMBERS]
