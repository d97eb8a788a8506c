#!/usr/bin/env bash
# The GPU check, shaped by the device machine's limits: 15 minutes of device
# time a session (start-up included), 10 minutes a command, 64 MiB carried
# there (tree + carried build outputs), at most 8 files back from $OUT. There:
# python3 with torch and transformers, nvcc, no cargo, no network.
#
#   scripts/gpu-check.sh --pack          here: a stripped copy of the release
#                                        binary in target/gpu/ (size printed;
#                                        refused at 40 MB or more), the only thing
#                                        to carry
#   scripts/gpu-check.sh selftest [OUT]  stage 1, under 3 minutes: every kernel
#                                        against the CPU backend, then greedy
#                                        decoding end to end; the verdict line
#                                        `gpu-check selftest: PASS|FAIL ...` goes
#                                        to stdout and to OUT/summary.md
#   scripts/gpu-check.sh bench [OUT]     stage 2, under 6 minutes: tandem bench on
#                                        random Llama-3-8B shapes in bf16, Q4_K (GGUF)
#                                        and Int4G128 (GPTQ/AWQ g128) (decode at batch 1, 16, 64;
#                                        prefill), q4_k with the bf16 KV cache,
#                                        transformers bf16 on the same GPU, the copy
#                                        bandwidth and batch-1 decode's fraction of
#                                        it (timeouts: 3 x 70 + 50 + 90 s)
#   scripts/gpu-check.sh all [OUT]       both, in one command (under 9 minutes)
#
# OUT defaults to $OUT (the device tool's folder). At most 4 files land there:
# summary.md, selftest.txt, bench.txt, transformers.txt; the NVRTC kernel cache
# goes to /tmp. The exact device calls are in docs/benchmarks.md ("CUDA").
# Exit status: the selftest's (benchmarks report, they do not fail).
#
# Environment: TANDEM_BIN (default target/gpu/tandem, else
# target/release/tandem), GPU_CHECK_DEVICE (default cuda:0; "cpu" runs the
# same flow on a CPU: CI's dry run), GPU_CHECK_SHAPE (default llama3-8b),
# GPU_CHECK_KINDS (default "bf16 q4_k int4g128"), GPU_CHECK_STEPS (decode steps,
# default 32), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: scripts/gpu-check.sh --pack | selftest|bench|all [OUT]}
MAX_CARRY_MB=40

if [[ $STAGE == --pack ]]; then
    mkdir -p target/gpu
    cp target/release/tandem target/gpu/tandem && strip target/gpu/tandem || exit 1
    mb=$(( $(stat -c %s target/gpu/tandem) / 1048576 ))
    echo "target/gpu/tandem: ${mb} MB stripped (carry: target/gpu; limit ${MAX_CARRY_MB} MB)"
    (( mb < MAX_CARRY_MB )) || { echo "too large to carry" >&2; exit 1; }
    exit 0
fi
case $STAGE in selftest | bench | all) ;; *) echo "unknown stage $STAGE" >&2; exit 2 ;; esac
OUT=${2:-${OUT:?give OUT (the device tool sets \$OUT)}}
mkdir -p "$OUT"
BIN=${TANDEM_BIN:-target/gpu/tandem}
[[ -x $BIN ]] || BIN=target/release/tandem
DEV=${GPU_CHECK_DEVICE:-cuda:0}
SHAPE=${GPU_CHECK_SHAPE:-llama3-8b}
KINDS=${GPU_CHECK_KINDS:-bf16 q4_k int4g128}
STEPS=${GPU_CHECK_STEPS:-32}
PY=${PYTHON:-python3}
SUMMARY=$OUT/summary.md
say() { echo "==> $*" | tee -a "$SUMMARY"; }

# CUDA libraries off the loader path: the toolkit and torch's wheels.
dirs=/usr/local/cuda/lib64
if wheel=$("$PY" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null); then
    for d in "$wheel"/nvidia/*/lib; do dirs="$dirs:$d"; done
fi
export TANDEM_CUDA_LIB_DIRS=${TANDEM_CUDA_LIB_DIRS:-$dirs}
# Not under OUT: it would eat the file budget, and it is no result.
export TANDEM_KERNEL_CACHE=${TANDEM_KERNEL_CACHE:-/tmp/tandem-kernel-cache}

if [[ ! -f $SUMMARY ]]; then
    { echo "# gpu-check $(date -u +%FT%TZ)"; echo; echo '```'
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
      echo '```'; echo "binary: $BIN ($(( $(stat -c %s "$BIN") / 1048576 )) MB)"; } > "$SUMMARY"
fi

status=0
if [[ $STAGE == selftest || $STAGE == all ]]; then
    # The default model when it travelled (it does not fit the carry limit),
    # else a random tiny model with a tokenizer-free prompt.
    MODEL=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    [[ -f $MODEL ]] || MODEL=random:tiny:q4_k
    say "selftest --device $DEV (end to end on $MODEL)"
    t0=$SECONDS
    timeout 170 "$BIN" selftest --device "$DEV" --model "$MODEL" > "$OUT/selftest.txt" 2>&1
    status=$?
    grep -E "FAIL|panicked|^error|warning" "$OUT/selftest.txt" | head -n 20 >> "$SUMMARY"
    tail -n 4 "$OUT/selftest.txt" >> "$SUMMARY"
    case $status in
        0) verdict="PASS" ;;
        124) verdict="FAIL (timed out after 170 s)" ;;
        *) verdict="FAIL (exit $status; $(grep -cE 'FAIL' "$OUT/selftest.txt") failing check(s))" ;;
    esac
    echo "gpu-check selftest: $verdict on $DEV in $((SECONDS - t0)) s" | tee -a "$SUMMARY"
fi

if [[ $STAGE == bench || $STAGE == all ]]; then
    : > "$OUT/bench.txt"
    for kind in $KINDS; do
        say "tandem bench random:$SHAPE:$kind"
        { echo "## $kind"; timeout 70 "$BIN" bench --device "$DEV" --model "random:$SHAPE:$kind" --batch 1,16,64 \
            --prompt-len 512 --decode-steps "$STEPS" --reps 3 2>&1 || echo "(exit $?)"; } > "$OUT/bench-part.txt"
        cat "$OUT/bench-part.txt" >> "$OUT/bench.txt"
        cat "$OUT/bench-part.txt" >> "$SUMMARY"
    done
    rm -f "$OUT/bench-part.txt"
    # The bf16 KV cache (CUDA only: the CPU refuses it) on the 4-bit kind at batch 64.
    if [[ $DEV != cpu ]]; then
        say "tandem bench random:$SHAPE:q4_k, cache.kv_cache_dtype = bf16"
        { echo "## q4_k bf16-kv"; TANDEM_CACHE_KV_CACHE_DTYPE=bf16 timeout 50 "$BIN" bench --device "$DEV" \
            --model "random:$SHAPE:q4_k" --batch 64 --prompt-len 512 --decode-steps "$STEPS" --reps 3 2>&1 \
            || echo "(exit $?)"; } | tee -a "$OUT/bench.txt" >> "$SUMMARY"
    fi
    say "transformers random:$SHAPE bf16"
    tdev=cuda; [[ $DEV == cpu ]] && tdev=cpu
    if "$PY" -c "import torch, transformers" 2>/dev/null; then
        timeout 90 "$PY" scripts/bench_transformers.py --shape "$SHAPE" --batch 1,16,64 --prompt-len 512 \
            --decode-steps "$STEPS" --device "$tdev" > "$OUT/transformers.txt" 2>&1
    else
        echo "transformers: skipped (no torch/transformers here)" > "$OUT/transformers.txt"
    fi
    grep -v Warning "$OUT/transformers.txt" | grep -v "return forward_call" >> "$SUMMARY"

    # Batch-1 decode reads every weight once per token: bytes per token / time
    # per token against the measured copy bandwidth.
    "$PY" - "$OUT" "$SHAPE" $KINDS <<'PYEOF' | tee -a "$SUMMARY"
import re, sys
out, shape, kinds = sys.argv[1], sys.argv[2], sys.argv[3:]
dims = {"llama3-8b": (4096, 14336, 32, 32, 8, 128256), "llama3-1b": (2048, 8192, 16, 32, 8, 128256),
        "tiny": (256, 512, 2, 4, 2, 1024)}[shape]
h, ff, layers, heads, kv, vocab = dims
d = h // heads
params_layer = h * (heads * d) * 2 + h * (kv * d) * 2 + 3 * h * ff
bits = {"bf16": 16, "f16": 16, "f32": 32, "q4_0": 4.5, "q4_k": 4.5, "q5_0": 5.5, "q5_k": 5.5, "q8_0": 8.5, "q6_k": 6.5625,
        "int4g128": 4.25, "int4g64": 4.5, "int4g32": 5.0, "nf4": 4.5, "fp4": 4.5}
bw = re.search(r"copy bandwidth: ([0-9.]+) GB/s", open(f"{out}/transformers.txt").read() or "")
bw = float(bw.group(1)) if bw else float("nan")
bench = open(f"{out}/bench.txt").read()
def tps(text, name):
    m = re.search(r"\| " + re.escape(name) + r" \| ([0-9.]+)", text)
    return float(m.group(1)) if m else float("nan")
hf = {b: tps(open(f"{out}/transformers.txt").read(), f"decode batch {b}") for b in (1, 16, 64)}
print(f"copy bandwidth {bw:.0f} GB/s")
print("| kind | batch-1 tok/s | GB/s read | of copy bw | batch 64 vs transformers bf16 |")
print("| --- | ---: | ---: | ---: | ---: |")
for k in kinds:
    part = bench.split(f"## {k}\n", 1)[-1].split("\n## ", 1)[0]
    t1, t64 = tps(part, "decode batch 1"), tps(part, "decode batch 64")
    # Matrices at the kind's bits; the embedding row read is negligible; lm_head too.
    gbytes = (layers * params_layer + vocab * h) * bits[k] / 8 / 1e9
    print(f"| {k} | {t1:.1f} | {gbytes * t1:.0f} | {gbytes * t1 / bw:.0%} | {t64 / hf[64]:.2f}x |")
PYEOF
fi
exit $status
