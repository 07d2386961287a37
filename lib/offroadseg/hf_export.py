"""A trained SegFormer in Hugging Face format, for users who load models with `transformers`.

    python -m offroadseg.export hf outputs/<run> exports/hf-student          # the run's student (or teacher)
    python -m offroadseg.export hf outputs/<run>/models/segformer/best.pt DIR
    export_hf("outputs/<run>/models/student/best.pt", "DIR")                   # the same from Python

DIR then holds what `save_pretrained` writes (config.json, model.safetensors) and the image
processor's preprocessor_config.json, and loads offline with

    transformers.pipeline("image-segmentation", model="DIR")
    transformers.SegformerForSemanticSegmentation.from_pretrained("DIR")

- config.json: the architecture, id2label/label2id (the ten class names, index = output
  channel), and `offroadseg_inference`, the checkpoint's inference record (`offroadseg.modelinfo`:
  input size, normalisation, the class table with raw mask IDs, TTA flips), so the folder
  describes itself as every model file of the project does.
- preprocessor_config.json: a `SegformerImageProcessor` resizing to the model's input size
  (bilinear, antialiased) and normalising with the checkpoint's mean/std, no label reduction.

Where HF's pipeline and `python -m offroadseg.predict` differ (they agree on >= 99% of pixels,
tests/test_hf_export.py): the pipeline upsamples the stride-4 logits to the image size in one
bilinear step, predict goes through the input size first (the model's own forward); and the
pipeline applies no test-time flips (the record's `tta_flips` are for predict). transformers
4.x's (slow) SegformerImageProcessor may resize with PIL (antialiased bilinear too; rounding differs).

DeepLab models have no such form: they are torchvision modules, not transformers models, so no
transformers class can load them; use the checkpoint itself or its ONNX export (`export_onnx`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor
from transformers.image_utils import PILImageResampling

from .checkpoints import load_checkpoint, load_model
from .modelinfo import inference_info, read_inference_info

HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
# The record's key in config.json.
CONFIG_KEY = "offroadseg_inference"
# Largest |logit| difference between the checkpoint and the written folder that counts as the same model.
PARITY_TOLERANCE = 1e-4


class ExportError(ValueError):
    """A source that cannot be exported as asked: one line saying why and what to use instead."""


# ----------------------------------------------------------------------------- which model


def resolve_checkpoint(source: str | os.PathLike, model: str = "auto") -> Path:
    """The checkpoint to export: `source` itself (a .pt file), a model folder's best.pt, or a run
    folder's models/<model>/best.pt. `model="auto"`: the student when it is a SegFormer (the full
    profile's), else the SegFormer teacher (the demo's student is a DeepLab)."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() == ".onnx":
            raise ExportError(f"{source} is an ONNX export: its graph holds no weights in the form transformers "
                              "loads; pass the checkpoint it was exported from (outputs/<run>/models/<name>/best.pt)")
        return source
    if not source.is_dir():
        raise ExportError(f"{source}: no such file or folder; pass a run folder (outputs/<run>) or a checkpoint "
                          "(outputs/<run>/models/<name>/best.pt)")
    if (source / "best.pt").is_file():
        return source / "best.pt"
    models = source / "models"
    available = sorted(p.parent.name for p in models.glob("*/best.pt")) if models.is_dir() else []
    if not available:
        raise ExportError(f"{source} holds no trained model (no models/<name>/best.pt, no best.pt): pass a run "
                          "folder whose notebooks 02 or 05 have run, or a checkpoint file")
    if model != "auto":
        if model not in available:
            raise ExportError(f"{source} has no model {model!r}; it has {', '.join(available)} (--model NAME)")
        return models / model / "best.pt"
    for name in ("student", "segformer"):
        if name in available and _is_segformer(load_checkpoint(models / name / "best.pt").get("spec")):
            return models / name / "best.pt"
    raise ExportError(f"{source}: neither its student nor a segformer teacher is a SegFormer (it has "
                      f"{', '.join(available)}); only SegFormers have a Hugging Face form. " + DEEPLAB_ADVICE)


def _is_segformer(spec) -> bool:
    return bool(spec) and str(spec.get("name", "")).startswith("segformer-")


DEEPLAB_ADVICE = ("For a DeepLab use the checkpoint itself (python -m offroadseg.predict best.pt ..., "
                  "offroadseg.checkpoints.load_model) or its ONNX export (offroadseg.export.export_onnx, notebook "
                  "06's exports/), which onnxruntime runs without this package.")


# ----------------------------------------------------------------------------- the export


def to_hf_model(model, info: dict) -> SegformerForSemanticSegmentation:
    """A `SegformerForSemanticSegmentation` holding `model`'s weights (an `offroadseg.models.SegFormer`,
    whose encoder and decode head are that class's own modules), its config naming the classes."""
    config = copy.deepcopy(model.encoder.config)
    names = [entry["name"] for entry in info["classes"]]
    if config.num_labels != len(names):
        raise ExportError(f"the model predicts {config.num_labels} classes but its record names {len(names)}")
    config.id2label = dict(enumerate(names))
    config.label2id = {name: index for index, name in config.id2label.items()}
    config.architectures = ["SegformerForSemanticSegmentation"]
    config.semantic_loss_ignore_index = 255
    setattr(config, CONFIG_KEY, info)
    hf_model = SegformerForSemanticSegmentation(config)
    hf_model.segformer.load_state_dict(model.encoder.state_dict())
    hf_model.decode_head.load_state_dict(model.decoder.state_dict())
    return hf_model.eval()


def image_processor(info: dict) -> SegformerImageProcessor:
    """The processor that prepares an image as the project does (`preprocess.frames_to_batch`): resize to
    the model's input size (bilinear, antialiased), scale to [0, 1], normalise with the record's mean/std."""
    height, width = info["input_size"]
    return SegformerImageProcessor(do_resize=True, size={"height": int(height), "width": int(width)},
                                   resample=PILImageResampling.BILINEAR, do_rescale=True, rescale_factor=1 / 255,
                                   do_normalize=True, image_mean=list(info["mean"]), image_std=list(info["std"]),
                                   do_reduce_labels=False)


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, input_size=None) -> dict:
    """Write the SegFormer of `checkpoint` (teacher or student best.pt) to `out_dir` in HF format.

    The folder is written beside `out_dir` and renamed into place once complete and checked: the
    written model, loaded back with `from_pretrained`, must give the checkpoint's logits (within
    `PARITY_TOLERANCE`) on a random batch at the input size. An existing `out_dir` is replaced only
    if it is empty or an earlier export (config.json there); anything else is refused.
    `input_size` (height, width) is needed only for checkpoints that predate the inference record.
    Returns {"dir", "checkpoint", "model" (its name), "input_size", "max_abs_logit_diff", "files"}.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    state = load_checkpoint(checkpoint)
    spec = state.get("spec") or {}
    if "name" not in spec:
        raise ExportError(f"{checkpoint} holds no model spec (not a checkpoint written by engine.fit?); pass a "
                          "models/<name>/best.pt of a run")
    if not _is_segformer(spec):
        raise ExportError(f"{checkpoint} is a {spec['name']}: DeepLab models are torchvision modules, not transformers "
                          "models, so they have no Hugging Face form (no transformers class loads them, and "
                          "pipeline/from_pretrained cannot either). " + DEEPLAB_ADVICE)
    info = read_inference_info(state)
    del state
    if info is None:
        if input_size is None:
            raise ExportError(f"{checkpoint} records no input size (written before models described themselves): "
                              "pass --input-size HxW, the profile's image_size it was trained at (demo: 160x288)")
        info = inference_info(input_size, spec=spec)
    elif input_size is not None:
        info = {**info, "input_size": [int(s) for s in input_size]}
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "config.json").is_file())):
        raise ExportError(f"{out_dir} exists and is not an earlier Hugging Face export (no config.json there); "
                          "choose a new or empty folder")

    model = load_model(checkpoint)
    hf_model = to_hf_model(model, info)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the export is a plain folder
    try:
        hf_model.save_pretrained(tmp)
        image_processor(info).save_pretrained(tmp)
        missing = [name for name in HF_FILES if not (tmp / name).is_file()]
        if missing:
            raise ExportError(f"save_pretrained wrote no {missing} (transformers too old to write safetensors?)")
        diff = _parity(model, tmp, info["input_size"])
        if diff > PARITY_TOLERANCE:
            raise ExportError(f"the written model's logits differ from {checkpoint}'s by up to {diff:.2g}; "
                              "this transformers release builds SegFormer differently: please report it")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"dir": out_dir, "checkpoint": checkpoint, "model": spec["name"], "input_size": info["input_size"],
            "max_abs_logit_diff": diff, "files": sorted(p.name for p in out_dir.iterdir())}


@torch.inference_mode()
def _parity(model, folder: Path, input_size) -> float:
    """Largest |logit| difference between `model` and the HF model saved in `folder`, at the
    decoder's stride (where HF's forward stops), on two random normalised images."""
    loaded = SegformerForSemanticSegmentation.from_pretrained(folder, local_files_only=True).eval()
    x = torch.randn(2, 3, *input_size, generator=torch.Generator().manual_seed(0))
    _, ours = model.eval().decode(model.encode(x))
    return float((loaded(pixel_values=x).logits - ours).abs().max())


def _replace_dir(new: Path, target: Path) -> None:
    """Put the folder `new` at `target`, moving an earlier `target` out of the way first."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
