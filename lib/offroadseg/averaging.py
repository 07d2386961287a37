"""Averaged weights: an exponential moving average kept while training (EMA), and a finished run's last epochs averaged.

    ema = WeightEMA(model, decay=0.999)       # a copy of the model; fit does this with TrainConfig.ema
    ema.update(model)                         # after each optimizer step: w_ema <- decay w_ema + (1 - decay) w
    evaluate(ema.module, ...)                 # validated every epoch beside the raw weights

    python -m offroadseg.train average --run demo --model student --last 3   # models/student_avg3/best.pt, scored

EMA (`TrainConfig.ema`, off by default): torch's own `AveragedModel` with `get_ema_multi_avg_fn`, with
`use_buffers=True` so that BatchNorm's running statistics are averaged with the weights, as torch's
documentation does it for EMA (the alternative, `update_bn`, costs a pass over the train set each
epoch). `engine.fit` validates both weights every epoch and keeps the better one in best.pt, saying
which (`weights` in its history rows and in the checkpoint); last.pt holds the raw weights and the
EMA state, so a resumed run goes on with both. bench/RESULTS.md says what it measured on the demo.

Checkpoint averaging: fit keeps the last `TrainConfig.keep_epochs` epochs' weights under
models/<role>/epochs/; `average_checkpoints` averages them (the float tensors; integer buffers
such as BatchNorm's batch count from the last) into a checkpoint `load_model` reads, and the
command (`python -m offroadseg.train average`) scores it on val like any model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .checkpoints import load_checkpoint, save_checkpoint

EPOCHS_DIR = "epochs"  # models/<role>/epochs/epoch_<n>.pt: the last TrainConfig.keep_epochs epochs' weights


class WeightEMA:
    """An exponential moving average of a model's weights and buffers (`AveragedModel`, EMA form)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), e.g. 0.999; got {decay}")
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.eval()  # validated, never trained

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class, spec and state_dict keys as the trained one)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards `model`'s current weights (the first call copies them)."""
        self.averaged.update_parameters(model)

    def to(self, device) -> "WeightEMA":
        self.averaged.to(device)
        return self

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)


def epoch_path(out_dir, epoch: int) -> Path:
    return Path(out_dir) / EPOCHS_DIR / f"epoch_{epoch:03d}.pt"


def keep_epoch(out_dir, epoch: int, state: dict, keep: int) -> Path:
    """Save an epoch's weights (with spec and inference record) as epochs/epoch_<n>.pt and remove all
    but the last `keep` such files; returns the new file."""
    path = epoch_path(out_dir, epoch)
    save_checkpoint({key: state.get(key) for key in ("model", "spec", "inference", "epoch")}, path)
    for old in kept_epochs(out_dir)[:-keep]:
        old.unlink()
    return path


def kept_epochs(out_dir) -> list[Path]:
    """The per-epoch weight files fit kept under `out_dir`/epochs/, oldest first."""
    return sorted((Path(out_dir) / EPOCHS_DIR).glob("epoch_*.pt"))


def average_checkpoints(paths, out_path) -> dict:
    """The average of the weights of several checkpoints of one model, written as a checkpoint.

    Float tensors are averaged; integer ones (BatchNorm's num_batches_tracked) are the last
    checkpoint's. The spec and the inference record come from the last checkpoint, so `load_model`
    and predict read the result like any best.pt. Returns what was written (without tensors).
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(f"averaging needs at least 2 checkpoints, got {len(paths)}")
    checkpoints = [load_checkpoint(path) for path in paths]
    states = [checkpoint["model"] for checkpoint in checkpoints]
    shapes = [{key: tuple(value.shape) for key, value in state.items()} for state in states]
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError(f"{', '.join(map(str, paths))}: not checkpoints of one model (their weights differ in names "
                         "or shapes)")
    averaged = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            averaged[key] = sum(state[key].double() for state in states).div(len(states)).to(last.dtype)
        else:
            averaged[key] = last.clone()
    last = checkpoints[-1]
    epochs = [checkpoint.get("epoch") for checkpoint in checkpoints]
    record = {"averaged_from": [str(path) for path in paths], "epochs": epochs}
    save_checkpoint({"model": averaged, "spec": last.get("spec"), "inference": last.get("inference"),
                     "epoch": epochs[-1], "averaged": record}, Path(out_path))
    return record
