"""The one device and precision rule, and the check that torch can use the NVIDIA GPU a machine has.

    device = default_device()                  # the GPU when there is one, else the CPU
    with on_device(model, device), inference_autocast(device):
        logits = model(x)                      # bf16 (fp16 on older GPUs) on a GPU, fp32 on the CPU
    synchronize(device)                        # before reading a clock: GPU kernels are asynchronous

    python -m offroadseg.device --check   # exit 1 with a message when an NVIDIA GPU is present
                                          # that this torch cannot use (run_all.sh calls it)

The rule, for training, inference, benchmarks, export, uncertainty and bench/:
- `device=None` (or "auto") means the GPU when there is one, else the CPU (`default_device`); a
  predictor that is an `nn.Module` runs there in eval mode for the call (`on_device`) and is put
  back where and as it was afterwards: helpers never move a caller's model.
- Training: `resolve_precision` turns a
  TrainConfig.precision into accelerate's mixed_precision value: bf16 where the GPU has it
  natively (compute capability 8.0 and up), fp16 on other GPUs (T4, P100), fp32 on the CPU.
  It asks the GPU it is given, never "the current one": under DDP each process asks its own,
  once accelerate has set it (`engine.make_accelerator`), so no process opens a CUDA context
  on another's GPU. `tensor_cores` says where channels_last pays (compute capability 7.0 and up).
- Inference runs under `torch.inference_mode()` with the same choice as autocast
  (`inference_autocast`), so a model is evaluated in the precision it was trained in;
  probabilities are computed in fp32 from the (possibly half-precision) logits.

Why the check: the pinned torch (`torch==2.14.1` from the registry) is a CUDA 13 build. It
needs an NVIDIA driver 580 or newer, and carries kernels for compute capability 7.5 and up
only (sm_75 ... sm_120: T4, A10/A100, L4, H100/H200, Blackwell), none for the P100 (sm_60)
or V100 (sm_70). On an older driver `torch.cuda.is_available()` is simply False, and the
full profile would train on the CPU for days without a word; on a P100 every kernel fails
with "no kernel image is available". So a machine that has an NVIDIA GPU (`nvidia-smi`
answers) that torch cannot use stops before any work, naming the GPU, its driver and the
way out. `OFFROADSEG_ALLOW_CPU=1` runs on the CPU anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import os
import shutil
import subprocess
import sys
import weakref

import torch
from torch import nn

ALLOW_CPU_ENV = "OFFROADSEG_ALLOW_CPU"
# Oldest Linux driver branch that runs each CUDA major version (NVIDIA's CUDA compatibility table).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}


# glibc's malloc hands large freed blocks back to the OS at once (each block over its mmap threshold,
# and the heap's top beyond its trim threshold), so on a CPU every training or inference step faults
# the same few hundred MB of activations back in: 35-70k page faults per demo SegFormer-B0 step, 5-12%
# of the step's time, more on a busy machine (bench/RESULTS.md, "CPU memory reuse"). Kept instead:
# blocks up to 32 MiB (glibc's largest mmap threshold) come from the heap, which keeps 1 GiB of free
# top before it trims and grows 256 MiB at a time.
MALLOC_SETTINGS = {-3: 32 << 20, -1: 1 << 30, -2: 256 << 20}  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD
_malloc_kept = None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (`MALLOC_SETTINGS`), once per process; True when set.

    For the CPU paths (training, evaluation, predict): the process's memory then stays near its peak
    instead of returning between steps. Nothing on other C libraries (macOS, Windows, musl) or where
    the user set any MALLOC_* variable of glibc's own (theirs win).
    """
    global _malloc_kept
    if _malloc_kept is None:
        _malloc_kept = False
        if sys.platform.startswith("linux") and not any(name.startswith("MALLOC_") for name in os.environ):
            try:
                libc = ctypes.CDLL("libc.so.6")
                _malloc_kept = all(libc.mallopt(option, value) == 1 for option, value in MALLOC_SETTINGS.items())
            except (OSError, AttributeError):  # not glibc
                pass
    return _malloc_kept


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def compute_capability(device=None) -> tuple[int, int] | None:
    """(major, minor) of a CUDA `device` (None: the default device); None for a CPU. Asks `device`
    itself (torch caches the answer per GPU), so a process never touches a GPU it was not given."""
    device = default_device(device)
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def native_bf16(device=None) -> bool:
    """bf16 in hardware (Ampere, compute 8.0, and newer). A T4 (7.5) "supports" bf16 only by slow
    emulation, so there and on a P100 (6.0) training and inference use fp16."""
    capability = compute_capability(device)
    return capability is not None and capability >= (8, 0)


def tensor_cores(device=None) -> bool:
    """Whether `device` has tensor cores (compute 7.0 and up: V100, T4, A100, H100, ...), the only
    place where channels_last (NHWC) activations pay; on a P100 or a CPU they cost time."""
    capability = compute_capability(device)
    return capability is not None and capability >= (7, 0)


def resolve_precision(precision: str, device=None) -> str:
    """Accelerate's mixed_precision value ("no", "bf16", "fp16") for a TrainConfig.precision on
    `device` (None: the default device)."""
    explicit = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
    if precision in explicit:
        return explicit[precision]
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    device = default_device(device)
    if device.type != "cuda" or _flag("ACCELERATE_USE_CPU"):
        return "no"
    return "bf16" if native_bf16(device) else "fp16"


# ------------------------------------------------------------------ devices


def default_device(device=None) -> torch.device:
    """`device` as a torch.device; None (or "auto") means the GPU when there is one, else the CPU."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def synchronize(device) -> None:
    """Wait for `device`'s queued work (a no-op on the CPU): read a clock only after it, since GPU
    kernels run asynchronously and without it one times their launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    """How reports name `device`: "cuda (<GPU name>)" for a GPU, else e.g. "cpu"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)


# ------------------------------------------------------------------ inference precision

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def inference_autocast(device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """THE precision rule of inference (predictions, uncertainty, evaluation, timing, ONNX parity).

    "auto": bf16 on GPUs with native bf16, fp16 on older GPUs, none (fp32) on CPU: the same rule
    as training (`resolve_precision("auto")`), so a model is evaluated in the precision it
    was trained in. "fp32", "bf16", "fp16" force one (bf16 on a CPU is autocast's CPU path).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        precision = resolve_precision("auto", device)
    if precision in ("no", "fp32"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def precision_name(device, precision: str = "auto") -> str:
    """"bf16", "fp16" or "fp32": what `inference_autocast(device, precision)` computes in."""
    context = inference_autocast(device, precision)
    if isinstance(context, torch.autocast):
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[context.fast_dtype]
    return "fp32"


# ------------------------------------------------------------------ where a model runs


def model_device(predictor) -> torch.device:
    """Where `predictor` computes: its first parameter's (or buffer's) device for a module; a
    callable's `device` attribute (an ONNX session wrapper: the CPU); else the CPU."""
    if isinstance(predictor, nn.Module):
        # The first tensor only: the generators stop there (a B2 + R101 ensemble has over 1,000 tensors).
        tensor = next(itertools.chain(predictor.parameters(), predictor.buffers()), None)
        if tensor is not None:
            return tensor.device
    return torch.device(getattr(predictor, "device", "cpu"))


# Module trees seen by `on_device`, and the generation they were walked at. Any submodule registered
# anywhere (`module.x = nn.Conv2d(...)`, `add_module`) starts a new generation through torch's public
# global registration hook, so a changed tree is walked again; what stays fixed between calls (the
# tree) is not walked on every call, only what can change (each module's train/eval mode) is read.
# A submodule written into `_modules` directly bypasses the hook: nothing in this project does that.
_tree_generation = 0
_trees: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _new_tree_generation(module, name, submodule):
    global _tree_generation
    _tree_generation += 1


nn.modules.module.register_module_module_registration_hook(_new_tree_generation)


def modules_of(predictor: nn.Module) -> tuple[nn.Module, ...]:
    """`tuple(predictor.modules())`, walked once per tree: again only after a submodule was registered."""
    cached = _trees.get(predictor)
    if cached is None or cached[0] != _tree_generation:
        cached = (_tree_generation, tuple(predictor.modules()))
        _trees[predictor] = cached
    return cached[1]


@contextlib.contextmanager
def on_device(predictor, device=None):
    """`predictor` on `device` (None: its own device) in eval mode for the block, then put back
    exactly as it was: same parameter and buffer tensors (so the same device) and train/eval modes.

    Helpers that are given a device use this instead of moving the caller's model: the caller's
    next call (say a CPU batch into a model a timing helper moved to CUDA) never finds it moved
    behind its back. The original tensors are kept while the block runs, so moving back costs
    nothing. Callables that are not modules are used as they are.
    """
    if not isinstance(predictor, nn.Module):
        yield predictor
        return
    device = model_device(predictor) if device is None else torch.device(device)
    moved = model_device(predictor) != device
    # Only the modules in training mode are switched and switched back: an eval-mode model (predict's
    # case, every call) costs a read of each module's flag, no walk of its tensors.
    training = [module for module in modules_of(predictor) if module.training]
    params, buffers = [], []
    if moved:
        for module in predictor.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    grad = param.grad
                    params.append((module, name, param, param.data, grad, None if grad is None else grad.data))
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    buffers.append((module, name, buffer))
        predictor.to(device)
    if training:
        predictor.eval()
    try:
        yield predictor
    finally:
        if moved:
            for module, name, param, data, grad, grad_data in params:
                module._parameters[name] = param
                param.data = data
                if grad is not None:
                    grad.data = grad_data
                    param.grad = grad
            for module, name, buffer in buffers:
                module._buffers[name] = buffer
        for module in training:
            module.training = True


# --------------------------------------------------------------------- the GPU check


def nvidia_gpus() -> list[dict] | None:
    """The GPUs `nvidia-smi` lists: [{"name", "driver", "compute_cap" (e.g. "6.0", or None)}].

    None when there is no `nvidia-smi` on PATH (no NVIDIA driver: the CPU is the device);
    [{"error": ...}] when it is there but fails (a driver that does not load).
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    # Drivers before ~510 do not know the compute_cap field: ask again without it.
    for fields in ("name,driver_version,compute_cap", "name,driver_version"):
        try:
            done = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            return [{"error": f"{exe} could not run ({type(err).__name__}: {err})"}]
        if done.returncode == 0:
            break
    else:
        message = (done.stderr or done.stdout).strip().splitlines()
        return [{"error": f"{exe} fails: {message[0] if message else f'exit status {done.returncode}'}"}]
    gpus = []
    for line in done.stdout.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) >= 2:
            gpus.append({"name": parts[0], "driver": parts[1], "compute_cap": parts[2] if len(parts) > 2 else None})
    return gpus


def _has_kernels(compute_cap: str, arch_list: list[str]) -> bool:
    """Whether a build with `arch_list` (torch.cuda.get_arch_list()) runs on a GPU of `compute_cap`.

    A cubin for sm_XY runs on X.Y' with Y' >= Y (same major); PTX (compute_XY) on any newer GPU.
    """
    try:
        major, minor = (int(part) for part in compute_cap.split("."))
    except ValueError:
        return True  # unknown: let torch decide
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits[:-1].isdigit():
            continue
        arch_major, arch_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def _driver_major(driver: str) -> int | None:
    try:
        return int(driver.split(".")[0])
    except ValueError:
        return None


def gpu_problem() -> str | None:
    """Why this torch cannot use the NVIDIA GPU this machine has, with the way out; None when it can,
    when there is no NVIDIA GPU (`nvidia-smi` absent), or when $OFFROADSEG_ALLOW_CPU is set."""
    if _flag(ALLOW_CPU_ENV):
        return None
    gpus = nvidia_gpus()
    if not gpus:
        return None
    build = f"torch {torch.__version__}"
    cuda = torch.version.cuda
    if cuda is None:
        return (f"this machine has an NVIDIA GPU, but {build} is a CPU-only build, so everything would run on the "
                f"CPU. {_way_out()}")
    needed = MIN_DRIVER.get(int(cuda.split(".")[0]))
    errors = [gpu["error"] for gpu in gpus if "error" in gpu]
    if errors:
        return (f"{errors[0]}: the NVIDIA driver does not work, so {build} (CUDA {cuda}) would run on the CPU. "
                f"{_way_out(needed)}")
    gpu = gpus[0]
    described = f"{gpu['name']} (driver {gpu['driver']}" + (f", compute {gpu['compute_cap']})" if gpu["compute_cap"] else ")")
    archs = _arch_list()
    no_kernels = bool(gpu["compute_cap"] and archs and not _has_kernels(gpu["compute_cap"], archs))
    kernels = f"it has no kernels for compute {gpu['compute_cap']} (built for {' '.join(archs)})"
    if not torch.cuda.is_available():
        major = _driver_major(gpu["driver"])
        if needed is not None and major is not None and major < needed:
            reason = f"its CUDA {cuda} build needs an NVIDIA driver {needed} or newer, this one is {gpu['driver']}"
        else:
            reason = f"torch.cuda.is_available() is False (CUDA {cuda} build; check CUDA_VISIBLE_DEVICES and the driver)"
        if no_kernels:
            reason += f", and {kernels}"
        return f"the NVIDIA GPU here, {described}, cannot be used by {build}: {reason}. {_way_out(needed, no_kernels)}"
    if no_kernels:
        return f"the NVIDIA GPU here, {described}, cannot be used by {build}: {kernels}. {_way_out(None, True)}"
    return None


def _arch_list() -> list[str]:
    try:
        return list(torch.cuda.get_arch_list())
    except Exception:  # a build or driver state that cannot say: let torch decide later
        return []


def _way_out(needed: int | None = None, no_kernels: bool = False) -> str:
    elsewhere = ("Elsewhere, install such a build" if no_kernels or not needed
                 else f"Elsewhere, update the NVIDIA driver to {needed} or newer")
    return ("Way out: a torch build made for this GPU and driver. On Kaggle, use its preinstalled torch: "
            "`pip install --no-deps -e .` into Kaggle's own environment and run the notebooks there, not in "
            "run_all.sh's .venv; or install, into an environment of its own, a torch built for an older CUDA "
            "that lists this GPU's architecture (e.g. `pip install torch torchvision --index-url "
            f"https://download.pytorch.org/whl/cu126`). {elsewhere}. "
            f"To run on the CPU anyway, set {ALLOW_CPU_ENV}=1.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offroadseg.device", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 with a message when an NVIDIA GPU is present that this torch cannot use")
    args = parser.parse_args(argv)
    if not args.check:
        parser.print_help()
        return 0
    problem = gpu_problem()
    if problem is not None:
        print(f"device: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
