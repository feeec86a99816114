#!/usr/bin/env python3
"""Wait until a server's queue is empty AND an smtp-sink (run with -c) has counted N messages.

Used by bench/relay.sh and bench/queue_depth.sh. Prints the wall-clock time (time.time(), the
same clock as `date +%s.%N`) at which both held, or exits 1 on timeout. With --samples, appends
one line per second: seconds since start, sink count, queue figures (tern's /health JSON, or
Postfix's queue file count).

  drain_wait.py --sink-log LOG --count N (--tern-http PORT | --postfix-queue DIR)
                [--timeout S] [--samples FILE] [--first]

--first: return as soon as the sink has counted one message (ignores the queue).
"""
import argparse, json, os, sys, time, urllib.request


def sink_count(path):
    """smtp-sink -c writes 'sess=.. quit=.. mesg=N' followed by CR after every event."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256))
            tail = f.read().decode("ascii", "replace")
    except FileNotFoundError:
        return 0
    for part in reversed(tail.replace("\n", "\r").split("\r")):
        if "mesg=" in part:
            try:
                return int(part.rsplit("mesg=", 1)[1].split()[0])
            except (ValueError, IndexError):
                continue
    return 0


def tern_health(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return json.load(r)
    except Exception:
        return None


def postfix_queue(dirname):
    n = 0
    for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
        for _root, _dirs, files in os.walk(os.path.join(dirname, sub)):
            n += len(files)
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sink-log", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--tern-http")
    ap.add_argument("--postfix-queue")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--samples")
    ap.add_argument("--first", action="store_true")
    a = ap.parse_args()
    start = time.time()
    next_sample = start
    samples = open(a.samples, "a") if a.samples else None
    while True:
        now = time.time()
        count = sink_count(a.sink_log)
        if a.first:
            if count > 0:
                print(f"{now:.6f}")
                return 0
            empty, info = False, ""
        elif a.tern_http:
            h = tern_health(a.tern_http)
            empty = h is not None and h.get("queued") == 0
            info = json.dumps(h) if h else "no /health answer"
        else:
            q = postfix_queue(a.postfix_queue)
            empty = q == 0
            info = f"postfix_queue={q}"
        if samples and now >= next_sample:
            samples.write(f"{now - start:.1f}\tsink={count}\t{info}\n")
            samples.flush()
            next_sample += 1
        if empty and count >= a.count:
            print(f"{now:.6f}")
            return 0
        if now - start > a.timeout:
            sys.stderr.write(f"timeout after {a.timeout} s: sink={count} {info}\n")
            return 1
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
