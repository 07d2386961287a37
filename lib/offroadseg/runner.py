"""Headless notebook runner behind ./run_all.sh: papermill, one line per notebook.

    python -m offroadseg.runner [--profile demo|full] [--run NAME] [--data PATH] [--only 01,02]
                                [--set NAME=VALUE]... [--weights DIR] [--cwd DIR]

Executed copies go to outputs/<run>/notebooks/. A failing notebook stops the run: its name,
the last lines it printed and the failing cell's error are printed, and the exit code is 1.

Parameters: `--set NAME=VALUE` (repeatable) sets that papermill parameter on every selected
notebook that defines it; VALUE is read as JSON, else as a Python literal, else kept as a
string (`--set epochs=1 --set 'image_size=[512, 512]' --set uncertainty_measure=margin`). A
name that no selected notebook defines is an error listing the valid ones. `--weights DIR`
sets the `weights` parameter where a notebook defines it. Relative paths (in options and in
values that name a path) resolve from `--cwd`, the directory the command was run in.

Run folders: with `--data` and no `--run`, the run is named after the profile and the dataset
(e.g. `demo-falcon-desert`), so a user's data never lands in the demo's folder. The data is
checked (`find_dataset`) before any run folder is touched. One runner at a time per folder:
`outputs/<run>/lock` is held (`filelock`: an OS file lock, released when its process dies, so a
lock left by a killed run does not block) and `outputs/<run>/lock.holder` names the holder.

Running again over an existing run folder: it must have been made with the same profile and
data, unless it holds no trained model yet (else a clear refusal, nothing touched); the folder
as it was is kept under outputs/<run>/earlier/<time>/ (hard links: instant), then the notebooks
run and reuse or resume what is finished, each saying so.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import nbformat
import papermill as pm
from filelock import FileLock, Timeout
from papermill.exceptions import PapermillExecutionError

from .data import DataError, find_dataset
from .files import write_bytes
from .pipeline import RunMismatch, check_same_run, data_root_of
from .runs import LOCK_FILE, LOCK_HOLDER_FILE, now, project_root, run_dir, snapshot

NOTEBOOKS = ("01_data_scan", "02_train_segformer", "03_train_deeplab", "04_ensemble", "05_distill", "06_evaluate")
# Set by the runner's own options, never through --set.
RESERVED = {"run": "--run", "profile": "--profile", "data": "--data", "weights": "--weights"}
# How much of what a failing notebook printed is shown headless.
FAILURE_TAIL_LINES = 15
FAILURE_MESSAGE_CHARS = 2500
# Seconds a second runner waits for a run folder's lock before it refuses (filelock polls every 0.05 s).
RUN_LOCK_WAIT = 0.5


def select_notebooks(only: str | None, folder: Path) -> list[Path]:
    """Notebooks to run, in order; `only` is a comma list of numbers or names ("01,02")."""
    available = [folder / f"{name}.ipynb" for name in NOTEBOOKS if (folder / f"{name}.ipynb").exists()]
    if not only:
        return available
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = []
    for w in wanted:
        matches = [p for p in available if p.stem == w or p.stem.startswith(w.zfill(2) + "_")]
        if not matches:
            names = ", ".join(p.stem for p in available)
            raise SystemExit(f"--only {only}: no notebook matches '{w}' (available: {names})")
        chosen.extend(m for m in matches if m not in chosen)
    return sorted(chosen)


# ----------------------------------------------------------------------------- parameters


def parse_value(text: str):
    """A --set VALUE: JSON (true, null, [512, 512]), else a Python literal (True, None, (1, 2)), else the string."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return text


def parse_sets(items: list[str] | None) -> dict:
    """{name: value} from --set NAME=VALUE items (the last of a repeated name wins)."""
    values = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE, e.g. --set epochs=1 or --set 'image_size=[512, 512]'")
        if name in RESERVED:
            raise SystemExit(f"--set {name}=...: use the option {RESERVED[name]} instead")
        values[name] = parse_value(text)
    return values


def resolve_path_value(value, cwd: Path):
    """A string value that names a path relative to `cwd` becomes absolute (notebooks run in notebooks/,
    so a relative path would otherwise resolve from there). Strings that name no existing path and do
    not start like one (`./`, `../`, `~`) stay as they are: hub ids such as nvidia/mit-b2, names."""
    if not isinstance(value, str) or not value or "\n" in value:
        return value
    if value.startswith("~"):
        return str(Path(value).expanduser().resolve())
    path = Path(value)
    if path.is_absolute():
        return value
    if value.startswith(("./", "../")) or (cwd / path).exists():
        return str((cwd / path).resolve())
    return value


def notebook_parameters(notebook: Path) -> set[str]:
    """Names of the parameters a notebook's `parameters` cell defines."""
    return set(pm.inspect_notebook(str(notebook)))


def assign_parameters(notebooks: list[Path], common: dict, sets: dict) -> dict[Path, dict]:
    """Per notebook, the parameters it gets: `common` (run, profile, data, weights) and `sets`,
    each only where the notebook defines it. A --set name no selected notebook defines is an error."""
    defined = {notebook: notebook_parameters(notebook) for notebook in notebooks}
    known = set().union(*defined.values()) if defined else set()
    unknown = sorted(set(sets) - known)
    if unknown:
        valid = ", ".join(sorted(known - set(RESERVED)))
        raise SystemExit(f"--set {', '.join(unknown)}: no selected notebook has such a parameter; "
                         f"valid names for {', '.join(n.stem[:2] for n in notebooks)}: {valid}")
    return {notebook: {k: v for k, v in {**common, **sets}.items() if k in names or k in ("run", "profile")}
            for notebook, names in defined.items()}


# ----------------------------------------------------------------------------- run folders


def default_run_name(profile: str, dataset) -> str:
    """`<profile>-<dataset name>`: the dataset named by the folder that holds all its splits
    (Kaggle's dataset folder, the folder the archives were unzipped into)."""
    folders = [str(folder) for folder in dataset.split_dirs.values()]
    common = Path(os.path.commonpath(folders)) if folders else Path(dataset.root)
    if str(common) in folders:  # a single split: name it by the folder above
        common = common.parent
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", common.name or "data").strip("-.")[:40] or "data"
    return f"{profile}-{name}"


class RunLock:
    """A lock on outputs/<run>/lock for the duration of a run (a context manager).

    `filelock.FileLock`: flock on Unix, a msvcrt lock on Windows, both owned by the process, so one
    killed with SIGKILL releases its lock at once and a lock file left behind never blocks the next
    run (where neither exists, filelock's soft lock records the PID and reclaims a dead holder's
    file: filelock 3.22 removes it on one attempt and takes the lock on the next, hence the short
    wait, `RUN_LOCK_WAIT`, before a refusal). Who holds it is written to `lock.holder` beside it,
    for the refusal: not into the lock file itself, which Windows keeps unreadable while it is
    locked and the soft lock fills itself.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.holder_path = folder / LOCK_HOLDER_FILE
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
            write_bytes(self.holder_path, f"./run_all.sh (pid {os.getpid()} on {socket.gethostname()}, started {now()})\n".encode())
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


# ----------------------------------------------------------------------------- failures


def _printed_lines(cell) -> list[str]:
    lines = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream" and output.get("name") == "stdout":
            lines += [line for line in output.get("text", "").splitlines() if line.strip()]
        elif output.get("output_type") == "execute_result":
            lines += output.get("data", {}).get("text/plain", "").splitlines()
    return lines


def failure_report(executed: Path, err: PapermillExecutionError) -> str:
    """What a headless user needs from a failed notebook: the last lines it printed before the
    error, then the error itself in one block (no traceback, no kernel noise)."""
    lines = []
    try:
        nb = nbformat.read(str(executed), as_version=4)
        for cell in nb.cells:  # up to the failing cell (papermill's injected cell shifts indices: look for the error)
            lines += _printed_lines(cell)
            if any(output.get("output_type") == "error" for output in cell.get("outputs", [])):
                break
    except Exception:  # noqa: BLE001 - the report must never hide the error it reports
        lines = []
    message = f"{err.ename}: {err.evalue}"
    if len(message) > FAILURE_MESSAGE_CHARS:
        message = message[:FAILURE_MESSAGE_CHARS] + " ... (cut; the executed copy has it all)"
    tail = lines[-FAILURE_TAIL_LINES:]
    shown = "\n".join(f"  | {line}" for line in tail)
    return (f"last lines it printed:\n{shown}\n" if tail else "") + message


def run_notebooks(notebooks: list[Path], run: str, profile: str, data: str | None, out_dir: Path | None,
                  sets: dict | None = None, weights: str | None = None) -> int:
    """Execute `notebooks` in order with papermill into `out_dir`; `out_dir=None` executes them in
    place with their own default parameters (how the stored outputs of a demo run are refreshed)."""
    if out_dir is None:
        return _execute(notebooks, {notebook: {} for notebook in notebooks}, None, run)
    common = {"run": run, "profile": profile}
    if data:
        common["data"] = str(Path(data).expanduser().resolve())
    if weights:
        common["weights"] = str(Path(weights).expanduser().resolve())
    per_notebook = assign_parameters(notebooks, common, sets or {})
    folder = run_dir(run)
    try:
        with RunLock(folder.dir):
            note = check_same_run(folder, profile, data_root_of(data))
            if note:
                print(note, flush=True)
            kept = snapshot(folder)
            if kept is not None:
                print(f"run '{run}' exists: it continues (finished models are reused, unfinished ones resumed); "
                      f"the folder as it was is kept in {kept}", flush=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            return _execute(notebooks, per_notebook, out_dir, run)
    except RunMismatch as err:
        print(f"refused: {err}", file=sys.stderr)
        return 1


def _execute(notebooks: list[Path], per_notebook: dict[Path, dict], out_dir: Path | None, run: str) -> int:
    total = time.perf_counter()
    for notebook in notebooks:
        started = time.perf_counter()
        target = notebook if out_dir is None else out_dir / notebook.name
        try:
            pm.execute_notebook(str(notebook), str(target), parameters=per_notebook[notebook],
                                cwd=str(notebook.parent), progress_bar=False, kernel_name="python3")
        except PapermillExecutionError as err:
            print(f"{notebook.stem:<22} {time.perf_counter() - started:7.1f} s  FAILED", flush=True)
            print(f"\n{notebook.name} failed in cell {err.exec_count}.\n{failure_report(target, err)}", file=sys.stderr)
            print(f"executed copy with the full traceback: {target}", file=sys.stderr)
            return 1
        except Exception as err:  # kernel died, missing kernel, bad notebook JSON...
            print(f"{notebook.stem:<22} {time.perf_counter() - started:7.1f} s  FAILED", flush=True)
            print(f"\n{notebook.name} could not run: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        print(f"{notebook.stem:<22} {time.perf_counter() - started:7.1f} s  ok", flush=True)
    print(f"{'all':<22} {time.perf_counter() - total:7.1f} s  ok ({len(notebooks)} notebooks, run '{run}')", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None,
                        help="run folder name under outputs/ (default: the profile name, or <profile>-<dataset> with --data)")
    parser.add_argument("--profile", default="demo", choices=("demo", "full"))
    parser.add_argument("--data", default=None, help="dataset root (default: the generated demo desert)")
    parser.add_argument("--only", default=None, help="comma list of notebooks, e.g. 01,02")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                        help="a notebook parameter (repeatable), e.g. --set epochs=1 --set 'image_size=[512, 512]'")
    parser.add_argument("--weights", default=None, help="folder of pretrained weights (python -m offroadseg.weights download)")
    parser.add_argument("--cwd", default=None, help="directory relative paths resolve from (default: the current one)")
    parser.add_argument("--store", action="store_true",
                        help="developers: execute notebooks/ in place with their defaults (refreshes the stored demo outputs)")
    args = parser.parse_args(argv)
    root = project_root()
    cwd = Path(args.cwd or os.getcwd()).resolve()
    notebooks = select_notebooks(args.only, root / "notebooks")
    if not notebooks:
        print("no notebooks found under notebooks/", file=sys.stderr)
        return 1
    if args.store:
        if args.run or args.data or args.profile != "demo" or args.sets or args.weights:
            parser.error("--store runs the notebooks with their own defaults: drop --run, --data, --profile, --set and --weights")
        return run_notebooks(notebooks, "demo", "demo", None, None)
    sets = {name: resolve_path_value(value, cwd) for name, value in parse_sets(args.sets).items()}
    data = weights = None
    run = args.run
    if args.data:
        data = str((cwd / Path(args.data).expanduser()).resolve())
        try:
            dataset = find_dataset(data)
        except DataError as err:  # checked before any run folder: the real problem, not a folder clash
            print(f"data: {err}", file=sys.stderr)
            return 2
        print(f"data: {data}\n{dataset.describe()}", flush=True)
        if run is None:
            run = default_run_name(args.profile, dataset)
            print(f"run: {run} (named after the profile and the dataset; --run NAME chooses another)", flush=True)
    if args.weights:
        weights = (cwd / Path(args.weights).expanduser()).resolve()
        if not weights.is_dir():
            print(f"--weights {args.weights}: no such folder ({weights}); make it with "
                  f"`python -m offroadseg.weights download --profile {args.profile} --to weights/`", file=sys.stderr)
            return 2
        weights = str(weights)
    run = run or args.profile
    try:
        run_dir(run, root)
    except ValueError as err:
        print(f"--run: {err}", file=sys.stderr)
        return 2
    return run_notebooks(notebooks, run, args.profile, data, run_dir(run, root).dir / "notebooks", sets, weights)


if __name__ == "__main__":
    sys.exit(main())
