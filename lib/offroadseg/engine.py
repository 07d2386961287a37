"""One training loop for every model of the project: the teachers and the distilled student.

`fit` is meant to be read top to bottom, in the manner of transformers'
run_semantic_segmentation_no_trainer.py: set-up, optional resume, then per epoch a
visible train loop on Accelerate, a validation pass, early stopping and checkpoints.

Run folder (outputs/<run>/models/<name>/ = `out_dir`):
    best.pt       the checkpoint of the epoch with the best val mIoU
    last.pt       the checkpoint of the latest finished epoch (resume point)
    previous.pt   the one before it: the fallback when last.pt is found damaged
    history.json  one dict per finished epoch (see `fit`)
A checkpoint is a dict: model (CPU state_dict, decoder pruning folded in), spec, optimizer,
scheduler, scaler, epoch, best_miou, best_epoch, skipped_steps, history, rng, config, setup,
inference (what predicting on new images needs, `offroadseg.modelinfo`; None if not given).
It holds only plain types and tensors, so it loads with torch.load(weights_only=True).
Every file is replaced atomically, and every read checks the CRC32 of each of the archive's
members first (torch.load itself reads flipped bytes without complaint), so a damaged file
is reported as such, never loaded as if it were fine.

Faults: a non-finite loss or gradient skips the step with a warning (with fp16, so does a step the
grad scaler skips as an overflow); `max_bad_steps` of them in a row stop training
(`TrainingDiverged`) with advice. Running out of memory stops it with a message suggesting a
smaller batch or input size. Either way last.pt holds the last finished epoch.

No host sync per step: a step's loss and its verdict (applied, or skipped and why) stay on the
device, and the update of a bad step is dropped by the fused AdamW kernel itself (`_guarded_step`).
The host reads them every `sync_every` steps, every step while a run of bad steps is open, and
at the epoch's end (`_SkippedSteps`, `_StepStats`), so the GPU is never left waiting for Python.

Multi-GPU: run `fit` under `accelerate launch` / torchrun, or from a notebook through
`launch(fn, args)`. `batch_size` is per process, so the global batch is batch_size x
processes; the learning-rate schedule is counted in single-process batches (accelerate
steps the scheduler once per process per optimizer step), so it spans the same epochs
whatever the number of processes.

Reproducibility: the order of each epoch's samples is a pure function of (seed, epoch), the
same on every process; every other random draw of an epoch (augmentation, loader workers' seeds,
dropout and drop-path masks) comes from generators seeded at the epoch's start from (seed, epoch,
process index): under DDP each GPU augments its own way, and a run stopped after epoch k and
resumed ends with the same weights as one that never stopped (exactly on CPU; GPU kernels may
add float noise).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from .classes import IGNORE_INDEX, NUM_CLASSES
from .device import resolve_precision  # noqa: F401  (its home is device; engine.resolve_precision stays importable)
from .files import atomic_open, write_json
from .metrics import confusion_matrix, scores
from .pruning import folded_state_dict, prune_decoder, remove_pruning

CHECKPOINT_FORMAT = 1


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
    num_workers: int = 0  # DataLoader worker processes
    prune_decoder: float = 0.0  # fraction of decoder conv/linear weights L1-pruned; 0 = off
    max_bad_steps: int = 5  # this many non-finite steps in a row stop training (TrainingDiverged)
    channels_last: bool | None = None  # NHWC activations (tensor cores' layout); None = on CUDA only
    compile: bool = False  # torch.compile the model: minutes of compiling, so it pays only on long GPU runs
    sync_every: int = 50  # read the steps' losses and skip verdicts from the device every this many steps


# Settings a resumed run may change; all others (and the model spec, number of processes
# and train-set size) must match last.pt, or resuming would silently train a different run.
RESUMABLE_CHANGES = ("epochs", "patience", "num_workers", "max_bad_steps", "channels_last", "compile",
                     "sync_every")


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (corrupt or truncated)."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row: the run has diverged and more steps would not help."""


def cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy that skips ignore pixels (the default `loss_fn`)."""
    return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------------- data order


def _epoch_seed(seed: int, epoch: int, stream: int, rank: int | None = None) -> int:
    # Independent, well-mixed seeds per (run seed, epoch, use[, process]); resuming at epoch e
    # therefore redraws exactly what an uninterrupted run drew at epoch e.
    entropy = [seed, epoch, stream] + ([] if rank is None else [rank])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _seed_epoch(seed: int, epoch: int, rank: int, worker_seeds: torch.Generator) -> None:
    """Seed process `rank`'s random draws of `epoch` (all but the sample order) from (seed, epoch, rank).

    Per process: seeded alike, every GPU would draw the same crops, flips and jitter
    (`augment.BatchAugment` and the per-sample transforms draw from torch's global generator,
    the loader workers from `worker_seeds`) and the same dropout / drop-path masks. Per epoch: a
    run resumed at epoch e draws what an uninterrupted run drew there. The sample order stays
    common to all processes (EpochSampler, stream 0), which then train on disjoint shards of it.
    """
    worker_seeds.manual_seed(_epoch_seed(seed, epoch, 1, rank))
    set_seed(_epoch_seed(seed, epoch, 2, rank))  # python, numpy, torch CPU and CUDA generators


class EpochSampler(Sampler[int]):
    """Train order of one epoch as a pure function of (seed, epoch).

    Without `weights`: a random permutation. With `weights` (one per sample): a weighted
    draw of len(weights) indices with replacement, the same torch.multinomial call that
    WeightedRandomSampler makes.

    Under DDP every process draws the same order (nothing to synchronise), and accelerate's
    BatchSamplerShard gives process r the batches r, r+W, r+2W, ... of it: the processes
    train on disjoint shards of one weighted draw, as one process would with a W times
    larger batch. Call `set_epoch` before each epoch (the prepared loader's set_epoch does).
    """

    def __init__(self, num_samples: int, seed: int = 0, weights: Sequence[float] | None = None):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.weights = None
        if weights is not None:
            weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
            if weights.shape != (num_samples,):
                raise ValueError(f"sample_weights has {weights.numel()} values for {num_samples} train samples")
            if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError("sample_weights must be finite, non-negative and not all zero")
            self.weights = weights

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch, 0))
        if self.weights is None:
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        return iter(order.tolist())


class ShardSampler(Sampler[int]):
    """Indices rank, rank+W, rank+2W, ... of range(n), in order: this process's share of the val set.

    Not accelerate's sharding: to even out the shards it repeats samples, which would count
    them twice in the confusion matrix.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def seed_worker(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id (base_seed from the loader's
    # generator); numpy and python's random would otherwise repeat across workers.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ------------------------------------------------------------------ optimisation set-up


def make_accelerator(mixed_precision: str) -> Accelerator:
    # cpu=True where there is no CUDA GPU, so that a CPU launch with torchrun / accelerate
    # launch runs DDP over gloo instead of falling back to one process.
    cpu = not torch.cuda.is_available()
    # non_blocking: batches go to the GPU from pinned memory without the host waiting for the
    # copy (a blocking copy is a host sync per batch, which leaves the GPU idle meanwhile).
    settings = dict(mixed_precision=mixed_precision, cpu=cpu,
                    dataloader_config=DataLoaderConfiguration(non_blocking=True))
    try:
        return Accelerator(**settings)
    except ValueError as err:
        # Accelerate keeps its state per process; in a single process (a notebook that trains
        # one model in bf16, then another in fp32) it is safe to start it over.
        if "already been initialized" not in str(err) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(**settings)


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


# ------------------------------------------------------------------------- checkpoints


def verify_checkpoint(path) -> None:
    """Raise CheckpointError unless `path` is a complete torch archive whose members all match their CRC32.

    torch.load does not check the CRCs its zip writer stores, so a flipped byte inside a
    tensor would load as silently wrong weights; zipfile's testzip reads every member and
    compares (about 3 GB/s, so cheap next to the load itself).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as err:  # BadZipFile for truncated files, and odd errors from mangled headers
        raise CheckpointError(
            f"{path} is damaged: not a complete checkpoint archive ({type(err).__name__}: {err}); the file is "
            f"truncated or corrupt (a write cut short, a copy cut short, a disk fault)"
        ) from err
    if damaged is not None:
        raise CheckpointError(f"{path} is damaged: its member {damaged} fails its CRC32 check (corrupt bytes)")


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by `fit`, after `verify_checkpoint`; a clear error if it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there; train that model first")
    try:
        verify_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}. Delete it to train that model afresh, or restore a good copy.") from err
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        if "Weights only load failed" in str(err) and "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain Python data (see below); "
                f"a model's .spec must hold only str, numbers, bools, None, lists, tuples and dicts. {err}"
            ) from err
        raise CheckpointError(
            f"{path} could not be read ({type(err).__name__}: {err}). The file is corrupt or truncated "
            f"(e.g. a copy cut short); delete it to train that model afresh, or restore a good copy."
        ) from err


def load_model(path, map_location="cpu") -> nn.Module:
    """Rebuild the model a checkpoint was trained as (from its spec), load its weights, eval mode.

    A spec with a "prefix" (e.g. "student.") comes from a wrapper trained around the model
    (`distill.DistillationStudent`, whose state also holds feature projections): only the
    weights under that prefix are loaded, prefix stripped, so the model comes back alone.
    """
    checkpoint = load_checkpoint(path, map_location)
    spec = checkpoint.get("spec")
    if not spec or "name" not in spec:
        raise ValueError(f"{path} holds no model spec; build the model yourself and load checkpoint['model']")
    from .models import build_model

    options = dict(spec.get("options", {k: v for k, v in spec.items() if k not in ("name", "num_classes", "prefix")}))
    options.pop("pretrained", None)  # the weights come from the checkpoint, not a hub download
    model = build_model(spec["name"], num_classes=spec.get("num_classes", NUM_CLASSES), **options)
    state = checkpoint["model"]
    prefix = spec.get("prefix")
    if prefix:
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    model.load_state_dict(state)
    return model.to(map_location).eval()


def save_checkpoint(state: dict, path: Path, keep_previous: bool = False) -> None:
    """Write `state` to `path` atomically; with `keep_previous`, an intact old `path` becomes previous.pt first."""
    if keep_previous and path.exists():
        try:
            verify_checkpoint(path)
        except CheckpointError:
            pass  # never let a damaged file replace a good fallback
        else:
            os.replace(path, path.with_name("previous.pt"))
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def load_resume_checkpoint(out_dir: Path) -> tuple[dict | None, Path | None]:
    """The newest intact resume checkpoint of `out_dir` (last.pt, else previous.pt) and its path.

    A damaged last.pt is reported with a warning and previous.pt (one epoch older) used
    instead; (None, None) when there is nothing to resume. If every file is damaged, a
    CheckpointError says so rather than silently starting afresh over them.
    """
    candidates = [out_dir / "last.pt", out_dir / "previous.pt"]
    damaged = []
    for path in candidates:
        if not path.exists():
            continue
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as err:
            damaged.append(str(err))
            continue
        if damaged:
            warnings.warn(f"{damaged[0]}\nResuming from {path} (epoch {checkpoint['epoch']}) instead; the "
                          f"epochs after it are trained again.", RuntimeWarning, stacklevel=3)
        return checkpoint, path
    if damaged:
        raise CheckpointError("no intact checkpoint to resume from:\n" + "\n".join(damaged))
    return None, None


def _rng_state() -> dict:
    # numpy's state as a tensor: checkpoints stay loadable with weights_only=True.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resume_mismatches(checkpoint: dict, config: TrainConfig, setup: dict) -> dict:
    saved = {**checkpoint.get("config", {}), **checkpoint.get("setup", {})}
    wanted = {**asdict(config), **setup}
    return {key: (saved.get(key), value) for key, value in wanted.items()
            if key not in RESUMABLE_CHANGES and saved.get(key) != value}


def check_resumable(checkpoint: dict, config: TrainConfig, setup: dict, path: Path) -> None:
    """Raise a ValueError naming every setting that differs from the one `path` was trained with."""
    differ = _resume_mismatches(checkpoint, config, setup)
    if differ:
        details = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in differ.items())
        raise ValueError(
            f"cannot resume from {path}: it was trained with other settings ({details}). "
            f"Resuming continues the same run (only {', '.join(RESUMABLE_CHANGES)} may change). "
            f"To train afresh, use a new run name or delete {path.parent}; to resume, go back to those settings."
        )


def restore_training_state(checkpoint: dict, optimizer, scheduler, scaler, lr_multiplier) -> None:
    """Load optimizer, scheduler, grad scaler and RNG states from a checkpoint (after prepare)."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    # The next steps follow the schedule for the current number of epochs, which may have grown.
    steps_done = scheduler.scheduler.last_epoch
    for group, base_lr in zip(optimizer.param_groups, scheduler.scheduler.base_lrs):
        group["lr"] = base_lr * lr_multiplier(steps_done)
    scheduler.scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    _set_rng_state(checkpoint["rng"])


def _json_safe(value):
    return None if isinstance(value, float) and math.isnan(value) else value


# --------------------------------------------------------------------- the training step

# A step's verdict, a device tensor: applied, or skipped and why (read by _SkippedSteps).
STEP_APPLIED, BAD_LOSS, BAD_GRADIENTS, FP16_OVERFLOW = 0, 1, 2, 3


def _guarded_step(model: nn.Module, optimizer, accelerator: Accelerator, images: torch.Tensor, masks: torch.Tensor,
                  loss_fn, step_loss, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step that applies itself only if its loss and gradients are finite; no host sync.

    Returns (loss, verdict), both device tensors. Forward and backward always run; a bad
    verdict is the `found_inf` input of the fused AdamW kernel (the one torch's grad scaler
    feeds), which then leaves parameters, moments and step counts as they were: the step is
    skipped without the host ever reading the verdict. Under DDP the loss's finiteness is
    agreed by an all-reduce and the gradients are the all-reduced ones, so every process
    skips the same steps. With fp16 the grad scaler unscales first; a step it would skip as an
    overflow (non-finite unscaled gradients) is FP16_OVERFLOW, and its update() shrinks the scale.
    """
    optimizer.zero_grad(set_to_none=True)
    with accelerator.autocast():
        loss = step_loss(model, images, masks) if step_loss is not None else loss_fn(model(images), masks)
    loss = loss.float()
    loss_ok = torch.isfinite(loss.detach())
    if accelerator.num_processes > 1:
        agreed = accelerator.reduce(loss_ok.float().reshape(1), reduction="sum")
        loss_ok = agreed[0] == accelerator.num_processes
    accelerator.backward(loss)

    # The plain optimizer, stepped here rather than through accelerate's wrapper: with a grad
    # scaler the wrapper would call scaler.step, which decides on the gradients alone.
    inner = optimizer.optimizer
    scaler = accelerator.scaler
    if scaler is not None:
        scaler.unscale_(inner)
    params = [p for group in inner.param_groups for p in group["params"]]
    if grad_clip > 0:  # for single-process and DDP runs all accelerate's clip_grad_norm_ does (plus the unscale)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    bad_gradients = FP16_OVERFLOW if scaler is not None else BAD_GRADIENTS
    verdict = torch.where(loss_ok, torch.where(torch.isfinite(grad_norm), STEP_APPLIED, bad_gradients), BAD_LOSS)
    inner.found_inf = (verdict != STEP_APPLIED).float()
    try:
        inner.step()
    finally:
        del inner.found_inf
    if scaler is not None:
        scaler.update()
    return loss.detach(), verdict


def _fused_after_load(optimizer) -> None:
    """Keep the AdamW fused after loading a state saved by a non-fused one (checkpoints of earlier
    versions): load_state_dict takes the saved groups' flags, and the fused step wants its step
    counts on the parameters' device."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(param.device)


@dataclass
class _StepStats:
    """One epoch's training sums, kept on the device: read for the progress bar and at the epoch's end."""

    loss_sum: torch.Tensor  # float64 sum of the applied steps' losses
    steps: torch.Tensor  # applied steps
    images: torch.Tensor  # images trained on, skipped steps included

    @classmethod
    def zeros(cls, device) -> _StepStats:
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(3)))

    def add(self, loss: torch.Tensor, verdict: torch.Tensor, images: int) -> None:
        applied = verdict == STEP_APPLIED
        self.loss_sum += torch.where(applied, loss.double(), 0.0)  # a skipped step's NaN stays out
        self.steps += applied
        self.images += images

    def mean_loss(self) -> float:
        """This process's mean loss so far (a host read)."""
        loss_sum, steps = torch.stack([self.loss_sum, self.steps]).tolist()
        return loss_sum / steps if steps > 0 else math.nan

    def totals(self, accelerator: Accelerator) -> tuple[float, float]:
        """(mean loss over all processes' applied steps, images over all processes): one host read."""
        loss_sum, steps, images = accelerator.reduce(torch.stack([self.loss_sum, self.steps, self.images]),
                                                     reduction="sum").tolist()
        return (loss_sum / steps if steps > 0 else math.nan), images


class _SkippedSteps:
    """The skip rule's host side: reads the steps' verdicts, then counts, warns and stops.

    `record` keeps each step's verdict on the device; `due` says when to `read` them: every
    `sync_every` steps, and every step while a run of bad steps is open (so a diverging run
    stops at the step where it reaches `max_bad_steps` in a row, as when every step was read);
    the epoch's end reads the rest. A read replays the verdicts in order: a warning per skipped
    step, the counts, and TrainingDiverged at `max_bad_steps` in a row. Every process holds the
    same verdicts (see `_guarded_step`), so all stop at the same read.
    """

    def __init__(self, config: TrainConfig, out_dir: Path, skipped: int, scaler, warn: bool):
        self.config, self.out_dir, self.scaler, self.warn = config, out_dir, scaler, warn
        self.total = skipped  # over the whole run, resumed epochs included
        self.in_epoch = 0
        self.in_a_row = 0  # bad steps since the last applied one; runs on across epochs
        self.pending: list[tuple[int, int, torch.Tensor]] = []  # (epoch, step, verdict) not read yet

    def start_epoch(self) -> None:
        self.in_epoch = 0

    def record(self, epoch: int, step: int, verdict: torch.Tensor) -> None:
        self.pending.append((epoch, step, verdict))

    def due(self) -> bool:
        return len(self.pending) >= self.config.sync_every or (self.in_a_row > 0 and bool(self.pending))

    def read(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        verdicts = torch.stack([verdict for _, _, verdict in pending]).tolist()  # the one host sync
        for (epoch, step, _), verdict in zip(pending, verdicts):
            if verdict == STEP_APPLIED:
                self.in_a_row = 0
                continue
            self.total += 1
            self.in_epoch += 1
            self.in_a_row += 1
            what = self._describe(verdict)
            if self.in_a_row >= self.config.max_bad_steps:
                raise TrainingDiverged(diverged_message(self.config, what, self.in_a_row, epoch, step, self.out_dir))
            if self.warn:
                warnings.warn(f"epoch {epoch} step {step + 1}: non-finite {what}, step skipped "
                              f"({self.total} skipped so far)", RuntimeWarning, stacklevel=3)

    def _describe(self, verdict: int) -> str:
        if verdict == BAD_LOSS:
            return "loss"
        if verdict == FP16_OVERFLOW:
            return (f"gradients (an fp16 overflow: the grad scaler skipped the step, its scale is now "
                    f"{self.scaler.get_scale():g})")
        return "gradients"


def _training_backends(device: torch.device) -> bool:
    """Settings for fixed-size training on `device`; returns cudnn.benchmark's previous value.

    On CUDA, cudnn.benchmark times the convolution algorithms once per input shape and keeps
    the fastest: a win when every batch has the training size (a few slow first steps).
    """
    previous = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return previous


def trial_step(model: nn.Module, images: torch.Tensor, masks: torch.Tensor,
               loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               measure_memory: bool | None = None) -> dict:
    """One forward + backward of `model` on a training batch, undone: memory and size up front.

    `loss(model, images, masks)` is the step's loss (run under `autocast()`). Returns
    {"parameters", "trainable", "batch", "input" (C, H, W), "peak_bytes", "device_bytes"}; the
    last two are the peak of torch.cuda.max_memory_allocated during the step and the GPU's
    memory, measured when `measure_memory` (default: the images are on CUDA), else None. The
    peak leaves out the optimizer's moments (2 x the trainable parameters in fp32, allocated at
    the first real step) and DDP's gradient buckets. The model comes back as it was: no
    optimizer step, gradients as before, buffers (BatchNorm statistics) restored, and the
    random generators as before (dropout draws are undone too).
    """
    if measure_memory is None:
        measure_memory = images.device.type == "cuda"
    params = list(model.parameters())
    result = {"parameters": sum(p.numel() for p in params),
              "trainable": sum(p.numel() for p in params if p.requires_grad),
              "batch": images.shape[0], "input": tuple(images.shape[1:]), "peak_bytes": None, "device_bytes": None}
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    grads = [p.grad for p in params]
    cuda_devices = [images.device.index or 0] if images.device.type == "cuda" else []
    if measure_memory:
        torch.cuda.reset_peak_memory_stats(images.device)
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            for p in params:
                p.grad = None
            with autocast():
                value = loss(model, images, masks)
            value.float().backward()
            del value
        if measure_memory:
            result["peak_bytes"] = torch.cuda.max_memory_allocated(images.device)
            result["device_bytes"] = torch.cuda.get_device_properties(images.device).total_memory
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for p, grad in zip(params, grads):
            p.grad = grad
    return result


def _trial_line(model: nn.Module, train_set: Dataset, config: TrainConfig, accelerator: Accelerator, memory_format,
                batch_transform, loss) -> str:
    """One line before training: parameters, batch and input size, and on CUDA a trial step's peak memory."""
    with torch.random.fork_rng(devices=[]):  # augmentation draws from the global generator
        image, mask = train_set[0]
        batch = config.batch_size if accelerator.device.type == "cuda" else 1
        images = image.unsqueeze(0).repeat(batch, *[1] * image.ndim).to(accelerator.device)
        masks = torch.as_tensor(mask).unsqueeze(0).repeat(batch, *[1] * mask.ndim).to(accelerator.device)
        if batch_transform is not None:
            images, masks = batch_transform(images, masks)
    images = images.contiguous(memory_format=memory_format)
    processes = f" x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
    if accelerator.device.type == "cuda":
        info = trial_step(model, images, masks, loss, accelerator.autocast)
        memory = (f"; trial step peak {info['peak_bytes'] / 2**30:.2f} GiB of the GPU's "
                  f"{info['device_bytes'] / 2**30:.1f} GiB (+{8 * info['trainable'] / 2**30:.2f} GiB of AdamW "
                  f"moments from the first step)")
    else:
        info = {"parameters": sum(p.numel() for p in model.parameters()),
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        memory = f"; on {accelerator.device.type}, no trial step"
    channels, height, width = images.shape[1:]
    count = lambda n: f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"  # noqa: E731
    return (f"model {count(info['parameters'])} parameters ({count(info['trainable'])} trained); "
            f"batch {config.batch_size}{processes} of {channels}x{height}x{width}{memory}")


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
    data_id: str | None = None,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    inference: dict | None = None,
) -> list[dict]:
    """Train `model` on `train_set`, validate on `val_set` each epoch, checkpoint into `out_dir`.

    Datasets yield (image float tensor 3xHxW, mask int64 HxW with 255 = ignore).
    `loss_fn(logits, masks)` is the training and validation loss. `step_loss(model, images,
    masks) -> loss`, when given, replaces the training forward + loss (distillation runs its
    frozen teachers inside it; it runs under the same autocast, and `images` are already on
    the device). `sample_weights` (one per train sample) makes each epoch a weighted draw with
    replacement of len(train_set) samples. `data_id` (the scan's data fingerprint) is saved with
    the checkpoints, so resuming on changed data is refused rather than mixing two datasets.
    `batch_transform(images, masks) -> (images, masks)` runs on each training batch once it is on
    the device (`augment.BatchAugment`: augmentation on the GPU, the train set then yields uint8).
    `inference` (`modelinfo.inference_info(...)`: input size, normalisation, class table, TTA flips)
    is stored in every checkpoint under "inference", so the model file describes itself.

    If out_dir/last.pt exists, training resumes after its epoch (settings must match, see
    RESUMABLE_CHANGES); a finished run returns its history without training.

    Returns the history, one dict per epoch: epoch, train_loss, val_loss, val_miou,
    val_pixel_acc, per_class_iou (10, None where undefined), lr, seconds, images_per_s,
    skipped_steps. `model` is left with the last epoch's weights (pruning made permanent);
    use best.pt for the best ones.
    """
    if len(val_set) == 0:
        raise ValueError("the val set is empty; fit needs one to measure mIoU")
    if config.sync_every < 1:
        raise ValueError(f"sync_every must be at least 1 (steps between reads of the losses), got {config.sync_every}")
    out_dir = Path(out_dir)
    last_path = out_dir / "last.pt"
    accelerator = make_accelerator(resolve_precision(config.precision))
    set_seed(config.seed)
    say = accelerator.print

    spec = getattr(model, "spec", None)
    setup = {"spec": spec, "num_processes": accelerator.num_processes, "train_samples": len(train_set),
             "weighted_sampling": sample_weights is not None, "data": data_id}

    # Resume: weights go in before pruning, so pruning the loaded zeros finds the same mask.
    remove_pruning(model)  # in case an interrupted fit left this model object pruned
    checkpoint, resume_path = load_resume_checkpoint(out_dir)
    if checkpoint is not None:
        check_resumable(checkpoint, config, setup, resume_path)
        model.load_state_dict(checkpoint["model"])
    if config.prune_decoder > 0:
        # Before the optimizer is built: pruning turns `weight` into `weight_orig`.
        prune_decoder(model, config.prune_decoder)

    train_sampler = EpochSampler(len(train_set), config.seed, sample_weights)
    worker_seeds = torch.Generator()  # draws the data workers' base seed; reseeded per epoch
    pin_memory = accelerator.device.type == "cuda"
    train_loader = DataLoader(
        train_set, batch_size=config.batch_size, sampler=train_sampler,
        drop_last=len(train_set) >= config.batch_size,  # no tiny last batch for BatchNorm
        num_workers=config.num_workers, worker_init_fn=seed_worker, generator=worker_seeds, pin_memory=pin_memory,
    )
    # Not prepared by accelerate (see ShardSampler); moved to the device below.
    val_loader = DataLoader(
        val_set, batch_size=config.batch_size,
        sampler=ShardSampler(len(val_set), accelerator.process_index, accelerator.num_processes),
        num_workers=config.num_workers, worker_init_fn=seed_worker, pin_memory=pin_memory,
    )

    # Fused: one kernel per step, and it can skip a bad step on the device (see _guarded_step).
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, fused=True)
    # Counted in single-process batches: accelerate steps the scheduler once per process.
    steps_per_epoch = len(train_loader)
    lr_multiplier = warmup_cosine(config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch,
                                  config.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier)

    channels_last = accelerator.device.type == "cuda" if config.channels_last is None else config.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if config.compile:
        model.compile()  # in place: state_dict keys and checkpoints stay those of the plain model
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_set)} train samples make no full batch of {config.batch_size} "
                         f"on each of {accelerator.num_processes} processes; lower batch_size")
    unwrapped = accelerator.unwrap_model(model)

    history: list[dict] = []
    best_miou, best_epoch, skipped_steps, start_epoch = -math.inf, 0, 0, 1
    if checkpoint is not None:
        restore_training_state(checkpoint, optimizer, scheduler, accelerator.scaler, lr_multiplier)
        _fused_after_load(optimizer)
        history = list(checkpoint["history"])
        best_miou, best_epoch = checkpoint["best_miou"], checkpoint["best_epoch"]
        skipped_steps, start_epoch = checkpoint["skipped_steps"], checkpoint["epoch"] + 1
        del checkpoint  # its tensors are loaded; free the memory
        if start_epoch > config.epochs:
            say(f"{resume_path} has finished {start_epoch - 1} epochs (of {config.epochs} asked); nothing to train")
        else:
            say(f"resuming {resume_path} at epoch {start_epoch}/{config.epochs}")

    cudnn_benchmark = _training_backends(accelerator.device)
    if start_epoch <= config.epochs:  # a batch too large for the GPU shows here, in seconds
        with out_of_memory_advice(config, None, start_epoch, 0, out_dir):
            say(_trial_line(unwrapped, train_set, config, accelerator, memory_format, batch_transform,
                            step_loss or (lambda m, x, y: loss_fn(m(x), y))))
    skips = _SkippedSteps(config, out_dir, skipped_steps, accelerator.scaler, warn=accelerator.is_main_process)

    for epoch in range(start_epoch, config.epochs + 1):
        if config.patience and epoch - 1 - best_epoch >= config.patience:
            say(f"early stop: no val mIoU gain for {config.patience} epochs (best {best_miou:.4f} at epoch {best_epoch})")
            break
        started = time.perf_counter()

        # ---- train (no host sync per step: losses and verdicts are read every sync_every steps)
        model.train()
        train_loader.set_epoch(epoch)  # the epoch's sample order (EpochSampler)
        _seed_epoch(config.seed, epoch, accelerator.process_index, worker_seeds)
        stats = _StepStats.zeros(accelerator.device)
        skips.start_epoch()
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (progress and accelerator.is_main_process))
        for step, (images, masks) in enumerate(bar):
            if batch_transform is not None:
                images, masks = batch_transform(images, masks)
            images = images.contiguous(memory_format=memory_format)
            with out_of_memory_advice(config, images, epoch, step, out_dir):
                loss, verdict = _guarded_step(model, optimizer, accelerator, images, masks, loss_fn, step_loss,
                                              config.grad_clip)
            scheduler.step()  # skipped steps too: the schedule counts batches, so it spans the same epochs
            stats.add(loss, verdict, len(images))
            skips.record(epoch, step, verdict)
            if skips.due():
                skips.read()  # warnings; TrainingDiverged
                if not bar.disable:
                    bar.set_postfix(loss=f"{stats.mean_loss():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                    refresh=False)
        skips.read()
        bar.close()
        train_loss, images_seen = stats.totals(accelerator)  # a host read: the epoch's device work is done
        train_seconds = time.perf_counter() - started
        epoch_skipped, skipped_steps = skips.in_epoch, skips.total

        # DDP copies process 0's BatchNorm buffers at the start of each forward, so after the
        # last step each process holds buffers updated from its own batch: take process 0's,
        # so validation and the checkpoint see one model.
        if accelerator.num_processes > 1:
            for buffer in unwrapped.buffers():
                torch.distributed.broadcast(buffer, src=0)

        # ---- validate
        with out_of_memory_advice(config, None, epoch, None, out_dir):
            val = evaluate(unwrapped, val_loader, loss_fn, accelerator)
        improved = not math.isnan(val["miou"]) and val["miou"] > best_miou
        if improved:
            best_miou, best_epoch = val["miou"], epoch
        history.append({
            "epoch": epoch,
            "train_loss": _json_safe(train_loss),
            "val_loss": _json_safe(val["loss"]),
            "val_miou": _json_safe(val["miou"]),
            "val_pixel_acc": _json_safe(val["pixel_acc"]),
            "per_class_iou": [_json_safe(v) for v in val["iou"]],
            "lr": scheduler.get_last_lr()[0],
            "seconds": round(time.perf_counter() - started, 3),
            "images_per_s": round(images_seen / max(train_seconds, 1e-9), 2),
            "skipped_steps": epoch_skipped,
        })

        # ---- checkpoint (process 0 only; every file replaced atomically)
        if accelerator.is_main_process:
            state = {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "model": folded_state_dict(unwrapped),
                "spec": spec,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "best_miou": best_miou,
                "best_epoch": best_epoch,
                "skipped_steps": skipped_steps,
                "history": history,
                "rng": _rng_state(),
                "config": asdict(config),
                "setup": setup,
                "inference": inference,
            }
            if improved:
                save_checkpoint(state, out_dir / "best.pt")
            save_checkpoint(state, last_path, keep_previous=True)
            write_json(out_dir / "history.json", history)
            del state

        row = history[-1]
        say(f"epoch {epoch}/{config.epochs}  train_loss {train_loss:.4f}  val_loss {val['loss']:.4f}  "
            f"val_mIoU {val['miou']:.4f}  pixel_acc {val['pixel_acc']:.4f}  lr {row['lr']:.2e}  "
            f"{row['seconds']:.1f}s  {row['images_per_s']:.1f} img/s" + ("  *best" if improved else "")
            + (f"  ({epoch_skipped} steps skipped)" if epoch_skipped else ""))

    accelerator.wait_for_everyone()  # files are complete wherever fit returns
    torch.backends.cudnn.benchmark = cudnn_benchmark
    # Hand back a plain model: no pruning hooks, no autocast wrapper around its forward.
    remove_pruning(unwrapped)
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    accelerator.free_memory()
    return history


def _last_epoch_note(out_dir: Path) -> str:
    last = out_dir / "last.pt"
    if not last.exists():
        return "no epoch had finished, so nothing was saved"
    return f"{last} holds the last finished epoch; once fixed, the same call resumes from it"


def diverged_message(config: TrainConfig, bad: str, count: int, epoch: int, step: int, out_dir: Path) -> str:
    return (
        f"training diverged: {count} steps in a row (up to epoch {epoch} step {step + 1}) had a non-finite {bad}. "
        f"Lower the learning rate (lr={config.lr:g} now; resuming keeps it, so train afresh with a new run name "
        f"or after deleting {out_dir}), use precision 'fp32' or 'bf16' rather than 'fp16' "
        f"(precision={config.precision!r} now), and check the data for NaN pixels or masks that are all ignore. "
        f"{_last_epoch_note(out_dir)}."
    )


class out_of_memory_advice:
    """Context manager: re-raise running out of memory (GPU, or CPU allocation) with what to change."""

    def __init__(self, config: TrainConfig, images, epoch: int, step: int | None, out_dir: Path):
        self.config, self.images, self.epoch, self.step, self.out_dir = config, images, epoch, step, out_dir

    def __enter__(self):
        return self

    def __exit__(self, kind, err, traceback):
        cpu_alloc = isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
        if not (isinstance(err, torch.OutOfMemoryError) or cpu_alloc):
            return False
        where = "validation" if self.step is None else f"step {self.step + 1}"
        size = "" if self.images is None else f" of {tuple(self.images.shape[-2:])} images"
        raise torch.OutOfMemoryError(
            f"out of memory in epoch {self.epoch} {where} with batch_size {self.config.batch_size}{size} "
            f"(precision {self.config.precision!r}). Use a smaller batch_size (e.g. {max(1, self.config.batch_size // 2)}) "
            f"or a smaller image_size in the profile, or precision 'bf16'; close other programs using the "
            f"device. A new batch size is a new run (new run name, or delete {self.out_dir}). "
            f"{_last_epoch_note(self.out_dir)}. Original error: {str(err).splitlines()[0][:300]}"
        ) from err


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn, accelerator: Accelerator,
             num_classes: int = NUM_CLASSES) -> dict:
    """Val loss and scores over all processes' shares of `loader` (confusion matrices summed).

    `model` is the unwrapped module: no DDP collectives inside the forward, so processes may
    hold different numbers of val batches.
    """
    model.eval()
    device = accelerator.device
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # sum of per-image losses, images
    for images, masks in loader:
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with accelerator.autocast():
            logits = model(images)
        loss = loss_fn(logits.float(), masks)
        if torch.isfinite(loss):  # a batch of only ignore pixels has no loss
            loss_sum += torch.stack([loss.double() * len(images), loss_sum.new_tensor(len(images))])
        cm += confusion_matrix(logits.argmax(1), masks, num_classes=num_classes)
    cm = accelerator.reduce(cm, reduction="sum")
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    result = scores(cm)
    result["loss"] = (loss_sum[0] / loss_sum[1]).item() if loss_sum[1] > 0 else math.nan
    result["confusion_matrix"] = cm.cpu()
    return result


def launch(fn: Callable, args: tuple = (), num_processes: int | None = None):
    """Run `fn(*args)` on every GPU from a notebook: accelerate's notebook_launcher when there
    is more than one (e.g. Kaggle's two T4s), a plain call otherwise (returning its result).

    notebook_launcher forks, and a forked process cannot use CUDA once its parent has
    initialised it: so with several processes, nothing in the notebook may touch CUDA before
    (no model or tensor moved to the GPU, no benchmark), and `fn` must return CPU-only data
    (`training.train_teacher` returns the history, not the model), since each process's return
    value is pickled back to the notebook and CUDA tensors would travel by CUDA IPC, initialising
    CUDA there. When CUDA is already initialised, this refuses with what to do rather than
    training on one GPU. Under the launcher `fn`'s return value is dropped: read results from
    the run folder (history.json, best.pt).
    """
    if num_processes is None:
        num_processes = torch.cuda.device_count()  # does not initialise CUDA
    if num_processes > 1:
        if torch.cuda.is_initialized():
            raise RuntimeError(
                f"cannot train on {num_processes} GPUs: CUDA is already initialised in this kernel (a cell before "
                f"this one used the GPU), and the launcher's forked processes cannot use it; restart the kernel and "
                f"run the cells in order (training before any cell that uses the GPU), or set num_processes=1"
            )
        from accelerate import notebook_launcher

        notebook_launcher(fn, args, num_processes=num_processes)
        return None
    return fn(*args)
