#!/usr/bin/env bash
# Idle-session benchmark: 10,000 concurrent idle SMTP sessions (greeting read, EHLO done) held
# open against tern; reports tern's VmRSS before, with the sessions, and after holding them.
# Not a test: it measures.
#
#   bash bench/idle.sh
#   SESSIONS=10000 HOLD=10 SOURCES=4 TERN_BIN=target/release/tern bash bench/idle.sh
#
# SOURCES spreads the client side over 127.0.0.1..127.0.0.N (each source address has its own
# ~28k ephemeral ports; one is enough for 10,000).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/bench/lib.sh"

SESSIONS=${SESSIONS:-10000}
HOLD=${HOLD:-10}
SOURCES=${SOURCES:-1}

command -v python3 >/dev/null || die "python3 not found"
# Both tern and the client process need SESSIONS descriptors (plus some).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -gt $((SESSIONS + 200)) ] || die "ulimit -n is $(ulimit -n): too low for $SESSIONS sessions"

WORK=$(mktemp -d /tmp/tern-idle.XXXXXX)
trap bench_cleanup EXIT
OUT="$REPO/bench-out"
mkdir -p "$OUT"

bin=$(tern_bin)
port=$(free_port)
http=$(free_port)
# The limits must admit every session: they are what is measured, not what is refused.
start_tern "$bin" "$WORK/tern" "$port" "$http" "max_connections = $((SESSIONS * 2))
max_connections_per_ip = $((SESSIONS * 2))"
log "tern pid $TERN_PID on 127.0.0.1:$port; opening $SESSIONS idle sessions (hold ${HOLD}s)"

# JSON on stdout (kept in bench-out/), a readable summary on stderr.
result=$(python3 "$REPO/bench/idle_clients.py" --port "$port" --pid "$TERN_PID" \
  --sessions "$SESSIONS" --sources "$SOURCES" --hold "$HOLD")
echo "$result" | tee "$OUT/idle-$(date +%Y%m%d-%H%M%S).json"
stop_pid "$TERN_PID"
