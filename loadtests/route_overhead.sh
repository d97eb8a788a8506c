#!/usr/bin/env bash
# What routing costs: p50 TTFT of a routed alias against its target named
# directly (same server, same run, alternated), and output tok/s of an alias with
# a 10% shadow against the same alias without one. Prints sse_load.py's tables.
#   loadtests/route_overhead.sh [MODEL.gguf]   (default: the default model)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}
BASE=$(basename "$MODEL" .gguf)
PY=${TANDEM_PY_VENV:-target/py-venv}/bin/python
tmp=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$tmp"' EXIT
cat > "$tmp/cfg.toml" <<TOML
[routes.routed]
targets = [{ model = "$BASE", weight = 1 }]
[routes.shadowed]
targets = [{ model = "$BASE", weight = 1 }]
shadow = { model = "$BASE", fraction = 0.1 }
TOML
target/release/tandem --config "$tmp/cfg.toml" serve --model "$MODEL" --port 0 2> "$tmp/log" &
SERVER=$!
for _ in $(seq 100); do grep -q "listening on" "$tmp/log" && break; sleep 0.2; done
URL=$(grep -o "http://[0-9.:]*" "$tmp/log" | head -1)
until curl -sf "$URL/health" >/dev/null; do sleep 0.5; done
# Every run gets its own seed: no prompt is ever in the prefix cache.
seed=0
run() { seed=$((seed + 1)); "$PY" loadtests/sse_load.py --url "$URL" --seed "$seed" "$@" 2>/dev/null; }
for rep in 1 2 3; do
  for m in "$BASE" routed; do
    echo "== TTFT rep $rep: model $m"
    run --model "$m" --concurrency 1 --requests-per-level 16 --prompt-tokens 64 --max-tokens 8
  done
done
# Shadows run only while nothing waits (dropped first under load), so their
# cost shows at concurrency 1; at 4 most are dropped.
for c in 1 4; do
  for rep in 1 2; do
    for m in routed shadowed; do
      echo "== throughput c=$c rep $rep: model $m"
      run --model "$m" --concurrency $c --requests-per-level 20 --prompt-tokens 64 --max-tokens 32
    done
  done
done
curl -s "$URL/metrics" | grep "^tandem_route_shadow_requests_total"
