"""What the chapters build from a run (offroadseg.chapters.assembly): plans, datasets, the run's models."""

import pytest
from chapter_helpers import start, trained_run

from offroadseg.chapters import assembly
from offroadseg.ensemble import Ensemble, TestTimeAugmentation
from offroadseg.profiles import DEMO

pytestmark = pytest.mark.usefixtures("one_thread")


def test_student_init_none_starts_the_student_afresh():
    assert DEMO.student.init_from == "deeplab"  # the demo student starts from the DeepLab teacher
    assert assembly.model_plan(DEMO, "student", init_from=None).init_from == "deeplab"  # None: the profile's
    assert assembly.model_plan(DEMO, "student", init_from="segformer").init_from == "segformer"
    assert assembly.model_plan(DEMO, "student", init_from="none").init_from is None


@pytest.mark.slow
def test_evaluation_models_are_the_runs_models_fused_as_notebook_04_chose(project):
    ctx = start(project, "06_evaluate")
    with pytest.raises(FileNotFoundError, match="04_ensemble"):
        assembly.evaluation_models(ctx)
    trained_run(ctx)
    models = assembly.evaluation_models(ctx)
    assert list(models) == ["segformer", "deeplab", "ensemble", "ensemble_tta", "student", "student_tta"]
    ensemble, ensemble_tta = models["ensemble"], models["ensemble_tta"]
    assert isinstance(ensemble, Ensemble) and ensemble.weights == pytest.approx([0.25, 0.75])
    assert list(ensemble.members) == [models["segformer"], models["deeplab"]]
    assert isinstance(ensemble_tta, TestTimeAugmentation) and ensemble_tta.model is ensemble
    assert ensemble_tta.flips == ("h",) and ensemble_tta.scales is None
    assert models["student_tta"].model is models["student"] and models["student_tta"].flips == ("h",)
    assert not models["student"].training  # checkpoints load in eval mode
    (ctx.run.model_dir("student") / "best.pt").unlink()
    with pytest.raises(FileNotFoundError, match="05_distill"):
        assembly.evaluation_models(ctx)
