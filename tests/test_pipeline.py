import pytest

from helpers import make_small_dataset
from offroadseg import pipeline, training
from offroadseg.profiles import DEMO, FULL, get_profile
from offroadseg.scan import scan_dataset


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFROADSEG_ROOT", str(tmp_path))
    monkeypatch.delenv("OFFROADSEG_RUN", raising=False)
    make_small_dataset(tmp_path / "data", 4, 2, 1)
    return tmp_path


def test_start_records_run_and_env_override(project, monkeypatch):
    ctx = pipeline.start("01_data_scan", run="mine", profile="demo", data=project / "data", workers=1)
    assert ctx.run.dir == project / "outputs" / "mine" and ctx.profile is DEMO
    manifest = ctx.run.read_manifest()
    assert manifest["steps"]["01_data_scan"]["parameters"]["workers"] == 1
    assert manifest["data_root"] == str(project / "data")
    monkeypatch.setenv("OFFROADSEG_RUN", "nbval")
    assert pipeline.start("01_data_scan", run="mine", profile="demo", data=project / "data").run.name == "nbval"


def test_require_names_the_notebook_to_run(project):
    ctx = pipeline.start("04_ensemble", run="r", profile="demo", data=project / "data")
    with pytest.raises(FileNotFoundError, match="run notebook 02_train_segformer .*--only 02"):
        pipeline.require(ctx, "models/segformer/best.pt")
    with pytest.raises(FileNotFoundError, match="01_data_scan"):
        pipeline.require(ctx, "scan.json")
    with pytest.raises(FileNotFoundError, match="04_ensemble"):
        training.train_student(ctx, {}, DEMO.student, training.train_config(DEMO, DEMO.student))


def test_profiles_and_overrides():
    assert get_profile("full") is FULL and FULL.segformer.name == "segformer-b2"
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("huge")
    with pytest.raises(ValueError, match="unknown profile fields"):
        DEMO.with_overrides(colour="red")
    plan = training.model_plan(DEMO, "deeplab", epochs=2, lr=None)
    assert plan.epochs == 2 and plan.lr == DEMO.deeplab.lr and plan.name == DEMO.deeplab.name
    with pytest.raises(ValueError, match="unknown settings"):
        training.model_plan(DEMO, "segformer", depth=3)
    with pytest.raises(ValueError, match="unknown role"):
        training.model_plan(DEMO, "teacher")
    config = training.train_config(DEMO, plan, batch_size=2)
    assert config.epochs == 2 and config.batch_size == 2 and config.seed == DEMO.seed


def test_datasets_from_scan(project):
    scan = scan_dataset(project / "data", workers=1, progress=False)
    train, val = training.datasets(scan, (8, 16))
    assert len(train) == 4 and len(val) == 2
    image, mask = train[0]
    assert tuple(image.shape) == (3, 8, 16) and tuple(mask.shape) == (8, 16)
    native = training.val_dataset(scan, (8, 16), native_masks=True)
    assert tuple(native[0][1].shape) == (12, 20)
    scan["splits"]["val"]["images"] = []
    with pytest.raises(ValueError, match="0 usable val"):
        training.datasets(scan, (8, 16))
