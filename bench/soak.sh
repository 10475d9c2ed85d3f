#!/usr/bin/env bash
# Soak test: `specula serve` on the default model under mixed WebSocket and SSE clients for
# a while (random cancels, disconnects, malformed and over-long requests, oversized frames and
# bodies, bodies sent in part; bench/soak_client.py), then SIGTERM. Fails unless, at the end,
# no request runs or waits, no KV block is in use, memory (RSS) is within a bound of where it
# stood half-way through (the KV pool's pages become resident as its blocks are first used),
# the log has no panic, and the server stopped cleanly.
#
#   bench/soak.sh [MINUTES]        (default 10; or SOAK_MINUTES, or SOAK_SECONDS)
#
# SOAK_CLIENTS (6: WebSocket clients, and as many SSE clients), SOAK_RSS_SLACK_MB (150),
# SOAK_SEED (1), SOAK_LONG_PROMPTS (0; 1 adds a client of prompts from 513 tokens to past the
# context: on a CPU a prefill runs at tens of tokens per second, hence not in the CI run),
# SPECULA (the binary; default: built here with --release), SOAK_SERVE_ARGS (more arguments for
# `specula serve`, e.g. "--backend cuda").
set -euo pipefail
cd "$(dirname "$0")/.."

minutes="${1:-${SOAK_MINUTES:-10}}"
seconds="${SOAK_SECONDS:-$(python3 -c "print(float('$minutes') * 60)")}"
if [ -z "${SPECULA:-}" ]; then
    cargo build --release --quiet --bin specula
    SPECULA=target/release/specula
fi
log="$(mktemp -t specula-soak.XXXXXX.log)"

# A short body deadline, so that the bodies sent in part are cut off within the run.
# shellcheck disable=SC2086 # SOAK_SERVE_ARGS is a list of arguments
"$SPECULA" serve --port 0 --body-timeout 3 --drain-timeout 5 ${SOAK_SERVE_ARGS:-} 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
port=""
for _ in $(seq 1 600); do
    port="$(sed -n 's/.*serving .* on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log")"
    [ -n "$port" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$log"; echo "FAIL: the server did not start"; exit 1; }
    sleep 0.1
done
[ -n "$port" ] || { cat "$log"; echo "FAIL: the server did not start in time"; exit 1; }

status=0
long=()
[ "${SOAK_LONG_PROMPTS:-0}" = 1 ] && long=(--long-prompts)
python3 bench/soak_client.py "${long[@]}" --port "$port" --pid "$server" --seconds "$seconds" \
    --clients "${SOAK_CLIENTS:-6}" --rss-slack-mb "${SOAK_RSS_SLACK_MB:-150}" --seed "${SOAK_SEED:-1}" || status=1

kill -TERM "$server"
if wait "$server"; then
    echo "stop (SIGTERM)      clean"
else
    echo "FAIL: the server exited with status $? after SIGTERM"
    status=1
fi
trap - EXIT
if grep -q "panicked" "$log"; then
    grep -B2 -A10 "panicked" "$log" | head -40
    echo "FAIL: a panic in the server log ($log)"
    status=1
fi
[ "$status" -eq 0 ] && echo "soak: ok" || echo "soak: FAILED (server log: $log)"
exit "$status"
