#!/usr/bin/env python3
"""The closing table of bench/serve_gpu.sh: per concurrency, output tok/s of the plain and the
speculating server (from their `specula bench serve --json` reports), the acceptance, TTFT and
TPOT p50 of each, and llama.cpp's batched-bench generation tok/s where its output is given.

    serve_table.py PLAIN.json SPEC.json [LLAMA_BATCHED_BENCH.txt]
"""
import json
import sys


def runs_by_concurrency(path):
    """{concurrency: run} of a report; {} when the file is missing or unreadable."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        print(f"{path}: {e}", file=sys.stderr)
        return {}
    return {r["load"]["concurrency"]: r for r in report["runs"] if "concurrency" in r["load"]}


def llama_cpp(path):
    """{parallel sequences: generation tok/s} from llama-batched-bench's table (`| PP | TG | B |
    ... | S_TG t/s | ...`); llama-bench's tables in the same file are skipped."""
    found, header = {}, None
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return found
    for line in lines:
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "S_TG t/s" in cells and "B" in cells:
            header = cells
        elif header and len(cells) == len(header) and cells[0].isdigit():
            row = dict(zip(header, cells))
            found[int(row["B"])] = float(row["S_TG t/s"])
        elif not set("".join(cells)) <= set("-: "):
            header = None
    return found


def fmt(x, spec="{:.1f}"):
    return "-" if x is None else spec.format(x)


def ratio(a, b):
    return a / b if a is not None and b else None


def pick(run, *keys):
    for k in keys:
        run = run.get(k) if isinstance(run, dict) else None
    return run


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    plain, spec = runs_by_concurrency(argv[1]), runs_by_concurrency(argv[2])
    peer = llama_cpp(argv[3]) if len(argv) > 3 else {}
    columns = ["clients", "plain tok/s", "spec tok/s", "spec/plain", "accepted", "tok/step",
               "TTFT p50 plain/spec ms", "TPOT p50 plain/spec ms"]
    if peer:
        columns += ["llama.cpp tok/s", "plain/llama.cpp", "spec/llama.cpp"]
    rows = []
    for c in sorted(set(plain) | set(spec)):
        p, s = plain.get(c, {}), spec.get(c, {})
        p_tps, s_tps = p.get("output_throughput"), s.get("output_throughput")
        row = [str(c), fmt(p_tps), fmt(s_tps), fmt(ratio(s_tps, p_tps), "{:.2f}x"),
               fmt(pick(s, "speculative", "acceptance_rate") and 100 * s["speculative"]["acceptance_rate"], "{:.1f}%"),
               fmt(pick(s, "speculative", "tokens_per_step"), "{:.2f}"),
               f"{fmt(pick(p, 'ttft_ms', 'p50'))} / {fmt(pick(s, 'ttft_ms', 'p50'))}",
               f"{fmt(pick(p, 'tpot_ms', 'p50'), '{:.2f}')} / {fmt(pick(s, 'tpot_ms', 'p50'), '{:.2f}')}"]
        if peer:
            l_tps = peer.get(c)
            row += [fmt(l_tps), fmt(ratio(p_tps, l_tps), "{:.2f}x"), fmt(ratio(s_tps, l_tps), "{:.2f}x")]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [columns]) for i in range(len(columns))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    print(line(columns))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    failed = sum(r.get("failed", 0) for r in list(plain.values()) + list(spec.values()))
    if failed:
        print(f"{failed} requests failed: see the JSON reports' `failures`")
    return 0 if plain and spec else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
