"""What every notebook does first and last: resolve the run, profile and data; record run.json.

Notebooks stay thin: a `parameters` cell, then `ctx = context.start(...)`,
library calls, plots, and `context.finish(ctx)` (or a chapter's own `finish`).

`start` also refuses stage mistakes that would silently mix two runs in one folder: a
run made with another profile or on other data (run.json says which), or data that
changed after notebook 01 scanned it while models trained on the old files are there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..data import find_dataset
from ..device import keep_freed_memory
from ..files import read_json
from ..profiles import Profile, get_profile
from ..runs import PRODUCERS, Run, RunMismatch, project_root, record_step, run_dir
from ..scan import data_fingerprint
from ..synth import is_demo_desert, make_demo_desert

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

    root = project_root() / DEMO_DATA
    make_demo_desert(root)  # returns at once when the desert is already there
    return root


def data_root_of(data: str | os.PathLike | None) -> Path:
    """The dataset root `data` names (None: the demo desert), without generating anything."""
    return Path(data).expanduser().resolve() if data else project_root() / DEMO_DATA


def _same_data(recorded: str, data_root: Path) -> bool:
    # The demo desert counts as the same data wherever the checkout lives (a clone, a move).
    if Path(recorded).as_posix().endswith(DEMO_DATA) and data_root.as_posix().endswith(DEMO_DATA):
        return True
    return Path(recorded) == data_root


def holds_models(folder: Run) -> bool:
    """Whether a run folder holds any trained checkpoint (best.pt, last.pt, ...) under models/."""
    return any((folder.dir / "models").glob("*/*.pt"))


def check_same_run(folder: Run, profile: str, data_root: Path) -> str | None:
    """RunMismatch if run.json shows `folder` was made with another profile or on other data.

    A run that holds no trained model yet (its scan found nothing usable, or training never
    finished an epoch) may be pointed at other data: nothing in it belongs to the old data but a
    scan that notebook 01 redoes. Returns a note saying so in that case, else None.
    """
    manifest = folder.read_manifest()
    differ = []
    if manifest.get("profile") not in (None, profile):
        differ.append(f"profile {manifest['profile']!r} (now {profile!r})")
    other_data = bool(manifest.get("data_root")) and not _same_data(manifest["data_root"], data_root)
    note = None
    if other_data and not differ and not holds_models(folder):
        note = (f"run '{folder.name}' holds no trained model yet: it now uses the data in {data_root} "
                f"(was {manifest['data_root']}); notebook 01 scans it afresh")
    elif other_data:
        differ.append(f"data {manifest['data_root']} (now {data_root})")
    if differ:
        raise RunMismatch(
            f"run '{folder.name}' ({folder.dir}) was made with {' and '.join(differ)}, as its run.json records. "
            f"Its models and results belong to those settings: use a new run name for this one "
            f"(./run_all.sh --run NEW_NAME, or the notebook's `run` parameter), or go back to the run's own "
            f"profile and data to continue it."
        )
    return note


def check_data_unchanged(folder: Run, step: str, data_root: Path) -> None:
    """RunMismatch if the data changed since notebook 01 scanned it and this run already holds
    results of the old data (a rescan would then mix models of the old files with the new)."""
    if not folder.scan.exists():
        return

    try:
        scanned = read_json(folder.scan).get("fingerprint")
    except ValueError:
        return  # unreadable scan.json: notebook 01 rescans; later notebooks fail on it with its name
    if scanned is None or scanned == data_fingerprint(find_dataset(data_root)):
        return
    models = folder.dir / "models"
    if step == PRODUCERS["scan.json"] and not holds_models(folder):
        return  # nothing trained yet: notebook 01 simply rescans
    raise RunMismatch(
        f"the data under {data_root} changed (files added, removed or modified) since notebook 01 scanned it for "
        f"run '{folder.name}', whose models were trained on the old files. Use a new run name to train on the new "
        f"data, or delete {models} and rerun from 01 to retrain this run."
    )


def start(step: str, run: str, profile: str, data: str | os.PathLike | None = None, record: bool = True,
          **parameters) -> Context:
    """Resolve run folder, profile and data root, check they match the run's own, and record this
    notebook's start in run.json (`record`: False in every process but the first of a training
    command under a launcher, which records it once)."""
    run = os.environ.get(RUN_OVERRIDE_ENV) or run
    keep_freed_memory()  # the notebook's training and scoring on a CPU reuse freed memory (device.keep_freed_memory)
    folder = run_dir(run)
    chosen = get_profile(profile)
    note = check_same_run(folder, profile, data_root_of(data))
    if note:
        print(note)
    data_root = resolve_data_root(data)
    check_data_unchanged(folder, step, data_root)
    size = run_image_size(folder, parameters.get("image_size"))
    if size is not None:
        chosen = chosen.with_overrides(image_size=size)
    if record:
        record_step(folder, step, {"profile": profile, "data": None if data is None else str(data), **parameters},
                    profile=profile, data_root=data_root, seed=chosen.seed)
    return Context(step=step, run=folder, profile=chosen, data_root=data_root, parameters=parameters)


def run_image_size(folder: Run, given) -> tuple[int, int] | None:
    """The model input size (height, width) a notebook uses, when not the profile's own.

    `given` (a notebook's `image_size` parameter) wins; None takes the size an earlier notebook of
    this run was given (the teachers' in 02/03), so 04-06 score and distil at the size the models
    were trained at however the run was started: `--set image_size=...` on 02 alone, or by hand.
    """
    if given is not None:
        if len(given) != 2 or not all(isinstance(v, int) and v > 0 for v in given):
            raise ValueError(f"image_size must be [height, width] in pixels, got {given!r}")
        return int(given[0]), int(given[1])
    steps = folder.read_manifest().get("steps", {})
    for step in sorted(steps, reverse=True):  # the latest notebook that was given one
        recorded = (steps[step].get("parameters") or {}).get("image_size")
        if recorded is not None:
            return int(recorded[0]), int(recorded[1])
    return None


def require(ctx: Context, relative: str) -> Path:
    """The path of an earlier notebook's artifact in this run; a clear error naming that notebook if absent
    (`runs.PRODUCERS` says which notebook writes what)."""
    return ctx.run.require(relative)


# Parameters of the training notebooks that change what the demo's quality floors were set for.
TRAINING_OVERRIDES = ("model", "pretrained", "epochs", "batch_size", "lr", "image_size", "student_init")
TRAINING_STEPS = ("02_train_segformer", "03_train_deeplab", "05_distill")


def demo_floors_skipped(ctx: Context) -> str | None:
    """Why the demo's quality floors are not asserted in this run, or None when they are.

    The floors (val mIoU above a threshold, the ensemble beating its members, ...) were set for
    the demo profile's own settings on the generated demo desert. On a user's data, or with other
    settings (a first one-epoch run), the notebooks report their figures and go on.
    """
    if not is_demo_desert(ctx.data_root):
        return "the data is not the generated demo desert"
    if ctx.profile.name != "demo":
        return f"profile {ctx.profile.name!r}, not the demo's"
    steps = ctx.run.read_manifest().get("steps", {})
    for step, entry in {**steps, ctx.step: {"parameters": ctx.parameters}}.items():
        given = entry.get("parameters", {}) or {}
        keys = TRAINING_OVERRIDES if step in TRAINING_STEPS else ("image_size",)
        changed = sorted(k for k in keys if given.get(k) is not None)
        if changed:
            return f"{step} ran with {', '.join(changed)} set"
    return None


def demo_check(ctx: Context, claim: str, ok: bool, detail: str = "") -> bool:
    """Print `claim: ok`; on the demo desert with the demo's settings, a false claim is an AssertionError.

    The message is one short line (`detail` adds the figures), so a headless run ends with it
    rather than with a dump of the notebook's state.
    """
    skipped = demo_floors_skipped(ctx)
    print(f"{claim}: {bool(ok)}" + (f"  (reported, not asserted: {skipped})" if skipped and not ok else ""))
    if not ok and skipped is None:
        raise AssertionError(f"demo check failed: {claim}" + (f" ({detail})" if detail else ""))
    return bool(ok)


def finish(ctx: Context, **extra) -> None:
    """Record the notebook's end (and any summary figures) in run.json."""
    record_step(ctx.run, ctx.step, {}, profile=ctx.profile.name, data_root=ctx.data_root, finished=True, extra=extra)
