#!/bin/sh
# The images' entry point: `tandem` with /etc/tandem/config.toml when one is
# mounted, the rest from TANDEM_* variables (every config key has one:
# docs/operations.md). Arguments are tandem's (default: serve).
#   docker run IMAGE                       serve TANDEM_MODEL
#   docker run IMAGE serve --lora a=/adapters/a
#   docker run IMAGE config                print the configuration in effect
set -eu
CONFIG=${TANDEM_CONFIG:-/etc/tandem/config.toml}
[ "$#" -gt 0 ] || set -- serve
if [ "$1" = serve ] && [ -n "${TANDEM_MODEL:-}" ] && [ ! -e "$TANDEM_MODEL" ] && [ "${TANDEM_MODEL#/}" != "$TANDEM_MODEL" ]; then
    echo "error: no model at $TANDEM_MODEL: mount one (-v /path/to/models:/models) or set TANDEM_MODEL" >&2
    echo "(the default model: scripts/get-default-model.sh on the host, then mount its models/ directory)" >&2
    exit 1
fi
if [ -f "$CONFIG" ]; then
    exec tandem --config "$CONFIG" "$@"
fi
exec tandem "$@"
