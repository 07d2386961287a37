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

from offroadseg import engine, train_step
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
    assert engine.make_accelerator("fp32").non_blocking is True


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

    def make_accelerator(precision, *tracking):
        accelerator = original(precision, *tracking)
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


def fp16_stand_in_at(monkeypatch, init_scale: float):
    """fp16_stand_in with a grad scaler that starts at `init_scale`."""
    original = engine.make_accelerator

    def make_accelerator(precision, *tracking):
        accelerator = original(precision, *tracking)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        return accelerator

    monkeypatch.setattr(engine, "make_accelerator", make_accelerator)


def test_fp16_overflows_while_the_scaler_calibrates_do_not_stop_training(tmp_path, monkeypatch, capsys):
    # Issue 21 item 7: a model whose gradients need more halvings of the starting scale than
    # max_bad_steps (here 3) used to raise TrainingDiverged in its first steps on a T4. The stand-in:
    # a loss x 2**20 under a scaler that starts at 2**120, so the scaled gradients overflow fp32
    # until the scaler has halved the scale about a dozen times; afterwards every step applies.
    fp16_stand_in_at(monkeypatch, 2.0**120)

    def step_loss(model, images, masks):
        return cross_entropy(model(images), masks) * 2.0**20

    model = fresh_model()
    history = fit(model, *data(), fast_config(epochs=4, max_bad_steps=3), tmp_path / "run", step_loss=step_loss,
                  progress=False)
    skipped = sum(row["skipped_steps"] for row in history)
    assert 3 < skipped < 16  # more overflows in a row than max_bad_steps, no stop, then applied steps
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["scaler"]["scale"] == 2.0**120 / 2**skipped  # halved once per overflow
    assert last["optimizer"]["state"][0]["step"] == 16 - skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "fp16 overflows while the grad scaler calibrated" in capsys.readouterr().out


def test_fp16_overflows_at_a_collapsed_scale_stop_training_with_advice(tmp_path, monkeypatch):
    # Gradients non-finite whatever the scale (sqrt at 0: a finite loss, NaN gradients): the scale
    # falls 4 -> 2 -> 1 (calibration, no fault), then below 1, where each overflow counts.
    fp16_stand_in_at(monkeypatch, 4.0)
    calls = {"n": 0}

    def step_loss(model, images, masks):
        calls["n"] += 1
        logits = model(images)
        return cross_entropy(logits, masks) + 0 * (logits - logits.detach()).abs().sum().sqrt()

    with pytest.warns(RuntimeWarning, match="fp16 overflow at a grad scale below 1"):
        with pytest.raises(TrainingDiverged,
                           match=r"3 steps in a row \(up to epoch 2 step 2\).*grad scale below 1.*"
                                 r"'fp32' or 'bf16' rather than 'fp16'"):
            fit(fresh_model(), *data(), fast_config(epochs=3, max_bad_steps=3), tmp_path / "run",
                step_loss=step_loss, progress=False)
    assert calls["n"] == 6  # 3 calibrating (scales 4, 2, 1), then 3 at 0.5, 0.25, 0.125


def test_fp16_overflows_are_counted_as_skipped_steps(tmp_path, monkeypatch):
    fp16_stand_in(monkeypatch)
    model = fresh_model()
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


@pytest.mark.slow
def test_each_process_draws_its_own_augmentation(tmp_path, monkeypatch):
    rank0 = augmentation_draws(tmp_path, monkeypatch, 0, "rank0")
    rank1 = augmentation_draws(tmp_path, monkeypatch, 1, "rank1")
    rank0_again = augmentation_draws(tmp_path, monkeypatch, 0, "rank0_again")
    assert not torch.equal(rank0[0], rank1[0])  # BatchAugment's crops, angles, flips, hues
    # A per-sample draw comes from the sample's seed: a loader worker's draws are the same for the same
    # positions of the order; under DDP each process gets other positions (test_sampling shows it).
    assert rank0[1] == rank1[1]
    assert torch.equal(rank0[0], rank0_again[0]) and rank0[1] == rank0_again[1]  # and yet reproducible


# --------------------------------------------------------------------- issue 13 defect 8


def test_training_backends_on_cuda_only_and_restored_after_fit_even_when_it_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.set_float32_matmul_precision("highest")
    with engine.training_backends(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark is False and torch.get_float32_matmul_precision() == "highest"
    with engine.training_backends(torch.device("cuda")):
        assert torch.backends.cudnn.benchmark is True and torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cudnn.benchmark is False and torch.get_float32_matmul_precision() == "highest"

    seen, during = [], []
    original = engine.training_backends

    def as_on_cuda(device):  # fit's device, answered as if it were a GPU
        seen.append(device)
        return original(torch.device("cuda"))

    def step_loss(model, images, masks):
        during.append((torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()))
        if len(during) == 3:
            raise RuntimeError("planted failure in a step")
        return cross_entropy(model(images), masks)

    monkeypatch.setattr(engine, "training_backends", as_on_cuda)
    model = fresh_model()
    with pytest.raises(RuntimeError, match="planted failure"):
        fit(model, *data(), fast_config(epochs=1, prune_decoder=0.5), tmp_path / "run", step_loss=step_loss,
            progress=False)
    assert [d.type for d in seen] == ["cpu"] and set(during) == {(True, "high")}
    # An exception inside fit leaves torch's global flags as they were, and the model unpruned.
    assert torch.backends.cudnn.benchmark is False and torch.get_float32_matmul_precision() == "highest"
    assert not any(name.endswith("_orig") for name, _ in model.named_parameters())


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


# --------------------------------------------------------------------- issue 21 items 9 and 10


def test_channels_last_only_where_the_gpu_has_tensor_cores_and_the_choice_is_recorded(tmp_path, monkeypatch):
    config = fast_config()
    cuda = torch.device("cuda")
    assert train_step.memory_format(config, torch.device("cpu")) == torch.contiguous_format
    monkeypatch.setattr(train_step, "tensor_cores", lambda device: False)  # a P100
    assert train_step.memory_format(config, cuda) == torch.contiguous_format
    monkeypatch.setattr(train_step, "tensor_cores", lambda device: True)  # a T4, an H100
    assert train_step.memory_format(config, cuda) == torch.channels_last
    assert train_step.memory_format(fast_config(channels_last=False), cuda) == torch.contiguous_format
    monkeypatch.undo()
    history = fit(fresh_model(), *data(), fast_config(epochs=1, num_workers=1), tmp_path / "run", progress=False)
    backend = history[0]["backend"]
    assert backend["device"] == "cpu" and backend["precision"] == "fp32" and backend["channels_last"] is False
    assert backend["loader_workers"] == 1 and backend["persistent_workers"] is True and backend["processes"] == 1


def test_precision_is_decided_once_on_this_processs_own_device(monkeypatch):
    # Under DDP each process asks its own GPU, after accelerate has set it, not "the current one".
    asked = []
    original = train_step.resolve_precision

    def resolve_precision(precision, device=None):
        asked.append((precision, device))
        return original(precision, device)

    monkeypatch.setattr(train_step, "resolve_precision", resolve_precision)
    accelerator = train_step.make_accelerator("auto")
    assert asked == [("auto", accelerator.device)] and accelerator.mixed_precision == "no"


def test_a_skipped_step_leaves_the_fused_adamw_as_it_was():
    # Pins the one use of a private input (train_step.step_unless): the fused kernel's found_inf.
    from offroadseg.train_step import step_unless

    model = fresh_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    step_unless(optimizer, torch.tensor(False))  # applied: the parameters move, the step counts
    applied = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in optimizer.state.items()}
    step_unless(optimizer, torch.tensor(True))  # skipped: nothing moves
    assert all(torch.equal(p, applied[name]) for name, p in model.named_parameters())
    for key, saved in state.items():
        assert all(torch.equal(optimizer.state[key][n], v) for n, v in saved.items())
    assert not hasattr(optimizer, "found_inf")


# --------------------------------------------------------------------- issue 22: one seeding mechanism


@pytest.mark.slow
def test_a_resumed_run_draws_what_an_uninterrupted_one_draws(tmp_path):
    # Both kinds of draw: per sample (made in a loader worker, from the sample's seed) and per batch
    # (BatchAugment on the device, from the global generator seeded at the epoch's start).
    sampler = BatchAugment((16, 16))

    def recorder(stop_after=None):
        draws = []

        def batch_transform(images, masks):
            if len(images) != 4:  # fit's size line before training, on one sample
                return images, masks
            if stop_after is not None and len(draws) == stop_after:
                raise KeyboardInterrupt  # killed in the middle of epoch 2
            params = sampler.sample(len(images), 16, 16)
            draws.append((images[:, 0, 0, 0].tolist(), params.angle.tolist(), params.box.flatten().tolist()))
            return images, masks

        return draws, batch_transform

    config = fast_config(epochs=3, batch_size=4, num_workers=1)  # one persistent worker
    straight, transform = recorder()
    fit(fresh_model(), WorkerDraws(16), ColourBlocks(4, seed=2), config, tmp_path / "straight",
        batch_transform=transform, progress=False)
    assert len(straight) == 12  # 4 steps an epoch
    _, transform = recorder(stop_after=6)
    with pytest.raises(KeyboardInterrupt):
        fit(fresh_model(), WorkerDraws(16), ColourBlocks(4, seed=2), config, tmp_path / "stopped",
            batch_transform=transform, progress=False)
    resumed, transform = recorder()
    fit(fresh_model(), WorkerDraws(16), ColourBlocks(4, seed=2), config, tmp_path / "stopped",
        batch_transform=transform, progress=False)
    assert resumed == straight[4:]  # epochs 2 and 3, draw for draw
