"""The student as a deployable file: ONNX export, onnxruntime sessions, a parity check against PyTorch;
and the command line for exports.

    path = export_onnx(model, "outputs/<run>/exports/student.onnx", input_size=(180, 320))
    parity = onnx_parity(model, path, val_loader, max_batches=8)
    onnx_latency(path, (180, 320))  # {"median_ms", "p90_ms", "runs", "threads"}

INT8 quantisation of such a file is `offroadseg.quantize.quantize_int8`.

The ONNX graph takes "image" (N, 3, H, W), normalised like the PyTorch model's
input (`offroadseg.preprocess`), and returns "logits" (N, 10, H, W). Batch,
height and width are all dynamic: one file serves any batch size and input
size the model itself accepts.

Exporter (`exporter=`), chosen from measurements with torch 2.14 / onnxscript 0.7 /
onnxruntime 1.32 on segformer-b0 and deeplabv3plus-resnet18 (the figures are in
bench/RESULTS.md, "Figures moved from docstrings"):

- "torchscript" (`torch.onnx.export(..., dynamo=False)`), the default: quick for either model,
  dynamic batch, height and width, opset 17, one self-contained file; onnxruntime reproduces the
  logits to float rounding. Its trace warnings are silenced: they concern Python checks constant
  for every input the models accept (our "are the logits already at the input size?", never true
  as both decoders work at stride 4; transformers' `is_causal = q_length > 1`, never causal for an
  encoder). Deprecated since torch 2.9, present in every release we support (2.11 and later).
- "dynamo" (`torch.export`-based): also exact, an order of magnitude slower to export SegFormer,
  needs opset 18 (onnx's version converter cannot take DeepLab's graph to 17), and turns a
  dimension whose example size is 1 into a constant, so the example batch is 2. Use it if a
  future torch drops the TorchScript exporter. It needs torch 2.11 or newer (`DYNAMO_MIN_TORCH`):
  on torch 2.6 height and width cannot stay dynamic ("Constraints violated (height, width)") and
  the fallback's graph fails to serialise, so an older torch gets a clear error up front.

Command line: `python -m offroadseg.export hf RUN_OR_CKPT DIR [--model NAME]` writes a SegFormer in
Hugging Face format (`offroadseg.hf_export`, where the details are); exit status 0 when written, 2
when the source cannot be exported (said in one line, with what to use instead). Timing here is
per ONNX session only (`onnx_latency`); timing of any callable lives in `offroadseg.benchmark`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.export import Dim

from .checkpoints import CheckpointError
from .classes import NUM_CLASSES
from .device import inference_autocast, model_device
from .metrics import confusion_matrix, scores
from .modelinfo import inference_info, onnx_info, parse_input_size, set_onnx_info

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
DYNAMO_MIN_TORCH = (2, 11)  # the oldest torch the dynamo exporter was tested on here (fails on 2.6)
# torch.export specialises a dimension whose example size is 0 or 1 to a constant.
EXAMPLE_BATCH = 2
# Bounds torch.export needs for the dynamic height and width (pixels).
DYNAMO_SIZE_RANGE = (32, 4096)


# ----------------------------------------------------------------------------- export


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: tuple[int, int] = (180, 320),
    opset: int | None = None,
    exporter: str = "torchscript",
    inference: dict | None = None,
) -> Path:
    """Export `model` to ONNX at `path`, atomically; returns the path.

    The file describes itself: `inference` (`modelinfo.inference_info`, e.g. the checkpoint's
    own record, `modelinfo.read_inference_info(best.pt)`) is stored as JSON in the model's
    metadata_props, its "spec" set to the model's; None builds one for `input_size` (no TTA).

    `input_size` (height, width) is the example the graph is traced with; the
    file accepts any batch size and any height and width. `opset` defaults to
    17 for the TorchScript exporter and 18 for the dynamo one. The model is
    exported in eval mode on its own device and left in the mode it came in.
    The graph is written to a temporary file beside `path` and checked with
    onnx's checker before it replaces `path`, so a failed export leaves no
    partial file and keeps any previous export.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    if exporter == "dynamo" and _torch_version() < DYNAMO_MIN_TORCH:
        raise RuntimeError(
            f"exporter='dynamo' needs torch {'.'.join(map(str, DYNAMO_MIN_TORCH))} or newer; this is torch "
            f"{torch.__version__}, whose torch.export cannot keep height and width dynamic for these models. "
            "Use exporter='torchscript' (the default) or upgrade torch."
        )

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opset = opset or DEFAULT_OPSET[exporter]
    example = torch.randn(EXAMPLE_BATCH, 3, *input_size, device=model_device(model))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if exporter == "torchscript":
                _export_torchscript(model, example, tmp, opset)
            else:
                _export_dynamo(model, example, tmp, opset)
        info = dict(inference) if inference is not None else inference_info(input_size)
        info["spec"] = getattr(model, "spec", info.get("spec"))
        graph = onnx.load(tmp)
        set_onnx_info(graph, info)
        onnx.save(graph, tmp)
        onnx.checker.check_model(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, tmp + ".data"):  # ".data": external weights, should an exporter write them
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        raise
    finally:
        model.train(was_training)
    return path


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    dynamic = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        # The exporter's deprecation notices (about itself and its internals), and trace
        # warnings about shape checks that are constant for every input size (module docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic},
            do_constant_folding=True,
        )


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    low, high = DYNAMO_SIZE_RANGE
    shapes = ({0: Dim("batch", min=1, max=1024), 2: Dim("height", min=low, max=high), 3: Dim("width", min=low, max=high)},)
    torch.onnx.export(
        model,
        (example,),
        path,
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=shapes,
        external_data=False,  # one self-contained file (fine below protobuf's 2 GB)
        verbose=False,
    )


def _torch_version() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", str(torch.__version__)).groups()
    return int(major), int(minor)


def _fsync(path: str | os.PathLike) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


# ----------------------------------------------------------------------------- sessions


def onnx_providers(device: str = "cpu") -> list[str]:
    """onnxruntime execution providers for `device`: "cpu"; "cuda" and "auto": CUDA when this
    onnxruntime has it (the onnxruntime-gpu build), else the CPU. Asked for "cuda" where the build
    lacks it (the plain onnxruntime wheel, as on many GPU images), it says so in one warning line
    and runs on the CPU: the ONNX model still predicts, only slower."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        warnings.warn(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider ({', '.join(available)}): "
                      f"the ONNX model runs on the CPU; install onnxruntime-gpu for ONNX on the GPU",
                      RuntimeWarning, stacklevel=2)
    return ["CPUExecutionProvider"]


def onnx_session(onnx_path: str | os.PathLike, threads: int | None = None, device: str = "cpu"):
    """An onnxruntime session (CPU unless `device` is "cuda"/"auto", see `onnx_providers`);
    `threads` sets the intra-op thread count (None: all cores)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), options, providers=onnx_providers(device))


class OnnxModel:
    """An ONNX export as a predictor: normalised float batch (N, 3, H, W) -> logits (N, C, H, W), fp32
    torch tensors on the CPU, so `evaluate.predict_labels` and TTA use it as they use a module.

    `device` is where its inputs are expected (`device.model_device`): the CPU, whichever provider
    runs the graph (onnxruntime copies to the GPU itself). `info` is the file's inference record
    (None for an export that predates it); `providers` the session's.
    """

    returns_probs = False
    device = torch.device("cpu")

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None):
        self.path = Path(path)
        self.session = onnx_session(self.path, threads, device)
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()
        self.info = onnx_info(onnx.load(str(self.path), load_external_data=False), str(self.path))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def session_logits(session) -> Callable[[torch.Tensor], np.ndarray]:
    """A function from a normalised float batch to `session`'s logits (numpy), for `compare_logits`."""
    name = session.get_inputs()[0].name

    def logits(images: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: images.detach().to("cpu", torch.float32).numpy()})[0]

    return logits


def onnx_latency(
    onnx_path: str | os.PathLike,
    input_size: tuple[int, int],
    runs: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    session=None,
) -> dict:
    """Batch-1 latency of an ONNX model on the CPU: {"median_ms", "p90_ms", "runs", "threads"}.

    Each run is timed with time.perf_counter around `session.run` alone (the
    input is prepared once); `warmup` untimed runs come first, since the first
    runs pay for memory planning. `session` reuses an open session.
    """
    if runs < 1:
        raise ValueError("runs must be at least 1")
    session = session or onnx_session(onnx_path, threads)
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, *input_size), dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(1000.0 * (time.perf_counter() - start))
    return {
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "runs": runs,
        "threads": session.get_session_options().intra_op_num_threads or None,
    }


# ----------------------------------------------------------------------------- parity


@contextlib.contextmanager
def tf32_off():
    """TF32 matmuls and cuDNN convolutions off inside, the previous settings restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def images_and_masks(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, masks or None) from a loader item: (images, masks, ...) or a bare image batch."""
    if isinstance(batch, (tuple, list)):
        images, masks = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        images, masks = batch, None
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim == 3:  # one image
        images = images.unsqueeze(0)
        masks = None if masks is None else torch.as_tensor(masks).unsqueeze(0)
    return images, (None if masks is None else torch.as_tensor(masks))


def compare_logits(
    reference: Callable[[torch.Tensor], np.ndarray],
    candidate: Callable[[torch.Tensor], np.ndarray],
    batches: Iterable,
    max_batches: int | None,
    num_classes: int,
) -> dict:
    """Run two logit producers on the same batches; their differences and confusion matrices."""
    cms = [torch.zeros(num_classes, num_classes, dtype=torch.int64) for _ in range(2)]
    max_diff, diff_sum, values, mismatched, pixels, images_seen, batches_seen, masked = 0.0, 0.0, 0, 0, 0, 0, 0, False
    for batch in batches:
        if max_batches is not None and batches_seen >= max_batches:
            break
        images, masks = images_and_masks(batch)
        ref, cand = reference(images), candidate(images)
        if ref.shape != cand.shape:
            raise ValueError(f"logit shapes differ: {ref.shape} against {cand.shape}")
        diff = np.abs(ref - cand)
        max_diff = max(max_diff, float(diff.max()))
        diff_sum += float(diff.sum(dtype=np.float64))
        values += diff.size
        ref_pred, cand_pred = ref.argmax(1), cand.argmax(1)
        mismatched += int((ref_pred != cand_pred).sum())
        pixels += ref_pred.size
        if masks is not None:
            masked = True
            for cm, pred in zip(cms, (ref_pred, cand_pred)):
                cm += confusion_matrix(torch.from_numpy(pred), masks.cpu(), num_classes=num_classes)
        images_seen += images.shape[0]
        batches_seen += 1
    if not batches_seen:
        raise ValueError("no batches to compare")
    mious = [scores(cm)["miou"] if masked else None for cm in cms]
    return {
        "batches": batches_seen,
        "images": images_seen,
        "pixels": pixels,
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": diff_sum / values,
        "argmax_mismatch_pixels": mismatched,
        "argmax_agreement": 1.0 - mismatched / pixels,
        "reference_miou": mious[0],
        "candidate_miou": mious[1],
    }


def onnx_parity(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    batches: Iterable,
    max_batches: int | None = None,
    num_classes: int = NUM_CLASSES,
    threads: int | None = None,
) -> dict:
    """Compare PyTorch and onnxruntime (CPU) on the same batches.

    PyTorch runs through the one precision rule, `device.inference_autocast`, asked for the
    export's precision ("fp32": the ONNX graph is fp32, and bf16 against it would measure bf16),
    in eval mode under inference_mode, with TF32 matmuls and convolutions off for the call
    (settings restored after): the report measures the export, not TF32's rounding on a GPU.

    `batches`: a DataLoader or any iterable of (images, masks) (or bare image
    batches, which give no mIoU); the first `max_batches` are used. Returns
    {"batches", "images", "pixels", "max_abs_logit_diff", "mean_abs_logit_diff",
    "argmax_mismatch_pixels", "argmax_agreement", "torch_miou", "onnx_miou",
    "miou_diff" (onnx - torch)}; the mIoUs are against the masks (None without masks).
    """
    session = onnx_session(onnx_path, threads)
    device = model_device(model)
    was_training = model.training
    model.eval()

    def torch_logits(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), inference_autocast(device, "fp32"):
            return model(images.to(device)).float().cpu().numpy()

    try:
        with tf32_off():
            report = compare_logits(torch_logits, session_logits(session), batches, max_batches, num_classes)
    finally:
        model.train(was_training)
    torch_miou, onnx_miou = report.pop("reference_miou"), report.pop("candidate_miou")
    report.update(
        torch_miou=torch_miou,
        onnx_miou=onnx_miou,
        miou_diff=None if torch_miou is None else onnx_miou - torch_miou,
    )
    return report


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m offroadseg.export", description="Export a trained model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    hf = commands.add_parser(
        "hf", help="a SegFormer (teacher or student) in Hugging Face format",
        description="Write a SegFormer checkpoint with save_pretrained (config with the class names, image processor "
                    "config, safetensors weights), loadable offline by transformers.pipeline('image-segmentation', "
                    "model=DIR) and SegformerForSemanticSegmentation.from_pretrained(DIR). DeepLab models have no "
                    "such form (exit status 2, with what to use instead).")
    hf.add_argument("source", metavar="RUN_OR_CKPT",
                    help="a run folder (outputs/<run>), a model folder (models/<name>) or a checkpoint (best.pt)")
    hf.add_argument("out", metavar="DIR", help="the folder to write (new, empty, or an earlier export: replaced)")
    hf.add_argument("--model", default="auto", metavar="NAME",
                    help="for a run folder: which of its models/<NAME>/ (student, segformer, ...); auto (default): "
                         "the student when it is a SegFormer, else the segformer teacher")
    hf.add_argument("--input-size", default=None, metavar="HxW",
                    help="the input size, for checkpoints that predate the inference record (or to override it)")
    return parser


def main(argv=None) -> int:
    from . import hf_export  # noqa: PLC0415 (transformers takes seconds to import; only the hf command needs it)

    args = build_parser().parse_args(argv)
    try:
        input_size = None
        if args.input_size:
            try:
                input_size = parse_input_size(args.input_size)
            except ValueError as err:
                raise hf_export.ExportError(f"--input-size {err}") from None
        checkpoint = hf_export.resolve_checkpoint(args.source, args.model)
        result = hf_export.export_hf(checkpoint, args.out, input_size=input_size)
    except (hf_export.ExportError, CheckpointError, FileNotFoundError) as err:
        print(f"offroadseg.export: error: {err}", file=sys.stderr)
        return 2
    height, width = result["input_size"]
    print(f"{result['checkpoint']} ({result['model']}, input {height}x{width}) -> {result['dir']}: "
          f"{', '.join(result['files'])}; logits match the checkpoint to {result['max_abs_logit_diff']:.1g}")
    print(f"load it with transformers.pipeline('image-segmentation', model={str(result['dir'])!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
