"""Multi-GPU launch from a notebook (issue 13, defect 2), on the CPU: patched torch.cuda entry points
stand in for the GPUs, a recording stand-in for accelerate's notebook_launcher."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import make_small_dataset
from torch import nn

from offroadseg import dataset, engine
from offroadseg.chapters import assembly, context, teachers
from offroadseg.profiles import DEMO
from offroadseg.scan import scan_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def launcher(monkeypatch):
    """Records notebook_launcher calls instead of forking."""
    calls = []
    monkeypatch.setattr(engine, "notebook_launcher", lambda fn, args, num_processes: calls.append(
        (fn, args, num_processes)))
    return calls


def test_launch_on_several_gpus_refuses_once_cuda_is_initialised(monkeypatch, launcher):
    # A cell before the training one used the GPU: the launcher's forks could not, so say so now.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match=r"CUDA is already initialised in this kernel.*restart the kernel") as info:
        engine.launch(print, "x", num_processes=2)
    assert "\n" not in str(info.value)  # one line
    assert launcher == []  # and no silent fallback to one process


def test_launch_on_several_gpus_hands_the_function_to_the_launcher(monkeypatch, launcher):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert engine.launch(print, "x") is None
    assert launcher == [(print, ("x",), 2)]
    # keyword arguments travel bound to the function (notebook_launcher takes positional ones only)
    assert engine.launch(print, "y", sep="-") is None
    fn, args, processes = launcher[-1]
    assert args == ("y",) and processes == 2 and fn.func is print and fn.keywords == {"sep": "-"}


def _holds_torch_objects(value) -> bool:
    if isinstance(value, (torch.Tensor, nn.Module)):
        return True
    if isinstance(value, dict):
        return any(_holds_torch_objects(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_torch_objects(v) for v in value)
    return False


def test_train_teacher_returns_plain_data_and_caches_train_and_val_where_told(tmp_path, monkeypatch):
    # Under the launcher each rank's return value is pickled back to the notebook: a model on CUDA
    # would initialise CUDA there. The decode caches go to $OFFROADSEG_CACHE (local scratch on Kaggle).
    monkeypatch.setenv("OFFROADSEG_ROOT", str(tmp_path))
    monkeypatch.delenv("OFFROADSEG_RUN", raising=False)
    monkeypatch.setenv(dataset.CACHE_ENV, str(tmp_path / "scratch"))
    make_small_dataset(tmp_path / "data", 4, 2, 0)
    ctx = context.start("02_train_segformer", run="r", profile="demo", data=tmp_path / "data")
    ctx.profile = dataclasses.replace(DEMO, image_size=(8, 16))
    scan = scan_dataset(tmp_path / "data", workers=1, progress=False)
    plan = dataclasses.replace(DEMO.deeplab, options={"output_stride": 32, "aspp_channels": 8, "decoder_channels": 8},
                               epochs=1, batch_size=2)
    config = dataclasses.replace(assembly.train_config(ctx.profile, plan), precision="fp32")
    result = teachers.train_teacher(ctx, "deeplab", scan, plan, config, progress=False)
    assert isinstance(result, list) and len(result) == 1 and result[0]["epoch"] == 1
    assert not _holds_torch_objects(result)
    assert (ctx.run.model_dir("deeplab") / "best.pt").exists()
    assert len(list((tmp_path / "scratch").glob("decode-*.images.npy"))) == 2  # train and val
    assert not (ctx.run.dir / "cache").exists()


def test_val_dataset_with_a_cache_dir_reads_the_decode_cache(tmp_path):
    make_small_dataset(tmp_path / "data", 2, 2, 0)
    scan = scan_dataset(tmp_path / "data", workers=1, progress=False)
    plain = assembly.val_dataset(scan, (8, 16))
    cached = assembly.val_dataset(scan, (8, 16), cache_dir=tmp_path / "cache")
    assert plain.store is None and cached.store is not None
    assert list((tmp_path / "cache").glob("decode-*.images.npy"))
    for index in range(len(plain)):
        (image_a, mask_a), (image_b, mask_b) = plain[index], cached[index]
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    _, val = assembly.datasets(scan, (8, 16), cache_dir=tmp_path / "cache")
    assert val.store is not None  # training's val loader gets it too
    with pytest.raises(ValueError, match="native_masks"):
        assembly.val_dataset(scan, (8, 16), native_masks=True, cache_dir=tmp_path / "cache")


def test_notebook_05_measures_the_distillation_cost_after_training():
    # distillation_cost runs teachers on the GPU: before engine.launch it would initialise CUDA in
    # the kernel, and the launcher could not start on two GPUs.
    import nbformat

    notebook = nbformat.read(Path(__file__).parents[1] / "notebooks" / "05_distill.ipynb", as_version=4)
    sources = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    launch_cell = next(i for i, source in enumerate(sources) if "engine.launch(" in source)
    for source in sources[:launch_cell]:
        assert not any(call in source for call in ("distillation_cost", "benchmark.", ".to(", "cuda")), source
    assert any("distillation_cost" in source for source in sources[launch_cell:])
