"""Segment new images and videos with a trained model: one command, from a checkpoint or an ONNX export.

    python -m offroadseg.predict outputs/demo/models/student/best.pt frames/ --out predictions/
    python -m offroadseg.predict outputs/demo/exports/student.onnx 'frames/*.jpg' --out predictions/
    python -m offroadseg.predict outputs/demo/models/student/best.pt drive.mp4 --out predictions/ --frames
    offroadseg-predict MODEL INPUT... --out DIR [--tta auto|none|h,v] [--batch-size N]
                       [--device auto|cpu|cuda] [--precision auto|fp32|bf16|fp16] [--no-color]
                       [--frames] [--input-size HxW]

MODEL: a training checkpoint (`models/<name>/best.pt`, written by `engine.fit`) or an ONNX
export (fp32 or INT8, notebook 06's `exports/`). Either carries its inference record
(`offroadseg.modelinfo`: input size, normalisation, class table, TTA flips), so no profile
or run folder is needed; files from before that record need `--input-size`.
INPUT: image files (PNG, JPEG, any format Pillow reads), videos (.mp4 .mov .mkv .avi .webm,
decoded with PyAV), folders (their image and video files, not sub-folders) and globs, resolved
from the current directory.

Images: writes DIR/raw/<stem>.png (raw class IDs, 16-bit, the dataset masks' own format) and
DIR/color/<stem>.png (overlay), each at its image's own size.
Videos (`offroadseg.video`), frame by frame in batches: DIR/<stem>_overlay.<ext>, the overlay
video in the clip's container at its frame rate and size; with --frames also
DIR/raw/<stem>/<frame index>.png (raw IDs per frame); --no-color --frames writes the PNGs only.

A file that cannot be read or decoded is named and skipped; the summary lines count images
(or a clip's frames), images (frames) per second end to end, skipped files and the class share
of all predicted pixels. Exit status: 0 when every input was predicted, 1 when some were
skipped (or none could be), 2 for a usage error (named with what to do).
"""

from __future__ import annotations

import argparse
import glob
import sys
import warnings
import zipfile
from pathlib import Path

from .classes import CLASS_NAMES, RAW_IDS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
# Must match offroadseg.video's CONTAINERS (kept here so that --help and usage errors need no PyAV).
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
OVERLAY_SUFFIX = "_overlay"  # a video's overlay is DIR/<stem>_overlay.<ext> (offroadseg.video.overlay_path)


class UsageError(ValueError):
    """A bad MODEL, INPUT or option: printed as one line with what to do, exit status 2."""


# ------------------------------------------------------------------------------ inputs


def collect_inputs(inputs, out_dir: Path) -> tuple[list[Path], list[Path], list[tuple[Path, str]], int]:
    """(image files, video files, [(input, why skipped)], other files ignored in folders).

    Files named directly are always tried (a non-image one is then skipped by name); folders
    give their files with an image or video suffix. An output folder that is, or lies inside, an
    input folder is refused, and no earlier prediction (a file under its raw/ or color/, an
    overlay video in it) is ever read back as input.
    """
    out_dir = out_dir.resolve()
    files, skipped, ignored = [], [], 0
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            folder = path.resolve()
            if out_dir == folder or folder in out_dir.parents:
                raise UsageError(f"--out {out_dir} lies inside the input folder {path}: its predictions would be "
                                 "read back as input next time; choose an output folder outside it")
            for child in sorted(path.iterdir()):
                if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                    files.append(child)
                elif child.is_file():
                    ignored += 1
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            if not matches:
                skipped.append((path, "no file matches this pattern"))
            files += [m for m in matches if m.is_file()]
        else:
            skipped.append((path, "no such file or folder"))
    images, videos = [], []
    outputs = (out_dir / "raw", out_dir / "color")
    for path in files:
        resolved = path.resolve()
        if any(folder in resolved.parents for folder in outputs):
            continue  # an earlier prediction, matched by a glob: never input
        is_video = path.suffix.lower() in VIDEO_SUFFIXES
        if is_video and resolved.parent == out_dir and path.stem.endswith(OVERLAY_SUFFIX):
            continue  # an earlier overlay video
        kept = videos if is_video else images
        if resolved not in {p.resolve() for p in kept}:
            kept.append(path)
    for kept in (images, videos):
        by_stem: dict[str, list[Path]] = {}
        for path in kept:
            by_stem.setdefault(path.stem, []).append(path)
        clashes = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
        if clashes:
            stem, paths = next(iter(clashes.items()))
            raise UsageError(f"{len(clashes)} name(s) occur twice, e.g. {stem!r}: {', '.join(map(str, paths))}; "
                             f"their predictions would overwrite each other in --out: predict them into separate folders")
    return images, videos, skipped, ignored


# ------------------------------------------------------------------------------- model


def parse_size(text: str) -> tuple[int, int]:
    from .modelinfo import parse_input_size  # noqa: PLC0415 (torch only after the arguments are checked: --help and usage errors in a blink)

    try:
        return parse_input_size(text)
    except ValueError as err:
        raise UsageError(f"--input-size {err}") from None


def parse_tta(text: str, recorded) -> tuple[str, ...]:
    """"auto": the flips the model file records; "none"; or a comma list of h, v, hv."""
    from .ensemble import FLIPS  # noqa: PLC0415 (torch only after the arguments are checked: --help and usage errors in a blink)

    if text == "auto":
        return tuple(recorded or ())
    if text in ("none", ""):
        return ()
    flips = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in flips if f not in FLIPS]
    if unknown or len(set(flips)) != len(flips):
        raise UsageError(f"--tta {text!r}: use auto, none, or a comma list of distinct flips from {sorted(FLIPS)}")
    return flips


def resolve_device(name: str):
    import torch  # noqa: PLC0415 (torch only after the arguments are checked: --help and usage errors in a blink)

    from .device import default_device  # noqa: PLC0415 (torch only after the arguments are checked: --help and usage errors in a blink)

    if name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r}: {err}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu (or auto)")
    return device


def load_predictor(model_path: Path, device_name: str, input_size=None):
    """(predictor, inference record, description) for a checkpoint or an ONNX file."""
    from . import modelinfo  # noqa: PLC0415 (torch only after the arguments are checked: --help and usage errors in a blink)

    if not model_path.is_file():
        raise UsageError(f"MODEL {model_path}: no such file (a models/<name>/best.pt checkpoint or an .onnx export)")
    if model_path.suffix.lower() == ".onnx":
        from .export import OnnxModel  # noqa: PLC0415 (torch only after the arguments are checked: --help and usage errors in a blink)

        try:
            providers = {"cpu": "cpu", "auto": "auto"}.get(device_name, "cuda")
            # --device cuda where onnxruntime has no CUDA provider: one line saying so, then the CPU
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                predictor = OnnxModel(model_path, device=providers)
            for warning in caught:
                print(f"note: {warning.message}", file=sys.stderr)
        except ValueError as err:
            raise UsageError(f"MODEL {model_path}: not a readable ONNX model ({err})") from None
        except Exception as err:  # onnxruntime's InvalidProtobuf, InvalidGraph, ...
            raise UsageError(f"MODEL {model_path}: not a readable ONNX model ({type(err).__name__}: {err})") from None
        info, kind = predictor.info, f"ONNX ({', '.join(predictor.providers)})"
    elif zipfile.is_zipfile(model_path):
        import torch  # noqa: PLC0415 (as below)

        from .checkpoints import CheckpointError, load_checkpoint, load_model  # noqa: PLC0415 (torch only after the arguments are checked: --help and usage errors in a blink)

        device = resolve_device(device_name)
        try:
            checkpoint = load_checkpoint(model_path)
            info = modelinfo.read_inference_info(checkpoint)
            del checkpoint
            predictor = load_model(model_path, map_location=device)
        except (CheckpointError, ValueError, KeyError) as err:
            raise UsageError(f"MODEL {model_path}: not a usable training checkpoint ({err})") from None
        if device.type == "cpu":
            # oneDNN's convolutions run NHWC faster: the demo student 42 -> 34 ms an image at batch 4 on
            # 2 cores, SegFormer-B0 47 -> 39 (bench/RESULTS.md, "The prediction path end to end").
            predictor = predictor.to(memory_format=torch.channels_last)
        kind = f"checkpoint on {device}"
    else:
        raise UsageError(f"MODEL {model_path}: neither a training checkpoint (.pt from engine.fit) nor an ONNX "
                         "export (.onnx); pass models/<name>/best.pt or exports/<name>.onnx")
    if input_size is not None:
        if info is not None and tuple(info["input_size"]) != tuple(input_size):
            warnings.warn(f"{model_path} was trained at {info['input_size'][0]}x{info['input_size'][1]}; "
                          f"--input-size {input_size[0]}x{input_size[1]} overrides it", stacklevel=2)
        info = {**(info or modelinfo.inference_info(input_size)), "input_size": list(input_size)}
    elif info is None:
        raise UsageError(f"MODEL {model_path} records no input size (written before models described themselves): "
                         "pass --input-size HxW, the profile's image_size it was trained at (demo: 160x288)")
    recorded = [c["raw_id"] for c in info["classes"]]
    if recorded != list(RAW_IDS):
        raise UsageError(f"MODEL {model_path} predicts the classes with raw IDs {recorded}; this version writes "
                         f"masks for {list(RAW_IDS)} only")
    return predictor, info, kind


# -------------------------------------------------------------------------------- main


def class_shares(pixels) -> str:
    total = int(pixels.sum())
    if not total:
        return "none"
    return ", ".join(f"{name} {100 * count / total:.1f}%" for name, count in zip(CLASS_NAMES, pixels) if count)


def summary_line(result: dict, skipped: int) -> str:
    rate = result["images"] / result["seconds"] if result["seconds"] > 0 else float("nan")
    return (f"{result['images']} images in {result['seconds']:.1f} s ({rate:.2f} images/s end to end), "
            f"{skipped} skipped; class share of all pixels: {class_shares(result['class_pixels'])}")


def video_line(result: dict) -> str:
    rate = result["frames"] / result["seconds"] if result["seconds"] > 0 else float("nan")
    wrote = [f"{result['overlay']} ({result['codec']}, {result['rate']:.4g} frames/s)"] if result["overlay"] else []
    wrote += [f"{result['raw']}/ (raw IDs per frame)"] if result["raw"] else []
    return (f"{result['clip']}: {result['frames']} frames in {result['seconds']:.1f} s ({rate:.2f} frames/s end to "
            f"end) -> {' and '.join(wrote)}; class share of all pixels: {class_shares(result['class_pixels'])}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offroadseg-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="models/<name>/best.pt or an .onnx export")
    parser.add_argument("inputs", metavar="INPUT", nargs="+", help="image and video files, folders, globs")
    parser.add_argument("--out", required=True,
                        help="output folder (raw/ and color/ go inside; a video's <stem>_overlay.<ext> too)")
    parser.add_argument("--tta", default="auto", help="auto (the flips the model records), none, or e.g. h,v")
    parser.add_argument("--batch-size", type=int, default=4, help="images per model call (default 4)")
    parser.add_argument("--slide", type=float, default=None, metavar="OVERLAP",
                        help="slide inference: the frame at its own resolution in windows of the model's input size "
                             "overlapping by OVERLAP (e.g. 0.33); several times slower (default: the frame resized)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="checkpoints: autocast dtype (auto: bf16/fp16 on a GPU, fp32 on a CPU); ONNX runs as exported")
    parser.add_argument("--no-color", action="store_true", help="write raw/ only, no overlays (nor overlay videos)")
    parser.add_argument("--frames", action="store_true",
                        help="videos: also write raw-ID PNGs per frame, DIR/raw/<stem>/<frame index>.png")
    parser.add_argument("--input-size", default=None, metavar="HxW",
                        help="model input size, for files that predate the inference record (or to override it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args) -> int:
    from .evaluate import predict_files  # noqa: PLC0415 (torch only after the arguments are checked: --help and usage errors in a blink)

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.slide is not None and not 0 <= args.slide < 1:
        raise UsageError(f"--slide {args.slide}: the windows' overlap, a share in [0, 1) such as 0.33")
    out_dir = Path(args.out)
    files, videos, skipped, ignored = collect_inputs(args.inputs, out_dir)
    if videos and args.no_color and not args.frames:
        raise UsageError("--no-color leaves nothing to write for a video (its overlay is the colour output): "
                         "add --frames for raw-ID PNGs per frame, or drop --no-color")
    for path, why in skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    input_size = parse_size(args.input_size) if args.input_size else None
    predictor, info, kind = load_predictor(Path(args.model), args.device, input_size)
    flips = parse_tta(args.tta, info.get("tta_flips"))
    if not files and not videos:
        print(f"no images or videos to predict among {len(args.inputs)} input(s)"
              + (f" ({ignored} other files ignored)" if ignored else ""), file=sys.stderr)
        return 1
    height, width = info["input_size"]
    what = ", ".join(part for part in (f"{len(files)} image(s)" if files else "",
                                       f"{len(videos)} video(s)" if videos else "") if part)
    slide = "" if args.slide is None else f" (slide: windows overlapping by {args.slide:.2f})"
    print(f"{args.model} ({kind}): input {height}x{width}{slide}, TTA {'+'.join(flips) or 'none'}; {what} -> {out_dir}",
          file=sys.stderr)
    options = dict(batch_size=args.batch_size, flips=flips, precision=args.precision, mean=info["mean"],
                   std=info["std"], progress=not args.quiet, slide=args.slide)
    skipped_total = len(skipped)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = predict_files(predictor, files, out_dir, info["input_size"], color=not args.no_color,
                               skip_unreadable=True, **options) if files else None
    for warning in caught:
        print(warning.message, file=sys.stderr)
    if result is not None:
        skipped_total += len(result["skipped"])
        print(summary_line(result, skipped_total) + (f"; {ignored} other files in folders ignored" if ignored else ""))
    clips_done = 0
    if videos:
        from .video import VideoError, predict_video  # noqa: PLC0415 (PyAV only when there is a video)

        for clip in videos:
            try:
                done = predict_video(predictor, clip, out_dir, info["input_size"], overlay_video=not args.no_color,
                                     frames=args.frames, **options)
            except VideoError as err:
                print(f"skipped {err}", file=sys.stderr)
                skipped_total += 1
                continue
            print(video_line(done))
            clips_done += 1
    predicted = (result["images"] if result is not None else 0) + clips_done
    return 0 if skipped_total == 0 and predicted else 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as err:
        print(f"offroadseg-predict: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
