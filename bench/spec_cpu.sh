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
# prompts through the one-request engine (`generate --prompt`): tokens per target step,
# decode tok/s and acceptance per depth; then the same trees batched through the runtime
# (`--prompts-file`, batch 1 and 8: output tok/s of the whole run, tokens per step);
# TREES="16:4 32:4" sets the trees (nodes:children per node), ENGINE_TOKENS the tokens per
# prompt (default 128).
# Then Medusa and lookahead against plain decoding, one request at a time through the
# engine, on the held-out prompts and on the correcting prompt: no Medusa head is trained
# for the default model, so its rows use random heads (`--draft-model dummy:...`) and are
# labelled RANDOM (they measure what drafting and verifying cost, not what heads accept);
# LOOKAHEAD="5:4:5 3:3:3" sets lookahead's W:N:G, MEDUSA_PROMPTS how many held-out prompts
# (default all).
# Usage: bench/spec_cpu.sh [path/to/specula]      (BACKEND=cuda runs the same on a GPU)
set -euo pipefail
bin=${1:-target/release/specula}
backend=${BACKEND:-cpu}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
text="The comittee met on Tuesday to reveiw the budjet. After a long discusion, the comittee aproved the budjet with minor changes, and the chair thanked everyone for there work. The next meeting will be held in two weeks. Members are asked to send there reports to the secretery before Friday, so that they can be shared with the hole group. Questions about the agenda should go to the chair."
echo "Correct the spelling mistakes in this text and write it out again: $text" >"$dir/prompt.txt"
printf '%-22s %7s %6s %9s %6s %9s %9s %9s %11s\n' \
    method "tok/s" accept "tok/step" tokens "draft ms" "pre ms" "verify ms" "overlap ms"
for spec in "none" "ngram --draft-len 4" "ngram --draft-len 8" "early-exit --draft-layers 24 --draft-len 4" \
    "eagle --draft-len 4"; do
    # shellcheck disable=SC2086
    "$bin" generate --backend "$backend" --chat --prompts-file "$dir/prompt.txt" --max-tokens 160 --json \
        --timeline "$dir/timeline.json" --spec $spec >"$dir/out.json" 2>/dev/null
    python3 - "$(echo $spec | sed "s/--draft-len /k=/; s/--draft-layers /L=/" | cut -c1-40)" "$dir/out.json" "$dir/timeline.json" <<'PY'
import json, os, sys
name, out, tl = sys.argv[1:]
r = json.loads(open(out).readline())
s = r.get("speculative") or {}
t = json.load(open(tl))["summary"] if os.path.exists(tl) else {}
acc = s["accepted"] / s["drafted"] if s.get("drafted") else float("nan")
print("%-22s %7.1f %6.2f %9.2f %6d %9.0f %9.0f %9.0f %11.0f" % (
    name, r["timings"]["decode_tok_per_s"], acc, s.get("mean_accepted_length", 1.0),
    r["usage"]["completion_tokens"], t.get("draft_ms", 0), t.get("pre_draft_ms", 0),
    t.get("verify_ms", 0), t.get("overlapped_ms", 0)))
PY
    rm -f "$dir/timeline.json"
done

echo
python3 "$(dirname "$0")/eagle_prompts.py" >"$dir/heldout.txt"
printf '%-22s %7s %6s %9s %6s  %s\n' method "tok/s" accept "tok/step" tokens "acceptance per position"
for spec in "none" "eagle --draft-len 2" "eagle --draft-len 4" "eagle --draft-len 6"; do
    # shellcheck disable=SC2086
    "$bin" generate --backend "$backend" --chat --prompts-file "$dir/heldout.txt" --concurrency 1 --max-tokens 128 --json \
        --spec $spec >"$dir/out.json" 2>"$dir/err.txt"
    python3 - "$(echo $spec | sed "s/--draft-len /k=/")" "$dir/out.json" "$dir/err.txt" <<'PY'
import json, re, sys
name, out, err = sys.argv[1:]
rows = [json.loads(l) for l in open(out) if l.strip()]
tokens = sum(r["usage"]["completion_tokens"] for r in rows)
decoded = sum(r["usage"]["completion_tokens"] - 1 for r in rows)
ms = sum(r["timings"]["decode_ms"] for r in rows)
drafted = sum((r.get("speculative") or {}).get("drafted", 0) for r in rows)
accepted = sum((r.get("speculative") or {}).get("accepted", 0) for r in rows)
steps = sum((r.get("speculative") or {}).get("steps", 0) for r in rows)
m = re.search(r"acceptance per position ([0-9. ]+)", open(err).read())
print("%-22s %7.1f %6.2f %9.2f %6d  %s" % (name, decoded / (ms / 1e3), accepted / drafted if drafted else float("nan"),
      (accepted + steps) / steps if steps else 1.0, tokens, m.group(1).strip() if m else "-"))
PY
done

echo
echo "one request at a time through the engine (generate --prompt), held-out prompts:"
printf '%-28s %7s %9s %6s  %s\n' method "tok/s" "tok/step" tokens "acceptance per depth"
configs=("none" "eagle --draft-len 4" "eagle --draft-len 6")
for t in ${TREES:-16:4 24:4 32:4 32:8}; do
    configs+=("eagle --draft-len 6 --spec-tree ${t%%:*} --tree-top-k ${t##*:}")
done
for spec in "${configs[@]}"; do
    : >"$dir/engine.json"
    while IFS= read -r prompt; do
        # shellcheck disable=SC2086
        "$bin" generate --backend "$backend" --chat --prompt "$prompt" --max-tokens "${ENGINE_TOKENS:-128}" --json \
            --spec $spec >>"$dir/engine.json" 2>/dev/null
    done <"$dir/heldout.txt"
    python3 - "$(echo $spec | sed "s/--draft-len /k=/; s/--spec-tree /tree=/; s/--tree-top-k /top=/")" "$dir/engine.json" <<'PY'
import json, sys
name, out = sys.argv[1:]
rows = [json.loads(l) for l in open(out) if l.strip()]
tokens = sum(r["usage"]["completion_tokens"] for r in rows)
decoded = sum(r["usage"]["completion_tokens"] - 1 for r in rows)
ms = sum(r["timings"]["decode_ms"] for r in rows)
specs = [r["speculative"] for r in rows if r.get("speculative")]
steps = sum(s["steps"] for s in specs)
accepted = sum(s["accepted"] for s in specs)
depth = max((len(s["acceptance_per_position"]) for s in specs), default=0)
# Steps reaching each depth, over all prompts (weights: each prompt's steps at that depth).
per = []
for d in range(depth):
    w = [(s["steps"], s["acceptance_per_position"][d]) for s in specs if len(s["acceptance_per_position"]) > d]
    per.append(sum(a * b for a, b in w) / max(1, sum(a for a, _ in w)))
print("%-28s %7.1f %9.2f %6d  %s" % (name, decoded / (ms / 1e3), (accepted + steps) / steps if steps else 1.0,
      tokens, " ".join("%.2f" % p for p in per) or "-"))
PY
done

echo
echo "the same trees batched through the runtime (--prompts-file), batch 1 and 8, held-out prompts:"
printf '%-34s %5s %7s %9s %6s\n' method batch "tok/s" "tok/step" tokens
configs=("none" "eagle --draft-len 4")
for t in ${TREES:-16:4 24:4 32:4 32:8}; do
    configs+=("eagle --draft-len 6 --spec-tree ${t%%:*} --tree-top-k ${t##*:}")
done
for batch in 1 8; do
    for spec in "${configs[@]}"; do
        # shellcheck disable=SC2086
        "$bin" generate --backend "$backend" --chat --prompts-file "$dir/heldout.txt" --concurrency "$batch" \
            --max-tokens "${ENGINE_TOKENS:-128}" --json --spec $spec >"$dir/out.json" 2>"$dir/err.txt"
        python3 - "$(echo $spec | sed "s/--draft-len /k=/; s/--spec-tree /tree=/; s/--tree-top-k /top=/")" "$batch" \
            "$dir/out.json" "$dir/err.txt" <<'PY'
import json, re, sys
name, batch, out, err = sys.argv[1:]
rows = [json.loads(l) for l in open(out) if l.strip()]
specs = [r["speculative"] for r in rows if r.get("speculative")]
steps = sum(s["steps"] for s in specs)
accepted = sum(s["accepted"] for s in specs)
m = re.search(r"([0-9.]+) output tok/s", open(err).read())
print("%-34s %5s %7s %9.2f %6d" % (name, batch, m.group(1) if m else "-", (accepted + steps) / steps if steps else 1.0,
      sum(r["usage"]["completion_tokens"] for r in rows)))
PY
    done
done

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
