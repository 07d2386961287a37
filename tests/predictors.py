"""Tiny predictors with known answers and the labelled batches they read, shared by the ensemble
and evaluation tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LabelReader(nn.Module):
    """Reads the true class stored in channel 0 of the image and answers with a chosen confidence.

    `shift` 0 answers the truth, 1 the next class (always wrong); `scale` sets the logits' size.
    """

    def __init__(self, shift: int, scale: float):
        super().__init__()
        self.shift, self.scale = shift, scale

    def forward(self, x):
        label = (x[:, 0].round().long() + self.shift) % 10
        return self.scale * F.one_hot(label, 10).permute(0, 3, 1, 2).float()


def labelled_loader(batches: int = 3, n: int = 2, h: int = 6, w: int = 8):
    """(images, masks) batches whose image channel 0 holds the mask's class; one ignore pixel per image."""
    generator = torch.Generator().manual_seed(0)
    loader = []
    for _ in range(batches):
        masks = torch.randint(0, 10, (n, h, w), generator=generator)
        images = torch.randn(n, 3, h, w, generator=generator)
        images[:, 0] = masks.float()
        masks[:, 0, 0] = 255  # an ignore pixel in every image
        loader.append((images, masks))
    return loader
