#!/usr/bin/env bash
# On a GPU machine: tensor parallelism through NCCL, by the number of GPUs visible.
#
#   bench/tp_gpu.sh [SPECULA_BINARY]
#
# Always (1 GPU or more):
#   - `kernels parity --model none`: on the dummy 8B, one rank through NCCL against the
#     plain path (greedy ids and every step's logits, bit for bit); with N GPUs also 2, 4, 8
#     ranks against one (greedy ids);
#   - `bench tp --ranks 1 --plain` on the dummy 8B: tok/s through NCCL with one rank and on
#     the plain path, and whether their greedy ids are equal.
# With 2 GPUs or more:
#   - `bench tp --ranks 2` on the dummy 70B (bf16): decode tok/s against the ceiling
#     2 x copy bandwidth / weight bytes, and the all-reduces of one step timed alone;
#   - `bench tp --ranks 2 --plain` on the dummy 8B: greedy ids against the plain path;
#   - the 70B FP8 target with the 1B draft (synthetic acceptance 0.8, as bench/runtime_gpu.sh
#     runs it) with the draft on GPU 0, then on GPU 1 (`--draft-device 1`).
# A short table comes last.
#
# Environment: LOG_DIR (default /tmp/specula-tp), CUDA_HOME (default /usr/local/cuda),
# DECODE_TOKENS (default 128), MAX_TOKENS (the speculative runs, default 256),
# GPU_MEMORY_FRACTION (the 70B FP8 runs, default 0.99), NGPU (default: nvidia-smi -L's
# count), NCCL_NVLS_ENABLE (default 0:
# NVLink multicast stays off; Specula also sets it to 0 when it is unset).
set -uo pipefail
BIN=${1:-target/release/specula}
LOG_DIR=${LOG_DIR:-/tmp/specula-tp}
DECODE_TOKENS=${DECODE_TOKENS:-128}
MAX_TOKENS=${MAX_TOKENS:-256}
GPU_MEMORY_FRACTION=${GPU_MEMORY_FRACTION:-0.99}
mkdir -p "$LOG_DIR"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_HOME/lib64:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

# shellcheck source=bench/nccl_env.sh
source "$(dirname "$0")/nccl_env.sh"
find_nccl || exit 1

NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
[ "$NGPU" -ge 1 ] || { echo "no GPU visible (nvidia-smi -L; or set NGPU)"; exit 1; }
echo "GPUs visible: $NGPU"
status=0
step() { # name, command...: runs it, its output to $LOG_DIR/name.log, the tail on failure
    local name=$1
    shift
    echo "== $name: $*"
    "$@" >"$LOG_DIR/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || { echo "$name failed (exit $rc):"; tail -n 8 "$LOG_DIR/$name.log"; status=1; }
    return $rc
}

step parity "$BIN" kernels parity --model none --tokens 32
sed -n '/== tensor parallelism/,$p' "$LOG_DIR/parity.log"
step tp1-8b "$BIN" bench tp --ranks 1 --model dummy:llama-3.1-8b --plain \
    --decode-tokens "$DECODE_TOKENS" --json "$LOG_DIR/tp1-8b.json" && tail -n 6 "$LOG_DIR/tp1-8b.log"

if [ "$NGPU" -ge 2 ]; then
    step tp2-70b "$BIN" bench tp --ranks 2 --model dummy:llama-3.3-70b \
        --decode-tokens "$DECODE_TOKENS" --json "$LOG_DIR/tp2-70b.json" && tail -n 6 "$LOG_DIR/tp2-70b.log"
    step tp2-8b "$BIN" bench tp --ranks 2 --model dummy:llama-3.1-8b --plain \
        --decode-tokens "$DECODE_TOKENS" --json "$LOG_DIR/tp2-8b.json" && tail -n 6 "$LOG_DIR/tp2-8b.log"
    # 64-token prompt of token ids (the dummy models have no tokenizer).
    python3 -c "print(' '.join(str((i * 104729) % 120000 + 100) for i in range(64)))" >"$LOG_DIR/prompt.txt"
    spec=(generate --backend cuda --model dummy:llama-3.3-70b --dtype fp8 --max-tokens "$MAX_TOKENS" --ignore-eos
        --json --gpu-memory-fraction "$GPU_MEMORY_FRACTION" --prompts-file "$LOG_DIR/prompt.txt"
        --spec draft --draft-model dummy:llama-3.2-1b --synthetic-acceptance 0.8 --draft-len 8)
    step draft-gpu0 "$BIN" "${spec[@]}" && tail -n 3 "$LOG_DIR/draft-gpu0.log"
    step draft-gpu1 "$BIN" "${spec[@]}" --draft-device 1 && tail -n 3 "$LOG_DIR/draft-gpu1.log"
fi

LOG_DIR="$LOG_DIR" NGPU="$NGPU" python3 - <<'EOF'
import json, os, re
d, n = os.environ["LOG_DIR"], int(os.environ["NGPU"])
def load(name):
    try:
        return json.load(open(f"{d}/{name}.json"))
    except (OSError, ValueError):
        return None
def tok_s(name):
    try:
        m = re.findall(r"([0-9.]+) output tok/s", open(f"{d}/{name}.log").read())
        return f"{float(m[-1]):.1f} tok/s" if m else "-"
    except OSError:
        return "-"
rows = []
try:
    for line in open(f"{d}/parity.log"):
        if "vs plain" in line or "vs tp1" in line:
            rows.append((" ".join(line.split()[:-3]), " ".join(line.split()[-3:])))
except OSError:
    rows.append(("parity", "no log"))
for name in ["tp1-8b", "tp2-8b", "tp2-70b"]:
    r = load(name)
    if r is None:
        continue
    frac = r["tok_s"] / r["ceiling_tok_s"]
    rows.append((f"{name} decode", f"{r['tok_s']:.1f} tok/s, {100 * frac:.0f}% of {r['ceiling_tok_s']:.1f}"))
    rows.append((f"{name} all-reduces/step", f"{r['allreduce_graph_ms']:.3f} ms graph, {r['allreduce_eager_ms']:.3f} ms eager"))
    if r.get("plain_tok_s") is not None:
        ids = "ids equal" if r["ids_equal_plain"] else "ids DIFFER"
        rows.append((f"{name} plain path", f"{r['plain_tok_s']:.1f} tok/s, {ids}"))
if n >= 2:
    rows.append(("70B fp8 + 1B draft, draft on GPU 0", tok_s("draft-gpu0")))
    rows.append(("70B fp8 + 1B draft, draft on GPU 1", tok_s("draft-gpu1")))
w = max(len(a) for a, _ in rows)
print(f"\n== tensor parallelism, {n} GPU(s) ==")
for a, b in rows:
    print(f"{a:<{w}}  {b}")
EOF
exit $status
