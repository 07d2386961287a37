"""The GPU check of run_all.sh (issue 13, defect 9): a fake `nvidia-smi` on PATH and patched torch.cuda
stand in for the machines (an old driver, a P100, an H100)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offroadseg import device

# The pinned build's kernels (torch 2.14.1+cu130).
CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def fake_nvidia_smi(folder: Path, output: str, status: int = 0, knows_compute_cap: bool = True) -> Path:
    """An `nvidia-smi` that answers the --query-gpu call with `output` (and exit `status`)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    refuse = "" if knows_compute_cap else (
        'case "$*" in *compute_cap*) echo \'Field "compute_cap" is not a valid field to query.\' >&2; exit 2;; esac\n')
    (folder / "answer.txt").write_text(output + "\n")
    # Shell builtins only: PATH holds nothing but this folder in most tests.
    script.write_text(f'#!/bin/sh\n{refuse}while IFS= read -r line; do printf "%s\\n" "$line"; done < "{folder}/answer.txt"\n'
                      f"exit {status}\n")
    script.chmod(0o755)
    return folder


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """Sets up a machine: its nvidia-smi answer (None: no nvidia-smi) and what torch.cuda says."""
    monkeypatch.delenv(device.ALLOW_CPU_ENV, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def make(output: str | None, available: bool, archs=CU130_ARCHS, **smi):
        folder = tmp_path / "bin"
        folder.mkdir(exist_ok=True)
        if output is not None:
            fake_nvidia_smi(folder, output, **smi)
        monkeypatch.setenv("PATH", str(folder))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))

    return make


def test_an_old_driver_stops_with_the_driver_and_the_way_out(machine):
    machine("Tesla T4, 535.104.05, 7.5", available=False)
    problem = device.gpu_problem()
    assert problem is not None
    assert "Tesla T4 (driver 535.104.05, compute 7.5)" in problem
    assert "needs an NVIDIA driver 580 or newer" in problem
    assert "Kaggle" in problem and "OFFROADSEG_ALLOW_CPU=1" in problem


def test_a_p100_has_no_kernels_in_the_pinned_build(machine):
    machine("Tesla P100-PCIE-16GB, 580.65.06, 6.0", available=True)
    problem = device.gpu_problem()
    assert problem is not None and "Tesla P100-PCIE-16GB" in problem
    assert "no kernels for compute 6.0 (built for sm_75 sm_80" in problem
    assert "update the NVIDIA driver" not in problem  # a newer driver would not help
    # Kaggle's P100 on an older driver: both reasons.
    machine("Tesla P100-PCIE-16GB, 560.35.03, 6.0", available=False)
    problem = device.gpu_problem()
    assert "needs an NVIDIA driver 580 or newer, this one is 560.35.03, and it has no kernels for compute 6.0" in problem


@pytest.mark.parametrize("gpu", ["NVIDIA H100 80GB HBM3, 580.65.06, 9.0", "NVIDIA L4, 580.65.06, 8.9",
                                 "Tesla T4, 580.65.06, 7.5"])
def test_a_gpu_the_build_serves_passes(machine, gpu):
    machine(gpu, available=True)  # the L4 (8.9) runs the sm_86 kernels
    assert device.gpu_problem() is None


def test_no_nvidia_gpu_or_the_escape_hatch_passes(machine, monkeypatch):
    machine(None, available=False)  # no nvidia-smi: a CPU machine, the CPU is the device
    assert device.gpu_problem() is None
    machine("Tesla T4, 535.104.05, 7.5", available=False)
    monkeypatch.setenv(device.ALLOW_CPU_ENV, "1")
    assert device.gpu_problem() is None


def test_an_nvidia_smi_without_compute_cap_or_a_broken_driver(machine, tmp_path):
    machine("Tesla P100-PCIE-16GB, 470.82.01", available=False, knows_compute_cap=False)
    assert device.nvidia_gpus() == [{"name": "Tesla P100-PCIE-16GB", "driver": "470.82.01", "compute_cap": None}]
    assert "driver 470.82.01" in device.gpu_problem()
    fake_nvidia_smi(tmp_path / "bin", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
                    status=9)
    problem = device.gpu_problem()
    assert "couldn't communicate with the NVIDIA driver" in problem and "Way out" in problem


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA (the child is not patched)")
def test_the_command_run_all_sh_calls_exits_non_zero_with_the_message(tmp_path):
    folder = fake_nvidia_smi(tmp_path / "bin", "Tesla T4, 450.80.02, 7.5")
    env = {key: value for key, value in os.environ.items() if key != device.ALLOW_CPU_ENV}
    env["PATH"] = f"{folder}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run([sys.executable, "-m", "offroadseg.device", "--check"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 1 and "Tesla T4 (driver 450.80.02" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    env["PATH"] = f"{tmp_path / 'empty'}{os.pathsep}{os.path.dirname(sys.executable)}"
    assert subprocess.run([sys.executable, "-m", "offroadseg.device", "--check"], env=env, timeout=120).returncode == 0
    # run_all.sh checks the GPU before it hands over to the runner, which does all the work (the demo
    # desert, the notebooks, the tests, JupyterLab): run_all.sh itself starts none of it.
    script = (Path(__file__).parents[1] / "run_all.sh").read_text()
    code = [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    # unindented: at the top level, in no branch that could skip it
    check = [i for i, line in enumerate(code) if line.startswith("python -m offroadseg.device --check || exit 2")]
    assert len(check) == 1
    handover = [i for i, line in enumerate(code) if "offroadseg.runner" in line]
    assert handover == [len(code) - 1] and code[-1].startswith('exec python -m offroadseg.runner --cwd "$CALLER_PWD" "$@"')
    assert check[0] < handover[0]
    work = ("make_demo_desert", "pytest", "ruff", "jupyter lab", "bin/jupyter", "papermill")
    assert not [line for line in code[:handover[0]] if any(word in line for word in work)]


def gpu_of_capability(monkeypatch, capability):
    """torch.cuda answering as a GPU of `capability` would; records which device each question named."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def get_device_capability(which=None):
        asked.append(which)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    # torch.autocast("cuda", bfloat16) asks this itself (the project's rule never does)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability >= (8, 0))
    return asked


def test_precision_rule_lives_in_device(monkeypatch):
    gpu_of_capability(monkeypatch, (7, 5))
    assert device.resolve_precision("auto") == "fp16"  # a T4: bf16 only by emulation
    gpu_of_capability(monkeypatch, (6, 0))
    assert device.resolve_precision("auto") == "fp16"  # a P100
    asked = gpu_of_capability(monkeypatch, (9, 0))
    assert device.resolve_precision("auto") == "bf16"
    # Each process asks the GPU it was given, never "the current one" (a context on GPU 0 from every rank).
    assert device.resolve_precision("auto", torch.device("cuda", 1)) == "bf16"
    assert asked[-1] == torch.device("cuda", 1)
    assert device.resolve_precision("auto", "cpu") == "no" and device.resolve_precision("bf16", "cpu") == "bf16"


def test_channels_last_pays_on_tensor_cores_only(monkeypatch):
    assert not device.tensor_cores("cpu") and device.compute_capability("cpu") is None
    gpu_of_capability(monkeypatch, (6, 0))  # P100: no tensor cores
    assert not device.tensor_cores("cuda") and not device.native_bf16("cuda")
    gpu_of_capability(monkeypatch, (7, 5))  # T4
    assert device.tensor_cores("cuda") and not device.native_bf16("cuda")
    gpu_of_capability(monkeypatch, (9, 0))  # H100 / H200
    assert device.tensor_cores("cuda") and device.native_bf16("cuda")


def test_inference_precision_follows_the_training_rule_on_gpus_and_is_fp32_on_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert device.precision_name(cpu) == "fp32"  # "auto" on a CPU: no autocast
    assert device.precision_name(cpu, "bf16") == "bf16"  # forced: autocast's CPU path
    with pytest.raises(ValueError, match="precision must be one of"):
        device.inference_autocast(cpu, "half")
    gpu_of_capability(monkeypatch, (7, 5))
    assert device.precision_name("cuda") == "fp16"  # a T4, as in training
    gpu_of_capability(monkeypatch, (8, 0))
    assert device.precision_name("cuda") == "bf16" and device.precision_name("cuda", "fp32") == "fp32"


def test_default_device_is_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.default_device() == device.default_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.default_device().type == "cuda" and device.default_device("auto").type == "cuda"
    assert device.default_device("cpu") == torch.device("cpu")
    device.synchronize("cpu")  # nothing to wait for on a CPU (and no CUDA call)
    assert device.device_name(torch.device("cpu")) == "cpu"


# ------------------------------------------------------------------ where a model runs (on_device, model_device)


def test_model_device_reads_the_first_tensor_and_the_cpu_without_one():
    assert device.model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    only_buffer = torch.nn.BatchNorm2d(3, affine=False)
    assert device.model_device(only_buffer.to("meta")) == torch.device("meta")
    assert device.model_device(torch.nn.ReLU()) == torch.device("cpu")
    assert device.model_device(lambda x: x) == torch.device("cpu")


def test_on_device_sets_every_module_to_eval_and_gives_back_exactly_the_modes_it_found():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.Dropout())
    model.eval()
    model[1].train()  # a submodule in training mode under an eval root (as BatchNorm re-estimation leaves one)
    with device.on_device(model):
        assert not any(module.training for module in model.modules())
    assert [module.training for module in model.modules()] == [False, False, True, False]
    with device.on_device(model):  # the tree is cached now: the same answer the second time
        assert not model[1].training
    assert model[1].training and not model.training


def test_on_device_sees_a_submodule_registered_after_its_first_call():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)).eval()
    with device.on_device(model):
        pass
    model.add_module("head", torch.nn.Dropout())  # new modules start in training mode
    model[0].extra = torch.nn.BatchNorm2d(3)      # also one level down, by attribute
    with device.on_device(model):
        assert not model.head.training and not model[0].extra.training
    assert model.head.training and model[0].extra.training
    x = torch.ones(1, 3, 2, 2)
    with device.on_device(model):
        assert torch.equal(model.head(x), x)  # dropout really is off inside


def test_freed_memory_is_kept_once_per_process_unless_the_user_set_mallocs_own_variables(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    monkeypatch.setattr(device.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(device.sys, "platform", "linux")
    for name in [name for name in os.environ if name.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(device, "_malloc_kept", None)
    assert device.keep_freed_memory() is True
    assert calls == list(device.MALLOC_SETTINGS.items()) and dict(calls)[-3] == 32 << 20  # M_MMAP_THRESHOLD: glibc's max
    assert device.keep_freed_memory() is True and len(calls) == 3  # once per process
    # The user's own MALLOC_* settings win; another C library (no mallopt) is left alone.
    monkeypatch.setattr(device, "_malloc_kept", None)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert device.keep_freed_memory() is False and len(calls) == 3
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setattr(device, "_malloc_kept", None)
    monkeypatch.setattr(device.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError("no libc.so.6")))
    assert device.keep_freed_memory() is False


@pytest.mark.slow  # a few seconds alone: subprocesses (or a fit) each importing torch
def test_freed_memory_kept_in_a_real_process_stops_the_page_faults_of_repeated_large_buffers():
    """The effect itself, in fresh interpreters: 48 MB buffers made and freed 20 times (each above glibc's
    largest mmap threshold would be mmapped; below it, but beyond the default trim, the heap shrinks)."""
    script = ("import resource, numpy as np\n"
              "from offroadseg import device\n"
              "kept = device.keep_freed_memory() if {keep} else False\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "for _ in range(20):\n"
              "    parts = [np.ones(3 << 20) for _ in range(2)]\n"  # 2 x 24 MB
              "    del parts\n"
              "print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    faults = {}
    for keep in (False, True):
        out = subprocess.run([sys.executable, "-c", script.format(keep=keep)], capture_output=True, text=True, env=env,
                             check=True).stdout.split()
        assert out[0] == str(keep)
        faults[keep] = int(out[1])
    assert faults[True] < faults[False] / 5, faults
