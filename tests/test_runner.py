import nbformat
import pytest

from offroadseg import runner
from offroadseg.cli import UsageError
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
    with pytest.raises(UsageError, match="no notebook matches '07'"):
        select_notebooks("07", tmp_path)


@pytest.mark.slow
def test_failing_notebook_stops_the_run_with_its_name_and_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OFFROADSEG_ROOT", str(tmp_path))
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
    # Where the time went, cell by cell, for the notebooks that ran (the failed one included).
    profile = read_json(tmp_path / "outputs" / "r1" / "profile.json")
    assert list(profile) == ["01_data_scan", "02_train_segformer"]
    cells = profile["02_train_segformer"]["cells"]
    assert [cell["source"] for cell in cells][-2:] == ["x = 1", "print('about to fail')"]  # the failing one too
    assert all(cell["seconds"] >= 0 for cell in cells) and profile["01_data_scan"]["seconds"] > 0


def test_the_slowest_cells_are_named_with_their_notebook_and_first_line():
    from offroadseg.runner import slowest_cells

    profiled = {"02_train_segformer": [{"cell": 4, "seconds": 190.0, "source": "teacher.train(num_processes)"},
                                       {"cell": 5, "seconds": 1.0, "source": "teacher.plot_curves()"}],
                "05_distill": [{"cell": 6, "seconds": 84.2, "source": "adapted = new_desert.adapt_student(...)"}]}
    lines = slowest_cells(profiled, count=2).splitlines()
    assert [line.split()[:4] for line in lines] == [["02", "cell", "4", "190.0"], ["05", "cell", "6", "84.2"]]
    assert lines[0].endswith("teacher.train(num_processes)")


@pytest.mark.slow
def test_second_run_over_a_run_folder_keeps_the_first_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    # The notebook records its step through context.start, as the real ones do, and writes a
    # result that depends on a parameter.
    monkeypatch.setenv("OFFROADSEG_ROOT", str(tmp_path))
    monkeypatch.delenv("OFFROADSEG_RUN", raising=False)
    (tmp_path / "data").mkdir()
    notebook = _notebook(
        tmp_path / "06_evaluate.ipynb",
        "import os\nfrom offroadseg.chapters import context\nfrom offroadseg.files import write_json\n"
        "os.environ['OFFROADSEG_ROOT'] = " + repr(str(tmp_path)) + "\n"
        "ctx = context.start('06_evaluate', run=run, profile=profile, data=data)\n"
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
    with pytest.raises(UsageError) as info:
        assign_parameters([a, b], common, {"epoch": 1})
    assert "--set epoch: no selected notebook has such a parameter" in str(info.value)
    assert "batch_size, epochs, grid_points" in str(info.value)


@pytest.mark.slow  # a few seconds alone: subprocesses (or a fit) each importing torch
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
    assert runner.main(["--data", "mydata", "--cwd", str(tmp_path), "--set", "epochs=1"]) == 2
    assert "--set epochs: no selected notebook has such a parameter" in capsys.readouterr().err


# ------------------------------------------------------------------ the command line and its modes (issue 22)


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A project root of its own with two notebooks, where making the demo desert and running
    notebooks are recorded instead of done: `calls` lists ("desert", root) and ("run", kwargs)."""
    monkeypatch.setenv("OFFROADSEG_ROOT", str(tmp_path))
    monkeypatch.delenv("OFFROADSEG_RUN", raising=False)
    monkeypatch.delenv(runner.PROG_ENV, raising=False)
    (tmp_path / "notebooks").mkdir()
    for name in ("01_data_scan", "02_train_segformer"):
        _notebook(tmp_path / "notebooks" / f"{name}.ipynb")
    calls = []

    def make_demo_desert(root):
        calls.append(("desert", root))
        return {"counts": {"train": 1}, "generated": 1}

    def run_notebooks(notebooks, run, profile, data, out_dir, sets=None, weights=None):
        calls.append(("run", {"notebooks": [n.stem for n in notebooks], "run": run, "profile": profile, "data": data,
                              "out_dir": out_dir, "sets": sets, "weights": weights}))
        return 0

    monkeypatch.setattr(runner, "make_demo_desert", make_demo_desert)
    monkeypatch.setattr(runner, "run_notebooks", run_notebooks)
    return tmp_path, calls


def test_without_data_the_demo_desert_is_made_first(checkout, capsys):
    from helpers import make_small_dataset

    root, calls = checkout
    assert runner.main(["--only", "02", "--run", "probe", "--set", "epochs=1"]) == 0
    assert calls[0] == ("desert", root / "data" / "demo_desert")
    assert calls[1] == ("run", {"notebooks": ["02_train_segformer"], "run": "probe", "profile": "demo", "data": None,
                                "out_dir": root / "outputs" / "probe" / "notebooks", "sets": {"epochs": 1},
                                "weights": None})
    assert "data: demo desert in data/demo_desert: {'train': 1} (made now)" in capsys.readouterr().out
    # With --data: no desert, the data checked and the run named after it.
    make_small_dataset(root / "mine", 1, 1, 1)
    calls.clear()
    assert runner.main(["--data", "mine", "--cwd", str(root)]) == 0
    assert [kind for kind, _ in calls] == ["run"]
    assert calls[0][1]["data"] == str(root / "mine") and calls[0][1]["run"] == "demo-mine"


def test_an_unknown_profile_is_refused_with_the_valid_ones(checkout, capsys):
    from offroadseg.profiles import PROFILES

    root, calls = checkout
    with pytest.raises(SystemExit) as info:
        runner.main(["--profile", "nope"])
    assert info.value.code == 2 and not calls
    err = capsys.readouterr().err
    assert "--profile" in err and "'nope'" in err and all(f"'{name}'" in err for name in PROFILES)


def test_bad_data_or_weights_stop_before_any_work_naming_the_path_and_the_fix(checkout, capsys, monkeypatch):
    root, calls = checkout
    monkeypatch.setenv(runner.PROG_ENV, "./run_all.sh")
    (root / "file.zip").write_bytes(b"")
    assert runner.main(["--data", "nosuch", "--cwd", str(root)]) == 2
    assert capsys.readouterr().err.strip() == f"./run_all.sh: --data {root / 'nosuch'}: no such folder"
    assert runner.main(["--data", "file.zip", "--cwd", str(root)]) == 2
    assert "give the folder holding the unzipped dataset" in capsys.readouterr().err
    assert runner.main(["--weights", "w", "--profile", "full", "--cwd", str(root)]) == 2
    err = capsys.readouterr().err
    assert str(root / "w") in err and "python -m offroadseg.weights download --profile full --to weights/" in err
    assert runner.main(["--only", "07"]) == 2
    assert "no notebook matches '07' (available: 01_data_scan, 02_train_segformer)" in capsys.readouterr().err
    assert not calls and not (root / "outputs").exists()  # no desert made, no run folder touched


def test_the_test_mode_runs_the_three_tiers_in_order_and_stops_at_the_first_failure(checkout, monkeypatch, capsys):
    import subprocess
    import sys

    root, calls = checkout
    ran, codes = [], {}

    def fake_run(command, cwd=None, **kwargs):
        ran.append(command)
        return subprocess.CompletedProcess(command, codes.get(tuple(command), 0))

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    python = sys.executable
    lint = [python, "-m", "ruff", "check", "."]
    workers = runner.fast_tier_workers()
    fast = [python, "-m", "pytest", *(["-n", str(workers)] if workers > 1 else []), "-m", "not slow", "tests"]
    slow = [python, "-m", "pytest", "--nbval", "-m", "slow", "tests", "notebooks"]

    assert runner.main(["--test", "--cwd", str(root)]) == 0
    assert ran == [lint, fast, slow] and calls == [("desert", root / "data" / "demo_desert")]
    out = capsys.readouterr().out
    assert out.index("test: lint") < out.index("test: fast unit tests") < out.index("test: slow tests and the notebooks")

    ran.clear()
    codes[tuple(fast)] = 1
    assert runner.run_tests(root) == 1 and ran == [lint, fast]  # the slow tier never starts
    ran.clear()
    codes[tuple(lint)] = 1
    assert runner.run_tests(root) == 2 and ran == [lint]
    assert "'ruff check . --fix' repairs" in capsys.readouterr().err

    # A checkout whose notebooks/ differs from git (git diff --quiet exits 1): a warning first, then the tiers.
    codes.clear()
    (root / ".git").write_text("gitdir: elsewhere\n")  # a worktree's .git is a file
    monkeypatch.setattr(runner.shutil, "which", lambda name: "/usr/bin/git")
    codes[("git", "diff", "--quiet", "--", "notebooks/")] = 1
    ran.clear()
    assert runner.run_tests(root) == 0 and ran[0][:2] == ["git", "diff"] and ran[1:] == [lint, fast, slow]
    assert "notebooks/ differs from the committed version" in capsys.readouterr().err


def test_test_and_lab_refuse_the_options_that_choose_a_run(checkout, capsys):
    root, calls = checkout
    for argv in (["--test", "--data", "x"], ["--lab", "--run", "r", "--set", "epochs=1"], ["--test", "--lab"]):
        with pytest.raises(SystemExit) as info:
            runner.main(argv)
        assert info.value.code == 2, argv
    err = capsys.readouterr().err
    assert "--test runs the test suite" in err and "drop --data\n" in err
    assert "--lab opens the notebooks" in err and "drop --run, --set\n" in err and "not allowed with argument" in err
    assert not calls


def test_lab_copies_the_notebooks_and_keeps_existing_copies(checkout, monkeypatch, capsys):
    import sys

    root, calls = checkout
    (root / "lab").mkdir()
    (root / "lab" / "01_data_scan.ipynb").write_text("my edits")

    class Exec(Exception):
        pass

    def fake_execv(path, argv):
        raise Exec(path, argv)

    monkeypatch.setattr(runner.os, "execv", fake_execv)
    with pytest.raises(Exec) as info:
        runner.main(["--lab", "--cwd", str(root)])
    assert info.value.args == (sys.executable, [sys.executable, "-m", "jupyter", "lab", f"--notebook-dir={root / 'lab'}"])
    assert (root / "lab" / "01_data_scan.ipynb").read_text() == "my edits"
    assert (root / "lab" / "02_train_segformer.ipynb").read_bytes() == (root / "notebooks" / "02_train_segformer.ipynb").read_bytes()
    assert "JupyterLab on lab/" in capsys.readouterr().out and not calls


def test_the_fast_tier_spreads_over_the_cores_where_pytest_xdist_is_installed(monkeypatch):
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda name: object())  # as if installed
    monkeypatch.setattr(runner, "usable_cpus", lambda: 16)
    assert runner.fast_tier_workers() == 4  # each worker imports torch: 4 at most
    monkeypatch.setattr(runner, "usable_cpus", lambda: 2)
    assert runner.fast_tier_workers() == 2
    fast = runner.suite_tiers()[1][1]
    assert fast[fast.index("-n") + 1] == "2" and fast[-3:] == ["-m", "not slow", "tests"]
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda name: None)  # no pytest-xdist: one process
    assert runner.fast_tier_workers() == 1 and "-n" not in runner.suite_tiers()[1][1]
