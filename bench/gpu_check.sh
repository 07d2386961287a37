#!/usr/bin/env bash
# The prepared GPU check, in two phases: each one device call of at most 6 minutes (deadline 300 s
# inside it), each runnable alone, so a 15-minute GPU window holds both with room for the machine's
# start and a rerun of one. bench/gpu_check.py says what each phase measures.
#
#   bench/gpu_check.sh OUTDIR --phase 1             # training probe, fp16/bf16 steps, predict latency, ONNX
#   bench/gpu_check.sh OUTDIR --phase 2             # the six demo notebooks, loader vs model, DDP (2 GPUs)
#   bench/gpu_check.sh OUTDIR --phase N --dry-run   # every stage of phase N at toy sizes on a CPU
#
# Writes OUTDIR/rows.jsonl (every measured row, as soon as it is measured), OUTDIR/gpu_check.json
# (stages, rows, targets, environment), OUTDIR/table.txt and OUTDIR/gpu_check.log: four files (a
# device call brings back at most 8). Prints the tables at the end, the summary table last. Exit
# status 0 when every stage is ok or skipped for a stated reason, 1 when any failed, was cut or came
# too late, 2 for a usage error.
#
# Phase 2's notebooks need papermill, nbclient, ipykernel and nbval. Where they are not importable
# they are installed from the wheels in .whl/ (GPU_CHECK_WHEELS chooses another folder; fill it where
# PyPI is reachable with bench/fetch_gpu_wheels.sh; a device call names .whl in `carry`) into
# WORK/site, which goes on PYTHONPATH after lib/. Without them the notebooks stage is skipped, saying
# why, and every other stage runs. Phase 1 needs no wheel.
# Deadline: GPU_CHECK_TOTAL_S (default 300 s a phase; dry: phase 1 50 s, phase 2 120 s). WORK: a fresh temporary folder,
# removed at the end (GPU_CHECK_WORK=DIR chooses and keeps it). PYTHON: the interpreter (default python3).
set -uo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
OUTDIR="" DRY=() PHASE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=(--dry-run); shift ;;
    --phase) [ $# -ge 2 ] || { echo "gpu_check.sh: --phase needs 1 or 2" >&2; exit 2; }; PHASE="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) [ -z "$OUTDIR" ] || { echo "gpu_check.sh: one OUTDIR only (got '$OUTDIR' and '$1')" >&2; exit 2; }
       OUTDIR="$1"; shift ;;
  esac
done
[ -n "$OUTDIR" ] || { usage >&2; echo "gpu_check.sh: give OUTDIR (where the rows and the tables go)" >&2; exit 2; }
case "$PHASE" in 1|2) ;; *) usage >&2; echo "gpu_check.sh: give --phase 1 or --phase 2" >&2; exit 2 ;; esac
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)" || exit 2
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO" || exit 2
PYTHON="$(command -v "${PYTHON:-python3}")" || { echo "gpu_check.sh: no interpreter '${PYTHON:-python3}' (set PYTHON)" >&2; exit 2; }
WHEELS="${GPU_CHECK_WHEELS:-$REPO/.whl}"
if [ -n "${GPU_CHECK_WORK:-}" ]; then
  WORK="$GPU_CHECK_WORK"; KEEP=1; mkdir -p "$WORK" || exit 2
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 2; KEEP=0
fi
WORK="$(cd "$WORK" && pwd)"
mkdir -p "$WORK/json" "$WORK/cache" "$WORK/runtime"
rm -f "$OUTDIR/gpu_check.json" "$OUTDIR/table.txt" "$OUTDIR/gpu_check.log" "$OUTDIR/rows.jsonl"
exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1
cleanup() { "$PYTHON" bench/gpu_check.py reap "$WORK"; [ "$KEEP" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT

# NVML answers torch.cuda.is_available() without initialising CUDA, which would spoil the forks.
export PYTHONUNBUFFERED=1 PYDEVD_DISABLE_FILE_VALIDATION=1 JUPYTER_RUNTIME_DIR="$WORK/runtime" PYTORCH_NVML_BASED_CUDA_CHECK=1
export PYTHONPATH="$REPO/lib${PYTHONPATH:+:$PYTHONPATH}"
unset GPU_CHECK_NO_NOTEBOOKS
started=$SECONDS
if [ "$PHASE" = 2 ] && ! "$PYTHON" -c 'import papermill, nbclient, ipykernel, nbval' 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    export GPU_CHECK_NO_NOTEBOOKS="papermill/nbclient/ipykernel/nbval are not importable and $WHEELS holds no wheels (fill it with bench/fetch_gpu_wheels.sh where PyPI is reachable, and carry .whl)"
    echo "gpu_check.sh: the notebooks stage will be skipped: $GPU_CHECK_NO_NOTEBOOKS"
  elif "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
         --target "$WORK/site" "$WHEELS"/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
    echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $WORK/site in $((SECONDS - started)) s"
    "$PYTHON" bench/gpu_wheels.py check --to "$WHEELS" || echo "warning: $WHEELS is incomplete (above)"
  else
    export GPU_CHECK_NO_NOTEBOOKS="installing $WHEELS/*.whl failed (see above)"
    echo "gpu_check.sh: the notebooks stage will be skipped: $GPU_CHECK_NO_NOTEBOOKS"
  fi
fi
if [ "$PHASE" = 2 ] && [ -z "${GPU_CHECK_NO_NOTEBOOKS:-}" ]; then
  export JUPYTER_PATH="$WORK/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
  "$PYTHON" bench/gpu_check.py kernelspec "$WORK/jupyter" \
    || export GPU_CHECK_NO_NOTEBOOKS="no python3 kernelspec could be written (see above)"
fi

# The deadline's default lives in gpu_check.py (DEFAULT_TOTAL_S); the set-up above is taken off it.
"$PYTHON" bench/gpu_check.py run "$OUTDIR" "$WORK" --phase "$PHASE" ${DRY[@]+"${DRY[@]}"} \
  ${GPU_CHECK_TOTAL_S:+--total-s "$GPU_CHECK_TOTAL_S"} --spent-s $((SECONDS - started))
