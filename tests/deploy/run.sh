#!/usr/bin/env bash
# What CI can prove about the containers and clusters without a Docker engine
# (tests/deploy/check.py): the images are built by the script CI builds with;
# the CPU image's runtime layout, assembled in a directory by that script,
# starts as the image's user with the image's environment and passes the
# image's health check; compose, Prometheus, Grafana and Kubernetes files parse
# and validate; every query parses (promtool) and every metric they name is
# one /metrics serves.
# Needs: the release build (scripts/build.sh), the default model, promtool
# (Debian's prometheus package; tests/prometheus/run.sh installs it), python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${TANDEM_PY_VENV:-target/py-venv}
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/deploy/requirements.txt \
    -r loadtests/requirements-lora.txt
ROOT=target/deploy-root
rm -rf "$ROOT"
scripts/build.sh --install "$ROOT"
ADAPTER=target/soak/lora1
[[ -f $ADAPTER/peft/adapter_model.safetensors ]] ||
    "$VENV/bin/python" loadtests/make_random_lora.py models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf "$ADAPTER" \
        --rank 8 --seed 1 >/dev/null
exec "$VENV/bin/python" tests/deploy/check.py --root "$ROOT" --adapter "$ADAPTER/peft" "$@"
