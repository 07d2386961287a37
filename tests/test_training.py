"""The notebooks' glue in offroadseg.training: the run's models and their ensemble as 05 loads them."""

import pytest
import torch
from helpers import make_small_dataset

from offroadseg import pipeline, runs, training
from offroadseg.engine import save_checkpoint
from offroadseg.files import read_json, write_json
from offroadseg.models import build_model
from offroadseg.profiles import DEMO
from offroadseg.scan import scan_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (16, 24)  # the model input of these runs
TINY = {"name": "deeplabv3plus-resnet18", "options": {"output_stride": 32, "aspp_channels": 8, "decoder_channels": 8}}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFROADSEG_ROOT", str(tmp_path))
    monkeypatch.delenv("OFFROADSEG_RUN", raising=False)
    make_small_dataset(tmp_path / "data", 4, 2, 1)
    return tmp_path


def start(project, step: str):
    """The notebook's pipeline.start with the small input, and the run's scan.json as notebook 01 writes it."""
    ctx = pipeline.start(step, run="r", profile="demo", data=project / "data", image_size=list(SIZE))
    if not ctx.run.scan.exists():
        write_json(ctx.run.scan, scan_dataset(project / "data", workers=1, progress=False))
    return ctx


def tiny_checkpoint(path, seed: int = 0) -> None:
    """best.pt of a tiny untrained model, as engine.fit writes it (spec and weights) for load_model."""
    torch.manual_seed(seed)
    model = build_model(TINY["name"], **TINY["options"])
    save_checkpoint({"spec": model.spec, "model": model.state_dict()}, path)


def trained_run(ctx, with_ensemble: bool = True) -> None:
    """Checkpoints of both teachers and the student, and ensemble.json, as notebooks 02-05 leave a run."""
    for seed, role in enumerate(("segformer", "deeplab", "student")):
        (ctx.run.model_dir(role)).mkdir(parents=True)
        tiny_checkpoint(ctx.run.model_dir(role) / "best.pt", seed)
    if with_ensemble:
        val = {"ensemble": {"miou": 0.5, "pixel_acc": 0.8, "per_class_iou": {}, "ms_per_image": 30.0, "params": 10}}
        runs.write_ensemble(ctx.run, 0.25, [], flips=["h"], scales=None, flip_candidates=[], input_size=SIZE, val=val)


def test_distillation_weighs_the_teachers_as_ensemble_json_says(project):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    scan = read_json(ctx.run.scan)
    plan = training.model_plan(DEMO, "student", name=TINY["name"], options=TINY["options"])  # from the deeplab teacher
    model, distiller = training.distillation_setup(ctx, scan, plan, beta=0.0)
    assert distiller.teachers.weights == pytest.approx([0.25, 0.75])
    assert [m.spec for m in distiller.teachers.members] == [m.spec for m in training.load_teachers(ctx).values()]
    assert model.student.spec["name"] == TINY["name"]
