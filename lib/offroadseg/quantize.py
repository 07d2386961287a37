"""INT8 quantisation of an ONNX export (`offroadseg.export`), with a report on what it costs and buys.

    int8 = quantize_int8("outputs/<run>/exports/student.onnx", "outputs/<run>/exports/student_int8.onnx",
                         calibration_batches, eval_batches=val_loader)
    int8["int8_miou"], int8["argmax_agreement"], int8["int8_latency"]["median_ms"]

Static quantisation in QDQ format, per-channel weights, activation ranges calibrated (min/max)
on a few real batches, after `quant_pre_process` (symbolic shape inference and graph clean-up,
which the quantiser needs to see every tensor's shape). The choices below were measured on this
project's 2-core Xeon (AVX-512 VNNI), one thread, 180x320; the figures are in bench/RESULTS.md
("Figures moved from docstrings"):

- U8S8 (unsigned 8-bit activations, signed weights), x86's int8 fast path: S8S8,
  onnxruntime's generic default, was slower than U8S8 on segformer-b0 for the same accuracy.
  (On x86 CPUs without VNNI, U8S8 can saturate; try onnxruntime's `reduce_range` if INT8
  accuracy drops there.)
- Every operator kind onnxruntime can quantise (`op_types=None`), not just Conv and MatMul:
  with LayerNormalization and the reshapes quantised too, tensors stay int8 between layers
  instead of bouncing through fp32, and segformer-b0 ran faster than with Conv+MatMul only,
  for slightly less fp32/INT8 argmax agreement and no mIoU change.
- What INT8 buys: DeepLab (convolutions) gains most; SegFormer less, as much of its time goes
  to normalisation, softmax and reshapes, which onnxruntime computes in fp32 either way. Both
  files shrink about 4x (8-bit weights instead of 32-bit).
- Dynamic quantisation (weights only, activations quantised at run time) is the fallback when
  static quantisation fails, recorded as such in the report. Expect it to be *slower* than
  fp32 for convolutional models: onnxruntime runs dynamically quantised convolutions as
  ConvInteger, which has no fast CPU kernel.

The fp32 and INT8 files are compared and timed with `export`'s session helpers
(`compare_logits`, `onnx_latency`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from .classes import NUM_CLASSES
from .export import compare_logits, images_and_masks, onnx_latency, onnx_session, session_logits
from .files import atomic_open
from .modelinfo import onnx_info, set_onnx_info


class _BatchReader(CalibrationDataReader):
    """An onnxruntime CalibrationDataReader feeding `arrays` to `input_name` one batch at a time."""

    def __init__(self, input_name: str, arrays: list[np.ndarray]):
        self.input_name, self.arrays = input_name, arrays
        self.position = 0

    def get_next(self) -> dict | None:
        if self.position >= len(self.arrays):
            return None
        self.position += 1
        return {self.input_name: self.arrays[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def _quantize_static(source: Path, target: Path, arrays: list[np.ndarray], input_name: str,
                     per_channel: bool, op_types) -> None:
    quantize_static(
        str(source),
        str(target),
        _BatchReader(input_name, arrays),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(op_types) if op_types else None,
        per_channel=per_channel,
        # U8S8: unsigned activations, signed weights, x86's int8 fast path (VPDPBUSD with
        # VNNI, VPMADDUBSW without); S8S8 was slower here (module docstring).
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def _quantize_dynamic(source: Path, target: Path, per_channel: bool, op_types) -> None:
    quantize_dynamic(
        str(source),
        str(target),
        op_types_to_quantize=list(op_types) if op_types else None,
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
    )


class _PerTensorFallbackFilter(logging.Filter):
    """Drops onnxruntime's per-layer note that a 1-D weight (a LayerNorm's) is quantised per tensor.

    Per-channel quantisation has no channel axis for 1-D weights, so per tensor is
    the only choice; onnxruntime logs it once per LayerNorm (30 lines for a SegFormer-B0).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()


@contextlib.contextmanager
def _quiet_per_tensor_fallback():
    root = logging.getLogger()  # onnxruntime.quantization logs through the root logger
    quiet = _PerTensorFallbackFilter()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _preprocess(source: Path, target: Path) -> bool:
    """quant_pre_process(source -> target); False (with a warning) when it fails."""
    try:
        quant_pre_process(str(source), str(target))
        return True
    except Exception as error:  # the quantiser can still work on the raw export
        warnings.warn(f"quant_pre_process failed ({type(error).__name__}: {error}); quantising the export as is", stacklevel=2)
        return False


def _copy_inference_info(source: Path, target: Path) -> None:
    """The fp32 export's inference record into the INT8 file (the quantiser keeps no metadata)."""
    info = onnx_info(onnx.load(str(source), load_external_data=False), str(source))
    if info is not None:
        model = onnx.load(str(target))
        set_onnx_info(model, info)
        onnx.save(model, str(target))


def quantize_int8(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration_batches: Iterable,
    eval_batches: Iterable | None = None,
    mode: str = "static",
    per_channel: bool = True,
    op_types: tuple[str, ...] | None = None,
    max_calibration_batches: int | None = 8,
    latency_runs: int = 30,
    threads: int | None = None,
    num_classes: int = NUM_CLASSES,
) -> dict:
    """Quantise an fp32 ONNX model to INT8 at `out_path` (atomically) and report on it.

    `calibration_batches` (images, masks) or bare image batches, the first
    `max_calibration_batches` of them, set the activation ranges (static mode);
    `eval_batches` (default: the calibration batches, an optimistic choice:
    pass held-out ones) give the mIoU of fp32 and INT8. `mode` "static" (QDQ,
    see the module docstring) falls back to "dynamic" when it raises; "dynamic"
    asks for dynamic directly. `op_types` limits the quantised operator kinds
    (e.g. ("Conv", "MatMul")); None, the default, quantises every kind
    onnxruntime can (see the module docstring for why).
    `latency_runs=0` skips timing.

    Returns {"path", "mode", "fallback_reason", "per_channel", "op_types",
    "preprocessed", "calibration_batches", "fp32_bytes", "int8_bytes",
    "fp32_miou", "int8_miou", "miou_change" (int8 - fp32),
    "max_abs_logit_diff", "argmax_agreement", "evaluated_on", "input_size",
    "fp32_latency", "int8_latency" ({"median_ms", "p90_ms", ...} or None)}.
    """
    if mode not in ("static", "dynamic"):
        raise ValueError(f"mode must be 'static' or 'dynamic', not {mode!r}")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fp32 = onnx_session(onnx_path, threads)
    input_name = fp32.get_inputs()[0].name
    calibration = []
    for batch in calibration_batches:
        if max_calibration_batches is not None and len(calibration) >= max_calibration_batches:
            break
        calibration.append(images_and_masks(batch))
    if not calibration:
        raise ValueError("no calibration batches")
    arrays = [images.cpu().numpy() for images, _ in calibration]

    fallback_reason = None
    # Work files (the pre-processed and the quantised graph) in a temporary folder beside the output.
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as work:
        work = Path(work)
        source = work / "preprocessed.onnx"
        preprocessed = _preprocess(onnx_path, source)
        if not preprocessed:
            source = onnx_path
        quantized = work / "int8.onnx"
        if mode == "static":
            try:
                with _quiet_per_tensor_fallback():
                    _quantize_static(source, quantized, arrays, input_name, per_channel, op_types)
            except Exception as error:
                fallback_reason = f"static quantisation failed: {type(error).__name__}: {error}"
                warnings.warn(fallback_reason + "; falling back to dynamic quantisation", stacklevel=2)
                mode = "dynamic"
        if mode == "dynamic":
            _quantize_dynamic(source, quantized, per_channel, op_types)
        _copy_inference_info(onnx_path, quantized)
        with open(quantized, "rb") as finished, atomic_open(out_path, "wb") as target:
            shutil.copyfileobj(finished, target)

    int8 = onnx_session(out_path, threads)
    evaluated_on = "calibration batches" if eval_batches is None else "eval batches"
    comparison = compare_logits(session_logits(fp32), session_logits(int8),
                                calibration if eval_batches is None else eval_batches, None, num_classes)
    fp32_miou, int8_miou = comparison["reference_miou"], comparison["candidate_miou"]
    input_size = tuple(int(s) for s in arrays[0].shape[-2:])
    timed = latency_runs > 0
    return {
        "path": str(out_path),
        "mode": mode,
        "fallback_reason": fallback_reason,
        "per_channel": per_channel,
        "op_types": list(op_types) if op_types else None,
        "preprocessed": preprocessed,
        "calibration_batches": len(arrays) if mode == "static" else 0,  # dynamic mode calibrates nothing
        "fp32_bytes": onnx_path.stat().st_size,
        "int8_bytes": out_path.stat().st_size,
        "fp32_miou": fp32_miou,
        "int8_miou": int8_miou,
        "miou_change": None if fp32_miou is None else int8_miou - fp32_miou,
        "max_abs_logit_diff": comparison["max_abs_logit_diff"],
        "argmax_agreement": comparison["argmax_agreement"],
        "evaluated_on": evaluated_on,
        "input_size": list(input_size),
        "fp32_latency": onnx_latency(onnx_path, input_size, runs=latency_runs, session=fp32) if timed else None,
        "int8_latency": onnx_latency(out_path, input_size, runs=latency_runs, session=int8) if timed else None,
    }
