"""Domain adaptation: the student learns the new desert from the ensemble's soft labels on its unlabelled images.

Notebook 05's `adapt` (off by default) names the images: "demo" (the demo desert's generated
`adapt` split, never the test images) or a folder (on the real data, a part of the challenge's
test images without their masks). They join the labelled train set under the same
augmentation; their pixels count in the distillation's soft term only where the ensemble is
confident (`distill.soft_weights`), at a threshold chosen from a measurement on val
(`confidence_table`, `choose_threshold`), never assumed. The adapted student goes to
models/student_adapted/ with adaptation.json (which images, which rule), beside the plain
student; notebook 05 compares the two on held-out labelled images of the new desert
(`adaptation_comparison`), notebook 06 on the test images not adapted on (`report`).
The README's "Adapting to a new desert" gives the protocol and what the demo measured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from . import synth
from .checkpoints import load_model
from .classes import IGNORE_INDEX
from .data import DataError, folder_pairs
from .device import default_device, inference_autocast, on_device
from .engine import TrainConfig, launch
from .ensemble import Ensemble
from .files import read_json, write_json
from .profiles import ModelPlan
from .runs import read_ensemble
from .training import fuse, load_teachers, loader, score_pairs, train_student, val_dataset

# The confidence levels `confidence_table` measures (the ensemble's max class probability at T = 1).
CONFIDENCE_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# `choose_threshold`'s default: the kept pixels of the training desert must be this often right.
MIN_KEPT_ACCURACY = 0.95
# The student distilled with the new desert's unlabelled images (notebook 05's `adapt`): models/<this>/,
# with adaptation.json beside its checkpoints saying which images and which confidence rule.
ADAPTED_STUDENT = "student_adapted"
# notebook 05's `adapt="demo"`: the demo desert's generated adaptation splits (`synth.make_demo_desert`).
DEMO_ADAPT = "demo"


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


def train_adapted_student(ctx, scan: dict, plan: ModelPlan, config: TrainConfig, alpha: float, temperature: float,
                          beta: float, adapt_images, confidence_threshold: float):
    """`train_student` with the new desert's unlabelled images, into models/student_adapted/ (for `engine.launch`,
    which passes arguments by position)."""
    return train_student(ctx, scan, plan, config, alpha, temperature, beta, adapt_images=adapt_images,
                         confidence_threshold=confidence_threshold, role=ADAPTED_STUDENT)


# ------------------------------------------------------------- domain adaptation (notebook 05)


def adaptation_images(ctx, adapt) -> list[Path]:
    """The unlabelled images of the new desert that notebook 05's `adapt` names ([] for None: off).

    `adapt`: "demo" (the demo desert's generated `adapt` split: novel-desert images never in the
    test split), or a folder of images (or one holding Color_Images/; masks there are never read),
    resolved from the working directory. On the real data that is the challenge's test images
    without their masks, or a part of them: score the adapted student on the part not adapted on
    (scoring on the adaptation images themselves is transductive; notebook 06 leaves them out).
    """
    if adapt is None:
        return []
    if adapt == DEMO_ADAPT:
        if not synth.is_demo_desert(ctx.data_root):
            raise DataError(f"adapt={DEMO_ADAPT!r} takes the demo desert's adaptation images, but the data "
                            f"({ctx.data_root}) is not the generated demo desert: give adapt=FOLDER, a folder of "
                            "unlabelled images of the new desert")
        return [image for image, _ in folder_pairs(synth.split_folder(ctx.data_root, "adapt"))]
    return [image.resolve() for image, _ in folder_pairs(Path(os.fspath(adapt)).expanduser())]


def adaptation_holdout(ctx, adapt, holdout=None) -> list[tuple[Path, Path]]:
    """Labelled held-out images of the new desert to decide whether adapting helps ([] when there are none).

    `holdout` (a folder in the Duality layout with masks) wins; with adapt="demo" and no holdout,
    the demo desert's `novel_val` split. Never trained on; only scored.
    """
    if holdout is not None:
        pairs = folder_pairs(Path(os.fspath(holdout)).expanduser())
    elif adapt == DEMO_ADAPT and synth.is_demo_desert(ctx.data_root):
        pairs = folder_pairs(synth.split_folder(ctx.data_root, "novel_val"))
    else:
        return []
    if any(mask is None for _, mask in pairs):
        raise DataError(f"adapt_holdout: the held-out images must have masks ({holdout}/Segmentation/) to be scored")
    return pairs


def confidence_rule(ctx, scan: dict, min_accuracy: float = MIN_KEPT_ACCURACY, batch_size: int = 8,
                    device=None) -> dict:
    """Which soft labels of unlabelled images to trust, measured on val (labelled, the training desert).

    Returns {"table": `distill.confidence_table` of the run's ensemble on val at the model input size,
    "min_accuracy", "threshold": `distill.choose_threshold` of the table (None: no level is that accurate)}.
    """
    ensemble = fuse(load_teachers(ctx), read_ensemble(ctx.run))
    table = confidence_table(ensemble, loader(val_dataset(scan, ctx.profile.image_size), batch_size), device=device)
    return {"table": table, "min_accuracy": min_accuracy, "threshold": choose_threshold(table, min_accuracy)}


def write_adaptation_record(ctx, adapt, images, rule: dict) -> Path:
    """models/student_adapted/adaptation.json: what the adapted student learnt from (image paths, the
    confidence rule and its measured table), so notebook 06 leaves those images out of its test scores."""
    path = ctx.run.model_dir(ADAPTED_STUDENT) / "adaptation.json"
    write_json(path, {"adapt": str(adapt), "images": [str(image) for image in images], **rule})
    return path


def read_adaptation_record(run) -> dict | None:
    """The adapted student's adaptation.json, or None when this run has no adapted student."""
    path = run.model_dir(ADAPTED_STUDENT) / "adaptation.json"
    return read_json(path) if path.exists() and (path.parent / "best.pt").exists() else None


def adapt_student(ctx, scan: dict, plan: ModelPlan, config: TrainConfig, alpha: float, temperature: float, beta: float,
                  adapt, min_accuracy: float = MIN_KEPT_ACCURACY, threshold: float | None = None,
                  num_processes: int | None = None) -> dict | None:
    """Notebook 05's adaptation cell: the images `adapt` names, the confidence rule measured on val
    (printed), adaptation.json, and the adapted student trained into models/student_adapted/.

    `threshold` forces the rule's threshold. Returns the adaptation record, or None when adaptation
    is off (adapt=None) or skipped (no confidence level keeps val pixels `min_accuracy` right).
    """
    images = adaptation_images(ctx, adapt)
    if not images:
        print("adaptation: off (adapt=None); the student learns from the labelled train set alone")
        if read_adaptation_record(ctx.run) is not None:
            print(f"note: {ctx.rel(ctx.run.model_dir(ADAPTED_STUDENT))}/ from an earlier run of this notebook with adapt "
                  "set stays, and notebook 06 reports it; delete that folder to drop it")
        return None
    rule = confidence_rule(ctx, scan, min_accuracy, device=rule_device(num_processes))
    if threshold is not None:
        rule["threshold"] = float(threshold)  # forced by the notebook's parameter
    print(confidence_lines(rule["table"], rule["threshold"]))
    if rule["threshold"] is None:
        print(f"no confidence level keeps val pixels {100 * min_accuracy:.0f}% right: adaptation skipped "
              "(the ensemble's soft labels are too unreliable; lower adapt_min_accuracy or set adapt_threshold)")
        return None
    print(f"{len(images)} unlabelled images of the new desert ({adapt}); their pixels join the soft term where the "
          f"ensemble is at least {rule['threshold']:.2f} sure")
    write_adaptation_record(ctx, adapt, images, rule)
    launch(train_adapted_student, (ctx, scan, plan, config, alpha, temperature, beta, images, rule["threshold"]),
           num_processes)
    return read_adaptation_record(ctx.run)


def rule_device(num_processes: int | None = None):
    """Where notebook 05 measures the confidence rule before launching the adapted student's training:
    the CPU when the launch will fork one process per GPU (they cannot use CUDA the notebook has
    initialised, see `engine.launch`), else the default device."""
    processes = num_processes if num_processes is not None else torch.cuda.device_count()
    return torch.device("cpu") if processes > 1 else default_device()


def adaptation_comparison(ctx, holdout_pairs, batch_size: int = 4) -> dict:
    """Notebook 05's verdict on adaptation: the student with and without it, on val (the training
    desert, each one's best history row) and on the held-out labelled images of the new desert.

    Returns {"val": {name: best val mIoU}, "holdout": {name: scores} or None without held-out
    images, "gain": the adapted student's held-out mIoU minus the plain one's (None without them)}.
    """
    names = ("student", ADAPTED_STUDENT)
    val = {name: max(row["val_miou"] for row in read_json(ctx.run.require(f"models/{name}/history.json")))
           for name in names}
    holdout = None
    if holdout_pairs:
        models = {name: load_model(ctx.run.require(f"models/{name}/best.pt")) for name in names}
        holdout = score_pairs(models, holdout_pairs, ctx.profile.image_size, batch_size)
    gain = holdout[ADAPTED_STUDENT]["miou"] - holdout["student"]["miou"] if holdout else None
    return {"val": val, "holdout": holdout, "gain": gain}


def adaptation_lines(comparison: dict) -> str:
    """The comparison as notebook 05 prints it: mIoU on val and on the held-out new desert, per class there."""
    names = ("student", ADAPTED_STUDENT)
    lines = [f"{'':<16}{'student':>9}{'adapted':>9}",
             f"{'val mIoU':<16}" + "".join(f"{comparison['val'][name]:>9.3f}" for name in names)]
    holdout = comparison["holdout"]
    if holdout is None:
        return "\n".join(lines + ["(no held-out labelled images of the new desert: give adapt_holdout to decide)"])
    lines.append(f"{'held-out mIoU':<16}" + "".join(f"{holdout[name]['miou']:>9.3f}" for name in names))
    for cls in holdout["student"]["per_class_iou"]:
        values = [holdout[name]["per_class_iou"][cls] for name in names]
        lines.append(f"  {cls:<14}" + "".join(f"{'-' if v is None else f'{v:.3f}':>9}" for v in values))
    return "\n".join(lines)
