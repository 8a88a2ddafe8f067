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
#   GPU_CHECK_LOGS=DIR                        # where the logs go (default: gpu_check_logs/<date>)
set -u
set -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

LOGS="${GPU_CHECK_LOGS:-$ROOT/gpu_check_logs/$(date -u +%Y%m%dT%H%M%SZ)}"
PY="${PYTHON:-python}"
export MAX_JOBS="${MAX_JOBS:-8}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}"
unset TRITON_INTERPRET  # real Triton, never the interpreter

# name | seconds | command  (seconds sum to 570: under 10 minutes with the summary)
STAGES=(
    "build|150|$PY -m pip install --no-build-isolation --no-deps --no-index -e ."
    "tests|180|$PY -m pytest python_tests -q -x -p no:cacheprovider"
    "memcheck|60|compute-sanitizer --tool memcheck --error-exitcode 1 $PY benchmarks/sanitizer_cases.py --device cuda"
    "racecheck|60|compute-sanitizer --tool racecheck --error-exitcode 1 $PY benchmarks/sanitizer_cases.py --device cuda"
    "bench|110|$PY -m rlhf_kernels.cli bench --device cuda"
    "report|10|$PY benchmarks/report.py"
)

declare -A STATUS=()
declare -A SECONDS_TAKEN=()
names=()

run_stage() {
    local name="$1" limit="$2" cmd="$3" log="$LOGS/$1.log" start rc
    names+=("$name")
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '%-10s %4ss  %s\n' "$name" "$limit" "$cmd"
        STATUS[$name]="dry-run"
        return 0
    fi
    if [[ "$name" != build && "${STATUS[build]:-}" != pass ]]; then
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
    case $rc in
        0) STATUS[$name]="pass" ;;
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
[[ -f "$LOGS/tests.log" ]] && tail -n 1 "$LOGS/tests.log"
for tool in memcheck racecheck; do
    [[ -f "$LOGS/$tool.log" ]] && grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/$tool.log" | tail -n 1 | sed "s/^/$tool: /"
done
echo "logs: $LOGS"
echo "results: benchmarks/results/*.jsonl; report: docs/performance.md (commit both)"
exit $failed
