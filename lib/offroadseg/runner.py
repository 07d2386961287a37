"""./run_all.sh: the notebooks headless (papermill), the test suite, or JupyterLab.

    ./run_all.sh [--data PATH] [--profile NAME] [--run NAME] [--only 01,02]
                 [--set NAME=VALUE]... [--weights DIR]
    ./run_all.sh --test        lint, the fast unit tests, then the slow ones and pytest --nbval
    ./run_all.sh --lab         JupyterLab on working copies of the notebooks (lab/, not notebooks/)

run_all.sh sets up .venv and checks the GPU, then hands its options to this runner
(`python -m offroadseg.runner`, which an environment of your own, such as Kaggle's, calls directly).
Without --data the demo desert is made first (data/demo_desert; at once when it is there).

Executed copies go to outputs/<run>/notebooks/. A failing notebook stops the run: its name,
the last lines it printed and the failing cell's error are printed, and the exit code is 1.
Mistakes on the command line exit 2, saying what to do.

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
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import nbformat
import papermill as pm
from papermill.exceptions import PapermillExecutionError

from .chapters.context import DEMO_DATA, check_same_run, data_root_of
from .cli import RESERVED, UsageError, add_common_options, resolve_common
from .files import read_json, write_json
from .profiles import DEMO
from .runs import RunLock, RunMismatch, now, project_root, run_dir, snapshot
from .sampling import usable_cpus
from .synth import make_demo_desert

NOTEBOOKS = ("01_data_scan", "02_train_segformer", "03_train_deeplab", "04_ensemble", "05_distill", "06_evaluate")
# How much of what a failing notebook printed is shown headless.
FAILURE_TAIL_LINES = 15
FAILURE_MESSAGE_CHARS = 2500
# How many of the slowest cells a finished run names (profile.json holds them all).
PROFILE_LINES = 5


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
            raise UsageError(f"--only {only}: no notebook matches '{w}' (available: {names})")
        chosen.extend(m for m in matches if m not in chosen)
    return sorted(chosen)


# ----------------------------------------------------------------------------- parameters


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
        raise UsageError(f"--set {', '.join(unknown)}: no selected notebook has such a parameter; "
                         f"valid names for {', '.join(n.stem[:2] for n in notebooks)}: {valid}")
    return {notebook: {k: v for k, v in {**common, **sets}.items() if k in names or k in ("run", "profile")}
            for notebook, names in defined.items()}


# ----------------------------------------------------------------------------- run folders


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


def cell_times(executed: Path) -> list[dict]:
    """Each code cell's seconds in an executed notebook (papermill's record), with its first line."""
    try:
        notebook = nbformat.read(str(executed), as_version=4)
    except (OSError, ValueError):
        return []
    cells = []
    for index, cell in enumerate(notebook.cells):
        seconds = (cell.get("metadata", {}).get("papermill", {}) or {}).get("duration")
        if cell.cell_type == "code" and seconds is not None:
            first = next((line.strip() for line in cell.source.splitlines()
                          if line.strip() and not line.lstrip().startswith("#")), "")
            cells.append({"cell": index, "seconds": round(seconds, 2), "source": first[:100]})
    return cells


def record_profile(run: str, notebook: str, seconds: float, executed: Path) -> list[dict]:
    """Add a notebook's wall time and its cells' (`cell_times`) to outputs/<run>/profile.json; returns the cells."""
    folder = run_dir(run)
    profile = read_json(folder.profile) if folder.profile.exists() else {}
    cells = cell_times(executed)
    profile[notebook] = {"seconds": round(seconds, 1), "finished": now(), "cells": cells}
    write_json(folder.profile, profile)
    return cells


def slowest_cells(profiled: dict[str, list[dict]], count: int = PROFILE_LINES) -> str:
    """The `count` slowest cells of the notebooks just run, one line each (notebook, cell, seconds, first line)."""
    cells = sorted(((cell["seconds"], name, cell) for name, rows in profiled.items() for cell in rows), key=lambda c: -c[0])
    return "\n".join(f"  {name[:2]} cell {cell['cell']:<3} {seconds:7.1f} s  {cell['source'][:70]}"
                     for seconds, name, cell in cells[:count])


def _execute(notebooks: list[Path], per_notebook: dict[Path, dict], out_dir: Path | None, run: str) -> int:
    total = time.perf_counter()
    profiled = {}
    for notebook in notebooks:
        started = time.perf_counter()
        target = notebook if out_dir is None else out_dir / notebook.name
        try:
            pm.execute_notebook(str(notebook), str(target), parameters=per_notebook[notebook],
                                cwd=str(notebook.parent), progress_bar=False, kernel_name="python3")
        except PapermillExecutionError as err:
            record_profile(run, notebook.stem, time.perf_counter() - started, target)
            print(f"{notebook.stem:<22} {time.perf_counter() - started:7.1f} s  FAILED", flush=True)
            print(f"\n{notebook.name} failed in cell {err.exec_count}.\n{failure_report(target, err)}", file=sys.stderr)
            print(f"executed copy with the full traceback: {target}", file=sys.stderr)
            return 1
        except Exception as err:  # kernel died, missing kernel, bad notebook JSON...
            print(f"{notebook.stem:<22} {time.perf_counter() - started:7.1f} s  FAILED", flush=True)
            print(f"\n{notebook.name} could not run: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        profiled[notebook.stem] = record_profile(run, notebook.stem, time.perf_counter() - started, target)
        print(f"{notebook.stem:<22} {time.perf_counter() - started:7.1f} s  ok", flush=True)
    print(f"{'all':<22} {time.perf_counter() - total:7.1f} s  ok ({len(notebooks)} notebooks, run '{run}')", flush=True)
    print(f"slowest cells (all of them in {run_dir(run).profile.relative_to(project_root())}):\n{slowest_cells(profiled)}",
          flush=True)
    return 0


# ----------------------------------------------------------------------------- the modes


def make_demo_data(root: Path) -> None:
    """The demo desert under data/demo_desert, for a run without --data and for the test suite
    (deterministic; returns at once when the folder already holds this desert)."""
    made = make_demo_desert(root / DEMO_DATA)
    print(f"data: demo desert in {DEMO_DATA}: {made['counts']}", "(made now)" if made["generated"] else "(already there)",
          flush=True)


def fast_tier_workers() -> int:
    """Processes for the fast tier (pytest-xdist's -n): one per core, at most 4 (each imports torch),
    1 where pytest-xdist is missing. The slow tier stays in one process: the notebooks depend on each
    other in order, and several slow tests time themselves or start processes of their own. Each
    worker gets its share of the cores as torch threads (tests/conftest.py)."""
    if importlib.util.find_spec("xdist") is None:
        return 1
    return max(1, min(4, usable_cpus()))


def suite_tiers() -> list[tuple[str, list[str], str | None]]:
    """The test suite's three tiers as (what, command, advice on failure), quickest first, so a fault
    shows in seconds rather than after the notebooks: lint (ruff, configured in pyproject.toml), the
    fast unit tests, then the slow tests and the notebooks under nbval (its options live in
    pyproject.toml, [tool.pytest.ini_options])."""
    python = sys.executable  # the tools of this environment (run_all.sh: .venv), whatever PATH holds
    workers = fast_tier_workers()
    spread = ["-n", str(workers)] if workers > 1 else []
    return [
        ("lint (ruff check .)", [python, "-m", "ruff", "check", "."],
         "lint failed: 'ruff check . --fix' repairs the import order and unused imports; fix the rest by hand"),
        (f"fast unit tests (pytest -m 'not slow' tests{', ' + str(workers) + ' processes' if spread else ''})",
         [python, "-m", "pytest", *spread, "-m", "not slow", "tests"], None),
        ("slow tests and the notebooks (pytest --nbval -m slow tests notebooks)",
         [python, "-m", "pytest", "--nbval", "-m", "slow", "tests", "notebooks"], None),
    ]


def warn_if_notebooks_edited(root: Path) -> None:
    """nbval compares the notebooks against their stored outputs: say so when notebooks/ differs
    from git (saved from a UI?), and how to see and undo it."""
    if shutil.which("git") is None or not (root / ".git").exists():  # .git: a folder, or a file in a worktree
        return
    if subprocess.run(["git", "diff", "--quiet", "--", "notebooks/"], cwd=root, capture_output=True).returncode == 1:
        print("warning: notebooks/ differs from the committed version (saved from a UI?): nbval compares against "
              "these edited outputs. 'git diff --stat notebooks/' shows what; 'git checkout notebooks/' restores them.",
              file=sys.stderr, flush=True)


def run_tests(root: Path) -> int:
    """`--test`: the three tiers in order, each a process of its own in the project root; stops at
    the first that fails, with its exit status (2 for lint, with the advice)."""
    warn_if_notebooks_edited(root)
    for what, command, advice in suite_tiers():
        print(f"test: {what}", flush=True)
        code = subprocess.run(command, cwd=root).returncode
        if code != 0:
            if advice:
                print(advice, file=sys.stderr)
                return 2
            return code
    return 0


def run_lab(root: Path) -> NoReturn:
    """`--lab`: JupyterLab on working copies in lab/. Saving a notebook in the UI changes lab/, never
    the stored notebooks/ that `--test` compares against. Existing copies are kept (they are your work)."""
    lab = root / "lab"
    lab.mkdir(exist_ok=True)
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        if not (lab / notebook.name).exists():
            shutil.copyfile(notebook, lab / notebook.name)
    print("JupyterLab on lab/ (working copies of notebooks/; delete a copy to get the stored one back)", flush=True)
    command = [sys.executable, "-m", "jupyter", "lab", f"--notebook-dir={lab}"]
    os.execv(command[0], command)


# ----------------------------------------------------------------------------- the command line

# run_all.sh sets it to its own name, so usage and errors name the command the user typed.
PROG_ENV = "OFFROADSEG_PROG"
# The options that choose what the notebooks run on (argparse dest -> option), refused by the other modes.
NOTEBOOK_OPTIONS = {"profile": "--profile", "run": "--run", "data": "--data", "sets": "--set", "weights": "--weights",
                    "only": "--only"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=os.environ.get(PROG_ENV) or "python -m offroadseg.runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser)
    parser.add_argument("--only", default=None, metavar="01,02", help="some notebooks, a comma list (default: all)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--test", action="store_true",
                      help="the test suite instead: lint, the fast unit tests, then the slow ones and pytest --nbval")
    mode.add_argument("--lab", action="store_true",
                      help="JupyterLab instead, on working copies of the notebooks in lab/ (existing copies are kept)")
    mode.add_argument("--store", action="store_true",
                      help="developers: execute notebooks/ in place with their defaults (refreshes the stored demo outputs)")
    return parser


def refuse_notebook_options(parser: argparse.ArgumentParser, args: argparse.Namespace, why: str, allowed=()) -> None:
    """The modes other than a run take none of the options that choose what the notebooks run on."""
    given = [option for dest, option in NOTEBOOK_OPTIONS.items()
             if dest not in allowed and getattr(args, dest) != parser.get_default(dest)]
    if given:
        parser.error(f"{why}: drop {', '.join(given)}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    root = project_root()
    if args.test:
        refuse_notebook_options(parser, args, "--test runs the test suite, the notebooks with their stored defaults")
        make_demo_data(root)
        return run_tests(root)
    if args.lab:
        refuse_notebook_options(parser, args, "--lab opens the notebooks (in each, its parameters cell sets data, run and profile)")
        run_lab(root)
    try:
        notebooks = select_notebooks(args.only, root / "notebooks")
        if not notebooks:
            print("no notebooks found under notebooks/", file=sys.stderr)
            return 1
        if args.store:
            refuse_notebook_options(parser, args, "--store runs the notebooks with their own defaults", allowed=("only",))
            make_demo_data(root)
            return run_notebooks(notebooks, DEMO.name, DEMO.name, None, None)
        options = resolve_common(args, root)
        if options.data is None:
            make_demo_data(root)
        return run_notebooks(notebooks, options.run, options.profile, options.data,
                             run_dir(options.run, root).dir / "notebooks", options.sets, options.weights)
    except UsageError as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
