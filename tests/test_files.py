"""Atomic writes and JSON (offroadseg.files): a write that fails or is killed leaves the old file whole."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offroadseg.files import atomic_open, read_json, write_bytes, write_json


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as handle:
            handle.write("{half")
            raise RuntimeError("crash mid-write")
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_failed_first_write_leaves_no_file_at_all(tmp_path):
    path = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):  # BaseException too: Ctrl-C in a notebook cleans up
        with atomic_open(path) as handle:
            handle.write(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


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


def test_the_target_appears_only_when_the_write_finishes(tmp_path):
    path = tmp_path / "out.bin"
    with atomic_open(path) as handle:
        handle.write(b"first half ")
        assert not path.exists()  # still the temporary file beside it
        (temporary,) = tmp_path.iterdir()
        assert temporary.name.startswith(".out.bin.") and temporary.name.endswith(".tmp")
        handle.write(b"second half")
    assert path.read_bytes() == b"first half second half"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_write_bytes_makes_folders_and_replaces(tmp_path):
    path = tmp_path / "deep" / "er" / "blob.bin"
    write_bytes(path, b"one")
    write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and [p.name for p in path.parent.iterdir()] == ["blob.bin"]


def test_written_files_get_the_permissions_a_plain_open_gives(tmp_path):
    previous = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        atomic = tmp_path / "atomic.txt"
        with atomic_open(atomic, "w") as handle:
            handle.write("x")
    finally:
        os.umask(previous)
    # mkstemp's files are private (0600); a run folder's files must stay readable to others as usual.
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644


def test_json_round_trip_keeps_order_unicode_and_converts_numpy_and_paths(tmp_path):
    path = tmp_path / "metrics.json"
    record = {
        "zeta": 1,
        "alpha": [1.5, None, True, "Dünen"],
        "miou": np.float32(0.5),
        "pixels": np.int64(7),
        "matrix": np.arange(4).reshape(2, 2),
        "where": Path("data") / "train",
    }
    write_json(path, record)
    text = path.read_text(encoding="utf-8")
    assert "Dünen" in text and text.endswith("\n")  # readable UTF-8, not \u escapes
    back = read_json(path)
    assert list(back) == list(record)  # insertion order, not sorted
    assert back == {"zeta": 1, "alpha": [1.5, None, True, "Dünen"], "miou": 0.5, "pixels": 7,
                    "matrix": [[0, 1], [2, 3]], "where": os.fspath(Path("data") / "train")}


def test_unwritable_value_is_a_type_error_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "run.json"
    write_json(path, {"ok": True})
    with pytest.raises(TypeError, match="cannot write object to JSON"):
        write_json(path, {"bad": object()})
    assert read_json(path) == {"ok": True} and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_read_json_names_a_broken_file(tmp_path):
    path = tmp_path / "scan.json"
    path.write_text("{oops")
    with pytest.raises(ValueError, match="scan.json: not valid JSON") as error:
        read_json(path)
    assert "delete it and re-run" in str(error.value)  # the advice, not only the fault


def test_read_json_of_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "absent.json")
