#!/usr/bin/env python3
"""How much deleting a large file stalls a concurrent fdatasync (issue 24).

A thread imitates the WAL: a 2 KiB pwrite over a preallocated file, then
fdatasync, again and again. Meanwhile, ROUNDS times, a FILE_MIB file (64 MiB,
a WAL segment, unless set; a dedupe run is up to a few hundred) is written,
then deleted either at once (unlink) or the way src/wal/reclaim.rs does it
(cut CHUNK_MIB at a time, each cut made durable, PAUSE seconds apart, then
unlink), and the directory synced. It prints, per round, how long the deletion
took and the worst fdatasync around it; then the fdatasync quantiles overall.

    python3 loadtest/probes/delete_stall.py DIR [ROUNDS]          # unlink at once
    CHUNK_MIB=4 python3 loadtest/probes/delete_stall.py DIR       # in 4 MiB cuts
    FILE_MIB=72 python3 loadtest/probes/delete_stall.py DIR       # a dedupe run's size
    SYNC_EVERY_MIB=1 ...                                          # written synced a MiB at a time

Each round also prints how long writing the file took and the worst fdatasync
meanwhile: writing it whole and then syncing it (as a dedupe spill did) queues it
all on the disk at once; SYNC_EVERY_MIB syncs it in steps as it is written.

DIR must be on the file system under test (for meterd: the data directory's);
the probe creates and removes its files there. Compare a mount with and without
the `discard` option (`mount -o remount,nodiscard /` and back) to see its share.
"""
import os
import statistics
import sys
import threading
import time


def make(path, mib, sync_every=0):
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    zeros = b"\0" * (1 << 20)
    for i in range(mib):
        os.write(fd, zeros)
        if sync_every and (i + 1) % sync_every == 0:
            os.fdatasync(fd)
    os.fsync(fd)
    os.close(fd)


def sync_dir(d):
    fd = os.open(d, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    d = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    chunk = int(os.environ.get("CHUNK_MIB", "0"))
    pause = float(os.environ.get("PAUSE", "0.01"))
    mib = int(os.environ.get("FILE_MIB", "64"))
    sync_every = int(os.environ.get("SYNC_EVERY_MIB", "0"))
    os.makedirs(d, exist_ok=True)
    wal = os.path.join(d, "probe-wal")
    make(wal, 8)
    lat = []
    stop = threading.Event()

    def wal_loop():
        fd = os.open(wal, os.O_WRONLY)
        off, buf = 0, b"x" * 2048
        while not stop.is_set():
            t = time.perf_counter()
            os.pwrite(fd, buf, off)
            os.fdatasync(fd)
            lat.append((t, time.perf_counter() - t))
            off = (off + 2048) % (8 << 20)
        os.close(fd)

    th = threading.Thread(target=wal_loop)
    th.start()
    try:
        for i in range(rounds):
            big = os.path.join(d, f"probe-big{i}")
            m0 = time.perf_counter()
            make(big, mib, sync_every)
            m1 = time.perf_counter()
            time.sleep(0.5)
            during = [l for (t, l) in lat if m0 - 0.01 <= t <= m1]
            print(f"write  {1e3 * (m1 - m0):8.2f} ms   worst fdatasync meanwhile  {1e3 * max(during, default=0.0):6.2f} ms")
            t0 = time.perf_counter()
            if chunk:
                fd = os.open(big, os.O_WRONLY)
                size = mib << 20
                while size > 0:
                    size = max(0, size - (chunk << 20))
                    os.ftruncate(fd, size)
                    os.fdatasync(fd)
                    time.sleep(pause)
                os.close(fd)
            os.unlink(big)
            sync_dir(d)
            t1 = time.perf_counter()
            time.sleep(1.0)
            around = [l for (t, l) in lat if t0 - 0.01 <= t <= t1 + 0.5]
            worst = max(around) if around else 0.0
            slow = sum(1 for l in around if l > 0.002)
            print(f"delete {1e3 * (t1 - t0):8.2f} ms   worst fdatasync around it {1e3 * worst:6.2f} ms   over 2 ms: {slow} of {len(around)}")
    finally:
        stop.set()
        th.join()
        os.unlink(wal)
    all_lat = [l for _, l in lat]
    q = statistics.quantiles(all_lat, n=1000)
    print(f"fdatasync: n={len(all_lat)} p50 {1e6 * statistics.median(all_lat):.0f} us  p99 {1e6 * q[989]:.0f} us  p99.9 {1e6 * q[998]:.0f} us  max {1e3 * max(all_lat):.2f} ms")


if __name__ == "__main__":
    main()
