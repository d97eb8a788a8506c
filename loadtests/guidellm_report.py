#!/usr/bin/env python3
"""The report of `loadtests/run-vs-llama-server.sh guidellm`: guidellm's JSON
results for llama-server and tandem (OUT_DIR/guidellm-{llama,tandem}.json),
side by side per concurrency level, with tandem/llama-server ratios, as
markdown on stdout and OUT_DIR/guidellm.png.

usage: guidellm_report.py OUT_DIR [--command CMD]
"""

import argparse
import datetime
import json
import os
import pathlib


def levels(path):
    """{streams: figures} from one guidellm JSON result."""
    out = {}
    for b in json.loads(path.read_text())["benchmarks"]:
        m = b["metrics"]
        pick = lambda name, p: m[name]["successful"]["percentiles"][p]  # noqa: E731
        out[b["config"]["strategy"]["streams"]] = {
            "done": m["request_totals"]["successful"],
            "errors": m["request_totals"]["errored"],
            # guidellm's own figure: tokens of completed and cut-off requests over the run.
            "tok_s": m["output_tokens_per_second"]["total"]["mean"],
            "ttft50": pick("time_to_first_token_ms", "p50"),
            "ttft99": pick("time_to_first_token_ms", "p99"),
            "itl50": pick("inter_token_latency_ms", "p50"),
            "itl99": pick("inter_token_latency_ms", "p99"),
        }
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=pathlib.Path)
    ap.add_argument("--command", default="loadtests/run-vs-llama-server.sh guidellm")
    args = ap.parse_args()
    llama = levels(args.out_dir / "guidellm-llama.json")
    tandem = levels(args.out_dir / "guidellm-tandem.json")
    meta = json.loads((args.out_dir / "guidellm-tandem.json").read_text())["metadata"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    lines = [
        "# guidellm against llama-server and tandem, one server at a time",
        "",
        f"Command: `{args.command}`  ",
        f"Machine: {cpu}, {len(os.sched_getaffinity(0))} cores  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
        f"guidellm {meta.get('guidellm_version', '?')} (PyPI, unmodified), `/v1/completions`, synthetic prompts;"
        " each level runs for the scenario's max_duration; output tok/s is guidellm's (every token streamed"
        " in the window, requests cut off at its end included), latencies over completed requests.",
        "",
        "| streams | server | requests done | errors | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in sorted(set(llama) & set(tandem)):
        for name, r in [("llama-server", llama[s]), ("tandem", tandem[s])]:
            lines.append(f"| {s} | {name} | {r['done']} | {r['errors']} | {r['tok_s']:.1f} | "
                         f"{r['ttft50']:.0f} / {r['ttft99']:.0f} | {r['itl50']:.1f} / {r['itl99']:.1f} |")
        lines.append(f"| {s} | **tandem / llama-server** | | | **{tandem[s]['tok_s'] / llama[s]['tok_s']:.2f}x** | "
                     f"{tandem[s]['ttft50'] / llama[s]['ttft50']:.2f}x | {tandem[s]['itl50'] / llama[s]['itl50']:.2f}x |")
    lines += ["", "![throughput and latency](guidellm.png)", ""]
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in [("llama-server", llama), ("tandem", tandem)]:
        xs = sorted(r)
        a1.plot(xs, [r[x]["tok_s"] for x in xs], "o-", label=name)
        a2.plot(xs, [r[x]["ttft50"] for x in xs], "o-", label=name)
    for a, y in [(a1, "output tokens/s"), (a2, "TTFT p50 (ms)")]:
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent streams")
        a.set_ylabel(y)
        a.legend()
    fig.tight_layout()
    fig.savefig(args.out_dir / "guidellm.png", dpi=110)


if __name__ == "__main__":
    main()
