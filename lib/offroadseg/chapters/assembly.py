"""What notebooks 02-06 build from a run: datasets and loaders, plans and losses, the run's models.

Everything here is assembly, no algorithm: usable pairs and weights from scan.json, the cached
dataset and the augmentation recipe, the model from the profile's plan (with the notebook's
overrides), the loss with the scan's class weights, the training settings; and the run's trained
models as the later chapters load and fuse them. The chapters (`teachers`, `fusion`,
`distillation`, `new_desert`, `evaluation`) call it; the algorithm modules never do.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .. import augment, preprocess, weights
from ..batch_augment import BatchAugment
from ..checkpoints import load_model
from ..dataset import SegmentationDataset, eval_loader
from ..device import default_device
from ..engine import TrainConfig
from ..ensemble import Ensemble, TestTimeAugmentation
from ..evaluate import evaluate_model, predict_labels
from ..losses import SegmentationLoss
from ..models import build_model
from ..profiles import ModelPlan, Profile, with_settings
from ..runs import ENSEMBLE_MEMBERS, ensemble_weights, read_ensemble
from ..scan import usable_pairs

# Train images are cached a bit larger than the model input, so random crops keep detail.
TRAIN_CACHE_SCALE = 1.5


# The augmentation teachers and the student train with, whichever path applies it (`datasets` per sample,
# `batch_augmentation` on the device): one recipe object for both.
AUGMENTATION = augment.AugmentRecipe()


def model_plan(profile: Profile, role: str, weights_dir=None, **overrides) -> ModelPlan:
    """The profile's plan for `role` (segformer, deeplab, student) with notebook overrides applied.

    `weights_dir`: a weights folder (`offroadseg.weights`); the plan's hub id or torchvision weights
    name then becomes the path of its file there, checked now, before any data is loaded. None keeps
    `pretrained` as it is.
    """
    if role not in ("segformer", "deeplab", "student"):
        raise ValueError(f"unknown role {role!r}: segformer, deeplab or student")
    if overrides.get("init_from") == "none":  # None keeps the profile's choice; "none" says: start afresh
        overrides["init_from"] = None
        plan = replace(getattr(profile, role), init_from=None)
    else:
        plan = getattr(profile, role)
    plan = with_settings(plan, **overrides)
    if weights_dir is not None:
        plan = replace(plan, pretrained=weights.resolve(plan.name, plan.pretrained, weights_dir))
    return plan


def augment_on_device() -> bool:
    """Augment whole batches on the GPU (`batch_augment.BatchAugment`) when there is one: per-sample CPU
    augmentation in loader workers is what starves a GPU. On a CPU the per-sample path stays."""
    return default_device().type == "cuda"


def datasets(scan: dict, image_size: tuple[int, int], augmentation: bool = True, cache_dir=None,
             on_device: bool = False):
    """(train, val) datasets of the usable pairs: train augmented, val resized and normalised.

    `cache_dir`: keep the decoded, resized train and val images in memory-mapped caches there (shared
    by every notebook and loader worker, rebuilt when the files change); None keeps them in memory.
    `on_device`: the train set yields uint8 tensors at the cache size, unaugmented, for
    `batch_augmentation` to crop, resize and augment on the device.
    """
    height, width = image_size
    cache = (round(height * TRAIN_CACHE_SCALE), round(width * TRAIN_CACHE_SCALE)) if augmentation else image_size
    if augmentation and on_device:
        train_tf = augment.to_tensors
    else:
        train_tf = augment.train_transform(image_size, AUGMENTATION) if augmentation else augment.eval_transform(image_size)
    train = SegmentationDataset(usable_pairs(scan, "train"), train_tf, cache_size=cache, cache_dir=cache_dir)
    val = val_dataset(scan, image_size, cache_dir=cache_dir)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"the scan holds {len(train)} usable train and {len(val)} usable val pairs: "
                         "training needs both (see the problems table of notebook 01)")
    return train, val


def batch_augmentation(image_size: tuple[int, int]) -> BatchAugment:
    """The device-side counterpart of `datasets(..., on_device=True)`: the same recipe as its train_transform."""
    return BatchAugment(size=image_size, recipe=AUGMENTATION)


def train_config(profile: Profile, plan: ModelPlan, **overrides) -> TrainConfig:
    config = TrainConfig(epochs=plan.epochs, batch_size=plan.batch_size, lr=plan.lr, patience=profile.patience,
                         seed=profile.seed, num_workers=profile.workers, prune_decoder=profile.prune_decoder,
                         ema=plan.ema, keep_epochs=plan.keep_epochs)
    return with_settings(config, **overrides)


def segmentation_loss(scan: dict) -> SegmentationLoss:
    """CE + Dice + focal (gamma 2) with the scan's class weights, as the reference report trained."""
    return SegmentationLoss(class_weights=torch.tensor(scan["class_weights"], dtype=torch.float32))


def sample_predictions(model, dataset, count: int = 3):
    """(image uint8, truth, prediction, caption) rows for a few evenly spaced samples of `dataset`.

    The model runs where it is (`evaluate.predict_labels` puts the images on its device) and is
    left there and in its mode: notebooks call this right after timing the same model.
    """
    indices = np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).round().astype(int)
    rows = []
    for index in indices:
        image_t, mask_t = dataset[int(index)]
        pred = predict_labels(model, image_t[None])[0]
        image = (preprocess.denormalize(image_t).permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        rows.append((image, mask_t.numpy().astype(np.uint8), pred, dataset.stem(int(index))))
    return rows


def val_dataset(scan: dict, image_size: tuple[int, int], native_masks: bool = False, split: str = "val",
                cache_dir=None):
    """Evaluation dataset: images at the model input size; masks at it too, or at their native
    resolution (`native_masks=True`: predictions are upsampled to the masks, the honest way to score).

    `cache_dir`: read the decoded images from a memory-mapped decode cache there, as training's
    val loader does: its workers are started afresh every epoch and would otherwise decode every
    PNG again each time. Not with `native_masks` (the cache holds masks at one size).
    """
    if native_masks and cache_dir is not None:
        raise ValueError("val_dataset: native_masks keeps each mask at its own size, which the decode cache "
                         "(one size for all) cannot hold; pass cache_dir=None")
    transform = augment.eval_transform(image_size, keep_mask_size=native_masks)
    return SegmentationDataset(usable_pairs(scan, split), transform, cache_size=None if native_masks else image_size,
                               cache_dir=cache_dir)


def load_teachers(ctx) -> dict:
    """Both teachers' best checkpoints, in eval mode; a clear error naming the notebook to run when missing."""
    return {role: load_model(ctx.run.require(ctx.run.checkpoint(role))) for role in ENSEMBLE_MEMBERS}


def fuse(teachers: dict, record: dict) -> Ensemble:
    """The teachers fused with the weights of an ensemble.json record (`runs.read_ensemble`)."""
    return Ensemble([teachers[role] for role in ENSEMBLE_MEMBERS], ensemble_weights(record))


def evaluation_models(ctx) -> dict:
    """Every model of the run that notebook 06 compares, by the name its metrics.json row takes: both
    teachers, their ensemble and the distilled student, each also with the TTA notebook 04 chose.

    A clear error naming the notebook to run first when ensemble.json or a checkpoint is missing.
    """
    record = read_ensemble(ctx.run)
    teachers = load_teachers(ctx)
    student = load_model(ctx.run.require(ctx.run.checkpoint("student")))
    ensemble = fuse(teachers, record)
    flips, scales = tuple(record["tta"]["flips"]), record["tta"]["scales"]
    return {
        **teachers,
        "ensemble": ensemble,
        "ensemble_tta": TestTimeAugmentation(ensemble, flips=flips, scales=scales),
        "student": student,
        "student_tta": TestTimeAugmentation(student, flips=flips, scales=scales),
    }


def initial_student(ctx, plan: ModelPlan):
    """The student before distillation: a copy of the model `plan.init_from` names (a teacher, or the
    distilled "student" for the adapted one; same architecture required), else `plan`'s model from its
    pretrained weights or from scratch."""
    if plan.init_from is None:
        return build_model(plan.name, pretrained=plan.pretrained, **plan.options)
    teacher = load_model(ctx.run.require(ctx.run.checkpoint(plan.init_from)))
    wanted = build_model(plan.name, **plan.options).spec
    if teacher.spec != wanted:
        raise ValueError(f"init_from={plan.init_from!r}: that model is {teacher.spec}, the student plan is {wanted}; "
                         "initialising needs the same architecture (or set init_from=None)")
    return teacher.train()


def score_pairs(predictors: dict, pairs, image_size, batch_size: int = 4, device=None) -> dict:
    """Each predictor's scores (`evaluate_model`) on labelled `pairs`, masks at their native size."""
    dataset = SegmentationDataset(pairs, augment.eval_transform(image_size, keep_mask_size=True))
    return {name: evaluate_model(predictor, eval_loader(dataset, batch_size), device=device)
            for name, predictor in predictors.items()}
