#!/usr/bin/env bash
# Runs a whole local Tandem session on this machine, reporting each step:
#   a relay (fresh data directory, its own CA and pin), a technician account, an agent that shows a
#   one-time code and shares a screen, and a console that joins with that code through the relay,
#   end-to-end encrypted and keyed by the code. Then the relay's audit log.
#   - With a display: the agent's window (code, consent prompt: click "Allow control") shares this
#     display and the console's window shows it; the session runs until you close a window or
#     press End.
#   - Without one: the agent shares a virtual screen (Xvfb) with something to look at, consent is
#     answered "allow" by flag, and the console runs headless for [seconds] and writes the remote
#     screen to target/demo/remote-screen.png.
# Usage: scripts/demo.sh [seconds]      (default 5; headless only)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
SECONDS_UP="${1:-5}"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "building tandem-relay, tandem-agent, tandem-console (release)"
cargo build --release --quiet --bin tandem-relay --bin tandem-agent --bin tandem-console --bin tandem-demo-screen
BIN=target/release

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
MPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

step "starting the relay on 127.0.0.1:$PORT (data in $WORK/relay)"
"$BIN/tandem-relay" --data-dir "$WORK/relay" --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$MPORT" \
  >"$WORK/relay.out" 2>"$WORK/relay.log" &
PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$WORK/relay.out" 2>/dev/null && break; sleep 0.1; done
grep -q "listening on" "$WORK/relay.out" || { cat "$WORK/relay.log"; echo "relay did not start" >&2; exit 1; }
sed 's/^/    /' "$WORK/relay.out"
PIN=$(awk '/fingerprint:/ {print $2}' "$WORK/relay.out")

step "adding technician alice of 'ACME IT'"
TOKEN=$("$BIN/tandem-relay" --data-dir "$WORK/relay" technician add --org "ACME IT" --name alice | awk '/token/ {print $NF}')
echo "    token issued (shown once; not printed here)"

if [[ -n "${DISPLAY:-}" ]]; then
  step "agent window on this display ($DISPLAY): it shows the code, then asks you to allow the technician"
  # --print-code: this script reads the code from the agent's output to hand it to the console.
  TANDEM_AGENT_STATE_DIR="$WORK/agent-state" "$BIN/tandem-agent" --relay "127.0.0.1:$PORT" --relay-pin "$PIN" --once --json --print-code \
    >"$WORK/agent.out" 2>"$WORK/agent.log" &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q '"code"' "$WORK/agent.out" 2>/dev/null && break; sleep 0.1; done
  grep -q '"code"' "$WORK/agent.out" || { cat "$WORK/agent.log"; echo "agent did not show a code" >&2; exit 1; }
  CODE=$(grep -o '[0-9]\{3,9\}-[0-9]\{3\}-[0-9]\{3\}' "$WORK/agent.out" | head -1)
  step "the technician's console window joins with code $CODE: click \"Allow control\" in the agent window"
  set +e
  "$BIN/tandem-console" --relay "127.0.0.1:$PORT" --relay-pin "$PIN" --token "$TOKEN" --code "$CODE" \
    --no-remember 2>"$WORK/console.log" | sed 's/^/    console: /'
  rc=${PIPESTATUS[0]}
  set -e
  sleep 0.5
  sed 's/^/    agent: /' "$WORK/agent.out" | grep -v '"code"' || true
  if [[ $rc -ne 0 && $rc -ne 17 ]]; then cat "$WORK/console.log"; echo "console exited with $rc" >&2; exit "$rc"; fi
else
  N=$(( (RANDOM % 20000) + 200 ))
  while [[ -e /tmp/.X11-unix/X$N || -e /tmp/.X$N-lock ]]; do N=$((N + 1)); done
  SCREEN=":$N"
  step "no display here: starting a virtual screen $SCREEN (Xvfb 1280x800) with something to look at"
  Xvfb "$SCREEN" -screen 0 1280x800x24 -nolisten tcp >/dev/null 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do [[ -e /tmp/.X11-unix/X$N ]] && break; sleep 0.05; done
  "$BIN/tandem-demo-screen" "$SCREEN" &
  PIDS+=($!)
  sleep 0.5

  step "starting the agent (the user's PC, no window); consent answered 'allow' for this demo"
  TANDEM_AGENT_STATE_DIR="$WORK/agent-state" "$BIN/tandem-agent" --headless --relay "127.0.0.1:$PORT" --relay-pin "$PIN" --consent allow --once --display "$SCREEN" \
    >"$WORK/agent.out" 2>"$WORK/agent.log" &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q "session code" "$WORK/agent.out" 2>/dev/null && break; sleep 0.1; done
  grep -q "session code" "$WORK/agent.out" || { cat "$WORK/agent.log"; echo "agent did not show a code" >&2; exit 1; }
  sed 's/^/    agent: /' "$WORK/agent.out"
  CODE=$(grep -o '[0-9]\{3,9\}-[0-9]\{3\}-[0-9]\{3\}' "$WORK/agent.out" | head -1)

  mkdir -p target/demo
  PNG="$PWD/target/demo/remote-screen.png"
  step "the technician joins with code $CODE (console, headless, ${SECONDS_UP} s)"
  set +e
  "$BIN/tandem-console" --relay "127.0.0.1:$PORT" --relay-pin "$PIN" --token "$TOKEN" --code "$CODE" \
    --headless --no-remember --seconds "$SECONDS_UP" --png "$PNG" 2>"$WORK/console.log" | sed 's/^/    console: /'
  rc=${PIPESTATUS[0]}
  set -e
  sleep 0.5
  tail -n +3 "$WORK/agent.out" | sed 's/^/    agent: /'
  if [[ $rc -ne 0 ]]; then cat "$WORK/console.log"; echo "console exited with $rc" >&2; exit "$rc"; fi
  echo "    the remote screen as the console decoded it: $PNG"
fi

step "relay audit log (metadata only: never content, never codes)"
"$BIN/tandem-relay" --data-dir "$WORK/relay" audit | sed 's/^/    /'

step "relay metrics (excerpt)"
curl -s "http://127.0.0.1:$MPORT/metrics" 2>/dev/null | grep -E '^tandem_relay_(sessions_started_total|forwarded_bytes_total|sessions_ended_total)' | sed 's/^/    /' || true

step "done: the session was end-to-end encrypted, keyed by the code; the relay only forwarded it"
