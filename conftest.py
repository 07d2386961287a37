"""Root pytest hooks: keep `pytest --nbval` runs in their own run folder."""

import os
import shutil
from pathlib import Path

import pytest

NBVAL_RUN = "nbval"


def pytest_configure(config):
    if getattr(config.option, "nbval", False):
        # Notebooks read this (offroadseg.chapters.context.RUN_OVERRIDE_ENV): a fresh outputs/nbval each
        # session, so re-executed notebooks neither resume nor overwrite a user's runs.
        os.environ["OFFROADSEG_RUN"] = NBVAL_RUN
        shutil.rmtree(Path(__file__).parent / "outputs" / NBVAL_RUN, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before pytest's -m filter reads the markers
def pytest_collection_modifyitems(config, items):
    # A notebook cell re-executed by nbval belongs to the slow tier: `-m "not slow"` is the fast
    # loop, `-m slow` (what ./run_all.sh --test runs after it) the slow tests and the notebooks.
    for item in items:
        if type(item).__module__.startswith("nbval"):
            item.add_marker("slow")
