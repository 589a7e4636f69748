#!/usr/bin/env python3
"""The disk's own fdatasync tail, with nothing else running (issue 24).

A loop imitates the WAL's writer and nothing more: a 2 KiB pwrite over a
preallocated 64 MiB file (wrapping around), then fdatasync, for SECONDS. It
prints the fdatasync quantiles and every sync slower than SLOW_MS (50 unless
set) with when it happened, so a stall seen in a load test can be told apart:
if the bare loop stalls as long, the disk (here, the VM's virtual disk) did it.

    python3 loadtest/probes/sync_tail.py DIR [SECONDS]
    SLOW_MS=20 python3 loadtest/probes/sync_tail.py DIR 300

DIR must be on the file system under test (for meterd: the data directory's).
"""
import os
import sys
import time


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    directory = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    slow_ms = float(os.environ.get("SLOW_MS", "50"))
    size = 64 << 20
    record = b"\x5a" * 2048
    path = os.path.join(directory, "sync-tail.probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
        took = []
        slow = []
        start = time.monotonic()
        offset = 0
        while time.monotonic() - start < seconds:
            os.pwrite(fd, record, offset)
            offset = (offset + len(record)) % size
            t0 = time.monotonic()
            os.fdatasync(fd)
            dt = time.monotonic() - t0
            took.append(dt)
            if dt * 1000 >= slow_ms:
                slow.append((t0 - start, dt))
    finally:
        os.close(fd)
        os.unlink(path)
    took.sort()

    def q(p):
        return took[min(len(took) - 1, int(p * len(took)))] * 1e6

    print(f"{len(took)} syncs in {seconds:.0f} s: p50 {q(0.5):.0f} us, p99 {q(0.99):.0f} us, "
          f"p99.9 {q(0.999):.0f} us, p99.99 {q(0.9999):.0f} us, max {took[-1] * 1e3:.1f} ms")
    print(f"{len(slow)} syncs over {slow_ms:g} ms" + (":" if slow else ""))
    for at, dt in slow:
        print(f"  at {at:8.3f} s: {dt * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
