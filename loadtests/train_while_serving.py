#!/usr/bin/env python3
"""Serving with and without a fine-tuning job on the same server (co-serving).

Against a running `tandem serve --data-dir ...`:

  1. training alone: uploads the training file, starts a long job, and measures
     its training tokens/s with no serving load (tandem_train_tokens_total over
     --train-window seconds);
  2. serving with the job running: sse_load.py at each --levels concurrency,
     recording ITL p50/p99 and output tok/s, and the job's training tokens/s
     over the same wall time;
  3. cancels the job, then the same serving levels without training.

Writes a markdown table to stdout and everything to --out (JSON). Only needs
httpx (and the sse_load.py beside this file).

  python3 loadtests/train_while_serving.py --url http://127.0.0.1:8000 \
      --levels 4,16 --data tests/fixtures/train-data/facts.train.jsonl --out tws.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import httpx

HERE = pathlib.Path(__file__).resolve().parent


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == name:
            return float(parts[1])
    raise SystemExit(f"/metrics has no {name}")


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def serve_level(args, c: int, tag: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    n = args.requests_per_level or max(8, 3 * c)
    t0 = time.time()
    tok0 = metric(args.url, "tandem_train_tokens_total")
    cmd = [
        sys.executable, str(HERE / "sse_load.py"), "--url", args.url, "--concurrency", str(c),
        "--requests-per-level", str(n), "--max-tokens", str(args.max_tokens),
        "--prompt-tokens", str(args.prompt_tokens), "--seed", str(hash(tag) % 1000), "--out", out,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    trained = metric(args.url, "tandem_train_tokens_total") - tok0
    data = json.load(open(out))
    level = data["levels"][0]
    itls = [x for r in data["requests"] if r["ok"] for x in r["itls"]]
    return {
        "tag": tag,
        "concurrency": c,
        "ok": level["ok"],
        "requests": level["requests"],
        "output_tok_s": level["output_tok_s"],
        "itl_p50_s": pct(itls, 50),
        "itl_p99_s": pct(itls, 99),
        "ttft_p50_s": level["ttft_p50_s"],
        "train_tok_s": trained / wall,
        "wall_s": wall,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--levels", default="4,16")
    p.add_argument("--data", default=str(HERE.parent / "tests/fixtures/train-data/facts.train.jsonl"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--train-window", type=float, default=90.0, help="seconds of training alone to measure")
    p.add_argument("--requests-per-level", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.url = args.url.rstrip("/")
    levels = [int(x) for x in args.levels.split(",") if x]
    http = httpx.Client(base_url=args.url, timeout=120)
    model = http.get("/v1/models").json()["data"][0]["id"]

    with open(args.data, "rb") as f:
        fid = http.post("/v1/files", files={"file": ("train.jsonl", f)}, data={"purpose": "fine-tune"}).json()["id"]
    job = http.post("/v1/fine_tuning/jobs", json={
        "model": model, "training_file": fid,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": args.batch_size}}},
        "tandem": {"rank": args.rank, "save_every": 100000},
    }).json()
    jid = job["id"]
    while http.get(f"/v1/fine_tuning/jobs/{jid}").json()["tandem"]["step"] < 1:
        time.sleep(0.5)
    tok0, t0 = metric(args.url, "tandem_train_tokens_total"), time.time()
    time.sleep(args.train_window)
    solo = (metric(args.url, "tandem_train_tokens_total") - tok0) / (time.time() - t0)
    print(f"# training alone: {solo:.1f} tok/s", file=sys.stderr)

    rows = []
    for c in levels:
        rows.append(serve_level(args, c, "with training"))
        print(f"# {rows[-1]}", file=sys.stderr)
    http.post(f"/v1/fine_tuning/jobs/{jid}/cancel")
    time.sleep(2)
    for c in levels:
        rows.append(serve_level(args, c, "serving only"))
        print(f"# {rows[-1]}", file=sys.stderr)

    base = {r["concurrency"]: r for r in rows if r["tag"] == "serving only"}
    print(f"training alone: {solo:.1f} tok/s\n")
    print("| streams | training job | ok | out tok/s | ITL p50 ms | ITL p99 ms | TTFT p50 s | ITL p50 vs no job | training tok/s | vs training alone |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        b = base[r["concurrency"]]
        ratio = r["itl_p50_s"] / b["itl_p50_s"] if r["itl_p50_s"] and b["itl_p50_s"] else float("nan")
        print(
            f"| {r['concurrency']} | {'yes' if r['tag'] == 'with training' else 'no'} | {r['ok']}/{r['requests']} | "
            f"{r['output_tok_s']:.1f} | {1000 * r['itl_p50_s']:.0f} | {1000 * r['itl_p99_s']:.0f} | {r['ttft_p50_s']:.2f} | "
            f"{ratio:.2f}x | {r['train_tok_s']:.1f} | {r['train_tok_s'] / solo:.0%} |"
        )
    if args.out:
        json.dump({"solo_train_tok_s": solo, "rows": rows}, open(args.out, "w"), indent=1)
    return 0 if all(r["ok"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
