"""Decoder pruning: L1 unstructured pruning of the decoder's conv and linear weights.

The reference report pruned 20% of the decoder weights of its models. We prune each
conv/linear layer of `model.decoder` by that fraction of its smallest-magnitude weights
(per layer, so no layer is emptied) with torch.nn.utils.prune, at the start of training.

How the pieces fit:
- While training, torch keeps the pruning as a mask: the layer holds `weight_orig` (the
  parameter the optimizer updates) and a `weight_mask` buffer, and a forward pre-hook sets
  `weight = weight_orig * weight_mask`, so pruned weights stay zero and the rest keep learning.
- Checkpoints hold `folded_state_dict(model)`: the product under the plain `weight` key, so
  the zeros are permanent and any fresh model loads the file with `load_state_dict`.
- Pruning a loaded model again by the same amount finds the same mask (its zeros are the
  smallest magnitudes), which is how a resumed run carries on with the same mask.
- Training uses it as one hook, `pruned_decoder(model, amount)`: pruned for the block (after
  the resumed weights are loaded, before the optimizer is built on `weight_orig`), permanent and
  hook-free again however the block ends.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.utils import prune

# Layer kinds whose `weight` is pruned; norms, biases and embeddings are left alone.
PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def prunable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) for every conv/linear layer inside `module`."""
    return [(name, layer) for name, layer in module.named_modules() if isinstance(layer, PRUNABLE)]


def prune_decoder(model: nn.Module, amount: float) -> int:
    """L1-prune `amount` (0..1) of the weights of each conv/linear layer in `model.decoder`.

    Idempotent: a layer that is already pruned is folded first, so pruning twice by the
    same amount keeps the same zeros instead of pruning `amount` of what is left.
    Returns the number of layers pruned.
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"prune amount must be in [0, 1), got {amount}")
    decoder = getattr(model, "decoder", None)
    if not isinstance(decoder, nn.Module):
        raise AttributeError(f"{type(model).__name__} has no `.decoder` module to prune; "
                             "models must expose their decoder as `model.decoder` (or set prune_decoder=0)")
    layers = prunable_layers(decoder)
    if not layers:
        raise ValueError(f"{type(model).__name__}.decoder has no conv or linear layer to prune")
    for _, layer in layers:
        if hasattr(layer, "weight_orig"):
            prune.remove(layer, "weight")
        if amount > 0:
            prune.l1_unstructured(layer, "weight", amount=amount)
    return len(layers) if amount > 0 else 0


def remove_pruning(model: nn.Module) -> None:
    """Make every pruning in `model` permanent: plain parameters again, zeros kept, no hooks."""
    for layer in model.modules():
        for name in [n[: -len("_orig")] for n in layer._parameters if n.endswith("_orig")]:
            if f"{name}_mask" in layer._buffers:
                prune.remove(layer, name)


def folded_state_dict(model: nn.Module) -> dict:
    """`model.state_dict()` with pruning folded in, as detached CPU copies.

    Each `<name>_orig` / `<name>_mask` pair becomes `<name>` = orig * mask, so the result
    loads into an unpruned model of the same architecture.
    """
    state = model.state_dict()
    folded = {}
    for key, value in state.items():
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state:
            base = key[: -len("_orig")]
            value = value * state[base + "_mask"]
            key = base
        elif key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state:
            continue
        folded[key] = value.detach().to("cpu", copy=True)
    return folded


@contextlib.contextmanager
def pruned_decoder(model: nn.Module, amount: float):
    """`model`'s decoder pruned by `amount` for the block (nothing when 0), then made permanent with
    no hooks left, also when the block raises. A pruning an interrupted earlier block left on the
    same model object is folded first."""
    remove_pruning(model)
    if amount > 0:
        prune_decoder(model, amount)
    try:
        yield model
    finally:
        remove_pruning(model)
