#!/usr/bin/env bash
# On a GPU machine: speculative decoding through the runtime (Intake → Drafter → Verifier),
# a dummy target (default llama-3.1-8b) with the dummy llama-3.2-1b drafting on its own
# CUDA stream, every draft token accepted with probability 0.8 (random weights accept
# nothing on their own). Side by side in one run: plain decoding and speculation at batch 1
# and at batch 8, with the Drafter/Verifier timeline and its overlap.
#
#   bench/runtime_gpu.sh [SPECULA_BINARY]
#
# Environment: LOG_DIR (default /tmp/specula-runtime), CUDA_HOME (default /usr/local/cuda),
# MAX_TOKENS (default 256), TARGET (default dummy:llama-3.1-8b), DTYPE (auto or fp8, the
# target's weights), DRAFT_DTYPE (the draft's, default DTYPE), DRAFT_LENS (default "8 4":
# the batch-1 runs), BATCH8 (default 1: also run 8 requests at once, with the first draft
# length), GPU_MEMORY_FRACTION (default: the runtime's; e.g. 0.99 for the 70B on an 80 GB card).
set -uo pipefail
BIN=${1:-target/release/specula}
LOG_DIR=${LOG_DIR:-/tmp/specula-runtime}
MAX_TOKENS=${MAX_TOKENS:-256}
TARGET=${TARGET:-dummy:llama-3.1-8b}
DTYPE=${DTYPE:-auto}
DRAFT_DTYPE=${DRAFT_DTYPE:-$DTYPE}
DRAFT_LENS=${DRAFT_LENS:-8 4}
BATCH8=${BATCH8:-1}
mkdir -p "$LOG_DIR"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_HOME/lib64:${LD_LIBRARY_PATH:-}"

# 64-token prompts of token ids (the dummy models have no tokenizer).
python3 -c "
for r in range(8):
    print(' '.join(str((r * 7919 + i * 104729) % 120000 + 100) for i in range(64)))" >"$LOG_DIR/prompts8.txt"
head -n 1 "$LOG_DIR/prompts8.txt" >"$LOG_DIR/prompts1.txt"

common=(generate --backend cuda --model "$TARGET" --dtype "$DTYPE" --max-tokens "$MAX_TOKENS" --ignore-eos --json)
[ -n "${GPU_MEMORY_FRACTION:-}" ] && common+=(--gpu-memory-fraction "$GPU_MEMORY_FRACTION")
spec=(--spec draft --draft-model dummy:llama-3.2-1b --draft-dtype "$DRAFT_DTYPE" --synthetic-acceptance 0.8)
run() { # name, prompts file, extra args...
    local name=$1 file=$2
    shift 2
    "$BIN" "${common[@]}" --prompts-file "$file" --timeline "$LOG_DIR/$name.timeline.json" "$@" \
        >"$LOG_DIR/$name.jsonl" 2>"$LOG_DIR/$name.log"
    local rc=$?
    echo "$name: $(tail -n 3 "$LOG_DIR/$name.log" | grep "^\[" | tr '\n' ' ')"
    [ $rc -eq 0 ] || { echo "$name failed (exit $rc):"; tail -n 5 "$LOG_DIR/$name.log"; }
    return $rc
}
status=0
run plain-b1 "$LOG_DIR/prompts1.txt" || status=1
for k in $DRAFT_LENS; do
    run "spec$k-b1" "$LOG_DIR/prompts1.txt" "${spec[@]}" --draft-len "$k" || status=1
done
if [ "$BATCH8" = 1 ]; then
    k=${DRAFT_LENS%% *}
    run plain-b8 "$LOG_DIR/prompts8.txt" || status=1
    run "spec$k-b8" "$LOG_DIR/prompts8.txt" "${spec[@]}" --draft-len "$k" || status=1
fi
exit $status
