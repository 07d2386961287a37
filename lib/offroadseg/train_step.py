"""One training step, guarded: what `engine.fit` runs per batch, and what it says when a run goes wrong.

No host sync per step: a step's loss and its verdict (applied, or skipped and why) stay on the
device, and the update of a bad step is dropped by the fused AdamW kernel itself (`guarded_step`).
The host reads them every `sync_every` steps, every step while a run of bad steps is open, and
at the epoch's end (`SkippedSteps`, `StepStats`), so the GPU is never left waiting for Python.

Faults: a non-finite loss or gradient skips the step with a warning; `max_bad_steps` of them in a
row stop training (`TrainingDiverged`) with advice. With fp16, a step the grad scaler skips as an
overflow is counted as skipped but is no fault while the scale is still at least 1: the scaler
starts at 65536 and halves at each overflow until the scaled gradients fit fp16, and skipped
steps meanwhile are normal (torch's AMP documentation says so). Only an overflow at a scale below
1, where the gradients are non-finite however small the scaling, counts toward the stop. Running out of memory stops it with a message suggesting a
smaller batch or input size (`out_of_memory_advice`). Either way last.pt holds the last finished epoch.

How the steps run on the device lives here too: accelerate's process state and the Accelerator with
the precision decided once (`process_state`, `make_accelerator`), torch's global settings for the
epochs (`training_backends`), the memory layout (`memory_format`) and the record of them (`backend_record`).

`config` below is the run's `engine.TrainConfig`, read for its settings (engine imports this
module, so this one does not import engine).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import Dataset

from .device import default_device, device_name, keep_freed_memory, resolve_precision, tensor_cores

# ------------------------------------------------------------------ how the steps run on the device


def process_state() -> PartialState:
    """Accelerate's process state (which process of how many; under torchrun it joins the group). cpu=True
    without a CUDA GPU, so that a CPU launch runs DDP over gloo instead of falling back to one process."""
    return PartialState(cpu=default_device().type != "cuda")


def make_accelerator(precision: str = "auto", track: Sequence[str] = (), track_dir=None) -> Accelerator:
    """Accelerate's Accelerator for a TrainConfig.precision, the precision decided once, here, on this
    process's own GPU (`device.resolve_precision`): accelerate's process state is made first, which
    sets each process's GPU, so that no process asks (and opens a CUDA context on) GPU 0. `track`:
    accelerate's trackers (`tracking.check_trackers`) writing under `track_dir`."""
    state = process_state()
    mixed_precision = resolve_precision(precision, state.device)
    # non_blocking: batches go to the GPU from pinned memory without the host waiting for the
    # copy (a blocking copy is a host sync per batch, which leaves the GPU idle meanwhile).
    settings = dict(mixed_precision=mixed_precision, cpu=state.device.type == "cpu",
                    dataloader_config=DataLoaderConfiguration(non_blocking=True),
                    log_with=list(track) or None, project_dir=None if track_dir is None else str(track_dir))
    try:
        return Accelerator(**settings)
    except ValueError as err:
        # Accelerate keeps its state per process; in a single process (a notebook that trains
        # one model in bf16, then another in fp32) it is safe to start it over.
        if "already been initialized" not in str(err) or PartialState().num_processes > 1:
            raise
        restart_accelerate_state()
        return Accelerator(**settings)


def restart_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so that an Accelerator of another precision can be made.

    Accelerate has no public way to do this (its notebook_launcher and its own tests call this same
    private method); the one place it is called, pinned by
    tests/test_engine.py::test_mixed_precision_path_and_switching_precision_in_one_process."""
    AcceleratorState._reset_state()


@contextlib.contextmanager
def training_backends(device: torch.device):
    """torch's global settings for fixed-size training on `device`, for the block, then as they were.

    On CUDA: cudnn.benchmark (times the convolution algorithms once per input shape and keeps the
    fastest: a win when every batch has the training size, for a few slow first steps) and
    TF32 matrix products for what runs in fp32 (`set_float32_matmul_precision("high")`: the loss,
    fp32 runs; Ampere and newer). On a CPU, glibc's malloc is asked to keep freed memory
    (`device.keep_freed_memory`: for the rest of the process, not only the block).
    """
    benchmark, matmul = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    try:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        else:
            keep_freed_memory()
        yield
    finally:
        torch.backends.cudnn.benchmark = benchmark
        torch.set_float32_matmul_precision(matmul)


def memory_format(config, device: torch.device) -> torch.memory_format:
    """channels_last where it pays, on GPUs with tensor cores (compute 7.0 and up), unless the config says."""
    channels_last = tensor_cores(device) if config.channels_last is None else config.channels_last
    return torch.channels_last if channels_last else torch.contiguous_format


def backend_record(accelerator: Accelerator, config, memory: torch.memory_format, workers: int) -> dict:
    """How this process trains, as history.json's rows and run.json record it (an epoch resumed on
    another machine may differ): device, precision, layout, loader workers, processes."""
    return {"device": device_name(accelerator.device), "processes": accelerator.num_processes,
            "precision": {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision),
            "channels_last": memory == torch.channels_last, "loader_workers": workers,
            "persistent_workers": workers > 0, "compile": config.compile,
            "cudnn_benchmark": accelerator.device.type == "cuda", "tf32_matmul": accelerator.device.type == "cuda"}


def backend_line(backend: dict) -> str:
    """The backend record as the one line fit prints before training."""
    processes = f" x {backend['processes']} processes" if backend["processes"] > 1 else ""
    settings = [backend["precision"], "channels_last" if backend["channels_last"] else "contiguous (NCHW)",
                f"{backend['loader_workers']} loader workers per loader" + (" (persistent)" if backend["persistent_workers"]
                                                                             else "")]
    settings += [name for name in ("compile", "cudnn_benchmark", "tf32_matmul") if backend[name]]
    return f"training on {backend['device']}{processes}: {', '.join(settings)}"


# ------------------------------------------------------------------ the guarded step


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row: the run has diverged and more steps would not help."""


# A step's verdict, a device tensor: applied, or skipped and why (read by SkippedSteps).
# FP16_OVERFLOW: the grad scaler calibrating (no fault); FP16_COLLAPSED: an overflow at a scale below 1.
STEP_APPLIED, BAD_LOSS, BAD_GRADIENTS, FP16_OVERFLOW, FP16_COLLAPSED = 0, 1, 2, 3, 4
# Below this grad scale an fp16 overflow is no longer calibration: the gradients themselves are non-finite.
MIN_FP16_SCALE = 1.0


def guarded_step(model: nn.Module, optimizer, accelerator: Accelerator, images: torch.Tensor, masks: torch.Tensor,
                 loss_fn, step_loss, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step that applies itself only if its loss and gradients are finite; no host sync.

    Returns (loss, verdict), both device tensors. Forward and backward always run; a bad
    verdict is the `found_inf` input of the fused AdamW kernel (the one torch's grad scaler
    feeds), which then leaves parameters, moments and step counts as they were: the step is
    skipped without the host ever reading the verdict. Under DDP the loss's finiteness is
    agreed by an all-reduce and the gradients are the all-reduced ones, so every process
    skips the same steps. With fp16 the grad scaler unscales first; a step it would skip as an
    overflow (non-finite unscaled gradients) is FP16_OVERFLOW while the step's scale was at least
    MIN_FP16_SCALE, else FP16_COLLAPSED, and its update() shrinks the scale.
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
    if scaler is not None:
        # The scale this step used, as a device tensor: GradScaler.scale() of a one (get_scale() would sync).
        step_scale = scaler.scale(torch.ones((), device=loss.device))
        bad_gradients = torch.where(step_scale >= MIN_FP16_SCALE, FP16_OVERFLOW, FP16_COLLAPSED)
    else:
        bad_gradients = torch.tensor(BAD_GRADIENTS, device=loss.device)
    verdict = torch.where(loss_ok, torch.where(torch.isfinite(grad_norm), STEP_APPLIED, bad_gradients), BAD_LOSS)
    step_unless(inner, verdict != STEP_APPLIED)
    if scaler is not None:
        scaler.update()
    return loss.detach(), verdict


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """`optimizer.step()`, dropped on the device where `skip` (a 0-dim bool device tensor) is true:
    parameters, moments and step counts stay as they were, and the host never reads `skip`.

    torch has no public API for this. Its fused AdamW kernel takes a `found_inf` input, which
    torch's own GradScaler.step passes by setting the optimizer attribute of that name for the
    call; this does the same for every step, with or without a scaler. The one place that touches
    it, pinned by tests/test_train_step.py::test_a_skipped_step_leaves_the_fused_adamw_as_it_was.
    """
    optimizer.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


@dataclass
class StepStats:
    """One epoch's training sums, kept on the device: read for the progress bar and at the epoch's end."""

    loss_sum: torch.Tensor  # float64 sum of the applied steps' losses
    steps: torch.Tensor  # applied steps
    images: torch.Tensor  # images trained on, skipped steps included

    @classmethod
    def zeros(cls, device) -> StepStats:
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


class SkippedSteps:
    """The skip rule's host side: reads the steps' verdicts, then counts, warns and stops.

    `record` keeps each step's verdict on the device; `due` says when to `read` them: every
    `sync_every` steps, and every step while a run of bad steps is open (so a diverging run
    stops at the step where it reaches `max_bad_steps` in a row, as when every step was read);
    the epoch's end reads the rest. A read replays the verdicts in order: a warning per skipped
    step, the counts, and TrainingDiverged at `max_bad_steps` in a row. Every process holds the
    same verdicts (see `guarded_step`), so all stop at the same read. An fp16 overflow while the
    grad scaler calibrates (FP16_OVERFLOW) is counted as skipped, without a warning, and neither
    adds to nor ends a run of bad steps.
    """

    def __init__(self, config, out_dir: Path, skipped: int, scaler, warn: bool):
        self.config, self.out_dir, self.scaler, self.warn = config, out_dir, scaler, warn
        self.total = skipped  # over the whole run, resumed epochs included
        self.in_epoch = 0
        self.overflows_in_epoch = 0  # of in_epoch: the grad scaler calibrating
        self.in_a_row = 0  # bad steps since the last applied one; runs on across epochs
        self.pending: list[tuple[int, int, torch.Tensor]] = []  # (epoch, step, verdict) not read yet

    def start_epoch(self) -> None:
        self.in_epoch = self.overflows_in_epoch = 0

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
            if verdict == FP16_OVERFLOW:
                self.overflows_in_epoch += 1
                continue
            self.in_a_row += 1
            what = self._describe(verdict)
            if self.in_a_row >= self.config.max_bad_steps:
                raise TrainingDiverged(diverged_message(self.config, what, self.in_a_row, epoch, step, self.out_dir))
            if self.warn:
                # stacklevel: this method, engine's epoch loop, fit, then fit's caller.
                warnings.warn(f"epoch {epoch} step {step + 1}: non-finite {what}, step skipped "
                              f"({self.total} skipped so far)", RuntimeWarning, stacklevel=4)

    def _describe(self, verdict: int) -> str:
        if verdict == BAD_LOSS:
            return "loss"
        if verdict == FP16_COLLAPSED:
            return (f"gradients (an fp16 overflow at a grad scale below {MIN_FP16_SCALE:g}, so not the scaler "
                    f"calibrating: its scale is now {self.scaler.get_scale():g})")
        return "gradients"


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


def trial_line(model: nn.Module, train_set: Dataset, config, accelerator: Accelerator, memory_format,
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


def _last_epoch_note(out_dir: Path) -> str:
    # Both faults end a run where last.pt (if any) is still the resume point.
    last = out_dir / "last.pt"
    if not last.exists():
        return "no epoch had finished, so nothing was saved"
    return f"{last} holds the last finished epoch; once fixed, the same call resumes from it"


def diverged_message(config, bad: str, count: int, epoch: int, step: int, out_dir: Path) -> str:
    """What TrainingDiverged says: `count` steps in a row up to (epoch, step) had a non-finite `bad`."""
    return (
        f"training diverged: {count} steps in a row (up to epoch {epoch} step {step + 1}) had a non-finite {bad}. "
        f"Lower the learning rate (lr={config.lr:g} now; resuming keeps it, so train afresh with a new run name "
        f"or after deleting {out_dir}), use precision 'fp32' or 'bf16' rather than 'fp16' "
        f"(precision={config.precision!r} now), and check the data for NaN pixels or masks that are all ignore. "
        f"{_last_epoch_note(out_dir)}."
    )


class out_of_memory_advice:
    """Context manager: re-raise running out of memory (GPU, or CPU allocation) with what to change."""

    def __init__(self, config, images, epoch: int, step: int | None, out_dir: Path):
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
