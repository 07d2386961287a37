"""Inference latency (batch 1, native 960x540 frames) and throughput (best batch) per predictor.

Predictors: segformer, deeplab, student (the profile's plans), ensemble (both teachers,
weighted average of softmax probabilities, `offroadseg.ensemble.Ensemble`) and
ensemble_tta (`TestTimeAugmentation` around it); student_tta on request.

Per predictor, latency at batch 1 (median and p90 of the timed runs after warm-up;
`offroadseg.benchmark.time_fn`: perf_counter read after device.synchronize):

  native_ms         the real pipeline, frame to labels: a uint8 960x540 RGB frame (numpy, host)
                    -> `evaluate.predict_labels`, the one prediction path (uint8 copied to the
                    device, antialiased resize to the model input and normalisation there;
                    model under --precision; logits upsampled bilinearly to 960x540 on a
                    channels-last copy; argmax) -> uint8 960x540 label map on the host.
  model_ms          the predictor alone at the model input size (profile image_size).
  model_native_ms   the predictor fed the 960x540 frame directly, as notebook 06 times it
                    (benchmark.latency at latency_input [540, 960]); not the pipeline.
  pre_ms            (one row "preprocess") eval_transform alone on the CPU.
  first_s           seconds of the very first call (native path): cold start, and with
                    --compile the compilation (each path's first call is in the JSON).

End to end (`predict` rows, --predict-images N, default 8; 0 skips): what
`python -m offroadseg.predict` does, through `evaluate.predict_files`, on N 960x540 PNG frames
written to a temporary folder: decode, preprocess, model, upsample + argmax, PNG encode of the
raw mask and the overlay; ms per image and the share of each stage. Backends side by side: the
student checkpoint (torch), its fp32 ONNX export and the INT8 quantisation of that export
(onnxruntime; calibrated on random frames, which is enough for timing). --onnx-device (default:
the torch device) is where the ONNX rows ask to run; an onnxruntime without the CUDA provider (the
plain wheel, as on the GPU image) runs them on the CPU, says so in one line, and the row names
the providers it used.

Throughput: images/s of the predictor alone at the model input size for each batch size
(1,2,4,8,16,32 on a GPU; 1,2,4,8 on a CPU), all reported in the JSON, the best in the
table; stops at the first batch that runs out of memory.

Weights: --checkpoints RUN loads outputs/RUN/models/<role>/best.pt (checkpoints.load_model)
where present, and the ensemble weights and TTA flips/scales from outputs/RUN/ensemble.json;
otherwise random init from the profile's plans, equal weights, flips ("h",). Each row says
which ("weights"). Costs do not depend on the weights.

Reference report (for comparison, not measured here): student 40 ms/image, ensemble
85 ms/image. Targets on an H100 at 960x540: student <= 4 ms, ensemble <= 10 ms.

    python bench/inference.py                                 # demo profile, random init, this device
    python bench/inference.py --checkpoints demo              # the demo run's trained models
    python bench/inference.py --profile full --channels-last --compile
    python bench/inference.py --quick                         # tiny smoke run (seconds)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    Results,
    add_output_options,
    parse_size,
    profile_models,
    size_str,
    table,
)

from offroadseg.augment import eval_transform  # noqa: E402
from offroadseg.benchmark import _is_out_of_memory, time_fn  # noqa: E402
from offroadseg.device import default_device, inference_autocast, precision_name, synchronize  # noqa: E402
from offroadseg.ensemble import Ensemble, TestTimeAugmentation  # noqa: E402
from offroadseg.evaluate import predict_files, predict_labels  # noqa: E402
from offroadseg.models import build_model, count_parameters  # noqa: E402
from offroadseg.profiles import PROFILES  # noqa: E402
from offroadseg.runs import ensemble_weights, read_ensemble, run_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PREDICTORS = ("segformer", "deeplab", "student", "ensemble", "ensemble_tta")
COMPOSITES = ("ensemble", "ensemble_tta", "student_tta")
NATIVE = (540, 960)
COLUMNS = ["predictor", "params_M", "weights", "precision", "input", "native_ms", "native_p90",
           "model_ms", "model_p90", "model_native_ms", "best_batch", "images_per_s", "first_s"]


# ------------------------------------------------------------------------------ predictors


def load_member(role_or_name: str, profile, run: str | None) -> tuple[torch.nn.Module, str]:
    """(model in eval mode, where its weights come from)."""
    if run and role_or_name in ("segformer", "deeplab", "student"):
        path = ROOT / "outputs" / run / "models" / role_or_name / "best.pt"
        if path.is_file():
            from offroadseg.checkpoints import load_model

            return load_model(path), str(path.relative_to(ROOT))
    spec = profile_models(profile, [role_or_name])[0]
    torch.manual_seed(0)
    model = build_model(spec["name"], **spec["options"]).eval()
    where = f"random init ({profile.name} plan)" if spec["role"] != "-" else "random init"
    return model, where


def ensemble_settings(run: str | None) -> dict:
    """Weights, TTA flips/scales and input size from outputs/RUN/ensemble.json, else defaults."""
    settings = {"weights": [0.5, 0.5], "flips": ("h",), "scales": None, "input_size": None, "source": "defaults"}
    folder = run_dir(run, ROOT) if run else None
    if folder is not None and folder.ensemble.is_file():
        info = read_ensemble(folder)
        settings.update(weights=ensemble_weights(info), flips=tuple(info["tta"]["flips"]), scales=info["tta"]["scales"],
                        input_size=info["input_size"], source=str(folder.ensemble.relative_to(ROOT)))
    return settings


def build_predictors(names, profile, run):
    members, predictors = {}, {}
    settings = ensemble_settings(run)

    def member(role):
        if role not in members:
            members[role] = load_member(role, profile, run)
        return members[role]

    for name in names:
        if name in ("ensemble", "ensemble_tta"):
            (seg, seg_w), (dl, dl_w) = member("segformer"), member("deeplab")
            ensemble = Ensemble([seg, dl], settings["weights"])
            weights = f"{seg_w} + {dl_w}; ensemble weights {settings['source']}"
            if name == "ensemble":
                predictors[name] = (ensemble, weights)
            else:
                predictors[name] = (TestTimeAugmentation(ensemble, settings["flips"], settings["scales"]),
                                    f"{weights}; TTA flips {list(settings['flips'])} scales {settings['scales']}")
        elif name == "student_tta":
            student, where = member("student")
            predictors[name] = (TestTimeAugmentation(student, settings["flips"], settings["scales"]),
                                f"{where}; TTA flips {list(settings['flips'])} scales {settings['scales']}")
        else:
            predictors[name] = member(name)
    return predictors, settings


# --------------------------------------------------------------------------------- timing


def timed_once(fn, device) -> float:
    """Seconds of one call (the first call of a path: lazy init, cuDNN set-up, torch.compile)."""
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def model_call(predictor, x, ctx):
    def call():
        with torch.inference_mode(), ctx:
            return predictor(x)

    return call


def random_input(batch, size, device, channels_last):
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def measure_throughput(predictor, size, batches, device, ctx, channels_last, warmup, runs, max_seconds) -> dict:
    per_batch, best = {}, (None, 0.0)
    for batch in batches:
        try:
            x = random_input(batch, size, device, channels_last)
            timing = time_fn(model_call(predictor, x, ctx), warmup=warmup, runs=runs, device=device,
                             max_seconds=max_seconds)
        except Exception as error:  # noqa: BLE001 - only out-of-memory is expected
            if not _is_out_of_memory(error):
                raise
            per_batch[batch] = {"error": "out of memory"}
            x = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        rate = batch / (timing["median_ms"] / 1000.0)
        per_batch[batch] = {"images_per_s": rate, "median_ms": timing["median_ms"], "runs": timing["runs"]}
        if rate > best[1]:
            best = (batch, rate)
    return {"best_batch": best[0], "images_per_s": best[1], "per_batch": per_batch}


PREDICT_COLUMNS = ["backend", "images", "ms_per_image", "images_per_s", "decode_%", "preprocess_%", "model_%",
                   "upsample_argmax_%", "encode_%"]


def measure_predict(student, size, native, count: int, batch_size: int, device, precision: str,
                    onnx_device: str | None = None, add=None) -> list[dict]:
    """End-to-end `predict_files` rows for the checkpoint, its fp32 ONNX export and INT8, on `count` frames.

    `onnx_device` ("cpu", "cuda", "auto"; None: `device`'s type) is asked of onnxruntime for the ONNX
    rows (`export.OnnxModel`: the CPU, with one warning line, where it has no CUDA provider); each
    row names the providers it ran on. `add(row)` is called with each row as soon as it is measured."""
    import tempfile

    from offroadseg.data import write_image
    from offroadseg.export import OnnxModel, export_onnx
    from offroadseg.modelinfo import inference_info
    from offroadseg.quantize import quantize_int8

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        # Smooth frames (a blurred noise field), not white noise: PNG decode/encode costs depend on content.
        base = rng.integers(0, 256, size=(native[0] // 8 + 1, native[1] // 8 + 1, 3), dtype=np.uint8)
        frames = []
        for k in range(count):
            small = np.roll(base, k, axis=1)
            frame = torch.from_numpy(small).permute(2, 0, 1)[None].float()
            frame = F.interpolate(frame, size=native, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
            path = tmp / "frames" / f"frame{k:03d}.png"
            write_image(path, frame.round().clamp(0, 255).byte().numpy())
            frames.append(path)
        student = student.to(device).eval()
        onnx_path = export_onnx(student.cpu(), tmp / "student.onnx", size, inference=inference_info(size))
        student = student.to(device)
        calibration = [torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(k)) for k in range(2)]
        int8_path = quantize_int8(onnx_path, tmp / "student_int8.onnx", calibration, latency_runs=0)["path"]
        onnx_device = onnx_device or device.type
        backends = {"checkpoint (torch)": student, "onnx fp32": OnnxModel(onnx_path, device=onnx_device),
                    "onnx int8": OnnxModel(int8_path, device=onnx_device)}
        for name, predictor in backends.items():
            predict_files(predictor, frames[:1], tmp / "warmup", size, batch_size=1, precision=precision, progress=False)
            result = predict_files(predictor, frames, tmp / name.split()[0], size, batch_size=batch_size,
                                   precision=precision, progress=False)
            total = result["seconds"]
            row = {"kind": "predict", "backend": name, "images": result["images"],
                   "ms_per_image": 1000 * total / result["images"], "images_per_s": result["images"] / total,
                   "batch_size": batch_size, "providers": getattr(predictor, "providers", [str(device)]),
                   "stage_ms_per_image": {k: 1000 * v / result["images"] for k, v in result["timings"].items()}}
            row.update({f"{k}_%": 100 * v / total for k, v in result["timings"].items()})
            rows.append(add(row) if add else row)
            print(table([row], PREDICT_COLUMNS), flush=True)
    return rows


def summary(timing: dict) -> dict:
    return {k: timing[k] for k in ("median_ms", "p90_ms", "min_ms", "runs")}


# ----------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--models", nargs="*", default=None,
                        help=f"predictors (default: {' '.join(DEFAULT_PREDICTORS)}; also student_tta, or a model name)")
    parser.add_argument("--checkpoints", default=None, metavar="RUN",
                        help="load outputs/RUN/models/<role>/best.pt and outputs/RUN/ensemble.json where present")
    parser.add_argument("--size", default=None, help="HxW model input (default: ensemble.json's, else the profile's)")
    parser.add_argument("--native", default="540x960", help="HxW of the frames (default 540x960)")
    parser.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda ...")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="autocast dtype; auto: bf16 on CUDA (fp16 where bf16 is emulated), fp32 on CPU")
    parser.add_argument("--channels-last", action="store_true", help="models and model inputs in channels_last")
    parser.add_argument("--compile", action="store_true", help="torch.compile each predictor (first calls timed apart)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode: default, reduce-overhead, max-autotune")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default inductor; eager/aot_eager check the capture cheaply on a CPU)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--batches", default=None, help="comma-separated throughput batch sizes")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per latency (default 50 GPU, 10 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 10 GPU, 2 CPU)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time budget per measurement (default none on GPU, 10 s on CPU)")
    parser.add_argument("--skip-model-native", action="store_true", help="leave out model_native_ms")
    parser.add_argument("--predict-images", type=int, default=None,
                        help="end-to-end predict rows on this many frames (default 8, --quick 2; 0 skips)")
    parser.add_argument("--predict-batch", type=int, default=4, help="batch size of the end-to-end predict rows")
    parser.add_argument("--predict-only", action="store_true", help="only the end-to-end predict rows")
    parser.add_argument("--onnx-device", default=None, choices=("auto", "cpu", "cuda"),
                        help="where the ONNX predict rows ask to run (default: the torch device)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64x96 input, 90x160 frames, 2 runs, batches 1,2")
    add_output_options(parser, "inference")
    args = parser.parse_args(argv)

    profile = PROFILES[args.profile]
    device = default_device(args.device)
    on_gpu = device.type == "cuda"
    precision = precision_name(device, args.precision)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    names = args.models or list(DEFAULT_PREDICTORS)
    predictors, settings = build_predictors(names, profile, args.checkpoints)

    if args.quick:
        size, native, runs, warmup, max_seconds, batches = (64, 96), (90, 160), 2, 1, None, [1, 2]
    else:
        if args.size:
            size = parse_size(args.size)
        elif settings["input_size"]:
            size = tuple(settings["input_size"])
        else:
            size = tuple(profile.image_size)
        native = parse_size(args.native)
        runs = args.runs or (50 if on_gpu else 10)
        warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
        max_seconds = args.max_seconds if args.max_seconds is not None else (None if on_gpu else 10.0)
        batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 2, 4, 8, 16, 32] if on_gpu else [1, 2, 4, 8])
    if settings["input_size"] and list(size) != list(settings["input_size"]):
        print(f"warning: model input {size_str(size)} differs from the {settings['input_size']} of {settings['source']}")
    if args.compile:
        import torch._dynamo.config as dynamo_config

        for knob in ("cache_size_limit", "recompile_limit"):  # one compiled graph per input shape
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, 64)

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(*native, 3), dtype=np.uint8)  # pixel values do not change the cost
    transform = eval_transform(size)
    predict_images = args.predict_images if args.predict_images is not None else (2 if args.quick else 8)
    results = Results("inference", args.out, args.jsonl, args.label, profile=profile.name, precision=precision,
                      channels_last=args.channels_last, compile=args.compile, quick=args.quick)
    predict_rows = []
    if predict_images > 0:
        student, _ = load_member("student", profile, args.checkpoints)
        predict_rows = measure_predict(student, size, native, predict_images, args.predict_batch, device, precision,
                                       onnx_device=args.onnx_device, add=results.add)
        student = None
    if args.predict_only:
        predictors = {}

    pre = time_fn(lambda: transform(frame, None), warmup=warmup, runs=runs, device=torch.device("cpu"),
                  max_seconds=max_seconds)
    results.add({"kind": "latency", "predictor": "preprocess", "weights": "-", "precision": "-", "input": size_str(size),
                 "pre_ms": pre["median_ms"], "native_ms": pre["median_ms"], "native_p90": pre["p90_ms"],
                 "note": f"eval_transform on the CPU: {size_str(native)} uint8 -> {size_str(size)} normalised float"})
    print(f"preprocess (eval_transform, CPU) {size_str(native)} -> {size_str(size)}: {pre['median_ms']:.2f} ms", flush=True)

    for name, (predictor, weights) in predictors.items():
        params = count_parameters(predictor) / 1e6
        predictor = predictor.to(device).eval()
        if args.channels_last:
            predictor = predictor.to(memory_format=torch.channels_last)
        compile_s = None
        if args.compile:
            started = time.perf_counter()
            predictor = torch.compile(predictor, mode=args.compile_mode, backend=args.compile_backend, dynamic=False)
            compile_s = time.perf_counter() - started  # wrapping only; the compilation happens in the first calls
        ctx = inference_autocast(device, precision)
        kind = "checkpoint" if "random" not in weights else ("random" if "best.pt" not in weights else "mixed")
        row = {"kind": "latency", "predictor": name, "params_M": params, "weights": kind, "weights_detail": weights, "input": size_str(size),
               "native": size_str(native), "precision": precision, "channels_last": args.channels_last,
               "compiled": args.compile}
        first_calls = {}

        # frame to labels, the one prediction path
        def lib_path(predictor=predictor):
            return predict_labels(predictor, [frame], size, precision=precision)

        first_calls["native"] = timed_once(lib_path, device)
        timing = time_fn(lib_path, warmup=warmup, runs=runs, device=device, max_seconds=max_seconds)
        row.update(native_ms=timing["median_ms"], native_p90=timing["p90_ms"], native_timing=summary(timing))

        # the predictor alone at the model input size
        x = random_input(1, size, device, args.channels_last)
        first_calls["model"] = timed_once(model_call(predictor, x, ctx), device)
        timing = time_fn(model_call(predictor, x, ctx), warmup=warmup, runs=runs, device=device, max_seconds=max_seconds)
        row.update(model_ms=timing["median_ms"], model_p90=timing["p90_ms"], model_timing=summary(timing))

        # the predictor fed the native frame size directly (notebook 06's latency)
        if not args.skip_model_native:
            x = random_input(1, native, device, args.channels_last)
            first_calls["model_native"] = timed_once(model_call(predictor, x, ctx), device)
            timing = time_fn(model_call(predictor, x, ctx), warmup=warmup, runs=runs, device=device,
                             max_seconds=max_seconds)
            row.update(model_native_ms=timing["median_ms"], model_native_p90=timing["p90_ms"],
                       model_native_timing=summary(timing))
        x = None

        speed = measure_throughput(predictor, size, batches, device, ctx, args.channels_last,
                                   warmup=max(1, warmup // 2), runs=max(2, runs // 5), max_seconds=max_seconds)
        row.update(best_batch=speed["best_batch"], images_per_s=speed["images_per_s"], first_s=first_calls["native"],
                   throughput_per_batch=speed["per_batch"], first_call_s=first_calls, compile_wrap_s=compile_s)
        if on_gpu:
            row["max_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        results.add(row)  # a run cut short keeps its rows
        print(table([row], COLUMNS), flush=True)
        predictor = None
        if on_gpu:
            torch.cuda.empty_cache()

    where = f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"\nprofile: {profile.name}   device: {where}   precision: {precision}   channels_last: {args.channels_last}   "
          f"compile: {args.compile}{' (' + args.compile_mode + ')' if args.compile and args.compile_mode else ''}\n"
          f"latency: batch 1, median of up to {runs} runs after {warmup} warm-up; frames {size_str(native)}, "
          f"model input {size_str(size)}; throughput batches {batches} at the model input")
    print(table([r for r in results.rows if r["kind"] == "latency"], COLUMNS))
    if predict_rows:
        print(f"\nend to end (evaluate.predict_files, as python -m offroadseg.predict): {predict_images} PNG frames "
              f"{size_str(native)}, batch {args.predict_batch}, model input {size_str(size)}")
        print(table(predict_rows, PREDICT_COLUMNS))
    print("reference report: student 40 ms/image, ensemble 85 ms/image; H100 targets at 960x540: "
          "student <= 4 ms, ensemble <= 10 ms")
    path = results.save(predict_rows=predict_rows, device=str(device), device_name=where, checkpoints=args.checkpoints,
                        ensemble_settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
                        model_input=list(size), native=list(native), compile_mode=args.compile_mode,
                        cudnn_benchmark=args.cudnn_benchmark, runs=runs, warmup=warmup, max_seconds=max_seconds,
                        batches=batches, reference={"student_ms": 40, "ensemble_ms": 85, "h100_target_student_ms": 4,
                                                    "h100_target_ensemble_ms": 10})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
