"""What each inference-time trick and each way of adapting gives the demo's student, over seeds.

On run folders that bench/demo_seeds.py left (one per seed, models trained, their last epochs kept),
the distilled student is scored at the masks' native size on val (the training desert), test and
novel_val (the new desert) as it is and with each trick of issue 25 (EMA, a training option, is
scored by fit itself beside the raw weights: history.json's raw_val_miou and ema_val_miou):

  plain            the frame resized to the model input (what predict does without TTA)
  tta_h            the flips notebook 04 chose (h): what notebook 06's student_tta row is
  tta_ms           multi-scale TTA: scales 0.75, 1, 1.25, each with those flips
  slide_s<S>       slide inference (`ensemble.SlidingWindow`): the frame scaled by S, windows of the
                   model input overlapping by 1/3 (S = 1: native resolution)
  avg<K>           the average of the last K epochs' weights (`averaging.average_checkpoints`)

and the adapted student in three forms (one model for both deserts, issue 25 item 6), from its
fine-tuned weights (models/student_adapted/last.pt, before notebook 05's BatchNorm step):

  adapt_finetune   the fine-tune alone
  adapt_bn_new     BatchNorm statistics re-estimated on the new desert's images (what notebook 05 does)
  adapt_bn_both    re-estimated on those images and as many training images (both deserts)

Each row also gives the milliseconds of one 960x540 frame through `evaluate.predict_labels` on
this machine (median of 3). Rows go to bench/results/demo_tricks.json; a table of means and
spreads over the runs is printed.

    PYTHONPATH=lib python bench/demo_tricks.py --runs seeds-demo-s0 seeds-demo-s1 seeds-demo-s2
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np  # noqa: E402
from common import save_results  # noqa: E402

from offroadseg import augment  # noqa: E402
from offroadseg.adaptation import recalibrate_batchnorm  # noqa: E402
from offroadseg.averaging import average_checkpoints, kept_epochs  # noqa: E402
from offroadseg.chapters import new_desert  # noqa: E402
from offroadseg.chapters.context import Context  # noqa: E402
from offroadseg.checkpoints import load_model  # noqa: E402
from offroadseg.data import (
    folder_pairs,  # noqa: E402
    read_image,  # noqa: E402
)
from offroadseg.dataset import SegmentationDataset, eval_loader  # noqa: E402
from offroadseg.ensemble import SlidingWindow, TestTimeAugmentation  # noqa: E402
from offroadseg.evaluate import evaluate_model, predict_labels  # noqa: E402
from offroadseg.profiles import DEMO  # noqa: E402
from offroadseg.runs import ADAPTED_STUDENT, read_ensemble, run_dir  # noqa: E402
from offroadseg.scan import read_scan, usable_pairs  # noqa: E402
from offroadseg.synth import split_folder  # noqa: E402

SLIDE_SCALES = (1.0, 0.5)
MULTI_SCALES = (0.75, 1.0, 1.25)


def score(predictor, pairs, size, batch_size: int = 4) -> float:
    """mIoU at the masks' native size; `size` None feeds the frames at their own resolution (slide)."""
    dataset = SegmentationDataset(pairs, augment.eval_transform(size, keep_mask_size=True))
    return round(evaluate_model(predictor, eval_loader(dataset, batch_size))["miou"], 4)


def frame_ms(model, frame, size, **options) -> float:
    """Milliseconds of one frame through the prediction path (median of 3, after one warm-up)."""
    predict_labels(model, [frame], size, **options)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        predict_labels(model, [frame], size, **options)
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 1)


def run_rows(name: str, average: tuple[int, ...]) -> list[dict]:
    run = run_dir(name)
    scan = read_scan(run.require("scan.json"))
    size = DEMO.image_size
    flips = tuple(read_ensemble(run)["tta"]["flips"])
    ctx = Context(step="bench", run=run, profile=DEMO, data_root=Path(run.read_manifest()["data_root"]), parameters={})
    splits = {"val": usable_pairs(scan, "val"), "test": usable_pairs(scan, "test"),
              "novel_val": new_desert.adaptation_holdout(ctx, "demo")}
    frame = read_image(splits["val"][0][0])
    student = load_model(run.require(run.checkpoint("student")))
    variants = {
        "plain": (student, size, {}),
        "tta_h": (TestTimeAugmentation(student, flips=flips), size, {"flips": flips}),
        "tta_ms": (TestTimeAugmentation(student, flips=flips, scales=MULTI_SCALES), size,
                   {"flips": flips, "scales": MULTI_SCALES}),
    }
    for scale in SLIDE_SCALES:
        variants[f"slide_s{scale:g}"] = (SlidingWindow(student, size, 1 / 3, scale=scale), None, "slide")
    with tempfile.TemporaryDirectory() as scratch:
        for k in average:
            kept = kept_epochs(run.model_dir("student"))
            if len(kept) >= k:
                path = Path(scratch) / f"avg{k}.pt"
                average_checkpoints(kept[-k:], path)
                variants[f"avg{k}"] = (load_model(path), size, {})
        finetuned = run.checkpoint(ADAPTED_STUDENT, "last")
        if finetuned.exists():
            adapt_images = [image for image, _ in folder_pairs(split_folder(ctx.data_root, "adapt"))]
            train_images = [image for image, _ in usable_pairs(scan, "train")]
            both = adapt_images + random.Random(0).sample(train_images, len(adapt_images))
            for variant, images in (("adapt_finetune", None), ("adapt_bn_new", adapt_images), ("adapt_bn_both", both)):
                model = load_model(finetuned)
                if images:
                    recalibrate_batchnorm(model, images, size)
                variants[variant] = (model, size, {})
        rows = []
        for variant, (predictor, feed, options) in variants.items():
            row = {"run": name, "variant": variant}
            for split, pairs in splits.items():
                row[split] = score(predictor, pairs, feed)
            if options == "slide":
                row["ms_per_frame"] = frame_ms(student, frame, size, slide=1 / 3) if predictor.scale == 1.0 else \
                    frame_ms(predictor, frame, frame.shape[:2])
            else:
                model = predictor.model if isinstance(predictor, TestTimeAugmentation) else predictor
                row["ms_per_frame"] = frame_ms(model, frame, size, **options)
            print(row, flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    lines = [f"{'variant':<16}" + "".join(f"{split:>22}" for split in ("val", "test", "novel_val")) + f"{'ms/frame':>10}"]
    for variant in variants:
        picked = [row for row in rows if row["variant"] == variant]
        cells = []
        for split in ("val", "test", "novel_val"):
            values = [row[split] for row in picked]
            cells.append(f"{np.mean(values):>8.3f} ({min(values):.3f}-{max(values):.3f})")
        ms = statistics.median(row["ms_per_frame"] for row in picked)
        lines.append(f"{variant:<16}" + "".join(f"{cell:>22}" for cell in cells) + f"{ms:>10.0f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run folders under outputs/ (bench/demo_seeds.py's)")
    parser.add_argument("--average", type=int, nargs="*", default=[2, 3], help="K of the avg<K> variants")
    parser.add_argument("--name", default="demo_tricks", help="results file name")
    args = parser.parse_args(argv)
    rows = []
    for name in args.runs:
        rows.extend(run_rows(name, tuple(args.average)))
        path = save_results(args.name, rows, runs=args.runs)
    print("\n".join(table(rows)))
    print(f"rows: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
