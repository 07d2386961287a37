"""The student's ONNX export through onnxruntime: batch-1 latency per execution provider.

The student of the profile (random init: the cost does not depend on the weights) is exported
with `offroadseg.export.export_onnx` (dynamic batch, height and width), then timed with
`export.onnx_latency` (perf_counter around `session.run`, which returns the logits on the host,
so every run is synchronised) at the model input size and at the native 960x540 frame size, once
per provider: CUDAExecutionProvider where this onnxruntime has it (the onnxruntime-gpu build),
and CPUExecutionProvider. A provider the build lacks gets a row saying so, not a figure.

    python bench/onnx_latency.py                          # demo student on this machine
    PYTHONPATH=lib python3 bench/onnx_latency.py --profile full --out $OUT/onnx.json
    python bench/onnx_latency.py --quick                  # tiny smoke run (seconds)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Results, add_output_options, parse_size, profile_models, size_str, table  # noqa: E402

from offroadseg.export import export_onnx, onnx_latency  # noqa: E402
from offroadseg.models import build_model  # noqa: E402
from offroadseg.profiles import PROFILES  # noqa: E402

COLUMNS = ["provider", "input", "median_ms", "p90_ms", "runs", "note"]
PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def session(path: Path, provider: str):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), ort.SessionOptions(), providers=[provider])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--size", default=None, help="HxW model input (default: the profile's image_size)")
    parser.add_argument("--native", default="540x960", help="HxW of the frames (default 540x960)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per latency")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64x96 input, 90x160 frames, 2 runs")
    add_output_options(parser, "onnx_latency")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    profile = PROFILES[args.profile]
    size = (64, 96) if args.quick else (parse_size(args.size) if args.size else tuple(profile.image_size))
    native = (90, 160) if args.quick else parse_size(args.native)
    runs, warmup = (2, 1) if args.quick else (args.runs, args.warmup)
    spec = profile_models(profile, ["student"])[0]
    torch.manual_seed(0)
    model = build_model(spec["name"], **spec["options"]).eval()
    available = ort.get_available_providers()
    results = Results("onnx_latency", args.out, args.jsonl, args.label, profile=profile.name, model=spec["name"],
                      model_input=list(size), native=list(native), onnxruntime=ort.__version__,
                      available_providers=available, runs=runs, warmup=warmup, quick=args.quick)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as folder:
        started = time.perf_counter()
        path = export_onnx(model, Path(folder) / "student.onnx", input_size=size)
        export_s = time.perf_counter() - started
        print(f"exported {spec['name']} at {size_str(size)} in {export_s:.1f} s; onnxruntime {ort.__version__} "
              f"providers: {', '.join(available)}", flush=True)
        for provider in PROVIDERS:
            if provider not in available:
                results.add({"provider": provider, "input": "-", "note": f"not in this onnxruntime build "
                             f"({ort.__version__}: {', '.join(available)})"})
                continue
            sess = session(path, provider)
            used = sess.get_providers()[0]
            for shape in (size, native):
                timing = onnx_latency(path, shape, runs=runs, warmup=warmup, session=sess)
                row = results.add({"provider": provider, "input": size_str(shape), "median_ms": timing["median_ms"],
                                   "p90_ms": timing["p90_ms"], "runs": timing["runs"],
                                   "note": "" if used == provider else f"session fell back to {used}"})
                print(table([row], COLUMNS), flush=True)
    print(f"\nstudent {spec['name']} ({profile.name} profile), batch 1, fp32 graph, inputs {size_str(size)} and "
          f"{size_str(native)}")
    print(table(results.rows, COLUMNS))
    out = results.save(export_s=export_s)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
