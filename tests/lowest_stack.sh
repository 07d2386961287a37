#!/usr/bin/env bash
# The fast tests on the LOWEST versions pyproject.toml declares, in a venv of their own.
#
#   tests/lowest_stack.sh            # build .lowest/venv once (reused while the pins are unchanged), run the tests
#   tests/lowest_stack.sh --install  # only build the venv
#   tests/lowest_stack.sh tests/test_models.py -x   # other pytest arguments instead of the whole tests/
#   LOWEST_VENV=~/.cache/offroadseg/lowest tests/lowest_stack.sh   # a venv kept outside the checkout
#
# Why: `pip install -e .` on Kaggle or Colab keeps whatever torch/transformers is preinstalled, so every
# lower bound in [project] dependencies is a promise; this checks it. The pins are derived from
# pyproject.toml (each ">=X" becomes "==X", the optional extras' too), so the bounds have one home. pytest comes from
# requirements.txt; nbval is not installed (no notebooks here), hence `-o addopts=`.
#
# Packages come from PyPI with pip's ordinary settings (PIP_CONFIG_FILE=/dev/null: this machine's pip
# configuration caps torch to the releases on its disk). PyPI's Linux torch wheels are CUDA builds:
# the first install downloads a few GB (measured times: bench/RESULTS.md, History).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="${LOWEST_VENV:-$ROOT/.lowest/venv}"
PYTHON="${PYTHON:-python3}"

PINS="$("$PYTHON" - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = project["dependencies"] + [dep for extra in project.get("optional-dependencies", {}).values() for dep in extra]
for dep in deps:
    name, spec = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(.*)", dep).groups()
    low = re.search(r">=\s*([^,\s]+)", spec)
    if not low:
        raise SystemExit(f"pyproject.toml: dependency {dep!r} has no lower bound (>=); give it one")
    print(f"{name}=={low.group(1)}")
for line in open("requirements.txt"):
    if line.startswith("pytest=="):
        print(line.strip())
EOF
)"
STAMP="$VENV/.lowest-pins"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$PINS" ]]; then
  echo "lowest stack: installing into $VENV:" $PINS
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  start=$(date +%s)
  # shellcheck disable=SC2086
  PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" -m pip install -q --disable-pip-version-check $PINS
  echo "$PINS" > "$STAMP"
  echo "lowest stack: installed in $(( $(date +%s) - start )) s"
fi
"$VENV/bin/python" -c "import torch, torchvision, transformers, accelerate; print('lowest stack: torch', torch.__version__, \
'torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
[[ "${1:-}" == "--install" ]] && exit 0
# The library from this checkout's lib/ (not installed: nothing to go stale).
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONPATH="$ROOT/lib" \
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts= -m "not slow" "${@:-tests}"
