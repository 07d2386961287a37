"""Training throughput per model: images/s of forward + loss + backward + AdamW step.

Random inputs at the given size (the data loader is measured apart; this is the
model's side). On a GPU: bf16 autocast where supported, channels_last.

    python bench/train_speed.py                                   # the demo models at 180x320 on this device
    python bench/train_speed.py --models segformer-b2 --size 512x512 --batch 16 --precision bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save_results, table  # noqa: E402

from offroadseg.losses import SegmentationLoss  # noqa: E402
from offroadseg.models import build_model, count_parameters  # noqa: E402
from offroadseg.profiles import DEMO  # noqa: E402

DEMO_MODELS = [(DEMO.segformer.name, DEMO.segformer.options), (DEMO.deeplab.name, DEMO.deeplab.options),
               (DEMO.student.name, DEMO.student.options)]


def measure(name: str, options: dict, size, batch: int, steps: int, device: torch.device, precision: str) -> dict:
    torch.manual_seed(0)
    model = build_model(name, **options).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = SegmentationLoss().to(device)
    x = torch.randn(batch, 3, *size, device=device)
    y = torch.randint(0, 10, (batch, *size), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(2):  # warm-up: allocator, cuDNN autotuning
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    label = name + ("" if not options else " " + ",".join(f"{k}={v}" for k, v in options.items()))
    return {"model": label, "params_M": count_parameters(model) / 1e6, "size": f"{size[0]}x{size[1]}", "batch": batch,
            "precision": precision, "images_per_s": steps * batch / seconds, "ms_per_step": 1000 * seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="model names (default: the demo profile's)")
    parser.add_argument("--size", default="x".join(map(str, DEMO.image_size)), help="HxW")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    size = tuple(int(v) for v in args.size.lower().split("x"))
    models = [(m, {}) for m in args.models] if args.models else DEMO_MODELS
    rows = []
    for name, options in models:
        rows.append(measure(name, options, size, args.batch, args.steps, device, precision))
        print(table(rows[-1:], list(rows[-1])), flush=True)
    print(f"\ndevice: {device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else f"\ndevice: {torch.cuda.get_device_name()}")
    print(table(rows, ["model", "params_M", "size", "batch", "precision", "images_per_s", "ms_per_step"]))
    print(f"results: {save_results('train_speed', rows, args.out, device=str(device))}")


if __name__ == "__main__":
    main()
