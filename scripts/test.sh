#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this), on a fresh machine:
# fetches the default model, builds once with optimisation, runs every test.
# Needs: a Rust toolchain (cargo), python3 with pip and venv (model download,
# NVRTC, HTTP client tests), g++ (the CUDA kernel emulator test), apt or a
# prometheus binary on PATH (the scrape test, promtool for tests/deploy);
# cargo-fuzz is installed by scripts/fuzz.sh when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/get-default-model.sh
# NVRTC from PyPI: tests/cuda_nvrtc.rs compiles every CUDA kernel with it (and
# fails under CI if it is missing).
TANDEM_NVRTC_LIB=$(scripts/get-nvrtc.sh)
export TANDEM_NVRTC_LIB
cargo fmt --all -- --check
# One optimised build shared by the binary, the tests and the container images
# (docker/Dockerfile* run this same script; numeric tests are far too slow
# unoptimised).
scripts/build.sh
cargo test --release --locked --all-targets
# The goldens again on the narrower kernel sets (AVX-512 is this machine's
# default): every ISA path must match transformers, not just the one in use.
TANDEM_CPU_ISA=avx2 cargo test --release --locked --test default_model --test model_tiny --test lora_tiny --test train_grads
TANDEM_CPU_ISA=scalar cargo test --release --locked --test model_tiny --test lora_tiny --test train_grads
# The HTTP server as clients see it: the official openai Python client, raw
# bad-input requests, schemathesis against /openapi.json, graceful shutdown.
tests/py/run.sh
# A real Prometheus scrapes the server; PromQL must see the requests we made.
tests/prometheus/run.sh
# Overload: 200 streaming clients against a bounded queue for 40 s, mixed base
# and adapter traffic, some disconnecting: no 5xx, quick 429s, nothing leaks.
loadtests/soak.sh --short
# The images' runtime layout starts, serves and passes its health check as the
# image's user; compose, Prometheus, Grafana and Kubernetes files validate, and
# every metric they use is served.
tests/deploy/run.sh
# The GPU check's flow on the CPU: what runs on a lent GPU must fit the device's
# limits (carried binary, file budget, verdict on stdout).
tests/gpu-check/dry_run.sh
# Every fuzz target for a fixed time from its committed seeds; a crash fails
# the run with its reproducer (the build is the long part: ~8 min on 2 cores).
scripts/fuzz.sh "${TANDEM_FUZZ_SECONDS:-15}"
