#!/usr/bin/env bash
# HTTP-level tests of `tandem serve`, as CI runs them after `cargo build --release`:
#   1. a Python venv with tests/py/requirements.txt ($TANDEM_PY_VENV, default target/py-venv)
#   2. starts target/release/tandem serve on a free port, waits for GET /health == 200
#   3. pytest tests/py (the official openai client + raw httpx against the server)
#   4. schemathesis against the server's /openapi.json (bounded in time)
#   5. /metrics: no KV block is held once the load is over
#   6. SIGTERM: the server must exit with status 0 within 30 s (graceful shutdown)
# Exits non-zero if any step failed. Run from anywhere; needs python3 (with venv/pip)
# and network access to PyPI the first time.
#
# Environment (all optional):
#   MODEL               model to serve (default models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)
#   PORT                port (default: a free one)
#   TANDEM_BIN          server binary (default target/release/tandem)
#   TANDEM_PY_VENV      venv path (default target/py-venv)
#   HEALTH_TIMEOUT_S    wait for /health (default 120)
#   PYTEST_ARGS         extra pytest arguments (e.g. "-k stream -x")
#   SCHEMATHESIS_MAX_TIME_S     time budget of the schemathesis run (default 180)
#   SCHEMATHESIS_MAX_EXAMPLES   examples per operation (default 100)
#   SCHEMATHESIS_CHECKS         checks (default not_a_server_error,status_code_conformance,
#                               content_type_conformance,response_schema_conformance)
#   SKIP_SCHEMATHESIS=1 / SKIP_PYTEST=1   skip a step (for local iteration only)
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

MODEL=${MODEL:-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}
TANDEM_BIN=${TANDEM_BIN:-target/release/tandem}
VENV=${TANDEM_PY_VENV:-target/py-venv}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-120}
SCHEMATHESIS_MAX_TIME_S=${SCHEMATHESIS_MAX_TIME_S:-180}
SCHEMATHESIS_MAX_EXAMPLES=${SCHEMATHESIS_MAX_EXAMPLES:-100}
SCHEMATHESIS_CHECKS=${SCHEMATHESIS_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance}
WORK=$ROOT/target/py-work
mkdir -p "$WORK"
export PYTHONDONTWRITEBYTECODE=1

say() { printf '\n==> %s\n' "$*"; }
die() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

[[ -x $TANDEM_BIN ]] || die "$TANDEM_BIN not found: run cargo build --release first"
[[ -e $MODEL ]] || die "model $MODEL not found (scripts/get-default-model.sh fetches the default)"

# ---- 1. venv ------------------------------------------------------------------
say "python venv $VENV"
if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV" || die "python3 -m venv $VENV"
fi
PY=$VENV/bin/python
case $VENV in /*) VENV_ABS=$VENV ;; *) VENV_ABS=$ROOT/$VENV ;; esac
stamp=$VENV/.tandem-requirements
if ! cmp -s tests/py/requirements.txt "$stamp"; then
    "$PY" -m pip install --quiet --disable-pip-version-check -r tests/py/requirements.txt \
        || die "pip install -r tests/py/requirements.txt"
    cp tests/py/requirements.txt "$stamp"
fi

# ---- 2. server ----------------------------------------------------------------
if [[ -z ${PORT:-} ]]; then
    PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
BASE=http://127.0.0.1:$PORT
LOG=$WORK/server.log
say "starting $TANDEM_BIN serve --model $MODEL --port $PORT (log: $LOG)"
# A fresh data directory: the files and fine-tuning tests upload and train.
rm -rf "$WORK/data"
"$TANDEM_BIN" serve --model "$MODEL" --port "$PORT" --data-dir "$WORK/data" >"$LOG" 2>&1 &
SERVER_PID=$!

show_log() {
    echo "---- server log (last 200 lines of $LOG) ----" >&2
    tail -n 200 "$LOG" >&2
    echo "---- end of server log ----" >&2
}
cleanup() {
    if [[ -n ${SERVER_PID:-} ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -KILL "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
}
trap cleanup EXIT

deadline=$((SECONDS + HEALTH_TIMEOUT_S))
health_ok() {
    "$PY" - "$BASE/health" <<'PYEOF' 2>/dev/null
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=5).status == 200 else 1)
except Exception:
    sys.exit(1)
PYEOF
}
until health_ok; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        wait "$SERVER_PID"; rc=$?
        show_log; die "the server exited with status $rc before /health answered 200"
    fi
    if ((SECONDS >= deadline)); then
        show_log; die "GET $BASE/health did not answer 200 within ${HEALTH_TIMEOUT_S}s"
    fi
    sleep 0.5
done
echo "server up after ${SECONDS}s"

failed=()

# ---- 3. pytest ----------------------------------------------------------------
if [[ ${SKIP_PYTEST:-} != 1 ]]; then
    say "pytest tests/py"
    # shellcheck disable=SC2086
    TANDEM_BASE_URL=$BASE "$PY" -m pytest tests/py -p no:cacheprovider -q -rfE --durations=5 ${PYTEST_ARGS:-} \
        || failed+=("pytest")
fi

# ---- 4. schemathesis ----------------------------------------------------------
if [[ ${SKIP_SCHEMATHESIS:-} != 1 ]]; then
    say "schemathesis $BASE/openapi.json (checks: $SCHEMATHESIS_CHECKS; ≤${SCHEMATHESIS_MAX_EXAMPLES} examples/operation, ≤${SCHEMATHESIS_MAX_TIME_S}s)"
    # The served model's id, for the hooks (see tests/py/schemathesis_hooks.py).
    MODEL_ID=$("$PY" -c 'import json, sys, urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1]))["data"][0]["id"])' "$BASE/v1/models") \
        || failed+=("GET /v1/models")
    # Run from target/py-work so nothing (hypothesis database, reports) lands in the tree.
    # One worker: with two, hypothesis parses lambda sources with `ast` on both
    # threads at once, and CPython 3.11's AST builder keeps its recursion counter
    # per interpreter, not per thread (cpython#106905): the run then dies with
    # "AST constructor recursion depth mismatch", an error of the tool, not of tandem.
    (
        cd "$WORK" &&
        PYTHONPATH=$ROOT/tests/py SCHEMATHESIS_HOOKS=schemathesis_hooks TANDEM_MODEL_ID=${MODEL_ID:-} \
            "$VENV_ABS/bin/schemathesis" run "$BASE/openapi.json" \
            --origin "$BASE" \
            --checks "$SCHEMATHESIS_CHECKS" \
            --max-examples "$SCHEMATHESIS_MAX_EXAMPLES" \
            --max-time "$SCHEMATHESIS_MAX_TIME_S" \
            --workers 1 \
            --request-timeout 120 \
            --seed 1 \
            --generation-database none \
            --no-color
    ) || failed+=("schemathesis")
fi

# ---- 5. blocks come back -------------------------------------------------------
# After all that load (streams cut short, aborted choices, fuzzed bodies) no KV
# block may stay held: only the prefix cache keeps (free) blocks.
say "KV blocks return to the prefix-cache-only baseline"
"$PY" - "$BASE/metrics" <<'PYEOF' || failed+=("KV blocks still held after the load")
import sys, time, urllib.request
want = {"tandem_kv_blocks_used": 0.0, "vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}
deadline = time.time() + 60
while True:
    text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
    got = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in want:
            got[parts[0]] = float(parts[1])
    if got == want:
        print("idle:", got)
        break
    if time.time() > deadline:
        print("still held after 60 s:", got, file=sys.stderr)
        sys.exit(1)
    time.sleep(0.5)
PYEOF

# ---- 6. graceful shutdown -----------------------------------------------------
say "SIGTERM to the server (pid $SERVER_PID)"
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    wait "$SERVER_PID"; rc=$?
    show_log; failed+=("server died during the tests (status $rc)")
else
    kill -TERM "$SERVER_PID"
    t0=$SECONDS
    while kill -0 "$SERVER_PID" 2>/dev/null && ((SECONDS - t0 < 30)); do sleep 0.2; done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        show_log; failed+=("no exit within 30 s of SIGTERM")
        kill -KILL "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null
    else
        wait "$SERVER_PID"; rc=$?
        echo "server exited with status $rc after $((SECONDS - t0))s"
        if ((rc != 0)); then show_log; failed+=("server exit status $rc after SIGTERM (want 0)"); fi
    fi
fi
SERVER_PID=

if ((${#failed[@]})); then
    printf '\nFAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo
echo "tests/py/run.sh: all passed"
