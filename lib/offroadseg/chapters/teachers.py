"""Notebooks 02 and 03: a teacher trained on the run's data, its curves, predictions and checks.

    chapter = teachers.teacher_chapter(ctx, "segformer", "SegFormer", weights_dir=weights, epochs=epochs)
    chapter.train()            # engine.launch(train_teacher, ...): every GPU, resumable
    chapter.plot_curves(); chapter.finish(min_demo_miou=0.3)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import plots
from ..checkpoints import best_row, load_model
from ..dataset import cache_folder
from ..engine import TrainConfig, fit, launch
from ..files import read_json
from ..modelinfo import inference_info
from ..models import build_model, count_parameters
from ..profiles import ModelPlan
from ..scan import read_scan
from . import context
from .assembly import (
    augment_on_device,
    batch_augmentation,
    datasets,
    model_plan,
    sample_predictions,
    segmentation_loss,
    train_config,
)

# Each teacher's notebook (its step in run.json) and how its figures name it.
STEPS = {"segformer": "02_train_segformer", "deeplab": "03_train_deeplab"}
TITLES = {"segformer": "SegFormer", "deeplab": "DeepLabV3+"}
# The training parameters notebooks 02 and 03 take (and `python -m offroadseg.train teacher --set`);
# model, pretrained, epochs, batch_size and lr go to the plan (`plan_overrides`), image_size to the run.
SETTINGS = ("model", "pretrained", "epochs", "batch_size", "lr", "image_size", "ema", "keep_epochs")


def plan_overrides(settings: dict) -> dict:
    """`model_plan` keyword arguments from the parameters of `SETTINGS` (absent or None: the profile's)."""
    return {"name": settings.get("model"),
            **{key: settings.get(key) for key in ("pretrained", "epochs", "batch_size", "lr", "ema", "keep_epochs")}}


def train_teacher(ctx, role: str, scan: dict, plan: ModelPlan, config: TrainConfig, progress: bool = True,
                  track=()) -> list[dict]:
    """Build the model of `plan`, train it on the run's data, checkpoint into models/<role>/. Returns the history.
    `track`: accelerate trackers that get each epoch's scalars (`tracking`).

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
                  sample_weights=scan["sample_weights"], progress=progress, data_fingerprint=scan.get("fingerprint"),
                  batch_transform=batch_augmentation(ctx.profile.image_size) if on_device else None,
                  # Teachers have no TTA of their own: notebook 04 chooses flips for the ensemble.
                  inference_record=inference_info(ctx.profile.image_size, spec=model.spec), track=track)
    return history


@dataclass
class TeacherChapter:
    """A teacher's chapter of notebooks 02 and 03: plan, training, curves, val predictions, checks.

    Each method is one cell of the notebook and prints (or shows and saves under figures/) what
    that cell shows; the notebooks keep their own narrative between the cells.
    """

    ctx: context.Context
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
        return best_row(self.history)

    def _figure(self, name: str):
        return self.ctx.run.figure(f"{self.ctx.step[:2]}_{name}.png")  # 02_curves.png, 03_curves.png, ...

    def describe(self) -> str:
        """The model, its weights and the training settings, as the notebook states them before training."""
        height, width = self.ctx.profile.image_size
        return (f"model: {self.plan.name} {self.plan.options or ''}, pretrained: {self.plan.pretrained}\n"
                f"input: {height}x{width}, epochs: {self.config.epochs}, batch: {self.config.batch_size}")

    def train(self, num_processes: int | None = None, track=None) -> list[dict]:
        """Train (or resume) on every GPU through `engine.launch`; the history is read back from
        history.json, since under the launcher the training function's return value is dropped.
        `track`: the notebook's tracker name(s) for live curves (`tracking.check_trackers`), None: off."""
        launch(train_teacher, self.ctx, self.role, self.scan, self.plan, self.config, num_processes=num_processes,
               track=track)
        self.history = read_json(self.ctx.run.history(self.role))
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
        model = load_model(self.ctx.run.checkpoint(self.role))
        print(f"parameters: {count_parameters(model) / 1e6:.2f} M")
        _, val_set = datasets(self.scan, self.ctx.profile.image_size, augmentation=False)
        grid = plots.prediction_grid(sample_predictions(model, val_set, count=count), f"{self.title}: val predictions")
        plots.save(grid, self._figure("val_predictions"))

    def finish(self, min_demo_miou: float) -> None:
        """The demo's quality floor (asserted on the demo desert only, see `context.demo_check`), the
        checkpoints written, and the notebook's end recorded in run.json."""
        best = self.best
        context.demo_check(self.ctx, f"best val mIoU >= {min_demo_miou}", best["val_miou"] >= min_demo_miou,
                            f"{best['val_miou']:.3f}")
        print("checkpoints:", sorted(path.name for path in self.model_dir.glob("*.pt")))
        self.record()

    def record(self, **extra) -> None:
        """The notebook's (or the training command's) end in run.json: the best epoch and, as backend,
        how the last epoch trained (device, precision, channels_last, loader workers); `extra` besides."""
        best = self.best
        context.finish(self.ctx, best_val_miou=best["val_miou"], best_epoch=best["epoch"],
                        backend=self.history[-1].get("backend"), **extra)


def teacher_chapter(ctx, role: str, title: str | None = None, weights_dir=None, **overrides) -> TeacherChapter:
    """The chapter of teacher `role` for the run of `ctx`: the scan of notebook 01, the profile's plan
    with the notebook's overrides (`model_plan`: name, pretrained, epochs, batch_size, lr) and its
    training settings. `title` names the model in figures (default: `TITLES`)."""
    plan = model_plan(ctx.profile, role, weights_dir=weights_dir, **overrides)
    return TeacherChapter(ctx, role, title or TITLES[role], read_scan(ctx.run.require("scan.json")), plan,
                          train_config(ctx.profile, plan))
