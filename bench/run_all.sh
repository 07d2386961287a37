#!/usr/bin/env bash
# Run the four benchmarks in sequence with their default settings; each prints its table and
# writes bench/results/<name>.json (date, machine, versions).
#
#   bench/run_all.sh                    # defaults: demo profile, this machine's device
#   bench/run_all.sh --profile full     # the full profile's models (train_speed, loader_vs_model, inference)
#   bench/run_all.sh --quick            # smoke run of all four (tiny sizes, seconds each)
#
# PYTHON overrides the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE="" QUICK=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) [ $# -ge 2 ] || { echo "run_all.sh: --profile needs demo or full" >&2; exit 2; }; PROFILE="$2"; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_all.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
PROFILE_ARGS=()
[ -n "$PROFILE" ] && PROFILE_ARGS=(--profile "$PROFILE")
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
# The library without an installed package too (a fresh GPU machine with only python3 and torch).
export PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}"

for script in scan train_speed loader_vs_model inference; do
  args=("${QUICK[@]}")
  [ "$script" != scan ] && args+=("${PROFILE_ARGS[@]}")
  echo "=== bench/$script.py ${args[*]}"
  started=$(date +%s)
  "$PYTHON" "bench/$script.py" "${args[@]}"
  echo "=== bench/$script.py done in $(( $(date +%s) - started )) s"
  echo
done
