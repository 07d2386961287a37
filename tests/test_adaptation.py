"""The confidence rule of domain adaptation (offroadseg.adaptation): measured on labelled images, then
chosen; and the BatchNorm statistics re-estimated on the new desert's images.

The adaptation cells themselves (images, held-out pairs, the adapted student, the verdict) are
tested in tests/test_chapters_new_desert.py."""

import numpy as np
import pytest
import torch
from helpers import make_small_dataset
from PIL import Image

from offroadseg import augment
from offroadseg.adaptation import (
    choose_threshold,
    confidence_table,
    main,
    recalibrate_batchnorm,
    recalibrate_checkpoint,
    split_test_images,
)
from offroadseg.checkpoints import load_checkpoint, load_model, save_checkpoint
from offroadseg.data import DataError, folder_pairs
from offroadseg.dataset import SegmentationDataset
from offroadseg.ensemble import Ensemble
from offroadseg.models import build_model

SIZE = (16, 24)


class FixedLogits(torch.nn.Module):
    """A 'teacher' whose logits are given: the confidence table's arithmetic can be checked by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so it has a device

    def forward(self, x):
        return self.logits[: len(x)]


def test_confidence_table_counts_kept_pixels_and_their_accuracy():
    # Four pixels: confidence ~0.99 right, ~0.99 wrong, ~0.5 right, ~0.5 (two classes tied) wrong; one ignored.
    logits = torch.full((1, 10, 1, 5), -20.0)
    logits[0, 1, 0, 0] = logits[0, 2, 0, 1] = 10.0
    logits[0, 3, 0, 2] = logits[0, 4, 0, 2] = logits[0, 5, 0, 3] = logits[0, 6, 0, 3] = 10.0
    logits[0, 3, 0, 2] += 1e-3  # the argmax of pixel 2 is 3, the truth
    logits[0, 0, 0, 4] = 10.0
    masks = torch.tensor([[[1, 3, 3, 3, 255]]])
    table = confidence_table(Ensemble([FixedLogits(logits)]), [(torch.zeros(1, 3, 1, 5), masks)],
                             levels=(0.9, 0.4), device="cpu")
    assert [row["threshold"] for row in table] == [0.4, 0.9]
    assert table[0] == {"threshold": 0.4, "kept": 1.0, "accuracy": 0.5}
    assert table[1] == {"threshold": 0.9, "kept": 0.5, "accuracy": 0.5}


def test_choose_threshold_takes_the_lowest_level_accurate_enough():
    table = [{"threshold": 0.5, "kept": 0.98, "accuracy": 0.90}, {"threshold": 0.7, "kept": 0.9, "accuracy": 0.955},
             {"threshold": 0.9, "kept": 0.7, "accuracy": 0.99}, {"threshold": 0.95, "kept": 0.0, "accuracy": None}]
    assert choose_threshold(table, min_accuracy=0.95) == 0.7
    assert choose_threshold(table, min_accuracy=0.98) == 0.9
    assert choose_threshold(table, min_accuracy=0.999) is None


def reddish_images(folder, count: int = 4):
    """Images of a 'new desert' whose colours differ from ImageNet's: red-heavy, little blue."""
    folder.mkdir(parents=True)
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        image = np.stack([rng.integers(150, 255, (20, 30)), rng.integers(60, 140, (20, 30)),
                          rng.integers(0, 40, (20, 30))], axis=-1).astype(np.uint8)
        paths.append(folder / f"new{index}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def test_recalibrated_batchnorm_holds_the_new_images_statistics_and_keeps_the_weights(tmp_path):
    images = reddish_images(tmp_path / "new")
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 2, 1))
    weights = {key: value.clone() for key, value in model.state_dict().items()
               if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert recalibrate_batchnorm(model, images, SIZE, batch_size=4, device="cpu") == 1
    pixels = torch.stack([x for x, _ in SegmentationDataset([(p, None) for p in images], augment.eval_transform(SIZE))])
    batchnorm = model[0]
    assert torch.allclose(batchnorm.running_mean, pixels.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(batchnorm.running_var, pixels.transpose(0, 1).flatten(1).var(dim=1), atol=1e-4)
    assert batchnorm.momentum == 0.1 and not model.training  # put back as it was, in eval mode
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())
    # Its output on the new images is now normalised: per channel about zero mean, unit variance.
    normalised = batchnorm(pixels)
    assert normalised.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert recalibrate_batchnorm(torch.nn.Conv2d(3, 2, 1), images, SIZE) == 0  # nothing to re-estimate


def test_a_recalibrated_checkpoint_keeps_its_weights_and_is_written_once(tmp_path):
    images = reddish_images(tmp_path / "new")
    torch.manual_seed(0)
    model = build_model("deeplabv3plus-resnet18", output_stride=32, aspp_channels=8, decoder_channels=8)
    path = tmp_path / "best.pt"
    # As the distilled student's checkpoint holds it: under the "student." prefix, beside other weights.
    state = {"student." + key: value for key, value in model.state_dict().items()}
    state["projections.0.weight"] = torch.ones(2)
    save_checkpoint({"spec": {**model.spec, "prefix": "student."}, "model": state}, path)
    before = load_model(path).state_dict()
    done = recalibrate_checkpoint(path, images, SIZE, batch_size=2, device="cpu")
    assert done["images"] == 4 and done["layers"] > 10
    after = load_model(path).state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(key.endswith(("running_mean", "running_var", "num_batches_tracked")) for key in changed)
    expected = load_model(path)
    expected.load_state_dict(before)
    recalibrate_batchnorm(expected, images, SIZE, batch_size=2, device="cpu")
    assert all(torch.allclose(value, after[key]) for key, value in expected.state_dict().items())
    checkpoint = load_checkpoint(path)
    assert checkpoint["batchnorm"] == done and torch.equal(checkpoint["model"]["projections.0.weight"], torch.ones(2))
    stamp = path.stat().st_mtime_ns
    assert recalibrate_checkpoint(path, images, SIZE, device="cpu") == done and path.stat().st_mtime_ns == stamp
    with pytest.raises(FileNotFoundError):
        recalibrate_checkpoint(tmp_path / "missing.pt", images, SIZE)


def test_the_test_images_split_into_adapt_holdout_and_scored_parts_that_never_overlap(tmp_path, capsys):
    make_small_dataset(tmp_path / "data", 1, 1, 10)
    test = tmp_path / "data" / "Offroad_Segmentation_testImages"
    assert main(["split", str(test), "--out", str(tmp_path / "parts"), "--adapt", "0.5", "--holdout", "0.2"]) == 0
    assert "5 images to adapt on" in capsys.readouterr().out
    assert main(["split", str(test), "--out", str(tmp_path / "parts")]) == 2  # not again into the same folder
    assert "is not empty: give another --out" in capsys.readouterr().err
    adapt = {path.stem for path, _ in folder_pairs(tmp_path / "parts" / "adapt")}
    holdout = folder_pairs(tmp_path / "parts" / "holdout")
    assert len(adapt) == 5 and len(holdout) == 2 and all(mask is not None for _, mask in holdout)
    assert not (tmp_path / "parts" / "adapt" / "Segmentation").exists()  # adapted on without masks
    assert not adapt & {path.stem for path, _ in holdout}
    assert {path.stem for path, _ in folder_pairs(test)} >= adapt  # the test folder itself is left whole
    # Seeded: the same split again (into a new folder); another seed, another split. A full folder is refused.
    assert split_test_images(test, tmp_path / "again", 0.5, 0.2) == {"adapt": 5, "holdout": 2, "scored": 3}
    assert {path.stem for path, _ in folder_pairs(tmp_path / "again" / "adapt")} == adapt
    split_test_images(test, tmp_path / "other", 0.5, 0.2, seed=1)
    assert {path.stem for path, _ in folder_pairs(tmp_path / "other" / "adapt")} != adapt
    with pytest.raises(DataError, match="not empty"):
        split_test_images(test, tmp_path / "parts", 0.5, 0.2)
    with pytest.raises(ValueError, match="together below 1"):
        split_test_images(test, tmp_path / "bad", 0.7, 0.3)
    with pytest.raises(DataError, match="needs its mask"):
        split_test_images(tmp_path / "parts" / "adapt", tmp_path / "bad", 0.5, 0.2)
