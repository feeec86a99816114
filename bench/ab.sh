#!/usr/bin/env bash
# A/B of two tern builds on the accept path (or, with RELAY=1, end to end): alternating runs, a
# fresh server and data dir per run, smtp-source as in bench/accept.sh; prints each run and the
# medians of the rate and of tern's CPU (user + system) per message. Not a test: it measures.
# How the per-change figures in docs/benchmarks.md (sessions 5 to 8) were taken.
#
#   bash bench/ab.sh BIN_A BIN_B                  # 5 rounds, a new connection per message
#   ROUNDS=3 MODE=-d bash bench/ab.sh BIN_A BIN_B # connection reuse
#   EXTRA_A='workers = 1' bash bench/ab.sh BIN BIN  # one build, two [smtp] settings
#   RELAY=1 ROUNDS=2 bash bench/ab.sh BIN_A BIN_B   # end to end: tern delivers to smtp-sink
#                                                  # (a `*` route); the rate counts until the
#                                                  # sink has every message and the queue is empty
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/bench/lib.sh"

[ $# -eq 2 ] || die "usage: bench/ab.sh BIN_A BIN_B"
BIN_A=$1 BIN_B=$2
ROUNDS=${ROUNDS:-5}
MODE=${MODE:-new}
MESSAGES=${MESSAGES:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-5000}
SETTLE=${SETTLE:-2}
SENDER=${SENDER:-bench@client.bench.test}
RELAY=${RELAY:-}
RCPT='sink@[127.0.0.1]'

bench_init ab "$(printf 'round\tbuild\tmsg_s\tus_per_msg')" smtp-source smtp-sink python3

one_run() { # LABEL BIN EXTRA → appends a line to $RESULTS
  local label=$1 bin=$2 extra=$3 port http dir c0 c1 sink waiter end delivery
  port=$(free_port) http=$(free_port) dir="$WORK/$label-$round"
  delivery="[delivery]
enabled = false"
  if [ -n "$RELAY" ]; then
    sink=$(free_port)
    mkdir -p "$dir"
    start_counting_sink "$sink" "$dir/sink.log"
    delivery="[delivery]
enabled = true
[[routes]]
domain = \"*\"
relay = \"127.0.0.1:$sink\"
tls = \"none\""
  fi
  start_tern "$bin" "$dir" "$port" "$http" "max_connections_per_ip = 10000
$extra
$delivery"
  sync
  sleep "$SETTLE"
  if [ -n "$RELAY" ]; then
    python3 "$REPO/bench/drain_wait.py" --sink-log "$dir/sink.log" --count "$MESSAGES" \
      --tern-http "$http" --timeout 600 >"$dir/drained" &
    waiter=$!
  fi
  c0=$(cpu_seconds "$TERN_PID")
  smtp_source "$label-$round" "$MODE" "$port" "$RCPT"
  end=$T1
  if [ -n "$RELAY" ]; then
    wait "$waiter" || die "$label-$round: not delivered within 600 s"
    end=$(cat "$dir/drained")
  fi
  c1=$(cpu_seconds "$TERN_PID")
  stop_pid "$TERN_PID"
  [ -z "$RELAY" ] || stop_pid "$SINK_PID"
  rm -rf "$dir/data"
  local r us
  r=$(rate "$MESSAGES" "$T0" "$end")
  us=$(awk -v a="$c0" -v b="$c1" -v n="$MESSAGES" 'BEGIN { printf "%.0f", (b - a) * 1e6 / n }')
  printf '%s\t%s\t%s\t%s\n' "$round" "$label" "$r" "$us" >>"$RESULTS"
  log "round $round $label: $r msg/s, tern $us µs/msg"
}

for ((round = 1; round <= ROUNDS; round++)); do
  one_run A "$BIN_A" "${EXTRA_A:-}"
  one_run B "$BIN_B" "${EXTRA_B:-}"
done

python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
for b in ("A", "B"):
    rates = [float(r[2]) for r in rows if r[1] == b]
    us = [float(r[3]) for r in rows if r[1] == b]
    print(f"{b}: median {statistics.median(rates):.0f} msg/s (runs {', '.join(f'{x:.0f}' for x in rates)}), "
          f"tern {statistics.median(us):.0f} µs/msg")
PY
log "results: $RESULTS"
