"""Timing helpers: fields and bookkeeping of time_fn, latency's set-up, throughput's choice of batch.

The stand-ins sleep for known times, so the tests check the logic, not this machine's speed.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from offroadseg.benchmark import latency, throughput, time_fn


def test_time_fn_warms_up_then_times_each_run():
    calls = []

    def fn():
        calls.append(time.perf_counter())
        time.sleep(0.005)

    result = time_fn(fn, warmup=2, runs=5, device="cpu")
    assert len(calls) == 7 and result["runs"] == 5
    assert set(result) == {"median_ms", "p90_ms", "min_ms", "mean_ms", "runs"}
    assert 5.0 <= result["min_ms"] <= result["median_ms"] <= result["p90_ms"]
    assert result["median_ms"] < 1000


def test_time_fn_stops_at_its_time_budget_once_a_median_of_three_is_possible():
    result = time_fn(lambda: time.sleep(0.02), warmup=0, runs=100, device="cpu", max_seconds=0.05)
    assert 3 <= result["runs"] <= 4
    # A call slower than the whole budget is still timed three times (twice when only two are asked).
    assert time_fn(lambda: time.sleep(0.03), warmup=0, runs=10, device="cpu", max_seconds=0.01)["runs"] == 3
    assert time_fn(lambda: time.sleep(0.03), warmup=0, runs=2, device="cpu", max_seconds=0.01)["runs"] == 2
    with pytest.raises(ValueError):
        time_fn(lambda: None, runs=0)


class Recorder(nn.Module):
    """A 1x1 conv that records the inputs it sees and whether gradients were on."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 1)
        self.seen = []

    def forward(self, x):
        self.seen.append((tuple(x.shape), torch.is_grad_enabled(), self.training))
        return self.conv(x)


def test_latency_runs_the_model_in_eval_mode_without_gradients():
    model = Recorder().train()
    result = latency(model, input_size=(16, 24), device="cpu", warmup=1, runs=3)
    assert model.training  # put back as it came
    assert model.seen == [((1, 3, 16, 24), False, False)] * 4
    assert result["runs"] == 3 and result["batch"] == 1 and result["input_size"] == [16, 24]
    assert result["device"] == "cpu" and result["precision"] == "fp32"
    assert 0 < result["median_ms"] <= result["p90_ms"]


def sleeper(ms_per_batch: dict, out_of_memory_from: int | None = None):
    """A stand-in whose call takes a known time per batch size (or runs out of memory)."""
    tried = []

    def fn(x):
        batch = x.shape[0]
        tried.append(batch)
        if out_of_memory_from is not None and batch >= out_of_memory_from:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        time.sleep(ms_per_batch[batch] / 1000)

    return fn, tried


def test_throughput_picks_the_batch_with_most_images_per_second_and_stops_growing():
    # 1, 2, 4 images in 30 ms each, then 8 in 120 ms: 4 is best, and 16 is not worth trying.
    fn, tried = sleeper({1: 30, 2: 30, 4: 30, 8: 120, 16: 120})
    result = throughput(fn, input_size=(4, 4), device="cpu", warmup=0, runs=3)
    assert result["best_batch"] == 4
    assert result["images_per_s"] == pytest.approx(4 / 0.030, rel=0.5)
    assert sorted(result["per_batch"]) == [1, 2, 4, 8] and 16 not in tried
    rates = {b: row["images_per_s"] for b, row in result["per_batch"].items()}
    assert max(rates, key=rates.get) == 4


def test_throughput_takes_sizes_already_measured_as_they_are():
    fn, tried = sleeper({1: 30, 2: 30, 4: 200})
    result = throughput(fn, input_size=(4, 4), device="cpu", warmup=0, runs=2,
                        measured={1: {"median_ms": 40.0, "runs": 9}})
    assert 1 not in tried and result["per_batch"][1] == {"images_per_s": 25.0, "median_ms": 40.0, "runs": 9}
    assert result["best_batch"] == 2 and sorted(result["per_batch"]) == [1, 2, 4]
    # A measured size that is not better than the one before stops the growth, as a timed one would.
    fn, tried = sleeper({1: 10, 2: 10})
    slow = throughput(fn, input_size=(4, 4), batch_sizes=(1, 2, 4), device="cpu", warmup=0, runs=2,
                      measured={2: {"median_ms": 1000.0, "runs": 3}})
    assert slow["best_batch"] == 1 and tried == [1, 1] and 4 not in slow["per_batch"]


def test_throughput_stops_at_the_first_out_of_memory():
    fn, tried = sleeper({1: 20, 2: 20, 4: 20}, out_of_memory_from=8)
    result = throughput(fn, input_size=(4, 4), device="cpu", warmup=0, runs=2)
    assert result["best_batch"] == 4
    assert result["per_batch"][8] == {"error": "out of memory"} and 16 not in tried


def test_throughput_passes_other_errors_on():
    def broken(x):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        throughput(broken, input_size=(4, 4), device="cpu", warmup=0, runs=1)
