"""Notebook 04: the teachers scored on val, side by side, as ensemble.json records them.

The ensemble's weight and its test-time augmentation are chosen by `ensemble.choose_weight` and
`evaluate.choose_tta` (algorithms); this chapter measures each candidate's val scores and cost.
"""

from __future__ import annotations

from .. import benchmark
from ..evaluate import evaluate_model
from ..models import count_parameters


def scored_by_tta(tta_table: list[dict], flips, scales=None) -> dict:
    """The val scores `evaluate.choose_tta` already measured, by predictor name: "ensemble" (its row
    without flips) and "ensemble_tta" (the chosen flips' row; not with `scales`, which it did not try)."""
    scored = {"ensemble": next(row for row in tta_table if not row["flips"])}
    if not scales:
        scored["ensemble_tta"] = next(row for row in tta_table if tuple(row["flips"]) == tuple(flips))
    return scored


def val_scores(predictors: dict, loader, input_size, progress: bool = True, scored: dict | None = None) -> dict:
    """Val scores and cost of each predictor at the model input size, by name: miou, pixel_acc,
    per_class_iou, ms_per_image (median latency at batch 1) and params; the `val` part of
    ensemble.json (notebook 04). `scored`: scores measured before over the same `loader`, by name
    (`scored_by_tta`), taken instead of a second pass. `progress` prints one line per predictor as
    it is measured."""
    results = {}
    for name, predictor in predictors.items():
        result = (scored or {}).get(name) or evaluate_model(predictor, loader)
        timing = benchmark.latency(predictor, input_size=input_size)
        params = count_parameters(predictor)
        results[name] = {"miou": result["miou"], "pixel_acc": result["pixel_acc"], "per_class_iou": result["per_class_iou"],
                         "ms_per_image": timing["median_ms"], "params": params}
        if progress:
            print(f"{name:<13} mIoU {result['miou']:.3f}  pixel acc {result['pixel_acc']:.3f}  "
                  f"{timing['median_ms']:7.1f} ms/img  {params / 1e6:5.2f} M params")
    return results
