"""Does the student gain on the new desert from its unlabelled images? Measured on the demo, over seeds.

For each seed, from the same trained teachers and ensemble (a source run's), each student scored
as trained ("distilled only") and after its BatchNorm statistics are re-estimated on the demo
desert's 48 unlabelled `adapt` images (`adaptation.recalibrate_checkpoint`):

- plain: the demo student, distilled as notebook 05 does (seeded with the seed); "+bn" is
  adaptation by the statistics alone,
- adapted: the plain one fine-tuned as notebook 05's adaptation does (`new_desert.adapted_plan`,
  `adapted_config`: train set plus the unlabelled images in the soft term where the ensemble is
  confident, the threshold chosen on val; best epoch chosen on `novel_val`); "adapted+bn" is
  what notebook 05 writes to models/student_adapted/,
- control: the same fine-tune without the unlabelled images, so that a gain that is only the
  extra epochs shows as a gain of "control" too.

Each (best.pt, no TTA) is scored at the masks' native size on val (the training desert: what
adapting costs there), novel_val (the held-out labelled novel images notebook 05 decides on; the
fine-tunes chose their epoch on it, so it leans their way) and test (the novel test split
notebook 06 scores: the unbiased figure), per class. Nothing here is run by the tests: a seed
takes about 6 minutes on a 2-core CPU.

    PYTHONPATH=lib python bench/adaptation.py --source outputs/demo [--seeds 0 1 2] [--epochs N]

`--source` is a run folder with the demo's trained teachers and ensemble.json (notebooks 01-04
of `./run_all.sh`); its teachers are copied into scratch run folders outputs/bench-adapt-s*/ (removed
afterwards unless --keep), its own files are not touched. The data is this checkout's
data/demo_desert (generated, with the adaptation splits, when missing).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save_results  # noqa: E402

from offroadseg import adaptation, augment, synth  # noqa: E402
from offroadseg.adaptation import confidence_lines, confidence_table  # noqa: E402
from offroadseg.chapters import assembly, context, distillation, new_desert  # noqa: E402
from offroadseg.checkpoints import best_row, load_model  # noqa: E402
from offroadseg.classes import CLASS_NAMES  # noqa: E402
from offroadseg.dataset import SegmentationDataset, eval_loader  # noqa: E402
from offroadseg.files import read_json  # noqa: E402
from offroadseg.profiles import DEMO  # noqa: E402
from offroadseg.runs import ADAPTED_STUDENT, ENSEMBLE_MEMBERS, project_root, read_ensemble, run_dir  # noqa: E402
from offroadseg.scan import load_or_scan, usable_pairs  # noqa: E402

CONTROL = "student_control"  # the fine-tune without the unlabelled images


def scratch_run(source: Path, name: str, data_root: Path) -> context.Context:
    """A run folder holding the source's teachers and ensemble.json and a scan of this checkout's desert."""
    run = run_dir(name)
    if run.dir.exists():
        shutil.rmtree(run.dir)
    for role in ENSEMBLE_MEMBERS:
        (run.model_dir(role)).mkdir(parents=True)
        shutil.copy2(source / "models" / role / "best.pt", run.model_dir(role) / "best.pt")
    shutil.copy2(source / "ensemble.json", run.ensemble)
    load_or_scan(data_root, run.scan, progress=False)
    return context.Context(step="05_distill", run=run, profile=DEMO, data_root=data_root, parameters={})


def per_class(result: dict) -> dict:
    return {name: (None if value is None else round(value, 4)) for name, value in result["per_class_iou"].items()}


def scores_row(ctx, scan, role: str, seed: int, variant: str, seconds: float, checkpoint: str = "best.pt") -> dict:
    """The student of models/<role>/<checkpoint> scored on val, novel_val and test at native mask size."""
    student = load_model(ctx.run.model_dir(role) / checkpoint)
    history = read_json(ctx.run.model_dir(role) / "history.json")
    best = best_row(history)
    row = {"seed": seed, "variant": variant, "train_seconds": round(seconds, 1), "epochs": len(history),
           "best_epoch": best["epoch"]}
    splits = {"val": usable_pairs(scan, "val"), "novel_val": new_desert.adaptation_holdout(ctx, "demo"),
              "test": usable_pairs(scan, "test")}
    for split, pairs in splits.items():
        result = assembly.score_pairs({"student": student}, pairs, DEMO.image_size)["student"]
        row[f"{split}_miou"] = round(result["miou"], 4)
        row[f"{split}_per_class"] = per_class(result)
    print(f"seed {seed} {variant:<10}: val {row['val_miou']:.3f}  novel_val {row['novel_val_miou']:.3f}  "
          f"test {row['test_miou']:.3f}  ({seconds:.0f} s, best epoch {best['epoch']})", flush=True)
    return row


def with_batchnorm(ctx, scan, role: str, seed: int, variant: str, seconds: float, images) -> list[dict]:
    """The rows of models/<role>/ as trained and with its BatchNorm statistics re-estimated on `images`
    (a copy, best_bn.pt: the plain student's own best.pt stays what the fine-tunes start from)."""
    rows = [scores_row(ctx, scan, role, seed, variant, seconds)]
    folder = ctx.run.model_dir(role)
    shutil.copy2(folder / "best.pt", folder / "best_bn.pt")
    started = time.perf_counter()
    adaptation.recalibrate_checkpoint(folder / "best_bn.pt", images, DEMO.image_size)
    rows.append(scores_row(ctx, scan, role, seed, f"{variant}+bn", seconds + time.perf_counter() - started,
                           checkpoint="best_bn.pt"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="outputs/demo", help="run folder with the trained teachers (01-04)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--min-accuracy", type=float, default=DEMO.adapt.min_accuracy)
    parser.add_argument("--threshold", type=float, default=None, help="override the threshold the table chooses")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tune epochs (default: notebook 05's adapt_epochs)")
    parser.add_argument("--no-control", action="store_true", help="skip the fine-tune without the unlabelled images")
    parser.add_argument("--keep", action="store_true", help="keep the scratch run folders")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    source = Path(args.source).resolve()
    data_root = project_root() / context.DEMO_DATA
    synth.make_demo_desert(data_root, progress=False)
    plan = assembly.model_plan(DEMO, "student")
    tuned = new_desert.adapted_plan(plan, replace(DEMO.adapt, epochs=args.epochs))
    rows, rule, names, novel_table = [], None, [], None
    for seed in args.seeds:
        name = f"bench-adapt-s{seed}"
        names.append(name)
        ctx = scratch_run(source, name, data_root)
        scan = load_or_scan(data_root, ctx.run.scan, progress=False)
        holdout = new_desert.adaptation_holdout(ctx, "demo")
        if rule is None:
            rule = new_desert.confidence_rule(ctx, scan, args.min_accuracy)
            if args.threshold is not None:
                rule["threshold"] = args.threshold
            print(confidence_lines(rule["table"], rule["threshold"]), flush=True)
            # The same table on the held-out novel images, for the record only (the rule never reads it):
            # how much less often the ensemble is right at the same confidence in the new desert.
            ensemble = assembly.fuse(assembly.load_teachers(ctx), read_ensemble(ctx.run))
            novel = SegmentationDataset(holdout, augment.eval_transform(DEMO.image_size))
            novel_table = confidence_table(ensemble, eval_loader(novel, 8))
            print("on the held-out novel images:\n" + confidence_lines(novel_table, rule["threshold"]), flush=True)
        config = assembly.train_config(DEMO, plan, seed=seed)
        tuned_config = new_desert.adapted_config(config, tuned, DEMO.adapt)
        images = new_desert.adaptation_images(ctx, "demo")
        started = time.perf_counter()
        distillation.train_student(ctx, scan, plan, config, DEMO.distill, progress=False)
        rows += with_batchnorm(ctx, scan, "student", seed, "plain", time.perf_counter() - started, images)
        started = time.perf_counter()
        new_desert.train_adapted_student(ctx, scan, tuned, tuned_config, DEMO.distill, images, rule["threshold"],
                                         holdout)
        rows += with_batchnorm(ctx, scan, ADAPTED_STUDENT, seed, "adapted", time.perf_counter() - started,
                               images)
        if not args.no_control:
            started = time.perf_counter()
            distillation.train_student(ctx, scan, tuned, tuned_config, DEMO.distill, progress=False, role=CONTROL, val_pairs=holdout)
            rows += with_batchnorm(ctx, scan, CONTROL, seed, "control", time.perf_counter() - started, images)
    summary = summarise(rows)
    print("\nper class, test split (novel desert):")
    print(f"{'class':<15}" + "".join(f"  s{r['seed']}-{r['variant'][:7]:<7}" for r in rows))
    for name in CLASS_NAMES:
        print(f"{name:<15}" + "".join(f"  {_f(r['test_per_class'][name]):>10}" for r in rows))
    print("\nmean over seeds, minus plain:")
    for variant, gains in summary.items():
        print(f"  {variant:<10}" + "  ".join(f"{split} {gain:+.3f}" for split, gain in gains.items()))
    path = save_results("adaptation", rows, out=args.out, source=str(source), min_accuracy=args.min_accuracy,
                        confidence_table=rule["table"], novel_confidence_table=novel_table, threshold=rule["threshold"],
                        fine_tune_epochs=tuned.epochs, mean_gain_over_plain=summary,
                        command=" ".join(["python bench/adaptation.py", *sys.argv[1:]]))
    print(f"\nwritten: {path}")
    if not args.keep:
        for name in names:
            shutil.rmtree(run_dir(name).dir, ignore_errors=True)


def summarise(rows: list[dict]) -> dict:
    """Mean over seeds of each fine-tune's mIoU minus the plain student's of the same seed, per split."""
    plain = {row["seed"]: row for row in rows if row["variant"] == "plain"}
    out = {}
    for variant in ("plain+bn", "adapted", "adapted+bn", "control", "control+bn"):
        tuned = [row for row in rows if row["variant"] == variant]
        if tuned:
            out[variant] = {split: round(sum(row[f"{split}_miou"] - plain[row["seed"]][f"{split}_miou"]
                                             for row in tuned) / len(tuned), 4)
                            for split in ("val", "novel_val", "test")}
    return out


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
