"""Trackers: fit's epochs logged live through accelerate (TensorBoard here), history.json still the record."""

import pytest
import torch
from helpers import assert_names
from test_engine import data, fast_config, fresh_model

from offroadseg import tracking
from offroadseg.classes import CLASS_NAMES
from offroadseg.engine import fit
from offroadseg.tracking import check_trackers, epoch_scalars, hyperparameters

pytestmark = pytest.mark.usefixtures("one_thread")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="the tracking extra (pip install tensorboard)")


def logged(folder) -> dict:
    """{tag: [(step, value), ...]} of every TensorBoard event file under `folder` (resumed runs add files)."""
    values: dict = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        events = event_accumulator.EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            values.setdefault(tag, []).extend((event.step, event.value) for event in events.Scalars(tag))
    return values


def test_each_epoch_is_logged_with_the_history_values_and_a_resume_goes_on(tmp_path):
    train, val = data()
    out = tmp_path / "models" / "tiny"
    history = fit(fresh_model(), train, val, fast_config(epochs=2), out, progress=False, track=("tensorboard",))
    curves = logged(out / "tracking")
    for key in ("train_loss", "val_loss", "val_miou", "val_pixel_acc", "lr"):
        assert curves[key] == [(row["epoch"], pytest.approx(row[key], rel=1e-6)) for row in history], key
    first_class = [name for name, iou in zip(CLASS_NAMES, history[0]["per_class_iou"]) if iou is not None][0]
    assert curves[f"val_iou/{first_class}"][0][1] == pytest.approx(history[0]["per_class_iou"][CLASS_NAMES.index(first_class)])
    assert list((out / "tracking" / "tiny").rglob("hparams.yml"))  # the training settings, told once
    # A resumed run with more epochs logs the new epoch after the old ones.
    longer = fit(fresh_model(), train, val, fast_config(epochs=3), out, progress=False, track=("tensorboard",))
    assert [step for step, _ in logged(out / "tracking")["val_miou"]] == [1, 2, 3]
    assert logged(out / "tracking")["val_miou"][-1][1] == pytest.approx(longer[-1]["val_miou"], rel=1e-6)


def test_without_track_nothing_is_written_beside_the_checkpoints(tmp_path):
    train, val = data(n_train=8, n_val=4)
    fit(fresh_model(), train, val, fast_config(epochs=1), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "tracking").exists()


def test_tracker_names_are_checked_and_all_means_every_installed_one(monkeypatch):
    assert check_trackers(["TensorBoard", "tensorboard"]) == ("tensorboard",)
    assert check_trackers([]) == ()
    assert "tensorboard" in check_trackers(["all"])
    with pytest.raises(ValueError) as error:
        check_trackers(["tensorbored"])
    assert_names(error, "--track tensorbored", "tensorboard", "wandb", "mlflow")
    monkeypatch.setattr(tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError) as error:
        check_trackers(["comet_ml"])
    assert_names(error, "--track comet_ml", "pip install comet-ml")
    with pytest.raises(ValueError) as error:
        check_trackers(["all"])
    assert_names(error, "no tracker is installed", "pip install tensorboard")


def test_scalars_and_hyperparameters_are_what_trackers_take():
    row = {"epoch": 4, "train_loss": 0.5, "val_loss": 0.6, "val_miou": 0.4, "val_pixel_acc": 0.8, "lr": 1e-4,
           "images_per_s": 12.0, "skipped_steps": 0, "per_class_iou": [0.3, None] + [0.5] * 8, "seconds": 3.0}
    scalars = epoch_scalars(row)
    assert scalars["val_miou"] == 0.4 and scalars[f"val_iou/{CLASS_NAMES[0]}"] == 0.3
    assert f"val_iou/{CLASS_NAMES[1]}" not in scalars and "seconds" not in scalars and "epoch" not in scalars
    assert hyperparameters({"lr": 0.1, "channels_last": None, "size": (2, 3), "compile": False}) == {
        "lr": 0.1, "channels_last": "None", "size": "(2, 3)", "compile": False}


def test_fit_closes_its_trackers_but_leaves_the_process_group(tmp_path):
    """Not accelerate's end_training, which would also destroy the process group that the caller of fit
    (a training command that goes on to its next model) may still use."""
    torch.distributed.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        train, val = data(n_train=8, n_val=4)
        fit(fresh_model(), train, val, fast_config(epochs=1), tmp_path / "run", progress=False, track=("tensorboard",))
        assert torch.distributed.is_initialized()
        assert logged(tmp_path / "run" / "tracking")["val_miou"][0][0] == 1  # written out: the tracker was closed
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
