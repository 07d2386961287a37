"""The whole demo pipeline over several seeds, with optional changes, and the quality it gives.

Each seed runs what notebooks 01-05 run, through the same chapter functions and without
papermill, into its own run folder outputs/seeds-<variant>-s<seed>/ (kept: inference-time options
are then scored on it with bench/demo_tricks.py): the scan, both teachers, notebook 04's weight, TTA
choice and ensemble.json, the distilled student and the adapted student. Then every model is
scored at the masks' native size: val (the training desert), novel_val (the held-out labelled
images of the new desert the adapted student chose its epoch on) and test (the new desert's test
split, never trained or chosen on). Seconds per step are recorded too. Nothing here runs in the
tests: a seed takes about 10 minutes on a 2-core CPU.

    PYTHONPATH=lib python bench/demo_seeds.py --seeds 0 1 2                       # the demo as it is
    PYTHONPATH=lib python bench/demo_seeds.py --seeds 0 1 2 --variant short \\
        --set segformer.epochs=4 --set student.epochs=2                          # a changed demo

`--reuse VARIANT` (and `--reuse-student`) starts each seed from an earlier variant's teachers (and
student) instead of training them again, for a change of the student or the adaptation alone:

    PYTHONPATH=lib python bench/demo_seeds.py --variant student2 --reuse demo \
        --set segformer.keep_epochs=3 --set deeplab.keep_epochs=3 --set student.epochs=2

`--set PART.FIELD=VALUE` changes the demo profile: PART is segformer, deeplab or student (a
ModelPlan field: epochs, lr, batch_size, ...), distill or adapt (a DistillConfig / AdaptConfig
field), train (a TrainConfig field for every model, e.g. train.ema=0.999) or profile (a Profile
field, e.g. profile.image_size=[128,224]). Rows go to bench/results/demo_seeds-<variant>.json
(one per seed, written as each seed finishes) and the table of means and spreads is printed.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import statistics
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save_results  # noqa: E402

from offroadseg.chapters import assembly, context, distillation, fusion, new_desert, teachers  # noqa: E402
from offroadseg.checkpoints import load_model  # noqa: E402
from offroadseg.dataset import eval_loader  # noqa: E402
from offroadseg.ensemble import Ensemble, TestTimeAugmentation, choose_weight  # noqa: E402
from offroadseg.evaluate import choose_tta, evaluate_model  # noqa: E402
from offroadseg.profiles import DEMO, Profile  # noqa: E402
from offroadseg.runs import ADAPTED_STUDENT, run_dir, write_ensemble  # noqa: E402
from offroadseg.scan import load_or_scan, usable_pairs  # noqa: E402

PARTS = ("segformer", "deeplab", "student", "distill", "adapt", "train", "profile")


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def changed_profile(sets: list[str], seed: int) -> tuple[Profile, dict]:
    """The demo profile with the --set changes and `seed`, and the TrainConfig changes (train.*)."""
    profile, train = DEMO.with_overrides(seed=seed), {}
    for item in sets:
        key, _, text = item.partition("=")
        part, _, name = key.partition(".")
        if part not in PARTS or not name:
            raise SystemExit(f"--set {item}: expected PART.FIELD=VALUE with PART one of {', '.join(PARTS)}")
        value = parse_value(text)
        if part == "train":
            train[name] = value
        elif part == "profile":
            profile = profile.with_overrides(**{name: tuple(value) if isinstance(value, list) else value})
        else:
            current = getattr(profile, part)
            if name not in {f.name for f in fields(current)}:
                raise SystemExit(f"--set {item}: {type(current).__name__} has no field {name!r}")
            profile = profile.with_overrides(**{part: replace(current, **{name: value})})
    return profile, train


def start(run: str, step: str, profile: Profile) -> context.Context:
    ctx = context.start(step, run=run, profile="demo")
    ctx.profile = profile  # the seed and the changes: context.start knows the named profiles only
    return ctx


def config_of(profile: Profile, plan, train: dict):
    return replace(assembly.train_config(profile, plan), **train)


REUSE_PARTS = ("scan.json", "cache", "models/segformer", "models/deeplab")


def reuse_run(source: str, run: str, student: bool = False, root: Path | None = None) -> None:
    """Start run folder `run` from `source`'s scan, decode cache and teachers (and distilled student with
    `student`), hard-linked (fit writes new files by rename, never into these): training them again
    finds them finished. For a change that starts after them; its `--set`s must keep their settings."""
    source_dir, target_dir = run_dir(source, root).dir, run_dir(run, root).dir
    if target_dir.exists():
        raise SystemExit(f"{target_dir} exists: remove it, or choose another --variant")
    for part in REUSE_PARTS + (("models/student",) if student else ()):
        path = source_dir / part
        if not path.exists():
            raise SystemExit(f"--reuse: {path} is missing")
        if path.is_dir():
            shutil.copytree(path, target_dir / part, copy_function=os.link)
        else:
            (target_dir / part).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target_dir / part)


def run_seed(seed: int, variant: str, sets: list[str], reuse: str | None = None, reuse_student: bool = False) -> dict:
    profile, train = changed_profile(sets, seed)
    run = f"seeds-{variant}-s{seed}"
    if reuse:
        reuse_run(f"seeds-{reuse}-s{seed}", run, student=reuse_student)
    seconds = {}

    def timed(name, fn, *args, **kwargs):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds[name] = round(time.perf_counter() - started, 1)
        return result

    ctx = start(run, "01_data_scan", profile)
    scan = timed("scan", load_or_scan, ctx.data_root, ctx.run.scan, progress=False)
    for role in ("segformer", "deeplab"):
        ctx = start(run, teachers.STEPS[role], profile)
        plan = getattr(profile, role)
        timed(role, teachers.train_teacher, ctx, role, scan, plan, config_of(profile, plan, train), progress=False)

    ctx = start(run, "04_ensemble", profile)
    members = assembly.load_teachers(ctx)
    loader = eval_loader(assembly.val_dataset(scan, profile.image_size), 8)

    def fuse_teachers():
        weight, grid = choose_weight(members["segformer"], members["deeplab"], loader)
        ensemble = Ensemble([members["segformer"], members["deeplab"]], [weight, 1 - weight])
        flips, table = choose_tta(ensemble, loader)
        results = fusion.val_scores({**members, "ensemble": ensemble,
                                     "ensemble_tta": TestTimeAugmentation(ensemble, flips=flips)},
                                    loader, profile.image_size, progress=False, scored=fusion.scored_by_tta(table, flips))
        write_ensemble(ctx.run, weight, grid, flips, None, table, profile.image_size, results)
        return weight, flips

    weight, flips = timed("ensemble", fuse_teachers)

    ctx = start(run, distillation.STEP, profile)
    plan = profile.student
    config = config_of(profile, plan, train)
    timed("student", distillation.train_student, ctx, scan, plan, config, profile.distill, progress=False)
    adapted = timed("adapt", new_desert.adapt_student, ctx, scan, plan, config, profile.distill, profile.adapt)

    models = assembly.evaluation_models(ctx)
    if adapted is not None:
        models[ADAPTED_STUDENT] = load_model(ctx.run.checkpoint(ADAPTED_STUDENT))
    native = eval_loader(assembly.val_dataset(scan, profile.image_size, native_masks=True), 4)
    row = {"seed": seed, "variant": variant, "sets": sets, "weight": weight, "flips": list(flips), "seconds": seconds,
           "val": {name: round(evaluate_model(model, native)["miou"], 4) for name, model in models.items()}}
    novel = {"novel_val": new_desert.adaptation_holdout(ctx, "demo"), "test": usable_pairs(scan, "test")}
    students = {name: models[name] for name in ("student", ADAPTED_STUDENT) if name in models}
    for split, pairs in novel.items():
        row[split] = {name: round(result["miou"], 4)
                      for name, result in assembly.score_pairs(students, pairs, profile.image_size, 4).items()}
    row["share"] = round(row["val"]["student"] / row["val"]["ensemble"], 4)
    if ADAPTED_STUDENT in models:
        row["adapted_gain"] = {split: round(row[split][ADAPTED_STUDENT] - row[split]["student"], 4) for split in novel}
        row["adapted_keeps"] = round(row["val"][ADAPTED_STUDENT] / row["val"]["student"], 4)
    return row


def summary(rows: list[dict]) -> list[str]:
    """Mean and spread (min-max) over the seeds of each figure."""
    figures = {}
    for row in rows:
        for group in ("val", "novel_val", "test", "adapted_gain"):
            for name, value in (row.get(group) or {}).items():
                figures.setdefault(f"{group}.{name}", []).append(value)
        for name in ("share", "adapted_keeps"):
            if name in row:
                figures.setdefault(name, []).append(row[name])
        for name, value in row["seconds"].items():
            figures.setdefault(f"seconds.{name}", []).append(value)
    lines = [f"{'figure':<28}{'mean':>9}{'min':>9}{'max':>9}  per seed"]
    for name, values in figures.items():
        lines.append(f"{name:<28}{statistics.mean(values):>9.3f}{min(values):>9.3f}{max(values):>9.3f}  "
                     + " ".join(f"{v:.3f}" for v in values))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", default="demo", help="a name for the change (run folders and results file)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="PART.FIELD=VALUE")
    parser.add_argument("--reuse", metavar="VARIANT", help="start each seed from that variant's scan and teachers "
                        "(outputs/seeds-VARIANT-s<seed>/), for a change after them; keep their --sets")
    parser.add_argument("--reuse-student", action="store_true", help="with --reuse: its distilled student too")
    args = parser.parse_args(argv)
    if args.reuse_student and not args.reuse:
        parser.error("--reuse-student needs --reuse VARIANT (whose student to start from)")
    changed_profile(args.sets, 0)  # a bad --set stops here, before any training
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args.variant, args.sets, args.reuse, args.reuse_student))
        path = save_results(f"demo_seeds-{args.variant}", rows, variant=args.variant, sets=args.sets, seeds=args.seeds)
        print(f"seed {seed} done: {rows[-1]}", flush=True)
    print("\n".join(summary(rows)))
    print(f"rows: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
