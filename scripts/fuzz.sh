#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for SECONDS each (default 30), starting from
# its committed seeds (fuzz/seeds/TARGET, see scripts/fixtures/fuzz_seeds.py)
# plus whatever corpus earlier runs left in target/fuzz-corpus/TARGET. Fails
# on the first crash, printing the reproducer and the command that replays it.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Stable toolchain: cargo-fuzz with no sanitizer (-s none) and RUSTC_BOOTSTRAP
# for the one unstable flag it passes; -O optimises, -a keeps debug
# assertions. cargo-fuzz is installed (pinned) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SECONDS_EACH=${1:-30}
shift || true
CARGO_FUZZ_VERSION=0.13.2
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "==> installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

mapfile -t ALL < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^tandem-fuzz$')
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=("${ALL[@]}")

FLAGS=(-s none -O -a)
echo "==> building ${#ALL[@]} fuzz targets (${FLAGS[*]})"
start=$(date +%s)
(cd fuzz && cargo fuzz build "${FLAGS[@]}")
echo "built in $(($(date +%s) - start))s"

summary=()
for t in "${TARGETS[@]}"; do
    [[ -d fuzz/seeds/$t ]] || { echo "FAILED: fuzz/seeds/$t is missing (scripts/fixtures/fuzz_seeds.py)" >&2; exit 1; }
    work=$ROOT/target/fuzz-corpus/$t
    artifacts=$ROOT/target/fuzz-artifacts/$t/
    mkdir -p "$work" "$artifacts"
    log=$ROOT/target/fuzz-$t.log
    echo "==> $t for ${SECONDS_EACH}s"
    if ! (cd fuzz && cargo fuzz run "${FLAGS[@]}" "$t" "$work" "$ROOT/fuzz/seeds/$t" -- \
        -max_total_time="$SECONDS_EACH" -artifact_prefix="$artifacts" -print_final_stats=1 \
        -timeout=20 -rss_limit_mb=4096) >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        crash=$(ls -t "$artifacts" 2>/dev/null | head -n 1 || true)
        echo >&2
        echo "FAILED: fuzz target $t crashed." >&2
        if [[ -n $crash ]]; then
            echo "reproducer: $artifacts$crash ($(stat -c %s "$artifacts$crash") bytes), base64:" >&2
            base64 -w 0 "$artifacts$crash" | head -c 4096 >&2
            echo >&2
            echo "replay: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${FLAGS[*]} $t $artifacts$crash)" >&2
        fi
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2)
    summary+=("$(printf '%-22s %10s inputs  cov %s' "$t" "${runs:-?}" "${cov:-?}")")
done
echo
echo "==> fuzzing passed (${SECONDS_EACH}s per target)"
printf '  %s\n' "${summary[@]}"
