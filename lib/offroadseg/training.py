"""Training a model of the pipeline from a run's scan, and the run's models: the glue the notebooks call.

Everything here is assembly: usable pairs and weights from scan.json, the cached
dataset and augmentation, the model from the profile's plan, the loss with the
scan's class weights, and the shared engine (`offroadseg.engine.fit`); the teachers'
chapter of notebooks 02 and 03 (`teacher_chapter`); the run's trained models and
their ensemble as notebooks 04-06 load and score them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from . import augment, benchmark, pipeline, plots, weights
from .batch_augment import BatchAugment
from .checkpoints import load_model
from .dataset import SegmentationDataset, cache_folder
from .device import default_device
from .distill import (
    DistillationLoss,
    DistillationStudent,
    Distiller,
    cost_split,
)
from .engine import TrainConfig, fit, launch
from .ensemble import Ensemble, TestTimeAugmentation
from .evaluate import evaluate_model, metrics_row, predict_labels
from .files import read_json
from .losses import SegmentationLoss
from .modelinfo import inference_info
from .models import build_model, count_parameters
from .profiles import ModelPlan, Profile
from .runs import ENSEMBLE_MEMBERS, ensemble_weights, read_ensemble
from .scan import read_scan, usable_pairs

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
    plan = getattr(profile, role)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("init_from") == "none":  # None keeps the profile's choice; "none" says: start afresh
        overrides["init_from"] = None
    unknown = set(overrides) - set(plan.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)} for {role}; valid: {sorted(plan.__dataclass_fields__)}")
    plan = replace(plan, **overrides)
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
                         seed=profile.seed, num_workers=profile.workers, prune_decoder=profile.prune_decoder)
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def segmentation_loss(scan: dict) -> SegmentationLoss:
    """CE + Dice + focal (gamma 2) with the scan's class weights, as the reference report trained."""
    return SegmentationLoss(class_weights=torch.tensor(scan["class_weights"], dtype=torch.float32))


def train_teacher(ctx, role: str, scan: dict, plan: ModelPlan, config: TrainConfig, progress: bool = True) -> list[dict]:
    """Build the model of `plan`, train it on the run's data, checkpoint into models/<role>/. Returns the history.

    Not the model: under `engine.launch` on several GPUs each process's return value is pickled
    back to the notebook, and a model on CUDA would travel by CUDA IPC and initialise CUDA there
    (the next launch would then refuse). The trained weights are in models/<role>/best.pt.
    """
    on_device = augment_on_device()
    train_set, val_set = datasets(scan, ctx.profile.image_size, cache_dir=cache_folder(ctx.run.dir), on_device=on_device)
    # Seeded here, not only in fit: the initial weights come from the global RNG as the model is built.
    torch.manual_seed(config.seed)
    model = build_model(plan.name, pretrained=plan.pretrained, **plan.options)
    history = fit(model, train_set, val_set, config, ctx.run.model_dir(role), loss_fn=segmentation_loss(scan),
                  sample_weights=scan["sample_weights"], progress=progress, data_id=scan.get("fingerprint"),
                  batch_transform=batch_augmentation(ctx.profile.image_size) if on_device else None,
                  # Teachers have no TTA of their own: notebook 04 chooses flips for the ensemble.
                  inference=inference_info(ctx.profile.image_size, spec=model.spec))
    return history


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
        image = (augment.denormalize(image_t).permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        rows.append((image, mask_t.numpy().astype(np.uint8), pred, dataset.stem(int(index))))
    return rows


def loader(dataset, batch_size: int = 8, workers: int = 0):
    """A plain evaluation DataLoader (fixed order, no drop)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


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
    return {role: load_model(ctx.run.require(f"models/{role}/best.pt")) for role in ENSEMBLE_MEMBERS}


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
    student = load_model(ctx.run.require("models/student/best.pt"))
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
    teacher = load_model(ctx.run.require(f"models/{plan.init_from}/best.pt"))
    wanted = build_model(plan.name, **plan.options).spec
    if teacher.spec != wanted:
        raise ValueError(f"init_from={plan.init_from!r}: that model is {teacher.spec}, the student plan is {wanted}; "
                         "initialising needs the same architecture (or set init_from=None)")
    return teacher.train()


def distillation_setup(ctx, scan: dict, plan: ModelPlan, alpha: float = 0.5, temperature: float = 2.0,
                       beta: float = 0.5, confidence_threshold: float | None = None):
    """(trainable DistillationStudent, Distiller) for the run's ensemble (weights from ensemble.json).

    loss = alpha * CE(truth) + (1 - alpha) * T^2 * KL(student/T || ensemble/T) + beta * feature matching;
    the hard term is the teachers' loss (CE + Dice + focal with the scan's class weights).
    `confidence_threshold`: unlabelled images join the soft term where the ensemble is that confident
    (`distill.soft_weights`); None: they would count nowhere (distillation without adaptation).
    """
    record = read_ensemble(ctx.run)  # first: a run without it (or without the teachers too) is told to run 04
    ensemble = fuse(load_teachers(ctx), record)
    student = initial_student(ctx, plan)
    model = DistillationStudent(student, ensemble, layers=(-2, -1) if beta > 0 else ())
    distiller = Distiller(ensemble, DistillationLoss(alpha=alpha, temperature=temperature, beta=beta,
                                                     hard_loss=segmentation_loss(scan),
                                                     confidence_threshold=confidence_threshold))
    return model, distiller


def train_student(ctx, scan: dict, plan: ModelPlan, config: TrainConfig, alpha: float = 0.5,
                  temperature: float = 2.0, beta: float = 0.5, progress: bool = True,
                  adapt_images=None, confidence_threshold: float | None = None, role: str = "student",
                  val_pairs=None):
    """Distil the ensemble into the student of `plan` on the shared engine (see `distillation_setup`).

    Checkpoints go to models/<role>/ and reload as the plain student (`checkpoints.load_model`).
    Returns the history, not the model (see `train_teacher`).

    `adapt_images` (image paths, see `adaptation_images`): unlabelled images of the new desert that
    join the train set under the same augmentation, each drawn as often as an average train image;
    they count in the soft term where the ensemble's confidence reaches `confidence_threshold`
    (required with them). `val_pairs` (labelled pairs): validate, and so choose the best epoch, on
    them instead of val (the adapted student chooses on held-out images of the new desert).
    """
    adapt_images = list(adapt_images or [])
    if adapt_images and confidence_threshold is None:
        raise ValueError("adaptation images need a confidence_threshold: without one their pixels count nowhere "
                         "(choose one with adaptation.confidence_rule)")
    torch.manual_seed(config.seed)  # the feature projections (and a student from scratch) start from the global RNG
    model, distiller = distillation_setup(ctx, scan, plan, alpha, temperature, beta,
                                          confidence_threshold if adapt_images else None)
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
                  data_id=scan.get("fingerprint"),
                  batch_transform=batch_augmentation(ctx.profile.image_size) if on_device else None,
                  inference=inference_info(ctx.profile.image_size, tta_flips=flips, spec=model.student.spec))
    return history


def score_pairs(predictors: dict, pairs, image_size, batch_size: int = 4, device=None) -> dict:
    """Each predictor's scores (`evaluate_model`) on labelled `pairs`, masks at their native size."""
    dataset = SegmentationDataset(pairs, augment.eval_transform(image_size, keep_mask_size=True))
    return {name: evaluate_model(predictor, loader(dataset, batch_size), device=device)
            for name, predictor in predictors.items()}


def distillation_cost(ctx, scan: dict, plan: ModelPlan, batch_size: int, **loss_settings) -> dict:
    """Measured ms per batch of the frozen teachers vs the student's step: what caching soft labels could save.

    It runs on the GPU when there is one, so it initialises CUDA in the calling process: a notebook
    calls it after `engine.launch(train_student, ...)`, never before (the launcher forks, and a
    forked process cannot use CUDA its parent initialised).
    """
    model, distiller = distillation_setup(ctx, scan, plan, **loss_settings)
    train_set, _ = datasets(scan, ctx.profile.image_size)
    images, masks = next(iter(DataLoader(train_set, batch_size=batch_size, shuffle=False)))
    device = default_device()
    return cost_split(distiller, model, images.to(device), masks.to(device))


# ------------------------------------------------------------------ the notebooks' chapters


@dataclass
class TeacherChapter:
    """A teacher's chapter of notebooks 02 and 03: plan, training, curves, val predictions, checks.

    Each method is one cell of the notebook and prints (or shows and saves under figures/) what
    that cell shows; the notebooks keep their own narrative between the cells.
    """

    ctx: pipeline.Context
    role: str  # segformer or deeplab: the models/<role>/ folder
    title: str  # how the figures name the model ("SegFormer", "DeepLabV3+")
    scan: dict
    plan: ModelPlan
    config: TrainConfig
    history: list[dict] | None = None

    @property
    def model_dir(self):
        return self.ctx.run.model_dir(self.role)

    @property
    def best(self) -> dict:
        """The history row of the best val mIoU (the epoch best.pt holds)."""
        if not self.history:
            raise RuntimeError(f"{self.role}: no training history yet; run the training cell (train) first")
        return max(self.history, key=lambda row: row["val_miou"])

    def _figure(self, name: str):
        return self.ctx.run.figure(f"{self.ctx.step[:2]}_{name}.png")  # 02_curves.png, 03_curves.png, ...

    def describe(self) -> str:
        """The model, its weights and the training settings, as the notebook states them before training."""
        height, width = self.ctx.profile.image_size
        return (f"model: {self.plan.name} {self.plan.options or ''}, pretrained: {self.plan.pretrained}\n"
                f"input: {height}x{width}, epochs: {self.config.epochs}, batch: {self.config.batch_size}")

    def train(self, num_processes: int | None = None) -> list[dict]:
        """Train (or resume) on every GPU through `engine.launch`; the history is read back from
        history.json, since under the launcher the training function's return value is dropped."""
        launch(train_teacher, (self.ctx, self.role, self.scan, self.plan, self.config), num_processes)
        self.history = read_json(self.model_dir / "history.json")
        return self.history

    def training_summary(self) -> str:
        best, last = self.best, self.history[-1]
        return (f"best val mIoU {best['val_miou']:.3f} at epoch {best['epoch']}; "
                f"{sum(row['seconds'] for row in self.history):.0f} s, {last['images_per_s']:.1f} train images/s")

    def plot_curves(self) -> None:
        plots.save(plots.training_curves(self.history, self.title), self._figure("curves"))

    def plot_per_class_curves(self) -> None:
        plots.save(plots.per_class_iou_curves(self.history, f"{self.title}: per-class val IoU"),
                   self._figure("per_class_iou"))

    def iou_table(self) -> str:
        """Per-class val IoU at the best epoch."""
        return plots.iou_table(self.best["per_class_iou"])

    def plot_val_predictions(self, count: int = 3) -> None:
        """The best checkpoint's parameter count and its predictions on `count` val images."""
        model = load_model(self.model_dir / "best.pt")
        print(f"parameters: {count_parameters(model) / 1e6:.2f} M")
        _, val_set = datasets(self.scan, self.ctx.profile.image_size, augmentation=False)
        grid = plots.prediction_grid(sample_predictions(model, val_set, count=count), f"{self.title}: val predictions")
        plots.save(grid, self._figure("val_predictions"))

    def finish(self, min_demo_miou: float) -> None:
        """The demo's quality floor (asserted on the demo desert only, see `pipeline.demo_check`), the
        checkpoints written, and the notebook's end recorded in run.json."""
        best = self.best
        pipeline.demo_check(self.ctx, f"best val mIoU >= {min_demo_miou}", best["val_miou"] >= min_demo_miou,
                            f"{best['val_miou']:.3f}")
        print("checkpoints:", sorted(path.name for path in self.model_dir.glob("*.pt")))
        # backend: how the last epoch trained (device, precision, channels_last, loader workers), in run.json
        pipeline.finish(self.ctx, best_val_miou=best["val_miou"], best_epoch=best["epoch"],
                        backend=self.history[-1].get("backend"))


def teacher_chapter(ctx, role: str, title: str, weights_dir=None, **overrides) -> TeacherChapter:
    """The chapter of teacher `role` for the run of `ctx`: the scan of notebook 01, the profile's plan
    with the notebook's overrides (`model_plan`: name, pretrained, epochs, batch_size, lr) and its
    training settings."""
    plan = model_plan(ctx.profile, role, weights_dir=weights_dir, **overrides)
    return TeacherChapter(ctx, role, title, read_scan(ctx.run.scan), plan, train_config(ctx.profile, plan))


# ------------------------------------------------- scoring the run's models (notebooks 04-06)


def val_scores(predictors: dict, loader, input_size, progress: bool = True) -> dict:
    """Val scores and cost of each predictor at the model input size, by name: miou, pixel_acc,
    per_class_iou, ms_per_image (median latency at batch 1) and params; the `val` part of
    ensemble.json (notebook 04). `progress` prints one line per predictor as it is measured."""
    results = {}
    for name, predictor in predictors.items():
        result = evaluate_model(predictor, loader)
        timing = benchmark.latency(predictor, input_size=input_size)
        params = count_parameters(predictor)
        results[name] = {"miou": result["miou"], "pixel_acc": result["pixel_acc"], "per_class_iou": result["per_class_iou"],
                         "ms_per_image": timing["median_ms"], "params": params}
        if progress:
            print(f"{name:<13} mIoU {result['miou']:.3f}  pixel acc {result['pixel_acc']:.3f}  "
                  f"{timing['median_ms']:7.1f} ms/img  {params / 1e6:5.2f} M params")
    return results


def compare_models(models: dict, loader, latency_input, device=None, batch_sizes=None, runs: int | None = None):
    """Notebook 06's comparison: each model's scores over `loader` and its latency (batch 1) and
    throughput on a (height, width) `latency_input`, as metrics.json rows (`evaluate.metrics_row`,
    split val), and the full scores by name (confusion matrices for the figures).

    `batch_sizes` of the throughput, None: (1, 2) on a CPU, (1, 2, 4, 8, 16, 32) on a GPU; `runs`
    (timed runs per batch size), None: 2 on a CPU (the demo's time budget), 10 on a GPU.
    """
    device = default_device(device)
    on_cpu = device.type == "cpu"
    batch_sizes = tuple(batch_sizes) if batch_sizes else ((1, 2) if on_cpu else (1, 2, 4, 8, 16, 32))
    runs = runs or (2 if on_cpu else 10)
    rows, results = [], {}
    for name, model in models.items():
        result = evaluate_model(model, loader, device=device)
        timing = benchmark.latency(model, input_size=tuple(latency_input), device=device)
        speed = benchmark.throughput(model, input_size=tuple(latency_input), batch_sizes=batch_sizes, device=device,
                                     warmup=1, runs=runs, measured={1: timing})  # batch 1 is the latency's
        results[name] = result
        rows.append(metrics_row(name, result, count_parameters(model), timing, speed, split="val",
                                device=timing["device"], input_size=latency_input))
    return rows, results


def student_against_ensemble(ctx, student, best: dict) -> dict:
    """Notebook 05's verdict: the student (its best history row `best`, timed now at the model input
    size) beside the ensemble as notebook 04 scored it. `retained`: the share of the ensemble's val
    mIoU the student keeps; `speedup`: how many times faster it runs."""
    ensemble = read_ensemble(ctx.run)["val"]["ensemble"]
    student_ms = benchmark.latency(student, input_size=ctx.profile.image_size)["median_ms"]
    return {"ensemble": ensemble,
            "student": {"miou": best["val_miou"], "ms_per_image": student_ms, "params": count_parameters(student)},
            "retained": best["val_miou"] / ensemble["miou"], "speedup": ensemble["ms_per_image"] / student_ms}
