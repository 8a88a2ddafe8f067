#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU and no network:
#   build (CUDA kernels included) -> full test suite on real Triton + CUDA ->
#   compute-sanitizer memcheck + racecheck over every CUDA kernel ->
#   GPU benchmarks (JSON lines) -> docs/performance.md -> a one-screen summary.
# Each stage is time-boxed (total under 10 minutes) and its exit code kept; a
# failed stage does not stop the later ones (except that nothing runs without a build).
#
#   bash benchmarks/gpu_check.sh              # everything
#   bash benchmarks/gpu_check.sh --dry-run    # print the stages and their time limits
#   bash benchmarks/gpu_check.sh --only build,tests   # some stages (build must have passed
#                                             # in this checkout for the others to run)
#   GPU_CHECK_LOGS=DIR                        # where the logs go (default: gpu_check_logs/<date>)
#   GPU_CHECK_<STAGE>_S=N                     # another time limit for a stage (e.g. GPU_CHECK_BENCH_S=300)
#   OUT=DIR                                   # also pack logs, results and report into DIR/gpu_check.tgz
set -u
set -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
DRY_RUN=0
ONLY=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --only) ONLY=",${2:?--only needs a list of stages},"; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

LOGS="${GPU_CHECK_LOGS:-$ROOT/gpu_check_logs/$(date -u +%Y%m%dT%H%M%SZ)}"
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-8}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}"
unset TRITON_INTERPRET  # real Triton, never the interpreter

# name | seconds | command  (seconds sum to 530: under 10 minutes with the
# summary, and each stage's --kill-after). The memcheck runs without torch's
# caching allocator, so an overrun of a tensor is outside any allocation.
STAGES=(
    "build|110|$PY -m pip install --no-build-isolation --no-deps --no-index -e ."
    "tests|190|$PY -m pytest python_tests -q -rfE --maxfail=50 -p no:cacheprovider"
    "memcheck|60|env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m benchmarks.sanitizer_cases --device cuda"
    "racecheck|60|compute-sanitizer --tool racecheck --error-exitcode 1 $PY -m benchmarks.sanitizer_cases --device cuda"
    "bench|90|$PY -m rlhf_kernels.cli bench --device cuda"
    "report|20|$PY -m benchmarks.report"
)

declare -A STATUS=()
declare -A SECONDS_TAKEN=()
names=()

run_stage() {
    local name="$1" limit="$2" cmd="$3" log="$LOGS/$1.log" start rc override
    override="GPU_CHECK_${name^^}_S"
    limit="${!override:-$limit}"
    if [[ -n "$ONLY" && "$ONLY" != *",$name,"* ]]; then
        return 0
    fi
    names+=("$name")
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '%-10s %4ss  %s\n' "$name" "$limit" "$cmd"
        STATUS[$name]="dry-run"
        return 0
    fi
    if [[ "$name" != build && "${STATUS[build]:-}" != pass && ( -z "$ONLY" || "$ONLY" == *",build,"* ) ]]; then
        STATUS[$name]="skipped (no build)"
        return 0
    fi
    if [[ "$name" == memcheck || "$name" == racecheck ]] && ! command -v compute-sanitizer >/dev/null 2>&1; then
        STATUS[$name]="skipped (no compute-sanitizer on PATH)"
        return 0
    fi
    echo "[gpu_check] $name (limit ${limit}s): $cmd" >&2
    start=$(date +%s)
    # shellcheck disable=SC2086  # the command is a word list on purpose
    timeout --kill-after=10 "$limit" $cmd >"$log" 2>&1
    rc=$?
    SECONDS_TAKEN[$name]=$(( $(date +%s) - start ))
    if [[ "$name" == build && $rc -eq 0 ]] && ! $PY -c "from rlhf_kernels import _dispatch as b; assert b.native_cuda_built()" >>"$log" 2>&1; then
        rc=4  # built, but without the CUDA kernels (no CUDA toolkit found?)
    fi
    case $rc in
        0) STATUS[$name]="pass" ;;
        4) STATUS[$name]="FAIL (built without the CUDA kernels)" ;;
        124|137) STATUS[$name]="FAIL (timed out after ${limit}s)" ;;
        *) STATUS[$name]="FAIL (exit $rc)" ;;
    esac
}

if [[ $DRY_RUN -eq 0 ]] && ! nvidia-smi -L >/dev/null 2>&1; then
    # Never build, install or benchmark on a machine that cannot check anything.
    echo "gpu_check.sh: no NVIDIA GPU here (nvidia-smi -L failed); nothing run. --dry-run shows the stages." >&2
    exit 3
fi

if [[ $DRY_RUN -eq 0 ]]; then
    mkdir -p "$LOGS"
    {
        echo "date: $(date -u)"; echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi: not found"
        nvcc --version 2>&1 | tail -1 || true
        $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" 2>&1
    } >"$LOGS/environment.log"
fi

for stage in "${STAGES[@]}"; do
    IFS='|' read -r name limit cmd <<<"$stage"
    run_stage "$name" "$limit" "$cmd"
done

if [[ $DRY_RUN -eq 1 ]]; then
    exit 0
fi

failed=0
echo
echo "================ gpu_check summary ================"
head -n 5 "$LOGS/environment.log"
echo "---------------------------------------------------"
for name in "${names[@]}"; do
    printf '%-10s %-40s %5ss\n' "$name" "${STATUS[$name]}" "${SECONDS_TAKEN[$name]:--}"
    [[ "${STATUS[$name]}" == pass ]] || failed=1
done
echo "---------------------------------------------------"
if [[ -f "$LOGS/tests.log" ]]; then
    grep -E '^(FAILED|ERROR) ' "$LOGS/tests.log" | head -n 60
    tail -n 1 "$LOGS/tests.log"
fi
for tool in memcheck racecheck; do
    [[ -f "$LOGS/$tool.log" ]] && grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/$tool.log" | tail -n 1 | sed "s/^/$tool: /"
done
echo "logs: $LOGS"
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
    tar czf "$OUT/gpu_check.tgz" -C "$ROOT" "${LOGS#"$ROOT"/}" benchmarks/results docs/performance.md docs/img 2>/dev/null \
        && echo "packed: $OUT/gpu_check.tgz"
fi
echo "results: benchmarks/results/*.jsonl; report: docs/performance.md (commit both)"
exit $failed
