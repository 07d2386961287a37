"""Timing helpers for notebooks and bench scripts: latency and throughput of a model.

    time_fn(lambda: model(x))                   # {"median_ms", "p90_ms", "runs", ...}
    latency(model)                              # batch 1 at the native 960x540 input
    throughput(model, (540, 960))               # the batch size with the most images/s

Rules that make the numbers mean something:
- the clock is `time.perf_counter`, read after `device.synchronize` (torch.cuda.synchronize)
  when the work runs on a GPU (kernels are asynchronous; without it one times the launch);
- a few untimed warm-up calls first (allocator, cuDNN autotuning, lazy init);
- the median and 90th percentile of the timed calls, not the mean, so one
  hiccup of a shared machine does not move the figure;
- models run as in evaluation (`device.inference_autocast`: bf16 on GPUs that
  support it, fp32 on CPU) under `torch.inference_mode()`, on random
  normalised input (values do not change the cost of these networks).

Speed claims belong in bench scripts that print figures, never in timed tests.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .device import default_device, device_name, inference_autocast, on_device, precision_name, synchronize

NATIVE_SIZE = (540, 960)  # (height, width) of the Falcon images
MIN_TIMED_RUNS = 3  # `time_fn` stops at `max_seconds` only once this many calls are timed (a median of 3)


def time_fn(fn: Callable[[], object], warmup: int = 3, runs: int = 20, device=None,
            max_seconds: float | None = None) -> dict:
    """Time `fn()`: `warmup` untimed calls, then up to `runs` timed ones.

    `device` says where `fn`'s work runs (None: the GPU when there is one), so
    the clock is read after the GPU finished. `max_seconds` stops timing early
    once that much time went into the timed calls and `MIN_TIMED_RUNS` were
    made (or `runs`, if fewer), which keeps slow models within a budget. Returns {"median_ms",
    "p90_ms", "min_ms", "mean_ms", "runs"} ("runs" = calls actually timed).
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    device = default_device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    spent = 0.0
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        times.append(elapsed * 1000.0)
        spent += elapsed
        if max_seconds is not None and spent >= max_seconds and len(times) >= min(MIN_TIMED_RUNS, runs):
            break
    times_ms = np.asarray(times)
    return {
        "median_ms": float(np.median(times_ms)),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "min_ms": float(times_ms.min()),
        "mean_ms": float(times_ms.mean()),
        "runs": len(times),
    }


def _random_input(batch: int, input_size: Sequence[int], device: torch.device) -> torch.Tensor:
    # Normalised images are roughly standard normal per channel; a fixed seed keeps runs comparable.
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, *input_size, generator=generator).to(device)


def _inference_call(model: Callable, x: torch.Tensor, device: torch.device) -> Callable[[], object]:
    def call():
        with torch.inference_mode(), inference_autocast(device):
            return model(x)

    return call


def latency(
    model: nn.Module | Callable,
    input_size: Sequence[int] = NATIVE_SIZE,
    device=None,
    batch: int = 1,
    warmup: int | None = None,
    runs: int | None = None,
    max_seconds: float | None = 2.0,
) -> dict:
    """Milliseconds per forward of `model` on a random (batch, 3, H, W) input, as in evaluation.

    `input_size` is (height, width), the native 960x540 by default. A module runs
    on `device` in eval mode and is put back where and as it was afterwards
    (`device.on_device`: the caller's model is never moved behind its back).
    Returns `time_fn`'s fields plus device, input_size [H, W], batch and precision ("bf16", "fp16" or "fp32").

    Defaults: on a GPU 10 warm-up and 50 timed calls (milliseconds each); on a
    CPU 1 warm-up and up to 10 timed calls within `max_seconds` (2 s) of timing, at least 3, so a
    model that takes a second a call on busy cores costs about 3 calls, not 11: the median of a few
    calls is as good as its spread on a CPU (SegFormer-B0's figures: bench/RESULTS.md, "Figures moved
    from docstrings"; the demo's notebooks time a dozen predictors this way).
    """
    device = default_device(device)
    on_gpu = device.type == "cuda"
    warmup = warmup if warmup is not None else (10 if on_gpu else 1)
    runs = runs if runs is not None else (50 if on_gpu else 10)
    x = _random_input(batch, input_size, device)
    with on_device(model, device):
        timing = time_fn(_inference_call(model, x, device), warmup=warmup, runs=runs, device=device,
                         max_seconds=max_seconds)
    return {**timing, "device": device_name(device), "input_size": list(input_size), "batch": batch,
            "precision": precision_name(device)}


def _is_out_of_memory(error: BaseException) -> bool:
    # torch.OutOfMemoryError is recent (CUDA's alias for it is older); a CPU allocation failure is a RuntimeError.
    candidates = (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
    oom_types = tuple(t for t in candidates if t is not None)
    if oom_types and isinstance(error, oom_types):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def throughput(
    model: nn.Module | Callable,
    input_size: Sequence[int] = NATIVE_SIZE,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16),
    device=None,
    time_budget_s: float = 60.0,
    warmup: int = 2,
    runs: int = 5,
    measured: dict | None = None,
) -> dict:
    """Images per second of `model` at growing batch sizes; the best batch size and its rate.

    `measured` ({batch size: a `latency` result of this model on this input}): sizes already timed,
    taken as they are instead of timed again (notebook 06 passes its batch-1 latency).

    Batch sizes are tried in increasing order; growing stops at the first size
    that fails, that does not beat the best images/s so far (larger batches
    will not either, once the device is saturated), or once `time_budget_s` is
    spent (each size also gets at most its share of it). A failing size is
    recorded as {"error": "out of memory"} or, for any other error (a kernel's
    size limit, say), {"error": "<Type>: <message>"}, never called a memory
    problem; the sizes timed before it still count. Only when no size at all
    could be timed is that error raised. The model runs on `device` in eval
    mode and is put back where and as it was (`device.on_device`).
    Returns {"best_batch", "images_per_s", "per_batch": {batch: {"images_per_s",
    "median_ms", "runs"} or {"error": ...}}, "device", "input_size", "precision"}.
    """
    device = default_device(device)
    with on_device(model, device):
        return _throughput(model, input_size, batch_sizes, device, time_budget_s, warmup, runs, measured or {})


def _throughput(model, input_size, batch_sizes, device, time_budget_s, warmup, runs, measured) -> dict:
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    per_batch: dict[int, dict] = {}
    failure = None
    best_batch, best_rate = None, -math.inf
    started = time.perf_counter()
    for batch in batch_sizes:
        remaining = time_budget_s - (time.perf_counter() - started)
        if remaining <= 0:
            break
        if batch in measured:
            timing = measured[batch]
        else:
            try:
                x = _random_input(batch, input_size, device)
                timing = time_fn(_inference_call(model, x, device), warmup=warmup, runs=runs, device=device,
                                 max_seconds=min(remaining, time_budget_s / len(batch_sizes)))
            except Exception as error:  # noqa: BLE001 - recorded per batch size, raised below if nothing ran
                if _is_out_of_memory(error):
                    per_batch[batch] = {"error": "out of memory"}
                else:
                    per_batch[batch] = {"error": f"{type(error).__name__}: {error}"}
                    failure = error
                x = None  # drop the last input before handing the cached memory back
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                break
        rate = batch / (timing["median_ms"] / 1000.0)
        per_batch[batch] = {"images_per_s": rate, "median_ms": timing["median_ms"], "runs": timing["runs"]}
        if rate <= best_rate:
            break
        best_batch, best_rate = batch, rate
    if best_batch is None:
        raise RuntimeError(f"no batch size of {batch_sizes} could be timed: {per_batch}") from failure
    return {"best_batch": best_batch, "images_per_s": best_rate, "per_batch": per_batch,
            "device": device_name(device), "input_size": list(input_size), "precision": precision_name(device)}
