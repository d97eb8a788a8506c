#!/usr/bin/env python3
"""Prometheus scrapes tandem: the counts PromQL returns are the ones we made.

Starts `tandem serve` on the tiny Qwen2 fixture with a 70/30 route between the
base model and an adapter, sends 40 requests from distinct users (counting the
target each response names in `x-tandem-route-target`), starts Prometheus
scraping /metrics every second, and polls
`sum by (target) (tandem_route_requests_total{alias="chat"})` until it equals
those counts (or fails after 60 s). Standard library only.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TANDEM = os.environ.get("TANDEM_BIN", os.path.join(REPO, "target/release/tandem"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.headers.get("x-tandem-route-target"), json.load(r)


def main():
    tmp = tempfile.mkdtemp(prefix="tandem-prom-")
    lora = os.path.join(REPO, "tests/fixtures/tiny/lora/a-r4-qv")
    cfg = os.path.join(tmp, "tandem.toml")
    with open(cfg, "w") as f:
        f.write(f'[lora.adapters]\na = "{lora}"\n'
                '[routes.chat]\ntargets = [{model = "hf-f32", weight = 70}, {model = "a", weight = 30}]\n')
    server = subprocess.Popen(
        [TANDEM, "--threads", "2", "--config", cfg, "serve", "--port", "0",
         "--model", os.path.join(REPO, "tests/fixtures/tiny/qwen2/hf-f32")],
        stderr=subprocess.PIPE, text=True)
    prom = None
    try:
        base = None
        for line in server.stderr:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                base = m.group(1)
                break
        assert base, "tandem did not report its address"
        # Keep draining its log so the pipe never fills.
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        for _ in range(200):
            try:
                if urllib.request.urlopen(base + "/health", timeout=5).status == 200:
                    break
            except Exception:
                time.sleep(0.1)
        counts = {}
        for u in range(40):
            target, body = post(base + "/v1/completions",
                                {"model": "chat", "user": f"user-{u}", "prompt": [5, 6], "max_tokens": 1})
            assert body["model"] == target, (body["model"], target)
            counts[target] = counts.get(target, 0) + 1
        print(f"made: {counts}")

        port = free_port()
        host = urllib.parse.urlparse(base).netloc
        pcfg = os.path.join(tmp, "prometheus.yml")
        with open(pcfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\nscrape_configs:\n"
                    f"  - job_name: tandem\n    static_configs:\n      - targets: ['{host}']\n")
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={pcfg}", f"--storage.tsdb.path={tmp}/tsdb",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "prometheus.log"), "w"))
        query = 'sum by (target) (tandem_route_requests_total{alias="chat"})'
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        got = None
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    res = json.load(r)["data"]["result"]
                got = {s["metric"]["target"]: int(float(s["value"][1])) for s in res}
                if got == counts:
                    break
            except Exception:
                pass
            time.sleep(1)
        print(f"PromQL {query}: {got}")
        if got != counts:
            print(open(os.path.join(tmp, "prometheus.log")).read()[-3000:], file=sys.stderr)
            sys.exit(f"Prometheus saw {got}, the test made {counts}")
        # The scrape itself was healthy.
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": 'up{job="tandem"}'})
        with urllib.request.urlopen(url, timeout=5) as r:
            up = json.load(r)["data"]["result"]
        assert up and up[0]["value"][1] == "1", up
        print("prometheus: ok")
    finally:
        for p in (prom, server):
            if p is not None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    main()
