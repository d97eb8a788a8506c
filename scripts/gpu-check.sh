#!/usr/bin/env bash
# The GPU check: one command on a GPU machine, from a release binary built on a
# CPU machine (the CUDA backend loads CUDA at run time).
#
#   scripts/gpu-check.sh RESULTS_DIR
#
# 1. selftest: every kernel against the CPU backend, then greedy decoding end
#    to end (the default model if models/ has it, else a random tiny model);
# 2. tandem bench on random-weight models with Llama-3-8B's shapes, in bf16 and
#    in each 4-bit GGUF kind (decode tok/s at batch 1, 16, 64; prefill tok/s);
# 3. transformers on the same shapes on the same GPU (bf16), for the ratio;
# 4. the device's copy bandwidth, and the batch-1 decode's fraction of it.
# Everything lands in RESULTS_DIR; summary.md gathers it. Exit status: the
# selftest's (benchmarks report, they do not fail).
#
# Environment: TANDEM_BIN (default target/release/tandem), GPU_CHECK_DEVICE
# (default cuda:0; "cpu" runs the same flow on a CPU for testing the script),
# GPU_CHECK_SHAPE (default llama3-8b), GPU_CHECK_KINDS (default
# "bf16 q4_k q4_0"), GPU_CHECK_STEPS (decode steps, default 32), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu-check.sh RESULTS_DIR}
mkdir -p "$OUT"
BIN=${TANDEM_BIN:-target/release/tandem}
DEV=${GPU_CHECK_DEVICE:-cuda:0}
SHAPE=${GPU_CHECK_SHAPE:-llama3-8b}
KINDS=${GPU_CHECK_KINDS:-bf16 q4_k q4_0}
STEPS=${GPU_CHECK_STEPS:-32}
PY=${PYTHON:-python3}
say() { echo "==> $*" | tee -a "$OUT/summary.md"; }

# CUDA libraries off the loader path: the toolkit and torch's wheels.
dirs=/usr/local/cuda/lib64
if wheel=$("$PY" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null); then
    for d in "$wheel"/nvidia/*/lib; do dirs="$dirs:$d"; done
fi
export TANDEM_CUDA_LIB_DIRS=${TANDEM_CUDA_LIB_DIRS:-$dirs}
export TANDEM_KERNEL_CACHE=${TANDEM_KERNEL_CACHE:-$OUT/kernel-cache}

{ echo "# gpu-check $(date -u +%FT%TZ)"; echo; echo '```'; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"; echo '```'; } > "$OUT/summary.md"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >> "$OUT/summary.md"

MODEL=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
[[ -f $MODEL ]] || MODEL=random:tiny:q4_k
say "selftest --device $DEV (end to end on $MODEL)"
timeout 300 "$BIN" selftest --device "$DEV" --model "$MODEL" > "$OUT/selftest.txt" 2>&1
status=$?
tail -n 8 "$OUT/selftest.txt" >> "$OUT/summary.md"
grep -E "FAIL|panicked|^error" "$OUT/selftest.txt" | head -n 20 >> "$OUT/summary.md"

for kind in $KINDS; do
    say "tandem bench random:$SHAPE:$kind"
    timeout 240 "$BIN" bench --device "$DEV" --model "random:$SHAPE:$kind" --batch 1,16,64 \
        --prompt-len 512 --decode-steps "$STEPS" --reps 3 > "$OUT/bench-$kind.txt" 2>&1
    cat "$OUT/bench-$kind.txt" >> "$OUT/summary.md"
done

say "transformers random:$SHAPE bf16"
tdev=cuda; [[ $DEV == cpu ]] && tdev=cpu
timeout 240 "$PY" scripts/bench_transformers.py --shape "$SHAPE" --batch 1,16,64 --prompt-len 512 \
    --decode-steps "$STEPS" --device "$tdev" > "$OUT/transformers.txt" 2>&1
grep -v Warning "$OUT/transformers.txt" | grep -v "return forward_call" >> "$OUT/summary.md"

# Batch-1 decode reads every weight once per token: bytes per token / time
# per token against the measured copy bandwidth.
"$PY" - "$OUT" "$SHAPE" $KINDS <<'PYEOF' | tee -a "$OUT/summary.md"
import re, sys
out, shape, kinds = sys.argv[1], sys.argv[2], sys.argv[3:]
dims = {"llama3-8b": (4096, 14336, 32, 32, 8, 128256), "llama3-1b": (2048, 8192, 16, 32, 8, 128256),
        "tiny": (256, 512, 2, 4, 2, 1024)}[shape]
h, ff, layers, heads, kv, vocab = dims
d = h // heads
params_layer = h * (heads * d) * 2 + h * (kv * d) * 2 + 3 * h * ff
bits = {"bf16": 16, "f16": 16, "f32": 32, "q4_0": 4.5, "q4_k": 4.5, "q5_0": 5.5, "q5_k": 5.5, "q8_0": 8.5, "q6_k": 6.5625}
bw = re.search(r"copy bandwidth: ([0-9.]+) GB/s", open(f"{out}/transformers.txt").read() or "")
bw = float(bw.group(1)) if bw else float("nan")
def tps(path, name):
    m = re.search(r"\| " + re.escape(name) + r" \| ([0-9.]+)", open(path).read())
    return float(m.group(1)) if m else float("nan")
hf = {b: tps(f"{out}/transformers.txt", f"decode batch {b}") for b in (1, 16, 64)}
print(f"copy bandwidth {bw:.0f} GB/s")
print("| kind | batch-1 tok/s | GB/s read | of copy bw | batch 64 vs transformers bf16 |")
print("| --- | ---: | ---: | ---: | ---: |")
for k in kinds:
    f = f"{out}/bench-{k}.txt"
    t1, t64 = tps(f, "decode batch 1"), tps(f, "decode batch 64")
    # Matrices at the kind's bits; the embedding row read is negligible; lm_head too.
    gbytes = (layers * params_layer + vocab * h) * bits[k] / 8 / 1e9
    print(f"| {k} | {t1:.1f} | {gbytes * t1:.0f} | {gbytes * t1 / bw:.0%} | {t64 / hf[64]:.2f}x |")
PYEOF
exit $status
