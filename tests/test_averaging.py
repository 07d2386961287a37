"""Averaged weights: the EMA fit keeps beside the raw weights, and a finished run's last epochs averaged."""

import pytest
import torch
from helpers import assert_names
from test_engine import assert_same_history, assert_same_weights, counting_step_loss, data, fast_config, fresh_model
from torch.utils.data import DataLoader

from offroadseg.averaging import WeightEMA, average_checkpoints, kept_epochs
from offroadseg.checkpoints import load_checkpoint, save_checkpoint
from offroadseg.engine import fit
from offroadseg.evaluate import evaluate_model
from offroadseg.files import read_json
from offroadseg.losses import cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_ema_step_is_torchs_formula_for_weights_and_buffers():
    model = fresh_model()
    ema = WeightEMA(model, decay=0.9)
    expected = {key: value.clone().double() for key, value in model.state_dict().items()}
    for step in range(3):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.1 * (step + 1))
            model.encoder[1].running_mean.add_(1.0)  # BatchNorm's statistics move with training too
        ema.update(model)
        for key, value in model.state_dict().items():
            if value.is_floating_point():  # the first update copies, then w <- 0.9 w + 0.1 w_model
                expected[key] = value.double() if step == 0 else 0.9 * expected[key] + 0.1 * value.double()
    averaged = ema.module.state_dict()
    for key, value in expected.items():
        if value.is_floating_point():
            assert torch.allclose(averaged[key].double(), value, atol=1e-6), key
    assert ema.module is not model and not ema.module.training
    with pytest.raises(ValueError) as error:
        WeightEMA(model, decay=1.0)
    assert_names(error, "ema decay", "0.999")


def ascent_after(steps: int):
    """Cross-entropy for the first `steps` calls, then its negative: gradient ascent that spoils the raw
    weights fast, while their moving average still holds much of the good ones."""
    calls = {"n": 0}

    def step_loss(model, images, masks):
        calls["n"] += 1
        loss = cross_entropy(model(images), masks)
        return loss if calls["n"] <= steps else -loss

    return step_loss


def scores_of(weights: dict, val) -> float:
    model = fresh_model()
    model.load_state_dict(weights)
    return evaluate_model(model, DataLoader(val, batch_size=8), device="cpu")["miou"]


def test_fit_validates_both_weights_and_best_pt_holds_the_better_saying_which(tmp_path):
    train, val = data()
    out = tmp_path / "run"
    # 4 steps an epoch: epochs 1-2 learn, epoch 3 climbs the loss; the average of epoch 3 keeps the learnt weights.
    history = fit(fresh_model(), train, val, fast_config(epochs=3, ema=0.7, min_lr_ratio=1.0), out, progress=False,
                  step_loss=ascent_after(8))
    for row in history:
        assert row["weights"] in ("ema", "raw") and row["val_miou"] == max(row["raw_val_miou"], row["ema_val_miou"])
    assert history[-1]["weights"] == "ema" and history[-1]["ema_val_miou"] > history[-1]["raw_val_miou"]
    best = load_checkpoint(out / "best.pt")
    row = history[best["epoch"] - 1]
    assert best["epoch"] == history[-1]["best_epoch"] and best["weights"] == row["weights"]
    assert scores_of(best["model"], val) == pytest.approx(row["val_miou"])  # best.pt holds what the row scored
    last = load_checkpoint(out / "last.pt")
    assert last["weights"] == "raw" and scores_of(last["model"], val) == pytest.approx(history[-1]["raw_val_miou"])
    average = {key[len("module."):]: value for key, value in last["ema"].items() if key.startswith("module.")}
    assert scores_of(average, val) == pytest.approx(history[-1]["ema_val_miou"])  # resuming needs both


def test_a_resumed_run_goes_on_with_its_average(tmp_path):
    train, val = data()
    straight = fit(fresh_model(), train, val, fast_config(epochs=2, ema=0.9), tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(fresh_model(), train, val, fast_config(epochs=2, ema=0.9), tmp_path / "resumed", progress=False,
            step_loss=counting_step_loss(crash_at=6))  # 4 steps an epoch: stops in epoch 2
    resumed = fit(fresh_model(), train, val, fast_config(epochs=2, ema=0.9), tmp_path / "resumed", progress=False)
    assert_same_history(straight, resumed)
    assert_same_weights(load_checkpoint(tmp_path / "straight" / "last.pt")["ema"],
                        load_checkpoint(tmp_path / "resumed" / "last.pt")["ema"])


def test_the_last_epochs_are_kept_and_averaged_into_a_checkpoint_load_model_reads(tmp_path):
    train, val = data()
    out = tmp_path / "run"
    fit(fresh_model(), train, val, fast_config(epochs=3, keep_epochs=2), out, progress=False)
    kept = kept_epochs(out)
    assert [path.name for path in kept] == ["epoch_002.pt", "epoch_003.pt"]
    record = average_checkpoints(kept, tmp_path / "avg" / "best.pt")
    assert record["epochs"] == [2, 3]
    a, b = (load_checkpoint(path)["model"] for path in kept)
    averaged = load_checkpoint(tmp_path / "avg" / "best.pt")["model"]
    for key, value in averaged.items():
        expected = (a[key].double() + b[key].double()) / 2 if value.is_floating_point() else b[key]
        assert torch.allclose(value.double(), expected.double(), atol=1e-6), key
    assert read_json(out / "history.json")[-1]["epoch"] == 3


def test_averaging_refuses_one_checkpoint_or_two_models(tmp_path):
    save_checkpoint({"model": fresh_model().state_dict(), "spec": None}, tmp_path / "a.pt")
    save_checkpoint({"model": fresh_model(width=8).state_dict(), "spec": None}, tmp_path / "b.pt")
    with pytest.raises(ValueError) as error:
        average_checkpoints([tmp_path / "a.pt"], tmp_path / "out.pt")
    assert_names(error, "at least 2")
    with pytest.raises(ValueError) as error:
        average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "out.pt")
    assert_names(error, "a.pt", "b.pt", "not checkpoints of one model")
