"""Training throughput per model and input size: images/s of forward + loss + backward + AdamW step.

Random inputs at the given size (the data loader is measured apart, see
bench/loader_vs_model.py; this is the model's side). On a GPU: bf16 autocast where
supported, channels_last. Rows are per (model, size).

    python bench/train_speed.py                                   # the demo models at 160x288 on this device
    python bench/train_speed.py --sizes 160x288,320x576,512x512   # one row per model and size
    python bench/train_speed.py --profile full                    # the full profile's models at 512x512, batch 16
    python bench/train_speed.py --models segformer-b2 --size 512x512 --batch 16 --precision bf16
    python bench/train_speed.py --quick                           # tiny smoke run (seconds)
    python bench/train_speed.py --profile full --batches 16,32 --compile   # torch.compile'd steps

--compile times the step after torch.compile(model) (the warm-up steps pay the compilation,
`compile_s` in the JSON); --compile-backend picks another backend (eager / aot_eager: a
cheap check of the graph capture on a CPU). The JSON is rewritten after every row, so a
run cut short (bench/gpu_check.sh's time guard) keeps what it measured.

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
from common import (  # noqa: E402
    model_label,
    parse_size,
    profile_models,
    save_results,
    size_str,
    table,
)

from offroadseg.device import default_device, precision_name, synchronize  # noqa: E402
from offroadseg.losses import SegmentationLoss  # noqa: E402
from offroadseg.models import build_model, count_parameters  # noqa: E402
from offroadseg.profiles import DEMO, PROFILES  # noqa: E402

DEMO_MODELS = [(DEMO.segformer.name, DEMO.segformer.options), (DEMO.deeplab.name, DEMO.deeplab.options),
               (DEMO.student.name, DEMO.student.options)]
COLUMNS = ["role", "model", "params_M", "size", "batch", "precision", "images_per_s", "ms_per_step"]


def measure(name: str, options: dict, size, batch: int, steps: int, device: torch.device, precision: str,
            channels_last: bool | None = None, warmup: int = 2, compile: bool = False,
            compile_backend: str = "inductor") -> dict:
    """images/s of `steps` timed training steps after `warmup` untimed ones (channels_last: default on CUDA).
    `compile`: the model's forward through torch.compile (the warm-up steps compile; `compile_s` is
    their wall time, so at least one warm-up step runs)."""
    torch.manual_seed(0)
    model = build_model(name, **options).to(device)
    params_m = count_parameters(model) / 1e6
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model, backend=compile_backend, dynamic=False) if compile else model
    warmup = max(warmup, 1) if compile else warmup
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
        # A training step: autocast of the precision the one rule chose (precision_name), with a
        # GradScaler for fp16, as accelerate does inside engine.fit.
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(forward(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    warmup_started = time.perf_counter()
    for _ in range(warmup):  # warm-up: allocator, cuDNN autotuning, torch.compile
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - warmup_started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - started
    row = {"model": model_label(name, options), "params_M": params_m, "size": size_str(size),
           "batch": batch, "precision": precision, "channels_last": channels_last, "steps": steps,
           "images_per_s": steps * batch / seconds, "ms_per_step": 1000 * seconds / steps,
           "compiled": compile, "compile_backend": compile_backend if compile else None, "warmup_steps": warmup,
           "compile_s": warmup_s if compile else None}
    model = forward = optimizer = x = y = None  # free the GPU memory now (step() holds them)
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
    parser.add_argument("--batches", default=None, help="several batch sizes, comma-separated: one row per model, "
                        "size and batch (overrides --batch)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after the warm-up steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2; --compile: at least 1)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda, cuda:1 ...")
    parser.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"), help="auto: on for CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up steps compile)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default inductor; eager/aot_eager check the capture cheaply)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True "
                        "(engine.fit sets it when training on CUDA)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64x96, batch 2, 1 step, 1 warm-up")
    parser.add_argument("--out", default=None, help="JSON results path (default bench/results/train_speed.json)")
    args = parser.parse_args(argv)

    profile = PROFILES[args.profile]
    device = default_device(args.device)
    precision = precision_name(device, args.precision)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.quick:
        sizes, steps, warmup = [(64, 96)], 1, 1
    else:
        sizes = parse_sizes(args.sizes) if args.sizes else [parse_size(args.size) if args.size else profile.image_size]
        steps, warmup = args.steps, args.warmup
    batches = [int(b) for b in args.batches.split(",") if b.strip()] if args.batches else [args.batch]
    if any(b is not None and b < 2 for b in batches):
        parser.error("--batch must be at least 2: BatchNorm (DeepLab's ASPP pooling branch) cannot train on one image")
    channels_last = {"auto": None, "on": True, "off": False}[args.channels_last]
    models = profile_models(profile, args.models)

    where = f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)

    def save(rows):
        return save_results("train_speed", rows, args.out, device=str(device), device_name=where, profile=profile.name,
                            precision=precision, cudnn_benchmark=args.cudnn_benchmark, quick=args.quick,
                            compile=args.compile, compile_backend=args.compile_backend if args.compile else None,
                            note="random input; step = zero_grad + autocast forward + SegmentationLoss + backward + AdamW")

    rows = []
    for spec in models:
        for batch in dict.fromkeys(2 if args.quick else (b or spec["batch_size"] or 8) for b in batches):
            for size in sizes:
                row = {"role": spec["role"], **measure(spec["name"], spec["options"], size, batch, steps, device,
                                                       precision, channels_last=channels_last, warmup=warmup,
                                                       compile=args.compile, compile_backend=args.compile_backend)}
                rows.append(row)
                print(table([row], COLUMNS), flush=True)
                save(rows)  # after every row: a run cut short keeps what it measured
    print(f"\nprofile: {profile.name}   device: {where}   warm-up: {warmup} steps, timed: {steps} steps"
          f"{'   compiled (' + args.compile_backend + ')' if args.compile else ''}")
    print(table(rows, COLUMNS))
    path = save(rows)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
