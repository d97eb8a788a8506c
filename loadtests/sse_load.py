#!/usr/bin/env python3
"""Closed-loop streaming load test for any OpenAI-compatible server.

For each concurrency level C, N requests are sent with at most C in flight at a
time (a new request starts as soon as one finishes). Every request streams
(SSE) and we time, per request:

  TTFT  time from sending the request to the first chunk carrying generated text
  ITL   gaps between successive text-carrying chunks (one sample per gap)
  e2e   time from sending the request to the end of the stream

and per level: output tok/s = all generated tokens / wall time of the level (first
send to last stream end), p50/p90 TTFT, p50/p90 ITL, p50 e2e.

Generated tokens come from the final `usage` chunk (we send
`stream_options: {"include_usage": true}`) when the server reports it, else from
the number of text-carrying chunks.

Prompts are made of random common English words, distinct per request from the
very first word (so no two requests share a cached prefix), and sized to
`--prompt-tokens` by calibration: one non-streamed request with max_tokens=1
reports `usage.prompt_tokens`, the word count is scaled and re-checked. With
`--shared-prefix-tokens K` the same K-token text (a system message for chat)
comes first in every prompt, to show what a prefix cache saves.

Only OpenAI fields are sent, plus `ignore_eos` (vLLM / llama-server / tandem
accept it) so every request generates exactly `--max-tokens` tokens.

Only needs httpx:  python loadtests/sse_load.py --url http://127.0.0.1:8080 \
    --concurrency 1,4,16,32 --requests-per-level 32 --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

WORDS = (
    "time year people way day man thing woman life child world school state family "
    "student group country problem hand part place case week company system program "
    "question work government number night point home water room mother area money "
    "story fact month lot right study book eye job word business issue side kind head "
    "house service friend father power hour game line end member law car city "
    "community name president team minute idea kid body information back parent face "
    "others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education river stone "
    "garden window table paper music market letter field road light green blue small "
    "large early young important public bad same able simple quick happy open short "
    "long strong clear free full special easy hard late real best better true whole "
    "north south east west summer winter spring autumn bread apple orange cloud "
    "mountain forest island ocean bridge engine rocket planet signal pattern"
).split()


def make_text(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@dataclass
class Result:
    level: int
    index: int
    ok: bool
    error: str | None = None
    status: int | None = None
    start: float = 0.0  # seconds since the level started
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    chunks: int = 0  # text-carrying chunks
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def tokens(self) -> int:
        if self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return self.chunks


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = args.url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.chat = args.endpoint == "chat"
        self.path = "/chat/completions" if self.chat else "/completions"
        # Several comma-separated names: request i uses models[i % len] (a
        # multi-adapter mix); calibration uses the first.
        self.models: list[str] = [m for m in (args.model or "").split(",") if m]
        self.model: str | None = self.models[0] if self.models else None
        self.words_per_prompt = args.prompt_tokens  # refined by calibration
        self.prefix_text = ""
        self.usage_seen = False
        headers = {"Authorization": f"Bearer {args.api_key}"}
        self.client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(args.timeout, connect=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    # ---- request bodies -------------------------------------------------
    def body(self, prompt: str, max_tokens: int, stream: bool) -> dict:
        b: dict = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": self.args.temperature,
            "stream": stream,
        }
        if self.args.ignore_eos:
            b["ignore_eos"] = True
        if stream:
            b["stream_options"] = {"include_usage": True}
        if self.chat:
            msgs = []
            if self.prefix_text:
                msgs.append({"role": "system", "content": self.prefix_text})
            msgs.append({"role": "user", "content": prompt})
            b["messages"] = msgs
        else:
            b["prompt"] = (self.prefix_text + "\n\n" + prompt) if self.prefix_text else prompt
        return b

    def unique_prompt(self, tag: str, n_words: int, seed: int) -> str:
        rng = random.Random(seed)
        # The tag comes first so prompts differ from their first token.
        return f"{tag}: " + make_text(n_words, rng)

    # ---- setup -----------------------------------------------------------
    async def resolve_model(self) -> None:
        if self.model:
            return
        r = await self.client.get(self.base + "/models")
        r.raise_for_status()
        self.model = r.json()["data"][0]["id"]

    async def count_prompt_tokens(self, prompt: str, with_prefix: bool) -> int:
        saved = self.prefix_text
        if not with_prefix:
            self.prefix_text = ""
        try:
            body = self.body(prompt, 1, stream=False)
        finally:
            self.prefix_text = saved
        r = await self.client.post(self.base + self.path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"calibration request failed: {r.status_code} {r.text[:500]}")
        return int(r.json()["usage"]["prompt_tokens"])

    async def calibrate_words(self, target: int, seed: int, tag: str) -> int:
        """Word count whose prompt tokenizes to about `target` tokens (no prefix).

        Uses prompts from seeds no real request uses, so the real requests find
        nothing of theirs in a prefix cache."""
        words = max(1, target)
        base = await self.count_prompt_tokens(self.unique_prompt(tag, 1, seed), False)
        for i in range(3):
            got = await self.count_prompt_tokens(self.unique_prompt(tag, words, seed + 1 + i), False)
            per_word = max(1e-3, (got - base) / max(1, words - 1))
            want = max(1, round((target - base) / per_word) + 1)
            if abs(got - target) <= max(2, target // 50):
                break
            words = want
        return words

    async def setup(self) -> None:
        await self.resolve_model()
        a = self.args
        if a.shared_prefix_tokens > 0:
            # Calibrate on other seeds, then build the real prefix from its own seed:
            # nothing the server saw during calibration shares a prefix with it.
            pw = await self.calibrate_words(a.shared_prefix_tokens, 900_000, "Request 0-0-900000")
            self.prefix_text = "Shared context: " + make_text(pw, random.Random(424242))
        # The tag has the shape of the real requests' tags (so the same token count).
        self.words_per_prompt = await self.calibrate_words(a.prompt_tokens, 800_000, "Request 0-0-800000")

    # ---- one streamed request --------------------------------------------
    async def one(self, level: int, index: int, t_level: float, seed: int) -> Result:
        res = Result(level=level, index=index, ok=False)
        prompt = self.unique_prompt(f"Request {level}-{index}-{seed}", self.words_per_prompt, seed)
        body = self.body(prompt, self.args.max_tokens, stream=True)
        if len(self.models) > 1:
            body["model"] = self.models[index % len(self.models)]
        t0 = time.perf_counter()
        res.start = t0 - t_level
        last = None
        try:
            async with self.client.stream("POST", self.base + self.path, json=body) as r:
                res.status = r.status_code
                if r.status_code != 200:
                    res.error = (await r.aread()).decode(errors="replace")[:500]
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    ev = json.loads(data)
                    if "error" in ev:
                        res.error = json.dumps(ev["error"])[:500]
                        return res
                    if ev.get("usage"):
                        u = ev["usage"]
                        if u.get("completion_tokens") is not None:
                            res.usage_completion_tokens = u["completion_tokens"]
                            res.usage_prompt_tokens = u.get("prompt_tokens")
                            details = u.get("prompt_tokens_details") or {}
                            res.cached_tokens = details.get("cached_tokens")
                    has_text = False
                    for ch in ev.get("choices") or []:
                        if self.chat:
                            txt = (ch.get("delta") or {}).get("content")
                        else:
                            txt = ch.get("text")
                        if txt:
                            has_text = True
                        if ch.get("finish_reason"):
                            res.finish_reason = ch["finish_reason"]
                    if has_text:
                        res.chunks += 1
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.itls.append(now - last)
                        last = now
            res.e2e = time.perf_counter() - t0
            res.ok = res.ttft is not None
            if not res.ok:
                res.error = "stream ended without any generated text"
        except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
            res.error = f"{type(e).__name__}: {e}"
        return res

    async def level(self, c: int, n: int, seed_base: int) -> tuple[list[Result], float]:
        sem = asyncio.Semaphore(c)
        t_level = time.perf_counter()

        async def run(i: int) -> Result:
            async with sem:
                return await self.one(c, i, t_level, seed_base + i)

        results = await asyncio.gather(*(run(i) for i in range(n)))
        return list(results), time.perf_counter() - t_level


def summarize(c: int, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [x for r in ok for x in r.itls]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    toks = sum(r.tokens for r in ok)
    by_start = sorted(ok, key=lambda r: r.index)
    rest = [r.ttft for r in by_start[1:]]
    return {
        "concurrency": c,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "output_tokens": toks,
        "tokens_from_usage": all(r.usage_completion_tokens is not None for r in ok) if ok else False,
        "prompt_tokens_mean": statistics.mean([r.usage_prompt_tokens for r in ok if r.usage_prompt_tokens is not None] or [0]) or None,
        "output_tok_s": toks / wall if wall > 0 else None,
        "ttft_p50_s": pct(ttfts, 50),
        "ttft_p90_s": pct(ttfts, 90),
        "itl_p50_s": pct(itls, 50),
        "itl_p90_s": pct(itls, 90),
        "e2e_p50_s": pct(e2es, 50),
        "ttft_first_s": by_start[0].ttft if by_start else None,
        "ttft_rest_p50_s": pct(rest, 50),
        "finish_reasons": sorted({str(r.finish_reason) for r in ok}),
        "cached_tokens": [r.cached_tokens for r in by_start] if any(r.cached_tokens is not None for r in ok) else None,
        "first_error": next((f"{r.status}: {r.error}" for r in results if not r.ok), None),
    }


def fmt(x: float | None, scale: float = 1.0, nd: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{nd}f}"


def table(summaries: list[dict], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| concurrency | requests | errors | prompt tok | out tok | wall s | out tok/s | TTFT p50 s | TTFT p90 s | ITL p50 ms | ITL p90 ms | e2e p50 s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        lines.append(
            f"| {s['concurrency']} | {s['requests']} | {s['errors']} | {fmt(s['prompt_tokens_mean'], nd=0)} | "
            f"{s['output_tokens']} | {fmt(s['wall_s'], nd=1)} | {fmt(s['output_tok_s'], nd=1)} | "
            f"{fmt(s['ttft_p50_s'])} | {fmt(s['ttft_p90_s'])} | {fmt(s['itl_p50_s'], 1000, 1)} | "
            f"{fmt(s['itl_p90_s'], 1000, 1)} | {fmt(s['e2e_p50_s'])} |"
        )
    return "\n".join(lines)


def sequential_table(results: list[Result]) -> str:
    lines = [
        "| request | TTFT s | prompt tok | cached tok (if reported) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(results, key=lambda r: r.index):
        lines.append(
            f"| {r.index} | {fmt(r.ttft, nd=3)} | {r.usage_prompt_tokens if r.usage_prompt_tokens is not None else '-'} | "
            f"{r.cached_tokens if r.cached_tokens is not None else '-'} |"
        )
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> int:
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    b = Bench(args)
    try:
        await b.setup()
        print(
            f"# model={b.model} endpoint={b.path} prompt≈{args.prompt_tokens} tok "
            f"({b.words_per_prompt} words) shared_prefix={args.shared_prefix_tokens} "
            f"max_tokens={args.max_tokens} ignore_eos={args.ignore_eos}",
            file=sys.stderr,
        )
        summaries, all_results = [], []
        for li, c in enumerate(levels):
            n = args.requests_per_level or max(4, 2 * c)
            print(f"# level concurrency={c} requests={n} ...", file=sys.stderr, flush=True)
            results, wall = await b.level(c, n, seed_base=1000 * (li + 1) + args.seed * 1_000_000)
            s = summarize(c, results, wall)
            summaries.append(s)
            all_results.extend(results)
            print(
                f"#   {s['ok']}/{s['requests']} ok, {fmt(s['output_tok_s'], nd=1)} out tok/s, "
                f"TTFT p50 {fmt(s['ttft_p50_s'])} s" + (f", first error: {s['first_error']}" if s["errors"] else ""),
                file=sys.stderr,
                flush=True,
            )
    finally:
        await b.client.aclose()

    print(table(summaries, args.title or f"{b.base} ({','.join(b.models) or b.model})"))
    if args.shared_prefix_tokens > 0:
        for c in levels:
            print(f"\nSequential TTFTs at concurrency {c} (shared prefix {args.shared_prefix_tokens} tokens):\n")
            print(sequential_table([r for r in all_results if r.level == c]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "config": {k: v for k, v in vars(args).items() if k != "api_key"} | {"model": b.model, "words_per_prompt": b.words_per_prompt},
                    "levels": summaries,
                    "requests": [asdict(r) for r in all_results],
                },
                f,
                indent=1,
            )
    errors = sum(s["errors"] for s in summaries)
    return 1 if errors else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (with or without /v1)")
    p.add_argument(
        "--model",
        default=None,
        help="model name, or several comma-separated (request i uses the i-th mod n: a LoRA adapter mix); "
        "default: first of GET /v1/models",
    )
    p.add_argument("--api-key", default="unused")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated levels")
    p.add_argument("--requests-per-level", type=int, default=0, help="requests per level (default: max(4, 2*concurrency))")
    p.add_argument("--prompt-tokens", type=int, default=234)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--shared-prefix-tokens", type=int, default=0, help="prepend the same K-token text to every prompt")
    p.add_argument("--seed", type=int, default=0, help="varies the prompts between runs")
    p.add_argument("--timeout", type=float, default=1800.0, help="per-request read timeout, s")
    p.add_argument("--title", default=None)
    p.add_argument("--out", default=None, help="write summaries and per-request data as JSON")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(amain(parse_args())))
