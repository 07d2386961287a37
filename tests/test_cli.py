"""The options every pipeline command shares (offroadseg.cli): parsing, paths from --cwd, the checks
and what their messages say."""

from __future__ import annotations

import argparse

import pytest
from helpers import TEST, TRAIN, make_small_dataset, write_pair

from offroadseg import cli
from offroadseg.data import find_dataset
from offroadseg.profiles import DEMO, PROFILES


def parse(*argv: str) -> argparse.Namespace:
    return cli.add_common_options(argparse.ArgumentParser(prog="cmd")).parse_args(list(argv))


def test_the_profiles_are_the_ones_profiles_defines(monkeypatch, capsys):
    assert parse().profile == DEMO.name
    with pytest.raises(SystemExit) as info:
        parse("--profile", "nope")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err and all(f"'{name}'" in err for name in PROFILES)
    # A profile added to PROFILES is valid at once: the list is written nowhere else.
    monkeypatch.setitem(PROFILES, "tiny", DEMO)
    assert parse("--profile", "tiny").profile == "tiny"


def test_set_values_are_json_or_python_literals_else_strings():
    assert cli.parse_sets(["epochs=1", "image_size=[512, 512]", "flag=true", "none=None", "t=(1, 2)", "name=margin",
                       "lr=6e-5", "path=weights/mit-b2"]) == {
        "epochs": 1, "image_size": [512, 512], "flag": True, "none": None, "t": (1, 2), "name": "margin",
        "lr": 6e-5, "path": "weights/mit-b2"}
    with pytest.raises(cli.UsageError, match="expected NAME=VALUE"):
        cli.parse_sets(["epochs"])
    with pytest.raises(cli.UsageError, match="use the option --data instead"):
        cli.parse_sets(["data=/x"])


def test_relative_paths_resolve_from_where_the_command_ran(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "resnet101.pth").write_bytes(b"")
    assert cli.resolve_path_value("weights/resnet101.pth", tmp_path) == str(tmp_path / "weights" / "resnet101.pth")
    assert cli.resolve_path_value("./missing.pth", tmp_path) == str(tmp_path / "missing.pth")
    assert cli.resolve_path_value("nvidia/mit-b2", tmp_path) == "nvidia/mit-b2"  # a hub id, not a path
    assert cli.resolve_path_value("IMAGENET1K_V2", tmp_path) == "IMAGENET1K_V2" and cli.resolve_path_value(3, tmp_path) == 3


def test_default_run_name_comes_from_the_profile_and_the_dataset(tmp_path):
    kaggle = tmp_path / "kaggle" / "input" / "datasets" / "me" / "falcon desert"
    make_small_dataset(kaggle / TRAIN, 1, 1, 0)
    write_pair(kaggle / TEST, "test", "t0")
    assert cli.default_run_name("demo", find_dataset(tmp_path / "kaggle")) == "demo-falcon-desert"
    only_train = tmp_path / "solo"
    make_small_dataset(only_train, 1, 0, 0)
    assert cli.default_run_name("full", find_dataset(only_train)) == f"full-{TRAIN}"


def test_resolve_common_makes_paths_absolute_from_cwd_and_names_the_run(tmp_path, capsys):
    make_small_dataset(tmp_path / "mydata", 1, 1, 1)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "r101.pth").write_bytes(b"")
    options = cli.resolve_common(parse("--data", "mydata", "--weights", "weights", "--cwd", str(tmp_path),
                                   "--set", "epochs=2", "--set", "backbone=weights/r101.pth"), tmp_path)
    assert options.data == str(tmp_path / "mydata") and options.weights == str(tmp_path / "weights")
    assert options.run == "demo-mydata" and options.profile == "demo" and options.cwd == tmp_path
    assert options.sets == {"epochs": 2, "backbone": str(tmp_path / "weights" / "r101.pth")}
    assert options.dataset.summary()["train"] == 1
    out = capsys.readouterr().out
    assert f"data: {tmp_path / 'mydata'}" in out and "run: demo-mydata" in out
    # No --data: the demo desert (None), the run named after the profile; a given name is kept.
    assert cli.resolve_common(parse("--profile", "full", "--cwd", str(tmp_path)), tmp_path).run == "full"
    options = cli.resolve_common(parse("--data", "mydata", "--run", "mine", "--cwd", str(tmp_path)), tmp_path)
    assert options.run == "mine"
    assert cli.resolve_common(parse("--cwd", str(tmp_path)), tmp_path).data is None


def test_bad_paths_name_the_path_and_the_fix(tmp_path):
    (tmp_path / "a_file.zip").write_bytes(b"")
    cases = {
        ("--data", "nosuch"): [str(tmp_path / "nosuch"), "no such folder"],
        ("--data", "a_file.zip"): [str(tmp_path / "a_file.zip"), "give the folder holding the unzipped dataset"],
        ("--weights", "w", "--profile", "full"): [
            "--weights w", str(tmp_path / "w"), "python -m offroadseg.weights download --profile full --to weights/"],
        ("--run", "a/b"): ["--run", "'a/b'", "plain folder name"],
    }
    for argv, wanted in cases.items():
        with pytest.raises(cli.UsageError) as info:
            cli.resolve_common(parse(*argv, "--cwd", str(tmp_path)), tmp_path)
        assert all(part in str(info.value) for part in wanted), (argv, str(info.value))
    (tmp_path / "empty").mkdir()
    with pytest.raises(cli.UsageError, match="^data: .*folder is empty"):
        cli.resolve_common(parse("--data", "empty", "--cwd", str(tmp_path)), tmp_path)
