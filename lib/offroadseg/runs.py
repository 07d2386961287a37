"""Run folders and the run manifest (run.json).

A run is `outputs/<run>/`; each notebook records in run.json the profile, its
parameters, the data root and fingerprint, the code revision, package versions,
seeds and its start/finish times, so any artifact can be traced to what made it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .files import read_json, write_json

PACKAGES = ("torch", "torchvision", "transformers", "accelerate", "numpy", "pillow", "matplotlib")


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

    def model_dir(self, name: str) -> Path:
        return self.dir / "models" / name

    def figure(self, name: str) -> Path:
        return self.figures / name

    def read_manifest(self) -> dict:
        return read_json(self.manifest) if self.manifest.exists() else {}


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
        return [n for n in names if (top and n in ("earlier", "cache", "lock")) or (n.startswith(".") and n.endswith(".tmp"))]

    shutil.copytree(run.dir, target, copy_function=link, ignore=skip)
    return target


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
