"""Decoder pruning: exact fractions per layer, folding into plain weights, and through fit/resume."""

from __future__ import annotations

import pytest
import torch
from test_engine import TinySegNet, counting_step_loss, data, fast_config, fresh_model
from torch import nn

from offroadseg.checkpoints import load_checkpoint
from offroadseg.engine import fit
from offroadseg.pruning import folded_state_dict, prunable_layers, prune_decoder, remove_pruning

AMOUNT = 0.2



def pruned_fraction(module: nn.Module) -> float:
    """Fraction of exactly-zero weights over the conv/linear layers inside `module`.

    Reads the effective weights (orig * mask for layers pruned with a mask), so it gives the
    same answer during training and after the pruning was folded.
    """
    zeros = total = 0
    for _, layer in prunable_layers(module):
        if hasattr(layer, "weight_orig"):
            weight = layer.weight_orig * layer.weight_mask
        else:
            weight = layer.weight
        zeros += int((weight == 0).sum())
        total += weight.numel()
    if total == 0:
        raise ValueError(f"{type(module).__name__} has no conv or linear weights")
    return zeros / total



def zero_masks(state: dict, prefix: str = "decoder.") -> dict:
    """{key: weight == 0} for the conv weights under `prefix` of a (folded) state dict."""
    return {key: value == 0 for key, value in state.items() if key.startswith(prefix) and value.ndim == 4}


def assert_pruned_by(state: dict, amount: float):
    masks = zero_masks(state)
    assert len(masks) == 2
    for key, zeros in masks.items():
        assert abs(int(zeros.sum()) - amount * zeros.numel()) <= 1, key


def test_prune_decoder_prunes_each_layer_by_the_amount():
    model = fresh_model()
    assert prune_decoder(model, AMOUNT) == 2
    for _, layer in prunable_layers(model.decoder):
        weight = layer.weight_orig * layer.weight_mask
        assert int((weight == 0).sum()) == round(AMOUNT * weight.numel())
        # L1: every pruned weight was no larger than every kept one.
        kept, pruned = layer.weight_orig[layer.weight_mask == 1].abs(), layer.weight_orig[layer.weight_mask == 0].abs()
        assert pruned.max() <= kept.min()
    assert pruned_fraction(model.decoder) == pytest.approx(AMOUNT, abs=1 / (16 * 16 + 16 * 10))
    assert pruned_fraction(model.encoder) == 0.0  # the encoder is left alone


def test_pruning_twice_keeps_the_same_zeros():
    model = fresh_model()
    prune_decoder(model, AMOUNT)
    before = {name: layer.weight_mask.clone() for name, layer in prunable_layers(model.decoder)}
    prune_decoder(model, AMOUNT)
    for name, layer in prunable_layers(model.decoder):
        assert torch.equal(layer.weight_mask, before[name])
    assert pruned_fraction(model.decoder) == pytest.approx(AMOUNT, abs=0.01)


def test_folded_state_dict_loads_into_a_fresh_model_with_the_same_outputs():
    model = fresh_model()
    prune_decoder(model, AMOUNT)
    # Train a little with the mask on: pruned weights stay zero, the others move.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train = data()[0]
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train.images[:8]), train.masks[:8], ignore_index=255).backward()
        optimizer.step()
    folded = folded_state_dict(model)
    assert not any(key.endswith(("_orig", "_mask")) for key in folded)
    assert all(value.device.type == "cpu" for value in folded.values())
    assert_pruned_by(folded, AMOUNT)

    fresh = TinySegNet()
    fresh.load_state_dict(folded)  # strict: exactly the keys of an unpruned model
    x = train.images[:4]
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-6)
    assert pruned_fraction(fresh.decoder) == pytest.approx(pruned_fraction(model.decoder))


def test_remove_pruning_makes_it_permanent():
    model = fresh_model()
    prune_decoder(model, AMOUNT)
    remove_pruning(model)
    names = dict(model.named_parameters())
    assert "decoder.0.weight" in names and not any(name.endswith("_orig") for name in names)
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    assert pruned_fraction(model.decoder) == pytest.approx(AMOUNT, abs=0.01)


def test_pruning_needs_a_decoder_and_a_sane_amount():
    with pytest.raises(AttributeError, match="decoder"):
        prune_decoder(nn.Sequential(nn.Conv2d(3, 4, 1)), AMOUNT)
    with pytest.raises(ValueError, match="amount"):
        prune_decoder(fresh_model(), 1.5)


def test_fit_with_pruning_saves_permanent_zeros_and_resumes_with_the_same_mask(tmp_path):
    train, val = data()
    config = fast_config(epochs=3, prune_decoder=AMOUNT)
    steps_per_epoch = len(train) // config.batch_size

    # Uninterrupted 3 epochs, and a run stopped in epoch 3 then resumed.
    model = fresh_model()
    fit(model, train, val, config, tmp_path / "straight", step_loss=counting_step_loss(), progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(fresh_model(), train, val, config, tmp_path / "stopped",
            step_loss=counting_step_loss(crash_at=2 * steps_per_epoch + 1), progress=False)
    epoch2 = load_checkpoint(tmp_path / "stopped" / "last.pt")["model"]
    fit(fresh_model(), train, val, config, tmp_path / "stopped", step_loss=counting_step_loss(), progress=False)

    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(tmp_path / "straight" / name)["model"]
        assert not any(key.endswith(("_orig", "_mask")) for key in state)
        fresh = TinySegNet()
        fresh.load_state_dict(state)
        assert_pruned_by(fresh.state_dict(), AMOUNT)
        assert pruned_fraction(fresh.encoder) < 0.01  # only the decoder is pruned
    # fit hands back a plain model, pruning made permanent.
    assert not any(name.endswith("_orig") for name, _ in model.named_parameters())
    assert_pruned_by(folded_state_dict(model), AMOUNT)

    # The resumed run re-derived the same mask from the saved zeros and ended where the
    # uninterrupted one did.
    resumed = load_checkpoint(tmp_path / "stopped" / "last.pt")["model"]
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    for key, zeros in zero_masks(epoch2).items():
        assert torch.equal(zero_masks(resumed)[key], zeros), key
        assert not torch.equal(resumed[key], epoch2[key])  # the kept weights went on training
    for key in straight:
        assert torch.allclose(resumed[key].float(), straight[key].float(), rtol=1e-5, atol=1e-6), key
