#!/usr/bin/env bash
# Installs NVRTC from PyPI (nvidia-cuda-nvrtc) into target/nvrtc-venv, once, and
# prints the path of libnvrtc.so.13. The tests use it (TANDEM_NVRTC_LIB) to
# prove every CUDA kernel compiles, on machines with no GPU and no CUDA toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/nvrtc-venv
LIB=$VENV/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13
if ! ls $LIB >/dev/null 2>&1; then
    python3 -m venv "$VENV" >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check nvidia-cuda-nvrtc==13.5.37 >&2
fi
realpath $LIB
