import nbformat
import pytest

from offroadseg.files import read_json
from offroadseg.runner import run_notebooks, select_notebooks


def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("run = 'x'\nprofile = 'demo'", metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_select_notebooks_by_number_and_errors(tmp_path):
    for name in ("01_data_scan", "02_train_segformer", "03_train_deeplab"):
        _notebook(tmp_path / f"{name}.ipynb")
    assert [p.stem for p in select_notebooks(None, tmp_path)] == ["01_data_scan", "02_train_segformer", "03_train_deeplab"]
    assert [p.stem for p in select_notebooks("03,1", tmp_path)] == ["01_data_scan", "03_train_deeplab"]
    with pytest.raises(SystemExit, match="no notebook matches '07'"):
        select_notebooks("07", tmp_path)


@pytest.mark.slow
def test_failing_notebook_stops_the_run_with_its_name_and_error(tmp_path, capsys):
    good = _notebook(tmp_path / "01_data_scan.ipynb", "print(run, profile)")
    bad = _notebook(tmp_path / "02_train_segformer.ipynb", "x = 1", "raise ValueError('bad thing in cell')")
    never = _notebook(tmp_path / "03_train_deeplab.ipynb", "print('never')")
    code = run_notebooks([good, bad, never], run="r1", profile="demo", data=None, out_dir=tmp_path / "out")
    out, err = capsys.readouterr()
    assert code == 1
    assert "01_data_scan" in out and "ok" in out.splitlines()[0]
    assert "02_train_segformer" in out and "FAILED" in out
    assert "ValueError: bad thing in cell" in err and "02_train_segformer.ipynb" in err
    assert not (tmp_path / "out" / "03_train_deeplab.ipynb").exists()
    executed = nbformat.read(tmp_path / "out" / "01_data_scan.ipynb", as_version=4)
    assert any("r1 demo" in o.get("text", "") for c in executed.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_second_run_over_a_run_folder_keeps_the_first_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    # The notebook records its step through pipeline.start, as the real ones do, and writes a
    # result that depends on a parameter.
    monkeypatch.setenv("OFFROADSEG_ROOT", str(tmp_path))
    monkeypatch.delenv("OFFROADSEG_RUN", raising=False)
    (tmp_path / "data").mkdir()
    notebook = _notebook(
        tmp_path / "06_evaluate.ipynb",
        "import os\nfrom offroadseg import pipeline\nfrom offroadseg.files import write_json\n"
        "os.environ['OFFROADSEG_ROOT'] = " + repr(str(tmp_path)) + "\n"
        "ctx = pipeline.start('06_evaluate', run=run, profile=profile, data=data)\n"
        "write_json(ctx.run.dir / 'metrics.json', {'stamp': len(list(ctx.run.dir.glob('earlier/*')))})",
    )
    nb = nbformat.read(notebook, as_version=4)
    nb.cells[0].source += "\ndata = None"
    nbformat.write(nb, notebook)
    out_dir = tmp_path / "outputs" / "r" / "notebooks"
    data = str(tmp_path / "data")

    assert run_notebooks([notebook], run="r", profile="demo", data=data, out_dir=out_dir) == 0
    assert "exists" not in capsys.readouterr().out
    first_executed = (out_dir / "06_evaluate.ipynb").read_bytes()

    assert run_notebooks([notebook], run="r", profile="demo", data=data, out_dir=out_dir) == 0
    out = capsys.readouterr().out
    assert "run 'r' exists" in out and "earlier" in out
    kept = next((tmp_path / "outputs" / "r" / "earlier").iterdir())
    assert (kept / "notebooks" / "06_evaluate.ipynb").read_bytes() == first_executed
    assert read_json(kept / "metrics.json") == {"stamp": 0}
    assert read_json(tmp_path / "outputs" / "r" / "metrics.json") == {"stamp": 1}

    # Another profile over the same folder: refused up front, nothing run, nothing moved.
    assert run_notebooks([notebook], run="r", profile="full", data=data, out_dir=out_dir) == 1
    assert "profile 'demo' (now 'full')" in capsys.readouterr().err
    assert len(list((tmp_path / "outputs" / "r" / "earlier").iterdir())) == 1
