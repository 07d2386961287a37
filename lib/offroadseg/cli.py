"""The options every command that runs the pipeline shares, parsed and checked in one place.

    parser = argparse.ArgumentParser()
    add_common_options(parser)          # --profile --run --data --set --weights --cwd
    options = resolve_common(parser.parse_args(argv))   # UsageError: tell the user, exit 2

`./run_all.sh` (`offroadseg.runner`) takes them, and so will the commands that run one step of
the pipeline outside the notebooks (a training command: the same profiles, --set values and run
folders as the notebooks). A module of its own rather than functions in `runner`: the runner is
papermill's notebook executor, and such a command must not import the notebook stack to read
its options; here they need only the standard library, `profiles`, `data` and `runs`.

The valid --profile values are `profiles.PROFILES`, nowhere else. Relative paths (in options and
in --set values that name a path) resolve from `--cwd`, the directory the command was run in
(run_all.sh passes it: it runs from the project root).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataError, Dataset, find_dataset
from .profiles import DEMO, PROFILES
from .runs import run_dir

# Parameters set by the options themselves, never through --set.
RESERVED = {"run": "--run", "profile": "--profile", "data": "--data", "weights": "--weights"}


class UsageError(ValueError):
    """A mistake on the command line; the message names what was given and what to do instead.
    Commands print it and exit 2, as argparse does for its own errors."""


def add_common_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds --profile, --run, --data, --set, --weights and --cwd to `parser` (returned)."""
    parser.add_argument("--profile", default=DEMO.name, choices=list(PROFILES),
                        help=f"what to train and how (default: {DEMO.name})")
    # --run-name: the same option, for torchrun, whose parser takes --run for an abbreviation of its --run-path.
    parser.add_argument("--run", "--run-name", dest="run", default=None,
                        help="run folder name under outputs/ (default: the profile name, or <profile>-<dataset> with --data)")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="the folder holding the dataset, found however deep (default: the generated demo desert)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter (repeatable); VALUE is JSON or a Python literal, else a string: "
                             "--set epochs=1 --set 'image_size=[512, 512]'")
    parser.add_argument("--weights", default=None, metavar="DIR",
                        help="folder of pretrained weights (python -m offroadseg.weights download)")
    parser.add_argument("--cwd", default=None, metavar="DIR",
                        help="directory relative paths resolve from (default: the current one)")
    return parser


@dataclass(frozen=True)
class CommonOptions:
    """The common options, checked: absolute paths, the run folder's name settled."""

    profile: str
    run: str
    cwd: Path
    data: str | None = None  # absolute; None: the demo desert
    dataset: Dataset | None = None  # what `find_dataset` found under `data`
    weights: str | None = None  # absolute
    sets: dict = field(default_factory=dict)  # {name: value}, path values absolute


def resolve_common(args: argparse.Namespace, root: Path | None = None) -> CommonOptions:
    """Checks the options `add_common_options` added, cheapest first, before anything is written:
    --set syntax, that --data and --weights are folders, the run name, then the dataset under --data
    (printed, with the run name it gives when --run is not given). Raises `UsageError`."""
    cwd = Path(args.cwd or os.getcwd()).resolve()
    sets = {name: resolve_path_value(value, cwd) for name, value in parse_sets(args.sets).items()}
    data = weights = None
    if args.data:
        data = (cwd / Path(args.data).expanduser()).resolve()
        if not data.exists():
            raise UsageError(f"--data {data}: no such folder")
        if not data.is_dir():
            raise UsageError(f"--data {data}: not a folder (give the folder holding the unzipped dataset)")
    if args.weights:
        weights = (cwd / Path(args.weights).expanduser()).resolve()
        if not weights.is_dir():
            raise UsageError(f"--weights {args.weights}: no such folder ({weights}); make it with "
                             f"`python -m offroadseg.weights download --profile {args.profile} --to weights/`")
    if args.run is not None:
        check_run_name(args.run, root)
    run, dataset = args.run, None
    if data is not None:
        try:
            dataset = find_dataset(data)
        except DataError as err:  # checked before any run folder: the real problem, not a folder clash
            raise UsageError(f"data: {err}") from None
        print(f"data: {data}\n{dataset.describe()}", flush=True)
        if run is None:
            run = default_run_name(args.profile, dataset)
            print(f"run: {run} (named after the profile and the dataset; --run NAME chooses another)", flush=True)
    run = run or args.profile
    check_run_name(run, root)
    return CommonOptions(profile=args.profile, run=run, cwd=cwd, data=None if data is None else str(data),
                         dataset=dataset, weights=None if weights is None else str(weights), sets=sets)


def check_run_name(run: str, root: Path | None = None) -> None:
    try:
        run_dir(run, root)
    except ValueError as err:
        raise UsageError(f"--run: {err}") from None


def default_run_name(profile: str, dataset: Dataset) -> str:
    """`<profile>-<dataset name>`: the dataset named by the folder that holds all its splits
    (Kaggle's dataset folder, the folder the archives were unzipped into)."""
    folders = [str(folder) for folder in dataset.split_dirs.values()]
    common = Path(os.path.commonpath(folders)) if folders else Path(dataset.root)
    if str(common) in folders:  # a single split: name it by the folder above
        common = common.parent
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", common.name or "data").strip("-.")[:40] or "data"
    return f"{profile}-{name}"


# ----------------------------------------------------------------------------- --set values


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
            raise UsageError(f"--set {item!r}: expected NAME=VALUE, e.g. --set epochs=1 or --set 'image_size=[512, 512]'")
        if name in RESERVED:
            raise UsageError(f"--set {name}=...: use the option {RESERVED[name]} instead")
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
