#!/usr/bin/env bash
# One command for everything: set up .venv, make the demo desert if no data is given,
# then run the notebooks headless (papermill) or, with --test, the test suite.
#
#   ./run_all.sh [--data PATH] [--profile demo|full] [--run NAME] [--only 01,02]
#   ./run_all.sh --test
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(pwd)"

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "run_all.sh: $*" >&2; exit 2; }

DATA="" PROFILE="demo" RUN="" ONLY="" TEST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --data) [ $# -ge 2 ] || die "--data needs a path"; DATA="$2"; shift 2 ;;
    --profile) [ $# -ge 2 ] || die "--profile needs demo or full"; PROFILE="$2"; shift 2 ;;
    --run) [ $# -ge 2 ] || die "--run needs a name"; RUN="$2"; shift 2 ;;
    --only) [ $# -ge 2 ] || die "--only needs a list such as 01,02"; ONLY="$2"; shift 2 ;;
    --test) TEST=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done
case "$PROFILE" in demo|full) ;; *) die "--profile must be demo or full, not '$PROFILE'" ;; esac
if [ -n "$DATA" ]; then
  [ -e "$DATA" ] || die "--data $DATA: no such folder"
  [ -d "$DATA" ] || die "--data $DATA: not a folder (give the folder holding the unzipped dataset)"
  DATA="$(cd "$DATA" && pwd)"
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

# --- data: the demo desert when no dataset is given -------------------------------------
if [ -z "$DATA" ]; then
  # Deterministic; returns at once when data/demo_desert already holds this desert.
  python -c 'from offroadseg.synth import make_demo_desert; r = make_demo_desert("data/demo_desert")
print("data: demo desert in data/demo_desert:", r["counts"], "(made now)" if r["generated"] else "(already there)")'
fi

# ipykernel warns on every kernel start that its local TCP sockets are unencrypted: noise here.
quiet_kernels() { grep -v --line-buffered "Kernel is running over TCP without encryption" >&2; }

if [ "$TEST" = 1 ]; then
  # nbval options live in pyproject.toml ([tool.pytest.ini_options]).
  exec python -m pytest --nbval tests notebooks 2> >(quiet_kernels)
fi

args=(--profile "$PROFILE" --run "${RUN:-$PROFILE}")
[ -n "$DATA" ] && args+=(--data "$DATA")
[ -n "$ONLY" ] && args+=(--only "$ONLY")
exec python -m offroadseg.runner "${args[@]}" 2> >(quiet_kernels)
