"""Training a model of the pipeline from a run's scan: the glue notebooks 02, 03 and 05 call.

Everything here is assembly: usable pairs and weights from scan.json, the cached
dataset and augmentation, the model from the profile's plan, the loss with the
scan's class weights, and the shared engine (`offroadseg.engine.fit`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from . import augment
from .data import SegmentationDataset
from .engine import TrainConfig, fit
from .losses import SegmentationLoss
from .models import build_model
from .profiles import ModelPlan, Profile
from .scan import usable_pairs

# Train images are cached a bit larger than the model input, so random crops keep detail.
TRAIN_CACHE_SCALE = 1.5


def model_plan(profile: Profile, role: str, **overrides) -> ModelPlan:
    """The profile's plan for `role` (segformer, deeplab, student) with notebook overrides applied."""
    if role not in ("segformer", "deeplab", "student"):
        raise ValueError(f"unknown role {role!r}: segformer, deeplab or student")
    plan = getattr(profile, role)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - set(plan.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)} for {role}; valid: {sorted(plan.__dataclass_fields__)}")
    return replace(plan, **overrides)


def datasets(scan: dict, image_size: tuple[int, int], augmentation: bool = True):
    """(train, val) datasets of the usable pairs: train augmented, val resized and normalised."""
    height, width = image_size
    cache = (round(height * TRAIN_CACHE_SCALE), round(width * TRAIN_CACHE_SCALE)) if augmentation else image_size
    train_tf = augment.train_transform(size=image_size) if augmentation else augment.eval_transform(image_size)
    train = SegmentationDataset(usable_pairs(scan, "train"), train_tf, cache_size=cache)
    val = SegmentationDataset(usable_pairs(scan, "val"), augment.eval_transform(image_size), cache_size=image_size)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"the scan holds {len(train)} usable train and {len(val)} usable val pairs: "
                         "training needs both (see the problems table of notebook 01)")
    return train, val


def train_config(profile: Profile, plan: ModelPlan, **overrides) -> TrainConfig:
    config = TrainConfig(epochs=plan.epochs, batch_size=plan.batch_size, lr=plan.lr, patience=profile.patience,
                         seed=profile.seed, num_workers=profile.workers, prune_decoder=profile.prune_decoder)
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def segmentation_loss(scan: dict) -> SegmentationLoss:
    """CE + Dice + focal (gamma 2) with the scan's class weights, as the reference report trained."""
    return SegmentationLoss(class_weights=torch.tensor(scan["class_weights"], dtype=torch.float32))


def train_teacher(ctx, role: str, scan: dict, plan: ModelPlan, config: TrainConfig, progress: bool = True):
    """Build the model of `plan`, train it on the run's data, checkpoint into models/<role>/. Returns (model, history)."""
    train_set, val_set = datasets(scan, ctx.profile.image_size)
    model = build_model(plan.name, pretrained=plan.pretrained, **plan.options)
    history = fit(model, train_set, val_set, config, ctx.run.model_dir(role), loss_fn=segmentation_loss(scan),
                  sample_weights=scan["sample_weights"], progress=progress)
    return model, history


@torch.inference_mode()
def predict(model, images: torch.Tensor) -> torch.Tensor:
    """Class indices for a normalised batch, at the input resolution."""
    model.eval()
    return model(images).argmax(dim=1)


def sample_predictions(model, dataset, count: int = 3):
    """(image uint8, truth, prediction, caption) rows for a few evenly spaced samples of `dataset`."""
    indices = np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).round().astype(int)
    rows = []
    for index in indices:
        image_t, mask_t = dataset[int(index)]
        pred = predict(model, image_t[None])[0]
        image = (augment.denormalize(image_t).permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        rows.append((image, mask_t.numpy().astype(np.uint8), pred.numpy().astype(np.uint8), dataset.stem(int(index))))
    return rows
