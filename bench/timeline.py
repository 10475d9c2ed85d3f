#!/usr/bin/env python3
"""Summarizes a runtime timeline (`specula generate --timeline FILE`): verification steps by
query tokens (count, median and mean milliseconds), the Verifier's idle time between steps,
and the Drafter's work.

    bench/timeline.py FILE [FILE ...]
"""
import json
import statistics
import sys


def summarize(path):
    spans = json.load(open(path))["spans"]
    verify = sorted((s for s in spans if s["work"] == "verify"), key=lambda s: s["start_us"])
    print(f"== {path}: {len(verify)} verification steps")
    by_size = {}
    for s in verify:
        by_size.setdefault(s.get("tokens", 0), []).append((s["end_us"] - s["start_us"]) / 1e3)
    print("  tokens  steps  median ms  mean ms")
    for n in sorted(by_size):
        ms = by_size[n]
        print(f"  {n:6d} {len(ms):6d} {statistics.median(ms):10.2f} {statistics.mean(ms):8.2f}")
    gaps = [(b["start_us"] - a["end_us"]) / 1e3 for a, b in zip(verify, verify[1:])]
    if gaps:
        busy = sum((s["end_us"] - s["start_us"]) / 1e3 for s in verify)
        print(f"  Verifier idle between steps: median {statistics.median(gaps):.3f} ms, "
              f"total {sum(gaps):.1f} ms against {busy:.1f} ms busy")
    for work in ("draft", "pre_draft"):
        ds = [s for s in spans if s["work"] == work]
        if ds:
            ms = [(s["end_us"] - s["start_us"]) / 1e3 for s in ds]
            toks = [s.get("tokens", 0) for s in ds]
            print(f"  {work}: {len(ds)} spans, {sum(ms):.1f} ms, median {statistics.median(ms):.2f} ms, "
                  f"tokens median {statistics.median(toks)}")


for p in sys.argv[1:]:
    summarize(p)
