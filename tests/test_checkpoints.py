"""Checkpoint files: loading a model from its spec, refused resumes, damaged files and their fallback.

The runs are those of test_engine.py: a tiny conv net on 16x16 synthetic images.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import assert_names
from test_engine import TinySegNet, assert_same_history, counting_step_loss, data, fast_config, fresh_model

from offroadseg import checkpoints
from offroadseg.checkpoints import CheckpointError, load_checkpoint, load_model
from offroadseg.engine import fit


def test_load_model_rebuilds_from_spec(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train, val = data()
    fit(fresh_model(), train, val, fast_config(epochs=1), out, progress=False)
    built = []

    def build_model(name, num_classes=10, pretrained=None, **options):
        built.append((name, num_classes, options))
        return TinySegNet(num_classes=num_classes, **options)

    monkeypatch.setattr(checkpoints, "build_model", build_model)
    model = load_model(out / "best.pt")
    assert built == [("tiny", 10, {"width": 16, "batchnorm": True})]
    assert not model.training
    reference = TinySegNet()
    reference.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    x = data()[1].images[:2]
    assert torch.equal(model(x), reference.eval()(x))


def test_resume_with_other_settings_is_a_clear_error(tmp_path):
    train, val = data()
    out = tmp_path / "run"
    fit(fresh_model(), train, val, fast_config(epochs=1), out, progress=False)
    with pytest.raises(ValueError) as error:
        fit(fresh_model(), train, val, fast_config(epochs=2, lr=0.01, batch_size=4), out, progress=False)
    assert_names(error, "batch_size: 8", "4 now", "lr: 0.02", "0.01 now", "new run name", out)
    with pytest.raises(ValueError, match="spec"):
        fit(fresh_model(width=8), train, val, fast_config(epochs=2), out, progress=False)
    with pytest.raises(ValueError, match="train_samples"):
        fit(fresh_model(), data(n_train=24)[0], val, fast_config(epochs=2), out, progress=False)


def test_a_checkpoint_from_before_a_setting_existed_resumes_under_its_default(tmp_path):
    # A run trained by an older version has no "ema" in its record: it trained without EMA, so it
    # continues with ema=0 (the default) and is refused with EMA switched on.
    train, val = data()
    out = tmp_path / "run"
    fit(fresh_model(), train, val, fast_config(epochs=1), out, progress=False)
    for name in ("last.pt", "best.pt"):
        checkpoint = load_checkpoint(out / name)
        del checkpoint["config"]["ema"]
        torch.save(checkpoint, out / name)
    with pytest.raises(ValueError) as error:
        fit(fresh_model(), train, val, fast_config(epochs=2, ema=0.9), out, progress=False)
    assert_names(error, "ema: 0.0 in the checkpoint", "0.9 now")
    history = fit(fresh_model(), train, val, fast_config(epochs=2), out, progress=False)
    assert [row["epoch"] for row in history] == [1, 2]


def test_corrupt_last_checkpoint_is_a_clear_error(tmp_path):
    train, val = data()
    out = tmp_path / "run"
    fit(fresh_model(), train, val, fast_config(epochs=1), out, progress=False)
    last = out / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    # After one epoch there is no previous.pt to fall back to: an error, not a silent fresh start.
    with pytest.raises(CheckpointError) as error:
        fit(fresh_model(), train, val, fast_config(epochs=2), out, progress=False)
    assert_names(error, last, "damaged", "truncated or corrupt")


def flip_byte(path: Path) -> None:
    """Flip one byte in the middle of the archive's largest tensor: a silent disk or copy fault."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    # Local file header: 30 fixed bytes, then the name and the extra field (lengths at bytes 26-29).
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26: member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len
    data[start + member.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_detected_not_loaded(tmp_path):
    # torch.load alone would read this file and hand back silently wrong weights.
    train, val = data()
    out = tmp_path / "run"
    fit(fresh_model(), train, val, fast_config(epochs=1), out, progress=False)
    flip_byte(out / "best.pt")
    with pytest.raises(CheckpointError, match="best.pt is damaged.*CRC32"):
        load_checkpoint(out / "best.pt")
    with pytest.raises(CheckpointError, match="best.pt is damaged"):
        load_model(out / "best.pt")


@pytest.mark.slow  # a few seconds alone: subprocesses (or a fit) each importing torch
def test_damaged_last_checkpoint_falls_back_to_previous(tmp_path):
    train, val = data()
    config = fast_config(epochs=3)
    straight = fit(fresh_model(), train, val, config, tmp_path / "straight", step_loss=counting_step_loss(),
                   progress=False)

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # stopped in epoch 3, so the files hold epochs 1 and 2
        fit(fresh_model(), train, val, config, out, step_loss=counting_step_loss(crash_at=2 * len(train) // 8 + 1),
            progress=False)
    assert load_checkpoint(out / "previous.pt")["epoch"] == 1
    flip_byte(out / "last.pt")
    with pytest.warns(RuntimeWarning, match=r"last.pt is damaged.*\n.*Resuming from .*previous.pt \(epoch 1\)"):
        resumed = fit(fresh_model(), train, val, config, out, step_loss=counting_step_loss(), progress=False)
    # Epoch 2 is trained again from epoch 1's state: the run ends as if nothing had happened.
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    assert_same_history(resumed, straight)
    assert load_checkpoint(out / "last.pt")["epoch"] == 3
    assert load_checkpoint(out / "previous.pt")["epoch"] == 2


def test_crash_while_writing_a_checkpoint_keeps_the_old_one(tmp_path, monkeypatch):
    train, val = data()
    out = tmp_path / "run"
    fit(fresh_model(), train, val, fast_config(epochs=1), out, progress=False)
    before = (out / "last.pt").read_bytes()

    def save_half_then_die(state, handle):
        handle.write(before[: len(before) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoints.torch, "save", save_half_then_die)
    with pytest.raises(OSError, match="disk full"):
        fit(fresh_model(), train, val, fast_config(epochs=2), out, progress=False)
    monkeypatch.undo()
    # The rotation moved the intact epoch-1 file to previous.pt; the cut write never became last.pt.
    intact = [p for p in (out / "last.pt", out / "previous.pt") if p.exists()]
    assert intact and all(load_checkpoint(p)["epoch"] == 1 for p in intact)
    assert (out / "best.pt").read_bytes() == before or load_checkpoint(out / "best.pt")["epoch"] == 1
    assert not list(out.glob(".*.tmp"))
    history = fit(fresh_model(), train, val, fast_config(epochs=2), out, progress=False)
    assert [row["epoch"] for row in history] == [1, 2]


def test_resume_on_other_data_is_refused(tmp_path):
    train, val = data()
    out = tmp_path / "run"
    fit(fresh_model(), train, val, fast_config(epochs=1), out, progress=False, data_fingerprint="scan-a")
    with pytest.raises(ValueError, match="data: 'scan-a' in the checkpoint, 'scan-b' now"):
        fit(fresh_model(), train, val, fast_config(epochs=2), out, progress=False, data_fingerprint="scan-b")
    assert len(fit(fresh_model(), train, val, fast_config(epochs=2), out, progress=False, data_fingerprint="scan-a")) == 2
