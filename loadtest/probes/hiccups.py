#!/usr/bin/env python3
"""When this machine takes the CPU away from a running thread (issue 24).

One process per CPU, each pinned to its CPU, reads the clock in a tight loop for
SECONDS and records every gap between two reads longer than GAP_MS (0.3 unless
set): time in which that thread did not run although it never blocked. With
every CPU busy (as during a load test, where the generator shares the cores), a
gap nothing in the guest explains (`perf sched` shows no other task on that CPU)
is the hypervisor's: a latency floor for any server on this machine.

    python3 loadtest/probes/hiccups.py [SECONDS]
    GAP_MS=1 python3 loadtest/probes/hiccups.py 20

Prints, per CPU, each gap with when it began, then the gaps over 2 ms and the
time between them (a steady period points to something periodic outside).
"""
import multiprocessing
import os
import sys
import time


def spin(cpu, seconds, gap_ns, out):
    os.sched_setaffinity(0, {cpu})
    clock = time.monotonic_ns
    start = last = clock()
    end = start + int(seconds * 1e9)
    gaps = []
    while last < end:
        now = clock()
        if now - last > gap_ns:
            gaps.append(((last - start) / 1e6, (now - last) / 1e6))
        last = now
    out.put((cpu, gaps))


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    gap_ns = int(float(os.environ.get("GAP_MS", "0.3")) * 1e6)
    cpus = sorted(os.sched_getaffinity(0))
    out = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=spin, args=(c, seconds, gap_ns, out)) for c in cpus]
    for p in procs:
        p.start()
    results = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
    for cpu in cpus:
        gaps = results[cpu]
        lost = sum(g for _, g in gaps)
        print(f"cpu {cpu}: {len(gaps)} gaps over {gap_ns / 1e6:g} ms, {lost:.1f} ms lost in {seconds:g} s ({100 * lost / (seconds * 1e3):.2f} %)")
        for at, gap in gaps[:40]:
            print(f"  at {at:9.1f} ms: {gap:6.2f} ms")
        big = [at for at, gap in gaps if gap > 2.0]
        if len(big) > 1:
            between = [round(b - a) for a, b in zip(big, big[1:])]
            print(f"  gaps over 2 ms: {len(big)}; ms between them: {between[:30]}")


if __name__ == "__main__":
    main()
