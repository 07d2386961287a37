import json
import subprocess
import sys

import pytest

from offroadseg import runs
from offroadseg.files import atomic_open, read_json, write_json


def test_record_step_writes_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFROADSEG_ROOT", str(tmp_path))
    run = runs.run_dir("demo")
    assert run.dir == tmp_path / "outputs" / "demo"
    runs.record_step(run, "01_data_scan", {"workers": 2}, profile="demo", data_root="/data", seed=0)
    manifest = runs.record_step(run, "01_data_scan", {}, profile="demo", data_root="/data", finished=True,
                                extra={"usable": 3})
    on_disk = read_json(run.manifest)
    assert on_disk == json.loads(json.dumps(manifest))
    step = on_disk["steps"]["01_data_scan"]
    assert step["parameters"] == {"workers": 2} and step["usable"] == 3 and step["seconds"] >= 0
    assert on_disk["profile"] == "demo" and on_disk["data_root"] == "/data" and on_disk["seeds"] == {"01_data_scan": 0}
    assert on_disk["packages"]["numpy"] and on_disk["packages"]["python"]
    assert set(on_disk["code_revision"]) == {"commit", "dirty"}


@pytest.mark.parametrize("bad", ["", "a/b", "..", "x\\y"])
def test_bad_run_names(bad):
    with pytest.raises(ValueError, match="run name"):
        runs.run_dir(bad)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as handle:
            handle.write("{half")
            raise RuntimeError("crash mid-write")
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_write_survives_a_killed_process(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"old")
    code = (
        "import os, sys\n"
        "from offroadseg.files import atomic_open\n"
        f"with atomic_open({str(path)!r}) as h:\n"
        "    h.write(b'x' * 1000)\n"
        "    h.flush()\n"
        "    os._exit(9)\n"  # dies without running any cleanup
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert path.read_bytes() == b"old"


def test_read_json_names_a_broken_file(tmp_path):
    path = tmp_path / "scan.json"
    path.write_text("{oops")
    with pytest.raises(ValueError, match="scan.json: not valid JSON"):
        read_json(path)
