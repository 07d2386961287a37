"""One training loop for every model of the project: the teachers and the distilled student.

`fit` reads top to bottom, in the manner of transformers' run_semantic_segmentation_no_trainer.py:
set-up (accelerator, resume weights, loaders, optimizer), then per epoch a visible train loop on
Accelerate, a validation pass, the history row and the checkpoints. What it changes outside
itself is put back however it ends, an exception included: torch's global settings
(`training_backends`), the decoder pruning (`pruning.pruned_decoder`, the one optional hook) and
accelerate's references to the model. Its parts live beside it: the checkpoint files and resuming
in `checkpoints`, the sample order and the per-epoch seeds in `sampling`, the guarded step, the
skip rule and the fault messages in `train_step`.

Multi-GPU: run `fit` under `accelerate launch` / torchrun, or from a notebook through
`launch(fn, *args, **kwargs)`. `batch_size` is per process, so the global batch is batch_size x
processes; the learning-rate schedule is counted in single-process batches (accelerate
steps the scheduler once per process per optimizer step), so it spans the same epochs
whatever the number of processes.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator, notebook_launcher
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import checkpoints
from .averaging import WeightEMA, keep_epoch
from .classes import NUM_CLASSES
from .evaluate import evaluate_model
from .files import write_json
from .losses import cross_entropy
from .pruning import pruned_decoder
from .sampling import make_loaders, seed_epoch
from .tracking import TRACKING_DIR, check_trackers, log_epoch, start_tracking, stop_tracking
from .train_step import (
    SkippedSteps,
    StepStats,
    backend_line,
    backend_record,
    guarded_step,
    make_accelerator,
    memory_format,
    out_of_memory_advice,
    training_backends,
    trial_line,
)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8  # per process; the global batch is batch_size x number of processes
    lr: float = 6e-5  # peak learning rate, reached at the end of the warm-up
    weight_decay: float = 0.01  # AdamW; biases and norm weights get none
    warmup_epochs: float = 1.0  # linear warm-up (may be fractional), then cosine decay ...
    min_lr_ratio: float = 0.01  # ... down to min_lr_ratio * lr at the last step
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    precision: str = "auto"  # auto (bf16 / fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    patience: int = 0  # early stop after this many epochs without a val mIoU gain; 0 = off
    seed: int = 0
    num_workers: int = 0  # DataLoader worker processes asked for (per loader; `sampling.loader_workers` caps it)
    prune_decoder: float = 0.0  # fraction of decoder conv/linear weights L1-pruned; 0 = off
    max_bad_steps: int = 5  # this many non-finite steps in a row stop training (TrainingDiverged)
    channels_last: bool | None = None  # NHWC activations (tensor cores' layout); None = where the GPU has tensor cores
    compile: bool = False  # torch.compile the model: minutes of compiling, so it pays only on long GPU runs
    sync_every: int = 50  # read the steps' losses and skip verdicts from the device every this many steps
    ema: float = 0.0  # decay of a moving average of the weights (e.g. 0.999), validated beside them; 0 = off
    keep_epochs: int = 0  # the last this many epochs' weights kept in epochs/ (checkpoint averaging); 0 = none


# ------------------------------------------------------------------ optimisation set-up


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices and conv kernels, none on biases and norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def warmup_cosine(warmup_steps: float, total_steps: float, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier per scheduler step: linear warm-up to 1, then cosine down to min_lr_ratio."""

    # A plain function, not a callable object: LambdaLR then leaves it out of its state_dict,
    # so a resumed run with more epochs keeps the new, longer schedule.
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)  # never 0, so the first step is not wasted
        progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def make_optimizer(model: nn.Module, config: TrainConfig, steps_per_epoch: int):
    """(AdamW, its warm-up + cosine LambdaLR, the LR multiplier): the multiplier, for a resume to re-apply."""
    # Fused: one kernel per step, and it can skip a bad step on the device (see train_step.guarded_step).
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, fused=True)
    # Counted in single-process batches: accelerate steps the scheduler once per process.
    lr_multiplier = warmup_cosine(config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch,
                                  config.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier), lr_multiplier


# ---------------------------------------------------------------------------- training


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    config: TrainConfig,
    out_dir,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy,
    sample_weights: Sequence[float] | None = None,
    step_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    data_fingerprint: str | None = None,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    inference_record: dict | None = None,
    track: Sequence[str] = (),
) -> list[dict]:
    """Train `model` on `train_set`, validate on `val_set` each epoch, checkpoint into `out_dir`.

    Datasets yield (image float tensor 3xHxW, mask int64 HxW with 255 = ignore).
    `loss_fn(logits, masks)` is the training and validation loss. `step_loss(model, images,
    masks) -> loss`, when given, replaces the training forward + loss (distillation runs its
    frozen teachers inside it; it runs under the same autocast, and `images` are already on
    the device). `sample_weights` (one per train sample) makes each epoch a weighted draw with
    replacement of len(train_set) samples. `data_fingerprint` (the scan's) is saved with the
    checkpoints, so resuming on changed data is refused rather than mixing two datasets.
    `batch_transform(images, masks) -> (images, masks)` runs on each training batch once it is on
    the device (`batch_augment.BatchAugment`: augmentation on the GPU, the train set then yields uint8).
    `inference_record` (`modelinfo.inference_info(...)`: input size, normalisation, class table, TTA
    flips) is stored in every checkpoint under "inference", so the model file describes itself.
    `track`: accelerate tracker name(s) (`tracking.check_trackers`) that get each epoch's scalars live,
    written under out_dir/tracking/ (TensorBoard's event files); history.json stays the record.

    If out_dir/last.pt exists, training resumes after its epoch (settings must match, see
    checkpoints.RESUMABLE_CHANGES); a finished run returns its history without training.

    Returns the history, one dict per epoch: epoch, train_loss, val_loss, val_miou,
    val_pixel_acc, per_class_iou (10, None where undefined), lr, seconds, images_per_s,
    skipped_steps, best_epoch (the best so far: `checkpoints.best_row`), backend (how it trained).
    `model` is left with the last epoch's weights (pruning made permanent); use best.pt for the
    best ones.
    """
    if len(val_set) == 0:
        raise ValueError("the val set is empty; fit needs one to measure mIoU")
    if config.sync_every < 1:
        raise ValueError(f"sync_every must be at least 1 (steps between reads of the losses), got {config.sync_every}")
    out_dir = Path(out_dir)
    accelerator = make_accelerator(config.precision, check_trackers(track), out_dir / TRACKING_DIR)
    set_seed(config.seed)
    say = accelerator.print
    setup = {"spec": getattr(model, "spec", None), "num_processes": accelerator.num_processes,
             "train_samples": len(train_set), "weighted_sampling": sample_weights is not None,
             "data": data_fingerprint}
    checkpoint, resume_path = load_resume_weights(model, out_dir, config, setup)  # before pruning finds its mask
    loaders = make_loaders(train_set, val_set, config.batch_size, config.seed, config.num_workers, sample_weights,
                           accelerator.process_index, accelerator.num_processes, accelerator.device.type == "cuda")

    with pruned_decoder(model, config.prune_decoder), training_backends(accelerator.device):
        optimizer, scheduler, _ = make_optimizer(model, config, len(loaders.train))  # on the pruned weights
        layout = memory_format(config, accelerator.device)
        model = model.to(memory_format=layout)
        ema = WeightEMA(model, config.ema).to(accelerator.device) if config.ema else None  # before compile: a plain copy
        if config.compile:
            model.compile()  # in place: state_dict keys and checkpoints stay those of the plain model
        prepared, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, loaders.train, scheduler)
        try:
            start_tracking(accelerator, out_dir.name, asdict(config))
            if len(train_loader) == 0:
                raise ValueError(f"{len(train_set)} train samples make no full batch of {config.batch_size} "
                                 f"on each of {accelerator.num_processes} processes; lower batch_size")
            record = resume(checkpoint, resume_path, optimizer, scheduler, accelerator, config.epochs, ema)
            del checkpoint  # its tensors are loaded; free the memory
            backend = backend_record(accelerator, config, layout, loaders.workers)
            if record.start_epoch <= config.epochs:  # a batch too large for the GPU shows here, in seconds
                say(backend_line(backend))
                with out_of_memory_advice(config, None, record.start_epoch, 0, out_dir):
                    say(trial_line(model, train_set, config, accelerator, layout, batch_transform,
                                   step_loss or (lambda m, x, y: loss_fn(m(x), y))))
            skips = SkippedSteps(config, out_dir, record.skipped_steps, accelerator.scaler,
                                 warn=accelerator.is_main_process)

            for epoch in range(record.start_epoch, config.epochs + 1):
                if config.patience and epoch - 1 - record.best_epoch >= config.patience:
                    say(f"early stop: no val mIoU gain for {config.patience} epochs "
                        f"(best {record.best_miou:.4f} at epoch {record.best_epoch})")
                    break
                started = time.perf_counter()

                # the training pass: no host sync per step (losses and verdicts are read every sync_every steps)
                prepared.train()
                train_loader.set_epoch(epoch)  # the epoch's sample order and the samples' seeds
                seed_epoch(config.seed, epoch, accelerator.process_index)  # every other draw of the epoch
                stats = StepStats.zeros(accelerator.device)
                skips.start_epoch()
                bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.epochs}", leave=False, dynamic_ncols=True,
                           disable=not (progress and accelerator.is_main_process))
                for step, (images, masks) in enumerate(bar):
                    if batch_transform is not None:
                        images, masks = batch_transform(images, masks)
                    images = images.contiguous(memory_format=layout)
                    with out_of_memory_advice(config, images, epoch, step, out_dir):
                        loss, verdict = guarded_step(prepared, optimizer, accelerator, images, masks, loss_fn,
                                                     step_loss, config.grad_clip)
                    scheduler.step()  # skipped steps too: the schedule counts batches, so it spans the same epochs
                    if ema is not None:
                        ema.update(model)
                    stats.add(loss, verdict, len(images))
                    skips.record(epoch, step, verdict)
                    if skips.due():
                        skips.read()  # warnings; TrainingDiverged
                        if not bar.disable:
                            bar.set_postfix(loss=f"{stats.mean_loss():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                            refresh=False)
                skips.read()
                bar.close()
                train = TrainedEpoch(*stats.totals(accelerator), time.perf_counter() - started, skips.in_epoch,
                                     skips.overflows_in_epoch)

                # validation, on the plain module (and its moving average), with process 0's BatchNorm statistics
                share_process_0_buffers(model, accelerator, ema)
                with out_of_memory_advice(config, None, epoch, None, out_dir):
                    val = evaluate(model, loaders.val, loss_fn, accelerator)
                    ema_val = evaluate(ema.module, loaders.val, loss_fn, accelerator) if ema else None

                use_ema = ema_val is not None and ema_val["miou"] > val["miou"]  # the better weights count for the epoch
                row = history_row(epoch, train, ema_val if use_ema else val, scheduler.get_last_lr()[0], started,
                                  backend, None if ema is None else {"raw_val_miou": val["miou"], "ema_val_miou":
                                                                     ema_val["miou"], "weights": "ema" if use_ema else "raw"})
                val = ema_val if use_ema else val
                best_weights = ema.module if use_ema else model
                improved = record.add(row, val["miou"], skips.total)
                if accelerator.is_main_process:
                    save_epoch(out_dir, record, improved, model, optimizer, scheduler, accelerator.scaler,
                               config, setup, inference_record, best_weights, ema)
                log_epoch(accelerator, row)
                say(epoch_line(row, config.epochs, train, val, improved))
        finally:
            stop_tracking(accelerator)
            # the plain module handed back: no autocast wrapper around its forward, no references kept
            accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
            accelerator.free_memory()
    accelerator.wait_for_everyone()  # every process returns once process 0's files are complete
    return record.history


# --------------------------------------------------------------------- fit's named steps


@dataclass
class RunRecord:
    """Where the run stands: what each checkpoint saves and a resumed run starts from."""

    history: list[dict] = field(default_factory=list)
    best_miou: float = -math.inf
    best_epoch: int = 0
    skipped_steps: int = 0  # over the whole run, resumed epochs included
    start_epoch: int = 1  # the first epoch this fit call trains

    def add(self, row: dict, val_miou: float, skipped_steps: int) -> bool:
        """Append a finished epoch's history row (with the best epoch so far); True when its val
        mIoU is the best so far (the first of equal ones stays the best)."""
        improved = not math.isnan(val_miou) and val_miou > self.best_miou
        if improved:
            self.best_miou, self.best_epoch = val_miou, row["epoch"]
        row["best_epoch"] = self.best_epoch or None
        self.history.append(row)
        self.skipped_steps = skipped_steps
        return improved


@dataclass
class TrainedEpoch:
    loss: float  # mean loss of the applied steps, all processes
    images: float  # images trained on, all processes (skipped steps included)
    seconds: float  # the training pass alone
    skipped: int  # steps skipped in this epoch
    overflows: int  # of them, fp16 overflows while the grad scaler calibrated (no fault)


def load_resume_weights(model: nn.Module, out_dir: Path, config: TrainConfig,
                        setup: dict) -> tuple[dict | None, Path | None]:
    """The checkpoint to resume from and its path ((None, None) for a fresh run), its weights put in
    `model` (before pruning, which then finds the saved zeros, and before the optimizer: the
    optimizer, schedule and grad scaler follow in `resume`, once accelerate has prepared them)."""
    checkpoint, path = checkpoints.load_resume_checkpoint(out_dir)
    if checkpoint is not None:
        checkpoints.check_resumable(checkpoint, asdict(config), setup, path, defaults=asdict(TrainConfig()))
        model.load_state_dict(checkpoint["model"])
    return checkpoint, path


def resume(checkpoint: dict | None, path: Path | None, optimizer, scheduler, accelerator: Accelerator,
           epochs: int, ema: WeightEMA | None = None) -> RunRecord:
    """A fresh record, or the checkpoint's, with its optimizer, schedule, grad scaler and weight average restored."""
    if checkpoint is None:
        return RunRecord()
    checkpoints.restore_training_state(checkpoint, optimizer, scheduler, accelerator.scaler)
    if ema is not None:
        ema.load_state_dict(checkpoint["ema"])
    record = RunRecord(list(checkpoint["history"]), checkpoint["best_miou"], checkpoint["best_epoch"],
                       checkpoint["skipped_steps"], start_epoch=checkpoint["epoch"] + 1)
    if record.start_epoch > epochs:
        accelerator.print(f"{path} has finished {record.start_epoch - 1} epochs (of {epochs} asked); nothing to train")
    else:
        accelerator.print(f"resuming {path} at epoch {record.start_epoch}/{epochs}")
    return record


def share_process_0_buffers(model: nn.Module, accelerator: Accelerator, ema: WeightEMA | None = None) -> None:
    """DDP copies process 0's BatchNorm buffers at the start of each forward, so after the last
    step each process holds buffers updated from its own batch (and averages of them): take
    process 0's, so validation and the checkpoint see one model."""
    if accelerator.num_processes > 1:
        for buffer in [*model.buffers(), *(ema.module.buffers() if ema else ())]:
            torch.distributed.broadcast(buffer, src=0)


def _json_safe(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def history_row(epoch: int, train: TrainedEpoch, val: dict, lr: float, started: float, backend: dict,
                averages: dict | None = None) -> dict:
    """One epoch of history.json (NaN scores as null); `started` is when the epoch began, `backend`
    how it trained (`backend_record`). With a moving average of the weights, `val` holds the scores
    of the better weights of the two (those a best.pt of this epoch holds), and `averages` adds
    raw_val_miou, ema_val_miou and weights ("ema" or "raw"). `RunRecord.add` adds the best epoch so far."""
    row = {
        "epoch": epoch,
        "train_loss": _json_safe(train.loss),
        "val_loss": _json_safe(val["loss"]),
        "val_miou": _json_safe(val["miou"]),
        "val_pixel_acc": _json_safe(val["pixel_acc"]),
        "per_class_iou": [_json_safe(v) for v in val["iou"]],
        "lr": lr,
        "seconds": round(time.perf_counter() - started, 3),
        "images_per_s": round(train.images / max(train.seconds, 1e-9), 2),
        "skipped_steps": train.skipped,
        "backend": backend,
    }
    row.update({key: _json_safe(value) for key, value in (averages or {}).items()})
    return row


def save_epoch(out_dir: Path, record: RunRecord, improved: bool, model: nn.Module, optimizer, scheduler, scaler,
               config: TrainConfig, setup: dict, inference_record: dict | None, best_weights: nn.Module,
               ema: WeightEMA | None) -> None:
    """best.pt (`best_weights`, the raw model or its moving average) when `improved`, last.pt (the raw
    weights and the average's state; the old one kept as previous.pt), the epoch's weights under
    epochs/ (the last `keep_epochs`), history.json: every file replaced atomically (process 0 only)."""
    epoch = record.history[-1]["epoch"]

    def state(weights: nn.Module) -> dict:
        return {**checkpoints.checkpoint_state(
            epoch=epoch, model=weights, spec=setup["spec"], optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            best_miou=record.best_miou, best_epoch=record.best_epoch, skipped_steps=record.skipped_steps,
            history=record.history, config=asdict(config), setup=setup, inference=inference_record),
            "weights": "ema" if weights is not model else "raw", "ema": ema.state_dict() if ema else None}

    last = state(model)
    if improved:
        checkpoints.save_checkpoint(last if best_weights is model else state(best_weights), out_dir / "best.pt")
    checkpoints.save_checkpoint(last, out_dir / "last.pt", keep_previous=True)
    if config.keep_epochs:
        keep_epoch(out_dir, epoch, last, config.keep_epochs)
    write_json(out_dir / "history.json", record.history)


def epoch_line(row: dict, epochs: int, train: TrainedEpoch, val: dict, improved: bool) -> str:
    ema = f" (raw {row['raw_val_miou']:.4f}, EMA {row['ema_val_miou']:.4f})" if "weights" in row else ""
    return (f"epoch {row['epoch']}/{epochs}  train_loss {train.loss:.4f}  val_loss {val['loss']:.4f}  "
            f"val_mIoU {val['miou']:.4f}{ema}  pixel_acc {val['pixel_acc']:.4f}  lr {row['lr']:.2e}  "
            f"{row['seconds']:.1f}s  {row['images_per_s']:.1f} img/s" + ("  *best" if improved else "")
            + (f"  ({train.skipped} steps skipped" + (f", {train.overflows} of them fp16 overflows while the grad "
                                                        f"scaler calibrated" if train.overflows else "") + ")"
               if train.skipped else ""))


# ---------------------------------------------------------------------------- validation


def evaluate(model: nn.Module, loader: DataLoader, loss_fn, accelerator: Accelerator,
             num_classes: int = NUM_CLASSES) -> dict:
    """Val loss and scores over all processes' shares of `loader`: the one scorer
    (`evaluate.evaluate_model`) with training's hooks (the loss, accelerate's autocast, and the
    confusion matrices and loss sums summed over processes).

    `model` is the unwrapped module: no DDP collectives inside the forward, so processes may
    hold different numbers of val batches. It is left in eval mode.
    """
    model.eval()  # the scorer puts the model back in the mode it found it in: eval, as fit hands it back
    return evaluate_model(model, loader, accelerator.device, num_classes, loss_fn=loss_fn,
                          reduce=functools.partial(accelerator.reduce, reduction="sum"),
                          autocast=accelerator.autocast)


def launch(fn: Callable, *args, num_processes: int | None = None, **kwargs):
    """Run `fn(*args, **kwargs)` on every GPU from a notebook: accelerate's notebook_launcher when
    there is more than one (e.g. Kaggle's two T4s), a plain call otherwise (returning its result).

    notebook_launcher forks, and a forked process cannot use CUDA once its parent has
    initialised it: so with several processes, nothing in the notebook may touch CUDA before
    (no model or tensor moved to the GPU, no benchmark), and `fn` must return CPU-only data
    (`train_teacher` returns the history, not the model), since each process's return value is
    pickled back to the notebook and CUDA tensors would travel by CUDA IPC, initialising CUDA
    there. When CUDA is already initialised, this refuses with what to do rather than training on
    one GPU. Under the launcher `fn`'s return value is dropped: read results from the run folder
    (history.json, best.pt). `num_processes` None: every visible GPU.
    """
    if num_processes is None:
        num_processes = torch.cuda.device_count()  # does not initialise CUDA
    call = functools.partial(fn, **kwargs) if kwargs else fn
    if num_processes > 1:
        if torch.cuda.is_initialized():
            raise RuntimeError(
                f"cannot train on {num_processes} GPUs: CUDA is already initialised in this kernel (a cell before "
                f"this one used the GPU), and the launcher's forked processes cannot use it; restart the kernel and "
                f"run the cells in order (training before any cell that uses the GPU), or set num_processes=1"
            )

        notebook_launcher(call, args, num_processes=num_processes)
        return None
    return call(*args)
