#!/usr/bin/env bash
# Starts `specula serve` with the given arguments, sends one request over the WebSocket and
# two over the OpenAI API (plain and SSE; bench/serve_smoke.py), prints the answers and the
# server's start-up lines, then stops it with SIGTERM. Fails unless every request answered
# and the server stopped cleanly.
#
#   bench/serve_smoke.sh [SERVE_ARGS...]      e.g. bench/serve_smoke.sh --backend cuda
#
# SPECULA: the binary (default target/release/specula).
set -euo pipefail
cd "$(dirname "$0")/.."
SPECULA=${SPECULA:-target/release/specula}
log="$(mktemp -t specula-smoke.XXXXXX.log)"
"$SPECULA" serve --port 0 "$@" 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
port=""
for _ in $(seq 1 1200); do
    port="$(sed -n 's/.*serving .* on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log")"
    [ -n "$port" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$log"; echo "FAIL: the server did not start"; exit 1; }
    sleep 0.1
done
[ -n "$port" ] || { cat "$log"; echo "FAIL: the server did not start in time"; exit 1; }
status=0
python3 bench/serve_smoke.py --port "$port" || status=1
kill -TERM "$server"
wait "$server" || { echo "FAIL: the server exited with status $? after SIGTERM"; status=1; }
trap - EXIT
echo "-- server log"
head -n 20 "$log"
[ "$status" -eq 0 ] && echo "serve smoke: ok" || echo "serve smoke: FAILED"
exit "$status"
