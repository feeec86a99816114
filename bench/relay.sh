#!/usr/bin/env bash
# End-to-end relay benchmark: Postfix's smtp-source → server → smtp-sink (through a "*" route /
# relayhost), Postfix and tern in the same run, with a new connection per message and with -d.
# Not a test: it measures.
#
#   bash bench/relay.sh                        # both servers, both modes
#   ONLY=postfix bash bench/relay.sh           # or ONLY=tern
#   ONLY=all bash bench/relay.sh               # also tern with delivery off (accept only), same run
#   MESSAGES=20000 SESSIONS=20 SIZE=5000 TERN_BIN=target/release/tern bash bench/relay.sh
#   TERN_DELIVERY='max_connections = 20' bash bench/relay.sh   # extra [delivery] keys for tern
#   KEEP_WORK=1 bash bench/relay.sh            # keep the temp dir (configs, logs, samples)
#
# Accept time: smtp-source's wall time (every message answered 250). End-to-end time: from the
# start of smtp-source until the server's queue is empty (tern: /health "queued" == 0; Postfix:
# no file left in its queue directories) AND the smtp-sink (run with -c, a fresh one per run) has
# counted every message. Results go to stdout and bench-out/relay-*.tsv; with KEEP_WORK=1 the
# per-second samples (sink count, /health) are in the work dir (samples-*.log).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/bench/lib.sh"

MESSAGES=${MESSAGES:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-5000}
ONLY=${ONLY:-both}
MODES=${MODES:-new -d}
SETTLE=${SETTLE:-10}
TIMEOUT=${TIMEOUT:-900}
SENDER=${SENDER:-bench@client.bench.test}
# Both servers relay every domain to the sink (Postfix: relayhost; tern: a "*" route), so no DNS.
RCPT=${RCPT:-sink@relay.bench.test}
TERN_DELIVERY=${TERN_DELIVERY:-}

bench_init relay "$(printf 'server\tmode\tmessages\tsessions\tsize\taccept_s\taccept_msg_s\tend_to_end_s\tend_to_end_msg_s')" smtp-source smtp-sink postfix python3

declare -A ACC E2E

run_source() { smtp_source "$1" "$2" "$3" "$RCPT"; } # label mode port → T0 T1

settle() { sync; sleep "$SETTLE"; }

result() { # server mode t0 t1 t2
  local acc e2e
  acc=$(rate "$MESSAGES" "$3" "$4")
  e2e=$(rate "$MESSAGES" "$3" "$5")
  ACC[$1$2]=$acc E2E[$1$2]=$e2e
  log "$1 ($2): accepted $MESSAGES in $(elapsed "$3" "$4") s = $acc msg/s; end-to-end $(elapsed "$3" "$5") s = $e2e msg/s"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$MESSAGES" "$SESSIONS" "$SIZE" \
    "$(elapsed "$3" "$4")" "$acc" "$(elapsed "$3" "$5")" "$e2e" >>"$RESULTS"
}

# A fresh smtp-sink and a fresh Postfix instance per mode.
bench_postfix() {
  local mode label sink port dir t2 waiter
  for mode in $MODES; do
    label="postfix${mode/-d/-reuse}"
    dir="$WORK/$label"
    mkdir -p "$dir"
    sink=$(free_port)
    start_counting_sink "$sink" "$dir/sink.log"
    port=$(free_port)
    start_postfix "$dir" "$port" "$sink"
    log "postfix: config $POSTFIX_CONF, smtpd 127.0.0.1:$port → smtp-sink 127.0.0.1:$sink"
    settle
    python3 "$REPO/bench/drain_wait.py" --sink-log "$dir/sink.log" --count "$MESSAGES" \
      --postfix-queue "$dir/spool" --timeout "$TIMEOUT" --samples "$WORK/samples-$label.log" \
      >"$dir/drained" &
    waiter=$!
    run_source "$label" "$mode" "$port"
    wait "$waiter" || die "$label: not drained after $TIMEOUT s"
    t2=$(cat "$dir/drained")
    result postfix "$mode" "$T0" "$T1" "$t2"
    log "postfix maillog: $(grep -c 'status=sent' "$dir/maillog" || true) sent, $(grep -c 'status=deferred' "$dir/maillog" || true) deferred"
    postfix -c "$POSTFIX_CONF" stop >/dev/null 2>&1 || true
    stop_pid "$SINK_PID"
  done
}

bench_tern() {
  local bin mode label sink port http dir t2 waiter
  bin=$(tern_bin)
  for mode in $MODES; do
    label="tern${mode/-d/-reuse}"
    dir="$WORK/$label"
    mkdir -p "$dir"
    sink=$(free_port)
    start_counting_sink "$sink" "$dir/sink.log"
    port=$(free_port)
    http=$(free_port)
    # All sessions come from 127.0.0.1: allow them all. Everything goes to the sink.
    start_tern "$bin" "$dir" "$port" "$http" "max_connections_per_ip = 10000

[[routes]]
domain = \"*\"
relay = \"127.0.0.1:$sink\"
tls = \"none\"

[delivery]
enabled = true
$TERN_DELIVERY"
    log "tern: config $dir/tern.toml, smtp 127.0.0.1:$port → smtp-sink 127.0.0.1:$sink"
    settle
    kill -0 "$TERN_PID" 2>/dev/null || { tail -20 "$dir/stderr.log" >&2; die "tern exited before the run"; }
    # The waiter starts before smtp-source, so its per-second samples cover the whole run.
    python3 "$REPO/bench/drain_wait.py" --sink-log "$dir/sink.log" --count "$MESSAGES" \
      --tern-http "$http" --timeout "$TIMEOUT" --samples "$WORK/samples-$label.log" \
      >"$dir/drained" &
    waiter=$!
    run_source "$label" "$mode" "$port"
    wait "$waiter" || die "$label: not drained after $TIMEOUT s"
    t2=$(cat "$dir/drained")
    result tern "$mode" "$T0" "$T1" "$t2"
    log "tern /health after the run: $(health_json "$http")"
    log "tern CPU: $(cpu_seconds "$TERN_PID") s = $(awk -v c="$(cpu_seconds "$TERN_PID")" -v n="$MESSAGES" 'BEGIN { printf "%.0f", c * 1e6 / n }') µs/msg (since start); smtp-sink CPU $(cpu_seconds "$SINK_PID") s"
    stop_pid "$TERN_PID"
    stop_pid "$SINK_PID"
  done
}

log "machine: $(nproc) cores, $(free -h | awk '/^Mem:/ {print $2}') RAM; load $(cut -d' ' -f1-3 /proc/loadavg); work dir $WORK"
# tern-hold: tern with [delivery] enabled = false, accept only (as bench/accept.sh), to see in
# the same run what delivering at the same time costs the accept rate.
bench_tern_hold() {
  local bin mode label port http dir
  bin=$(tern_bin)
  for mode in $MODES; do
    label="tern-hold${mode/-d/-reuse}"
    dir="$WORK/$label"
    port=$(free_port)
    http=$(free_port)
    start_tern "$bin" "$dir" "$port" "$http" "max_connections_per_ip = 10000

[delivery]
enabled = false"
    settle
    run_source "$label" "$mode" "$port"
    ACC[tern-hold$mode]=$(rate "$MESSAGES" "$T0" "$T1")
    log "tern, delivery off ($mode): accepted $MESSAGES in $(elapsed "$T0" "$T1") s = ${ACC[tern-hold$mode]} msg/s"
    log "tern CPU: $(cpu_seconds "$TERN_PID") s = $(awk -v c="$(cpu_seconds "$TERN_PID")" -v n="$MESSAGES" 'BEGIN { printf "%.0f", c * 1e6 / n }') µs/msg (since start)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t\t\n' tern-hold "$mode" "$MESSAGES" "$SESSIONS" "$SIZE" \
      "$(elapsed "$T0" "$T1")" "${ACC[tern-hold$mode]}" >>"$RESULTS"
    stop_pid "$TERN_PID"
  done
}

case "$ONLY" in
  postfix) bench_postfix ;;
  tern) bench_tern ;;
  tern-hold) bench_tern_hold ;;
  both) bench_postfix; bench_tern ;;
  all) bench_postfix; bench_tern; bench_tern_hold ;;
  *) die "ONLY must be postfix, tern, tern-hold, both or all" ;;
esac

echo
printf '%-9s %-20s %14s %18s\n' server mode "accept msg/s" "end-to-end msg/s"
for server in postfix tern tern-hold; do
  for mode in $MODES; do
    [ -n "${ACC[$server$mode]:-}" ] || continue
    desc="new connection/msg"
    [ "$mode" = "-d" ] && desc="reuse (-d)"
    printf '%-9s %-20s %14s %18s\n' "$server" "$desc" "${ACC[$server$mode]}" "${E2E[$server$mode]:--}"
  done
done
for mode in $MODES; do
  if [ -n "${ACC[tern$mode]:-}" ] && [ -n "${ACC[postfix$mode]:-}" ]; then
    printf 'ratio tern/postfix (%s): accept %s, end-to-end %s\n' "$mode" \
      "$(awk -v a="${ACC[tern$mode]}" -v b="${ACC[postfix$mode]}" 'BEGIN { printf "%.2f", a / b }')" \
      "$(awk -v a="${E2E[tern$mode]}" -v b="${E2E[postfix$mode]}" 'BEGIN { printf "%.2f", a / b }')"
  fi
done
log "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
log "results: $RESULTS"
