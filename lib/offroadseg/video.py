"""Video through the one prediction path: PyAV decodes a clip, `evaluate.predict_labels` segments its
frames in batches, PyAV encodes the overlay video (and raw-ID PNGs per frame when asked).

    result = predict_video(model, "drive.mp4", "predictions/", input_size=(160, 288), frames=True)
    # predictions/drive_overlay.mp4, predictions/raw/drive/000000.png ...

- The overlay video (`overlay_path`): DIR/<stem>_overlay.<ext>, in the clip's own container (the
  same extension) at its frame rate and size, frame for frame. A variable-rate clip comes out at
  its average rate (the same frames, evenly spaced). The codec is the first of the container's
  `ENCODERS` this PyAV build has (H.264 for MP4/MOV/MKV, MPEG-4 Part 2 for AVI, VP9 for WebM),
  at a high quality, since an overlay is for looking at.
- Raw frames (`frames=True`, `frames_dir`): DIR/raw/<stem>/<frame index, 6 digits>.png, raw class
  IDs, 16-bit, the dataset masks' own format (`evaluate.write_prediction`).

Everything is written atomically: the overlay to a temporary file beside it, renamed into place
once the last frame is encoded, so a failure (or Ctrl-C) leaves no half video; raw frames already
written stay (each is complete). A file PyAV cannot open or decode is a `VideoError` naming it and
saying what to do.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
from tqdm.auto import tqdm

from .classes import NUM_CLASSES
from .evaluate import predict_labels, write_prediction
from .plots import overlay
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

# Per container (by extension): its FFmpeg muxer and the encoders to try, in order.
CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".webm": "webm"}
ENCODERS = {".mp4": ("h264", "mpeg4"), ".mov": ("h264", "mpeg4"), ".mkv": ("h264", "mpeg4"),
            ".avi": ("mpeg4", "h264"), ".webm": ("libvpx-vp9", "libvpx")}
# Quality of the overlay: x264's constant rate factor (18: visually lossless), else bits per pixel and frame.
H264_CRF = "18"
BITS_PER_PIXEL = 0.6
FIX = ("check that it plays (e.g. `ffprobe {path}`); re-encode it (`ffmpeg -i {path} -c:v libx264 fixed.mp4`), "
       "or extract its frames (`ffmpeg -i {path} frames/%06d.png`) and predict the folder")


class VideoError(ValueError):
    """A clip that cannot be read or whose overlay cannot be written: names the file and what to do."""


def overlay_path(out_dir, clip) -> Path:
    clip = Path(clip)
    return Path(out_dir) / f"{clip.stem}_overlay{clip.suffix.lower()}"


def frames_dir(out_dir, clip) -> Path:
    return Path(out_dir) / "raw" / Path(clip).stem


def open_clip(path) -> tuple:
    """(container, its first video stream, frame rate) of `path`, or a VideoError saying why not."""
    path = Path(path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise VideoError(f"{path}: cannot be decoded as a video ({type(err).__name__}: {err}); "
                         + FIX.format(path=path)) from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: holds no video stream (audio or data only?); " + FIX.format(path=path))
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame and slice threads: decoding keeps up with the model
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        container.close()
        raise VideoError(f"{path}: its video stream states no frame rate; " + FIX.format(path=path))
    return container, stream, Fraction(rate)


class OverlayWriter:
    """Encodes RGB frames into a video at `path`, atomically: a temporary file beside it until `close()`."""

    def __init__(self, path: Path, rate: Fraction, width: int, height: int):
        suffix = path.suffix.lower()
        if suffix not in CONTAINERS:
            raise VideoError(f"{path}: no container known for {suffix!r}; use one of {sorted(CONTAINERS)}")
        codec = next((name for name in ENCODERS[suffix] if _has_encoder(name)), None)
        if codec is None:
            raise VideoError(f"{path}: this PyAV build has none of the encoders {list(ENCODERS[suffix])} for "
                             f"{suffix}; install a PyAV wheel with them (pip install av)")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.path, self.codec, self.frames = path, codec, 0
        try:
            self.container = av.open(self.tmp, "w", format=CONTAINERS[suffix])
            self.stream = self.container.add_stream(codec, rate=rate)
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
            if codec == "h264":
                self.stream.codec_context.options = {"crf": H264_CRF}
            else:
                self.stream.bit_rate = int(BITS_PER_PIXEL * width * height * float(rate))
        except BaseException:
            self.discard()
            raise

    def write(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> Path:
        """Flush the encoder, finish the file and rename it into place."""
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.container.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # UnknownCodecError; older PyAV raised ValueError
        return False
    return True


def predict_video(predictor, clip, out_dir, input_size, batch_size: int = 4, flips: Sequence[str] = (),
                  precision: str = "auto", mean=IMAGENET_MEAN, std=IMAGENET_STD, overlay_video: bool = True,
                  frames: bool = False, progress: bool = True, slide: float | None = None) -> dict:
    """Segment every frame of `clip` into `out_dir`: the overlay video and/or raw-ID PNGs per frame.

    Frames are decoded as RGB, predicted `batch_size` at a time at the clip's own size
    (`evaluate.predict_labels`, with `flips`, `precision`, `mean`/`std`, `slide` as for images), then
    overlaid (`plots.overlay`) and encoded. Returns {"clip", "frames", "seconds" (end to end),
    "rate" (frames per second of the clip), "overlay" (path or None), "codec", "raw" (folder or
    None), "class_pixels" (int64 per class)}. A clip that cannot be opened, or that fails to
    decode part way, is a VideoError (no overlay is left behind).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    clip, out_dir = Path(clip), Path(out_dir)
    started = time.perf_counter()
    container, stream, rate = open_clip(clip)
    writer = None
    class_pixels = np.zeros(NUM_CLASSES, dtype=np.int64)
    count = 0
    bar = tqdm(total=stream.frames or None, desc=clip.name, unit="frame", disable=not progress)

    def flush(batch):
        nonlocal writer, count
        labels = predict_labels(predictor, batch, input_size, flips=flips, precision=precision, mean=mean, std=std,
                                slide=slide)
        for image, label in zip(batch, labels):
            class_pixels[:] += np.bincount(label.ravel(), minlength=256)[:NUM_CLASSES]
            if frames:
                write_prediction(out_dir, f"{clip.stem}/{count:06d}", label)
            if overlay_video:
                if writer is None:
                    writer = OverlayWriter(overlay_path(out_dir, clip), rate, image.shape[1], image.shape[0])
                writer.write(overlay(image, label))
            count += 1
        bar.update(len(batch))

    try:
        batch = []
        try:
            for frame in container.decode(stream):
                batch.append(frame.to_ndarray(format="rgb24"))
                if len(batch) == batch_size:
                    flush(batch)
                    batch = []
        except av.error.FFmpegError as err:
            raise VideoError(f"{clip}: decoding failed after {count + len(batch)} frames ({type(err).__name__}: "
                             f"{err}); " + FIX.format(path=clip)) from None
        if batch:
            flush(batch)
        if count == 0:
            raise VideoError(f"{clip}: its video stream has no frames to decode; " + FIX.format(path=clip))
        written = writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    finally:
        bar.close()
        container.close()
    return {"clip": clip, "frames": count, "seconds": time.perf_counter() - started, "rate": float(rate),
            "overlay": written, "codec": None if writer is None else writer.codec,
            "raw": frames_dir(out_dir, clip) if frames else None, "class_pixels": class_pixels}
