#!/usr/bin/env python3
"""Compare two sse_load.py JSON results level by level: compare.py A.json B.json
prints, per concurrency, both figures and the ratio B/A (A = the peer, B = tandem)."""

import json
import sys


def load(p):
    with open(p) as f:
        d = json.load(f)
    return d, {s["concurrency"]: s for s in d["levels"]}


def ratio(a, b):
    return "-" if not a or b is None else f"{b / a:.2f}x"


def f(x, scale=1.0, nd=2):
    return "-" if x is None else f"{x * scale:.{nd}f}"


def main(a_path, b_path, a_name="llama-server", b_name="tandem"):
    da, a = load(a_path)
    db, b = load(b_path)
    print(f"### {b_name} vs {a_name} (ratio = {b_name} / {a_name}; higher tok/s and lower latency are better)\n")
    print("| concurrency | out tok/s A | out tok/s B | ratio | TTFT p50 A s | TTFT p50 B s | ratio | ITL p50 A ms | ITL p50 B ms | ratio | errors A/B |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in sorted(set(a) & set(b)):
        x, y = a[c], b[c]
        print(
            f"| {c} | {f(x['output_tok_s'], nd=1)} | {f(y['output_tok_s'], nd=1)} | {ratio(x['output_tok_s'], y['output_tok_s'])} "
            f"| {f(x['ttft_p50_s'])} | {f(y['ttft_p50_s'])} | {ratio(x['ttft_p50_s'], y['ttft_p50_s'])} "
            f"| {f(x['itl_p50_s'], 1000, 1)} | {f(y['itl_p50_s'], 1000, 1)} | {ratio(x['itl_p50_s'], y['itl_p50_s'])} "
            f"| {x['errors']}/{y['errors']} |"
        )
    if da["config"].get("shared_prefix_tokens"):
        print(f"\nShared prefix ({da['config']['shared_prefix_tokens']} tokens), sequential: TTFT of the first request vs p50 of the later ones\n")
        print("| server | first TTFT s | later TTFT p50 s | first / later |")
        print("| --- | ---: | ---: | ---: |")
        for name, d in ((a_name, a), (b_name, b)):
            for s in d.values():
                fr, rest = s["ttft_first_s"], s["ttft_rest_p50_s"]
                print(f"| {name} | {f(fr, nd=3)} | {f(rest, nd=3)} | {f(fr / rest if fr and rest else None, nd=1)} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
