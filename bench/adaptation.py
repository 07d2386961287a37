"""Does the student gain on the new desert from its unlabelled images? Measured on the demo, over seeds.

For each seed, the demo student is distilled twice from the same trained teachers and ensemble:
without adaptation (notebook 05 as it is) and with the demo desert's unlabelled `adapt` images
(the novel desert, never the test images) in the soft term where the ensemble is confident, the
threshold chosen from the confidence table on val (`adaptation.confidence_rule`). Each student
(best.pt, chosen by val mIoU, no TTA) is scored at the masks' native size on

- val: the training desert (what adapting costs there),
- novel_val: the held-out labelled novel images notebook 05 decides on,
- test: the novel test split notebook 06 scores,

per class. Nothing here is run by the tests: a run takes minutes per student on a CPU.

    PYTHONPATH=lib python bench/adaptation.py --source outputs/demo [--seeds 0 1] [--min-accuracy 0.95]

`--source` is a run folder with the demo's trained teachers and ensemble.json (notebooks 01-04
of `./run_all.sh`); its teachers are copied into scratch run folders outputs/bench-adapt-*/ (removed
afterwards unless --keep), its own files are not touched. The data is this checkout's
data/demo_desert (generated, with the adaptation splits, when missing).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save_results  # noqa: E402

from offroadseg import adaptation, augment, pipeline, synth, training  # noqa: E402
from offroadseg.adaptation import confidence_lines, confidence_table  # noqa: E402
from offroadseg.checkpoints import load_model  # noqa: E402
from offroadseg.classes import CLASS_NAMES  # noqa: E402
from offroadseg.dataset import SegmentationDataset  # noqa: E402
from offroadseg.profiles import DEMO  # noqa: E402
from offroadseg.runs import ENSEMBLE_MEMBERS, project_root, read_ensemble, run_dir  # noqa: E402
from offroadseg.scan import load_or_scan, usable_pairs  # noqa: E402


def scratch_run(source: Path, name: str, data_root: Path) -> pipeline.Context:
    """A run folder holding the source's teachers and ensemble.json and a scan of this checkout's desert."""
    run = run_dir(name)
    if run.dir.exists():
        shutil.rmtree(run.dir)
    for role in ENSEMBLE_MEMBERS:
        (run.model_dir(role)).mkdir(parents=True)
        shutil.copy2(source / "models" / role / "best.pt", run.model_dir(role) / "best.pt")
    shutil.copy2(source / "ensemble.json", run.ensemble)
    load_or_scan(data_root, run.scan, progress=False)
    return pipeline.Context(step="05_distill", run=run, profile=DEMO, data_root=data_root, parameters={})


def per_class(result: dict) -> dict:
    return {name: (None if value is None else round(value, 4)) for name, value in result["per_class_iou"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="outputs/demo", help="run folder with the trained teachers (01-04)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--min-accuracy", type=float, default=training.MIN_KEPT_ACCURACY)
    parser.add_argument("--threshold", type=float, default=None, help="override the threshold the table chooses")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the demo profile's)")
    parser.add_argument("--adapted-only", action="store_true",
                        help="only the adapted students (e.g. another --threshold against an earlier run's plain ones)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch run folders")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    source = Path(args.source).resolve()
    data_root = project_root() / pipeline.DEMO_DATA
    synth.make_demo_desert(data_root, progress=False)
    plan = training.model_plan(DEMO, "student", epochs=args.epochs)
    rows, rule, names, novel_table = [], None, [], None
    for seed in args.seeds:
        for adapted in (True,) if args.adapted_only else (True, False):  # the new path first: a fault shows early
            name = f"bench-adapt-s{seed}-{'on' if adapted else 'off'}"
            names.append(name)
            ctx = scratch_run(source, name, data_root)
            scan = load_or_scan(data_root, ctx.run.scan, progress=False)
            if rule is None:
                rule = adaptation.confidence_rule(ctx, scan, args.min_accuracy)
                if args.threshold is not None:
                    rule["threshold"] = args.threshold
                print(confidence_lines(rule["table"], rule["threshold"]), flush=True)
                # The same table on the held-out novel images, for the record only (the rule never reads it):
                # how much less often the ensemble is right at the same confidence in the new desert.
                ensemble = training.fuse(training.load_teachers(ctx), read_ensemble(ctx.run))
                holdout = SegmentationDataset(adaptation.adaptation_holdout(ctx, "demo"),
                                              augment.eval_transform(DEMO.image_size))
                novel_table = confidence_table(ensemble, training.loader(holdout, 8))
                print("on the held-out novel images:\n" + confidence_lines(novel_table, rule["threshold"]), flush=True)
            images = adaptation.adaptation_images(ctx, "demo") if adapted else []
            config = training.train_config(DEMO, plan, seed=seed)
            started = time.perf_counter()
            training.train_student(ctx, scan, plan, config, progress=False, adapt_images=images,
                                   confidence_threshold=rule["threshold"] if adapted else None)
            seconds = time.perf_counter() - started
            student = load_model(ctx.run.model_dir("student") / "best.pt")
            splits = {"val": usable_pairs(scan, "val"), "test": usable_pairs(scan, "test"),
                      "novel_val": adaptation.adaptation_holdout(ctx, "demo")}
            row = {"seed": seed, "adapted": adapted, "threshold": rule["threshold"] if adapted else None,
                   "adapt_images": len(images), "train_seconds": round(seconds, 1)}
            for split, pairs in splits.items():
                result = training.score_pairs({"student": student}, pairs, DEMO.image_size)["student"]
                row[f"{split}_miou"] = round(result["miou"], 4)
                row[f"{split}_per_class"] = per_class(result)
            rows.append(row)
            print(f"seed {seed} adapted {adapted}: val {row['val_miou']:.3f}  novel_val {row['novel_val_miou']:.3f}  "
                  f"test {row['test_miou']:.3f}  ({seconds:.0f} s)", flush=True)
    print("\nper class, test split (novel desert):")
    print(f"{'class':<15}" + "".join(f"  s{r['seed']}-{'on ' if r['adapted'] else 'off'}" for r in rows))
    for name in CLASS_NAMES:
        print(f"{name:<15}" + "".join(f"  {_f(r['test_per_class'][name]):>7}" for r in rows))
    path = save_results("adaptation", rows, out=args.out, source=str(source), min_accuracy=args.min_accuracy,
                        confidence_table=rule["table"], novel_confidence_table=novel_table, threshold=rule["threshold"],
                        command=" ".join(["python bench/adaptation.py", *sys.argv[1:]]))
    print(f"\nwritten: {path}")
    if not args.keep:
        for name in names:
            shutil.rmtree(run_dir(name).dir, ignore_errors=True)


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
