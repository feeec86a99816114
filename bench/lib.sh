# Shared helpers for the benchmark scripts (sourced, not run). Everything they start is recorded
# in PIDS / POSTFIX_CONFS and stopped by bench_cleanup, which the scripts run on EXIT.

PIDS=()
POSTFIX_CONFS=()

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

now() { date +%s.%N; }
# rate COUNT START END → messages per second, 1 decimal
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.1f", n / (b - a) }'; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# free_port: a TCP port on 127.0.0.1 nobody listens on, outside the ephemeral range.
free_port() {
  python3 - <<'PY'
import random, socket
for _ in range(1000):
    p = random.randint(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    print(p)
    break
PY
}

# wait_port PORT [SECONDS]: until something accepts on 127.0.0.1:PORT.
wait_port() {
  local port=$1 secs=${2:-30} i
  for ((i = 0; i < secs * 10; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

# wait_health HTTP_PORT [SECONDS]: until tern's /health answers 200.
wait_health() {
  local port=$1 secs=${2:-60} i
  for ((i = 0; i < secs * 10; i++)); do
    if health_json "$port" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  return 1
}

health_json() {
  python3 - "$1" <<'PY'
import json, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2) as r:
    assert r.status == 200
    print(json.dumps(json.load(r)))
PY
}

# stop_pid PID: SIGTERM, wait up to 20 s, then SIGKILL.
stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 200; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

bench_cleanup() {
  local conf pid
  for conf in "${POSTFIX_CONFS[@]}"; do
    if postfix -c "$conf" status >/dev/null 2>&1; then
      postfix -c "$conf" stop >/dev/null 2>&1 || true
      sleep 1
      postfix -c "$conf" status >/dev/null 2>&1 && postfix -c "$conf" abort >/dev/null 2>&1
    fi
  done
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
    if [ -n "${KEEP_WORK:-}" ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
  fi
  return 0
}

# start_sink PORT LOGFILE: Postfix's smtp-sink, the delivery target that lets Postfix's queue
# drain. It must drop root (-u).
start_sink() {
  local port=$1 logf=$2
  smtp-sink -u postfix 127.0.0.1:"$port" 1000 >"$logf" 2>&1 &
  PIDS+=($!)
  wait_port "$port" 10 || die "smtp-sink did not listen on $port"
}

# start_postfix DIR SMTPD_PORT SINK_PORT: a private Postfix instance (own config, queue and data
# directories under DIR) that accepts from 127.0.0.0/8 on SMTPD_PORT and relays everything to
# [127.0.0.1]:SINK_PORT. No DNS, no local delivery, no chroot. Sets POSTFIX_CONF.
start_postfix() {
  local dir=$1 port=$2 sink=$3
  local conf=$dir/etc queue=$dir/spool data=$dir/lib
  mkdir -p "$conf" "$queue" "$data"
  chown postfix "$data"
  cp /etc/postfix/master.cf "$conf/master.cf"
  cp /etc/postfix/dynamicmaps.cf "$conf/" 2>/dev/null || true
  [ -d /etc/postfix/dynamicmaps.cf.d ] && cp -r /etc/postfix/dynamicmaps.cf.d "$conf/"
  cat >"$conf/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $queue
data_directory = $data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = \$myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
relay_domains =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:$sink
disable_dns_lookups = yes
smtp_host_lookup = native
smtpd_peername_lookup = no
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file_prefixes = $dir
maillog_file = $dir/maillog
biff = no
EOF
  # The smtpd listener on our port instead of :25; no service chrooted (the chroot would need
  # copies of /etc files inside this queue directory).
  sed -i "s/^smtp      inet .*/127.0.0.1:$port inet n - n - - smtpd/" "$conf/master.cf"
  postconf -c "$conf" -F '*/*/chroot = n' >/dev/null
  postfix -c "$conf" check >"$dir/check.log" 2>&1 || { cat "$dir/check.log" >&2; die "postfix check failed"; }
  POSTFIX_CONFS+=("$conf")
  postfix -c "$conf" start >"$dir/start.log" 2>&1 || { cat "$dir/start.log" "$dir/maillog" >&2 || true; die "postfix start failed"; }
  wait_port "$port" 30 || { cat "$dir/maillog" >&2 || true; die "postfix smtpd not listening on $port"; }
  POSTFIX_CONF=$conf
}

# postfix_queue_count DIR: messages still in the instance's queue.
postfix_queue_count() {
  local q=$1/spool
  find "$q/maildrop" "$q/incoming" "$q/active" "$q/deferred" "$q/hold" -type f 2>/dev/null | wc -l
}

# wait_postfix_drained DIR SECONDS: until the queue is empty; returns 1 on timeout.
wait_postfix_drained() {
  local dir=$1 secs=$2 i
  for ((i = 0; i < secs * 10; i++)); do
    [ "$(postfix_queue_count "$dir")" -eq 0 ] && return 0
    sleep 0.1
  done
  return 1
}

# tern_bin: $TERN_BIN, else a release build (built now).
tern_bin() {
  if [ -n "${TERN_BIN:-}" ]; then echo "$TERN_BIN"; return; fi
  log "cargo build --release -p tern"
  (cd "$REPO" && cargo build --release -p tern >&2) || die "release build failed"
  echo "$REPO/target/release/tern"
}

# start_tern BIN DIR SMTP_PORT HTTP_PORT [EXTRA_TOML]: tern with a fresh data dir under DIR.
# Sets TERN_PID.
start_tern() {
  local bin=$1 dir=$2 port=$3 http=$4 extra=${5:-}
  local sub
  sub=$(free_port)
  mkdir -p "$dir"
  cat >"$dir/tern.toml" <<EOF
[server]
hostname = "tern.bench.test"
data_dir = "$dir/data"

[smtp]
listen = ["127.0.0.1:$port"]
submission_listen = ["127.0.0.1:$sub"]
submissions_listen = []
$extra

[http]
listen = "127.0.0.1:$http"
EOF
  "$bin" serve --config "$dir/tern.toml" >"$dir/stderr.log" 2>&1 &
  TERN_PID=$!
  PIDS+=("$TERN_PID")
  wait_health "$http" 60 || { tail -50 "$dir/stderr.log" >&2; die "tern not healthy on :$http"; }
}

# start_counting_sink PORT LOGFILE: smtp-sink with -c, so LOGFILE carries its running message
# counter (read with sink_count, or bench/drain_wait.py). Sets SINK_PID.
start_counting_sink() {
  local port=$1 logf=$2
  smtp-sink -c -u postfix 127.0.0.1:"$port" 1000 >"$logf" 2>&1 &
  SINK_PID=$!
  PIDS+=("$SINK_PID")
  wait_port "$port" 10 || die "smtp-sink did not listen on $port"
}

# sink_count LOGFILE: messages a start_counting_sink sink has received so far.
sink_count() {
  tail -c 256 "$1" 2>/dev/null | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1 | cut -d= -f2 || true
}

# health_field HTTP_PORT FIELD: one field of tern's /health JSON.
health_field() {
  health_json "$1" | python3 -c "import json,sys; print(json.load(sys.stdin).get('$2'))"
}

# cpu_seconds PID: user + system CPU time the process has used so far, in seconds.
cpu_seconds() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat"
}

# smtp_source LABEL MODE PORT RCPT: one smtp-source run ($SESSIONS sessions, $MESSAGES messages
# of $SIZE bytes from $SENDER; MODE "-d" reuses connections) against 127.0.0.1:PORT; sets T0 and
# T1 (start and end times); its output goes to $WORK/source-LABEL.log.
smtp_source() {
  local label=$1 mode=$2 port=$3 rcpt=$4 flags=()
  [ "$mode" = "-d" ] && flags+=(-d)
  log "$label: smtp-source -s $SESSIONS -l $SIZE -m $MESSAGES ${flags[*]} 127.0.0.1:$port"
  T0=$(now)
  smtp-source -s "$SESSIONS" -l "$SIZE" -m "$MESSAGES" "${flags[@]}" \
    -f "$SENDER" -t "$rcpt" -M client.bench.test "127.0.0.1:$port" \
    >"$WORK/source-$label.log" 2>&1 || { cat "$WORK/source-$label.log" >&2; die "$label: smtp-source failed"; }
  T1=$(now)
}

# bench_init NAME HEADER TOOL...: checks the tools, raises the file limit, makes the work dir
# (removed on exit unless KEEP_WORK=1) and the results file bench-out/NAME-<time>.tsv with its
# tab-separated HEADER line. Sets WORK and RESULTS.
bench_init() {
  local name=$1 header=$2 tool
  shift 2
  for tool in "$@"; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install postfix python3)"
  done
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  WORK=$(mktemp -d /tmp/tern-bench.XXXXXX)
  chmod 755 "$WORK"
  trap bench_cleanup EXIT
  mkdir -p "$REPO/bench-out"
  RESULTS="$REPO/bench-out/$name-$(date +%Y%m%d-%H%M%S).tsv"
  printf '%s\n' "$header" >"$RESULTS"
}
