#!/usr/bin/env bash
# Cost of the validation stage: tern's accept rate with the policy checks on (default rules) and
# off, in the same run, with and without connection reuse. Not a test: it measures.
#
#   bash bench/policy.sh
#   MESSAGES=20000 SESSIONS=20 SIZE=5000 TERN_BIN=target/release/tern bash bench/policy.sh
#   ROUNDS=2 bash bench/policy.sh      # off/on pairs per mode (order alternates: off on, on off)
#
# smtp-source connects from 127.0.0.1, which `relay.networks` trusts by default, and trusted
# clients skip the checks aimed at strangers. Here `relay.networks` is empty, so the client is a
# stranger sending to a domain we serve (`relay.domains`), the way an MX meets the internet:
# every connection is rate-checked, every HELO checked, every sender SPF-checked, every message
# DKIM/ARC/DMARC-checked and scored by the built-in content rules (and gets Authentication-Results
# and X-Tern-Score). A loopback name server (crates/tern-dns/examples/bench_dns.rs) answers with
# the records of a plausible sender domain: SPF that passes, a DMARC record with p=none; the
# resolver's TTL cache answers after the first message, as it would for a busy sender. The
# connection rate is raised so the
# bucket is consulted but never trips (the default 60/min would throttle a single-address
# benchmark by design). Delivery is off, as in bench/accept.sh.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/bench/lib.sh"

MESSAGES=${MESSAGES:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-5000}
MODES=${MODES:-new -d}
ROUNDS=${ROUNDS:-1}
SETTLE=${SETTLE:-10}
SENDER=${SENDER:-bench@client.bench.test}
RCPT=${RCPT:-sink@mx.bench.test}

bench_init policy "$(printf 'policy\tmode\tround\tmessages\tsessions\tsize\taccept_s\taccept_msg_s')" smtp-source python3

# run_one on|off MODE ROUND: one fresh tern, one smtp-source run; sets ACC (msg/s).
run_one() {
  local policy=$1 mode=$2 round=$3 bin port http dir label acc enabled
  bin=$(tern_bin)
  port=$(free_port)
  http=$(free_port)
  label="policy-$policy${mode/-d/-reuse}-$round"
  dir="$WORK/$label"
  enabled=true
  [ "$policy" = off ] && enabled=false
  start_tern "$bin" "$dir" "$port" "$http" "max_connections_per_ip = 10000

[relay]
networks = []
domains = [\"mx.bench.test\"]

[delivery]
enabled = false

[dns]
nameservers = [\"$DNS_ADDR\"]

[policy]
enabled = $enabled
connect_rate = \"1000000/s\""
  sync
  sleep "$SETTLE"
  smtp_source "$label" "$mode" "$port" "$RCPT"
  acc=$(rate "$MESSAGES" "$T0" "$T1")
  log "policy $policy ($mode, round $round): $acc msg/s"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$policy" "$mode" "$round" "$MESSAGES" "$SESSIONS" \
    "$SIZE" "$(elapsed "$T0" "$T1")" "$acc" >>"$RESULTS"
  stop_pid "$TERN_PID"
  ACC=$acc
}

log "cargo build --release -p tern-dns --features test-server --example bench_dns"
(cd "$REPO" && cargo build --release -p tern-dns --features test-server --example bench_dns >&2) \
  || die "bench_dns build failed"
"$REPO/target/release/examples/bench_dns" \
  "TXT=client.bench.test=v=spf1 ip4:127.0.0.0/8 -all" \
  "TXT=_dmarc.client.bench.test=v=DMARC1; p=none" >"$WORK/dns.addr" &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$WORK/dns.addr" ] && break; sleep 0.1; done
DNS_ADDR=$(head -1 "$WORK/dns.addr")
[ -n "$DNS_ADDR" ] || die "bench_dns did not start"
log "loopback DNS on $DNS_ADDR"

log "machine: $(nproc) cores, $(free -h | awk '/^Mem:/ {print $2}') RAM; work dir $WORK"
declare -A SUM
for mode in $MODES; do
  for round in $(seq 1 "$ROUNDS"); do
    order="off on"
    [ $((round % 2)) -eq 0 ] && order="on off"
    for policy in $order; do
      run_one "$policy" "$mode" "$round"
      SUM[$policy$mode]=$(awk -v a="${SUM[$policy$mode]:-0}" -v b="$ACC" 'BEGIN { print a + b }')
    done
  done
done

echo
printf '%-22s %12s %12s %8s\n' mode "off msg/s" "on msg/s" "on/off"
for mode in $MODES; do
  off=$(awk -v s="${SUM[off$mode]}" -v n="$ROUNDS" 'BEGIN { printf "%.1f", s / n }')
  on=$(awk -v s="${SUM[on$mode]}" -v n="$ROUNDS" 'BEGIN { printf "%.1f", s / n }')
  desc="new connection/msg"
  [ "$mode" = "-d" ] && desc="reuse (-d)"
  printf '%-22s %12s %12s %8s\n' "$desc" "$off" "$on" "$(awk -v a="$on" -v b="$off" 'BEGIN { printf "%.3f", a / b }')"
done
echo "results: $RESULTS"
