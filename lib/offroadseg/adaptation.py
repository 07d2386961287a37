"""Adapting to a new desert: which soft labels to trust, re-estimated normalisation, an honest split.

The algorithms the adaptation chapter (`chapters.new_desert`, notebook 05) is made of:
- `confidence_table` / `choose_threshold`: how often the ensemble's argmax is right where it is
  confident, measured on labelled val images, and the lowest confidence whose kept pixels are that
  often right; unlabelled pixels of the new desert count in the distillation's soft term only above
  it (`distill.soft_weights`). Measured, never assumed.
- `recalibrate_batchnorm` / `recalibrate_checkpoint`: a model's BatchNorm statistics re-estimated on
  the new desert's images (AdaBN: Li et al. 2016). The soft labels alone cannot take the student
  past the ensemble, which on the demo's new desert is no better than the student, while the
  normalisation statistics of the training desert are what the new one's colours break.
- `split_test_images` (`python -m offroadseg.adaptation split`): the real data's labelled test
  folder in three parts, adapted on / held out to decide / scored, so that no score is transductive.
The README's "Adapting to the new desert" gives the protocol; bench/RESULTS.md, section 6, what the demo measured.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from . import augment
from .checkpoints import load_checkpoint, load_model, save_checkpoint
from .classes import IGNORE_INDEX
from .data import IMAGE_DIR, MASK_DIR, DataError, folder_pairs
from .dataset import SegmentationDataset, eval_loader
from .device import default_device, inference_autocast, on_device
from .ensemble import Ensemble
from .profiles import AdaptConfig

# The confidence levels `confidence_table` measures (the ensemble's max class probability at T = 1).
CONFIDENCE_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# `choose_threshold`'s default: the kept pixels of the training desert must be this often right.
MIN_KEPT_ACCURACY = AdaptConfig.min_accuracy


@torch.no_grad()
def confidence_table(ensemble: Ensemble, loader: Iterable, levels: Sequence[float] = CONFIDENCE_LEVELS,
                     device=None, ignore_index: int = IGNORE_INDEX) -> list[dict]:
    """How often the ensemble's argmax is right where it is confident, measured on labelled images.

    For each level t of `levels`: "kept", the share of the labelled pixels whose confidence (the
    ensemble's max class probability at T = 1) is at least t, and "accuracy", the share of those
    where the argmax equals the truth (None where none is kept). `loader` yields (images, masks) at
    the model input size (the val loader). The rows are what `choose_threshold` reads: the table of
    the training desert is the evidence for which soft labels to trust in the new one (where the
    teachers are less often right at the same confidence; the threshold errs on the safe side).
    """
    device = default_device(device)
    levels = sorted(float(level) for level in levels)
    kept = torch.zeros(len(levels), dtype=torch.float64)
    right = torch.zeros(len(levels), dtype=torch.float64)
    total = 0
    with on_device(ensemble, device):
        for images, masks in loader:
            images, masks = images.to(device), masks.to(device)
            with inference_autocast(device):
                probs = ensemble.probs(images).float()
            confidence, predicted = probs.max(dim=1)
            valid = masks != ignore_index
            total += int(valid.sum())
            correct = (predicted == masks) & valid
            for index, level in enumerate(levels):
                keep = valid & (confidence >= level)
                kept[index] += int(keep.sum())
                right[index] += int((correct & keep).sum())
    return [{"threshold": level, "kept": float(kept[i] / total) if total else 0.0,
             "accuracy": float(right[i] / kept[i]) if kept[i] else None} for i, level in enumerate(levels)]


def choose_threshold(table: Sequence[dict], min_accuracy: float = MIN_KEPT_ACCURACY) -> float | None:
    """The lowest threshold of a `confidence_table` whose kept pixels are at least `min_accuracy` right.

    The lowest such one keeps the most pixels of the new desert for the student to learn from while
    the soft labels it keeps are, on the training desert, that often right. None when no level is
    that accurate: the ensemble's soft labels are then too unreliable to learn from unlabelled images.
    """
    good = [row["threshold"] for row in table if row["accuracy"] is not None and row["accuracy"] >= min_accuracy]
    return min(good) if good else None


def confidence_lines(table: Sequence[dict], chosen: float | None) -> str:
    """The table as notebook 05 prints it, the chosen threshold marked."""
    lines = ["confidence >=  kept pixels  argmax right"]
    for row in table:
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        mark = "  <- chosen" if chosen is not None and row["threshold"] == chosen else ""
        lines.append(f"{row['threshold']:>12.2f}  {100 * row['kept']:>10.1f}%  {accuracy:>12}{mark}")
    return "\n".join(lines)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images, image_size, batch_size: int = 8, device=None) -> int:
    """Re-estimate `model`'s BatchNorm statistics on `images` (AdaBN), in place; returns how many layers.

    Each BatchNorm layer's running mean and variance become the plain average over the images (at the
    model input size, no augmentation, fp32) of its batch statistics; the weights are left alone.
    The model's own normalisation then fits the new desert instead of the training one. `model` is
    left on `device` (None: the default one), in eval mode; 0 layers (e.g. a SegFormer encoder's
    LayerNorms) leaves it unchanged.
    """
    layers = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not layers or not images:
        return 0
    device = default_device(device)
    model.to(device).eval()
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over all batches, not an exponential one
        layer.train()
    dataset = SegmentationDataset([(Path(image), None) for image in images], augment.eval_transform(image_size))
    for batch, _ in eval_loader(dataset, batch_size):
        model(batch.to(device))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.eval()
    return len(layers)


def recalibrate_checkpoint(path, images, image_size, batch_size: int = 8, device=None) -> dict:
    """`recalibrate_batchnorm` of the model in checkpoint `path`, written back into it (its weights and
    everything else unchanged) with {"images", "layers"} under "batchnorm", which it also returns.

    Idempotent: in train mode BatchNorm normalises with the batch's own statistics, so re-estimating
    from the same weights and images gives the same statistics (a rerun of notebook 05 skips it).
    """
    checkpoint = load_checkpoint(path)
    if checkpoint.get("batchnorm", {}).get("images") == len(images):
        return checkpoint["batchnorm"]
    model = load_model(path)
    done = {"images": len(images), "layers": recalibrate_batchnorm(model, images, image_size, batch_size, device)}
    prefix = (checkpoint.get("spec") or {}).get("prefix") or ""
    for key, value in model.state_dict().items():
        checkpoint["model"][prefix + key] = value.detach().cpu()
    checkpoint["batchnorm"] = done
    save_checkpoint(checkpoint, Path(path))
    return done


def split_test_images(folder, out, adapt: float = 0.5, holdout: float = 0.1, seed: int = 0) -> dict:
    """Split a labelled test folder (Duality layout) into the three parts the honest protocol needs.

    `out`/adapt/Color_Images: a share `adapt` of the images, without masks (notebook 05's `adapt`);
    `out`/holdout/{Color_Images,Segmentation}: a share `holdout` with their masks (`adapt_holdout`:
    the adapted student's epoch and the verdict); the rest stays where it is, and notebook 06 scores
    only it (it leaves out both parts by file name). A seeded shuffle decides; files are hard-linked
    where the file system allows, else copied. Returns {"adapt", "holdout", "scored"}: counts.
    """
    pairs = folder_pairs(Path(os.fspath(folder)).expanduser())
    if any(mask is None for _, mask in pairs):
        raise DataError(f"{folder}: every image needs its mask in {MASK_DIR}/ (the held-out part is scored)")
    if not (0 < adapt < 1 and 0 < holdout < 1 and adapt + holdout < 1):
        raise ValueError(f"adapt ({adapt}) and holdout ({holdout}) are shares of the images: each above 0, "
                         "together below 1 (the rest is what notebook 06 scores)")
    order = sorted(pairs)
    random.Random(seed).shuffle(order)
    n_adapt, n_holdout = round(len(order) * adapt), max(1, round(len(order) * holdout))
    out = Path(os.fspath(out)).expanduser()
    for destination in (out / "adapt", out / "holdout"):
        if destination.exists() and any(destination.iterdir()):
            raise DataError(f"{destination} is not empty: give another --out, or delete it to split anew")
    for image, _ in order[:n_adapt]:
        _link(image, out / "adapt" / IMAGE_DIR / image.name)
    for image, mask in order[n_adapt:n_adapt + n_holdout]:
        _link(image, out / "holdout" / IMAGE_DIR / image.name)
        _link(mask, out / "holdout" / MASK_DIR / mask.name)
    return {"adapt": n_adapt, "holdout": n_holdout, "scored": len(order) - n_adapt - n_holdout}


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offroadseg.adaptation",
                                     description="Split the test images for adapting to the new desert honestly.")
    commands = parser.add_subparsers(dest="command", required=True)
    split = commands.add_parser("split", help="adapt / holdout parts of a labelled test folder; the rest is scored")
    split.add_argument("folder", help="the test folder (holding Color_Images/ and Segmentation/)")
    split.add_argument("--out", required=True, help="where adapt/ and holdout/ go")
    split.add_argument("--adapt", type=float, default=0.5, help="share of the images adapted on (default 0.5)")
    split.add_argument("--holdout", type=float, default=0.1, help="share held out to decide on (default 0.1)")
    split.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = split_test_images(args.folder, args.out, args.adapt, args.holdout, args.seed)
    except (DataError, ValueError) as err:  # bad input: say what to do, without a traceback
        print(f"python -m offroadseg.adaptation split: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"{counts['adapt']} images to adapt on in {out / 'adapt'}, {counts['holdout']} held out in "
          f"{out / 'holdout'}; notebook 06 scores the other {counts['scored']}. Then:\n"
          f"  ./run_all.sh ... --set adapt={out / 'adapt'} --set adapt_holdout={out / 'holdout'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
