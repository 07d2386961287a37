"""What every notebook does first and last: resolve the run, profile and data; record run.json.

Notebooks stay thin: a `parameters` cell, then `ctx = pipeline.start(...)`,
library calls, plots, and `pipeline.finish(ctx)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .profiles import Profile, get_profile
from .runs import Run, project_root, record_step, run_dir

DEMO_DATA = "data/demo_desert"
# The test suite sets this so `pytest --nbval` never touches a user's run folders.
RUN_OVERRIDE_ENV = "OFFROADSEG_RUN"


@dataclass
class Context:
    step: str
    run: Run
    profile: Profile
    data_root: Path
    parameters: dict

    def rel(self, path: str | os.PathLike) -> str:
        """A path relative to the project root, for output that must not depend on the machine."""
        try:
            return Path(path).resolve().relative_to(project_root()).as_posix()
        except ValueError:
            return str(path)


def resolve_data_root(data: str | os.PathLike | None) -> Path:
    """The dataset root: `data` as given, or the demo desert (generated on first use)."""
    if data:
        return Path(data).expanduser().resolve()
    from .synth import make_demo_desert

    root = project_root() / DEMO_DATA
    make_demo_desert(root)  # returns at once when the desert is already there
    return root


def start(step: str, run: str, profile: str, data: str | os.PathLike | None = None, **parameters) -> Context:
    """Resolve run folder, profile and data root, and record this notebook's start in run.json."""
    run = os.environ.get(RUN_OVERRIDE_ENV) or run
    folder = run_dir(run)
    chosen = get_profile(profile)
    data_root = resolve_data_root(data)
    record_step(folder, step, {"profile": profile, "data": None if data is None else str(data), **parameters},
                profile=profile, data_root=data_root, seed=chosen.seed)
    return Context(step=step, run=folder, profile=chosen, data_root=data_root, parameters=parameters)


# Which notebook writes which artifact: a missing input names the notebook to run first.
PRODUCERS = {
    "scan.json": "01_data_scan",
    "models/segformer": "02_train_segformer",
    "models/deeplab": "03_train_deeplab",
    "ensemble.json": "04_ensemble",
    "models/student": "05_distill",
    "metrics.json": "06_evaluate",
}


def require(ctx: Context, relative: str) -> Path:
    """The path of an earlier notebook's artifact in this run; a clear error naming that notebook if absent."""
    path = ctx.run.dir / relative
    if not path.exists():
        producer = next((nb for key, nb in PRODUCERS.items() if relative.startswith(key)), "the earlier notebooks")
        raise FileNotFoundError(f"{path} not found: run notebook {producer} for run '{ctx.run.name}' first "
                                f"(./run_all.sh --run {ctx.run.name} --only {producer[:2]})")
    return path


def finish(ctx: Context, **extra) -> None:
    """Record the notebook's end (and any summary figures) in run.json."""
    record_step(ctx.run, ctx.step, {}, profile=ctx.profile.name, data_root=ctx.data_root, finished=True, extra=extra)
