#!/usr/bin/env bash
# On a GPU machine: `specula serve` of a dummy target (default llama-3.1-8b, bf16) loaded by
# `specula bench serve` with prompts of random token ids (dummy weights have no tokenizer),
# a concurrency sweep (default 1, 8, 32, 64), first plain, then speculating with the dummy
# llama-3.2-1b as its draft and every draft token accepted with probability 0.8 (random
# weights accept nothing on their own). With PEERS, llama.cpp's batched-bench at the same
# shape and lengths beside it. Ends with one table: throughput, acceptance, TTFT and TPOT.
#
#   bench/serve_gpu.sh [SPECULA_BINARY]
#
# Environment (defaults in brackets):
#   LOG_DIR [/tmp/specula-serve]: the servers' logs, each run's JSON and the plot
#   CUDA_HOME [/usr/local/cuda]   BACKEND [cuda]   DTYPE [auto: bf16 on a GPU]
#   TARGET [dummy:llama-3.1-8b]   DRAFT [dummy:llama-3.2-1b]   DRAFT_LEN [8]   ACCEPTANCE [0.8]
#   DRAFT_LENGTHS [adaptive; `fixed`: always draft DRAFT_LEN, even where it loses]
#   INPUT_LEN [500]   OUTPUT_LEN [200]   LEVELS [1,8,32,64]: the concurrency sweep
#   PER_CLIENT [2], MIN_REQUESTS [8]: a level of C clients sends max(PER_CLIENT x C, MIN_REQUESTS)
#   MAX_BATCH [the largest level]   DRAFT_KV_BLOCKS [enough for every client's prompt and answer]
#   GPU_MEMORY_FRACTION [the server's]   PORT [0: a free one]
#   PEERS: a llama.cpp peer kit (peer_start.sh, peer_bench.sh); its build starts first, runs
#     detached (about 6 minutes) and is collected last; PEER_DIR [/root/peer] is where it builds
set -uo pipefail
BIN=${1:-target/release/specula}
LOG_DIR=${LOG_DIR:-/tmp/specula-serve}
BACKEND=${BACKEND:-cuda}
DTYPE=${DTYPE:-auto}
TARGET=${TARGET:-dummy:llama-3.1-8b}
DRAFT=${DRAFT:-dummy:llama-3.2-1b}
DRAFT_LEN=${DRAFT_LEN:-8}
DRAFT_LENGTHS=${DRAFT_LENGTHS:-adaptive}
ACCEPTANCE=${ACCEPTANCE:-0.8}
INPUT_LEN=${INPUT_LEN:-500}
OUTPUT_LEN=${OUTPUT_LEN:-200}
LEVELS=${LEVELS:-1,8,32,64}
PER_CLIENT=${PER_CLIENT:-2}
MIN_REQUESTS=${MIN_REQUESTS:-8}
PEERS=${PEERS:-}
largest=$(tr ',' '\n' <<<"$LEVELS" | sort -n | tail -n 1)
MAX_BATCH=${MAX_BATCH:-$largest}
# 16-token blocks for each client's prompt, answer and a step's drafts, and one spare.
DRAFT_KV_BLOCKS=${DRAFT_KV_BLOCKS:-$(((largest * ((INPUT_LEN + OUTPUT_LEN + DRAFT_LEN + 15) / 16 + 1)) + 64))}
mkdir -p "$LOG_DIR"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_HOME/lib64:${LD_LIBRARY_PATH:-}"
SECONDS=0

# The peer's build first: it takes longest and runs detached while Specula is measured.
if [ -n "$PEERS" ]; then
    bash "$PEERS/peer_start.sh" >"$LOG_DIR/peer_start.log" 2>&1 || echo "llama.cpp build did not start: $(tail -n 2 "$LOG_DIR/peer_start.log")"
fi

server=""
stop_server() {
    [ -n "$server" ] || return 0
    kill -TERM "$server" 2>/dev/null
    wait "$server" 2>/dev/null
    server=""
}
trap stop_server EXIT

# start_server NAME ARGS...: `specula serve` on a free port; sets url.
start_server() {
    local name=$1 log="$LOG_DIR/$1.server.log" port=""
    shift
    local args=(serve --backend "$BACKEND" --model "$TARGET" --dtype "$DTYPE" --port "${PORT:-0}" --max-batch "$MAX_BATCH")
    [ -n "${GPU_MEMORY_FRACTION:-}" ] && args+=(--gpu-memory-fraction "$GPU_MEMORY_FRACTION")
    "$BIN" "${args[@]}" "$@" 2>"$log" &
    server=$!
    for _ in $(seq 1 3000); do
        port=$(sed -n 's/.*serving .* on http:\/\/[^:]*:\([0-9]*\).*/\1/p' "$log")
        [ -n "$port" ] && break
        kill -0 "$server" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$port" ]; then
        echo "$name: the server did not start:"
        tail -n 5 "$log"
        stop_server
        return 1
    fi
    url="http://127.0.0.1:$port"
    echo "$name: serving at $url ($(head -n 1 "$log"))"
}

# sweep NAME: the concurrency sweep against the running server, into LOG_DIR/NAME.json.
sweep() {
    local name=$1
    "$BIN" bench serve --url "$url" --dataset random-ids --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
        --concurrency "$LEVELS" --requests-per-client "$PER_CLIENT" --num-requests "$MIN_REQUESTS" \
        --label "$name" --json "$LOG_DIR/$name.json" "${@:2}" >"$LOG_DIR/$name.txt" 2>"$LOG_DIR/$name.err"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "$name: bench serve failed (exit $rc):"
        tail -n 5 "$LOG_DIR/$name.err"
        return $rc
    fi
    tail -n +2 "$LOG_DIR/$name.txt" | sed -n '/^label /,$p'
}

status=0
if start_server plain; then
    sweep plain || status=1
    stop_server
else
    status=1
fi
spec=(--spec draft --draft-model "$DRAFT" --draft-dtype "$DTYPE" --draft-len "$DRAFT_LEN" --draft-lengths "$DRAFT_LENGTHS"
    --synthetic-acceptance "$ACCEPTANCE" --draft-kv-blocks "$DRAFT_KV_BLOCKS")
if start_server spec "${spec[@]}"; then
    compare=()
    [ -f "$LOG_DIR/plain.json" ] && compare=(--compare "$LOG_DIR/plain.json")
    sweep spec --plot "$LOG_DIR/sweep.png" "${compare[@]}" || status=1
    stop_server
else
    status=1
fi
echo "Specula done in ${SECONDS} s"

peers=""
if [ -n "$PEERS" ]; then
    bash "$PEERS/peer_bench.sh" 90 >"$LOG_DIR/peers.txt" 2>&1
    peers="$LOG_DIR/peers.txt"
    grep -E "^\|" "$peers" || echo "llama.cpp: no figures (see $peers)"
fi

echo
python3 "$(dirname "$0")/serve_table.py" "$LOG_DIR/plain.json" "$LOG_DIR/spec.json" ${peers:+"$peers"} || status=1
echo "(JSON, logs and sweep.png in $LOG_DIR; ${SECONDS} s in all)"
exit $status
