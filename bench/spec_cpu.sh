#!/usr/bin/env bash
# Speculative decoding on the CPU, default model, measured in one run: plain decoding,
# n-gram prompt lookup on a prompt the answer repeats, and the early-exit self-draft.
# Usage: bench/spec_cpu.sh [path/to/specula]
set -euo pipefail
bin=${1:-target/release/specula}
text="The committee met on Tuesday to review the budget. After a long discussion, the committee approved the budget with minor changes, and the chair thanked everyone for their work."
prompt="Repeat this paragraph word for word: $text"
run() { "$bin" generate --chat --prompt "$prompt" --max-tokens 96 --json "$@" 2>/dev/null; }
printf '%-22s %8s %10s %12s %14s\n' method "tok/s" acceptance "tok/step" tokens
for spec in "none" "ngram --draft-len 8" "early-exit --draft-layers 20 --draft-len 4"; do
    # shellcheck disable=SC2086
    run --spec $spec | python3 -c '
import json, sys
r = json.load(sys.stdin); s = r.get("speculative") or {}
acc = s["accepted"] / s["drafted"] if s.get("drafted") else float("nan")
print("%-22s %8.1f %10.2f %12.2f %14d" % (sys.argv[1], r["timings"]["decode_tok_per_s"], acc,
      s.get("mean_accepted_length", 1.0), r["usage"]["completion_tokens"]))' "${spec%% *}"
done
