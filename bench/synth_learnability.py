"""Is the demo desert learnable, and is colour alone not enough? Both, measured.

The demo trains SegFormer-B0 and a DeepLabV3+ from scratch on CPU for about two
minutes each at 1/3 scale and expects val mIoU >= 0.45. This script is the
generator's own check of that promise, with a stand-in: a tiny 4-level U-Net
(about 0.5M parameters), trained from scratch for --seconds on --threads CPU
threads, on images downscaled to 320x180, with class-weighted cross-entropy.
It prints val (and novel-desert test) IoU per class next to the colour baseline:
a per-pixel nearest-class-mean-RGB classifier fitted on train, which must stay
below 0.35 val mIoU for the task to need texture, shape and context.

    python bench/synth_learnability.py [--data DIR] [--seconds 120] [--threads 2] [--steps N]

Without --data the demo desert (make_demo_desert, DEMO_COUNTS) is generated into a
temporary folder; the generation time is printed too. On a machine shared with other
work a wall-clock budget buys fewer steps; --steps N makes runs comparable (an idle
2-core machine does about 170 steps of batch 8 in 120 s).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import save_results, table  # noqa: E402

from offroadseg.classes import CLASS_NAMES, NUM_CLASSES  # noqa: E402
from offroadseg.data import find_dataset, read_image, read_mask  # noqa: E402
from offroadseg.synth import make_demo_desert  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def load_split(pairs, size):
    """Images (N, 3, H, W) float32 normalised and masks (N, H, W) int64, resized to size=(W, H)."""
    images, masks = [], []
    for image_path, mask_path in pairs:
        img = Image.fromarray(read_image(image_path)).resize(size, Image.BILINEAR)
        images.append(((np.asarray(img, np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1))
        masks.append(np.asarray(Image.fromarray(read_mask(mask_path)).resize(size, Image.NEAREST), np.int64))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyUNet(nn.Module):
    """Four levels (16-32-64-128 channels), bilinear upsampling, skip concatenation."""

    def __init__(self, widths=(16, 32, 64, 128), num_classes=NUM_CLASSES):
        super().__init__()
        self.down = nn.ModuleList()
        cin = 3
        for w in widths:
            self.down.append(block(cin, w))
            cin = w
        self.up = nn.ModuleList(block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for i, stage in enumerate(self.down):
            x = stage(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for stage, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], 1))
        return self.head(x)


def top_confusions(cm: np.ndarray, k: int = 2) -> list[str]:
    """Per class: where its pixels went, the k largest wrong predictions (share of the class's pixels)."""
    out = []
    for c in range(NUM_CLASSES):
        total = cm[c].sum()
        wrong = [(cm[c, p] / total, p) for p in range(NUM_CLASSES) if p != c and total]
        wrong.sort(reverse=True)
        out.append(", ".join(f"{CLASS_NAMES[p]} {share:.0%}" for share, p in wrong[:k] if share >= 0.01))
    return out


def iou_table(cm: np.ndarray) -> np.ndarray:
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def confusion(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.bincount(target.ravel() * NUM_CLASSES + pred.ravel(), minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def colour_baseline(train_x, train_y, eval_x, eval_y) -> np.ndarray:
    """IoU per class of a per-pixel nearest-class-mean-RGB classifier (fitted on train, in raw RGB)."""
    scale, shift = torch.from_numpy(STD).double(), torch.from_numpy(MEAN).double()
    x = train_x.permute(0, 2, 3, 1).reshape(-1, 3).double() * scale + shift
    y = train_y.reshape(-1)
    means = torch.stack([x[y == c].mean(0) if (y == c).any() else torch.full((3,), 1e9, dtype=torch.float64) for c in range(NUM_CLASSES)])
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for img, mask in zip(eval_x, eval_y):
        pix = img.permute(1, 2, 0).reshape(-1, 3).double() * scale + shift
        pred = torch.cdist(pix, means).argmin(1).numpy()
        cm += confusion(pred, mask.numpy())
    return iou_table(cm)


def evaluate(model, xs, ys, batch=8) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    with torch.no_grad():
        for i in range(0, len(xs), batch):
            pred = model(xs[i:i + batch]).argmax(1).numpy()
            cm += confusion(pred, ys[i:i + batch].numpy())
    model.train()
    return iou_table(cm), cm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="dataset root (default: generate the demo desert in a temp dir)")
    parser.add_argument("--seconds", type=float, default=120.0, help="training time budget")
    parser.add_argument("--steps", type=int, default=None,
                        help="train for this many steps instead of --seconds (comparable runs on a busy machine)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="320x180", help="training resolution WxH")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON results path (default bench/results/synth_learnability.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = tuple(int(v) for v in args.size.lower().split("x"))

    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="desert_")
        root = Path(tmp.name)
    else:
        root = Path(args.data)
    summary = make_demo_desert(root, progress=False)
    print(f"desert: {summary['counts']} at {root}; generated {summary['generated'] or 'nothing (cached)'} in {summary['seconds']:.1f} s")

    data = find_dataset(root)
    t0 = time.perf_counter()
    train_x, train_y = load_split(data.train, size)
    val_x, val_y = load_split(data.val, size)
    test_x, test_y = load_split(data.test, size) if data.test else (None, None)
    print(f"loaded {len(train_x)} train, {len(val_x)} val, {0 if test_x is None else len(test_x)} test at {size} in {time.perf_counter() - t0:.1f} s")

    # Class weights as the scan computes them: inverse square root of the pixel share.
    share = np.bincount(train_y.numpy().ravel(), minlength=NUM_CLASSES) / train_y.numel()
    weights = np.where(share > 0, 1 / np.sqrt(np.maximum(share, 1e-12)), 0)
    weights = weights / (weights * share).sum()
    model = TinyUNet()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))

    # Train for a fixed wall-clock budget: warm-up then cosine decay over the budget.
    start, steps, seen = time.perf_counter(), 0, 0
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(train_x))
    pos = 0
    while True:
        elapsed = time.perf_counter() - start
        frac = elapsed / args.seconds if args.steps is None else steps / args.steps
        if frac >= 1:
            break
        lr = args.lr * min(1.0, (steps + 1) / 20) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr
        if pos + args.batch > len(order):
            order, pos = rng.permutation(len(train_x)), 0
        idx = torch.from_numpy(order[pos:pos + args.batch])
        pos += args.batch
        x, y = train_x[idx], train_y[idx]
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        seen += len(idx)
        if steps % 20 == 0:
            print(f"  step {steps:4d}  {elapsed:5.0f} s  loss {loss.item():.3f}  lr {lr:.4f}", flush=True)
    train_s = time.perf_counter() - start
    print(f"trained {params / 1e6:.2f}M params for {train_s:.0f} s: {steps} steps, {seen / len(train_x):.1f} epochs")

    iou_val, cm_val = evaluate(model, val_x, val_y)
    iou_test = evaluate(model, test_x, test_y)[0] if test_x is not None else np.full(NUM_CLASSES, np.nan)
    confused = top_confusions(cm_val)
    base_val = colour_baseline(train_x, train_y, val_x, val_y)
    share_pct = share * 100
    presence = np.array([(train_y == c).flatten(1).any(1).float().mean().item() for c in range(NUM_CLASSES)])
    rows = [{"class": name, "share %": float(share_pct[c]), "images %": float(presence[c] * 100),
             "unet val": float(iou_val[c]), "unet novel test": float(iou_test[c]), "colour val": float(base_val[c]),
             "unet val confusions": confused[c]}
            for c, name in enumerate(CLASS_NAMES)]
    rows.append({"class": "mean (mIoU)", "unet val": float(np.nanmean(iou_val)), "unet novel test": float(np.nanmean(iou_test)),
                 "colour val": float(np.nanmean(base_val))})
    print(table(rows, ["class", "share %", "images %", "unet val", "unet novel test", "colour val", "unet val confusions"]))
    path = save_results("synth_learnability", rows, args.out, seconds=train_s, steps=steps, params=params,
                        size=list(size), threads=args.threads, generation_seconds=summary["seconds"], counts=summary["counts"])
    print(f"results: {path}")


if __name__ == "__main__":
    main()
