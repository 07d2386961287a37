"""Per-call overhead of `evaluate.predict_labels`: what the prediction path costs beside the model.

    PYTHONPATH=lib .venv/bin/python bench/predict_overhead.py            # full-profile models, CPU
    PYTHONPATH=lib .venv/bin/python bench/predict_overhead.py --calls 200 --models segformer-b1

Each predictor's forward is replaced by one that returns a fixed (1, 10, 8, 8) tensor, and it is
given an already normalised 8x8 batch, so what is timed is the path alone: finding the model's
device, eval mode and putting it back (`device.on_device`), the precision rule, the upsample and
argmax of an 8x8 map (a few microseconds) and the copy to numpy. Median and p90 over `--calls`
calls after 5 warm-up calls, in milliseconds. Models are built from scratch (no weights needed):
the overhead depends on the number of modules and tensors, not their values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import add_output_options, save_results  # noqa: E402

from offroadseg.classes import NUM_CLASSES  # noqa: E402
from offroadseg.ensemble import Ensemble  # noqa: E402
from offroadseg.evaluate import predict_labels  # noqa: E402
from offroadseg.models import build_model  # noqa: E402


def fixed_output(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with its forward answering a fixed small tensor (an instance attribute shadows the class's)."""
    out = torch.zeros(1, NUM_CLASSES, 8, 8)
    module.forward = lambda x: out
    return module


def time_calls(predictor, calls: int) -> dict:
    x = torch.zeros(1, 3, 8, 8)
    for _ in range(5):
        predict_labels(predictor, x)
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        predict_labels(predictor, x)
        seconds.append(time.perf_counter() - start)
    seconds.sort()
    return {"median_ms": round(1000 * statistics.median(seconds), 4),
            "p90_ms": round(1000 * seconds[int(0.9 * (len(seconds) - 1))], 4), "calls": calls}


@torch.no_grad()  # a block, not torch.set_grad_enabled(False): a caller's (a test's) grad mode stays as it was
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["segformer-b1", "segformer-b2", "deeplabv3plus-resnet101"])
    parser.add_argument("--calls", type=int, default=100)
    add_output_options(parser, "predict_overhead")
    args = parser.parse_args(argv)
    models = {name: build_model(name).eval() for name in args.models}  # eval, as load_model gives them
    rows = []
    for name, model in models.items():
        module_count = sum(1 for _ in model.modules())
        tensor_count = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
        rows.append({"predictor": name, "modules": module_count, "tensors": tensor_count,
                     **time_calls(fixed_output(model), args.calls)})
    members = [m for n, m in models.items() if n != "segformer-b1"]
    if len(members) >= 2:
        ensemble = fixed_output(Ensemble(members[:2], [0.5, 0.5]))
        rows.append({"predictor": "ensemble(" + "+".join(n for n in models if n != "segformer-b1") + ")",
                     "modules": sum(1 for _ in ensemble.modules()),
                     "tensors": sum(1 for _ in ensemble.parameters()) + sum(1 for _ in ensemble.buffers()),
                     **time_calls(ensemble, args.calls)})
    print(f"{'predictor':44s} {'modules':>8s} {'tensors':>8s} {'median ms':>10s} {'p90 ms':>8s}")
    for row in rows:
        print(f"{row['predictor']:44s} {row['modules']:8d} {row['tensors']:8d} {row['median_ms']:10.4f} {row['p90_ms']:8.4f}")
    path = save_results("predict_overhead", rows, args.out, torch_threads=torch.get_num_threads())
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
