#!/usr/bin/env python3
"""Open N concurrent idle SMTP sessions to a server and report its memory (VmRSS from /proc).

Each session connects, reads the 220 greeting, sends EHLO, reads the reply and then stays idle.
Once all are open the server's VmRSS is read, the sessions are held for --hold seconds (checking
that the server keeps them open), the RSS is read again, and everything is closed with QUIT.
Prints one JSON object. Used by bench/idle.sh; not a test.
"""

import argparse
import asyncio
import json
import resource
import sys
import time


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])  # kB for Vm*, count for Threads
    return out


async def read_reply(reader):
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError(f"closed after {lines!r}")
        lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
        if len(line) < 4 or line[3:4] != b"-":
            return int(lines[0][:3]), lines


async def open_session(host, port, source, sem):
    async with sem:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=(source, 0) if source else None), 30
        )
        code, lines = await asyncio.wait_for(read_reply(reader), 30)
        if code != 220:
            writer.close()
            raise RuntimeError(f"greeting {lines!r}")
        writer.write(b"EHLO idle.bench.test\r\n")
        await writer.drain()
        code, lines = await asyncio.wait_for(read_reply(reader), 30)
        if code != 250:
            writer.close()
            raise RuntimeError(f"EHLO {lines!r}")
        return reader, writer


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True, help="server pid for /proc/PID/status")
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--sources", type=int, default=1, help="spread over 127.0.0.1..N")
    ap.add_argument("--hold", type=float, default=10.0)
    ap.add_argument("--parallel", type=int, default=500, help="connects in flight at once")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.sessions + 100:
        sys.exit(f"open-file limit {hard} too low for {args.sessions} sessions")

    before = proc_status(args.pid)
    sem = asyncio.Semaphore(args.parallel)
    sources = [f"127.0.0.{1 + i}" for i in range(args.sources)] if args.sources > 1 else [None]
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(open_session("127.0.0.1", args.port, sources[i % len(sources)], sem) for i in range(args.sessions)),
        return_exceptions=True,
    )
    opened = [r for r in results if not isinstance(r, BaseException)]
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    t_open = time.monotonic() - t0
    await asyncio.sleep(1.0)
    during = proc_status(args.pid)
    await asyncio.sleep(args.hold)
    after_hold = proc_status(args.pid)

    # Still open? A NOOP on every session must be answered.
    alive = 0
    for reader, writer in opened:
        try:
            writer.write(b"NOOP\r\n")
            await writer.drain()
        except Exception:
            pass
    for reader, writer in opened:
        try:
            code, _ = await asyncio.wait_for(read_reply(reader), 30)
            alive += code == 250
        except Exception:
            pass
    for reader, writer in opened:
        try:
            writer.write(b"QUIT\r\n")
            writer.close()
        except Exception:
            pass
    await asyncio.sleep(0.5)

    rss_delta = during["VmRSS"] - before["VmRSS"]
    mib = lambda kb: kb / 1024
    print(
        f"sessions open: {len(opened)}/{args.sessions} in {t_open:.1f} s "
        f"(still answering NOOP after {args.hold:g} s: {alive}; errors: {len(errors)})\n"
        f"server VmRSS: {mib(before['VmRSS']):.1f} MiB idle, {mib(during['VmRSS']):.1f} MiB with the sessions, "
        f"{mib(after_hold['VmRSS']):.1f} MiB after the hold, peak {mib(after_hold['VmHWM']):.1f} MiB; "
        f"≈ {rss_delta / max(len(opened), 1):.1f} KiB per idle session; {during['Threads']} threads",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "sessions_requested": args.sessions,
                "sessions_open": len(opened),
                "sessions_alive_after_hold": alive,
                "errors": len(errors),
                "first_errors": errors[:5],
                "open_seconds": round(t_open, 2),
                "rss_before_kb": before["VmRSS"],
                "rss_with_sessions_kb": during["VmRSS"],
                "rss_after_hold_kb": after_hold["VmRSS"],
                "hwm_kb": after_hold["VmHWM"],
                "threads": during["Threads"],
                "rss_per_session_bytes": round(rss_delta * 1024 / max(len(opened), 1)),
            }
        )
    )


asyncio.run(main())
