"""Ensemble averaging, batched test-time augmentation, the one-pass weight search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from predictors import LabelReader, labelled_loader
from torch import nn

from offroadseg.ensemble import Ensemble, TestTimeAugmentation, choose_weight, tta_probs

# Tiny tensors: one torch thread (the shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def conv_model(kernel_size: int = 1, seed: int = 0) -> nn.Module:
    """Logits from one conv: a 1x1 conv commutes with flips, a 3x3 one with random weights does not."""
    torch.manual_seed(seed)
    return nn.Conv2d(3, 10, kernel_size, padding=kernel_size // 2)


class NotFlipEquivariant(nn.Module):
    """A 3x3 conv plus a left-to-right ramp on class 0: flipping the input changes the answer."""

    def __init__(self):
        super().__init__()
        self.conv = conv_model(3, seed=1)

    def forward(self, x):
        logits = self.conv(x)
        ramp = torch.linspace(-2, 2, x.shape[-1], device=x.device)
        return logits + F.pad(ramp.expand(x.shape[0], 1, *x.shape[-2:]), (0, 0, 0, 0, 0, 9))


class CallCounter(nn.Module):
    """Wraps a model and records the batch size of every call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.model(x)


def image_batch(n: int = 2, h: int = 8, w: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- ensemble


def test_ensemble_is_the_weighted_average_of_softmaxes():
    a, b, x = conv_model(seed=0), conv_model(seed=1), image_batch()
    expected = 0.3 * a(x).softmax(1) + 0.7 * b(x).softmax(1)
    with torch.no_grad():
        assert torch.allclose(Ensemble([a, b], [0.3, 0.7])(x), expected.detach(), atol=1e-6)
        # Weights are normalised: (3, 7) is (0.3, 0.7).
        assert torch.allclose(Ensemble([a, b], [3, 7])(x), expected.detach(), atol=1e-6)
        # At a temperature: the average of softmax(z / T), not softmax of the averaged logits.
        hot = Ensemble([a, b], [0.3, 0.7]).probs(x, temperature=4.0)
        assert torch.allclose(hot, 0.3 * (a(x) / 4).softmax(1) + 0.7 * (b(x) / 4).softmax(1), atol=1e-6)
        assert not torch.allclose(hot, expected, atol=1e-3)


def test_ensemble_of_a_model_with_itself_is_its_softmax():
    model, x = conv_model(3), image_batch()
    with torch.no_grad():
        probs = Ensemble([model, model])(x)
        assert torch.allclose(probs, model(x).softmax(1), atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(()), atol=1e-5)


def test_ensemble_members_stay_frozen_and_in_eval_mode():
    member = nn.Sequential(nn.Conv2d(3, 10, 1), nn.Dropout(0.5))
    ensemble = Ensemble([member]).train()
    assert ensemble.training and not member.training
    assert not any(p.requires_grad for p in ensemble.parameters())
    x = image_batch()
    assert torch.equal(ensemble(x), ensemble(x))  # dropout off: deterministic
    with pytest.raises(ValueError):
        Ensemble([member], [0.5, 0.5])
    with pytest.raises(ValueError):
        Ensemble([member, member], [1.0, -1.0])


# ---------------------------------------------------------------------------------- TTA


def test_tta_of_a_flip_equivariant_model_is_its_plain_output():
    model, x = conv_model(1), image_batch()
    with torch.no_grad():
        assert torch.allclose(tta_probs(model, x, flips=("h", "v", "hv")), model(x).softmax(1), atol=1e-6)


def test_tta_averages_the_unflipped_outputs_in_one_batched_call():
    model, x = CallCounter(NotFlipEquivariant()), image_batch(n=2)
    with torch.no_grad():
        result = tta_probs(model, x, flips=("h", "v"))
        f = model.model
        expected = (f(x).softmax(1) + f(x.flip(-1)).softmax(1).flip(-1) + f(x.flip(-2)).softmax(1).flip(-2)) / 3
    assert model.batches == [6]  # one call on the 3 views x 2 images (the check above calls f directly)
    assert torch.allclose(result, expected, atol=1e-6)
    assert not torch.allclose(result, f(x).softmax(1).detach(), atol=1e-3)  # TTA did change something


def test_tta_with_scales_makes_one_call_per_scale():
    model, x = CallCounter(NotFlipEquivariant()), image_batch(n=2, h=8, w=12)
    with torch.no_grad():
        result = tta_probs(model, x, flips=(), scales=(0.5, 1.0))
        f = model.model
        small = F.interpolate(x, size=(4, 6), mode="bilinear", align_corners=False)
        back = F.interpolate(f(small), size=(8, 12), mode="bilinear", align_corners=False)
        expected = (back.softmax(1) + f(x).softmax(1)) / 2
    assert model.batches == [2, 2]
    assert torch.allclose(result, expected, atol=1e-6)

    model.batches.clear()
    with torch.no_grad():
        tta_probs(model, x, flips=("h", "v", "hv"), scales=(0.75, 1.0, 1.25))
    assert model.batches == [8, 8, 8]
    with pytest.raises(ValueError):
        tta_probs(model, x, flips=("diagonal",))


def test_tta_of_an_ensemble_averages_its_probabilities_without_a_second_softmax():
    ensemble = Ensemble([conv_model(1, seed=0), conv_model(1, seed=1)])
    x = image_batch()
    with torch.no_grad():
        assert torch.allclose(TestTimeAugmentation(ensemble, flips=("h", "v"))(x), ensemble(x), atol=1e-6)


# ------------------------------------------------------------------ weight search


def test_choose_weight_picks_the_perfect_member_in_one_pass():
    # a is right but barely confident, b confidently wrong: only w = 1 (all a) gets everything right.
    a, b = CallCounter(LabelReader(shift=0, scale=0.1)), CallCounter(LabelReader(shift=1, scale=10.0))
    loader = labelled_loader(batches=3)
    best, table = choose_weight(a, b, loader, device="cpu")
    assert best == 1.0
    assert len(a.batches) == len(b.batches) == 3  # one pass over the loader
    assert [row["weight"] for row in table] == pytest.approx([i / 10 for i in range(11)])
    assert table[-1]["miou"] == pytest.approx(1.0) and table[0]["miou"] == pytest.approx(0.0)
    assert table[-2]["miou"] < 1.0  # w = 0.9 is already dragged off by b

    best, table = choose_weight(b, a, loader, device="cpu")
    assert best == 0.0 and table[0]["miou"] == pytest.approx(1.0)


def test_choose_weight_breaks_ties_towards_an_even_blend():
    perfect = LabelReader(shift=0, scale=5.0)
    best, table = choose_weight(perfect, perfect, labelled_loader(), grid=[0.0, 0.2, 0.6, 1.0], device="cpu")
    assert all(row["miou"] == pytest.approx(1.0) for row in table)
    assert best == 0.6


# ------------------------------------------------------------------ slide inference


@pytest.mark.parametrize("length, window, overlap", [(540, 160, 1 / 3), (960, 288, 0.5), (100, 100, 0.2), (50, 64, 0.0),
                                                     (513, 512, 0.25)])
def test_windows_cover_every_pixel_overlap_as_asked_and_end_flush(length, window, overlap):
    from offroadseg.ensemble import window_starts

    starts = window_starts(length, window, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    covered = np.zeros(max(length, window), dtype=int)
    for start in starts:
        covered[start:start + window] += 1
    assert (covered[:length] >= 1).all()
    if length > window:
        assert starts[-1] == length - window  # the last window flush with the end, none beyond it
        assert all(b - a <= window * (1 - overlap) + 1e-9 for a, b in zip(starts, starts[1:]))  # at least that overlap


def test_bad_overlaps_and_scales_are_refused():
    from offroadseg.ensemble import SlidingWindow, window_starts

    for overlap in (-0.1, 1.0):
        with pytest.raises(ValueError, match="overlap"):
            window_starts(10, 4, overlap)
    with pytest.raises(ValueError, match="scale"):
        SlidingWindow(nn.Identity(), (4, 4), scale=0)


def test_slide_gives_a_pointwise_model_its_whole_frame_probabilities_whatever_the_windows():
    """A 1x1-conv model sees each pixel alone, so averaging the windows' probabilities over the
    windows covering each pixel must give exactly the whole frame's: the weights are right and no
    pixel is missed, with overlaps, an uneven last window and a frame smaller than the window."""
    from offroadseg.ensemble import SlidingWindow

    torch.manual_seed(0)
    model = nn.Conv2d(3, 10, 1)
    for height, width, window, overlap in ((54, 96, (16, 28), 1 / 3), (54, 96, (20, 20), 0.0), (10, 12, (16, 28), 0.5)):
        x = torch.randn(2, 3, height, width)
        slid = SlidingWindow(model, window, overlap, batch=3)(x)
        assert slid.shape == (2, 10, height, width)
        assert torch.allclose(slid, model(x).softmax(dim=1), atol=1e-6)
    # scale: the frame is resized first and the probabilities back: a pointwise model gives the resized frame's.
    x = torch.randn(1, 3, 40, 60)
    half = SlidingWindow(model, (16, 16), 0.25, scale=0.5)(x)
    expected = F.interpolate(model(F.interpolate(x, size=(20, 30), mode="bilinear", align_corners=False)).softmax(1),
                             size=(40, 60), mode="bilinear", align_corners=False)
    assert torch.allclose(half, expected, atol=1e-6)


def test_predict_labels_slides_frames_at_their_own_size():
    from offroadseg.evaluate import predict_labels

    torch.manual_seed(0)
    model = nn.Conv2d(3, 10, 1)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (30, 50, 3), dtype=np.uint8), rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)]
    slid = predict_labels(model, frames, input_size=(16, 16), slide=0.25)
    assert [labels.shape for labels in slid] == [(30, 50), (24, 40)]
    # pointwise: the same labels as the whole frame normalised at its own size (no resize at all)
    whole = [predict_labels(model, [frame], input_size=frame.shape[:2])[0] for frame in frames]
    assert all(np.array_equal(a, b) for a, b in zip(slid, whole))
    with pytest.raises(ValueError, match="input_size"):
        predict_labels(model, frames, slide=0.25)
