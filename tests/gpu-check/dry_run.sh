#!/usr/bin/env bash
# CI's dry run of scripts/gpu-check.sh on the CPU (GPU_CHECK_DEVICE=cpu, tiny
# shapes): the carried binary is under the limit, stage 1 prints its verdict
# on stdout, both stages stay within the device's file budget and keep the
# kernel cache out of OUT, and the summary has the benchmark table.
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "gpu-check dry run: FAILED: $*" >&2; exit 1; }
scripts/gpu-check.sh --pack || fail "the stripped binary is too large to carry"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export GPU_CHECK_DEVICE=cpu GPU_CHECK_SHAPE=tiny GPU_CHECK_STEPS=4 TANDEM_BIN=target/gpu/tandem
scripts/gpu-check.sh selftest "$OUT" > "$OUT.stdout" || fail "stage 1 failed: $(tail -5 "$OUT.stdout")"
grep -q "^gpu-check selftest: PASS on cpu" "$OUT.stdout" || fail "no verdict on stdout: $(cat "$OUT.stdout")"
scripts/gpu-check.sh bench "$OUT" > /dev/null || fail "stage 2 failed"
n=$(find "$OUT" -type f | wc -l)
(( n <= 6 )) || fail "$n files under OUT (the device returns at most 8; the budget is 6): $(ls "$OUT")"
[[ -z $(find "$OUT" -name '*.cubin') ]] || fail "kernel cache under OUT"
grep -q "^| q4_k | " "$OUT/summary.md" || fail "no benchmark table in summary.md"
grep -q "^gpu-check selftest: PASS" "$OUT/summary.md" || fail "no verdict in summary.md"
rm -f "$OUT.stdout"
echo "gpu-check dry run: passed ($n files: $(cd "$OUT" && ls | tr '\n' ' '))"
