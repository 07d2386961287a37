"""Headless notebook runner behind ./run_all.sh: papermill, one line per notebook.

    python -m offroadseg.runner --run demo --profile demo [--data PATH] [--only 01,02]

Executed copies go to outputs/<run>/notebooks/. A failing notebook stops the
run: its name and the failing cell's error are printed and the exit code is 1.

Running again over an existing run folder: it must have been made with the same
profile and data (else a clear refusal, nothing touched); the folder as it was is kept
under outputs/<run>/earlier/<time>/ (hard links: instant), then the notebooks run and
reuse or resume what is finished, each saying so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .runs import project_root, run_dir, snapshot

NOTEBOOKS = ("01_data_scan", "02_train_segformer", "03_train_deeplab", "04_ensemble", "05_distill", "06_evaluate")


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


def run_notebooks(notebooks: list[Path], run: str, profile: str, data: str | None, out_dir: Path | None) -> int:
    """Execute `notebooks` in order with papermill into `out_dir`; `out_dir=None` executes them in
    place with their own default parameters (how the stored outputs of a demo run are refreshed)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    parameters = {}
    if out_dir is not None:
        from .pipeline import RunMismatch, check_same_run, data_root_of

        folder = run_dir(run)
        try:
            check_same_run(folder, profile, data_root_of(data))
        except RunMismatch as err:
            print(f"refused: {err}", file=sys.stderr)
            return 1
        kept = snapshot(folder)
        if kept is not None:
            print(f"run '{run}' exists: it continues (finished models are reused, unfinished ones resumed); "
                  f"the folder as it was is kept in {kept}", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        parameters = {"run": run, "profile": profile}
        if data:
            parameters["data"] = str(Path(data).expanduser().resolve())
    total = time.perf_counter()
    for notebook in notebooks:
        started = time.perf_counter()
        try:
            target = notebook if out_dir is None else out_dir / notebook.name
            pm.execute_notebook(str(notebook), str(target), parameters=parameters,
                                cwd=str(notebook.parent), progress_bar=False, kernel_name="python3")
        except PapermillExecutionError as err:
            print(f"{notebook.stem:<22} {time.perf_counter() - started:7.1f} s  FAILED", flush=True)
            print(f"\n{notebook.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}", file=sys.stderr)
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
    parser.add_argument("--run", default=None, help="run folder name under outputs/ (default: the profile name)")
    parser.add_argument("--profile", default="demo", choices=("demo", "full"))
    parser.add_argument("--data", default=None, help="dataset root (default: the generated demo desert)")
    parser.add_argument("--only", default=None, help="comma list of notebooks, e.g. 01,02")
    parser.add_argument("--store", action="store_true",
                        help="developers: execute notebooks/ in place with their defaults (refreshes the stored demo outputs)")
    args = parser.parse_args(argv)
    root = project_root()
    run = args.run or args.profile
    out_dir = run_dir(run, root).dir / "notebooks"
    notebooks = select_notebooks(args.only, root / "notebooks")
    if not notebooks:
        print("no notebooks found under notebooks/", file=sys.stderr)
        return 1
    if args.store:
        if args.run or args.data or args.profile != "demo":
            parser.error("--store runs the notebooks with their own defaults: drop --run, --data and --profile")
        return run_notebooks(notebooks, "demo", "demo", None, None)
    return run_notebooks(notebooks, run, args.profile, args.data, out_dir)


if __name__ == "__main__":
    sys.exit(main())
