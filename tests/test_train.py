"""python -m offroadseg.train: the notebooks' training from a shell, one process or many (torchrun)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from chapter_helpers import tiny_checkpoint, unlabelled_folder
from helpers import assert_names, make_small_dataset

from offroadseg import runs, train
from offroadseg.files import read_json, write_json
from offroadseg.runs import RunLock
from offroadseg.scan import scan_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--set", "epochs=1", "--set", "image_size=[32, 48]", "--set", "batch_size=2"]


def run_folder(project, name="r") -> runs.Run:
    return runs.run_dir(name, project)


@pytest.mark.slow
def test_teacher_trains_as_notebook_02_does_scanning_first_and_a_second_call_reuses_it(project, capsys):
    data = str(project / "data")
    assert train.main(["teacher", "--model", "segformer", "--data", data, "--run", "r", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "scan.json not found: scanning the data first" in out and "segformer: best val mIoU" in out
    run = run_folder(project)
    assert sorted(path.name for path in run.model_dir("segformer").iterdir()) == ["best.pt", "history.json", "last.pt"]
    assert len(read_json(run.history("segformer"))) == 1
    manifest = run.read_manifest()
    assert manifest["profile"] == "demo" and manifest["data_root"] == data
    step = manifest["steps"]["02_train_segformer"]
    assert step["parameters"]["epochs"] == 1 and step["parameters"]["image_size"] == [32, 48]
    assert step["by"] == "python -m offroadseg.train" and step["best_epoch"] == 1 and "finished" in step
    assert manifest["steps"]["01_data_scan"]["by"] == "python -m offroadseg.train"
    assert not (run.dir / runs.LOCK_HOLDER_FILE).exists()  # the lock was held and let go
    # The same command again: the finished model is reused, as a notebook rerun reuses it.
    assert train.main(["teacher", "--model", "segformer", "--data", data, "--run", "r", *SMALL]) == 0
    assert "has finished 1 epochs" in capsys.readouterr().out
    assert len(read_json(run.history("segformer"))) == 1


@pytest.mark.slow
def test_average_scores_the_last_kept_epochs_of_a_model(project, capsys):
    data = str(project / "data")
    small = ["--data", data, "--run", "r", "--set", "image_size=[32, 48]", "--set", "batch_size=2"]
    assert train.main(["teacher", "--model", "segformer", *small, "--set", "epochs=2", "--set", "keep_epochs=2",
                       "--set", "ema=0.9"]) == 0
    capsys.readouterr()
    history = read_json(run_folder(project).history("segformer"))
    assert all(row["weights"] in ("ema", "raw") for row in history)  # --set ema reached fit
    assert train.main(["average", "--model", "segformer", "--last", "2", "--data", data, "--run", "r"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert_names(line, "models/segformer_avg2/best.pt", "epochs [1, 2] of segformer averaged", "val mIoU",
                 "(its best.pt")
    assert train.main(["average", "--model", "segformer", "--last", "3", "--data", data, "--run", "r"]) == 2
    assert_names(capsys.readouterr().err, "holds 2 epoch file(s), 3 needed", "--set keep_epochs=3")


@pytest.mark.parametrize("argv, parts", [
    (["teacher", "--set", "alpha=0.5"], ["--set alpha", "`teacher` has no such parameter", "epochs", "image_size"]),
    (["adapt", "--set", "depth=3"], ["--set depth", "adapt_threshold", "temperature"]),
    (["student", "--model", "deeplab"], ["--model chooses a teacher", "--set model=NAME"]),
    (["teacher", "--model", "student"], ["--model student", "segformer, deeplab, both"]),
    (["average", "--last", "1"], ["average takes --model", "--last 2 or more"]),
    (["teacher", "--track", "nonsense"], ["--track nonsense", "tensorboard", "wandb"]),
    (["teacher", "--run", "../up"], ["--run"]),
])
def test_mistakes_on_the_command_line_exit_2_saying_what_to_do(project, capsys, argv, parts):
    assert train.main([*argv, "--data", str(project / "data")]) == 2
    assert_names(capsys.readouterr().err, "python -m offroadseg.train:", *parts)
    assert not (project / "outputs" / "r").exists()


def test_a_tracker_that_is_not_installed_names_the_package(project, capsys, monkeypatch):
    monkeypatch.setattr("offroadseg.tracking.get_available_trackers", lambda: [])
    assert train.main(["teacher", "--track", "tensorboard", "--data", str(project / "data")]) == 2
    assert_names(capsys.readouterr().err, "--track tensorboard", "pip install tensorboard")


def test_a_run_folder_in_use_is_refused(project):
    data = str(project / "data")
    with RunLock(run_folder(project).dir, holder="./run_all.sh"):
        with pytest.raises(runs.RunMismatch) as error:
            train.main(["teacher", "--model", "segformer", "--data", data, "--run", "r", *SMALL])
    assert_names(error, "in use by ./run_all.sh")
    assert not run_folder(project).model_dir("segformer").exists()


def test_student_needs_notebook_04_and_names_it(project):
    data = str(project / "data")
    train.main(["teacher", "--model", "segformer", "--data", data, "--run", "r", *SMALL])
    with pytest.raises(FileNotFoundError) as error:
        train.main(["student", "--data", data, "--run", "r", *SMALL])
    assert_names(error, "ensemble.json", "04_ensemble")


@pytest.mark.slow
def test_student_then_adapt_train_as_notebook_05_does(project, tmp_path, capsys):
    """The student distilled from the run's ensemble, then the adapted student on a folder of new images:
    the files notebook 05 leaves (adaptation.json with its re-estimated BatchNorm statistics included)."""
    run = run_folder(project)
    context_args = ["--data", str(project / "data"), "--run", "r", *SMALL]
    run.dir.mkdir(parents=True)
    write_json(run.scan, scan_dataset(project / "data", workers=1, progress=False))  # as notebook 01 writes it
    for seed, role in enumerate(("segformer", "deeplab")):  # teachers as 02 and 03 leave them, tiny
        run.model_dir(role).mkdir(parents=True, exist_ok=True)
        tiny_checkpoint(run.checkpoint(role), seed)
    val = {"ensemble": {"miou": 0.5, "pixel_acc": 0.8, "per_class_iou": {}, "ms_per_image": 30.0, "params": 10}}
    runs.write_ensemble(run, 0.5, [], flips=["h"], scales=None, flip_candidates=[], input_size=(32, 48), val=val)
    student = ["--set", "student_init=none", "--set", "beta=0"]
    assert train.main(["student", *context_args, *student]) == 0
    assert sorted(path.name for path in run.model_dir("student").iterdir()) == ["best.pt", "history.json", "last.pt"]
    assert run.read_manifest()["steps"]["05_distill"]["by"] == "python -m offroadseg.train"
    folder = unlabelled_folder(tmp_path / "new_desert")
    capsys.readouterr()
    assert train.main(["adapt", *context_args, *student, "--set", f"adapt={folder}", "--set", "adapt_threshold=0.05"]) == 0
    out = capsys.readouterr().out
    assert "3 unlabelled images of the new desert" in out and "BatchNorm statistics re-estimated" in out
    record = read_json(run.adaptation_record)
    assert len(record["images"]) == 3 and record["threshold"] == 0.05 and record["batchnorm"]["layers"] > 0
    assert len(read_json(run.history("student_adapted"))) == 1


def torchrun(node_rank: int, port: int, argv: list[str], env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "offroadseg.train", *argv]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_files(run: runs.Run) -> dict:
    """Each file under models/ (relative path) with, for history.json, its rows' keys and epochs."""
    files = {}
    for path in sorted((run.dir / "models").rglob("*")):
        if path.is_file():
            rows = read_json(path) if path.name == "history.json" else None
            files[path.relative_to(run.dir).as_posix()] = rows and [(row["epoch"], sorted(row)) for row in rows]
    return files


@pytest.mark.slow
def test_torchrun_on_two_nodes_writes_what_one_process_writes(tmp_path):
    """Two nodes of one process each on localhost (gloo, CPU), as on a cluster with a shared file system:
    one demo epoch, and the same files as a single-process run of the same command."""
    make_small_dataset(tmp_path / "data", 8, 2, 1)
    env = {**os.environ, "OFFROADSEG_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(train.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("OFFROADSEG_RUN", None)
    argv = ["teacher", "--model", "segformer", "--data", str(tmp_path / "data"), *SMALL]
    # --run-name: torchrun's own parser takes --run for an abbreviation of its --run-path.
    port = free_port()
    nodes = [torchrun(rank, port, [*argv, "--run-name", "two_nodes"], env) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n\n".join(outputs)
    assert "x 2 processes" in outputs[0]
    single = subprocess.run([sys.executable, "-m", "offroadseg.train", *argv, "--run", "one"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    two, one = runs.run_dir("two_nodes", tmp_path), runs.run_dir("one", tmp_path)
    assert model_files(two) == model_files(one) and "models/segformer/best.pt" in model_files(one)
    assert read_json(two.history("segformer"))[0]["backend"]["processes"] == 2
    assert read_json(one.history("segformer"))[0]["backend"]["processes"] == 1
    for run in (two, one):
        assert set(run.read_manifest()["steps"]) == {"01_data_scan", "02_train_segformer"}


def notebook_parameters(name: str) -> set[str]:
    """The names the parameters cell of notebooks/<name>.ipynb assigns."""
    import ast

    notebook = read_json(Path(__file__).resolve().parents[1] / "notebooks" / f"{name}.ipynb")
    cell = next(c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    return {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets}


@pytest.mark.parametrize("command, notebooks", [("teacher", ["02_train_segformer", "03_train_deeplab"]),
                                                ("student", ["05_distill"]), ("adapt", ["05_distill"])])
def test_each_commands_settings_are_its_notebooks_parameters(command, notebooks):
    """--set takes the names the notebook takes, so `--set epochs=...` means the same in both."""
    for name in notebooks:
        assert set(train.valid_settings(command)) <= notebook_parameters(name), name
