#!/usr/bin/env bash
# The prepared GPU check: everything dynpose can measure on a lent NVIDIA machine (H100/H200) in under 8 minutes,
# from a bare box with torch + CUDA but no TensorRT and no internet.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--cpu-smoke] [--export] [--budget SECONDS] [OUTDIR]
#
# OUTDIR (default: $OUT, else /tmp/dynpose_gpu_check) gets gpu_check.json (everything), gpu_check.txt (the printed
# table), probe.json, steps.tsv, tests.xml, bench_*.json / .txt, streams_*.json / .txt and logs/. Engine files go to
# a temporary folder, never into OUTDIR. Steps, in order, each under a time limit inside the overall --budget
# (default 450 s; a step that no longer fits is skipped and says so):
#   1 probe      what imports here (onnx, onnxruntime, opencv, click, rich, tqdm, ... may be missing)
#   2 install    pip install --no-deps --no-build-isolation --no-index -e . (PYTHONPATH=repo is set anyway)
#   3 tests      the CUDA tests: tests/test_torch_backend.py tests/test_gpu_torch.py (needs pytest)
#   4 engines    a torch-only engine dir (router, ResNet-50, HRNet-W32; random weights); with --export and the
#                ONNX tools present, dynpose-export --model all --weights random instead (writes + verifies ONNX too)
#   5 bench      dynpose-bench --backend torch --device cuda --batch 1,8,32,64: fp32, fp16, fp16 + cuda graphs,
#                fp16 + channels_last + cuda graphs; without opencv/click it falls back to a models-only bench
#   6 streams    benchmarks/gpu_streams.py, fp32 and fp16 + channels_last, batch 32
#   7 summarize  gpu_check.json + gpu_check.txt, printed
# --dry-run: print the plan and what this machine has, run nothing else, exit 0 (works on a CPU machine).
# --cpu-smoke: run the steps on the CPU with tiny sizes (batch 1, one round, no CUDA graphs) to check this script
# itself on a machine without a GPU; its figures mean nothing.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY=0
EXPORT=0
SMOKE=0
BUDGET=450
OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --export) EXPORT=1 ;;
    --cpu-smoke) SMOKE=1 ;;
    --budget) shift; BUDGET="${1:?--budget needs seconds}" ;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUTDIR="$1" ;;
  esac
  shift
done
OUTDIR="${OUTDIR:-${OUT:-${TMPDIR:-/tmp}/dynpose_gpu_check}}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dynpose-gpu-check.XXXXXX")"
ENGINES="$WORK/engines"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$REPO" || exit 2
trap 'rm -rf "$WORK"' EXIT

CONFIGS=("fp32:" "fp16:--fp16" "fp16-graphs:--fp16 --cuda-graphs" "fp16-cl-graphs:--fp16 --channels-last --cuda-graphs")
DEVICE=cuda
SIZES=(--batch 1,8,32,64 --repeats 10 --fractions 0,0.3,0.5,1)
RB_SIZES=()
if [ "$SMOKE" = 1 ]; then
  CONFIGS=("fp32:" "cl:--channels-last")  # half precision on a CPU is slow and says nothing about a GPU
  DEVICE=cpu
  SIZES=(--batch 1 --repeats 1 --warmup 0 --fractions 0.5)
  RB_SIZES=(--device cpu --batch 1 --repeats 1 --warmup 0)
fi
TESTS=(tests/test_torch_backend.py tests/test_gpu_torch.py)

has() {  # has MODULE: the probe found it importable
  "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if sys.argv[2] not in {**d['missing'], **d['dynpose_missing']} else 1)" "$1" "$2"
}

step() {  # step NAME LIMIT_S CMD...: run CMD under a time limit that fits the budget; log + record the outcome
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - SECONDS - 15 ))  # 15 s kept for the summary
  if [ "$DRY" = 1 ]; then
    printf '  [%-20s <=%3ss] %s\n' "$name" "$limit" "$*"
    return 0
  fi
  if [ "$left" -lt 20 ]; then
    printf '%s\tskipped\t-\t0\tover the %ss budget\n' "$name" "$BUDGET" >> "$OUTDIR/steps.tsv"
    echo "gpu_check: $name skipped (budget)"; return 0
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "gpu_check: $name (limit ${limit}s): $*"
  local t0=$SECONDS rc status
  timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/logs/$name.log" 2>&1
  rc=$?
  status=ok; [ "$rc" != 0 ] && status=failed; [ "$rc" = 124 ] || [ "$rc" = 137 ] && status=timeout
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( SECONDS - t0 ))" "${NOTE:-}" >> "$OUTDIR/steps.tsv"
  tail -n 25 "$OUTDIR/logs/$name.log"
  NOTE=""
  return 0
}

PROBE="$WORK/probe.json"
if [ "$DRY" != 1 ]; then
  mkdir -p "$OUTDIR/logs" || { echo "gpu_check: cannot create $OUTDIR" >&2; exit 2; }
  PROBE="$OUTDIR/probe.json"
fi
if ! "$PY" benchmarks/gpu_check.py probe > "$PROBE" 2> "$WORK/probe.err"; then
  echo "gpu_check: the probe failed ($PY cannot run benchmarks/gpu_check.py):" >&2; cat "$WORK/probe.err" >&2; exit 2
fi
"$PY" - "$PROBE" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
smi = d.get("nvidia_smi") or {}
print(f"gpu_check: python {d['python']}, torch {d.get('torch', 'missing')} (CUDA build {d.get('torch_cuda_build')}), "
      f"GPU: {d.get('gpu') or 'none'}, driver {smi.get('driver', '-')}")
for m, why in {**d["missing"], **d["dynpose_missing"]}.items():
    print(f"gpu_check: missing {m}: {why}")
EOF
CUDA_OK=$("$PY" -c "import json,sys; print(int(json.load(open(sys.argv[1]))['cuda']))" "$PROBE")

# What can run here decides the paths.
TEST_CMD=("$PY" -m pytest -q -rs -p no:cacheprovider --junitxml "$OUTDIR/tests.xml" "${TESTS[@]}")
has "$PROBE" pytest || TEST_CMD=()
ENGINE_CMD=("$PY" benchmarks/gpu_check.py torch-engines "$ENGINES")
if [ "$EXPORT" = 1 ]; then
  if has "$PROBE" dynpose.cli.export; then
    ENGINE_CMD=("$PY" -c "from dynpose.cli.export import main; main()" --model all --weights random --engine-dir "$ENGINES")
  else
    echo "gpu_check: --export asked but dynpose.cli.export cannot import here (see missing above); torch-only engine dir"
  fi
fi
BENCH_KIND=dynpose-bench
has "$PROBE" dynpose.cli.bench || BENCH_KIND=runner-bench

if [ "$DRY" = 1 ]; then
  echo "gpu_check: dry run; would write to $OUTDIR (budget ${BUDGET}s), engines in a temporary folder:"
else
  if [ "$CUDA_OK" != 1 ] && [ "$SMOKE" != 1 ]; then
    echo "gpu_check: no CUDA device here (see probe above); on a machine without a GPU run: bash benchmarks/gpu_check.sh --dry-run" >&2
    exit 2
  fi
  : > "$OUTDIR/steps.tsv"
fi

step install 60 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
if [ "${#TEST_CMD[@]}" -gt 0 ]; then
  step tests 120 "${TEST_CMD[@]}"
elif [ "$DRY" = 1 ]; then
  echo "  [tests               ] skipped: pytest is not installed here"
else
  printf 'tests\tskipped\t-\t0\tpytest is not installed here\n' >> "$OUTDIR/steps.tsv"
fi
step engines 150 "${ENGINE_CMD[@]}"
for cfg in "${CONFIGS[@]}"; do
  name="${cfg%%:*}"; flags="${cfg#*:}"
  # shellcheck disable=SC2086  # flags are words on purpose
  if [ "$BENCH_KIND" = dynpose-bench ]; then
    NOTE="dynpose-bench $flags" step "bench-$name" 100 "$PY" -m dynpose.cli.bench --engine-dir "$ENGINES" --backend torch \
      --device "$DEVICE" "${SIZES[@]}" $flags --json "$OUTDIR/bench_$name.json"
  else
    NOTE="models-only fallback $flags" step "bench-$name" 100 "$PY" benchmarks/gpu_check.py runner-bench $flags \
      "${RB_SIZES[@]}" --json "$OUTDIR/bench_$name.json"
  fi
  [ "$DRY" = 1 ] || cp "$OUTDIR/logs/bench-$name.log" "$OUTDIR/bench_$name.txt" 2>/dev/null
done
step streams-fp32 45 "$PY" benchmarks/gpu_streams.py --batch 32 --iters 20 --json "$OUTDIR/streams_fp32.json"
step streams-fp16 45 "$PY" benchmarks/gpu_streams.py --batch 32 --iters 20 --fp16 --channels-last \
  --json "$OUTDIR/streams_fp16-cl.json"
[ "$DRY" = 1 ] || for f in "$OUTDIR"/logs/streams-*.log; do
  [ -f "$f" ] && cp "$f" "$OUTDIR/streams_$(basename "$f" .log | sed 's/^streams-//').txt"
done

if [ "$DRY" = 1 ]; then
  printf '  [%-20s]       %s\n' summarize "$PY benchmarks/gpu_check.py summarize $OUTDIR"
  echo "gpu_check: bench path: $BENCH_KIND; engine dir: ${ENGINE_CMD[*]:1:2}; CUDA here: $([ "$CUDA_OK" = 1 ] && echo yes || echo no)"
  echo "gpu_check: dry run done (nothing was run)"
  exit 0
fi
"$PY" benchmarks/gpu_check.py summarize "$OUTDIR"
echo "gpu_check: total ${SECONDS}s; results in $OUTDIR (gpu_check.json, gpu_check.txt)"
