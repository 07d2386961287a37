#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the GPU image lacks for the notebooks (papermill, nbval,
# nbclient, ipykernel and their needs), CPython 3.12 manylinux x86-64, the versions installed here;
# then check the set (complete, one version each, small enough to travel). Needs PyPI. Run it here,
# before a GPU call that runs bench/gpu_check.sh, and name .whl in the call's `carry`.
#
#   bench/fetch_gpu_wheels.sh            # into .whl/
#   bench/fetch_gpu_wheels.sh DIR        # into DIR
#
# PYTHON picks the interpreter whose installed versions are copied (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" bench/gpu_wheels.py fetch --to "${1:-.whl}"
