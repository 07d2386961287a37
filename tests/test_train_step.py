"""The training step on the GPU paths, proven on the CPU (issue 11 item 2, issue 13 defects 4, 5, 8,
issue 14 item 6): no host sync per step, fp16 overflows counted, each process its own random
draws, cudnn.benchmark, no blocking host-to-device copies, and the trial step before training.

Stand-ins for the GPU: patched tensor read-outs count host syncs, a CPU GradScaler plays
fp16's, a patched process index plays the second GPU, and the `meta` device plays a device
the loss's and augmentation's constants must be moved to.
"""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from test_engine import ColourBlocks, TinySegNet, data, fast_config, fresh_model
from torch.utils.data import Dataset

from offroadseg import engine
from offroadseg.augment import AugmentRecipe
from offroadseg.batch_augment import BatchAugment
from offroadseg.checkpoints import load_checkpoint
from offroadseg.engine import fit
from offroadseg.losses import SegmentationLoss, cross_entropy
from offroadseg.train_step import TrainingDiverged, trial_step

# Everything that hands a tensor's value to Python: on a GPU each waits for the device to finish.
READ_OUTS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def count_read_outs(monkeypatch) -> dict:
    counter = {"n": 0}
    for name in READ_OUTS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counter["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


class StepMarker(TinySegNet):
    """TinySegNet that notes the read-out count at each training forward: one forward per step."""

    def __init__(self, counter):
        super().__init__()
        self.counter, self.marks = counter, []

    def forward(self, x):
        if self.training:
            self.marks.append(self.counter["n"])
        return super().forward(x)


# ------------------------------------------------------------------------ issue 11 item 2


def test_no_host_sync_between_training_steps(tmp_path, monkeypatch):
    train, val = data(n_train=48)  # 12 steps of 4
    counter = count_read_outs(monkeypatch)
    torch.manual_seed(0)
    model = StepMarker(counter)
    history = fit(model, train, val, fast_config(epochs=1, batch_size=4), tmp_path / "run", progress=False)
    per_step = [b - a for a, b in zip(model.marks, model.marks[1:])]
    assert len(per_step) == 11 and per_step == [0] * 11, per_step
    assert math.isfinite(history[0]["train_loss"]) and history[0]["skipped_steps"] == 0

    # Read every sync_every steps: one read after steps 5 and 10, none in between.
    torch.manual_seed(0)
    model = StepMarker(counter)
    fit(model, train, val, fast_config(epochs=1, batch_size=4, sync_every=5), tmp_path / "every5", progress=False)
    per_step = [b - a for a, b in zip(model.marks, model.marks[1:])]
    assert [i + 1 for i, n in enumerate(per_step) if n] == [5, 10], per_step


def test_batches_move_to_the_device_without_blocking():
    # A blocking copy makes the host wait for the GPU once per batch; accelerate's default is blocking.
    assert engine.make_accelerator("no").non_blocking is True


def test_same_history_whatever_sync_every(tmp_path):
    train, val = data()
    every_step = fit(fresh_model(), train, val, fast_config(epochs=2, sync_every=1), tmp_path / "a", progress=False)
    rarely = fit(fresh_model(), train, val, fast_config(epochs=2, sync_every=1000), tmp_path / "b", progress=False)
    for a, b in zip(every_step, rarely, strict=True):
        assert {k: v for k, v in a.items() if k not in ("seconds", "images_per_s")} == \
               {k: v for k, v in b.items() if k not in ("seconds", "images_per_s")}


def test_bad_gradient_with_a_finite_loss_is_skipped_on_the_device(tmp_path):
    # sqrt at 0 has an infinite slope: a finite loss, NaN gradients (also without clipping).
    calls = {"n": 0}

    def step_loss(model, images, masks):
        calls["n"] += 1
        logits = model(images)
        loss = cross_entropy(logits, masks)
        if calls["n"] == 2:
            loss = loss + 0 * (logits - logits.detach()).abs().sum().sqrt()
        return loss

    model = fresh_model()
    with pytest.warns(RuntimeWarning, match="epoch 1 step 2: non-finite gradients, step skipped"):
        history = fit(model, *data(), fast_config(epochs=1, grad_clip=0.0), tmp_path / "run", step_loss=step_loss,
                      progress=False)
    assert history[0]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["state"][0]["step"] == 3


def test_resume_from_a_checkpoint_of_a_non_fused_optimizer(tmp_path):
    # Checkpoints written before the optimizer was fused carry fused=None in their groups.
    train, val = data()
    out = tmp_path / "run"
    fit(fresh_model(), train, val, fast_config(epochs=1), out, progress=False)
    checkpoint = load_checkpoint(out / "last.pt")
    for group in checkpoint["optimizer"]["param_groups"]:
        group["fused"] = None
    for state in checkpoint["optimizer"]["state"].values():
        state["step"] = torch.tensor(float(state["step"]))
    torch.save(checkpoint, out / "last.pt")
    history = fit(fresh_model(), train, val, fast_config(epochs=2), out, progress=False)
    assert [row["epoch"] for row in history] == [1, 2] and history[1]["skipped_steps"] == 0
    assert load_checkpoint(out / "last.pt")["optimizer"]["state"][0]["step"] == 8


# --------------------------------------------------------------------- issue 13 defect 5


def fp16_stand_in(monkeypatch):
    """fit's accelerator with a grad scaler, as fp16 training on a GPU has (accelerate's is None on the CPU)."""
    original = engine.make_accelerator

    def make_accelerator(mixed_precision):
        accelerator = original(mixed_precision)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        return accelerator

    monkeypatch.setattr(engine, "make_accelerator", make_accelerator)


def overflowing_loss(bad_calls):
    """Cross-entropy x 1e35 on the chosen calls: finite, but x the grad scale (>= 4096 here) it overflows."""
    calls = {"n": 0}

    def step_loss(model, images, masks):
        calls["n"] += 1
        loss = cross_entropy(model(images), masks)
        return loss * 1e35 if bad_calls(calls["n"]) else loss

    step_loss.calls = calls
    return step_loss


def test_fp16_overflows_in_a_row_stop_training_with_advice(tmp_path, monkeypatch):
    fp16_stand_in(monkeypatch)
    train, val = data()
    step_loss = overflowing_loss(lambda n: n >= 3)
    with pytest.warns(RuntimeWarning, match="fp16 overflow"):
        with pytest.raises(TrainingDiverged,
                           match=r"4 steps in a row \(up to epoch 2 step 2\).*fp16 overflow.*grad scaler.*"
                                 r"scale is now 4096.*'fp32' or 'bf16' rather than 'fp16'"):
            fit(fresh_model(), train, val, fast_config(epochs=2, max_bad_steps=4), tmp_path / "run",
                step_loss=step_loss, progress=False)
    assert step_loss.calls["n"] == 6
    assert load_checkpoint(tmp_path / "run" / "last.pt")["skipped_steps"] == 2


def test_fp16_overflows_are_counted_as_skipped_steps(tmp_path, monkeypatch):
    fp16_stand_in(monkeypatch)
    model = fresh_model()
    with pytest.warns(RuntimeWarning, match="fp16 overflow"):
        history = fit(model, *data(), fast_config(epochs=2), tmp_path / "run",
                      step_loss=overflowing_loss(lambda n: n in (2, 5)), progress=False)
    assert [row["skipped_steps"] for row in history] == [1, 1]
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["skipped_steps"] == 2
    assert last["scaler"]["scale"] == 2.0**14  # halved by each overflow
    assert last["optimizer"]["state"][0]["step"] == 6  # 8 steps, 2 skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------- issue 13 defect 4


class WorkerDraws(Dataset):
    """ColourBlocks whose first pixel is a draw of torch's generator made where the sample is made
    (a loader worker): what a per-sample augmentation draws."""

    def __init__(self, n: int):
        self.blocks = ColourBlocks(n, seed=1)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        image, mask = self.blocks[index]
        image = image.clone()
        image[0, 0, 0] = torch.rand(())
        return image, mask


def augmentation_draws(tmp_path, monkeypatch, rank: int, name: str):
    """Train one epoch as process `rank` (patched index); return its BatchAugment and loader-worker draws."""
    monkeypatch.setattr(Accelerator, "process_index", property(lambda self: rank))
    sampler = BatchAugment((16, 16))
    batch_draws, worker_draws = [], []

    def batch_transform(images, masks):
        if len(images) != 4:  # fit's size line before training, on one sample
            return images, masks
        params = sampler.sample(len(images), 16, 16)  # BatchAugment's draws, from the global generator
        batch_draws.append(torch.cat([params.box.flatten(), params.angle, params.flip.float(), params.hue]))
        worker_draws.extend(images[:, 0, 0, 0].tolist())
        return images, masks

    fit(fresh_model(), WorkerDraws(16), ColourBlocks(4, seed=2), fast_config(epochs=1, batch_size=4, num_workers=1),
        tmp_path / name, batch_transform=batch_transform, progress=False)
    monkeypatch.undo()
    return torch.stack(batch_draws), worker_draws


def test_each_process_draws_its_own_augmentation(tmp_path, monkeypatch):
    rank0 = augmentation_draws(tmp_path, monkeypatch, 0, "rank0")
    rank1 = augmentation_draws(tmp_path, monkeypatch, 1, "rank1")
    rank0_again = augmentation_draws(tmp_path, monkeypatch, 0, "rank0_again")
    assert not torch.equal(rank0[0], rank1[0])  # BatchAugment's crops, angles, flips, hues
    assert rank0[1] != rank1[1]  # the loader workers' draws
    assert torch.equal(rank0[0], rank0_again[0]) and rank0[1] == rank0_again[1]  # and yet reproducible


# --------------------------------------------------------------------- issue 13 defect 8


def test_cudnn_benchmark_on_cuda_only_and_restored_after_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert engine._training_backends(torch.device("cpu")) is False and torch.backends.cudnn.benchmark is False
    assert engine._training_backends(torch.device("cuda")) is False and torch.backends.cudnn.benchmark is True

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    seen = []

    original = engine._training_backends

    def as_on_cuda(device):  # fit's device check, answered as if on a GPU
        seen.append(device)
        return original(torch.device("cuda"))

    during = []

    def step_loss(model, images, masks):
        during.append(torch.backends.cudnn.benchmark)
        return cross_entropy(model(images), masks)

    monkeypatch.setattr(engine, "_training_backends", as_on_cuda)
    fit(fresh_model(), *data(), fast_config(epochs=1), tmp_path / "run", step_loss=step_loss, progress=False)
    assert [d.type for d in seen] == ["cpu"] and set(during) == {True}
    assert torch.backends.cudnn.benchmark is False


def count_copies_to(monkeypatch, device_type: str) -> list:
    """Record (non_blocking, pinned) for each Tensor.to that moves a CPU tensor to `device_type`."""
    copies = []
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.device.type == "cpu" and result.device.type == device_type:
            copies.append(kwargs.get("non_blocking", False))
        return result

    monkeypatch.setattr(torch.Tensor, "to", to)
    return copies


def test_class_weights_move_to_the_device_once(monkeypatch):
    loss = SegmentationLoss(class_weights=torch.rand(10), dice_weight=0.0, boundary_weight=1.0)
    logits = torch.empty(2, 10, 8, 8, device="meta")
    target = torch.empty(2, 8, 8, dtype=torch.int64, device="meta")
    copies = count_copies_to(monkeypatch, "meta")
    loss(logits, target)
    first = len(copies)
    loss(logits, target)
    loss(logits, target)
    assert first <= 2 and len(copies) == first  # CE's and focal's weights, once each


def test_augmentation_parameters_go_to_the_gpu_from_pinned_memory(monkeypatch):
    params = BatchAugment((8, 8)).sample(4, 12, 12)
    pinned, copies = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(self) or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append((a, k)) or self)
    params.to(torch.device("cuda"))
    assert len(pinned) == len(copies) == 10
    assert all(k.get("non_blocking") is True for _, k in copies)


def test_batch_augment_makes_no_blocking_copies_after_the_first_batch(monkeypatch):
    aug = BatchAugment((8, 8), AugmentRecipe(jitter_p=1.0))
    torch.manual_seed(0)
    images = torch.empty(4, 3, 12, 12, dtype=torch.uint8, device="meta")
    masks = torch.empty(4, 12, 12, dtype=torch.uint8, device="meta")
    made = []
    original_tensor = torch.tensor

    def tensor(*args, **kwargs):
        made.append(kwargs.get("device"))
        return original_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    copies = count_copies_to(monkeypatch, "meta")
    aug(images, masks)  # the first batch may place the constants
    made.clear(), copies.clear()
    aug(images, masks)
    assert [d for d in made if d is not None and torch.device(d).type != "cpu"] == []
    assert copies and all(copies), copies  # only the batch's parameters, without blocking


# --------------------------------------------------------------------- issue 14 item 6


def test_trial_step_leaves_the_model_as_it_was(monkeypatch):
    torch.manual_seed(0)
    model = TinySegNet().train()
    train = ColourBlocks(8, seed=1)
    images, masks = train.images, train.masks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    # A stand-in for CUDA's memory statistics, to run the measuring branch on the CPU.
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: type("Properties", (), {"total_memory": 16 * 2**30}))
    info = trial_step(model, images, masks, lambda m, x, y: cross_entropy(m(x), y), measure_memory=True)
    assert info == {"parameters": sum(p.numel() for p in model.parameters()),
                    "trainable": sum(p.numel() for p in model.parameters()), "batch": 8, "input": (3, 16, 16),
                    "peak_bytes": 3 * 2**30, "device_bytes": 16 * 2**30}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert trial_step(model, images, masks, lambda m, x, y: cross_entropy(m(x), y))["peak_bytes"] is None


def test_fit_says_model_and_batch_size_before_training(tmp_path, capsys):
    fit(fresh_model(), *data(), fast_config(epochs=1), tmp_path / "run", progress=False)
    out = capsys.readouterr().out
    assert "model 922 parameters (922 trained); batch 8 of 3x16x16; on cpu, no trial step" in out
    assert out.index("no trial step") < out.index("epoch 1/1")
