#!/usr/bin/env bash
# One command for everything: set up .venv, make the demo desert if no data is given,
# then run the notebooks headless (papermill), or the test suite, or JupyterLab.
#
#   ./run_all.sh [--data PATH] [--profile demo|full] [--run NAME] [--only 01,02]
#                [--set NAME=VALUE]... [--weights DIR]
#   ./run_all.sh --test        set-up, lint, fast unit tests, then the slow ones and pytest --nbval
#   ./run_all.sh --lab         JupyterLab on working copies of the notebooks (lab/, not notebooks/)
#
# --set NAME=VALUE (repeatable) sets a notebook parameter on every selected notebook that has it
# (VALUE is JSON or a Python literal: --set epochs=1 --set 'image_size=[512, 512]').
# Relative paths resolve from the directory you run the command in.
set -euo pipefail
CALLER_PWD="$(pwd)"
cd "$(dirname "$0")"
ROOT="$(pwd)"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "run_all.sh: $*" >&2; exit 2; }

DATA="" PROFILE="demo" RUN="" ONLY="" TEST=0 LAB=0 WEIGHTS="" SETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) [ $# -ge 2 ] || die "--data needs a path"; DATA="$2"; shift 2 ;;
    --profile) [ $# -ge 2 ] || die "--profile needs demo or full"; PROFILE="$2"; shift 2 ;;
    --run) [ $# -ge 2 ] || die "--run needs a name"; RUN="$2"; shift 2 ;;
    --only) [ $# -ge 2 ] || die "--only needs a list such as 01,02"; ONLY="$2"; shift 2 ;;
    --set) [ $# -ge 2 ] || die "--set needs NAME=VALUE, e.g. --set epochs=1"; SETS+=(--set "$2"); shift 2 ;;
    --weights) [ $# -ge 2 ] || die "--weights needs a folder"; WEIGHTS="$2"; shift 2 ;;
    --test) TEST=1; shift ;;
    --lab) LAB=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done
case "$PROFILE" in demo|full) ;; *) die "--profile must be demo or full, not '$PROFILE'" ;; esac
# Paths given on the command line are relative to where the command was run, not to this script.
abspath() { case "$1" in /*) printf '%s' "$1" ;; "~"*) printf '%s' "${HOME}${1#\~}" ;; *) printf '%s' "$CALLER_PWD/$1" ;; esac; }
if [ -n "$DATA" ]; then
  DATA="$(abspath "$DATA")"
  [ -e "$DATA" ] || die "--data $DATA: no such folder"
  [ -d "$DATA" ] || die "--data $DATA: not a folder (give the folder holding the unzipped dataset)"
  DATA="$(cd "$DATA" && pwd)"
fi
if [ -n "$WEIGHTS" ]; then
  WEIGHTS="$(abspath "$WEIGHTS")"
  [ -d "$WEIGHTS" ] || die "--weights $WEIGHTS: no such folder (make it with: python -m offroadseg.weights download --profile $PROFILE --to weights/)"
fi

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
python -m offroadseg.device --check || exit 2  # an NVIDIA GPU this torch cannot use: stop, say why (OFFROADSEG_ALLOW_CPU=1 overrides)

# ipykernel's noise on stderr: unencrypted local sockets on every kernel start, and the interrupt
# papermill sends a kernel after a failure (it reads like a second error; the real one is printed).
quiet_kernels() { grep -v --line-buffered -e "Kernel is running over TCP without encryption" -e "KeyboardInterrupt caught in kernel" >&2; }

if [ "$LAB" = 1 ]; then
  # Working copies: saving a notebook in the UI changes lab/, never the stored notebooks/ that
  # `./run_all.sh --test` compares against. Existing copies are kept (they are your work).
  mkdir -p lab
  for nb in notebooks/*.ipynb; do [ -e "lab/$(basename "$nb")" ] || cp "$nb" lab/; done
  echo "JupyterLab on lab/ (working copies of notebooks/; delete a copy to get the stored one back)"
  exec "$VENV/bin/jupyter" lab --notebook-dir="$ROOT/lab"
fi

# --- data: the demo desert when no dataset is given -------------------------------------
if [ -z "$DATA" ]; then
  # Deterministic; returns at once when data/demo_desert already holds this desert.
  python -c 'from offroadseg.synth import make_demo_desert; r = make_demo_desert("data/demo_desert")
print("data: demo desert in data/demo_desert:", r["counts"], "(made now)" if r["generated"] else "(already there)")'
fi

if [ "$TEST" = 1 ]; then
  if command -v git >/dev/null && [ -d .git ] && ! git diff --quiet -- notebooks/ 2>/dev/null; then
    echo "warning: notebooks/ differs from the committed version (saved from a UI?): nbval compares against" \
         "these edited outputs. 'git diff --stat notebooks/' shows what; 'git checkout notebooks/' restores them." >&2
  fi
  # Three tiers, quickest first, so a fault shows in seconds rather than after the notebooks:
  # lint (ruff, configured in pyproject.toml), the fast unit tests, then the slow tests and the
  # notebooks under nbval (its options live in pyproject.toml, [tool.pytest.ini_options]).
  echo "test: lint (ruff check .)"
  ruff check . || die "lint failed: 'ruff check . --fix' repairs the import order and unused imports; fix the rest by hand"
  echo "test: fast unit tests (pytest -m 'not slow' tests)"
  python -m pytest -m "not slow" tests
  echo "test: slow tests and the notebooks (pytest --nbval -m slow tests notebooks)"
  exec python -m pytest --nbval -m slow tests notebooks 2> >(quiet_kernels)
fi

args=(--profile "$PROFILE" --cwd "$CALLER_PWD")
[ -n "$RUN" ] && args+=(--run "$RUN")
[ -n "$DATA" ] && args+=(--data "$DATA")
[ -n "$ONLY" ] && args+=(--only "$ONLY")
[ -n "$WEIGHTS" ] && args+=(--weights "$WEIGHTS")
exec python -m offroadseg.runner "${args[@]}" ${SETS[@]+"${SETS[@]}"} 2> >(quiet_kernels)
