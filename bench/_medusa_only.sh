#!/usr/bin/env bash
# Speculative decoding on the CPU, default model, batch 1, through the runtime (Drafter and
# Verifier actors), measured in one run: plain decoding, n-gram prompt lookup on a prompt
# whose answer repeats it (correcting a text), and the early-exit self-draft. The timeline columns say how long
# the Drafter worked (drafting, and pre-drafting the next round) and how much of it ran
# while the Verifier verified. Then EAGLE (the head trained for the default model) against
# plain decoding on held-out chat prompts (bench/eagle_prompts.py: templates and topics the
# head never saw in training), one request at a time: decode tok/s, tokens per step and the
# acceptance at each draft position, over all prompts. Last, plain, chain and tree EAGLE
# (`--spec-tree N`, EAGLE-2 style, drafted as deep as --draft-len) on the same held-out
# prompts through the one-request engine (`generate --prompt`, where trees run): tokens per
# target step, decode tok/s and acceptance per depth; TREES="16:4 32:4" sets the trees
# (nodes:children per node), ENGINE_TOKENS the tokens per prompt (default 128).
# Then Medusa and lookahead against plain decoding, one request at a time through the
# engine, on the held-out prompts and on the correcting prompt: no Medusa head is trained
# for the default model, so its rows use random heads (`--draft-model dummy:...`) and are
# labelled RANDOM (they measure what drafting and verifying cost, not what heads accept);
# LOOKAHEAD="5:4:5 3:3:3" sets lookahead's W:N:G, MEDUSA_PROMPTS how many held-out prompts
# (default all).
# Usage: bench/spec_cpu.sh [path/to/specula]      (BACKEND=cuda runs the same on a GPU)
set -euo pipefail
bin=${1:-target/release/specula}
python3 "$(dirname "$0")/eagle_prompts.py" >"$dir/heldout.txt"
echo
echo "Medusa (random heads: cost only) and lookahead, one request at a time through the engine:"
head -n "${MEDUSA_PROMPTS:-1000}" "$dir/heldout.txt" >"$dir/heldout_some.txt"
cp "$dir/prompt.txt" "$dir/correct.txt"
configs=("none" "medusa --draft-model dummy:smollm2-135m --draft-len 4"
    "medusa --draft-model dummy:smollm2-135m --draft-len 4 --spec-tree 16 --tree-top-k 4")
for t in ${LOOKAHEAD:-5:4:5 3:3:3}; do
    IFS=: read -r w n g <<<"$t"
    configs+=("lookahead --lookahead-window $w --lookahead-ngram $n --lookahead-guesses $g")
done
for prompts in heldout_some correct; do
    echo "prompts: $prompts"
    printf '%-34s %7s %9s %6s %6s  %s\n' method "tok/s" "tok/step" accept tokens "acceptance per depth"
    for spec in "${configs[@]}"; do
        : >"$dir/engine.json"
        while IFS= read -r prompt; do
            # shellcheck disable=SC2086
            "$bin" generate --backend "$backend" --chat --prompt "$prompt" --max-tokens "${ENGINE_TOKENS:-128}" \
                --json --spec $spec >>"$dir/engine.json" 2>/dev/null
        done <"$dir/$prompts.txt"
        python3 - "$(echo $spec | sed "s/--draft-model dummy:[a-z0-9.-]*//; s/--draft-len /k=/; s/--spec-tree /tree=/;
            s/--tree-top-k /top=/; s/--lookahead-window /W=/; s/--lookahead-ngram /N=/; s/--lookahead-guesses /G=/")" \
            "$dir/engine.json" <<'PY'
import json, sys
name, out = sys.argv[1:]
rows = [json.loads(l) for l in open(out) if l.strip()]
decoded = sum(r["usage"]["completion_tokens"] - 1 for r in rows)
ms = sum(r["timings"]["decode_ms"] for r in rows)
specs = [r["speculative"] for r in rows if r.get("speculative")]
if any(s.get("random_heads") for s in specs):
    name += " RANDOM"
steps, accepted, drafted = (sum(s[k] for s in specs) for k in ("steps", "accepted", "drafted"))
depth = max((len(s["acceptance_per_position"]) for s in specs), default=0)
per = []
for d in range(depth):
    w = [(s["steps"], s["acceptance_per_position"][d]) for s in specs if len(s["acceptance_per_position"]) > d]
    per.append(sum(a * b for a, b in w) / max(1, sum(a for a, _ in w)))
print("%-34s %7.1f %9.2f %6.3f %6d  %s" % (" ".join(name.split()), decoded / (ms / 1e3),
      (accepted + steps) / steps if steps else 1.0, accepted / drafted if drafted else float("nan"),
      sum(r["usage"]["completion_tokens"] for r in rows), " ".join("%.2f" % p for p in per[:8]) or "-"))
PY
    done
done
