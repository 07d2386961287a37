"""Checkpoint files: what `engine.fit` writes each epoch, how it is read back, and resuming from it.

Run folder (outputs/<run>/models/<name>/ = `out_dir`):
    best.pt       the checkpoint of the epoch with the best val mIoU
    last.pt       the checkpoint of the latest finished epoch (resume point)
    previous.pt   the one before it: the fallback when last.pt is found damaged
    history.json  one dict per finished epoch (see `engine.fit`), each with the run's best epoch so
                  far (`best_epoch`); `best_row` reads the best epoch's row from it
A checkpoint is a dict (`checkpoint_state`): model (CPU state_dict, decoder pruning folded in),
spec, optimizer, scheduler, scaler, epoch, best_miou, best_epoch, skipped_steps, history,
config, setup, inference (what predicting on new images needs, `offroadseg.modelinfo`; None if
not given). It holds only plain types and tensors, so it loads with torch.load(weights_only=True).
Every file is replaced atomically, and every read checks the CRC32 of each of the archive's
members first (torch.load itself reads flipped bytes without complaint), so a damaged file
is reported as such, never loaded as if it were fine.

Resuming continues the same run: `check_resumable` refuses a checkpoint trained with other
settings (all but RESUMABLE_CHANGES), and `restore_training_state` puts back the optimizer,
scheduler and grad scaler. The random draws need no saving: every draw of an epoch is seeded
from (seed, epoch) at the epoch's start (`sampling`), so a resumed run draws what an
uninterrupted one drew and goes on as if it had never stopped.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .classes import NUM_CLASSES
from .files import atomic_open
from .models import build_model
from .pruning import folded_state_dict

CHECKPOINT_FORMAT = 1

# Settings a resumed run may change; all others (and the model spec, number of processes
# and train-set size) must match last.pt, or resuming would silently train a different run.
RESUMABLE_CHANGES = ("epochs", "patience", "num_workers", "max_bad_steps", "channels_last", "compile",
                     "sync_every", "keep_epochs")


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (corrupt or truncated)."""


# ------------------------------------------------------------------------------ files


def checkpoint_state(*, epoch: int, model: nn.Module, spec: dict | None, optimizer, scheduler, scaler,
                     best_miou: float, best_epoch: int, skipped_steps: int, history: list[dict], config: dict,
                     setup: dict, inference: dict | None) -> dict:
    """The checkpoint of a finished epoch, as `save_checkpoint` writes it.

    `model` is the plain (unwrapped) module, `config` the TrainConfig as a dict
    (dataclasses.asdict), `setup` what else a resume must match (spec, processes, data).
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": folded_state_dict(model),
        "spec": spec,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "best_miou": best_miou,
        "best_epoch": best_epoch,
        "skipped_steps": skipped_steps,
        "history": history,
        "config": config,
        "setup": setup,
        "inference": inference,
    }


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


# ----------------------------------------------------------------------------- resuming


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
            # stacklevel: this function, engine's resume helper, fit, then fit's caller.
            warnings.warn(f"{damaged[0]}\nResuming from {path} (epoch {checkpoint['epoch']}) instead; the "
                          f"epochs after it are trained again.", RuntimeWarning, stacklevel=4)
        return checkpoint, path
    if damaged:
        raise CheckpointError("no intact checkpoint to resume from:\n" + "\n".join(damaged))
    return None, None


def _resume_mismatches(checkpoint: dict, config: dict, setup: dict, defaults: dict) -> dict:
    saved = {**checkpoint.get("config", {}), **checkpoint.get("setup", {})}
    # A setting the checkpoint does not record was added after it was written: it trained as
    # that setting's default does.
    saved = {**{key: value for key, value in defaults.items() if key not in saved}, **saved}
    wanted = {**config, **setup}
    return {key: (saved.get(key), value) for key, value in wanted.items()
            if key not in RESUMABLE_CHANGES and saved.get(key) != value}


def check_resumable(checkpoint: dict, config: dict, setup: dict, path: Path, defaults: dict | None = None) -> None:
    """Raise a ValueError naming every setting that differs from the one `path` was trained with.

    `config` is the TrainConfig of the new call as a dict (dataclasses.asdict), `setup` the rest
    of what `checkpoint_state` stores under "setup". `defaults` (TrainConfig's defaults as a dict):
    what a setting the checkpoint predates counts as, so that a run trained before a setting
    existed resumes under its default (and only under it).
    """
    differ = _resume_mismatches(checkpoint, config, setup, defaults or {})
    if differ:
        details = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in differ.items())
        raise ValueError(
            f"cannot resume from {path}: it was trained with other settings ({details}). "
            f"Resuming continues the same run (only {', '.join(RESUMABLE_CHANGES)} may change). "
            f"To train afresh, use a new run name or delete {path.parent}; to resume, go back to those settings."
        )


def restore_training_state(checkpoint: dict, optimizer, scheduler, scaler) -> None:
    """Load optimizer, scheduler and grad scaler states from a checkpoint (after accelerate's prepare).

    The scheduler's multiplier is the new call's (a plain function is no part of its state), so
    stepping it once from the step before puts every group's learning rate where the schedule of
    the current number of epochs, which may have grown, has it now."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    _fused_after_load(optimizer)
    scheduler.load_state_dict(checkpoint["scheduler"])
    inner = scheduler.scheduler  # accelerate's wrapper would step it once per process
    inner.last_epoch -= 1
    inner.step()
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])


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


# ------------------------------------------------------------------------ history


def best_row(history: list[dict]) -> dict:
    """The history row of the best epoch (the one best.pt holds): the epoch the last row names as
    `best_epoch`; for a history written before rows named it, the first row of the highest val mIoU
    (the rule fit keeps it by). A ValueError for an empty history or one without a val mIoU."""
    if not history:
        raise ValueError("no training history yet: train the model first")
    best = history[-1].get("best_epoch")
    if best is not None:
        return next(row for row in history if row["epoch"] == best)
    scored = [row for row in history if row.get("val_miou") is not None and not math.isnan(row["val_miou"])]
    if not scored:
        raise ValueError("no epoch of this history has a val mIoU")
    return max(scored, key=lambda row: row["val_miou"])
