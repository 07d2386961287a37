"""Video through predict (offroadseg.video, `python -m offroadseg.predict MODEL clip.mp4`): a clip the test
encodes itself with PyAV goes in; the overlay video is decoded back and checked against predict's own
overlay of the same frames, and the raw-ID frames against predict's labels."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from offroadseg import evaluate, modelinfo, predict, video
from offroadseg.augment import eval_transform
from offroadseg.checkpoints import load_model
from offroadseg.data import read_mask
from offroadseg.engine import TrainConfig, fit
from offroadseg.models import build_model
from offroadseg.plots import overlay

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT = (32, 48)
MODEL = ("segformer-b0", {"drop_path": 0.0, "dropout": 0.0})
SIZE = (90, 160)  # the clip's frames (height, width)
RATE = Fraction(30000, 1001)  # NTSC's 29.97: a rate that is not a whole number must survive too
FRAMES = 10


def scene(index: int) -> np.ndarray:
    """Frame `index` of the test clip: a sky-to-sand gradient with a block moving right, so that every
    frame differs from the others (a frame out of place or order is seen)."""
    rows = np.linspace(0, 1, SIZE[0])[:, None, None]
    frame = ((1 - rows) * np.array([90, 150, 230]) + rows * np.array([200, 170, 110])) * np.ones((1, SIZE[1], 1))
    left = 8 + 12 * index
    frame[30:70, left : left + 24] = (60, 90, 40)
    return frame.astype(np.uint8)


def scene_mask(index: int) -> np.ndarray:
    """Sky above, landscape below, the block a bush: what the model is fitted to see in `scene`."""
    mask = np.full(SIZE, 8, dtype=np.uint8)
    mask[: SIZE[0] // 3] = 9
    left = 8 + 12 * index
    mask[30:70, left : left + 24] = 1
    return mask


class Scenes(torch.utils.data.Dataset):
    def __init__(self, indices):
        self.indices, self.transform = list(indices), eval_transform(INPUT)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.transform(scene(self.indices[i]), scene_mask(self.indices[i]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A segformer-b0 fitted for a few epochs to the clip's scenes: labels that vary within and between
    frames (a model that paints everything one class would make the overlay check weak)."""
    out = tmp_path_factory.mktemp("run") / "models" / "segformer"
    torch.manual_seed(0)
    model = build_model(MODEL[0], **MODEL[1])
    fit(model, Scenes(range(0, FRAMES, 2)), Scenes(range(1, FRAMES, 2)),
        TrainConfig(epochs=4, batch_size=1, lr=3e-3, warmup_epochs=0.5, precision="fp32"), out,
        progress=False, inference_record=modelinfo.inference_info(INPUT, spec=model.spec))
    return out / "best.pt"


def encode_clip(path, codec: str) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = SIZE[1], SIZE[0], "yuv420p"
        if codec == "h264":
            stream.codec_context.options = {"crf": "12"}
        else:
            stream.bit_rate = 4_000_000
        for index in range(FRAMES):
            for packet in stream.encode(av.VideoFrame.from_ndarray(scene(index), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode(path) -> tuple[list[np.ndarray], Fraction, str]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, Fraction(stream.average_rate), stream.codec_context.name


def available(codec: str) -> bool:
    return video._has_encoder(codec)


@pytest.mark.slow
@pytest.mark.parametrize("suffix, codec", [(".mp4", "h264"), (".avi", "mpeg4")])
def test_clip_in_overlay_video_out_at_its_rate_and_size_frame_for_frame(checkpoint, tmp_path, capsys, suffix, codec):
    if not available(codec):
        pytest.skip(f"this PyAV build has no {codec} encoder")
    clip = tmp_path / f"drive{suffix}"
    encode_clip(clip, codec)
    out = tmp_path / "out"
    assert predict.main([str(checkpoint), str(clip), "--out", str(out), "--frames", "--batch-size", "3",
                         "--tta", "none", "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{clip}: {FRAMES} frames in ") and "frames/s end to end" in line
    assert f"drive_overlay{suffix}" in line and "29.97 frames/s" in line

    seen, rate, _ = decode(clip)  # what predict saw (the clip is lossy: compare with its decoded frames)
    written, written_rate, written_codec = decode(out / f"drive_overlay{suffix}")
    assert len(written) == len(seen) == FRAMES and written_rate == RATE and written_codec == codec
    assert all(frame.shape == (*SIZE, 3) for frame in written)

    model = load_model(checkpoint)
    labels = evaluate.predict_labels(model, seen, INPUT)
    assert len({int(c) for label in labels for c in np.unique(label)}) >= 3  # varied labels: the overlay shows them
    raw = sorted((out / "raw" / "drive").glob("*.png"))
    assert [p.name for p in raw] == [f"{i:06d}.png" for i in range(FRAMES)]
    assert all(np.array_equal(read_mask(p), label) for p, label in zip(raw, labels))  # PNGs are lossless: exact

    expected = [overlay(frame, label).astype(np.float32) for frame, label in zip(seen, labels)]
    for index, frame in enumerate(written):
        errors = [np.abs(frame.astype(np.float32) - other).mean() for other in expected]
        assert errors[index] < 4.0, errors  # re-encoded, so loosely: a few grey levels on average ...
        assert int(np.argmin(errors)) == index  # ... but each frame is its own, in order


def test_no_color_frames_only_and_usage_errors(checkpoint, tmp_path, capsys):
    clip = tmp_path / "drive.avi"
    encode_clip(clip, "mpeg4")
    out = tmp_path / "out"
    assert predict.main([str(checkpoint), str(clip), "--out", str(out), "--no-color", "--frames", "--quiet"]) == 0
    assert len(list((out / "raw" / "drive").glob("*.png"))) == FRAMES and not (out / "drive_overlay.avi").exists()
    capsys.readouterr()
    assert predict.main([str(checkpoint), str(clip), "--out", str(out), "--no-color"]) == 2
    assert "--no-color leaves nothing to write for a video" in capsys.readouterr().err
    assert predict.main([str(checkpoint), str(clip), "--out", str(out), "--quiet"]) == 0
    # An earlier overlay in --out is never read back as input, even when a glob matches it.
    assert predict.main([str(checkpoint), str(tmp_path / "*.avi"), str(out / "*.avi"), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.count(" frames in ") == 2  # the clip, twice; never its overlay
    assert [p.name for p in out.glob("*.avi")] == ["drive_overlay.avi"]


def test_a_file_that_does_not_decode_is_named_and_skipped_with_what_to_do(checkpoint, tmp_path, capsys):
    broken = tmp_path / "drive.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 and then nothing a decoder wants")
    clip = tmp_path / "fine.avi"
    encode_clip(clip, "mpeg4")
    assert predict.main([str(checkpoint), str(broken), str(clip), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert f"skipped {broken}: cannot be decoded as a video" in captured.err and "ffprobe" in captured.err
    assert f"{clip}: {FRAMES} frames" in captured.out  # the other clip went on
    assert not (tmp_path / "out" / "drive_overlay.mp4").exists()


def test_a_failure_part_way_leaves_no_half_video(checkpoint, tmp_path, monkeypatch):
    clip = tmp_path / "drive.avi"
    encode_clip(clip, "mpeg4")
    real, calls = video.predict_labels, []

    def fails_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory, say")
        return real(*args, **kwargs)

    monkeypatch.setattr(video, "predict_labels", fails_second_batch)
    with pytest.raises(RuntimeError, match="out of memory"):
        video.predict_video(load_model(checkpoint), clip, tmp_path / "out", INPUT, batch_size=4, progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # neither the overlay nor its temporary file
