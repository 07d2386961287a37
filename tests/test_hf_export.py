"""The Hugging Face export (offroadseg.hf_export, `python -m offroadseg.export hf`): what the folder holds,
that transformers' own pipeline reproduces predict's labels from it, and the sources it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from offroadseg import evaluate, export, hf_export, modelinfo
from offroadseg.checkpoints import load_model
from offroadseg.classes import CLASS_NAMES
from offroadseg.engine import TrainConfig, fit
from offroadseg.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT = (32, 48)
DEEPLAB = ("deeplabv3plus-resnet18", {"output_stride": 32, "aspp_channels": 16, "decoder_channels": 16})


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every load here must work without the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


class Halves(torch.utils.data.Dataset):
    """Normalised random images, sky above landscape."""

    def __init__(self, n: int, seed: int):
        self.images = torch.randn(n, 3, *INPUT, generator=torch.Generator().manual_seed(seed))
        self.masks = torch.full((n, *INPUT), 8, dtype=torch.long)
        self.masks[:, : INPUT[0] // 2] = 9

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.masks[index]


def _fit(run, role: str, name: str, options: dict, tta=()):
    """best.pt of a one-epoch engine.fit in run/models/<role>/, with its inference record."""
    torch.manual_seed(0)
    model = build_model(name, **options)
    info = modelinfo.inference_info(INPUT, tta_flips=tta, spec=model.spec, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    fit(model, Halves(4, 1), Halves(2, 2), TrainConfig(epochs=1, batch_size=2, precision="fp32"),
        run / "models" / role, progress=False, inference_record=info)
    return run / "models" / role / "best.pt"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as the demo leaves it: a SegFormer teacher and a DeepLab student (and teacher)."""
    run = tmp_path_factory.mktemp("outputs") / "demo"
    _fit(run, "segformer", "segformer-b0", {}, tta=("h",))
    _fit(run, "student", *DEEPLAB)
    return run


def test_the_folder_holds_the_model_its_classes_and_the_checkpoints_preprocessing(run, tmp_path):
    from transformers import AutoImageProcessor, SegformerForSemanticSegmentation

    checkpoint = run / "models" / "segformer" / "best.pt"
    result = hf_export.export_hf(checkpoint, tmp_path / "hf")
    assert result["files"] == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert result["model"] == "segformer-b0" and result["max_abs_logit_diff"] <= hf_export.PARITY_TOLERANCE

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "segformer" and config["architectures"] == ["SegformerForSemanticSegmentation"]
    assert [config["id2label"][str(i)] for i in range(10)] == list(CLASS_NAMES)
    assert config["label2id"] == {name: i for i, name in enumerate(CLASS_NAMES)}
    assert config[hf_export.CONFIG_KEY] == modelinfo.read_inference_info(checkpoint)  # raw IDs, TTA: self-describing

    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert (processor.size["height"], processor.size["width"]) == INPUT
    assert list(processor.image_mean) == pytest.approx([0.5, 0.4, 0.3]) and not processor.do_reduce_labels
    assert list(processor.image_std) == pytest.approx([0.2, 0.25, 0.3])

    loaded = SegformerForSemanticSegmentation.from_pretrained(tmp_path / "hf").eval()
    model = load_model(checkpoint)
    x = torch.randn(2, 3, *INPUT)
    with torch.inference_mode():
        ours = model(x)  # at the input size; HF's forward stops at the decoder's stride 4
        theirs = torch.nn.functional.interpolate(loaded(pixel_values=x).logits, size=INPUT, mode="bilinear",
                                                 align_corners=False)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.slow
def test_cli_picks_the_segformer_of_a_run_whose_student_is_a_deeplab_and_replaces_an_earlier_export(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export.main(["hf", str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{run / 'models' / 'segformer' / 'best.pt'} (segformer-b0, input 32x48) -> {out}" in printed
    assert "pipeline('image-segmentation'" in printed
    first = (out / "model.safetensors").read_bytes()
    assert export.main(["hf", str(run / "models" / "segformer"), str(out), "--input-size", "64x96"]) == 0
    capsys.readouterr()
    assert (out / "model.safetensors").read_bytes() == first  # same weights, written again
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 64, "width": 96}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or old folders left

    full = tmp_path / "outputs" / "full"  # the full profile's student is a SegFormer: auto takes it
    for role in ("segformer", "student"):
        (full / "models" / role).mkdir(parents=True)
        (full / "models" / role / "best.pt").write_bytes((run / "models" / "segformer" / "best.pt").read_bytes())
    assert export.main(["hf", str(full), str(tmp_path / "hf-student")]) == 0
    assert f"{full / 'models' / 'student' / 'best.pt'} (segformer-b0" in capsys.readouterr().out


def test_deeplab_onnx_and_other_bad_sources_are_one_line_errors_with_status_2(run, tmp_path, capsys):
    def refused(*argv) -> str:
        assert export.main(["hf", *map(str, argv)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        return captured.err

    err = refused(run, tmp_path / "a", "--model", "student")
    assert "deeplabv3plus-resnet18" in err and "torchvision modules, not transformers models" in err
    assert "ONNX export" in err and "checkpoint itself" in err
    assert "has no model 'teacher'; it has segformer, student" in refused(run, tmp_path / "b", "--model", "teacher")
    onnx_file = tmp_path / "student.onnx"
    onnx_file.write_bytes(b"not looked at")
    assert "is an ONNX export" in refused(onnx_file, tmp_path / "c")
    assert "holds no trained model" in refused(tmp_path, tmp_path / "d")
    assert "no such file or folder" in refused(tmp_path / "gone", tmp_path / "e")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "not an earlier Hugging Face export" in refused(run, busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert "--input-size must be HxW" in refused(run, tmp_path / "f", "--input-size", "big")
    only_deeplab = tmp_path / "outputs" / "dl"
    (only_deeplab / "models" / "student").mkdir(parents=True)
    (only_deeplab / "models" / "student" / "best.pt").write_bytes((run / "models" / "student" / "best.pt").read_bytes())
    assert "only SegFormers have a Hugging Face form" in refused(only_deeplab, tmp_path / "g")
    assert not (tmp_path / "a").exists() and not (tmp_path / "g").exists()


# ------------------------------------------------------------------ transformers' pipeline against predict


@pytest.fixture(scope="module")
def desert_model(tmp_path_factory):
    """A segformer-b0 fitted for three short epochs to demo desert frames (varied, confident labels:
    random weights would make argmax ties, and the comparison, fragile), and the test frames."""
    from offroadseg.augment import eval_transform
    from offroadseg.data import find_dataset
    from offroadseg.dataset import SegmentationDataset
    from offroadseg.synth import make_desert

    root = tmp_path_factory.mktemp("desert")
    make_desert(root, counts={"train": 8, "val": 2, "test": 3}, progress=False, workers=1)  # 960x540, as Falcon
    data = find_dataset(root)
    size = (64, 112)
    torch.manual_seed(0)
    model = build_model("segformer-b0", drop_path=0.0, dropout=0.0)
    info = modelinfo.inference_info(size, spec=model.spec)
    out = root / "run" / "models" / "segformer"
    fit(model, SegmentationDataset(data.train, eval_transform(size), cache_size=size),
        SegmentationDataset(data.val, eval_transform(size), cache_size=size),
        TrainConfig(epochs=3, batch_size=4, lr=3e-3, warmup_epochs=0.5, precision="fp32"), out, progress=False,
        inference_record=info)
    return out / "best.pt", [image for image, _ in data.test]


def pipeline_labels(segmenter, image_path) -> np.ndarray:
    """The pipeline's answer (one binary mask per class present) as one class-index map."""
    annotations = segmenter(str(image_path))
    first = np.asarray(annotations[0]["mask"])
    labels = np.full(first.shape, 255, dtype=np.uint8)
    for annotation in annotations:
        labels[np.asarray(annotation["mask"]) > 0] = segmenter.model.config.label2id[annotation["label"]]
    return labels


@pytest.mark.slow
def test_the_pipeline_from_the_folder_matches_predicts_labels(desert_model, tmp_path):
    from transformers import SegformerImageProcessor, pipeline

    from offroadseg.data import read_image

    checkpoint, frames = desert_model
    assert export.main(["hf", str(checkpoint), str(tmp_path / "hf")]) == 0
    segmenter = pipeline("image-segmentation", model=str(tmp_path / "hf"))
    model = load_model(checkpoint)
    size = tuple(modelinfo.read_inference_info(checkpoint)["input_size"])
    agree, pixels, counts = 0, 0, np.zeros(256, dtype=np.int64)
    unnormalised = pipeline("image-segmentation", model=segmenter.model,
                            image_processor=SegformerImageProcessor(size={"height": size[0], "width": size[1]},
                                                                    do_normalize=False))
    wrong = 0
    for path in frames:
        frame = read_image(path)
        expected = evaluate.predict_labels(model, [frame], size)[0]  # predict's path
        got = pipeline_labels(segmenter, path)
        assert got.shape == frame.shape[:2] == (540, 960)
        agree += int((got == expected).sum())
        pixels += expected.size
        counts += np.bincount(expected.ravel(), minlength=256)
        wrong += int((pipeline_labels(unnormalised, path) != expected).sum())
    assert (counts[:10] > 0.01 * pixels).sum() >= 3  # a model with varied labels, so the agreement means something
    assert agree / pixels >= 0.99
    assert wrong / pixels > 0.05  # the comparison is sensitive: the processor's normalisation matters
