"""Scan speed: offroadseg.scan against a naive single-process loop, on the same masks.

The naive loop is what starter code does (and what the reference report timed at
7.87 masks/s): open each mask with PIL, then one full-array comparison per class.
Ours checks each pair (image header and end marker, mask decode, size match),
counts every raw value in one pass and uses all cores.

    python bench/scan.py [--data data/demo_desert] [--repeat 3]
    python bench/scan.py --quick      # smoke run: a tiny generated desert, 1 repetition (seconds)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import demo_data, save_results, table  # noqa: E402

from offroadseg.classes import RAW_IDS  # noqa: E402
from offroadseg.data import find_dataset  # noqa: E402
from offroadseg.scan import scan_dataset  # noqa: E402

DEFAULT_DATA = "data/demo_desert"


def naive_scan(mask_paths) -> np.ndarray:
    counts = np.zeros(len(RAW_IDS), dtype=np.int64)
    for path in mask_paths:
        mask = np.array(Image.open(path))
        for i, raw_id in enumerate(RAW_IDS):
            counts[i] += int((mask == raw_id).sum())
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help="dataset root (made with the demo desert if missing)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions; the best is reported")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON results path (default bench/results/scan.json)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a tiny generated desert in a temporary folder (unless --data is given), 1 repetition")
    args = parser.parse_args(argv)

    if args.quick:
        with demo_data(args.data if args.data != DEFAULT_DATA else None, quick=True) as root:
            run(args, root, repeat=1)
        return
    root = Path(args.data)
    if not root.exists():
        from offroadseg.synth import make_demo_desert

        make_demo_desert(root)
    run(args, root, args.repeat)


def run(args, root: Path, repeat: int) -> None:
    dataset = find_dataset(root)
    masks = [m for split in ("train", "val", "test") for _, m in (getattr(dataset, split) or []) if m is not None]
    size = Image.open(masks[0]).size

    naive_best = ours_best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        naive_counts = naive_scan(masks)
        naive_best = min(naive_best, time.perf_counter() - started)
        started = time.perf_counter()
        result = scan_dataset(dataset, workers=args.workers, progress=False)
        ours_best = min(ours_best, time.perf_counter() - started)
    ours_counts = np.sum([result["splits"][s]["class_pixels"] for s in ("train", "val", "test")], axis=0)
    assert np.array_equal(naive_counts, ours_counts), "the two scans disagree on class pixel counts"

    rows = [
        {"method": "naive loop (PIL + 10 comparisons, 1 process)", "masks": len(masks), "seconds": naive_best,
         "masks_per_s": len(masks) / naive_best},
        {"method": f"offroadseg.scan ({args.workers or 'all'} cores, checks included)", "masks": len(masks),
         "seconds": ours_best, "masks_per_s": len(masks) / ours_best},
    ]
    speedup = naive_best / ours_best
    print(f"masks: {len(masks)} at {size[0]}x{size[1]}, best of {repeat}")
    print(table(rows, ["method", "masks", "seconds", "masks_per_s"]))
    print(f"speed-up: {speedup:.1f}x   (reference report: 7.87 masks/s)")
    path = save_results("scan", rows, args.out, mask_size=list(size), speedup=speedup, repeat=repeat,
                        data="quick tiny desert" if args.quick and args.data == DEFAULT_DATA else str(root),
                        workers=args.workers, quick=args.quick)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
