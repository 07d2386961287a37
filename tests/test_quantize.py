"""INT8 quantisation of an ONNX export (`quantize.quantize_int8`): smaller, predicting like fp32, its
fallbacks and refusals. The exported models are test_export.py's fixtures."""

# ruff: noqa: F811 (the fixtures come from test_export.py and are named as arguments)
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export import SIZE, _onnx_logits, fitted_onnx, segformer, segformer_onnx  # noqa: F401 (pytest fixtures)

from offroadseg import quantize


@pytest.mark.slow
def test_int8_is_smaller_and_predicts_like_fp32(fitted_onnx, tmp_path):
    path, calibration, held_out = fitted_onnx
    report = quantize.quantize_int8(path, tmp_path / "int8.onnx", calibration, eval_batches=held_out,
                                  latency_runs=3, threads=1)
    assert report["mode"] == "static" and report["fallback_reason"] is None
    assert report["fp32_miou"] > 0.6  # the model did learn, so agreement below means something
    assert report["int8_bytes"] < 0.4 * report["fp32_bytes"]  # int8 weights: about a quarter
    # Measured: agreement 99.9%, largest logit change 0.16. Calibrating on inputs 20x too small
    # (ranges far too narrow) gave 99.0% and 2.7; on zeros, 69% and 10.9.
    assert report["argmax_agreement"] > 0.993
    assert report["max_abs_logit_diff"] < 1.0
    assert abs(report["miou_change"]) < 0.02
    assert report["miou_change"] == report["int8_miou"] - report["fp32_miou"]
    assert report["evaluated_on"] == "eval batches" and report["input_size"] == [32, 48]
    for latency in (report["fp32_latency"], report["int8_latency"]):
        assert 0 < latency["median_ms"] <= latency["p90_ms"] and latency["runs"] == 3
    # The INT8 file is a model in its own right: any batch size, close logits.
    images, _ = held_out[0]
    int8_logits = _onnx_logits(tmp_path / "int8.onnx", images[:3])
    assert int8_logits.shape == (3, 10, 32, 48)
    assert np.abs(int8_logits - _onnx_logits(path, images[:3])).max() < 1.0


@pytest.mark.slow
def test_int8_falls_back_to_dynamic_when_static_fails(segformer_onnx, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no calibration for you")

    monkeypatch.setattr(quantize, "_quantize_static", fail)
    batches = [torch.randn(1, 3, *SIZE)]
    with pytest.warns(UserWarning, match="falling back to dynamic"):
        report = quantize.quantize_int8(segformer_onnx, tmp_path / "int8.onnx", batches, latency_runs=0)
    assert report["mode"] == "dynamic" and "no calibration for you" in report["fallback_reason"]
    assert report["fp32_latency"] is None and report["fp32_miou"] is None
    assert report["int8_bytes"] < report["fp32_bytes"]
    assert _onnx_logits(tmp_path / "int8.onnx", batches[0]).shape == (1, 10, *SIZE)


def test_failed_quantisation_leaves_nothing_behind(segformer_onnx, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("quantiser crashed")

    monkeypatch.setattr(quantize, "_quantize_dynamic", fail)
    with pytest.raises(RuntimeError, match="quantiser crashed"):
        quantize.quantize_int8(segformer_onnx, tmp_path / "int8.onnx", [torch.randn(1, 3, *SIZE)], mode="dynamic")
    assert list(tmp_path.iterdir()) == []


def test_int8_rejects_unknown_modes_and_empty_calibration(segformer_onnx, tmp_path):
    with pytest.raises(ValueError, match="mode"):
        quantize.quantize_int8(segformer_onnx, tmp_path / "int8.onnx", [torch.randn(1, 3, *SIZE)], mode="fp8")
    with pytest.raises(ValueError, match="calibration"):
        quantize.quantize_int8(segformer_onnx, tmp_path / "int8.onnx", [])


# ----------------------------------------------------------------------------- latency
