#!/usr/bin/env bash
# On a GPU machine: batch-1 decode of the dummy llama-3.1-8b (bf16 weights) at about 1k,
# 32k and 128k positions of context, with the KV cache in bf16 and in FP8, each against the
# ceiling (weight bytes + KV bytes one step reads) / measured copy bandwidth; and how many
# requests of 4k tokens the KV pool the runtime would size on this GPU holds with each.
# The cache's positions are filled directly (no prefill): a step reads them all the same.
# Then the prefill of a 32k-token prompt in chunks of 512 (the prefill attention kernel),
# per KV cache storage. Prints the tables last.
#
#   bench/long_context.sh [SPECULA_BINARY]
#
# Environment:
#   LOG_DIR         where the log and JSON go (default /tmp/specula-long-context)
#   CUDA_HOME       CUDA toolkit (default /usr/local/cuda): NVRTC, cuBLAS and the headers
#   MODEL           default dummy:llama-3.1-8b
#   CONTEXTS        default 1000,32000,128000
#   KV_DTYPES       default bf16,fp8
#   DECODE_TOKENS   steps timed per context (default 64)
#   REQUEST_TOKENS  the request length of the pool's count (default 4096)
#   PREFILL_TOKENS  the prompt prefilled (default 32768); PREFILL_CHUNK its chunks (512)
#   BENCH_ARGS      extra arguments for `specula bench` (e.g. --dtype fp8)
set -uo pipefail
BIN=${1:-target/release/specula}
LOG_DIR=${LOG_DIR:-/tmp/specula-long-context}
mkdir -p "$LOG_DIR"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_HOME/lib64:${LD_LIBRARY_PATH:-}"
export SPECULA_CACHE=${SPECULA_CACHE:-$LOG_DIR/cache}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem \
    --format=csv >"$LOG_DIR/gpu.txt" 2>&1
cat "$LOG_DIR/gpu.txt"

"$BIN" bench --models "${MODEL:-dummy:llama-3.1-8b}" --context "${CONTEXTS:-1000,32000,128000}" \
    --kv-cache-dtypes "${KV_DTYPES:-bf16,fp8}" --decode-tokens "${DECODE_TOKENS:-64}" \
    --request-tokens "${REQUEST_TOKENS:-4096}" --prefill "${PREFILL_TOKENS:-32768}" \
    --prefill-chunk "${PREFILL_CHUNK:-512}" --json "$LOG_DIR/long_context.json" ${BENCH_ARGS:-} \
    >"$LOG_DIR/long_context.txt" 2>&1
status=$?

echo "== $BIN bench --context ${CONTEXTS:-1000,32000,128000} (log: $LOG_DIR/long_context.txt)"
tail -n 40 "$LOG_DIR/long_context.txt"
exit $status
