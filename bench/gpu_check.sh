#!/usr/bin/env bash
# One prepared GPU check (issue 11), at most about 9 minutes on one H100/H200: training images/s
# (eager, channels_last, torch.compile; the real loader beside the model), inference latency and
# throughput (student, ensemble, ensemble + TTA; fp32 and bf16; eager and compiled), the ONNX
# student through onnxruntime, and the six notebooks (full profile, 2 epochs, random init) on a
# generated 310-image 960x540 desert. Prints one table at the end; writes OUTDIR/gpu_check.json
# (every stage's JSON, merged), OUTDIR/table.txt and OUTDIR/gpu_check.log (three files: a device
# call brings back at most 8).
#
#   bench/gpu_check.sh OUTDIR             # on the GPU machine (python3 of the image, wheels from .whl/)
#   bench/gpu_check.sh OUTDIR --dry-run   # every stage at toy sizes on a CPU, under 3 minutes
#
# Time guard (bench/gpu_check.py): each stage has a budget and the whole a deadline
# (GPU_CHECK_TOTAL_S, default 530 s, dry 170 s); a stage over its budget is cut, one that would
# get under 15 s is skipped, and the table says which. What a cut stage measured is kept.
# Without papermill/nbclient/ipykernel/nbval importable, they are installed from .whl/ (fill it
# where PyPI is reachable with bench/fetch_gpu_wheels.sh; a device call names .whl in `carry`)
# into WORK/site, which goes on PYTHONPATH after lib/. The notebooks' kernel is a "python3"
# kernelspec written into WORK/jupyter (first on JUPYTER_PATH): this interpreter, this PYTHONPATH.
# WORK: a fresh temporary folder, removed at the end (GPU_CHECK_WORK=DIR chooses and keeps it).
# PYTHON: the interpreter (default python3).
set -uo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }
OUTDIR="" DRY=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=(--dry-run) ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
    *) [ -z "$OUTDIR" ] || { echo "gpu_check.sh: one OUTDIR only (got '$OUTDIR' and '$arg')" >&2; exit 2; }
       OUTDIR="$arg" ;;
  esac
done
[ -n "$OUTDIR" ] || { usage >&2; echo "gpu_check.sh: give OUTDIR (where the JSON and the table go)" >&2; exit 2; }
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)" || exit 2
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO" || exit 2
PYTHON="$(command -v "${PYTHON:-python3}")" || { echo "gpu_check.sh: no interpreter '${PYTHON:-python3}' (set PYTHON)" >&2; exit 2; }
if [ -n "${GPU_CHECK_WORK:-}" ]; then
  WORK="$GPU_CHECK_WORK"; KEEP=1; mkdir -p "$WORK" || exit 2
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 2; KEEP=0
fi
WORK="$(cd "$WORK" && pwd)"
mkdir -p "$WORK/json" "$WORK/cache" "$WORK/runtime"
rm -f "$OUTDIR/gpu_check.json" "$OUTDIR/table.txt" "$OUTDIR/gpu_check.log"
exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1
cleanup() { "$PYTHON" bench/gpu_check.py reap "$WORK"; [ "$KEEP" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT

# NVML answers torch.cuda.is_available() without initialising CUDA, which would spoil the forks.
export PYTHONUNBUFFERED=1 PYDEVD_DISABLE_FILE_VALIDATION=1 JUPYTER_RUNTIME_DIR="$WORK/runtime" PYTORCH_NVML_BASED_CUDA_CHECK=1
export PYTHONPATH="$REPO/lib${PYTHONPATH:+:$PYTHONPATH}"
started=$SECONDS
if ! "$PYTHON" -c 'import papermill, nbclient, ipykernel, nbval' 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: papermill/nbclient/ipykernel/nbval are not importable and .whl/ holds no wheels: run" \
         "bench/fetch_gpu_wheels.sh where PyPI is reachable, and carry .whl" >&2
    exit 1
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$WORK/site" .whl/*.whl || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
  echo "installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $WORK/site in $((SECONDS - started)) s"
fi
if [ -d .whl ]; then "$PYTHON" bench/gpu_wheels.py check --to .whl || echo "warning: .whl/ is incomplete (above)"; fi
export JUPYTER_PATH="$WORK/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
"$PYTHON" bench/gpu_check.py kernelspec "$WORK/jupyter" || exit 1

TOTAL="${GPU_CHECK_TOTAL_S:-$([ ${#DRY[@]} -gt 0 ] && echo 170 || echo 530)}"
"$PYTHON" bench/gpu_check.py run "$OUTDIR" "$WORK" "${DRY[@]}" --total-s $((TOTAL - (SECONDS - started)))
