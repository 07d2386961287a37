"""Root pytest hooks: keep `pytest --nbval` runs in their own run folder."""

import os
import shutil
from pathlib import Path

NBVAL_RUN = "nbval"


def pytest_configure(config):
    if getattr(config.option, "nbval", False):
        # Notebooks read this (offroadseg.pipeline.RUN_OVERRIDE_ENV): a fresh outputs/nbval each
        # session, so re-executed notebooks neither resume nor overwrite a user's runs.
        os.environ["OFFROADSEG_RUN"] = NBVAL_RUN
        shutil.rmtree(Path(__file__).parent / "outputs" / NBVAL_RUN, ignore_errors=True)
