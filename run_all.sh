#!/usr/bin/env bash
# One command for everything: set up .venv (the pinned requirements and the library), check that
# this torch can use the machine's GPU, then hand the options over to the runner, which checks them
# and runs the notebooks headless, the test suite (--test) or JupyterLab (--lab):
#
#   ./run_all.sh --help        the options (the runner's: python -m offroadseg.runner --help)
#
# Relative paths resolve from the directory you run the command in (passed on as --cwd).
set -euo pipefail
CALLER_PWD="$(pwd)"
cd "$(dirname "$0")"
ROOT="$(pwd)"

die() { echo "run_all.sh: $*" >&2; exit 2; }

# --- set-up: .venv with the pinned requirements and the library (editable) -------------
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
  || die "needs Python 3.10 or newer as '$PYTHON' (set PYTHON=/path/to/python3.11)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.offroadseg-installed"
WANT="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "setup: installing requirements (first time: torch is several GB, a few minutes)"
  started=$SECONDS
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$WANT" > "$STAMP"
  echo "setup: done in $((SECONDS - started)) s"
else
  echo "setup: requirements unchanged, skipping installation"
fi
export PATH="$VENV/bin:$PATH"
# The venv's kernelspec ("python3" -> the venv's python) comes before any user-wide one.
export JUPYTER_PATH="$VENV/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
export PYDEVD_DISABLE_FILE_VALIDATION=1
export OFFROADSEG_PROG="./run_all.sh"  # the runner's usage and errors name this command
python -m offroadseg.device --check || exit 2  # an NVIDIA GPU this torch cannot use: stop, say why (OFFROADSEG_ALLOW_CPU=1 overrides)

# ipykernel's noise on stderr: unencrypted local sockets on every kernel start, and the interrupt
# papermill sends a kernel after a failure (it reads like a second error; the real one is printed).
quiet_kernels() { grep -v --line-buffered -e "Kernel is running over TCP without encryption" -e "KeyboardInterrupt caught in kernel" >&2; }

# Everything else, the demo desert, the tests and JupyterLab included, is the runner's.
exec python -m offroadseg.runner --cwd "$CALLER_PWD" "$@" 2> >(quiet_kernels)
