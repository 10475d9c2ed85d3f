#!/usr/bin/env bash
# Drives examples/chat through a pseudo-terminal (tmux) for two turns and checks that both
# are answered and followed by the stats line, then that /quit leaves.
# Usage: tests/chat_pty.sh   (from anywhere; builds the example first)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v tmux >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && apt-get install -y -qq tmux) >/dev/null 2>&1 || true
    fi
fi
if ! command -v tmux >/dev/null 2>&1; then
    echo "SKIPPED chat_pty: tmux is not installed and could not be installed"
    exit 0
fi

cargo build --release --quiet --example chat
SESSION="specula-chat-$$"
LOG="$(mktemp)"
trap 'tmux kill-session -t "$SESSION" 2>/dev/null || true; rm -f "$LOG"' EXIT

tmux new-session -d -s "$SESSION" -x 160 -y 60 \
    "target/release/examples/chat --max-tokens 32; echo '[chat exited]'; sleep 30"

pane() { tmux capture-pane -p -J -S - -t "$SESSION"; }
# Waits until the pane shows at least $2 lines matching the pattern $1.
wait_for() {
    local pattern="$1" count="$2" deadline=$((SECONDS + ${3:-180}))
    while [ "$(pane | grep -cE -- "$pattern" || true)" -lt "$count" ]; do
        if [ $SECONDS -ge $deadline ]; then
            echo "FAILED chat_pty: timed out waiting for $count x /$pattern/; the terminal shows:"
            pane
            exit 1
        fi
        sleep 0.5
    done
}

wait_for '^you> ' 1 600 # the first run may fetch the default model
tmux send-keys -t "$SESSION" -l "What is the capital of France?"
tmux send-keys -t "$SESSION" Enter
wait_for 'tok/s' 1
wait_for '^you> ' 2
tmux send-keys -t "$SESSION" -l "And what is the capital of Italy?"
tmux send-keys -t "$SESSION" Enter
wait_for 'tok/s' 2
wait_for '^you> ' 3
tmux send-keys -t "$SESSION" -l "/quit"
tmux send-keys -t "$SESSION" Enter
wait_for '^bye$' 1 30
pane >"$LOG"

# Both answers have text after the bot prompt, and each is followed by its stats line.
answers=$(grep -cE '^bot> .*[[:alnum:]]' "$LOG" || true)
stats=$(grep -cE '^\[[0-9]+ tokens in [0-9.]+ s: first after [0-9.]+ s, then [0-9.]+ tok/s' "$LOG" || true)
if [ "$answers" -lt 2 ] || [ "$stats" -ne 2 ]; then
    echo "FAILED chat_pty: expected 2 answers and 2 stats lines, got $answers and $stats:"
    cat "$LOG"
    exit 1
fi
echo "chat_pty: ok (two turns answered, stats shown)"
grep -E '^(you|bot)> |tok/s' "$LOG" | sed 's/^/    /'
