#!/usr/bin/env python3
"""What one write + fdatasync costs on this disk, appending to a file against writing into a
file that is already allocated: the measurement behind the spool's zero-filled segments
(crates/tern-queue/src/prealloc.rs). Not a test: it measures.

    python3 bench/fsync_probe.py [DIR] [WRITES]

DIR defaults to the current directory (put it on the spool's filesystem); each case writes
WRITES (default 2000) records of 7,000 bytes, each followed by fdatasync, and prints the wall
time and the caller's CPU time per write. The kernel's own writeback threads are not counted.
"""
import os
import sys
import time

DIR = sys.argv[1] if len(sys.argv) > 1 else "."
N = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
RECORD = b"x" * 7000


def run(name, prepare):
    path = os.path.join(DIR, "fsync_probe.tmp")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        prepare(fd)
        os.fsync(fd)
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(N):
            os.pwrite(fd, RECORD, i * len(RECORD))
            os.fdatasync(fd)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{name:11} {wall / N * 1e6:6.0f} µs wall, {cpu / N * 1e6:5.0f} µs CPU per write + fdatasync")
    finally:
        os.close(fd)
        os.unlink(path)


size = N * len(RECORD) + 4096
run("append", lambda fd: None)
run("fallocate", lambda fd: os.posix_fallocate(fd, 0, size))
run("zero-filled", lambda fd: os.pwrite(fd, b"\0" * size, 0))
