"""Domain adaptation: the student learns the new desert from the ensemble's soft labels on its unlabelled images.

Notebook 05's `adapt` names the images: "auto" (its default: on the generated demo desert, its
`adapt` split, never the test images; elsewhere off), "demo", or a folder (on the real data, a
part of the challenge's test images without their masks). The adapted student starts from the
distilled student and fine-tunes for a few epochs on the labelled train set plus those images,
under the same augmentation (`adapted_plan`, `adapted_config`); their pixels count in the
distillation's soft term only where the ensemble is confident (`distill.soft_weights`), at a
threshold chosen from a measurement on val (`confidence_table`, `choose_threshold`), never
assumed. It chooses its best epoch on held-out labelled images of the new desert where there are
some (the demo's `novel_val`; `adapt_holdout` on the real data), else on val. It goes to
models/student_adapted/ with adaptation.json (which images, which rule, which student it started
from), beside the plain student. Last, its BatchNorm statistics are re-estimated on the new
desert's images (`recalibrate_batchnorm`, AdaBN: Li et al. 2016): the soft labels alone cannot
take the student past the ensemble, which on the demo's new desert is no better than the student,
while the normalisation statistics of the training desert are what the new one's colours break.
The adapted student is then a model for the new desert: its val (training desert) score drops, and
notebook 05 and 06 say by how much; notebook 05 compares the two on the held-out images and on val
(`adaptation_comparison`: adapting is kept only where it helps there), notebook 06 on the test
images neither adapted on nor held out (`report`).
The README's "Adapting to the new desert" gives the protocol and what the demo measured.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from . import augment, synth
from .checkpoints import load_checkpoint, load_model, save_checkpoint
from .classes import IGNORE_INDEX
from .data import IMAGE_DIR, MASK_DIR, DataError, folder_pairs
from .dataset import SegmentationDataset
from .device import default_device, inference_autocast, on_device
from .engine import TrainConfig, launch
from .ensemble import Ensemble
from .files import read_json, write_json
from .profiles import ModelPlan
from .runs import read_ensemble
from .scan import usable_pairs
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
# notebook 05's default `adapt`: DEMO_ADAPT when the data is the generated demo desert (where adapting
# measurably helps, bench/adaptation.py), else off: on a user's data, `adapt` names a folder of theirs.
AUTO_ADAPT = "auto"
# The adapted student fine-tunes the distilled one for this share of the student's epochs (at least one:
# the demo's 3 give 1, the full profile's 20 give 5), after a short warm-up (it starts from trained weights).
ADAPT_EPOCH_SHARE = 0.25
ADAPT_WARMUP_EPOCHS = 0.1


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


def resolve_adapt(ctx, adapt):
    """Notebook 05's `adapt` for this run's data: AUTO_ADAPT is DEMO_ADAPT on the generated demo desert
    and None (off) on any other data; "none" or "off" (as `--set adapt=none` gives them) is None."""
    if isinstance(adapt, str) and adapt.strip().lower() in ("", "none", "off"):
        return None
    if adapt == AUTO_ADAPT:
        return DEMO_ADAPT if synth.is_demo_desert(ctx.data_root) else None
    return adapt


def adapted_plan(plan: ModelPlan, epochs: int | None = None) -> ModelPlan:
    """The adapted student's plan: the student's architecture and learning rate, started from the
    distilled student (init_from="student"), for `epochs` (None: ADAPT_EPOCH_SHARE of the student's, at least 1)."""
    epochs = int(epochs) if epochs else max(1, round(plan.epochs * ADAPT_EPOCH_SHARE))
    return replace(plan, init_from="student", epochs=epochs)


def adapted_config(config: TrainConfig, plan: ModelPlan) -> TrainConfig:
    """The student's training settings for the adapted plan: its epochs, and a short warm-up (the weights
    are trained already; a whole warm-up epoch would be all of the demo's one epoch)."""
    return replace(config, epochs=plan.epochs, warmup_epochs=min(config.warmup_epochs, ADAPT_WARMUP_EPOCHS))


def train_adapted_student(ctx, scan: dict, plan: ModelPlan, config: TrainConfig, alpha: float, temperature: float,
                          beta: float, adapt_images, confidence_threshold: float, holdout_pairs=None):
    """`train_student` with the new desert's unlabelled images, into models/student_adapted/, choosing its
    best epoch on `holdout_pairs` (labelled images of the new desert) when given, else on val (for
    `engine.launch`, which passes arguments by position). `plan` and `config`: see `adapted_plan`."""
    return train_student(ctx, scan, plan, config, alpha, temperature, beta, adapt_images=adapt_images,
                         confidence_threshold=confidence_threshold, role=ADAPTED_STUDENT,
                         val_pairs=list(holdout_pairs) if holdout_pairs else None)


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
    for batch, _ in loader(dataset, batch_size):
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


# ------------------------------------------------------------- domain adaptation (notebook 05)


def adaptation_images(ctx, adapt) -> list[Path]:
    """The unlabelled images of the new desert that notebook 05's `adapt` names ([] for None: off).

    `adapt` (`resolve_adapt`): "auto", "demo" (the demo desert's generated `adapt` split: novel-desert
    images never in the test split), or a folder of images (or one holding Color_Images/; masks there are never read),
    resolved from the working directory. On the real data that is the challenge's test images
    without their masks, or a part of them: score the adapted student on the part not adapted on
    (scoring on the adaptation images themselves is transductive; notebook 06 leaves them out).
    """
    adapt = resolve_adapt(ctx, adapt)
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

    `holdout` (a folder in the Duality layout with masks) wins; with adapt="demo" (or "auto" on the demo
    desert) and no holdout, the demo desert's `novel_val` split. Never trained on; scored to choose the
    adapted student's epoch and to decide whether adapting helps.
    """
    adapt = resolve_adapt(ctx, adapt)
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

    Returns {"table": `confidence_table` of the run's ensemble on val at the model input size,
    "min_accuracy", "threshold": `choose_threshold` of the table (None: no level is that accurate)}.
    """
    ensemble = fuse(load_teachers(ctx), read_ensemble(ctx.run))
    table = confidence_table(ensemble, loader(val_dataset(scan, ctx.profile.image_size), batch_size), device=device)
    return {"table": table, "min_accuracy": min_accuracy, "threshold": choose_threshold(table, min_accuracy)}


def student_start(ctx) -> dict:
    """Which distilled student the adapted one starts from: its checkpoint and best epoch (from its history)."""
    history = read_json(ctx.run.require("models/student/history.json"))
    best = max(history, key=lambda row: row["val_miou"] if row["val_miou"] is not None else -1.0)
    return {"checkpoint": "models/student/best.pt", "epoch": best["epoch"], "val_miou": best["val_miou"]}


def adaptation_setup(adapt, images, holdout_pairs, rule: dict, plan: ModelPlan, start: dict) -> dict:
    """What adaptation.json records: the images adapted on, the held-out images (scored by 05, never by 06),
    the confidence rule with its measured table, the epochs, and the student it started from."""
    return {"adapt": str(adapt), "images": [str(image) for image in images],
            "holdout": [str(image) for image, _ in holdout_pairs],
            "selected_on": "holdout" if holdout_pairs else "val", "epochs": plan.epochs, "start": start, **rule}


def write_adaptation_record(ctx, record: dict) -> Path:
    """models/student_adapted/adaptation.json (`adaptation_setup`), so notebook 06 leaves out of its test
    scores every image the adapted student learnt from or chose its epoch on."""
    path = ctx.run.model_dir(ADAPTED_STUDENT) / "adaptation.json"
    write_json(path, record)
    return path


def read_adaptation_record(run) -> dict | None:
    """The adapted student's adaptation.json, or None when this run has no adapted student."""
    path = run.model_dir(ADAPTED_STUDENT) / "adaptation.json"
    return read_json(path) if path.exists() and (path.parent / "best.pt").exists() else None


def check_resumable(ctx, record: dict) -> None:
    """Refuse to resume (or to reuse a finished) adapted student of other images, held-out images or start.

    The engine refuses changed training settings and train data; the adaptation images join the
    train set and the held-out ones replace val, so a change there is caught here, by adaptation.json.
    """
    folder = ctx.run.model_dir(ADAPTED_STUDENT)
    path = folder / "adaptation.json"
    if not path.exists() or not any((folder / name).exists() for name in ("last.pt", "best.pt")):
        return
    earlier = read_json(path)
    changed = [key for key in ("images", "holdout", "start") if earlier.get(key) != record[key]]
    if changed:
        raise DataError(f"{ctx.rel(folder)}/ holds an adapted student of other {', '.join(changed)} "
                        f"({ctx.rel(path)}): delete that folder to adapt anew with these, or set adapt as before")


def adapt_student(ctx, scan: dict, plan: ModelPlan, config: TrainConfig, alpha: float, temperature: float, beta: float,
                  adapt, min_accuracy: float = MIN_KEPT_ACCURACY, threshold: float | None = None,
                  num_processes: int | None = None, holdout=None, epochs: int | None = None) -> dict | None:
    """Notebook 05's adaptation cell: the images `adapt` names (`resolve_adapt`), the confidence rule
    measured on val (printed), adaptation.json, and the adapted student fine-tuned from the distilled one
    (`plan`, `config`: the student's) into models/student_adapted/.

    `threshold` forces the rule's threshold; `holdout` (a folder with masks) and `epochs`: notebook 05's
    `adapt_holdout` and `adapt_epochs`. Returns the adaptation record, or None when adaptation is off or
    skipped (no confidence level keeps val pixels `min_accuracy` right).
    """
    adapt = resolve_adapt(ctx, adapt)
    images = adaptation_images(ctx, adapt)
    if not images:
        print("adaptation: off (adapt=None, or the data is not the demo desert with adapt='auto'); "
              "the student learns from the labelled train set alone")
        if read_adaptation_record(ctx.run) is not None:
            print(f"note: {ctx.rel(ctx.run.model_dir(ADAPTED_STUDENT))}/ from an earlier run of this notebook with adapt "
                  "set stays, and notebook 06 reports it; delete that folder to drop it")
        return None
    holdout_pairs = adaptation_holdout(ctx, adapt, holdout)
    rule = confidence_rule(ctx, scan, min_accuracy, device=rule_device(num_processes))
    if threshold is not None:
        rule["threshold"] = float(threshold)  # forced by the notebook's parameter
    print(confidence_lines(rule["table"], rule["threshold"]))
    if rule["threshold"] is None:
        print(f"no confidence level keeps val pixels {100 * min_accuracy:.0f}% right: adaptation skipped "
              "(the ensemble's soft labels are too unreliable; lower adapt_min_accuracy or set adapt_threshold)")
        return None
    adapted = adapted_plan(plan, epochs)
    record = adaptation_setup(adapt, images, holdout_pairs, rule, adapted, student_start(ctx))
    check_resumable(ctx, record)
    chosen_on = (f"the {len(holdout_pairs)} held-out images of the new desert" if holdout_pairs
                 else "val (no held-out images of the new desert: give adapt_holdout)")
    print(f"{len(images)} unlabelled images of the new desert ({adapt}); their pixels join the soft term where the "
          f"ensemble is at least {rule['threshold']:.2f} sure. The distilled student fine-tunes on them and the "
          f"train set for {adapted.epochs} epoch(s), its best epoch chosen on {chosen_on}")
    write_adaptation_record(ctx, record)
    launch(train_adapted_student, (ctx, scan, adapted, adapted_config(config, adapted), alpha, temperature, beta,
                                   images, rule["threshold"], holdout_pairs), num_processes)
    # After the launch, never before: it may run on the GPU, which the launcher's processes need unused.
    batchnorm = recalibrate_checkpoint(ctx.run.model_dir(ADAPTED_STUDENT) / "best.pt", images, ctx.profile.image_size)
    print(f"BatchNorm statistics re-estimated on the {len(images)} images of the new desert "
          f"({batchnorm['layers']} layers)" if batchnorm["layers"] else
          "this student has no BatchNorm layer: its normalisation statistics stay the training desert's")
    write_adaptation_record(ctx, {**record, "batchnorm": batchnorm})
    return read_adaptation_record(ctx.run)


def rule_device(num_processes: int | None = None):
    """Where notebook 05 measures the confidence rule before launching the adapted student's training:
    the CPU when the launch will fork one process per GPU (they cannot use CUDA the notebook has
    initialised, see `engine.launch`), else the default device."""
    processes = num_processes if num_processes is not None else torch.cuda.device_count()
    return torch.device("cpu") if processes > 1 else default_device()


def adaptation_comparison(ctx, scan: dict, holdout_pairs, batch_size: int = 4) -> dict:
    """Notebook 05's verdict on adaptation: the student with and without it on val (the training desert)
    and on the held-out labelled images of the new desert, at the masks' native size.

    Returns {"val": {name: scores}, "holdout": {name: scores} or None without held-out images, "gain":
    the adapted student's held-out mIoU minus the plain one's, "helps": gain > 0 (None without them)}.
    With held-out images the adapted student chose its epoch on them, so "gain" is the deciding figure
    and leans its way; notebook 06's test rows (images neither adapted on nor held out) are the unbiased one.
    """
    names = ("student", ADAPTED_STUDENT)
    models = {name: load_model(ctx.run.require(f"models/{name}/best.pt")) for name in names}
    val = score_pairs(models, usable_pairs(scan, "val"), ctx.profile.image_size, batch_size)
    holdout = score_pairs(models, holdout_pairs, ctx.profile.image_size, batch_size) if holdout_pairs else None
    gain = holdout[ADAPTED_STUDENT]["miou"] - holdout["student"]["miou"] if holdout else None
    return {"val": val, "holdout": holdout, "gain": gain, "helps": None if gain is None else gain > 0}


def adaptation_lines(comparison: dict) -> str:
    """The comparison as notebook 05 prints it: mIoU on val and on the held-out new desert, per class there,
    and the verdict."""
    names = ("student", ADAPTED_STUDENT)
    val = comparison["val"]
    lines = [f"{'':<16}{'student':>9}{'adapted':>9}",
             f"{'val mIoU':<16}" + "".join(f"{val[name]['miou']:>9.3f}" for name in names)]
    holdout = comparison["holdout"]
    if holdout is None:
        return "\n".join(lines + ["(no held-out labelled images of the new desert: give adapt_holdout to decide)"])
    lines.append(f"{'held-out mIoU':<16}" + "".join(f"{holdout[name]['miou']:>9.3f}" for name in names))
    lines.append(per_class_lines(holdout))
    cost = val[ADAPTED_STUDENT]["miou"] - val["student"]["miou"]
    if comparison["helps"]:
        lines.append(f"adapting helps on the held-out new desert ({comparison['gain']:+.3f} mIoU; val {cost:+.3f}): "
                     f"use models/{ADAPTED_STUDENT}/best.pt there")
    else:
        lines.append(f"adapting does not help on the held-out new desert ({comparison['gain']:+.3f} mIoU; val "
                     f"{cost:+.3f}): keep models/student/best.pt")
    return "\n".join(lines)


def per_class_lines(results: dict) -> str:
    """Per-class IoU of a few models side by side (`evaluate_model` results by name), "-" where undefined."""
    names = list(results)
    lines = []
    for cls in results[names[0]]["per_class_iou"]:
        values = [results[name]["per_class_iou"][cls] for name in names]
        lines.append(f"  {cls:<14}" + "".join(f"{'-' if v is None else f'{v:.3f}':>9}" for v in values))
    return "\n".join(lines)


# ------------------------------------------------------------- the honest protocol on the real data


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
