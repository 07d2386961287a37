"""Notebook 05, second part: the student adapts to a new desert from the ensemble's soft labels.

Notebook 05's `adapt` names the images: "auto" (the profile's default: on the generated demo
desert, its `adapt` split, never the test images; elsewhere off), "demo", or a folder (on the real
data, a part of the challenge's test images without their masks; `python -m offroadseg.adaptation
split` makes the parts). The adapted student starts from the distilled student and fine-tunes for
a few epochs on the labelled train set plus those images, under the same augmentation
(`adapted_plan`, `adapted_config`); their pixels count in the distillation's soft term only where
the ensemble is confident, at a threshold chosen from a measurement on val
(`adaptation.confidence_table`, `adaptation.choose_threshold`), never assumed. It chooses its best
epoch on held-out labelled images of the new desert where there are some (the demo's `novel_val`;
`adapt_holdout` on the real data), else on val. It goes to models/student_adapted/ with
adaptation.json (which images, which rule, which student it started from), beside the plain
student; then its BatchNorm statistics are re-estimated on the new desert's images
(`adaptation.recalibrate_checkpoint`). Notebook 05 compares the two students on the held-out
images and on val (`adaptation_comparison`), notebook 06 on the test images neither adapted on
nor held out (`evaluation.adaptation_rows`). The settings are the profile's `AdaptConfig`
(`adapt_config` applies the notebook's parameters).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import synth
from ..adaptation import choose_threshold, confidence_lines, confidence_table, recalibrate_checkpoint
from ..checkpoints import best_row, load_model
from ..data import DataError, folder_pairs
from ..dataset import eval_loader
from ..device import default_device
from ..engine import TrainConfig, launch
from ..files import read_json, write_json
from ..profiles import AdaptConfig, DistillConfig, ModelPlan, Profile, with_settings
from ..runs import ADAPTED_STUDENT, read_ensemble
from ..scan import usable_pairs
from .assembly import fuse, load_teachers, score_pairs, val_dataset
from .distillation import train_student

# notebook 05's `adapt="demo"`: the demo desert's generated adaptation splits (`synth.make_demo_desert`).
DEMO_ADAPT = "demo"


# notebook 05's default `adapt`: DEMO_ADAPT when the data is the generated demo desert (where adapting
# measurably helps, bench/adaptation.py), else off: on a user's data, `adapt` names a folder of theirs.
AUTO_ADAPT = "auto"


# Notebook 05's parameters of the adaptation (`python -m offroadseg.train adapt --set` takes the same), and
# the AdaptConfig field each sets (`adapt_overrides`).
SETTINGS = ("adapt", "adapt_holdout", "adapt_min_accuracy", "adapt_threshold", "adapt_epochs", "adapt_batchnorm")
_CONFIG_FIELDS = {"adapt": "images", "adapt_holdout": "holdout", "adapt_min_accuracy": "min_accuracy",
                  "adapt_threshold": "threshold", "adapt_epochs": "epochs", "adapt_batchnorm": "batchnorm"}
BATCHNORM_CHOICES = ("new", "both", "none")


def adapt_overrides(settings: dict) -> dict:
    """`adapt_config` keyword arguments from notebook 05's adapt_* parameters (absent or None: the profile's)."""
    return {field: settings.get(name) for name, field in _CONFIG_FIELDS.items()}


def adapt_config(profile: Profile, **settings) -> AdaptConfig:
    """The profile's AdaptConfig with notebook 05's adapt_* parameters that are not None."""
    return with_settings(profile.adapt, **settings)


def resolve_adapt(ctx, adapt):
    """Notebook 05's `adapt` for this run's data: AUTO_ADAPT is DEMO_ADAPT on the generated demo desert
    and None (off) on any other data; "none" or "off" (as `--set adapt=none` gives them) is None."""
    if isinstance(adapt, str) and adapt.strip().lower() in ("", "none", "off"):
        return None
    if adapt == AUTO_ADAPT:
        return DEMO_ADAPT if synth.is_demo_desert(ctx.data_root) else None
    return adapt


def adapted_plan(plan: ModelPlan, adapt: AdaptConfig) -> ModelPlan:
    """The adapted student's plan: the student's architecture and learning rate, started from the
    distilled student (init_from="student"), for `adapt.epochs` (None: `adapt.epoch_share` of the
    student's, at least 1: the demo's 3 give 1, the full profile's 20 give 5)."""
    epochs = int(adapt.epochs) if adapt.epochs else max(1, round(plan.epochs * adapt.epoch_share))
    return replace(plan, init_from="student", epochs=epochs)


def adapted_config(config: TrainConfig, plan: ModelPlan, adapt: AdaptConfig) -> TrainConfig:
    """The student's training settings for the adapted plan: its epochs, and a short warm-up (the weights
    are trained already; a whole warm-up epoch would be all of the demo's one epoch)."""
    return replace(config, epochs=plan.epochs, warmup_epochs=min(config.warmup_epochs, adapt.warmup_epochs))


def train_adapted_student(ctx, scan: dict, plan: ModelPlan, config: TrainConfig, distill: DistillConfig,
                          adapt_images, confidence_threshold: float, holdout_pairs=None, track=()):
    """`train_student` with the new desert's unlabelled images, into models/student_adapted/, choosing its
    best epoch on `holdout_pairs` (labelled images of the new desert) when given, else on val (for
    `engine.launch`, which passes arguments by position). `plan` and `config`: see `adapted_plan`."""
    return train_student(ctx, scan, plan, config, distill, adapt_images=adapt_images,
                         confidence_threshold=confidence_threshold, role=ADAPTED_STUDENT,
                         val_pairs=list(holdout_pairs) if holdout_pairs else None, track=track)


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


def confidence_rule(ctx, scan: dict, min_accuracy: float = AdaptConfig.min_accuracy, batch_size: int = 8,
                    device=None) -> dict:
    """Which soft labels of unlabelled images to trust, measured on val (labelled, the training desert).

    Returns {"table": `confidence_table` of the run's ensemble on val at the model input size,
    "min_accuracy", "threshold": `choose_threshold` of the table (None: no level is that accurate)}.
    """
    ensemble = fuse(load_teachers(ctx), read_ensemble(ctx.run))
    table = confidence_table(ensemble, eval_loader(val_dataset(scan, ctx.profile.image_size), batch_size), device=device)
    return {"table": table, "min_accuracy": min_accuracy, "threshold": choose_threshold(table, min_accuracy)}


def student_start(ctx) -> dict:
    """Which distilled student the adapted one starts from: its checkpoint and best epoch (from its history)."""
    best = best_row(read_json(ctx.run.require(ctx.run.history("student"))))
    return {"checkpoint": ctx.run.checkpoint("student").relative_to(ctx.run.dir).as_posix(), "epoch": best["epoch"], "val_miou": best["val_miou"]}


def adaptation_setup(adapt, images, holdout_pairs, rule: dict, plan: ModelPlan, start: dict) -> dict:
    """What adaptation.json records: the images adapted on, the held-out images (scored by 05, never by 06),
    the confidence rule with its measured table, the epochs, and the student it started from."""
    return {"adapt": str(adapt), "images": [str(image) for image in images],
            "holdout": [str(image) for image, _ in holdout_pairs],
            "selected_on": "holdout" if holdout_pairs else "val", "epochs": plan.epochs, "start": start, **rule}


def write_adaptation_record(ctx, record: dict) -> Path:
    """models/student_adapted/adaptation.json (`adaptation_setup`), so notebook 06 leaves out of its test
    scores every image the adapted student learnt from or chose its epoch on."""
    path = ctx.run.adaptation_record
    write_json(path, record)
    return path


def read_adaptation_record(run) -> dict | None:
    """The adapted student's adaptation.json, or None when this run has no adapted student."""
    path = run.adaptation_record
    return read_json(path) if path.exists() and run.checkpoint(ADAPTED_STUDENT).exists() else None


def check_same_adaptation(ctx, record: dict) -> None:
    """Refuse to resume (or to reuse a finished) adapted student of other images, held-out images or start.

    The engine refuses changed training settings and train data; the adaptation images join the
    train set and the held-out ones replace val, so a change there is caught here, by adaptation.json.
    """
    folder, path = ctx.run.model_dir(ADAPTED_STUDENT), ctx.run.adaptation_record
    if not path.exists() or not any(ctx.run.checkpoint(ADAPTED_STUDENT, which).exists() for which in ("last", "best")):
        return
    earlier = read_json(path)
    changed = [key for key in ("images", "holdout", "start") if earlier.get(key) != record[key]]
    if changed:
        raise DataError(f"{ctx.rel(folder)}/ holds an adapted student of other {', '.join(changed)} "
                        f"({ctx.rel(path)}): delete that folder to adapt anew with these, or set adapt as before")


@dataclass
class PreparedAdaptation:
    """What the adapted student trains on (`prepare_adaptation`): plain data, so a training command can
    hand it from its first process to the others."""

    record: dict  # adaptation.json as written before training
    plan: ModelPlan  # `adapted_plan`
    config: TrainConfig  # `adapted_config`
    images: list  # the unlabelled images of the new desert
    threshold: float  # the confidence rule's
    holdout: list  # labelled held-out pairs of the new desert ([]: choose on val)
    batchnorm_images: list  # what its BatchNorm statistics are re-estimated on ([]: left as the fine-tune made them)


def prepare_adaptation(ctx, scan: dict, plan: ModelPlan, config: TrainConfig, adapt: AdaptConfig,
                       device=None) -> PreparedAdaptation | None:
    """Before the adapted student trains: the images `adapt.images` names (`resolve_adapt`), the confidence
    rule measured on val (printed, on `device`), the check against an earlier adapted student and
    adaptation.json written. None when adaptation is off or skipped (no confidence level keeps val
    pixels `adapt.min_accuracy` right and no `adapt.threshold` forces one). `plan`, `config`: the student's.
    """
    source = resolve_adapt(ctx, adapt.images)
    images = adaptation_images(ctx, source)
    if not images:
        print("adaptation: off (adapt='none', or the data is not the demo desert with adapt='auto'); "
              "the student learns from the labelled train set alone")
        if read_adaptation_record(ctx.run) is not None:
            print(f"note: {ctx.rel(ctx.run.model_dir(ADAPTED_STUDENT))}/ from an earlier run of this notebook with adapt "
                  "set stays, and notebook 06 reports it; delete that folder to drop it")
        return None
    holdout_pairs = adaptation_holdout(ctx, source, adapt.holdout)
    rule = confidence_rule(ctx, scan, adapt.min_accuracy, device=device)
    if adapt.threshold is not None:
        rule["threshold"] = float(adapt.threshold)  # forced by the notebook's parameter
    print(confidence_lines(rule["table"], rule["threshold"]))
    if rule["threshold"] is None:
        print(f"no confidence level keeps val pixels {100 * adapt.min_accuracy:.0f}% right: adaptation skipped "
              "(the ensemble's soft labels are too unreliable; lower adapt_min_accuracy or set adapt_threshold)")
        return None
    adapted = adapted_plan(plan, adapt)
    record = adaptation_setup(source, images, holdout_pairs, rule, adapted, student_start(ctx))
    check_same_adaptation(ctx, record)
    chosen_on = (f"the {len(holdout_pairs)} held-out images of the new desert" if holdout_pairs
                 else "val (no held-out images of the new desert: give adapt_holdout)")
    print(f"{len(images)} unlabelled images of the new desert ({source}); their pixels join the soft term where the "
          f"ensemble is at least {rule['threshold']:.2f} sure. The distilled student fine-tunes on them and the "
          f"train set for {adapted.epochs} epoch(s), its best epoch chosen on {chosen_on}")
    write_adaptation_record(ctx, record)
    return PreparedAdaptation(record, adapted, adapted_config(config, adapted, adapt), images, rule["threshold"],
                              holdout_pairs, batchnorm_images(scan, images, adapt.batchnorm, config.seed))


def batchnorm_images(scan: dict, images: list, mode: str, seed: int = 0) -> list:
    """The images the adapted student's BatchNorm statistics are re-estimated on (`AdaptConfig.batchnorm`):
    "new" the new desert's `images`, "both" those and as many training images (a seeded draw), "none" []."""
    if mode not in BATCHNORM_CHOICES:
        raise ValueError(f"adapt_batchnorm={mode!r}: choose {', '.join(BATCHNORM_CHOICES)}")
    if mode == "none":
        return []
    if mode == "both":
        train = [image for image, _ in usable_pairs(scan, "train")]
        return list(images) + random.Random(seed).sample(train, min(len(images), len(train)))
    return list(images)


def finish_adaptation(ctx, prepared: PreparedAdaptation) -> dict:
    """After the adapted student trained: its BatchNorm statistics re-estimated (`batchnorm_images`;
    `adaptation.recalibrate_checkpoint`, printed) and adaptation.json completed. Returns the record."""
    images, new = prepared.batchnorm_images, len(prepared.images)
    if not images:
        print("BatchNorm statistics left as the fine-tune made them (adapt_batchnorm='none')")
        batchnorm = {"images": 0, "layers": 0}
    else:
        batchnorm = recalibrate_checkpoint(ctx.run.checkpoint(ADAPTED_STUDENT), images, ctx.profile.image_size)
        where = (f"the {new} images of the new desert" if len(images) == new
                 else f"the {new} images of the new desert and {len(images) - new} training images (both deserts)")
        print(f"BatchNorm statistics re-estimated on {where} ({batchnorm['layers']} layers)" if batchnorm["layers"]
              else "this student has no BatchNorm layer: its normalisation statistics stay the training desert's")
    write_adaptation_record(ctx, {**prepared.record, "batchnorm": batchnorm})
    return read_adaptation_record(ctx.run)


def adapt_student(ctx, scan: dict, plan: ModelPlan, config: TrainConfig, distill: DistillConfig, adapt: AdaptConfig,
                  num_processes: int | None = None, track=None) -> dict | None:
    """Notebook 05's adaptation cell: `prepare_adaptation`, the adapted student fine-tuned from the
    distilled one (`plan`, `config`, `distill`: the student's) into models/student_adapted/ on every
    GPU (`engine.launch`), then `finish_adaptation`. Returns the adaptation record, or None when
    adaptation is off or skipped. `track`: tracker name(s) for live curves (`tracking.check_trackers`).
    """
    prepared = prepare_adaptation(ctx, scan, plan, config, adapt, device=device_before_launch(num_processes))
    if prepared is None:
        return None
    launch(train_adapted_student, ctx, scan, prepared.plan, prepared.config, distill, prepared.images,
           prepared.threshold, prepared.holdout, num_processes=num_processes, track=track)
    # After the launch, never before: it may run on the GPU, which the launcher's processes need unused.
    return finish_adaptation(ctx, prepared)


def device_before_launch(num_processes: int | None = None):
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
    models = {name: load_model(ctx.run.require(ctx.run.checkpoint(name))) for name in names}
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
