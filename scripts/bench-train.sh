#!/usr/bin/env bash
# Training speed and memory, tandem against peft + transformers in the same run
# (docs/benchmarks.md): ROUNDS interleaved rounds of
#   tandem bench-train (every layer's activations kept),
#   tandem bench-train --memory-budget-mib BUDGET (the default budget: layers recomputed),
#   scripts/bench_peft_train.py (f32 model, the same micro-batches),
# each printing its table; the ratios are computed from the medians by hand.
#
# usage: PYTHON=/path/to/python-with-peft scripts/bench-train.sh [ROUNDS] [extra bench-train/peft args...]
#   e.g. scripts/bench-train.sh 2 --loss-fraction 0.5
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-2}"
shift || true
PY="${PYTHON:-python3}"
MODEL="${MODEL:-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}"
BUDGET="${BUDGET:-1024}"
BIN=target/release/tandem
[ -x "$BIN" ] || cargo build --release --locked
lscpu | grep -E "Model name|^CPU\(s\)" || true
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r: tandem, every layer kept"
  "$BIN" --threads 2 bench-train --model "$MODEL" --steps 3 "$@"
  echo "== round $r: tandem, memory budget $BUDGET MiB"
  "$BIN" --threads 2 bench-train --model "$MODEL" --steps 3 --memory-budget-mib "$BUDGET" "$@"
  echo "== round $r: peft"
  "$PY" scripts/bench_peft_train.py --model "$MODEL" --steps 3 --threads 2 "$@" 2>&1 | grep -E "^(step|\|)"
done
