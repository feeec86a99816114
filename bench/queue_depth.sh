#!/usr/bin/env bash
# Deep-queue benchmark for tern (not a test: it measures).
#
# (a) Accept rate with FILL (1,000,000) messages already queued vs with an empty queue, same run:
#     tern with `[delivery] enabled = false` (so everything stays queued), the accept rate of
#     smtp-source -s 20 -l 5000 -m 20000 (with and without -d) against a fresh empty data dir,
#     then FILL × 1 KB messages are spooled into another data dir (smtp-source -d -s 50), the
#     same measurement is repeated against it, and once more against a fresh empty dir (control
#     for the machine's drift).
# (b) Restart with the deep queue: SIGTERM, then start tern on the same data dir with delivery
#     enabled and a "*" route to a counting smtp-sink; measures the time from process start to
#     /health answering and to the first message arriving at the sink, then the delivery rate
#     over DRAIN_SECS.
#
#   bash bench/queue_depth.sh
#   FILL=1000000 FILL_SIZE=1000 FILL_SESSIONS=50 MESSAGES=20000 SIZE=5000 SESSIONS=20 \
#     DRAIN_SECS=30 TERN_BIN=target/release/tern bash bench/queue_depth.sh
#   KEEP_WORK=1 bash bench/queue_depth.sh     # keep the temp dir (several GB with FILL=1M)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/bench/lib.sh"

FILL=${FILL:-1000000}
FILL_SIZE=${FILL_SIZE:-1000}
FILL_SESSIONS=${FILL_SESSIONS:-50}
MESSAGES=${MESSAGES:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-5000}
MODES=${MODES:-new -d}
SETTLE=${SETTLE:-10}
DRAIN_SECS=${DRAIN_SECS:-30}
SENDER=${SENDER:-bench@client.bench.test}
RCPT=${RCPT:-sink@relay.bench.test}

bench_init queue_depth "$(printf 'what\tmode\tvalue\tunit')" smtp-source smtp-sink python3
rec() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; log "$1 ($2): $3 $4"; }

BIN=$(tern_bin)
HOLD_TOML="max_connections_per_ip = 10000

[delivery]
enabled = false"

# measure LABEL PORT: the accept rate of each mode; sets RATE[LABEL MODE].
declare -A RATE
measure() {
  local label=$1 port=$2 mode
  for mode in $MODES; do
    sync
    sleep "$SETTLE"
    kill -0 "$TERN_PID" 2>/dev/null || die "tern exited before the run"
    smtp_source "$label$mode" "$mode" "$port" "$RCPT"
    RATE[$label$mode]=$(rate "$MESSAGES" "$T0" "$T1")
    rec "accept $label" "$mode" "${RATE[$label$mode]}" msg/s
  done
}

# stop_long PID SECONDS: SIGTERM, wait; SIGKILL after SECONDS. Prints the seconds it took.
stop_long() {
  local pid=$1 secs=$2 t0 i
  t0=$(now)
  kill -TERM "$pid"
  for ((i = 0; i < secs * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "tern did not exit $secs s after SIGTERM: SIGKILL"
    kill -KILL "$pid"
  fi
  wait "$pid" 2>/dev/null || true
  elapsed "$t0" "$(now)"
}

rss() { awk '/^VmRSS/ {printf "%.0f MiB", $2 / 1024}' "/proc/$1/status"; }

log "machine: $(nproc) cores, $(free -h | awk '/^Mem:/ {print $2}') RAM; load $(cut -d' ' -f1-3 /proc/loadavg); work dir $WORK"

# (a) empty queue
dir=$WORK/empty1
port=$(free_port) http=$(free_port)
start_tern "$BIN" "$dir" "$port" "$http" "$HOLD_TOML"
measure empty1 "$port"
stop_pid "$TERN_PID"

# fill
dir=$WORK/deep
port=$(free_port) http=$(free_port)
start_tern "$BIN" "$dir" "$port" "$http" "$HOLD_TOML"
log "fill: smtp-source -d -s $FILL_SESSIONS -l $FILL_SIZE -m $FILL 127.0.0.1:$port"
t0=$(now)
smtp-source -d -s "$FILL_SESSIONS" -l "$FILL_SIZE" -m "$FILL" -f "$SENDER" -t "$RCPT" \
  -M client.bench.test "127.0.0.1:$port" >"$WORK/source-fill.log" 2>&1 ||
  { cat "$WORK/source-fill.log" >&2; die "fill: smtp-source failed"; }
t1=$(now)
rec "fill $FILL x $FILL_SIZE B" -d "$(elapsed "$t0" "$t1")" s
rec "fill rate" -d "$(rate "$FILL" "$t0" "$t1")" msg/s
rec "queued after fill" - "$(health_field "$http" queued)" messages
rec "data dir after fill" - "$(du -sm "$dir/data" | cut -f1)" MiB
rec "tern RSS after fill" - "$(rss "$TERN_PID")" ""
measure deep "$port"
rec "queued after measuring" - "$(health_field "$http" queued)" messages
rec "tern RSS, deep queue" - "$(rss "$TERN_PID")" ""

# (b) restart with the deep queue, delivering to a counting sink
took=$(stop_long "$TERN_PID" 300)
rec "SIGTERM to exit, deep queue" - "$took" s
sink=$(free_port)
start_counting_sink "$sink" "$WORK/sink.log"
cat >"$dir/tern.toml" <<EOT
[server]
hostname = "tern.bench.test"
data_dir = "$dir/data"

[smtp]
listen = ["127.0.0.1:$port"]
submission_listen = ["127.0.0.1:$(free_port)"]
submissions_listen = []
max_connections_per_ip = 10000

[[routes]]
domain = "*"
relay = "127.0.0.1:$sink"
tls = "none"

[delivery]
enabled = true

[http]
listen = "127.0.0.1:$http"
EOT
sync
sleep "$SETTLE"
t0=$(now)
"$BIN" serve --config "$dir/tern.toml" >"$dir/stderr-restart.log" 2>&1 &
TERN_PID=$!
PIDS+=("$TERN_PID")
python3 "$REPO/bench/drain_wait.py" --first --sink-log "$WORK/sink.log" --count 1 --timeout 600 \
  >"$WORK/first.txt" &
first_pid=$!
for ((i = 0; i < 6000; i++)); do
  health_json "$http" >/dev/null 2>&1 && break
  kill -0 "$TERN_PID" 2>/dev/null || { tail -30 "$dir/stderr-restart.log" >&2; die "tern exited during restart"; }
  sleep 0.05
done
t_health=$(now)
wait "$first_pid" || die "no message reached the sink within 600 s"
t_first=$(cat "$WORK/first.txt")
rec "restart: start to /health answering" - "$(elapsed "$t0" "$t_health")" s
rec "restart: start to first message at the sink" - "$(elapsed "$t0" "$t_first")" s
log "/health after restart: $(health_json "$http")"
d0=$(sink_count "$WORK/sink.log")
ts=$(now)
sleep "$DRAIN_SECS"
d1=$(sink_count "$WORK/sink.log")
te=$(now)
rec "delivery rate from the deep queue over ${DRAIN_SECS} s" - "$(rate "$((d1 - d0))" "$ts" "$te")" msg/s
log "/health after ${DRAIN_SECS} s: $(health_json "$http")"
rec "tern RSS delivering" - "$(rss "$TERN_PID")" ""
took=$(stop_long "$TERN_PID" 300)
rec "SIGTERM to exit while delivering" - "$took" s
stop_pid "$SINK_PID"
log "removing the deep spool ($(du -sh "$dir/data" | cut -f1)); logs stay in $dir"
rm -rf "$dir/data"

# control: a fresh empty queue again
dir=$WORK/empty2
port=$(free_port) http=$(free_port)
start_tern "$BIN" "$dir" "$port" "$http" "$HOLD_TOML"
measure empty2 "$port"
stop_pid "$TERN_PID"

echo
for mode in $MODES; do
  desc="new connection/msg"
  [ "$mode" = "-d" ] && desc="reuse (-d)"
  printf '%-20s empty %9s  deep %9s  empty again %9s  deep/empty %s\n' "$desc" \
    "${RATE[empty1$mode]}" "${RATE[deep$mode]}" "${RATE[empty2$mode]}" \
    "$(awk -v d="${RATE[deep$mode]}" -v a="${RATE[empty1$mode]}" -v b="${RATE[empty2$mode]}" \
      'BEGIN { printf "%.2f", d / ((a + b) / 2) }')"
done
log "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
log "results: $RESULTS"
