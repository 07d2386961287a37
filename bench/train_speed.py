"""Training throughput per model and input size: images/s of forward + loss + backward + AdamW step.

Random inputs at the given size (the data loader is measured apart, see
bench/loader_vs_model.py; this is the model's side). On a GPU: bf16 autocast where
supported, channels_last. Rows are per (model, size).

    python bench/train_speed.py                                   # the demo models at 160x288 on this device
    python bench/train_speed.py --sizes 160x288,320x576,512x512   # one row per model and size
    python bench/train_speed.py --profile full                    # the full profile's models at 512x512, batch 16
    python bench/train_speed.py --models segformer-b2 --size 512x512 --batch 16 --precision bf16
    python bench/train_speed.py --quick                           # tiny smoke run (seconds)

--models takes role names (segformer, deeplab, student: the profile's plan, options
included) or model names (default options). Pretrained weights are never loaded:
they do not change the cost of a step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import model_label, parse_size, profile_models, resolve_device, resolve_precision, save_results, size_str, table  # noqa: E402

from offroadseg.losses import SegmentationLoss  # noqa: E402
from offroadseg.models import build_model, count_parameters  # noqa: E402
from offroadseg.profiles import DEMO, PROFILES  # noqa: E402

DEMO_MODELS = [(DEMO.segformer.name, DEMO.segformer.options), (DEMO.deeplab.name, DEMO.deeplab.options),
               (DEMO.student.name, DEMO.student.options)]
COLUMNS = ["role", "model", "params_M", "size", "batch", "precision", "images_per_s", "ms_per_step"]


def measure(name: str, options: dict, size, batch: int, steps: int, device: torch.device, precision: str,
            channels_last: bool | None = None, warmup: int = 2) -> dict:
    """images/s of `steps` timed training steps after `warmup` untimed ones (channels_last: default on CUDA)."""
    torch.manual_seed(0)
    model = build_model(name, **options).to(device)
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = SegmentationLoss().to(device)
    x = torch.randn(batch, 3, *size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch, *size), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(warmup):  # warm-up: allocator, cuDNN autotuning
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    row = {"model": model_label(name, options), "params_M": count_parameters(model) / 1e6, "size": size_str(size),
           "batch": batch, "precision": precision, "channels_last": channels_last, "steps": steps,
           "images_per_s": steps * batch / seconds, "ms_per_step": 1000 * seconds / steps}
    del model, optimizer, x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [parse_size(s) for s in text.replace(" ", ",").split(",") if s]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--models", nargs="*", default=None,
                        help="role names (segformer deeplab student) or model names (default: the profile's roles)")
    parser.add_argument("--size", default=None, help="HxW (default: the profile's image_size)")
    parser.add_argument("--sizes", default=None, help="several HxW, comma-separated: one row per model and size")
    parser.add_argument("--batch", type=int, default=None, help="default: the plan's batch size (8 for a model name)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda, cuda:1 ...")
    parser.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"), help="auto: on for CUDA")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True "
                        "(engine.fit sets it when training on CUDA)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64x96, batch 2, 1 step, 1 warm-up")
    parser.add_argument("--out", default=None, help="JSON results path (default bench/results/train_speed.json)")
    args = parser.parse_args(argv)

    profile = PROFILES[args.profile]
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.quick:
        sizes, steps, warmup = [(64, 96)], 1, 1
    else:
        sizes = parse_sizes(args.sizes) if args.sizes else [parse_size(args.size) if args.size else profile.image_size]
        steps, warmup = args.steps, 2
    if args.batch is not None and args.batch < 2:
        parser.error("--batch must be at least 2: BatchNorm (DeepLab's ASPP pooling branch) cannot train on one image")
    channels_last = {"auto": None, "on": True, "off": False}[args.channels_last]
    models = profile_models(profile, args.models)

    rows = []
    for spec in models:
        batch = 2 if args.quick else (args.batch or spec["batch_size"] or 8)
        for size in sizes:
            row = {"role": spec["role"], **measure(spec["name"], spec["options"], size, batch, steps, device, precision,
                                                   channels_last=channels_last, warmup=warmup)}
            rows.append(row)
            print(table([row], COLUMNS), flush=True)
    where = f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"\nprofile: {profile.name}   device: {where}   warm-up: {warmup} steps, timed: {steps} steps")
    print(table(rows, COLUMNS))
    path = save_results("train_speed", rows, args.out, device=str(device), device_name=where, profile=profile.name,
                        precision=precision, cudnn_benchmark=args.cudnn_benchmark, quick=args.quick,
                        note="random input; step = zero_grad + autocast forward + SegmentationLoss + backward + AdamW")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
