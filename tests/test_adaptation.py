"""The confidence rule of domain adaptation (offroadseg.adaptation): measured on labelled images, then chosen.

The adaptation cells themselves (images, held-out pairs, the adapted student, the verdict) are
tested with the rest of the notebooks' glue in tests/test_training.py."""

import torch

from offroadseg.adaptation import choose_threshold, confidence_table
from offroadseg.ensemble import Ensemble


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
