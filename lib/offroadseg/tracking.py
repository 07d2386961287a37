"""Live training curves through accelerate's experiment trackers (TensorBoard, W&B, MLflow, ...): off by default.

    track = check_trackers(["tensorboard"])           # ValueError naming what to install or choose
    fit(..., track=track)                             # per epoch: loss, lr, val mIoU, per-class IoU
    tensorboard --logdir outputs/<run>/models         # each model's curves under models/<role>/tracking/

history.json stays the record of a run (resuming, the best epoch, the notebooks' figures read it);
a tracker is a live view of the same rows, written on process 0 through accelerate's tracker API
(`Accelerator(log_with=...)`, `init_trackers`, `log`). Each tracker is told the run's training
settings once and one set of scalars per epoch, the epoch as its step, so a resumed run goes on
where the curves stopped.
"""

from __future__ import annotations

from typing import Iterable

from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType

from .classes import CLASS_NAMES

# Where fit's trackers write beside the checkpoints: models/<role>/tracking/.
TRACKING_DIR = "tracking"
# What each epoch logs, from the history row (`engine.history_row`).
SCALARS = ("train_loss", "val_loss", "val_miou", "val_pixel_acc", "lr", "images_per_s", "skipped_steps")


def known_trackers() -> list[str]:
    return [kind.value for kind in LoggerType]


def check_trackers(names: str | Iterable[str] | None) -> tuple[str, ...]:
    """Tracker names as accelerate spells them, each known and installed; "all": every installed one.
    `names`: a list (`--track` repeated), one name (a notebook's `track` parameter) or None (off).

    A ValueError says what is wrong: an unknown name (with the known ones) or a tracker whose
    package is missing (with the pip command).
    """
    installed = [str(getattr(kind, "value", kind)) for kind in get_available_trackers()]
    chosen = []
    for name in [names] if isinstance(names, str) else names or []:
        name = name.strip().lower()
        if name == LoggerType.ALL.value:
            if not installed:
                raise ValueError("--track all: no tracker is installed (e.g. pip install tensorboard)")
            chosen.extend(installed)
        elif name not in known_trackers():
            raise ValueError(f"--track {name}: not a tracker accelerate knows "
                             f"({', '.join(n for n in known_trackers() if n != 'all')})")
        elif name not in installed:
            package = {"tensorboard": "tensorboard", "comet_ml": "comet-ml"}.get(name, name)
            raise ValueError(f"--track {name}: its package is not installed here: pip install {package}")
        else:
            chosen.append(name)
    return tuple(dict.fromkeys(chosen))


def hyperparameters(config: dict) -> dict:
    """Training settings as trackers take them: numbers, strings and booleans (TensorBoard's hparams
    refuse None and lists)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in config.items()}


def start_tracking(accelerator: Accelerator, name: str, config: dict) -> None:
    """Open the trackers the accelerator was made with (`log_with`) for the run `name` (on process 0;
    accelerate does nothing elsewhere), telling them the training settings."""
    if accelerator.log_with:
        accelerator.init_trackers(name, config=hyperparameters(config))


def epoch_scalars(row: dict) -> dict:
    """One epoch's history row as tracker scalars: `SCALARS` and val_iou/<class name> (undefined ones left out)."""
    values = {key: row[key] for key in SCALARS if row.get(key) is not None}
    for name, iou in zip(CLASS_NAMES, row.get("per_class_iou") or []):
        if iou is not None:
            values[f"val_iou/{name}"] = iou
    return values


def log_epoch(accelerator: Accelerator, row: dict) -> None:
    if accelerator.trackers:
        accelerator.log(epoch_scalars(row), step=row["epoch"])


def stop_tracking(accelerator: Accelerator) -> None:
    """Close the trackers (their files complete). Not `accelerator.end_training()`, which also tears
    down the process group that the caller of fit may still need."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
