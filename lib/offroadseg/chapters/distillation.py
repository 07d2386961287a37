"""Notebook 05, first part: the ensemble distilled into the student, and the verdict against it.

    distill = distillation.distill_config(ctx.profile, alpha=alpha)      # the profile's DistillConfig, overridden
    engine.launch(distillation.train_student, ctx, scan, plan, config, distill)
    outcome = distillation.student_against_ensemble(ctx, student, best)
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from .. import benchmark
from ..checkpoints import best_row
from ..dataset import SegmentationDataset, cache_folder
from ..device import default_device
from ..distill import DistillationLoss, DistillationStudent, Distiller, cost_split
from ..engine import TrainConfig, fit
from ..files import read_json
from ..modelinfo import inference_info
from ..models import count_parameters
from ..profiles import DistillConfig, ModelPlan, Profile, with_settings
from ..runs import read_ensemble
from .assembly import (
    augment_on_device,
    batch_augmentation,
    datasets,
    fuse,
    initial_student,
    load_teachers,
    segmentation_loss,
)

# Notebook 05 (its step in run.json) and the parameters of its student (`python -m offroadseg.train student
# --set` takes the same): the plan's (`plan_overrides`), the distillation's (`distill_overrides`), image_size.
STEP = "05_distill"
SETTINGS = ("model", "pretrained", "student_init", "epochs", "batch_size", "lr", "image_size", "ema", "keep_epochs",
            "alpha", "temperature", "beta")


def plan_overrides(settings: dict) -> dict:
    """The student's `model_plan` keyword arguments from notebook 05's parameters (absent or None: the profile's)."""
    return {"name": settings.get("model"), "init_from": settings.get("student_init"),
            **{key: settings.get(key) for key in ("pretrained", "epochs", "batch_size", "lr", "ema", "keep_epochs")}}


def distill_overrides(settings: dict) -> dict:
    """`distill_config` keyword arguments from notebook 05's parameters."""
    return {key: settings.get(key) for key in ("alpha", "temperature", "beta")}


def student_summary(ctx, role: str = "student") -> dict:
    """The best history row of the student in models/<role>/ (its history.json), with the backend it trained on."""
    history = read_json(ctx.run.require(ctx.run.history(role)))
    return {**best_row(history), "backend": history[-1].get("backend")}


def distill_config(profile: Profile, **settings) -> DistillConfig:
    """The profile's DistillConfig with notebook 05's parameters (alpha, temperature, beta) that are not None."""
    return with_settings(profile.distill, **settings)


def distillation_setup(ctx, scan: dict, plan: ModelPlan, distill: DistillConfig, confidence_threshold: float | None = None):
    """(trainable DistillationStudent, Distiller) for the run's ensemble (weights from ensemble.json).

    The loss is `distill`'s (`profiles.DistillConfig`), its hard term the teachers' loss (CE + Dice +
    focal with the scan's class weights).
    `confidence_threshold`: unlabelled images join the soft term where the ensemble is that confident
    (`distill.soft_weights`); None: they would count nowhere (distillation without adaptation).
    """
    record = read_ensemble(ctx.run)  # first: a run without it (or without the teachers too) is told to run 04
    ensemble = fuse(load_teachers(ctx), record)
    student = initial_student(ctx, plan)
    model = DistillationStudent(student, ensemble, layers=(-2, -1) if distill.beta > 0 else ())
    distiller = Distiller(ensemble, DistillationLoss(alpha=distill.alpha, temperature=distill.temperature, beta=distill.beta,
                                                     hard_loss=segmentation_loss(scan),
                                                     confidence_threshold=confidence_threshold))
    return model, distiller


def train_student(ctx, scan: dict, plan: ModelPlan, config: TrainConfig, distill: DistillConfig, progress: bool = True,
                  adapt_images=None, confidence_threshold: float | None = None, role: str = "student",
                  val_pairs=None, track=()):
    """Distil the ensemble into the student of `plan` on the shared engine (see `distillation_setup`).

    Checkpoints go to models/<role>/ and reload as the plain student (`checkpoints.load_model`).
    Returns the history, not the model (see `teachers.train_teacher`).

    `adapt_images` (image paths, see `new_desert.adaptation_images`): unlabelled images of the new desert that
    join the train set under the same augmentation, each drawn as often as an average train image;
    they count in the soft term where the ensemble's confidence reaches `confidence_threshold`
    (required with them). `val_pairs` (labelled pairs): validate, and so choose the best epoch, on
    them instead of val (the adapted student chooses on held-out images of the new desert). `track`:
    accelerate trackers that get each epoch's scalars (`tracking`).
    """
    adapt_images = list(adapt_images or [])
    if adapt_images and confidence_threshold is None:
        raise ValueError("adaptation images need a confidence_threshold: without one their pixels count nowhere "
                         "(choose one with new_desert.confidence_rule)")
    torch.manual_seed(config.seed)  # the feature projections (and a student from scratch) start from the global RNG
    model, distiller = distillation_setup(ctx, scan, plan, distill, confidence_threshold if adapt_images else None)
    flips = read_ensemble(ctx.run)["tta"]["flips"]  # the flips notebook 04 chose on val
    on_device = augment_on_device()
    cache_dir = cache_folder(ctx.run.dir)
    train_set, val_set = datasets(scan, ctx.profile.image_size, cache_dir=cache_dir, on_device=on_device)
    if val_pairs is not None:
        val_set = SegmentationDataset(list(val_pairs), val_set.transform, cache_size=val_set.cache_size,
                                      cache_dir=cache_dir)
    sample_weights = scan["sample_weights"]
    if adapt_images:
        unlabelled = SegmentationDataset([(path, None) for path in adapt_images], train_set.transform,
                                         cache_size=train_set.cache_size, cache_dir=cache_dir)
        labelled = list(sample_weights) if sample_weights is not None else [1.0] * len(train_set)
        sample_weights = labelled + [float(np.mean(labelled))] * len(unlabelled)
        train_set = ConcatDataset([train_set, unlabelled])
    history = fit(model, train_set, val_set, config, ctx.run.model_dir(role), loss_fn=segmentation_loss(scan),
                  sample_weights=sample_weights, step_loss=distiller.step_loss, progress=progress,
                  data_fingerprint=scan.get("fingerprint"),
                  batch_transform=batch_augmentation(ctx.profile.image_size) if on_device else None,
                  inference_record=inference_info(ctx.profile.image_size, tta_flips=flips, spec=model.student.spec),
                  track=track)
    return history


def distillation_cost(ctx, scan: dict, plan: ModelPlan, distill: DistillConfig, batch_size: int) -> dict:
    """Measured ms per batch of the frozen teachers vs the student's step: what caching soft labels could save.

    It runs on the GPU when there is one, so it initialises CUDA in the calling process: a notebook
    calls it after `engine.launch(train_student, ...)`, never before (the launcher forks, and a
    forked process cannot use CUDA its parent initialised).
    """
    model, distiller = distillation_setup(ctx, scan, plan, distill)
    train_set, _ = datasets(scan, ctx.profile.image_size)
    images, masks = next(iter(DataLoader(train_set, batch_size=batch_size, shuffle=False)))
    device = default_device()
    return cost_split(distiller, model, images.to(device), masks.to(device))


def student_against_ensemble(ctx, student, best: dict) -> dict:
    """Notebook 05's verdict: the student (its best history row `best`, timed now at the model input
    size) beside the ensemble as notebook 04 scored it. `retained`: the share of the ensemble's val
    mIoU the student keeps; `speedup`: how many times faster it runs."""
    ensemble = read_ensemble(ctx.run)["val"]["ensemble"]
    student_ms = benchmark.latency(student, input_size=ctx.profile.image_size)["median_ms"]
    return {"ensemble": ensemble,
            "student": {"miou": best["val_miou"], "ms_per_image": student_ms, "params": count_parameters(student)},
            "retained": best["val_miou"] / ensemble["miou"], "speedup": ensemble["ms_per_image"] / student_ms}
