#!/usr/bin/env bash
# A real Prometheus (Debian's `prometheus` package, installed here when missing)
# scrapes a running `tandem serve`, and PromQL over the scraped series must
# return the per-target request counts the test produced (tests/prometheus/scrape.py).
# Needs: the release binary (cargo build --release), python3, apt (or prometheus on PATH).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v prometheus >/dev/null; then
    echo "installing Debian's prometheus package ..."
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null \
        || { $SUDO apt-get update >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null; }
fi
exec python3 tests/prometheus/scrape.py
