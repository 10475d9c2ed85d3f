"""Greedy chain speculation with an EAGLE head against its target, on the held-out prompts.

Each target step: the head drafts k tokens one after another (each draft step reads the
head's own predicted feature and the token it just drafted), the target runs the k + 1
tokens (its pending token and the drafts) in one forward over its KV cache, the longest
prefix of drafts equal to the target's argmax is accepted, and the target adds its own next
token. Rejected positions are rolled back in both KV caches; the head then reads the target's
features of the accepted tokens. Reports tokens per target step (accepted + 1) and the
acceptance at each draft position (drafts accepted there / drafts made there, as Specula's
statistics count it), and checks that the output equals plain greedy decoding.

    python scripts/eagle/evaluate.py --gguf MODEL.gguf --head models/eagle/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Target, generate, load_head, pick_device  # noqa: E402


class Stats:
    def __init__(self, k: int):
        self.steps = self.accepted = 0
        self.at_position = [0] * k

    def record(self, accepted: int):
        self.steps += 1
        self.accepted += accepted
        for i in range(accepted):
            self.at_position[i] += 1

    def merge(self, other: "Stats"):
        self.steps += other.steps
        self.accepted += other.accepted
        self.at_position = [a + b for a, b in zip(self.at_position, other.at_position)]

    def row(self, k: int) -> dict:
        return {
            "k": k,
            "steps": self.steps,
            "tokens_per_step": (self.accepted + self.steps) / self.steps,
            "acceptance_per_position": [a / self.steps for a in self.at_position],
        }


@torch.no_grad()
def speculate(target: Target, head, prompt: list[int], k: int, max_new: int, stats: Stats) -> list[int]:
    """Greedy output of `target` for `prompt`, produced by chain speculation with `head`."""
    dev, eos = target.device, target.shape.eos_token_id
    n_prompt = len(prompt)
    capacity = n_prompt + max_new + k + 2
    tcache, hcache = target.new_cache(1, capacity), head.new_cache(capacity, dev)
    embed = target.embed

    def run_target(tokens, first_pos):
        ids = torch.tensor([tokens], device=dev)
        pos = torch.arange(first_pos, first_pos + len(tokens), device=dev)[None]
        return target.forward(ids, pos, tcache, torch.ones_like(ids, dtype=torch.bool))[0]

    def run_head(tokens, feats, first_pos):
        pos = torch.arange(first_pos, first_pos + len(tokens), device=dev)[None]
        return head.forward_cached(embed[torch.tensor([tokens], device=dev)], feats[None], pos, hcache)[0]

    feats = run_target(prompt, 0)  # f_0 .. f_{P-1}
    tokens = list(prompt)
    pending = int(target.logits(feats[-1]).argmax())  # the target's next token, not yet run
    if n_prompt > 1:
        run_head(tokens[1:], feats[:-1], 0)  # head entries p: (token p+1, f_p)
    out = [pending]
    while len(out) < max_new and pending != eos:
        t = len(tokens) - 1  # last token the target has run; the head holds entries < t
        drafts, feat, tok = [], feats[t : t + 1], pending
        for i in range(k):
            feat = run_head([tok], feat, t + i)
            tok = int(target.logits(feat[0]).argmax())
            drafts.append(tok)
        hcache.length = t  # drop the drafted entries
        verified = run_target([pending] + drafts, t + 1)
        best = target.logits(verified).argmax(-1).tolist()
        n = 0
        while n < k and drafts[n] == best[n]:
            n += 1
        stats.record(n)
        tcache.length = t + 2 + n  # keep pending + accepted drafts
        tokens += [pending] + drafts[:n]
        feats = torch.cat([feats, verified[: n + 1]])
        run_head(tokens[t + 1 : t + n + 2], feats[t : t + n + 1], t)
        pending = best[n]
        out += drafts[:n] + [pending]
        if eos in out:
            out = out[: out.index(eos) + 1]
            break
    return out[:max_new]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="the target model")
    ap.add_argument("--head", default="models/eagle/smollm2-135m-instruct")
    ap.add_argument("--prompts", default=".dev/eagle-data/prompts.json", help="from prompts.py (its held-out set)")
    ap.add_argument("--set", default="heldout", help="heldout or train")
    ap.add_argument("--limit", type=int, default=0, help="only N prompts, evenly spread over the set (0: all)")
    ap.add_argument("--ks", default="1,2,3,4,5,6", help="draft lengths to try")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--by-category", action="store_true", help="also print tokens per step for each prompt category")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    target = Target.load(args.gguf, device)
    head = load_head(args.head, device)
    with open(args.prompts) as f:
        entries = json.load(f)[args.set]
    if args.limit:  # an evenly spread subset, so that every category stays in
        entries = [entries[i * len(entries) // args.limit] for i in range(min(args.limit, len(entries)))]
    prompts, categories = [e["ids"] for e in entries], [e["category"] for e in entries]

    t0 = time.time()
    plain = [generate(target, [p], args.max_new, 0.0, None)[0][0][len(p) :] for p in prompts]
    print(f"{len(prompts)} {args.set} prompts, {sum(map(len, plain))} greedy tokens ({time.time() - t0:.0f} s)")
    rows = []
    print("| k | target steps | tokens per step | acceptance at draft position 1..k | output = greedy |")
    print("|---|---|---|---|---|")
    for k in [int(x) for x in args.ks.split(",")]:
        stats, same, t0 = Stats(k), 0, time.time()
        per_category = {c: Stats(k) for c in categories}
        for p, want, c in zip(prompts, plain, categories):
            mine = Stats(k)
            same += speculate(target, head, p, k, args.max_new, mine) == want
            for s in (stats, per_category[c]):
                s.merge(mine)
        row = stats.row(k) | {"same_as_greedy": same, "prompts": len(prompts), "seconds": round(time.time() - t0, 1)}
        row["tokens_per_step_by_category"] = {c: round(s.row(k)["tokens_per_step"], 3) for c, s in per_category.items()}
        rows.append(row)
        acc = " ".join(f"{a:.2f}" for a in row["acceptance_per_position"])
        print(f"| {k} | {row['steps']} | {row['tokens_per_step']:.2f} | {acc} | {same}/{len(prompts)} |", flush=True)
        if args.by_category:
            print("  tokens per step by category: " + ", ".join(f"{c} {v:.2f}" for c, v in row["tokens_per_step_by_category"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
