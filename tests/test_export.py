"""ONNX export, PyTorch/onnxruntime parity, INT8 quantisation (offroadseg.quantize), ONNX latency."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError

from offroadseg import export
from offroadseg.models import build_model

SIZE = (64, 96)


# Tiny tensors: one torch thread (the shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(name).eval()


@pytest.fixture(scope="module")
def segformer():
    return _model("segformer-b0")


@pytest.fixture(scope="module")
def segformer_onnx(segformer, tmp_path_factory):
    return export.export_onnx(segformer, tmp_path_factory.mktemp("onnx") / "segformer.onnx", SIZE)


def _onnx_logits(path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images.numpy()})[0]


def _torch_logits(model, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(images).numpy()


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["segformer-b0", "deeplabv3plus-resnet18"])
def test_onnx_reproduces_pytorch_logits_for_any_batch_and_size(name, tmp_path):
    model = _model(name)
    path = export.export_onnx(model, tmp_path / "model.onnx", SIZE)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["logits"]
    # Batch, height and width are symbolic: one file for every input size.
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, "height", "width"]
    for shape in [(3, 3, *SIZE), (1, 3, 96, 128)]:
        images = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        onnx_logits = _onnx_logits(path, images)
        assert onnx_logits.shape == (shape[0], 10, *shape[2:])
        assert np.abs(onnx_logits - _torch_logits(model, images)).max() < 1e-3


def test_dynamo_exporter_on_too_old_a_torch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    with pytest.raises(RuntimeError, match=r"needs torch 2\.11 or newer; this is torch 2\.6\.0.*torchscript"):
        export.export_onnx(_model("deeplabv3plus-resnet18"), tmp_path / "model.onnx", SIZE, exporter="dynamo")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(export._torch_version() < export.DYNAMO_MIN_TORCH, reason="dynamo exporter needs a newer torch")
def test_dynamo_exporter_gives_the_same_logits_with_dynamic_batch(tmp_path):
    model = _model("deeplabv3plus-resnet18")
    path = export.export_onnx(model, tmp_path / "model.onnx", SIZE, exporter="dynamo")
    for batch in (1, 3):  # the example batch is 2; neither 1 nor 3 may be baked in
        images = torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(batch))
        assert np.abs(_onnx_logits(path, images) - _torch_logits(model, images)).max() < 1e-3


def test_export_leaves_the_model_in_its_mode_and_rejects_unknown_exporters(tmp_path):
    model = _model("segformer-b0").train()
    export.export_onnx(model, tmp_path / "model.onnx", (32, 32))
    assert model.training
    with pytest.raises(ValueError, match="exporter"):
        export.export_onnx(model, tmp_path / "other.onnx", exporter="tflite")


@pytest.mark.parametrize("failure", ["exporter raises", "invalid graph"])
def test_failed_export_leaves_no_partial_file_and_keeps_the_old_one(segformer, tmp_path, monkeypatch, failure):
    target = tmp_path / "student.onnx"
    target.write_bytes(b"previous export")

    def broken_export(model, args, f, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a graph")
        if failure == "exporter raises":
            raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises((RuntimeError, DecodeError)):  # RuntimeError, or onnx's checker rejecting the half graph
        export.export_onnx(segformer, target, SIZE)
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]


# ----------------------------------------------------------------------------- parity


def _batches_labelled_by(model, count: int, seed: int = 0, relabel=lambda pred: pred):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        images = torch.randn(2, 3, *SIZE, generator=generator)
        masks = relabel(torch.as_tensor(_torch_logits(model, images)).argmax(1))
        masks[:, :4] = 255  # ignored pixels must not count
        batches.append((images, masks))
    return batches


def test_parity_report_with_masks_equal_to_the_pytorch_prediction(segformer, segformer_onnx):
    batches = _batches_labelled_by(segformer, 3)
    report = export.onnx_parity(segformer, segformer_onnx, batches, max_batches=2)
    assert (report["batches"], report["images"], report["pixels"]) == (2, 4, 4 * SIZE[0] * SIZE[1])
    assert report["torch_miou"] == 1.0
    assert report["onnx_miou"] > 0.999 and abs(report["miou_diff"]) < 1e-3
    assert report["max_abs_logit_diff"] < 1e-3
    assert report["argmax_mismatch_pixels"] <= 2  # only exact ties could flip
    assert report["argmax_agreement"] == 1 - report["argmax_mismatch_pixels"] / report["pixels"]


def test_parity_report_with_wrong_masks_and_without_masks(segformer, segformer_onnx):
    wrong = _batches_labelled_by(segformer, 1, relabel=lambda pred: (pred + 1) % 10)
    assert export.onnx_parity(segformer, segformer_onnx, wrong)["torch_miou"] == 0.0
    unlabelled = export.onnx_parity(segformer, segformer_onnx, [torch.randn(2, 3, *SIZE)])
    assert unlabelled["torch_miou"] is None and unlabelled["miou_diff"] is None
    assert unlabelled["images"] == 2


def test_parity_counts_the_pixels_whose_class_differs(segformer, segformer_onnx):
    other = _model("segformer-b0", seed=1)  # another model against the same ONNX file
    images = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(5))
    expected = (_torch_logits(other, images).argmax(1) != _onnx_logits(segformer_onnx, images).argmax(1)).sum()
    report = export.onnx_parity(other, segformer_onnx, [(images, torch.zeros(2, *SIZE, dtype=torch.long))])
    assert expected > 0 and report["argmax_mismatch_pixels"] == expected
    assert report["max_abs_logit_diff"] > 1e-3


# ----------------------------------------------------------------------------- INT8

PALETTE = torch.tensor([[1.5, -1.5, 0.0], [-1.5, 1.5, 0.0], [0.0, 0.0, 1.8], [-1.5, -1.5, -1.5]])


def _colour_blocks(n: int, generator, size=(32, 48), block: int = 8):
    """Images of coloured blocks whose colour is their class (0-3), plus a little noise."""
    cells = torch.randint(0, len(PALETTE), (n, size[0] // block, size[1] // block), generator=generator)
    masks = cells.repeat_interleave(block, 1).repeat_interleave(block, 2)
    images = PALETTE[masks].permute(0, 3, 1, 2) + 0.1 * torch.randn(n, 3, *size, generator=generator)
    return images, masks


@pytest.fixture(scope="module")
def fitted_onnx(tmp_path_factory):
    """A segformer-b0 fitted for a few steps to the colour blocks (well separated logits), exported."""
    torch.manual_seed(0)
    model = build_model("segformer-b0", drop_path=0.0, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        images, masks = _colour_blocks(4, generator)
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = export.export_onnx(model.eval(), tmp_path_factory.mktemp("fitted") / "fitted.onnx", (32, 48))
    calibration = [_colour_blocks(2, generator) for _ in range(3)]
    held_out = [_colour_blocks(4, generator) for _ in range(2)]
    return path, calibration, held_out


def test_onnx_latency_reports_median_and_p90(segformer_onnx):
    latency = export.onnx_latency(segformer_onnx, (32, 32), runs=4, warmup=1, threads=1)
    assert set(latency) == {"median_ms", "p90_ms", "runs", "threads"}
    assert 0 < latency["median_ms"] <= latency["p90_ms"]
    assert latency["runs"] == 4 and latency["threads"] == 1
    with pytest.raises(ValueError):
        export.onnx_latency(segformer_onnx, (32, 32), runs=0)
