#!/usr/bin/env bash
# On a GPU machine: every CUDA kernel against the CPU op it replaces, the default model's
# forward on both backends, then the benchmarks; prints the tables last.
#
#   bench/gpu.sh [SPECULA_BINARY]
#
# Environment:
#   LOG_DIR     where logs and JSON go (default /tmp/specula-bench)
#   MODEL       the default model's GGUF for the forward comparison (no network needed);
#               unset or missing: the op comparison only
#   CUDA_HOME   CUDA toolkit (default /usr/local/cuda): NVRTC, cuBLAS and the headers
#   BENCH_ARGS  extra arguments for `specula bench`
#   STEPS       which steps to run (default "parity bench bench70"; bench70 is the reference
#               configuration: llama-3.3-70b in FP8 with llama-3.2-1b drafting, k up to 10;
#               tune times the matmul kernels built with other settings; parity-mma repeats
#               the model's comparisons with the tensor-core attention and tiled prefill
#               kernels, SPECULA_ATTENTION=mma SPECULA_PREFILL=tiled)
set -uo pipefail
BIN=${1:-target/release/specula}
LOG_DIR=${LOG_DIR:-/tmp/specula-bench}
mkdir -p "$LOG_DIR"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_HOME/lib64:${LD_LIBRARY_PATH:-}"
export SPECULA_CACHE=${SPECULA_CACHE:-$LOG_DIR/cache}
# The parity's tensor-parallel rows run through NCCL.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# shellcheck source=bench/nccl_env.sh
source "$(dirname "$0")/nccl_env.sh"
find_nccl || echo "NCCL not found: the parity's tensor-parallel rows will fail"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem \
    --format=csv >"$LOG_DIR/gpu.txt" 2>&1
cat "$LOG_DIR/gpu.txt"

model_arg=none
if [ -n "${MODEL:-}" ] && [ -f "$MODEL" ]; then model_arg=$MODEL; fi
STEPS=${STEPS:-parity bench bench70}
status=0
for step in $STEPS; do
    case $step in
    parity) "$BIN" kernels parity --model "$model_arg" >"$LOG_DIR/parity.txt" 2>&1 || status=1 ;;
    parity-mma)
        SPECULA_ATTENTION=mma SPECULA_PREFILL=tiled "$BIN" kernels parity --skip-ops --model "$model_arg" \
            >"$LOG_DIR/parity-mma.txt" 2>&1 || status=1
        ;;
    bench) "$BIN" bench --json "$LOG_DIR/bench.json" ${BENCH_ARGS:-} >"$LOG_DIR/bench.txt" 2>&1 || status=1 ;;
    tune)
        "$BIN" bench --tune --models dummy:llama-3.2-1b --spec-tokens 0 --overlap-draft-steps 0 --verify 1 \
            >"$LOG_DIR/tune.txt" 2>&1 || status=1
        ;;
    bench70)
        "$BIN" bench --models dummy:llama-3.3-70b,dummy:llama-3.2-1b --dtype fp8 --verify 1,2,4,8,10,16 \
            --draft-len 10 --json "$LOG_DIR/bench70.json" ${BENCH_ARGS:-} >"$LOG_DIR/bench70.txt" 2>&1 || status=1
        ;;
    *) echo "unknown step $step" && status=1 ;;
    esac
done

for step in $STEPS; do
    case $step in
    parity) echo "== $BIN kernels parity --model $model_arg" && tail -n 130 "$LOG_DIR/parity.txt" ;;
    parity-mma) echo "== SPECULA_ATTENTION=mma SPECULA_PREFILL=tiled $BIN kernels parity --skip-ops" &&
        tail -n 60 "$LOG_DIR/parity-mma.txt" ;;
    bench) echo "== $BIN bench ${BENCH_ARGS:-}" && tail -n 50 "$LOG_DIR/bench.txt" ;;
    bench70) echo "== $BIN bench (70B FP8 + 1B) ${BENCH_ARGS:-}" && tail -n 40 "$LOG_DIR/bench70.txt" ;;
    tune) echo "== $BIN bench --tune" && grep -E "^--|n=1 " -A17 "$LOG_DIR/tune.txt" | grep -E "^--|^[0-9]+B " ;;
    esac
    echo
done
exit $status
