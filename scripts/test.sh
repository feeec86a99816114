#!/usr/bin/env bash
# The project's test command. On a fresh Debian machine (as root) it installs what the suite
# needs, builds the workspace and runs every test: the Rust unit and end-to-end tests (which
# drive the real `tern` binary over real sockets, with lettre and swaks as clients) and the
# Python smtplib suite. Exits non-zero on any failure.
#
#   bash scripts/test.sh            # everything
#   TEST_THREADS=4 bash scripts/test.sh
set -euo pipefail

cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
# Postfix puts smtp-source/smtp-sink in /usr/sbin, which a non-login CI shell may not have on
# its PATH; the tests call them by name.
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf '\n== %s\n' "$*"; }
start=$(date +%s)

# --- system packages -------------------------------------------------------------------------
# swaks: a real SMTP client for the swaks tests; postfix: smtp-source/smtp-sink (benchmarks and
# the postfix-tools test); python3 + pip for the Python suites; openssl: dkimpy makes its RSA
# test keys with it (tests/python/test_dkim.py); mount (below).
need=()
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v smtp-source >/dev/null 2>&1 || need+=(postfix)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# mount/umount: the disk-full tests mount a small tmpfs (present on Debian, but a trimmed image
# may lack them).
command -v mount >/dev/null 2>&1 || need+=(mount)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${need[*]} (run as root, or install them)" >&2
    exit 1
  fi
  log "installing ${need[*]}"
  apt-get update -qq
  # postfix asks debconf questions; "No configuration" keeps it from configuring a mail system.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

# --- python test runner ----------------------------------------------------------------------
if ! python3 -c 'import pytest' >/dev/null 2>&1; then
  log "installing pytest"
  python3 -m pip install -q pytest 2>/dev/null \
    || python3 -m pip install -q --break-system-packages pytest
fi

# dkimpy (with PyNaCl for Ed25519, authres for ARC): the independent DKIM/ARC implementation
# of test_dkim.py and of tests/tools/dkimpy_tool.py (the signer tests/tests/authentication.rs
# verifies against).
if ! python3 -c 'import dkim, nacl, authres' >/dev/null 2>&1; then
  log "installing dkimpy pynacl authres"
  python3 -m pip install -q dkimpy pynacl authres 2>/dev/null \
    || python3 -m pip install -q --break-system-packages dkimpy pynacl authres
fi

# Everything the suite talks to is installed now, so a missing peer must fail a test, not skip
# it: the tests that could skip (swaks, smtp-sink, the tmpfs mount) skip only when CI is unset.
export CI="${CI:-true}"

# --- build -----------------------------------------------------------------------------------
log "cargo build --workspace --all-targets"
cargo build --workspace --all-targets

# The end-to-end tests start many servers and sockets at once.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

export TERN_BIN="${TERN_BIN:-$PWD/target/debug/tern}"
# Each end-to-end test runs its own server; on 2 cores 4 threads keeps both busy without the
# servers starving each other of CPU (timeouts in the tests are generous either way).
threads="${TEST_THREADS:-4}"

status=0
log "cargo test --workspace"
cargo test --workspace --no-fail-fast -- --test-threads="$threads" || status=1

log "pytest tests/python"
python3 -m pytest tests/python -q -p no:cacheprovider || status=1

log "done in $(( $(date +%s) - start ))s (status $status)"
exit "$status"
