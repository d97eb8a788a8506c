#!/usr/bin/env python3
"""Load-test scenarios against a running tandem server, each writing a report
(markdown, with the exact command, the machine and the date) and plots (PNG)
to --out. loadtests/scenarios.sh starts the server they expect.

  mixed     closed-loop streaming clients over the base and N adapters with
            Zipf-skewed popularity (more adapters than slots, so slots churn):
            throughput, TTFT and e2e per model, slot loads and evictions.
  canary    a route `chat` rolled out 95/5 -> 50/50 -> 0/100 (base -> canary
            adapter) under steady load through /admin/routes: the measured
            split against the configured one in each phase, errors, latency.
  training  the same load without, then with a fine-tuning job running
            (/v1/files + /v1/fine_tuning/jobs): TTFT and inter-token latency
            before and during, the job's loss and training tokens/s.

Needs httpx and matplotlib (loadtests/requirements-report.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import platform
import random
import re
import statistics
import sys
import time

import httpx

PROMPT = "Write a Python function that checks whether a number is prime, with a docstring and tests."


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def scrape(url):
    """Unlabelled and labelled samples of /metrics as {sample: value}."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric_sum(samples, family):
    return sum(v for k, v in samples.items() if re.match(rf"{re.escape(family)}(\{{|$)", k))


async def one_request(client, url, model, max_tokens, t_origin, extra=None):
    """Streams one completion; its record (times relative to t_origin)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, **(extra or {})}
    rec = {"model": model, "start": time.monotonic() - t_origin, "status": 0, "tokens": 0, "ttft": None,
           "gaps": [], "target": None}
    t0 = time.monotonic()
    last = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            rec["status"] = r.status_code
            rec["target"] = r.headers.get("x-tandem-route-target")
            if r.status_code != 200:
                await r.aread()
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.monotonic()
                    if rec["ttft"] is None:
                        rec["ttft"] = now - t0
                    else:
                        rec["gaps"].append(now - last)
                    last = now
                    rec["tokens"] += 1
    except httpx.HTTPError as e:
        rec["status"] = -1
        rec["error"] = str(e)
    rec["e2e"] = time.monotonic() - t0
    return rec


async def closed_loop(url, clients, duration, pick, max_tokens, t_origin, extra=None):
    """`clients` loops, each sending one request at a time until `duration` passes."""
    records = []
    deadline = time.monotonic() + duration
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker(i):
            rng = random.Random(i)
            while time.monotonic() < deadline:
                rec = await one_request(client, url, pick(rng), max_tokens, t_origin, extra)
                records.append(rec)
                if rec["status"] == 429:
                    await asyncio.sleep(1)
        await asyncio.gather(*(worker(i) for i in range(clients)))
    return records


def latency_row(name, recs):
    ok = [r for r in recs if r["status"] == 200]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    e2e = [r["e2e"] for r in ok]
    return (f"| {name} | {len(recs)} | {len(recs) - len(ok)} | {pct(ttft, 50) * 1e3:.0f} / {pct(ttft, 99) * 1e3:.0f} | "
            f"{pct(gaps, 50) * 1e3:.1f} / {pct(gaps, 99) * 1e3:.1f} | {pct(e2e, 50):.2f} / {pct(e2e, 99):.2f} |")


LATENCY_HEAD = ("| | requests | failed | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) | e2e p50 / p99 (s) |\n"
                "|---|---:|---:|---:|---:|---:|")


def throughput_series(recs, bin_s=5.0):
    """(bin centres, generated tokens/s) from each request's tokens spread over its duration."""
    end = max((r["start"] + r.get("e2e", 0) for r in recs), default=0)
    n = int(end / bin_s) + 1
    bins = [0.0] * n
    for r in recs:
        if r["status"] == 200 and r["tokens"]:
            mid = r["start"] + r.get("e2e", 0) / 2
            bins[min(n - 1, int(mid / bin_s))] += r["tokens"]
    return [(i + 0.5) * bin_s for i in range(n)], [b / bin_s for b in bins]


def header(title, args):
    argv = sys.argv[1:]
    if args.from_script:  # the command the user typed: scenarios.sh adds the server's URL
        argv = [a for i, a in enumerate(argv) if a != "--from-script" and "--url" not in argv[max(0, i - 1):i + 1]]
    cmd = " ".join(["loadtests/scenarios.sh" if args.from_script else "loadtests/scenarios.py"] + argv)
    return (f"# {title}\n\nCommand: `{cmd}`  \nMachine: {cpu_name()}, {len(os.sched_getaffinity(0))} "
            f"cores (the load generator runs on the same machine)  \n"
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  \nServer: {args.url}\n\n")


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as p

    return p


# ---- scenarios ------------------------------------------------------------------


def mixed(args, out):
    models = httpx.get(f"{args.url}/v1/models").json()["data"]
    base = models[0]["id"]
    adapters = sorted(m["id"] for m in models if m["id"] != base and m.get("parent") == base)
    names = [base] + adapters
    weights = [1 / (rank + 1) ** args.zipf for rank in range(len(names))]
    before = scrape(args.url)
    t0 = time.monotonic()
    recs = asyncio.run(closed_loop(args.url, args.clients, args.duration,
                                   lambda rng: rng.choices(names, weights)[0], args.max_tokens, t0))
    wall = time.monotonic() - t0
    after = scrape(args.url)
    delta = {f: metric_sum(after, f) - metric_sum(before, f) for f in
             ["tandem_lora_slot_loads_total", "tandem_lora_slot_evictions_total", "tandem_lora_disk_loads_total"]}
    tokens = sum(r["tokens"] for r in recs if r["status"] == 200)
    rows = [latency_row(n, [r for r in recs if r["model"] == n]) for n in names]
    text = header(f"Mixed multi-adapter traffic: {len(adapters)} adapters + base, Zipf {args.zipf}", args)
    text += (f"{args.clients} closed-loop streaming clients for {args.duration:.0f} s, greedy, {args.max_tokens} "
             f"tokens each; model popularity 1/rank^{args.zipf} (base first). Slots: "
             f"{int(metric_sum(after, 'tandem_lora_slots_total'))}.\n\n"
             f"| figure | value |\n|---|---|\n| requests | {len(recs)} |\n"
             f"| failed | {sum(r['status'] != 200 for r in recs)} |\n"
             f"| generated tokens/s | {tokens / wall:.1f} |\n"
             f"| adapter slot loads / evictions | {delta['tandem_lora_slot_loads_total']:.0f} / "
             f"{delta['tandem_lora_slot_evictions_total']:.0f} |\n"
             f"| adapter disk loads | {delta['tandem_lora_disk_loads_total']:.0f} |\n\n"
             f"{LATENCY_HEAD}\n" + "\n".join(rows) + "\n\n![requests and TTFT per model](mixed.png)\n")
    p = plt()
    fig, (a1, a2) = p.subplots(1, 2, figsize=(12, 4.5))
    counts = [sum(r["model"] == n for r in recs) for n in names]
    ttfts = [pct([r["ttft"] for r in recs if r["model"] == n and r["ttft"]], 50) * 1e3 for n in names]
    a1.bar(range(len(names)), counts, color="tab:blue")
    a1.set_xticks(range(len(names)), [n if n != base else "base" for n in names], rotation=60, fontsize=7)
    a1.set_ylabel("requests")
    a1b = a1.twinx()
    a1b.plot(range(len(names)), ttfts, "o-", color="tab:red")
    a1b.set_ylabel("TTFT p50 (ms)", color="tab:red")
    a1.set_title("popularity and time to first token")
    xs, ys = throughput_series(recs)
    a2.plot(xs, ys)
    a2.set_xlabel("s")
    a2.set_ylabel("generated tokens/s")
    a2.set_title("throughput")
    fig.tight_layout()
    fig.savefig(out / "mixed.png", dpi=110)
    return text


def canary(args, out):
    base = httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
    phases = [(95, 5), (50, 50), (0, 100)]
    recs, t0 = [], time.monotonic()
    bounds = []
    for wb, wc in phases:
        targets = [{"model": m, "weight": w} for m, w in [(base, wb), (args.canary, wc)] if w > 0]
        r = httpx.put(f"{args.url}/admin/routes/chat", json={"targets": targets})
        r.raise_for_status()
        start = time.monotonic() - t0
        recs += asyncio.run(closed_loop(args.url, args.clients, args.phase_s, lambda rng: "chat", args.max_tokens, t0))
        bounds.append((start, time.monotonic() - t0, wc))
    rows = []
    for (s, e, wc), (wb, _) in zip(bounds, phases):
        ph = [r for r in recs if s <= r["start"] < e]
        ok = [r for r in ph if r["status"] == 200]
        share = sum(r["target"] == args.canary for r in ok) / max(1, len(ok))
        rows.append(f"| {wb}/{wc} | {len(ph)} | {len(ph) - len(ok)} | {share * 100:.1f}% | "
                    f"{pct([r['ttft'] for r in ok if r['target'] == base and r['ttft']], 99) * 1e3:.0f} | "
                    f"{pct([r['ttft'] for r in ok if r['target'] == args.canary and r['ttft']], 99) * 1e3:.0f} |")
    text = header(f"Canary rollout: base -> {args.canary}, 95/5 -> 50/50 -> 0/100", args)
    text += (f"Route `chat` updated through `PUT /admin/routes/chat` between phases of {args.phase_s:.0f} s, under "
             f"{args.clients} closed-loop streaming clients ({args.max_tokens} tokens, greedy). The target that "
             f"served each request is read from `x-tandem-route-target`.\n\n"
             "| weights base/canary | requests | failed | canary share measured | TTFT p99 base (ms) | "
             "TTFT p99 canary (ms) |\n|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
             + "\n\n![canary share over time](canary.png)\n")
    p = plt()
    fig, ax = p.subplots(figsize=(10, 4))
    bin_s = 5.0
    end = bounds[-1][1]
    xs, shares = [], []
    for i in range(int(end / bin_s) + 1):
        b = [r for r in recs if i * bin_s <= r["start"] < (i + 1) * bin_s and r["status"] == 200]
        if b:
            xs.append((i + 0.5) * bin_s)
            shares.append(100 * sum(r["target"] == args.canary for r in b) / len(b))
    ax.plot(xs, shares, "o-", label="measured (5-s bins)")
    ax.step([s for s, _, _ in bounds] + [end], [wc for _, _, wc in bounds] + [bounds[-1][2]], where="post",
            label="configured", color="black", linestyle="--")
    ax.set_xlabel("s")
    ax.set_ylabel("% of requests to the canary")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "canary.png", dpi=110)
    return text


def training(args, out):
    base = httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
    t0 = time.monotonic()
    before = asyncio.run(closed_loop(args.url, args.clients, args.phase_s, lambda rng: base, args.max_tokens, t0))
    data = pathlib.Path(args.train_data).read_bytes()
    f = httpx.post(f"{args.url}/v1/files", data={"purpose": "fine-tune"},
                   files={"file": ("train.jsonl", data)}, timeout=60).json()
    r = httpx.post(f"{args.url}/v1/fine_tuning/jobs", json={
        "model": base, "training_file": f["id"],
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 2}}},
        "tandem": {"rank": 8}}, timeout=60)
    if r.status_code != 200:
        sys.exit(f"creating the job: {r.status_code} {r.text}")
    job = r.json()
    job_start = time.monotonic() - t0
    during = asyncio.run(closed_loop(args.url, args.clients, args.phase_s, lambda rng: base, args.max_tokens, t0))
    job_end = time.monotonic() - t0
    events = httpx.get(f"{args.url}/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]
    httpx.post(f"{args.url}/v1/fine_tuning/jobs/{job['id']}/cancel", json={})
    steps = sorted((e["data"]["step"], e["data"]["train_loss"], e["data"].get("tokens_per_second", 0), e["created_at"])
                   for e in events if e.get("type") == "metrics" and "train_loss" in (e.get("data") or {}))
    tps = statistics.median([s[2] for s in steps]) if steps else float("nan")
    text = header("Training while serving", args)
    text += (f"{args.clients} closed-loop streaming clients on the base model ({args.max_tokens} tokens, greedy): "
             f"{args.phase_s:.0f} s alone, then {args.phase_s:.0f} s with a fine-tuning job (rank 8, batch 2, "
             f"{args.train_data}) training on the same engine between serving steps (config `[train]`).\n\n"
             f"{LATENCY_HEAD}\n{latency_row('serving alone', before)}\n{latency_row('while training', during)}\n\n")
    if steps:
        text += (f"| training | |\n|---|---|\n| optimiser steps in the window | {len(steps)} |\n"
                 f"| median training tokens/s (of compute) | {tps:.1f} |\n"
                 f"| loss first -> last | {steps[0][1]:.3f} -> {steps[-1][1]:.3f} |\n\n")
    else:
        text += "The job took no optimiser step in the window.\n\n"
    text += "![latency and loss](training.png)\n"
    p = plt()
    fig, (a1, a2) = p.subplots(1, 2, figsize=(12, 4.5))
    for label, recs in [("alone", before), ("while training", during)]:
        xs = [r["start"] for r in recs for _ in r["gaps"]]
        ys = [g * 1e3 for r in recs for g in r["gaps"]]
        a1.plot(xs, ys, ".", markersize=2, label=label)
    a1.axvspan(job_start, job_end, color="orange", alpha=0.1, label="job running")
    a1.set_yscale("log")
    a1.set_xlabel("s")
    a1.set_ylabel("inter-token gap (ms)")
    a1.legend()
    if steps:
        a2.plot([s[0] for s in steps], [s[1] for s in steps], "o-")
    a2.set_xlabel("step")
    a2.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=["mixed", "canary", "training"])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--out", default=None, help="report directory (default target/loadtests/SCENARIO)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=120, help="mixed: seconds of load")
    ap.add_argument("--phase-s", type=float, default=40, help="canary, training: seconds per phase")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--canary", default="a0", help="canary: the adapter rolled out")
    ap.add_argument("--train-data", default="tests/fixtures/train-data/facts.train.jsonl")
    ap.add_argument("--from-script", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = pathlib.Path(args.out or f"target/loadtests/{args.scenario}")
    out.mkdir(parents=True, exist_ok=True)
    text = {"mixed": mixed, "canary": canary, "training": training}[args.scenario](args, out)
    (out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
