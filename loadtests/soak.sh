#!/usr/bin/env bash
# Soak and overload: loadtests/soak.py against a server it starts on the default
# model with two random rank-8 adapters and a bounded queue (max_waiting 64),
# then SIGTERM (exit 0 within 30 s). Report: target/soak/report.md.
#   loadtests/soak.sh            1,000 clients for 300 s (docs/reliability.md)
#   loadtests/soak.sh --short    200 clients for 40 s (CI)
#   CLIENTS=N DURATION=S loadtests/soak.sh   other sizes
# Needs target/release/tandem and the default model (scripts/get-default-model.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}
CLIENTS=${CLIENTS:-1000} DURATION=${DURATION:-300}
if [[ ${1:-} == --short ]]; then CLIENTS=200 DURATION=40; fi
OUT=target/soak
VENV=${TANDEM_PY_VENV:-target/py-venv}
PY=$VENV/bin/python
mkdir -p "$OUT"
[[ -x $PY ]] || python3 -m venv "$VENV"
"$PY" -m pip install --quiet --disable-pip-version-check -r loadtests/requirements.txt -r loadtests/requirements-lora.txt
for i in 1 2; do
    [[ -f $OUT/lora$i/peft/adapter_model.safetensors ]] ||
        "$PY" loadtests/make_random_lora.py "$MODEL" "$OUT/lora$i" --rank 8 --seed "$i" >/dev/null
done
cat > "$OUT/cfg.toml" <<TOML
[scheduler]
max_waiting = 64
[lora]
max_loras = 2
[lora.adapters]
a = "$OUT/lora1/peft"
b = "$OUT/lora2/peft"
TOML
# 1,000 client sockets on each side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
(( $(ulimit -n) >= 2 * CLIENTS + 256 )) || echo "warning: only $(ulimit -n) open files allowed" >&2
target/release/tandem --config "$OUT/cfg.toml" serve --model "$MODEL" --port 0 2>"$OUT/server.log" &
SERVER=$!
trap 'kill -9 $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do grep -q "listening on" "$OUT/server.log" && break; sleep 0.2; done
URL=$(grep -o "http://[0-9.:]*" "$OUT/server.log" | head -1)
[[ -n $URL ]] || { tail -50 "$OUT/server.log"; echo "FAILED: the server did not start" >&2; exit 1; }
until curl -sf "$URL/health" >/dev/null; do sleep 0.5; done
BASE_ID=$(curl -s "$URL/v1/models" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
rc=0
"$PY" loadtests/soak.py --url "$URL" --pid "$SERVER" --models "$BASE_ID,a,b" \
    --clients "$CLIENTS" --duration "$DURATION" --report "$OUT/report.md" --server-log "$OUT/server.log" || rc=1
kill -TERM "$SERVER"
t0=$SECONDS
while kill -0 "$SERVER" 2>/dev/null && ((SECONDS - t0 < 30)); do sleep 0.2; done
if kill -0 "$SERVER" 2>/dev/null; then
    echo "FAILED: no exit within 30 s of SIGTERM" >&2; rc=1
else
    wait "$SERVER" || { echo "FAILED: exit status $? after SIGTERM (want 0)" >&2; rc=1; }
fi
trap - EXIT
((rc == 0)) && echo "soak: passed (report: $OUT/report.md)" || { tail -30 "$OUT/server.log" >&2; echo "soak: FAILED" >&2; }
exit $rc
