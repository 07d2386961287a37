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
    bad = _notebook(tmp_path / "02_train_segformer.ipynb", "x = 1\nprint('pairs per split: train None')",
                    "print('about to fail')\nraise ValueError('bad thing in cell')")
    never = _notebook(tmp_path / "03_train_deeplab.ipynb", "print('never')")
    code = run_notebooks([good, bad, never], run="r1", profile="demo", data=None, out_dir=tmp_path / "out")
    out, err = capsys.readouterr()
    assert code == 1
    assert "01_data_scan" in out and "ok" in out.splitlines()[0]
    assert "02_train_segformer" in out and "FAILED" in out
    assert "ValueError: bad thing in cell" in err and "02_train_segformer.ipynb" in err
    # What the notebook printed before failing is shown, so the cause is visible without the executed copy.
    assert "last lines it printed:\n  | pairs per split: train None\n  | about to fail\nValueError: bad thing" in err
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


# ------------------------------------------------------------------ parameters and run folders (issue 9)


def test_set_values_are_json_or_python_literals_else_strings():
    from offroadseg.runner import parse_sets

    assert parse_sets(["epochs=1", "image_size=[512, 512]", "flag=true", "none=None", "t=(1, 2)", "name=margin",
                       "lr=6e-5", "path=weights/mit-b2"]) == {
        "epochs": 1, "image_size": [512, 512], "flag": True, "none": None, "t": (1, 2), "name": "margin",
        "lr": 6e-5, "path": "weights/mit-b2"}
    with pytest.raises(SystemExit, match="expected NAME=VALUE"):
        parse_sets(["epochs"])
    with pytest.raises(SystemExit, match="use the option --data instead"):
        parse_sets(["data=/x"])


def test_set_names_must_exist_in_a_selected_notebook(tmp_path):
    from offroadseg.runner import assign_parameters

    a = _notebook(tmp_path / "02_train_segformer.ipynb")
    nb = nbformat.read(a, as_version=4)
    nb.cells[0].source += "\nepochs = None\nbatch_size = None"
    nbformat.write(nb, a)
    b = _notebook(tmp_path / "04_ensemble.ipynb")
    nb = nbformat.read(b, as_version=4)
    nb.cells[0].source += "\ngrid_points = 11"
    nbformat.write(nb, b)
    common = {"run": "r", "profile": "demo", "weights": "/w"}
    params = assign_parameters([a, b], common, {"epochs": 1, "grid_points": 5})
    assert params[a] == {"run": "r", "profile": "demo", "epochs": 1}  # weights only where defined
    assert params[b] == {"run": "r", "profile": "demo", "grid_points": 5}
    with pytest.raises(SystemExit) as info:
        assign_parameters([a, b], common, {"epoch": 1})
    assert "--set epoch: no selected notebook has such a parameter" in str(info.value)
    assert "batch_size, epochs, grid_points" in str(info.value)


def test_relative_paths_resolve_from_where_the_command_ran(tmp_path):
    from offroadseg.runner import resolve_path_value

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "resnet101.pth").write_bytes(b"")
    assert resolve_path_value("weights/resnet101.pth", tmp_path) == str(tmp_path / "weights" / "resnet101.pth")
    assert resolve_path_value("./missing.pth", tmp_path) == str(tmp_path / "missing.pth")
    assert resolve_path_value("nvidia/mit-b2", tmp_path) == "nvidia/mit-b2"  # a hub id, not a path
    assert resolve_path_value("IMAGENET1K_V2", tmp_path) == "IMAGENET1K_V2" and resolve_path_value(3, tmp_path) == 3


def test_default_run_name_comes_from_the_profile_and_the_dataset(tmp_path):
    from helpers import TEST, TRAIN, make_small_dataset, write_pair

    from offroadseg.data import find_dataset
    from offroadseg.runner import default_run_name

    kaggle = tmp_path / "kaggle" / "input" / "datasets" / "me" / "falcon desert"
    make_small_dataset(kaggle / TRAIN, 1, 1, 0)
    write_pair(kaggle / TEST, "test", "t0")
    assert default_run_name("demo", find_dataset(tmp_path / "kaggle")) == "demo-falcon-desert"
    only_train = tmp_path / "solo"
    make_small_dataset(only_train, 1, 0, 0)
    assert default_run_name("full", find_dataset(only_train)) == f"full-{TRAIN}"


def test_a_second_runner_on_one_run_folder_refuses_and_a_killed_ones_lock_does_not_block(tmp_path):
    import subprocess
    import sys

    from offroadseg.pipeline import RunMismatch
    from offroadseg.runner import RunLock

    folder = tmp_path / "outputs" / "r"
    with RunLock(folder):
        with pytest.raises(RunMismatch, match=r"is in use by ./run_all.sh \(pid \d+ on .*started"):
            with RunLock(folder):
                pass
    # A runner killed hard leaves its lock file behind; the OS released the lock with the process.
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from offroadseg.runner import RunLock\n"
                               f"lock = RunLock(Path({str(folder)!r})).__enter__(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunMismatch, match=f"pid {holder.pid}"):
        RunLock(folder).__enter__()
    holder.kill()
    holder.wait()
    assert (folder / "lock").exists()
    with RunLock(folder):
        pass


def test_without_fcntl_the_run_lock_still_refuses_names_its_holder_and_outlives_a_killed_one(tmp_path):
    # As on Windows: no fcntl module at all. The children block it before importing anything.
    import subprocess
    import sys
    from pathlib import Path

    child = str(Path(__file__).parent / "no_fcntl_child.py")
    folder = tmp_path / "outputs" / "r"
    holder = subprocess.Popen([sys.executable, child, "hold", str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (folder / "lock.holder").read_text().startswith(f"./run_all.sh (pid {holder.pid} on ")
        other = subprocess.Popen([sys.executable, child, "try", str(folder)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert other.stdout.readline().strip() == "fcntl importable: False"
        refusal = other.stdout.readline()
        assert refusal.startswith(f"refused: run folder {folder} is in use by ./run_all.sh (pid {holder.pid} on "), refusal
    finally:
        holder.kill()  # as hard as a kill gets: nothing of the holder's own cleanup runs
        holder.wait()
    assert (folder / "lock").exists()  # left behind, yet it must not block
    out, err = other.communicate("go\n", timeout=60)
    assert other.returncode == 0, err[-2000:]
    assert out.splitlines() == ["acquired", "decode cache of 2 pairs: (6, 10, 3)"]
    assert not (folder / "lock.holder").exists()  # a finished run takes its name away


@pytest.mark.slow
def test_main_checks_the_data_before_any_run_folder_and_names_the_run(tmp_path, monkeypatch, capsys):
    from helpers import make_small_dataset

    from offroadseg import runner

    monkeypatch.setenv("OFFROADSEG_ROOT", str(tmp_path))
    monkeypatch.delenv("OFFROADSEG_RUN", raising=False)
    (tmp_path / "notebooks").mkdir()
    _notebook(tmp_path / "notebooks" / "01_data_scan.ipynb", "print('scanned', run, profile)")
    nb = nbformat.read(tmp_path / "notebooks" / "01_data_scan.ipynb", as_version=4)
    nb.cells[0].source += "\ndata = None\nworkers = None"
    nbformat.write(nb, tmp_path / "notebooks" / "01_data_scan.ipynb")
    (tmp_path / "empty").mkdir()
    assert runner.main(["--data", "empty", "--cwd", str(tmp_path)]) == 2
    assert "folder is empty" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()  # no run folder was touched
    make_small_dataset(tmp_path / "mydata", 2, 1, 1)
    assert runner.main(["--data", "mydata", "--cwd", str(tmp_path), "--set", "workers=1"]) == 0
    out = capsys.readouterr().out
    assert "run: demo-mydata (named after the profile and the dataset" in out
    executed = nbformat.read(tmp_path / "outputs" / "demo-mydata" / "notebooks" / "01_data_scan.ipynb", as_version=4)
    assert any("scanned demo-mydata demo" in o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    with pytest.raises(SystemExit, match="--set epochs: no selected notebook has such a parameter"):
        runner.main(["--data", "mydata", "--cwd", str(tmp_path), "--set", "epochs=1"])
