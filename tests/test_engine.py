"""The shared training loop: learning, run folder, resume, DDP, non-finite steps, early stop.

Checkpoint files and resume-file faults: test_checkpoints.py; sample order: test_sampling.py.

Everything runs a tiny conv net on 16x16 synthetic images whose class is a function of
the colour, so a few CPU epochs are enough to see real learning.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import assert_names
from torch import nn
from torch.utils.data import Dataset

from offroadseg import checkpoints, engine
from offroadseg.checkpoints import best_row, load_checkpoint
from offroadseg.device import resolve_precision
from offroadseg.engine import TrainConfig, fit, launch, warmup_cosine
from offroadseg.files import read_json
from offroadseg.losses import cross_entropy
from offroadseg.metrics import confusion_matrix, scores
from offroadseg.train_step import TrainingDiverged

# One colour per class, far apart, so a pixel's class is a simple function of its colour.
PALETTE = torch.tensor(
    [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1], [0.5, 0.5, 0.5], [0.5, 0, 0]],
    dtype=torch.float32,
)


class ColourBlocks(Dataset):
    """16x16 images of 4x4 blocks, each block a random class painted in its palette colour plus
    noise; the top-left pixel of every mask is ignore (255)."""

    def __init__(self, n: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        blocks = torch.randint(0, 10, (n, 4, 4), generator=generator)
        self.masks = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)
        self.images = PALETTE[self.masks].permute(0, 3, 1, 2) + 0.05 * torch.randn(n, 3, 16, 16, generator=generator)
        self.masks[:, 0, 0] = 255

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, index):
        return self.images[index], self.masks[index]


class TinySegNet(nn.Module):
    """Stand-in for the project's models: logits at input resolution, `.decoder`, `.spec`."""

    def __init__(self, num_classes: int = 10, width: int = 16, batchnorm: bool = True):
        super().__init__()
        self.spec = {"name": "tiny", "num_classes": num_classes, "options": {"width": width, "batchnorm": batchnorm}}
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width) if batchnorm else nn.Identity(), nn.ReLU()
        )
        # Dropout draws from the global RNG: resuming must restore it to match a straight run.
        self.decoder = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU(), nn.Dropout(0.1), nn.Conv2d(width, num_classes, 1))

    def forward(self, x):
        return self.decoder(self.encoder(x))


def fast_config(**overrides) -> TrainConfig:
    settings = dict(epochs=3, batch_size=8, lr=0.02, warmup_epochs=0.5, precision="fp32", seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def fresh_model(**options) -> TinySegNet:
    torch.manual_seed(0)
    return TinySegNet(**options)


def data(n_train: int = 32, n_val: int = 12):
    return ColourBlocks(n_train, seed=1), ColourBlocks(n_val, seed=2)


def counting_step_loss(crash_at: int | None = None, nan_at: int | None = None):
    """A step_loss equal to plain cross-entropy that crashes or returns NaN on one call."""
    calls = {"n": 0}

    def step_loss(model, images, masks):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt("simulated stop")
        loss = cross_entropy(model(images), masks)
        return loss * math.nan if calls["n"] == nan_at else loss

    return step_loss


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-6), key


def assert_same_history(a: list[dict], b: list[dict]):
    """Equal up to float noise, timings aside."""
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b):
        assert row_a.keys() == row_b.keys()
        assert row_a["backend"] == row_b["backend"]
        for key in row_a.keys() - {"seconds", "images_per_s", "backend"}:
            values_a, values_b = row_a[key], row_b[key]
            if not isinstance(values_a, list):
                values_a, values_b = [values_a], [values_b]
            for x, y in zip(values_a, values_b, strict=True):
                if isinstance(x, str) or x is None:
                    assert x == y, (row_a["epoch"], key)
                else:
                    assert x == pytest.approx(y, rel=1e-5, abs=1e-6), (row_a["epoch"], key)


# ---------------------------------------------------------------------------------- fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "models" / "tiny"
    train, val = data(n_train=64)
    config = fast_config(epochs=3)
    history = fit(fresh_model(), train, val, config, out, progress=False)
    return out, config, history


def test_fit_learns_and_fills_the_run_folder(trained):
    out, config, history = trained
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[-1]["val_miou"] > history[0]["val_miou"] + 0.2
    for row in history:
        assert len(row["per_class_iou"]) == 10
        assert set(row) >= {"epoch", "train_loss", "val_loss", "val_miou", "val_pixel_acc", "per_class_iou",
                            "lr", "seconds", "images_per_s"}
    assert read_json(out / "history.json") == history

    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    best_epoch = max(history, key=lambda row: row["val_miou"])["epoch"]
    # history.json carries the best epoch (so far, on every row), and best_row reads it
    assert history[-1]["best_epoch"] == best_epoch == best_row(history)["epoch"]
    assert all(row["best_epoch"] <= row["epoch"] for row in history)
    assert best["epoch"] == best_epoch and best["best_miou"] == pytest.approx(history[best_epoch - 1]["val_miou"])
    assert last["epoch"] == 3 and last["history"] == history
    assert set(last) >= {"model", "spec", "optimizer", "scheduler", "scaler", "epoch", "best_miou", "history",
                         "config"}
    assert "rng" not in last  # every draw is seeded from (seed, epoch): nothing to restore
    assert last["config"] == asdict(config)
    assert last["spec"] == TinySegNet().spec
    assert all(t.device.type == "cpu" for t in last["model"].values())
    # The best checkpoint scores what history says it scored.
    model = TinySegNet()
    model.load_state_dict(best["model"])
    model.eval()
    val = data()[1]
    with torch.no_grad():
        cm = confusion_matrix(model(val.images).argmax(1), val.masks)
    assert scores(cm)["miou"] == pytest.approx(history[best_epoch - 1]["val_miou"], abs=1e-6)


def test_finished_run_is_not_trained_again(trained, capsys):
    out, config, history = trained
    stamp = (out / "last.pt").stat().st_mtime_ns
    again = fit(fresh_model(), *data(n_train=64), config, out, progress=False)
    assert again == history
    assert (out / "last.pt").stat().st_mtime_ns == stamp
    assert "nothing to train" in capsys.readouterr().out


# ------------------------------------------------------------------------------- resume


def capture_restore(monkeypatch):
    """Record the checkpoint epoch and the optimizer/scheduler state right after a resume loads them."""
    seen = []
    original = checkpoints.restore_training_state

    def spy(checkpoint, optimizer, scheduler, scaler):
        original(checkpoint, optimizer, scheduler, scaler)
        seen.append({"epoch": checkpoint["epoch"], "optimizer": copy.deepcopy(optimizer.state_dict()),
                     "last_epoch": scheduler.scheduler.last_epoch, "lr": optimizer.param_groups[0]["lr"],
                     "last_lr": scheduler.get_last_lr()[0]})

    monkeypatch.setattr(checkpoints, "restore_training_state", spy)
    return seen


def assert_same_optimizer_state(loaded: dict, saved: dict, except_lr: bool = False):
    def groups(state):
        return [{k: v for k, v in group.items() if not (except_lr and k == "lr")} for group in state["param_groups"]]

    assert groups(loaded) == groups(saved)
    assert loaded["state"].keys() == saved["state"].keys()
    for index, state in saved["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(loaded["state"][index][name]), torch.as_tensor(value)), (index, name)


@pytest.mark.slow
def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    # A stop mid-epoch 3 of a 4-epoch run, then the same call again: it must go on at
    # epoch 3 from last.pt and end with the weights of a run that never stopped. (Stopping
    # with epochs=2 and resuming with epochs=4 cannot match bit for bit: the cosine schedule
    # of the first two epochs then spanned 2 epochs, not 4; see the next test.)
    train, val = data()
    weights = [1.0 + (i % 3) for i in range(len(train))]
    config = fast_config(epochs=4)
    steps_per_epoch = len(train) // config.batch_size

    straight = fit(fresh_model(), train, val, config, tmp_path / "straight", sample_weights=weights,
                   step_loss=counting_step_loss(), progress=False)

    with pytest.raises(KeyboardInterrupt):
        fit(fresh_model(), train, val, config, tmp_path / "stopped", sample_weights=weights,
            step_loss=counting_step_loss(crash_at=2 * steps_per_epoch + 2), progress=False)
    saved = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert saved["epoch"] == 2

    seen = capture_restore(monkeypatch)
    capsys.readouterr()
    # A differently initialised model object: everything must come from last.pt.
    torch.manual_seed(123)
    resumed = fit(TinySegNet(), train, val, config, tmp_path / "stopped", sample_weights=weights,
                  step_loss=counting_step_loss(), progress=False)
    assert "at epoch 3/4" in capsys.readouterr().out
    assert [s["epoch"] for s in seen] == [2]
    assert_same_optimizer_state(seen[0]["optimizer"], saved["optimizer"])
    assert [row["epoch"] for row in resumed] == [1, 2, 3, 4]
    assert_same_history(resumed, straight)
    assert_same_weights(load_checkpoint(tmp_path / "stopped" / "last.pt")["model"],
                        load_checkpoint(tmp_path / "straight" / "last.pt")["model"])


def test_resume_with_more_epochs_continues_the_optimizer(tmp_path, monkeypatch):
    train, val = data()
    out = tmp_path / "run"
    first = fit(fresh_model(), train, val, fast_config(epochs=2), out, progress=False)
    saved = load_checkpoint(out / "last.pt")
    steps_per_epoch = len(train) // 8
    assert saved["optimizer"]["state"][0]["step"] == 2 * steps_per_epoch

    seen = capture_restore(monkeypatch)
    history = fit(fresh_model(), train, val, fast_config(epochs=4, patience=3, num_workers=0), out, progress=False)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert history[:2] == first
    # Right after the load: the saved optimizer state, and the lr of the new, longer schedule.
    assert_same_optimizer_state(seen[0]["optimizer"], saved["optimizer"], except_lr=True)
    assert seen[0]["last_epoch"] == 2 * steps_per_epoch
    longer = warmup_cosine(0.5 * steps_per_epoch, 4 * steps_per_epoch, fast_config().min_lr_ratio)
    assert seen[0]["lr"] == pytest.approx(0.02 * longer(2 * steps_per_epoch)) == pytest.approx(seen[0]["last_lr"])
    assert seen[0]["lr"] != pytest.approx(first[-1]["lr"])  # not the end of the 2-epoch schedule
    # A fresh optimizer would have counted only the last 2 epochs' steps.
    final = load_checkpoint(out / "last.pt")
    assert final["optimizer"]["state"][0]["step"] == 4 * steps_per_epoch
    assert final["scheduler"]["last_epoch"] == 4 * steps_per_epoch


# ---------------------------------------------------------------------------- robustness


def test_non_finite_loss_step_is_skipped(tmp_path):
    train, val = data()
    model = fresh_model()
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        history = fit(model, train, val, fast_config(epochs=2), tmp_path / "run",
                      step_loss=counting_step_loss(nan_at=2), progress=False)
    assert [row["skipped_steps"] for row in history] == [1, 0]
    assert all(math.isfinite(row["train_loss"]) for row in history)
    assert history[-1]["val_miou"] > history[0]["val_miou"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["skipped_steps"] == 1
    assert last["optimizer"]["state"][0]["step"] == 2 * len(train) // 8 - 1


def nan_step_loss(bad_calls):
    """Cross-entropy, NaN on the calls whose number is in `bad_calls` (a set or a predicate)."""
    calls = {"n": 0}

    def step_loss(model, images, masks):
        calls["n"] += 1
        loss = cross_entropy(model(images), masks)
        bad = bad_calls(calls["n"]) if callable(bad_calls) else calls["n"] in bad_calls
        return loss * math.nan if bad else loss

    step_loss.calls = calls
    return step_loss


def test_non_finite_losses_in_a_row_stop_training_with_advice(tmp_path):
    train, val = data()
    step_loss = nan_step_loss(lambda n: n >= 3)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        with pytest.raises(TrainingDiverged) as error:
            fit(fresh_model(), train, val, fast_config(epochs=2, max_bad_steps=4), tmp_path / "run",
                step_loss=step_loss, progress=False)
    assert_names(error, "4 steps in a row", "epoch 2 step 2", "lr=0.02", "'fp32' or 'bf16'", "last.pt")
    # 4 steps per epoch: the bad run spans the epoch boundary, and training stops at once, mid-epoch.
    assert step_loss.calls["n"] == 6
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1

    # Scattered bad steps never add up to a stop: the count is of bad steps in a row.
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        history = fit(fresh_model(), train, val, fast_config(epochs=2, max_bad_steps=2), tmp_path / "scattered",
                      step_loss=nan_step_loss(lambda n: n % 2 == 0), progress=False)
    assert sum(row["skipped_steps"] for row in history) == 4


def test_out_of_memory_says_what_to_change(tmp_path):
    train, val = data()

    def step_loss(model, images, masks):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError) as error:
        fit(fresh_model(), train, val, fast_config(epochs=1), tmp_path / "run", step_loss=step_loss, progress=False)
    assert_names(error, "epoch 1 step 1", "batch_size 8", "(16, 16)", "batch_size (e.g. 4)", "image_size",
                 "Tried to allocate")

    def cpu_step_loss(model, images, masks):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(torch.OutOfMemoryError, match="smaller batch_size"):
        fit(fresh_model(), train, val, fast_config(epochs=1), tmp_path / "run", step_loss=cpu_step_loss, progress=False)


def test_early_stopping_on_a_plateau(tmp_path, capsys):
    # lr=0 and no BatchNorm: the model never changes, so mIoU never improves after epoch 1.
    train, val = data()
    config = fast_config(epochs=10, lr=0.0, patience=2)
    history = fit(fresh_model(batchnorm=False), train, val, config, tmp_path / "run", progress=False)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert "early stop" in capsys.readouterr().out
    # Running the notebook again does not train past the stop.
    again = fit(fresh_model(batchnorm=False), train, val, config, tmp_path / "run", progress=False)
    assert again == history


DDP_SCRIPT = """
import os, sys
import torch
sys.path.insert(0, TESTS_DIR)
from test_engine import ColourBlocks, TinySegNet, fast_config
from offroadseg.engine import fit

out = sys.argv[1]
torch.manual_seed(0)
model = TinySegNet()
weights = [1.0 + (i % 3) for i in range(24)]
fit(model, ColourBlocks(24, seed=1), ColourBlocks(13, seed=2), fast_config(epochs=2, batch_size=4),
    os.path.join(out, "run"), sample_weights=weights, progress=False)
torch.save({k: v.cpu() for k, v in model.state_dict().items()}, os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.replace("TESTS_DIR", repr(str(Path(__file__).parent))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:  # parameters and BatchNorm buffers
        assert torch.equal(rank0[key], rank1[key]), key
    initial = fresh_model().state_dict()
    assert not torch.equal(rank0["decoder.3.weight"], initial["decoder.3.weight"])

    run = tmp_path / "run"
    last = load_checkpoint(run / "last.pt")
    assert last["setup"]["num_processes"] == 2 and last["epoch"] == 2
    assert_same_weights(last["model"], rank0)
    # The val mIoU summed over both processes' shares (13 images: 7 + 6) is the mIoU of the
    # whole val set, each image counted once.
    history = read_json(run / "history.json")
    model = TinySegNet()
    model.load_state_dict(rank0)
    val = ColourBlocks(13, seed=2)
    with torch.no_grad():
        cm = confusion_matrix(model.eval()(val.images).argmax(1), val.masks)
    assert scores(cm)["miou"] == pytest.approx(history[-1]["val_miou"], abs=1e-6)


# ---------------------------------------------------------------------------- small parts


def test_warmup_then_cosine_schedule():
    multiplier = warmup_cosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert 0 < multiplier(0) < multiplier(5) < multiplier(9) < 1
    assert multiplier(10) == pytest.approx(1.0)
    assert multiplier(60) == pytest.approx(0.55)
    assert multiplier(110) == pytest.approx(0.1) and multiplier(500) == pytest.approx(0.1)
    after = [multiplier(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_precision_choice():
    assert resolve_precision("fp32") == "no"
    assert resolve_precision("bf16") == "bf16" and resolve_precision("fp16") == "fp16"
    if not torch.cuda.is_available():
        assert resolve_precision("auto") == "no"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("half")


def test_mixed_precision_path_and_switching_precision_in_one_process(tmp_path):
    # bf16 autocast runs on CPU too; a notebook may then train another model in fp32.
    train, val = data()
    history = fit(fresh_model(), train, val, fast_config(epochs=1, precision="bf16"), tmp_path / "bf16",
                  progress=False)
    assert math.isfinite(history[0]["train_loss"]) and math.isfinite(history[0]["val_miou"])
    assert engine.make_accelerator("fp32").mixed_precision == "no"


def test_launch_calls_the_function_in_process_on_one_device():
    assert launch(lambda a, b, c=0: a + b + c, 2, 3, num_processes=1, c=4) == 9
    if torch.cuda.device_count() < 2:
        assert launch(lambda: "here") == "here"


def test_channels_last_trains_the_same_model(tmp_path):
    # A memory layout, not a different computation: the same history up to float noise.
    train, val = data()
    plain = fit(fresh_model(), train, val, fast_config(epochs=2, channels_last=False), tmp_path / "plain", progress=False)
    nhwc = fit(fresh_model(), train, val, fast_config(epochs=2, channels_last=True), tmp_path / "nhwc", progress=False)
    # Summation order differs between layouts, and lr=0.02 amplifies it a little over 2 epochs.
    for a, b in zip(plain, nhwc, strict=True):
        assert a["val_miou"] == pytest.approx(b["val_miou"], abs=0.01)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.01)
    # The checkpoint loads into a plain model and predicts as the trained one did.
    model = fresh_model()
    model.load_state_dict(load_checkpoint(tmp_path / "nhwc" / "last.pt")["model"])
    assert engine.evaluate(model, torch.utils.data.DataLoader(val, batch_size=4), cross_entropy,
                           engine.make_accelerator("fp32"))["miou"] == pytest.approx(nhwc[-1]["val_miou"], abs=1e-6)


@pytest.mark.slow
def test_compile_keeps_checkpoints_those_of_the_plain_model(tmp_path):
    # ~15 s of compiling on 2 CPU cores for this tiny net: what makes it off by default.
    train, val = data()
    history = fit(fresh_model(), train, val, fast_config(epochs=1, compile=True), tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert set(state) == set(fresh_model().state_dict())  # no "_orig_mod." prefixes
    assert math.isfinite(history[0]["train_loss"])
