import nbformat
import pytest

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
