#!/usr/bin/env bash
# tandem vs llama.cpp's llama-server, same model, same load, one server at a time.
#
#   loadtests/run-vs-llama-server.sh [throughput|prefix|both|guidellm]     (default: throughput)
#
# throughput: sse_load.py at each concurrency level (distinct ~234-token prompts,
#             128 tokens out with ignore_eos) against llama-server, then against tandem.
# prefix:     a 1,000-token shared system prompt, concurrency 1, sequential requests:
#             TTFT of the first request (cold) vs the later ones (prefix cached).
# guidellm:   guidellm (PyPI, unmodified) against each server: synthetic prompts
#             of PROMPT_TOKENS tokens, GUIDELLM_OUTPUT tokens out, GUIDELLM_STREAMS
#             concurrent streams for GUIDELLM_SECONDS each; guidellm_report.py
#             writes report.md and guidellm.png to $OUT_DIR (it installs guidellm
#             into GUIDELLM_VENV, default target/guidellm-venv: torch comes with it,
#             about 3 GB, and makes an HF tokenizer of the GGUF's with transformers).
# Each server runs alone on the machine: started, measured, stopped, then the next.
# Prints both tables and tandem/llama-server ratios; JSON and logs go to $OUT_DIR.
#
# Environment (all optional):
#   LEVELS            concurrency levels (default 1,4,16,32)
#   REQUESTS          requests per level (default: sse_load.py's max(4, 2*concurrency))
#   PROMPT_TOKENS     (234)   MAX_TOKENS (128)   ENDPOINT completions|chat (completions)
#   PREFIX_TOKENS     shared prefix for the prefix mode (1000)
#   PREFIX_REQUESTS   sequential requests in the prefix mode (6)
#   MODEL             (models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)
#   LLAMA_SERVER      llama-server binary (default: on PATH, else ../shared/PEERS.md's build under /work/llama)
#   LLAMA_THREADS     llama-server -t (default: nproc)    LLAMA_SLOTS  -np (16)
#   CTX_PER_SLOT      llama-server context per slot (default 400 for throughput, 1600 for prefix)
#   TANDEM_BIN        (target/release/tandem)   TANDEM_ARGS  extra `tandem serve` flags
#   LLAMA_ARGS        extra llama-server flags (e.g. --lora FILE.gguf)
#   TANDEM_LOAD_MODEL the `model` the load sends to tandem (e.g. a LoRA adapter's name)
#   SERVERS           which to run, in order (default "llama tandem")
#   PORT              (default: a free one)     OUT_DIR (target/loadtests/<date>)
#   TANDEM_PY_VENV    venv with httpx (default target/py-venv; created if missing)
#
# LoRA, the same random rank-16 adapter on both servers (make_random_lora.py
# writes it as PEFT for tandem and as GGUF for llama.cpp; it needs numpy,
# safetensors and gguf):
#   python3 loadtests/make_random_lora.py $MODEL /tmp/lora --rank 16
#   LLAMA_ARGS="--lora /tmp/lora/lora.gguf" TANDEM_ARGS="--lora rnd=/tmp/lora/peft" \
#     TANDEM_LOAD_MODEL=rnd LEVELS=16 loadtests/run-vs-llama-server.sh throughput
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MODE=${1:-throughput}
case $MODE in throughput | prefix | both | guidellm) ;; *) echo "usage: $0 [throughput|prefix|both|guidellm]" >&2; exit 2 ;; esac

LEVELS=${LEVELS:-1,4,16,32}
REQUESTS=${REQUESTS:-}
PROMPT_TOKENS=${PROMPT_TOKENS:-234}
MAX_TOKENS=${MAX_TOKENS:-128}
ENDPOINT=${ENDPOINT:-completions}
PREFIX_TOKENS=${PREFIX_TOKENS:-1000}
PREFIX_REQUESTS=${PREFIX_REQUESTS:-6}
MODEL=${MODEL:-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}
LLAMA_SERVER=${LLAMA_SERVER:-$(command -v llama-server || echo /work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server)}
LLAMA_THREADS=${LLAMA_THREADS:-$(nproc)}
LLAMA_SLOTS=${LLAMA_SLOTS:-16}
TANDEM_BIN=${TANDEM_BIN:-target/release/tandem}
TANDEM_ARGS=${TANDEM_ARGS:-}
LLAMA_ARGS=${LLAMA_ARGS:-}
TANDEM_LOAD_MODEL=${TANDEM_LOAD_MODEL:-}
SERVERS=${SERVERS:-llama tandem}
OUT_DIR=${OUT_DIR:-target/loadtests/$(date +%Y%m%d-%H%M%S)}
VENV=${TANDEM_PY_VENV:-target/py-venv}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

if [[ ! -x $VENV/bin/python ]]; then python3 -m venv "$VENV" || exit 1; fi
PY=$VENV/bin/python
"$PY" -c 'import httpx' 2>/dev/null || "$PY" -m pip install --quiet --disable-pip-version-check -r loadtests/requirements.txt || exit 1
PORT=${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
BASE=http://127.0.0.1:$PORT

SERVER_PID=
stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 150); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=
}
trap stop_server EXIT

wait_health() { # log
    "$PY" - "$BASE/health" "$SERVER_PID" <<'PYEOF' || { tail -n 50 "$1" >&2; return 1; }
import os, sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 300
while time.time() < deadline:
    try:
        if urllib.request.urlopen(url, timeout=5).status == 200:
            sys.exit(0)
    except Exception:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        print(f"server exited before {url} answered 200", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.5)
print(f"{url}: no 200 within 300 s", file=sys.stderr)
sys.exit(1)
PYEOF
}

start_server() { # name mode
    local name=$1 mode=$2 log=$OUT_DIR/$1-$2.log ctx
    if [[ $mode == prefix ]]; then ctx=$((LLAMA_SLOTS * ${CTX_PER_SLOT:-1600})); else ctx=$((LLAMA_SLOTS * ${CTX_PER_SLOT:-400})); fi
    case $name in
    llama)
        [[ -x $LLAMA_SERVER ]] || { echo "no llama-server at $LLAMA_SERVER" >&2; return 1; }
        echo "# llama-server -t $LLAMA_THREADS -np $LLAMA_SLOTS -c $ctx $LLAMA_ARGS (log $log)" >&2
        # shellcheck disable=SC2086
        LD_LIBRARY_PATH=$(dirname "$LLAMA_SERVER")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
            "$LLAMA_SERVER" -m "$MODEL" -t "$LLAMA_THREADS" -np "$LLAMA_SLOTS" -c "$ctx" \
            --host 127.0.0.1 --port "$PORT" --no-webui $LLAMA_ARGS >"$log" 2>&1 &
        ;;
    tandem)
        "$TANDEM_BIN" serve --help >/dev/null 2>&1 || { echo "$TANDEM_BIN has no working 'serve'" >&2; return 1; }
        echo "# tandem serve $TANDEM_ARGS (log $log)" >&2
        # shellcheck disable=SC2086
        "$TANDEM_BIN" serve --model "$MODEL" --port "$PORT" $TANDEM_ARGS >"$log" 2>&1 &
        ;;
    esac
    SERVER_PID=$!
    wait_health "$log"
}

GUIDELLM_STREAMS=${GUIDELLM_STREAMS:-1,4,16}
GUIDELLM_SECONDS=${GUIDELLM_SECONDS:-40}
GUIDELLM_OUTPUT=${GUIDELLM_OUTPUT:-64}
GUIDELLM_VENV=${GUIDELLM_VENV:-target/guidellm-venv}
TOKENIZER_DIR=target/qwen-tokenizer
if [[ $MODE == guidellm ]]; then
    [[ -x $GUIDELLM_VENV/bin/guidellm ]] || {
        python3 -m venv "$GUIDELLM_VENV" &&
            "$GUIDELLM_VENV/bin/pip" install --quiet guidellm==0.8.1 gguf==0.19.0 matplotlib==3.11.2
    } || exit 1
    # guidellm sizes its synthetic prompts with the model's tokenizer: the GGUF's, as an HF directory.
    [[ -f $TOKENIZER_DIR/tokenizer.json ]] || "$GUIDELLM_VENV/bin/python" -c "
import sys; from transformers import AutoTokenizer
AutoTokenizer.from_pretrained('$(dirname "$MODEL")', gguf_file='$(basename "$MODEL")').save_pretrained('$TOKENIZER_DIR')" || exit 1
fi

run_guidellm() { # name
    local name=$1 scenario=$OUT_DIR/guidellm-scenario-$1.json
    "$PY" - "$scenario" "$BASE" "$GUIDELLM_STREAMS" "$PROMPT_TOKENS" "$GUIDELLM_OUTPUT" "$GUIDELLM_SECONDS" \
        "$ROOT/$TOKENIZER_DIR" <<'PYEOF'
import json, sys
path, base, streams, prompt, output, seconds, tok = sys.argv[1:]
json.dump({"metadata": {"name": "tandem-vs-llama-server", "description": "loadtests/run-vs-llama-server.sh guidellm"},
           "spec": {"backend": {"kind": "openai_http", "target": base, "request_format": "/v1/completions"},
                    "profile": {"kind": "concurrent"},
                    "tokenizer": {"kind": "huggingface_auto", "model": tok},
                    "data": [{"kind": "synthetic_text", "prompt_tokens": int(prompt), "output_tokens": int(output)}],
                    "constraints": [{"kind": "max_duration", "seconds": float(seconds)}]},
           "benchmarks": [{"profile.streams": int(s)} for s in streams.split(",")]}, open(path, "w"), indent=1)
PYEOF
    HF_HUB_OFFLINE=1 "$GUIDELLM_VENV/bin/guidellm" run --scenario "$scenario" --disable-console-interactive \
        --output "kind=json,path=$OUT_DIR/guidellm-$name.json" >"$OUT_DIR/guidellm-$name.txt" 2>&1 ||
        { tail -30 "$OUT_DIR/guidellm-$name.txt" >&2; return 1; }
    tail -40 "$OUT_DIR/guidellm-$name.txt"
}

run_load() { # name mode
    local name=$1 mode=$2 out=$OUT_DIR/$1-$2.json args
    if [[ $mode == guidellm ]]; then run_guidellm "$name"; return; fi
    if [[ $mode == prefix ]]; then
        args=(--concurrency 1 --requests-per-level "$PREFIX_REQUESTS" --shared-prefix-tokens "$PREFIX_TOKENS" --max-tokens 16)
    else
        args=(--concurrency "$LEVELS" --max-tokens "$MAX_TOKENS")
        [[ -n $REQUESTS ]] && args+=(--requests-per-level "$REQUESTS")
    fi
    [[ $name == tandem && -n $TANDEM_LOAD_MODEL ]] && args+=(--model "$TANDEM_LOAD_MODEL")
    "$PY" loadtests/sse_load.py --url "$BASE" --endpoint "$ENDPOINT" --prompt-tokens "$PROMPT_TOKENS" \
        --title "$name ($mode)" --out "$out" "${args[@]}" | tee "$OUT_DIR/$name-$mode.md"
}

modes=$MODE
[[ $MODE == both ]] && modes="throughput prefix"
echo "# $(nproc) cores, load average now: $(cut -d' ' -f1-3 /proc/loadavg) (should be ~0: nothing else may run)" >&2
status=0
for mode in $modes; do
    for name in $SERVERS; do
        echo >&2
        echo "## $name, $mode" >&2
        if start_server "$name" "$mode"; then
            run_load "$name" "$mode" || status=1
        else
            echo "# $name failed to start; skipped" >&2
            status=1
        fi
        stop_server
        echo
    done
    if [[ $mode == guidellm && -f $OUT_DIR/guidellm-llama.json && -f $OUT_DIR/guidellm-tandem.json ]]; then
        "$GUIDELLM_VENV/bin/python" loadtests/guidellm_report.py "$OUT_DIR" --command "$0 guidellm" | tee "$OUT_DIR/report.md"
    elif [[ -f $OUT_DIR/llama-$mode.json && -f $OUT_DIR/tandem-$mode.json ]]; then
        "$PY" loadtests/compare.py "$OUT_DIR/llama-$mode.json" "$OUT_DIR/tandem-$mode.json" | tee "$OUT_DIR/compare-$mode.md"
        echo
    fi
done
echo "# results in $OUT_DIR" >&2
exit $status
