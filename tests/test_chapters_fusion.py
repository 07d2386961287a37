"""Notebook 04's scores (offroadseg.chapters.fusion): each candidate's val scores and cost, as ensemble.json holds them."""

import pytest
from chapter_helpers import SIZE, loader_of, start, trained_run

from offroadseg.chapters import assembly, fusion
from offroadseg.ensemble import Ensemble
from offroadseg.evaluate import evaluate_model

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
