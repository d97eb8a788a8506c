#!/usr/bin/env bash
# Runs a load-test scenario (loadtests/scenarios.py) against a server it starts
# on the default model with 8 random rank-8 adapters (a0..a7) in 4 slots and a
# data directory, then stops it. Report and plots: target/loadtests/SCENARIO/.
#   loadtests/scenarios.sh mixed     [--clients 16 --duration 120 --zipf 1.0]
#   loadtests/scenarios.sh canary    [--clients 16 --phase-s 40]
#   loadtests/scenarios.sh training  [--clients 4 --phase-s 60]
#   loadtests/scenarios.sh all
# URL=http://host:port runs against a server already running instead (it must
# serve a0..a7 for mixed and canary, and have a data directory for training).
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIO=${1:?usage: loadtests/scenarios.sh mixed|canary|training|all [scenario options]}
shift
MODEL=${MODEL:-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}
OUT=target/loadtests
VENV=${TANDEM_PY_VENV:-target/py-venv}
PY=$VENV/bin/python
mkdir -p "$OUT"
[[ -x $PY ]] || python3 -m venv "$VENV"
"$PY" -m pip install --quiet --disable-pip-version-check -r loadtests/requirements.txt \
    -r loadtests/requirements-lora.txt -r loadtests/requirements-report.txt
if [[ -z ${URL:-} ]]; then
    adapters=""
    for i in 0 1 2 3 4 5 6 7; do
        [[ -f $OUT/adapters/a$i/peft/adapter_model.safetensors ]] ||
            "$PY" loadtests/make_random_lora.py "$MODEL" "$OUT/adapters/a$i" --rank 8 --seed "$((100 + i))" >/dev/null
        adapters+="a$i = \"$OUT/adapters/a$i/peft\""$'\n'
    done
    rm -rf "$OUT/data"
    cat > "$OUT/cfg.toml" <<TOML
[lora]
max_loras = 4
[lora.adapters]
$adapters
[store]
data_dir = "$OUT/data"
TOML
    target/release/tandem --config "$OUT/cfg.toml" serve --model "$MODEL" --port 0 2>"$OUT/server.log" &
    SERVER=$!
    trap 'kill $SERVER 2>/dev/null || true' EXIT
    for _ in $(seq 300); do grep -q "listening on" "$OUT/server.log" && break; sleep 0.2; done
    URL=$(grep -o "http://[0-9.:]*" "$OUT/server.log" | head -1)
    [[ -n $URL ]] || { tail -30 "$OUT/server.log"; exit 1; }
    until curl -sf "$URL/health" >/dev/null; do sleep 0.5; done
fi
scenarios=("$SCENARIO")
[[ $SCENARIO == all ]] && scenarios=(mixed canary training)
for s in "${scenarios[@]}"; do
    "$PY" loadtests/scenarios.py "$s" --url "$URL" --from-script "$@" >/dev/null
    echo "$s: $OUT/$s/report.md"
done
