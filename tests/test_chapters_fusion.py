"""Notebook 04's scores (offroadseg.chapters.fusion): each candidate's val scores and cost, as ensemble.json holds them."""

import pytest
from chapter_helpers import SIZE, loader_of, start, trained_run

from offroadseg.chapters import assembly, fusion
from offroadseg.ensemble import Ensemble, TestTimeAugmentation
from offroadseg.evaluate import choose_tta, evaluate_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_val_scores_are_the_val_part_of_ensemble_json(project, capsys):
    ctx = start(project, "04_ensemble")
    trained_run(ctx, with_ensemble=False)
    teachers = assembly.load_teachers(ctx)
    loader = loader_of(ctx)
    results = fusion.val_scores({"deeplab": teachers["deeplab"], "ensemble": Ensemble(list(teachers.values()))},
                                  loader, SIZE)
    assert list(results) == ["deeplab", "ensemble"]
    deeplab = results["deeplab"]
    assert set(deeplab) == {"miou", "pixel_acc", "per_class_iou", "ms_per_image", "params"}
    assert deeplab["miou"] == evaluate_model(teachers["deeplab"], loader)["miou"] and deeplab["ms_per_image"] > 0
    assert results["ensemble"]["params"] == 2 * deeplab["params"]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["deeplab", "ensemble"] and "ms/img" in lines[0]


@pytest.mark.slow
def test_scores_choose_tta_measured_are_taken_instead_of_a_second_pass(project, capsys, monkeypatch):
    ctx = start(project, "04_ensemble")
    trained_run(ctx, with_ensemble=False)
    teachers = assembly.load_teachers(ctx)
    loader = loader_of(ctx)
    ensemble = Ensemble(list(teachers.values()))
    flips, table = choose_tta(ensemble, loader, candidates=(("h",),))
    scored = fusion.scored_by_tta(table, flips)
    assert scored == {"ensemble": table[0], "ensemble_tta": table[1]}
    assert "ensemble_tta" not in fusion.scored_by_tta(table, flips, scales=[0.75, 1.25])  # not what it tried
    passes = []
    monkeypatch.setattr(fusion, "evaluate_model", lambda predictor, loader: passes.append(predictor) or evaluate_model(
        predictor, loader))
    results = fusion.val_scores({"deeplab": teachers["deeplab"], "ensemble": ensemble,
                                 "ensemble_tta": TestTimeAugmentation(ensemble, flips=flips)}, loader, SIZE, scored=scored)
    assert passes == [teachers["deeplab"]]  # the ensemble's two predictors were scored once, by choose_tta
    assert results["ensemble"]["miou"] == evaluate_model(ensemble, loader)["miou"]
    assert results["ensemble_tta"]["per_class_iou"] == table[1]["per_class_iou"]
