#!/usr/bin/env bash
# tandem bench vs llama.cpp's llama-bench on the same model, same threads,
# interleaved round by round (these machines are noisy: only paired runs
# compare). Prints each round and the medians and ratios.
#
#   LLAMA_BENCH=/path/to/llama-bench scripts/bench-cpu.sh [ROUNDS] [MODEL]
#
# llama.cpp is built outside the repo (../shared/PEERS.md); on VMs that
# advertise AMX without allowing it, build with -DGGML_NATIVE=OFF and explicit
# AVX-512 flags (docs/benchmarks.md has the exact cmake line).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
MODEL=${2:-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}
THREADS=${THREADS:-2}
: "${LLAMA_BENCH:?set LLAMA_BENCH to the llama-bench binary of llama.cpp}"
TANDEM=${TANDEM:-target/release/tandem}
export LD_LIBRARY_PATH="$(dirname "$LLAMA_BENCH")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
out=$(mktemp -d)
for r in $(seq 1 "$ROUNDS"); do
  "$TANDEM" --threads "$THREADS" bench --model "$MODEL" --reps 3 --decode-steps 64 --batch 1,4,16 > "$out/t$r.txt"
  "$LLAMA_BENCH" -m "$MODEL" -t "$THREADS" -p 512 -n 128 -r 3 -o csv > "$out/l$r.csv" 2>/dev/null
  echo "round $r:"; grep '|' "$out/t$r.txt" | tail -n +3
  python3 - "$out/l$r.csv" <<'PY'
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    kind = "pp%s" % row["n_prompt"] if int(row["n_gen"]) == 0 else "tg%s" % row["n_gen"]
    print("| llama.cpp %s | %.1f |" % (kind, float(row["avg_ts"])))
PY
done
python3 - "$out" "$ROUNDS" <<'PY'
import csv, re, statistics, sys
d, rounds = sys.argv[1], int(sys.argv[2])
t = {}; l = {}
for r in range(1, rounds + 1):
    for line in open(f"{d}/t{r}.txt"):
        m = re.match(r"\| (prefill pp\d+|decode batch \d+) \| ([\d.]+)", line)
        if m: t.setdefault(m.group(1), []).append(float(m.group(2)))
    for row in csv.DictReader(open(f"{d}/l{r}.csv")):
        kind = "pp" if int(row["n_gen"]) == 0 else "tg"
        l.setdefault(kind, []).append(float(row["avg_ts"]))
med = {k: statistics.median(v) for k, v in t.items()}
pp, tg = statistics.median(l["pp"]), statistics.median(l["tg"])
print(f"\nmedians over {rounds} rounds (tok/s):")
for k, v in med.items(): print(f"| tandem {k} | {v:.1f} |")
print(f"| llama.cpp pp512 | {pp:.1f} |\n| llama.cpp tg128 | {tg:.1f} |")
pre = next(v for k, v in med.items() if k.startswith("prefill"))
b1 = med.get("decode batch 1"); b16 = med.get("decode batch 16")
print(f"\nratios of medians: prefill/pp512 = {pre/pp:.2f}, decode b1/tg128 = {b1/tg:.2f}, decode b16/b1 = {b16/b1:.2f}")
# Paired statistic: the ratio within each round, then the median over rounds.
pre_key = next(k for k in t if k.startswith("prefill"))
rp = statistics.median(a / b for a, b in zip(t[pre_key], l["pp"]))
rt = statistics.median(a / b for a, b in zip(t["decode batch 1"], l["tg"]))
print(f"median of per-round ratios: prefill/pp512 = {rp:.2f}, decode b1/tg128 = {rt:.2f}")
PY
rm -rf "$out"
