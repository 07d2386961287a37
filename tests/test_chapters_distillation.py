"""Notebook 05's distillation (offroadseg.chapters.distillation): the ensemble of 04 taught to the student."""

import pytest
from chapter_helpers import TINY, start, trained_run

from offroadseg import benchmark
from offroadseg.chapters import assembly, distillation
from offroadseg.files import read_json
from offroadseg.models import build_model
from offroadseg.profiles import DEMO, DistillConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_distillation_weighs_the_teachers_as_ensemble_json_says(project):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    scan = read_json(ctx.run.scan)
    plan = assembly.model_plan(DEMO, "student", name=TINY["name"], options=TINY["options"])  # from the deeplab teacher
    model, distiller = distillation.distillation_setup(ctx, scan, plan, DistillConfig(beta=0.0))
    assert distiller.teachers.weights == pytest.approx([0.25, 0.75])
    assert [m.spec for m in distiller.teachers.members] == [m.spec for m in assembly.load_teachers(ctx).values()]
    assert model.student.spec["name"] == TINY["name"]


def test_the_student_is_judged_against_the_ensemble_of_notebook_04(project, monkeypatch):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    monkeypatch.setattr(benchmark, "latency", lambda model, input_size: {"median_ms": 12.0, "input_size": input_size})
    student = build_model(TINY["name"], **TINY["options"])
    outcome = distillation.student_against_ensemble(ctx, student, {"val_miou": 0.45})
    assert outcome["retained"] == pytest.approx(0.9) and outcome["speedup"] == pytest.approx(2.5)
    assert outcome["ensemble"]["miou"] == 0.5 and outcome["student"]["ms_per_image"] == 12.0
    assert outcome["student"]["params"] == sum(p.numel() for p in student.parameters())
