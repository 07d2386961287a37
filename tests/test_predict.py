"""Inference on new images: the one prediction path, self-describing model files, the predict CLI
from a checkpoint and from its ONNX export, bad inputs, and helpers that leave a caller's model alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from offroadseg import benchmark, evaluate, export, modelinfo, predict, quantize
from offroadseg.augment import eval_transform
from offroadseg.chapters import assembly, distillation, teachers
from offroadseg.checkpoints import load_model
from offroadseg.classes import RAW_IDS
from offroadseg.data import read_mask, read_raw_mask
from offroadseg.dataset import SegmentationDataset
from offroadseg.device import on_device
from offroadseg.engine import TrainConfig, fit
from offroadseg.ensemble import Ensemble, TestTimeAugmentation
from offroadseg.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT = (32, 48)
STUDENT = ("deeplabv3plus-resnet18", {"output_stride": 32, "aspp_channels": 16, "decoder_channels": 16})


class Blocks(torch.utils.data.Dataset):
    """Normalised random images with a two-class mask (top sky, bottom landscape)."""

    def __init__(self, n: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, *INPUT, generator=generator)
        self.masks = torch.full((n, *INPUT), 8, dtype=torch.long)
        self.masks[:, : INPUT[0] // 2] = 9

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.masks[index]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """best.pt of a one-epoch engine.fit of a tiny real student, with its inference record."""
    out = tmp_path_factory.mktemp("run") / "models" / "student"
    torch.manual_seed(0)
    model = build_model(STUDENT[0], **STUDENT[1])
    info = modelinfo.inference_info(INPUT, tta_flips=("h",), spec=model.spec)
    fit(model, Blocks(8, 1), Blocks(4, 2), TrainConfig(epochs=1, batch_size=4, precision="fp32"), out,
        progress=False, inference_record=info)
    return out / "best.pt"


@pytest.fixture(scope="module")
def onnx_file(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("exports") / "student.onnx"
    return export.export_onnx(load_model(checkpoint), path, INPUT, inference=modelinfo.read_inference_info(checkpoint))


def images_folder(root, sizes=((40, 64), (27, 50)), jpeg_too=True):
    """PNG (and JPEG) images of two sizes in `root`; returns the folder."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"png{k}.png")
        if jpeg_too:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"jpg{k}.jpg", quality=90)
    return root


# ------------------------------------------------------------------ the prediction path


def reference_labels(model, frame: np.ndarray, size) -> np.ndarray:
    """Straightforward reference: eval_transform on the CPU, model, logits upsampled (NCHW), softmax, argmax."""
    x, _ = eval_transform(size)(frame, None)
    with torch.inference_mode():
        logits = model(x[None])
        logits = F.interpolate(logits, size=frame.shape[:2], mode="bilinear", align_corners=False)
        return logits.softmax(dim=1).argmax(dim=1)[0].numpy().astype(np.uint8)


def test_predict_labels_matches_the_reference_at_each_frames_own_size():
    torch.manual_seed(0)
    model = build_model(STUDENT[0], **STUDENT[1]).eval()
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((90, 160), (90, 160), (71, 133))]
    labels = evaluate.predict_labels(model, frames, INPUT)
    assert [label.shape for label in labels] == [(90, 160), (90, 160), (71, 133)]
    assert all(label.dtype == np.uint8 for label in labels)
    agree = np.mean(np.concatenate([(label == reference_labels(model, frame, INPUT)).ravel()
                                    for label, frame in zip(labels, frames)]))
    assert agree >= 0.9999


def test_predict_labels_of_a_float_batch_and_log_probs_of_probability_predictors():
    torch.manual_seed(0)
    model = build_model(STUDENT[0], **STUDENT[1]).eval()
    x = torch.randn(2, 3, *INPUT)
    labels, log_probs = evaluate.predict_labels(model, x, sizes=(64, 96), return_log_probs=True)
    assert labels[0].shape == (64, 96) and log_probs.shape == (2, 10, *INPUT)
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(2, *INPUT), atol=1e-5)
    tta = TestTimeAugmentation(model, flips=("h",))
    _, tta_log_probs = evaluate.predict_labels(tta, x, return_log_probs=True)
    assert torch.allclose(tta_log_probs.exp().sum(1), torch.ones(2, *INPUT), atol=1e-5)  # probs, not re-softmaxed
    same = evaluate.predict_labels(model, x, flips=("h",))
    assert all((a == b).all() for a, b in zip(same, evaluate.predict_labels(tta, x)))


# ------------------------------------------------------------------ self-describing models


@pytest.mark.slow
def test_fit_and_export_record_what_inference_needs(checkpoint, onnx_file, tmp_path):
    info = modelinfo.read_inference_info(checkpoint)
    assert info["input_size"] == list(INPUT) and info["tta_flips"] == ["h"]
    assert [c["raw_id"] for c in info["classes"]] == list(RAW_IDS) and len(info["mean"]) == 3
    assert info["spec"]["name"] == STUDENT[0]
    onnx_record = modelinfo.read_inference_info(onnx_file)
    assert onnx_record == info
    calibration = [torch.randn(2, 3, *INPUT) for _ in range(2)]
    int8 = quantize.quantize_int8(onnx_file, tmp_path / "int8.onnx", calibration, latency_runs=0)
    assert modelinfo.read_inference_info(int8["path"]) == info


def test_records_are_validated():
    with pytest.raises(ValueError, match="input_size"):
        modelinfo.inference_info((0, 10))
    with pytest.raises(ValueError, match="flip"):
        modelinfo.inference_info((8, 8), tta_flips=("x",))
    proto = onnx.ModelProto()
    modelinfo.set_onnx_info(proto, modelinfo.inference_info((8, 8)))
    modelinfo.set_onnx_info(proto, modelinfo.inference_info((16, 8)))  # replaces, never duplicates
    assert len(proto.metadata_props) == 1 and modelinfo.onnx_info(proto)["input_size"] == [16, 8]
    assert modelinfo.read_inference_info({"model": {}}) is None  # an old checkpoint


# ----------------------------------------------------------------------------- the CLI


def written(out, stem):
    return read_raw_mask(out / "raw" / f"{stem}.png"), out / "color" / f"{stem}.png"


@pytest.mark.slow
def test_cli_from_checkpoint_and_onnx_agree_at_each_images_size(checkpoint, onnx_file, tmp_path, capsys):
    folder = images_folder(tmp_path / "frames")
    assert predict.main([str(checkpoint), str(folder), "--out", str(tmp_path / "pt"), "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("4 images in") and "images/s end to end" in line and "0 skipped" in line
    assert predict.main([str(onnx_file), str(folder / "*.png"), str(folder / "*.jpg"), "--out", str(tmp_path / "onnx"),
                         "--quiet", "--tta", "none"]) == 0
    plain = load_model(checkpoint)  # the ONNX run had no TTA: compare with the checkpoint's model without it
    agree, pixels = 0, 0
    for stem, (h, w) in [("png0", (40, 64)), ("jpg0", (40, 64)), ("png1", (27, 50)), ("jpg1", (27, 50))]:
        raw, color = written(tmp_path / "pt", stem)
        assert raw.shape == (h, w) and raw.dtype == np.uint16 and set(np.unique(raw)) <= set(RAW_IDS)
        assert np.asarray(Image.open(color)).shape == (h, w, 3)
        assert (read_mask(tmp_path / "pt" / "raw" / f"{stem}.png") < 10).all()
        frame = np.asarray(Image.open(next(folder.glob(f"{stem}.*"))).convert("RGB"))
        reference = evaluate.predict_labels(plain, [frame], INPUT)[0]
        agree += int((read_mask(tmp_path / "onnx" / "raw" / f"{stem}.png") == reference).sum())
        pixels += reference.size
    assert agree / pixels >= 0.99


def test_cli_tta_option_and_no_color(checkpoint, tmp_path, capsys):
    folder = images_folder(tmp_path / "frames", sizes=((24, 40),), jpeg_too=False)
    out = tmp_path / "out"
    assert predict.main([str(checkpoint), str(folder), "--out", str(out), "--tta", "h,v", "--no-color",
                         "--batch-size", "1", "--device", "cpu", "--precision", "fp32", "--quiet"]) == 0
    assert "TTA h+v" in capsys.readouterr().err
    assert (out / "raw" / "png0.png").exists() and not (out / "color").exists()
    assert predict.main([str(checkpoint), str(folder), "--out", str(out), "--tta", "sideways"]) == 2
    assert "--tta" in capsys.readouterr().err


def test_cli_slide_predicts_each_frame_at_its_own_resolution_in_windows(checkpoint, onnx_file, tmp_path, capsys):
    folder = images_folder(tmp_path / "frames", sizes=((40, 64), (27, 50)), jpeg_too=False)
    for model, out in ((checkpoint, tmp_path / "pt"), (onnx_file, tmp_path / "onnx")):  # ONNX: windows of its fixed size
        assert predict.main([str(model), str(folder), "--out", str(out), "--tta", "none", "--slide", "0.25",
                             "--quiet"]) == 0
        assert "slide: windows overlapping by 0.25" in capsys.readouterr().err
    plain = load_model(checkpoint)
    for stem in ("png0", "png1"):
        frame = np.asarray(Image.open(folder / f"{stem}.png").convert("RGB"))
        reference = evaluate.predict_labels(plain, [frame], INPUT, slide=0.25)[0]
        assert np.array_equal(read_mask(tmp_path / "pt" / "raw" / f"{stem}.png"), reference)
        assert (read_mask(tmp_path / "onnx" / "raw" / f"{stem}.png") == reference).mean() >= 0.99
    assert predict.main([str(checkpoint), str(folder), "--out", str(tmp_path / "x"), "--slide", "1.5"]) == 2
    assert "--slide 1.5" in capsys.readouterr().err


def test_cli_skips_unreadable_and_non_image_files_by_name(checkpoint, tmp_path, capsys):
    folder = images_folder(tmp_path / "frames", sizes=((24, 40),), jpeg_too=False)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    video = tmp_path / "drive.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    code = predict.main([str(checkpoint), str(folder), str(folder / "notes.txt"), str(video), str(tmp_path / "gone.png"),
                         "--out", str(tmp_path / "out"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 1  # some inputs skipped
    assert "broken.png" in captured.err and "notes.txt" in captured.err
    assert "drive.mp4: cannot be decoded as a video" in captured.err and "gone.png" in captured.err
    assert "1 images in" in captured.out and "3 skipped" in captured.out  # the video is counted on its own
    assert (tmp_path / "out" / "raw" / "png0.png").exists()


def test_cli_refuses_bad_models_and_an_output_inside_the_input(checkpoint, tmp_path, capsys):
    folder = images_folder(tmp_path / "frames", sizes=((24, 40),), jpeg_too=False)
    not_a_model = tmp_path / "model.bin"
    not_a_model.write_bytes(b"just bytes")
    assert predict.main([str(not_a_model), str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "neither a training checkpoint" in capsys.readouterr().err
    broken_onnx = tmp_path / "model.onnx"
    broken_onnx.write_bytes(b"just bytes")
    assert predict.main([str(broken_onnx), str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
    assert predict.main([str(checkpoint), str(folder), "--out", str(folder / "predictions")]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    # A glob over the output folder never reads predictions back as input.
    out = tmp_path / "out"
    assert predict.main([str(checkpoint), str(folder), "--out", str(out), "--quiet"]) == 0
    assert predict.main([str(checkpoint), str(tmp_path / "**" / "*.png"), "--out", str(out), "--quiet"]) == 0
    assert "1 images in" in capsys.readouterr().out.splitlines()[-1]
    # Frames kept inside the output folder (not in its raw/ or color/) are input like any other.
    images_folder(out / "frames", sizes=((24, 40),), jpeg_too=False)
    (out / "frames" / "png0.png").rename(out / "frames" / "inside.png")
    assert predict.main([str(checkpoint), str(out / "frames"), "--out", str(out), "--quiet"]) == 0
    assert (out / "raw" / "inside.png").exists()


def test_cli_old_checkpoint_needs_the_input_size(checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=True)
    del state["inference"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    folder = images_folder(tmp_path / "frames", sizes=((24, 40),), jpeg_too=False)
    assert predict.main([str(old), str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "--input-size" in capsys.readouterr().err
    assert predict.main([str(old), str(folder), "--out", str(tmp_path / "out"), "--input-size", "32x48", "--quiet"]) == 0
    assert load_model(old).spec["name"] == STUDENT[0]  # old checkpoints still load


def test_same_stem_twice_is_refused(checkpoint, tmp_path, capsys):
    a = images_folder(tmp_path / "a", sizes=((24, 40),), jpeg_too=False)
    b = images_folder(tmp_path / "b", sizes=((24, 40),), jpeg_too=False)
    assert predict.main([str(checkpoint), str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    assert "occur twice" in capsys.readouterr().err


# ------------------------------------------------------------ callers' models left alone


class OnMeta(nn.Module):
    """A model whose weights live on the meta device (standing in for a GPU), returning CPU zeros;
    it checks that its input was put on its own device."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, device="meta"))

    def forward(self, x):
        assert x.device == self.weight.device, f"input on {x.device}, model on {self.weight.device}"
        return torch.zeros(x.shape[0], 10, *x.shape[-2:])


def test_predictors_put_inputs_on_the_models_device():
    dataset = [(torch.randn(3, 8, 12), torch.zeros(8, 12, dtype=torch.long))] * 2
    dataset = type("Items", (list,), {"stem": lambda self, i: str(i)})(dataset)
    rows = assembly.sample_predictions(OnMeta(), dataset, count=2)
    assert rows[0][2].shape == (8, 12)
    assert evaluate.predict_labels(OnMeta(), [np.zeros((8, 12, 3), np.uint8)], (8, 12))[0].shape == (8, 12)


def test_timing_helpers_put_the_callers_model_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 10, 1), nn.BatchNorm2d(10)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters()]
    benchmark.latency(model, input_size=(8, 8), device="meta", warmup=0, runs=1)
    benchmark.throughput(model, input_size=(8, 8), batch_sizes=(1, 2), device="meta", warmup=0, runs=1)
    assert all(p.device.type == "cpu" for p in model.parameters()) and model.training
    assert [p for p in model.parameters()] == params and model[1].running_mean.device.type == "cpu"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ensemble = Ensemble([model]).train()  # members stay in eval mode inside an ensemble
    with on_device(ensemble, "meta"):
        assert next(model.parameters()).device.type == "meta" and not ensemble.training
    assert next(model.parameters()).device.type == "cpu" and ensemble.training


def test_throughput_records_a_non_memory_error_as_such():
    def limited(x):
        if x.shape[0] >= 4:
            raise RuntimeError("upsample_bilinear2d_nhwc only supports output tensors with less than INT_MAX elements")
        return x

    result = benchmark.throughput(limited, input_size=(4, 4), batch_sizes=(1, 2, 4, 8), device="cpu", warmup=0, runs=1)
    assert result["best_batch"] in (1, 2)
    error = result["per_batch"][4]["error"]
    assert error.startswith("RuntimeError: upsample") and "memory" not in error


@pytest.fixture
def tf32_on():
    """TF32 switched on (as a GPU user may have it) for the test, the settings restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_onnx_parity_runs_with_tf32_off_and_restores_it(onnx_file, checkpoint, tf32_on):
    model = load_model(checkpoint)
    seen = []
    original = model.forward

    def forward(x):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return original(x)

    model.forward = forward
    report = export.onnx_parity(model, onnx_file, [torch.randn(2, 3, *INPUT)])
    assert seen == [(False, False)] and report["argmax_agreement"] >= 0.99
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_write_predictions_and_per_image_results_use_the_one_path(checkpoint, tmp_path):
    model = load_model(checkpoint)
    folder = images_folder(tmp_path / "frames", sizes=((40, 64), (27, 50)), jpeg_too=False)
    pairs = [(folder / "png0.png", None), (folder / "png1.png", None)]
    paths = evaluate.write_predictions(model, pairs, tmp_path / "pred", INPUT, progress=False)
    for path, (image, _) in zip(paths, pairs):
        frame = np.asarray(Image.open(image).convert("RGB"))
        assert (read_mask(path) == reference_labels(model, frame, INPUT)).mean() >= 0.9999
    masks = tmp_path / "masks"
    masks.mkdir()
    for image, _ in pairs:
        h, w = Image.open(image).size[::-1]
        Image.fromarray(np.full((h, w), 10000, np.uint16)).save(masks / image.name)
    dataset = SegmentationDataset([(image, masks / image.name) for image, _ in pairs],
                                  eval_transform(INPUT, keep_mask_size=True))
    rows = evaluate.per_image_results(model, dataset)
    assert sorted(row["prediction"].shape for row in rows) == [(27, 50), (40, 64)]


def test_training_glue_passes_the_inference_record_to_fit(tmp_path, monkeypatch):
    """train_teacher records the profile's input size (no TTA); train_student also the flips of ensemble.json."""
    from types import SimpleNamespace

    from offroadseg.profiles import DEMO
    from offroadseg.runs import Run, write_ensemble

    seen = {}
    def record(*args, **kwargs):
        seen.setdefault("info", []).append(kwargs["inference_record"])

    student = SimpleNamespace(student=SimpleNamespace(spec={"name": "student"}), spec=None)
    for chapter in (teachers, distillation):
        monkeypatch.setattr(chapter, "fit", record)
        monkeypatch.setattr(chapter, "datasets", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(teachers, "build_model", lambda name, **kwargs: SimpleNamespace(spec={"name": name}))
    monkeypatch.setattr(distillation, "distillation_setup", lambda *args: (student, SimpleNamespace(step_loss=None)))
    run = Run(tmp_path)
    ctx = SimpleNamespace(profile=DEMO, run=run)
    val = {"ensemble": {"miou": 0.6, "ms_per_image": 80.0, "params": 17}}
    write_ensemble(run, 0.5, [], flips=["h", "v"], scales=None, flip_candidates=[], input_size=DEMO.image_size, val=val)
    scan = {"sample_weights": None, "class_weights": [1.0] * 10}
    teachers.train_teacher(ctx, "deeplab", scan, DEMO.deeplab, assembly.train_config(DEMO, DEMO.deeplab), progress=False)
    distillation.train_student(ctx, scan, DEMO.student, assembly.train_config(DEMO, DEMO.student), DEMO.distill,
                               progress=False)
    teacher, distilled = seen["info"]
    assert teacher["input_size"] == list(DEMO.image_size) and teacher["tta_flips"] == []
    assert distilled["tta_flips"] == ["h", "v"] and distilled["spec"] == {"name": "student"}


def test_a_failed_background_write_stops_the_run(tmp_path, monkeypatch):
    folder = images_folder(tmp_path / "frames", sizes=((24, 40), (24, 40)), jpeg_too=False)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(evaluate, "write_prediction", disk_full)
    with pytest.raises(OSError, match="No space left"):
        evaluate.predict_files(OnMeta(), sorted(folder.glob("*.png")), tmp_path / "out", (8, 8), batch_size=1,
                               progress=False)
    (folder / "broken.png").write_bytes(b"nope")
    monkeypatch.undo()
    with pytest.raises(evaluate.DataError, match="broken.png"):
        evaluate.predict_files(OnMeta(), sorted(folder.glob("*.png")), tmp_path / "out", (8, 8), progress=False)


def test_onnx_on_a_gpu_without_the_cuda_provider_falls_back_to_the_cpu_in_one_line(onnx_file, tmp_path, capsys,
                                                                                    monkeypatch):
    # The GPU image's onnxruntime is the CPU-only wheel: predicting still works, and says why it is slow.
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    folder = images_folder(tmp_path / "frames", sizes=((24, 40),), jpeg_too=False)
    assert predict.main([str(onnx_file), str(folder), "--out", str(tmp_path / "out"), "--device", "cuda"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "CUDAExecutionProvider" in line]
    assert len(notes) == 1 and "onnxruntime-gpu" in notes[0] and "CPU" in notes[0]
    assert len(list((tmp_path / "out" / "raw").glob("*.png"))) == 1
    with pytest.warns(RuntimeWarning, match="no CUDAExecutionProvider"):
        assert export.OnnxModel(onnx_file, device="cuda").providers == ["CPUExecutionProvider"]
    assert export.onnx_providers("auto") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert export.onnx_providers("auto")[0] == "CUDAExecutionProvider"
