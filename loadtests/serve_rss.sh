#!/bin/bash
# Resident memory of an idle server: starts `BIN serve --port 0 ARGS...`, waits
# for /health 200, prints its VmRSS, stops it.
#   loadtests/serve_rss.sh target/release/tandem --model M --quantize q4_k
BIN=$1; shift
log=$(mktemp)
$BIN serve --port 0 "$@" 2>$log &
pid=$!
for i in $(seq 600); do grep -q "listening on" $log && break; sleep 0.2; done
url=$(grep -o "http://[0-9.:]*" $log | head -1)
until curl -sf $url/health >/dev/null; do sleep 0.3; done
sleep 1
echo "$* : RSS $(awk '/VmRSS/ {printf "%.0f MB", $2/1024}' /proc/$pid/status)"
kill $pid; wait $pid 2>/dev/null
