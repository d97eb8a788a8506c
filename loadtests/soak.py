#!/usr/bin/env python3
"""Soak and overload test: many concurrent streaming clients against one
tandem server with a bounded queue, for a fixed time.

Each client loops until --duration is up: it picks a model (the base and the
adapters, with skewed popularity), streams a greedy completion of
--max-tokens tokens, and

  - on 200 reads the stream to `data: [DONE]`, or, for --disconnect of the
    requests, closes the connection after the first token (an abort);
  - on 429 notes how long the refusal took and that it carried Retry-After,
    sleeps that long and tries again;
  - on anything else (a 5xx, another status, a connection error, a stream
    that ends without [DONE]) records a failure.

The server's process is sampled throughout (RSS, open file descriptors,
threads from /proc/PID) and its /metrics read before and after. The run
passes when there was no failure, every admitted request completed or was
aborted by its client, refusals were quick, and once idle again the KV
blocks and adapter pins are back to their baseline, descriptors and threads
have not grown, and RSS stayed flat after the warm-up. Prints a markdown
report (and writes it to --report), exits 1 on a failed check.

    python loadtests/soak.py --url http://127.0.0.1:8000 --pid PID \\
        --models base,a,b --clients 1000 --duration 300

Needs httpx (loadtests/requirements.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Tally:
    admitted: int = 0
    completed: int = 0
    aborted: int = 0
    refused: int = 0
    refused_without_retry_after: int = 0
    failures: list = field(default_factory=list)
    refusal_s: list = field(default_factory=list)
    e2e_s: list = field(default_factory=list)
    tokens: int = 0
    by_model: dict = field(default_factory=dict)


def proc(pid: int) -> dict:
    status = open(f"/proc/{pid}/status").read()
    rss_kb = int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmRSS:")))
    return {
        "rss_mb": rss_kb / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
    }


async def metrics(client: httpx.AsyncClient, url: str) -> dict:
    text = (await client.get(f"{url}/metrics", timeout=30)).text
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


async def wait_idle(client: httpx.AsyncClient, url: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        m = await metrics(client, url)
        busy = m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0)
        if busy == 0 and m.get("tandem_lora_slots_pinned", 0) == 0 and m.get("tandem_kv_blocks_used", 0) == 0:
            return m
        if time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.5)


def prompt(rng: random.Random) -> str:
    words = "time year people way day man thing world school state family group country problem hand part".split()
    return " ".join(rng.choice(words) for _ in range(12))


async def one_client(i: int, args, models: list, weights: list, client: httpx.AsyncClient, t: Tally, stop_at: float):
    rng = random.Random(args.seed * 100_003 + i)
    while time.monotonic() < stop_at:
        model = rng.choices(models, weights)[0]
        body = {
            "model": model,
            "prompt": prompt(rng),
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        disconnect = rng.random() < args.disconnect
        start = time.monotonic()
        try:
            async with client.stream("POST", f"{args.url}/v1/completions", json=body, timeout=args.timeout) as r:
                if r.status_code == 429:
                    t.refused += 1
                    t.refusal_s.append(time.monotonic() - start)
                    retry = r.headers.get("retry-after")
                    if retry is None:
                        t.refused_without_retry_after += 1
                    await r.aread()
                    await asyncio.sleep(float(retry or 1) * (0.5 + rng.random()))
                    continue
                if r.status_code != 200:
                    t.failures.append(f"{model}: status {r.status_code}: {(await r.aread())[:200]!r}")
                    continue
                t.admitted += 1
                t.by_model[model] = t.by_model.get(model, 0) + 1
                done = False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        t.tokens += chunk["usage"]["completion_tokens"]
                    if disconnect and chunk.get("choices"):
                        break  # leaving the `async with` closes the connection mid-stream
                if disconnect and not done:
                    t.aborted += 1
                elif done:
                    t.completed += 1
                    t.e2e_s.append(time.monotonic() - start)
                else:
                    t.failures.append(f"{model}: the stream ended without [DONE]")
        except (httpx.HTTPError, OSError) as e:
            t.failures.append(f"{model}: {type(e).__name__}: {e}")


def pct(xs: list, q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main_async(args) -> int:
    models = args.models.split(",")
    weights = [float(w) for w in args.weights.split(",")] if args.weights else [2.0**-i for i in range(len(models))]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(limits=limits) as client:
        # Warm-up: the same load for --warmup seconds (adapter loads, the
        # allocator's per-thread arenas and the runtime's threads reach their
        # working size), then the baseline: RSS that grows after this is a leak.
        warm = Tally()
        warm_until = time.monotonic() + args.warmup
        await asyncio.gather(*[one_client(-1 - i, args, models, weights, client, warm, warm_until) for i in range(args.clients)])
        if warm.failures:
            print("warm-up failures:", warm.failures[:5], file=sys.stderr)
        base_m = await wait_idle(client, args.url)
        await asyncio.sleep(args.settle)
        base_p = proc(args.pid)

        log_offset = os.path.getsize(args.server_log) if args.server_log else 0
        t = Tally()
        peak = dict(base_p)
        stop_at = time.monotonic() + args.duration
        started = time.monotonic()

        async def sample():
            while time.monotonic() < stop_at + 5:
                p = proc(args.pid)
                for k in peak:
                    peak[k] = max(peak[k], p[k])
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*[one_client(i, args, models, weights, client, t, stop_at) for i in range(args.clients)])
        wall = time.monotonic() - started
        sampler.cancel()
        end_m = await wait_idle(client, args.url)
        # Idle blocking-pool threads (tokio's, for file and adapter work) exit
        # after 10 s; the end figures are taken once they have.
        await asyncio.sleep(args.settle)
        end_m = await wait_idle(client, args.url)
        end_p = proc(args.pid)

    # The server's own time to each 429 (its access log's latency_ms): what the
    # client measures adds its event loop's lag, which on a loaded 2-core
    # machine is most of it.
    server_429_ms = []
    if args.server_log:
        with open(args.server_log, "rb") as f:
            f.seek(log_offset)
            for line in f.read().decode(errors="replace").splitlines():
                if "status=429" in line and "latency_ms=" in line:
                    server_429_ms.append(float(line.split("latency_ms=")[1].split()[0]))
    refusal_p99_s = pct(server_429_ms, 0.99) / 1e3 if server_429_ms else pct(t.refusal_s, 0.99)
    checks = [
        ("no failures (5xx, other statuses, connection errors, streams cut short)", not t.failures),
        ("every admitted request completed or was aborted by its client", t.admitted == t.completed + t.aborted),
        ("some requests admitted, some refused (the queue was saturated)", t.admitted > 0 and t.refused > 0),
        ("every 429 carries Retry-After", t.refused_without_retry_after == 0),
        (f"p99 time to a 429 under {args.max_refusal_s} s ({'server' if server_429_ms else 'client'} side)",
         refusal_p99_s < args.max_refusal_s),
        ("KV blocks back to baseline", end_m.get("tandem_kv_blocks_used", 0) <= base_m.get("tandem_kv_blocks_used", 0)),
        ("adapter slot pins back to 0", end_m.get("tandem_lora_slots_pinned", 0) == 0),
        ("requests running/waiting back to 0",
         end_m.get("vllm:num_requests_running", 0) + end_m.get("vllm:num_requests_waiting", 0) == 0),
        ("open file descriptors not grown (+8 slack)", end_p["fds"] <= base_p["fds"] + 8),
        ("threads not grown", end_p["threads"] <= base_p["threads"]),
        (f"RSS flat after warm-up (+{args.rss_slack_mb} MB slack)", end_p["rss_mb"] <= base_p["rss_mb"] + args.rss_slack_mb),
    ]
    lines = [
        f"# Soak: {args.clients} streaming clients for {args.duration:.0f} s",
        "",
        f"Server {args.url} (pid {args.pid}); models {', '.join(models)} (weights {weights}); "
        f"max_tokens {args.max_tokens}; {args.disconnect:.0%} of admitted requests disconnect after the first token.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| wall time | {wall:.1f} s |",
        f"| admitted (200) | {t.admitted} ({', '.join(f'{m}: {n}' for m, n in sorted(t.by_model.items()))}) |",
        f"| completed / aborted by the client | {t.completed} / {t.aborted} |",
        f"| refused (429) | {t.refused} |",
        f"| time to a 429 in the server (access log), p50 / p99 / max | {pct(server_429_ms, .5):.1f} / "
        f"{pct(server_429_ms, .99):.1f} / {max(server_429_ms, default=float('nan')):.1f} ms |",
        f"| time to a 429 at the client (with its own lag), p50 / p99 / max | {pct(t.refusal_s, .5) * 1e3:.1f} / "
        f"{pct(t.refusal_s, .99) * 1e3:.1f} / {max(t.refusal_s, default=float('nan')) * 1e3:.1f} ms |",
        f"| completed e2e, p50 / p99 | {pct(t.e2e_s, .5):.2f} / {pct(t.e2e_s, .99):.2f} s |",
        f"| tokens generated (completed streams) | {t.tokens} ({t.tokens / wall:.1f} tok/s) |",
        f"| failures | {len(t.failures)} |",
        f"| RSS baseline / peak / end | {base_p['rss_mb']:.0f} / {peak['rss_mb']:.0f} / {end_p['rss_mb']:.0f} MB |",
        f"| open fds baseline / peak / end | {base_p['fds']} / {peak['fds']} / {end_p['fds']} |",
        f"| threads baseline / peak / end | {base_p['threads']} / {peak['threads']} / {end_p['threads']} |",
        f"| KV blocks used baseline / end | {base_m.get('tandem_kv_blocks_used', 0):.0f} / {end_m.get('tandem_kv_blocks_used', 0):.0f} |",
        f"| adapter slots pinned end | {end_m.get('tandem_lora_slots_pinned', 0):.0f} |",
        "",
        "| check | |",
        "|---|---|",
    ] + [f"| {name} | {'ok' if ok else 'FAILED'} |" for name, ok in checks]
    if t.failures:
        lines += ["", "First failures:", ""] + [f"- {f}" for f in t.failures[:10]]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.report:
        with open(args.report, "w") as f:
            f.write(report)
    return 0 if all(ok for _, ok in checks) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--pid", type=int, required=True, help="the server's process id (RSS, fds, threads)")
    p.add_argument("--models", required=True, help="comma-separated: the base and adapters")
    p.add_argument("--weights", default="", help="their popularity (default 1, 1/2, 1/4, ...)")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--duration", type=float, default=300)
    p.add_argument("--warmup", type=float, default=20)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--disconnect", type=float, default=0.1)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--max-refusal-s", type=float, default=1.0)
    p.add_argument("--rss-slack-mb", type=float, default=64)
    p.add_argument("--settle", type=float, default=12, help="idle seconds before baseline and end figures")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--report", default="")
    p.add_argument("--server-log", default="", help="the server's log (access lines give its own time to a 429)")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
