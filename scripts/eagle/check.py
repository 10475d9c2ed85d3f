"""Self-check, no model needed: the unrolled attention that training uses gives the same
predictions as the head drafting step by step over its KV cache, as at inference.

    python scripts/eagle/check.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import EagleHead, LlamaShape, unrolled_attention  # noqa: E402


def main():
    torch.manual_seed(0)
    s = LlamaShape(64, 1, 4, 2, 16, 96, 10000.0, 1e-5, 50, 0)
    head = EagleHead(s).double()
    n, steps = 12, 4
    embed = torch.randn(s.vocab_size, s.hidden_size, dtype=torch.double)
    tokens = torch.randint(0, s.vocab_size, (1, n))
    feats = torch.randn(1, n, s.hidden_size, dtype=torch.double)
    pos = torch.arange(n)[None]
    valid = torch.ones(1, n, dtype=torch.bool)

    # Training's view: all entries at once, step j reading step j-1's predictions.
    preds, keys, values, inputs = [], [], [], feats
    for j in range(steps):
        x, q, k, v = head.qkv(embed[tokens], inputs, pos)
        keys.append(k)
        values.append(v)
        preds.append(head.finish(x, unrolled_attention(q, keys, values, j, valid)))
        inputs = torch.nn.functional.pad(preds[-1], (0, 0, 1, 0))[:, :-1]

    # Inference's view: the target's features up to t, then the head's own drafts.
    worst = 0.0
    for t in range(n - steps + 1):
        cache = head.new_cache(n + steps, "cpu")
        cache.k, cache.v = cache.k.double(), cache.v.double()
        if t:
            head.forward_cached(embed[tokens[:, :t]], feats[:, :t], pos[:, :t], cache)
        feat = feats[:, t : t + 1]
        for j in range(steps):
            p = t + j
            feat = head.forward_cached(embed[tokens[:, p : p + 1]], feat, pos[:, p : p + 1], cache)
            worst = max(worst, (feat[0, 0] - preds[j][0, p]).abs().max().item())
    print(f"max difference between unrolled training and cached drafting: {worst:.2e}")
    assert worst < 1e-9, "unrolled attention disagrees with cached drafting"
    print("ok")


if __name__ == "__main__":
    main()
