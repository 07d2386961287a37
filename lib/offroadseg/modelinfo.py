"""What a model file must say for inference on new images: the one home of that format.

    info = inference_info((160, 288), tta_flips=("h",), spec=model.spec)   # training and export build it
    checkpoint["inference"] = info                                            # engine.fit stores it
    read_inference_info("models/student/best.pt")                           # predict reads it back
    read_inference_info("exports/student.onnx")                              # from ONNX metadata_props

The record (a plain dict, JSON-safe, so it fits a `weights_only` checkpoint and an ONNX
metadata string alike):

    {"format": 1,
     "input_size": [height, width],          # what the model was trained to see
     "mean": [r, g, b], "std": [r, g, b],    # normalisation of [0, 1] pixels
     "classes": [{"name", "raw_id", "color": [r, g, b]}, ...],   # index order = output channels
     "tta_flips": ["h", ...],                # chosen on val (notebook 04); [] for none
     "spec": {...} or None}                  # architecture (build_model(**spec)); informative in ONNX

With it `python -m offroadseg.predict` needs no profile, run folder or notebook. Files
written before this record existed have none: `read_inference_info` returns None and the
caller asks for the input size (`--input-size`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import onnx

from .checkpoints import load_checkpoint
from .classes import CLASS_NAMES, COLORS, RAW_IDS
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

INFO_FORMAT = 1
# The key under which the record sits: a checkpoint dict entry and an ONNX metadata_props key.
INFO_KEY = "offroadseg_inference"
CHECKPOINT_KEY = "inference"
FLIP_NAMES = ("h", "v", "hv")


def inference_info(input_size: Sequence[int], tta_flips: Sequence[str] = (), spec: dict | None = None,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> dict:
    """The record for a model trained at `input_size` (height, width) with the project's class table."""
    height, width = (int(s) for s in input_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"input_size must be two positive integers (height, width), got {tuple(input_size)}")
    flips = [str(f) for f in tta_flips]
    unknown = [f for f in flips if f not in FLIP_NAMES]
    if unknown:
        raise ValueError(f"unknown TTA flip(s) {unknown}; use {list(FLIP_NAMES)}")
    return {
        "format": INFO_FORMAT,
        "input_size": [height, width],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "classes": [{"name": n, "raw_id": int(r), "color": list(c)} for n, r, c in zip(CLASS_NAMES, RAW_IDS, COLORS)],
        "tta_flips": flips,
        "spec": None if spec is None else json.loads(json.dumps(spec)),  # plain types only
    }


def parse_input_size(text: str) -> tuple[int, int]:
    """"HxW" (height x width, e.g. "160x288") as (height, width); a ValueError saying the form otherwise
    (the command lines' --input-size prefix it with the option's name)."""
    try:
        height, width = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"must be HxW (height x width, e.g. 160x288), got {text!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"must be positive, got {text!r}")
    return height, width


def to_json(info: dict) -> str:
    return json.dumps(info, sort_keys=True)


def from_json(text: str, where: str = "model file") -> dict:
    try:
        info = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: its {INFO_KEY} metadata is not valid JSON ({err}); re-export the model") from err
    return validate(info, where)


def validate(info: dict, where: str = "model file") -> dict:
    """`info` checked for the fields inference needs; a ValueError naming `where` otherwise."""
    missing = [k for k in ("input_size", "mean", "std", "classes") if k not in info]
    if missing:
        raise ValueError(f"{where}: inference record lacks {missing}; re-export or retrain with this version")
    if info.get("format", INFO_FORMAT) > INFO_FORMAT:
        raise ValueError(f"{where}: inference record format {info['format']} is newer than this code reads "
                         f"({INFO_FORMAT}); update offroadseg")
    return info


def read_inference_info(source) -> dict | None:
    """The record of a checkpoint (path or loaded dict), an ONNX file (path) or an onnx ModelProto; None when
    the file predates it. A checkpoint without one still gets its spec back under "spec" by the caller."""
    if isinstance(source, dict):
        info = source.get(CHECKPOINT_KEY)
        return None if info is None else validate(dict(info), "checkpoint")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix.lower() == ".onnx":
            return onnx_info(onnx.load(str(path), load_external_data=False), str(path))

        info = load_checkpoint(path).get(CHECKPOINT_KEY)
        return None if info is None else validate(dict(info), str(path))
    return onnx_info(source, "ONNX model")


def onnx_info(model, where: str = "ONNX model") -> dict | None:
    """The record stored in an onnx ModelProto's metadata_props, or None."""
    for prop in model.metadata_props:
        if prop.key == INFO_KEY:
            return from_json(prop.value, where)
    return None


def set_onnx_info(model, info: dict) -> None:
    """Store `info` in an onnx ModelProto's metadata_props (replacing an earlier record)."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != INFO_KEY]
    del model.metadata_props[:]
    for key, value in [*kept, (INFO_KEY, to_json(validate(info)))]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
