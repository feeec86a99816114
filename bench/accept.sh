#!/usr/bin/env bash
# Accept-rate benchmark: Postfix's smtp-source against a private Postfix instance and against
# tern, in the same run, with and without connection reuse (-d). Not a test: it measures.
#
#   bash bench/accept.sh                       # both servers, both modes
#   ONLY=postfix bash bench/accept.sh          # or ONLY=tern; ONLY=ceiling for the harness limit
#   MESSAGES=20000 SESSIONS=20 SIZE=5000 bash bench/accept.sh
#   TERN_BIN=target/release/tern bash bench/accept.sh   # skip the release build
#   KEEP_WORK=1 bash bench/accept.sh           # keep the temp dir (configs, logs, maillog)
#
# "Accept" is the time smtp-source needs to have every message answered with 250 (the server
# has taken responsibility for it). For Postfix, which relays to an smtp-sink, the time until its
# queue is empty again is reported too (end-to-end). tern runs with `[delivery] enabled = false`:
# accept only, its queue just fills (bench/relay.sh is the end-to-end benchmark for both).
# Results go to stdout and bench-out/.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/bench/lib.sh"

MESSAGES=${MESSAGES:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-5000}
ONLY=${ONLY:-both}
# Order of the two modes ("new" = a connection per message, "-d" = reuse).
MODES=${MODES:-new -d}
SETTLE=${SETTLE:-10}
SENDER=${SENDER:-bench@client.bench.test}
# Postfix relays everything to its relayhost, so any domain works; tern's delivery may look the
# domain up, so by default it gets an address literal on loopback (no DNS, nothing leaves the
# machine).
POSTFIX_RCPT=${POSTFIX_RCPT:-sink@relay.bench.test}
TERN_RCPT=${TERN_RCPT:-sink@[127.0.0.1]}

bench_init accept "$(printf 'server\tmode\tmessages\tsessions\tsize\taccept_s\taccept_msg_s\tdrain_s\tend_to_end_msg_s')" smtp-source smtp-sink postfix python3

declare -A RATE

# run_source LABEL MODE PORT RCPT [PID LOG]: runs smtp-source; sets T0 and T1 (start and end
# times). With PID, first checks that the server is still running (LOG: its stderr to show).
run_source() {
  local label=$1 mode=$2 port=$3 rcpt=$4 pid=${5:-} serverlog=${6:-}
  # Let the previous run's disk writeback finish first: without this, whichever run came second
  # was up to 40% slower.
  sync
  sleep "$SETTLE"
  if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
    [ -n "$serverlog" ] && tail -20 "$serverlog" >&2
    die "$label: the server (pid $pid) exited before the run — killed from outside?"
  fi
  smtp_source "$label" "$mode" "$port" "$rcpt"
}

record() { # server mode accept_s accept_rate drain_s e2e_rate
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$MESSAGES" "$SESSIONS" "$SIZE" "$3" "$4" "$5" "$6" >>"$RESULTS"
}

# Each mode gets a fresh Postfix instance (new queue directory), as tern gets a fresh data dir:
# a second run on the same instance was measurably slower (≈ half the rate) than a first one.
bench_postfix() {
  local sink port dir conf mode label t0 t1 t2 acc drain e2e deferred
  sink=$(free_port)
  start_sink "$sink" "$WORK/sink.log"
  for mode in $MODES; do
    label="postfix${mode/-d/-reuse}"
    port=$(free_port)
    dir="$WORK/$label"
    start_postfix "$dir" "$port" "$sink"
    conf=$POSTFIX_CONF
    log "postfix: config $conf, smtpd 127.0.0.1:$port → smtp-sink 127.0.0.1:$sink"
    run_source "$label" "$mode" "$port" "$POSTFIX_RCPT"
    t0=$T0 t1=$T1
    acc=$(rate "$MESSAGES" "$t0" "$t1")
    drain="" e2e=""
    if wait_postfix_drained "$dir" 600; then
      t2=$(now)
      drain=$(elapsed "$t0" "$t2")
      e2e=$(rate "$MESSAGES" "$t0" "$t2")
    else
      log "postfix queue not drained after 600 s ($(postfix_queue_count "$dir") left)"
    fi
    RATE[postfix$mode]=$acc
    log "postfix ($mode): accepted $MESSAGES in $(elapsed "$t0" "$t1") s = $acc msg/s; drained at ${drain:-?} s = ${e2e:-?} msg/s end-to-end"
    record postfix "$mode" "$(elapsed "$t0" "$t1")" "$acc" "$drain" "$e2e"
    deferred=$(find "$dir/spool/deferred" -type f | wc -l)
    [ "$deferred" -eq 0 ] || log "WARNING: $deferred messages deferred in Postfix (see $dir/maillog)"
    postfix -c "$conf" stop >/dev/null 2>&1 || true
  done
}

bench_tern() {
  local bin port http mode label t0 t1 acc dir queued
  bin=$(tern_bin)
  for mode in $MODES; do
    label="tern${mode/-d/-reuse}"
    port=$(free_port)
    http=$(free_port)
    dir="$WORK/$label"
    # Every smtp-source session comes from 127.0.0.1: allow them all. tern delivers by default
    # now; this benchmark measures accepting only (as before delivery existed), so delivery is
    # off and the accepted messages stay queued. bench/relay.sh measures accept + delivery.
    start_tern "$bin" "$dir" "$port" "$http" "max_connections_per_ip = 10000

[delivery]
enabled = false"
    run_source "$label" "$mode" "$port" "$TERN_RCPT" "$TERN_PID" "$dir/stderr.log"
    t0=$T0 t1=$T1
    acc=$(rate "$MESSAGES" "$t0" "$t1")
    queued=$(health_json "$http" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("queued"))')
    RATE[tern$mode]=$acc
    log "tern ($mode): accepted $MESSAGES in $(elapsed "$t0" "$t1") s = $acc msg/s; /health queued=$queued"
    record tern "$mode" "$(elapsed "$t0" "$t1")" "$acc" "" ""
    stop_pid "$TERN_PID"
  done
}

# The harness's own ceiling: smtp-source straight into smtp-sink (no queue, no disk).
bench_ceiling() {
  local sink mode t0 t1 acc
  sink=$(free_port)
  start_sink "$sink" "$WORK/sink-ceiling.log"
  for mode in $MODES; do
    run_source "ceiling${mode/-d/-reuse}" "$mode" "$sink" "$POSTFIX_RCPT"
    t0=$T0 t1=$T1
    acc=$(rate "$MESSAGES" "$t0" "$t1")
    RATE[ceiling$mode]=$acc
    log "ceiling ($mode): smtp-source → smtp-sink $acc msg/s"
    record smtp-sink "$mode" "$(elapsed "$t0" "$t1")" "$acc" "" ""
  done
}

log "machine: $(nproc) cores, $(free -h | awk '/^Mem:/ {print $2}') RAM; work dir $WORK"
case "$ONLY" in
  postfix) bench_postfix ;;
  tern) bench_tern ;;
  ceiling) bench_ceiling ;;
  both) bench_postfix; bench_tern ;;
  all) bench_ceiling; bench_postfix; bench_tern ;;
  *) die "ONLY must be postfix, tern, ceiling, both or all" ;;
esac

echo
printf '%-10s %-20s %12s\n' server mode "accept msg/s"
for server in ceiling postfix tern; do
  for mode in $MODES; do
    [ -n "${RATE[$server$mode]:-}" ] || continue
    desc="new connection/msg"
    [ "$mode" = "-d" ] && desc="reuse (-d)"
    printf '%-10s %-20s %12s\n' "$server" "$desc" "${RATE[$server$mode]}"
  done
done
for mode in new -d; do
  if [ -n "${RATE[tern$mode]:-}" ] && [ -n "${RATE[postfix$mode]:-}" ]; then
    printf 'ratio tern/postfix (%s): %s\n' "$mode" \
      "$(awk -v a="${RATE[tern$mode]}" -v b="${RATE[postfix$mode]}" 'BEGIN { printf "%.2f", a / b }')"
  fi
done
log "results: $RESULTS"
