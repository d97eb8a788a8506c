#!/usr/bin/env bash
# The one build of tandem: CI (scripts/test.sh) and both container images
# (docker/Dockerfile, docker/Dockerfile.cpu) run this script, so an image holds
# exactly what CI tested.
#   scripts/build.sh                  cargo build --release --locked
#   scripts/build.sh --install ROOT   then lay out the image's files under ROOT:
#       ROOT/usr/local/bin/tandem                 (stripped; CPU and CUDA in one
#                                                  binary: CUDA libraries load at run time)
#       ROOT/usr/local/bin/docker-entrypoint.sh
#       ROOT/usr/local/share/tandem/default.toml  (the built-in defaults, for reference)
#       ROOT/usr/local/share/tandem/get-default-model.sh
#       ROOT/etc/tandem/                          (mount config.toml here; optional)
#       ROOT/models ROOT/adapters ROOT/data       (volumes)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
[[ ${1:-} == --install ]] || exit 0
ROOT=${2:?usage: scripts/build.sh --install ROOT}
mkdir -p "$ROOT/usr/local/bin" "$ROOT/usr/local/share/tandem" "$ROOT/etc/tandem" \
    "$ROOT/models" "$ROOT/adapters" "$ROOT/data"
install -m 0755 target/release/tandem "$ROOT/usr/local/bin/tandem"
strip "$ROOT/usr/local/bin/tandem" 2>/dev/null || true
install -m 0755 docker/entrypoint.sh "$ROOT/usr/local/bin/docker-entrypoint.sh"
install -m 0644 config/default.toml "$ROOT/usr/local/share/tandem/default.toml"
install -m 0755 scripts/get-default-model.sh "$ROOT/usr/local/share/tandem/get-default-model.sh"
echo "installed under $ROOT ($(du -sh "$ROOT/usr/local/bin/tandem" | cut -f1) binary)"
