"""Training throughput per model and input size: images/s of fit's own training step.

The step is `engine.fit`'s, on fit's set-up (one home: what is timed here is what training runs):
its accelerator and precision rule (`engine.make_accelerator`: bf16 where the GPU has it, fp16
with a grad scaler on a T4, fp32 on a CPU), its fused AdamW and schedule (`engine.make_optimizer`),
its memory layout rule (`engine.memory_format`: channels_last on GPUs with tensor cores), torch's
settings of its epochs (`engine.training_backends`: cudnn.benchmark and TF32 matrix products on
CUDA) and its guarded step (`train_step.guarded_step`: forward, the profile's loss, backward,
clipping, the skip verdict), on random inputs at the given size. The data loader is measured
apart (bench/loader_vs_model.py); this is the model's side. Rows are per (model, size, batch,
precision), each with the steps applied and skipped (fp16 overflows) and the grad scale.

    python bench/train_speed.py                                   # the demo models at 160x288 on this device
    python bench/train_speed.py --sizes 160x288,320x576,512x512   # one row per model and size
    python bench/train_speed.py --profile full                    # the full profile's models at 512x512, batch 16
    python bench/train_speed.py --models segformer-b2 --size 512x512 --batch 16 --precision bf16
    python bench/train_speed.py --models student --precision fp16,bf16 --steps 2   # one row per precision
    python bench/train_speed.py --quick                           # tiny smoke run (seconds)
    python bench/train_speed.py --profile full --batches 16,32 --compile   # torch.compile'd steps

--compile times the step after the model's torch.compile, as TrainConfig(compile=True) does it
(the warm-up steps pay the compilation, `compile_s` in the JSON); --compile-backend picks another
backend (eager / aot_eager: a cheap check of the graph capture on a CPU). --jsonl appends each row
as soon as it is measured, so a run cut short (bench/gpu_check.sh's time guard) keeps what it measured.

--models takes role names (segformer, deeplab, student: the profile's plan, options
included) or model names (default options). Pretrained weights are never loaded:
they do not change the cost of a step. The device is fit's: the GPU when there is one.
--scaler-stand-in (a CPU rehearsal only): fp16 rows get a CPU torch.amp.GradScaler, as fp16 on
a GPU has one, so the scaler's path of the step runs on a CPU too (bench/gpu_check.sh --dry-run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    Results,
    add_output_options,
    model_label,
    parse_size,
    profile_models,
    size_str,
    table,
)

from offroadseg.device import synchronize  # noqa: E402
from offroadseg.engine import TrainConfig, make_accelerator, make_optimizer  # noqa: E402
from offroadseg.losses import SegmentationLoss  # noqa: E402
from offroadseg.models import build_model, count_parameters  # noqa: E402
from offroadseg.profiles import DEMO, PROFILES  # noqa: E402
from offroadseg.train_step import STEP_APPLIED, guarded_step, memory_format, training_backends  # noqa: E402

DEMO_MODELS = [(DEMO.segformer.name, DEMO.segformer.options), (DEMO.deeplab.name, DEMO.deeplab.options),
               (DEMO.student.name, DEMO.student.options)]
COLUMNS = ["role", "model", "params_M", "size", "batch", "precision", "channels_last", "images_per_s", "ms_per_step",
           "applied", "skipped", "grad_scale"]
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def measure(name: str, options: dict, size, batch: int, steps: int, precision: str = "auto",
            channels_last: bool | None = None, warmup: int = 2, compile: bool = False,
            compile_backend: str = "inductor", scaler_stand_in: bool = False) -> dict:
    """images/s of `steps` timed training steps of fit's (`guarded_step`, fit's set-up) after `warmup`
    untimed ones. `precision` is a TrainConfig.precision, `channels_last` a TrainConfig.channels_last
    (None: fit's rule). `compile`: the model compiled in place as fit does (the warm-up steps compile;
    `compile_s` is their wall time, so at least one warm-up step runs)."""
    config = TrainConfig(epochs=1, batch_size=batch, precision=precision, channels_last=channels_last, compile=compile)
    accelerator = make_accelerator(config.precision)
    device = accelerator.device
    if scaler_stand_in and accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        accelerator.scaler = torch.amp.GradScaler(device.type)  # what fp16 on a GPU has
    torch.manual_seed(0)
    model = build_model(name, **options)
    params_m = count_parameters(model) / 1e6
    layout = memory_format(config, device)
    model = model.to(device, memory_format=layout)
    if compile:
        model.compile(backend=compile_backend)  # in place, as fit compiles
    warmup = max(warmup, 1) if compile else warmup
    optimizer, scheduler, _ = make_optimizer(model, config, steps_per_epoch=warmup + steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loss_fn = SegmentationLoss().to(device)
    x = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch, *size), device=device)
    verdicts = []

    def step():
        loss, verdict = guarded_step(model, optimizer, accelerator, x, y, loss_fn, None, config.grad_clip)
        scheduler.step()
        verdicts.append(verdict)

    with training_backends(device):
        model.train()
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
    applied = sum(int(v) == STEP_APPLIED for v in torch.stack(verdicts).tolist())
    scaler = accelerator.scaler
    row = {"model": model_label(name, options), "params_M": params_m, "size": size_str(size), "batch": batch,
           "precision": PRECISION_NAMES[accelerator.mixed_precision], "channels_last": layout == torch.channels_last,
           "device": str(device), "steps": steps, "images_per_s": steps * batch / seconds,
           "ms_per_step": 1000 * seconds / steps, "applied": applied, "skipped": len(verdicts) - applied,
           "grad_scale": None if scaler is None else scaler.get_scale(), "compiled": compile,
           "compile_backend": compile_backend if compile else None, "warmup_steps": warmup,
           "compile_s": warmup_s if compile else None}
    model = optimizer = scheduler = x = y = None  # free the GPU memory now (step() holds them)
    accelerator.free_memory()
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
    parser.add_argument("--precision", default="auto",
                        help="auto (fit's rule), fp32, bf16, fp16; several comma-separated: one row each")
    parser.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                        help="auto: fit's rule (on for GPUs with tensor cores)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up steps compile)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default inductor; eager/aot_eager check the capture cheaply)")
    parser.add_argument("--scaler-stand-in", action="store_true",
                        help="CPU rehearsal: fp16 rows get a CPU GradScaler, as fp16 on a GPU has one")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64x96, batch 2, 1 step, 1 warm-up")
    add_output_options(parser, "train_speed")
    args = parser.parse_args(argv)

    profile = PROFILES[args.profile]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad = [p for p in precisions if p not in ("auto", "fp32", "bf16", "fp16")]
    if bad or not precisions:
        parser.error(f"--precision takes auto, fp32, bf16, fp16 (comma-separated), not {args.precision!r}")
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
    where = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else \
        f"cpu ({torch.get_num_threads()} threads)"
    results = Results("train_speed", args.out, args.jsonl, args.label, device_name=where, profile=profile.name,
                      precisions=precisions, quick=args.quick, compile=args.compile,
                      compile_backend=args.compile_backend if args.compile else None,
                      note="fit's step (train_step.guarded_step) on fit's set-up; random input; SegmentationLoss")
    for spec in models:
        for batch in dict.fromkeys(2 if args.quick else (b or spec["batch_size"] or 8) for b in batches):
            for size in sizes:
                for precision in precisions:
                    row = results.add({"role": spec["role"], **measure(
                        spec["name"], spec["options"], size, batch, steps, precision, channels_last=channels_last,
                        warmup=warmup, compile=args.compile, compile_backend=args.compile_backend,
                        scaler_stand_in=args.scaler_stand_in)})
                    print(table([row], COLUMNS), flush=True)
    print(f"\nprofile: {profile.name}   device: {where}   warm-up: {warmup} steps, timed: {steps} steps"
          f"{'   compiled (' + args.compile_backend + ')' if args.compile else ''}")
    print(table(results.rows, COLUMNS))
    print(f"results: {results.save()}")


if __name__ == "__main__":
    main()
