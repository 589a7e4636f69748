#!/usr/bin/env python3
"""Plots the soak's CSV (issue 15): server RSS, open fds and p99 over time.
usage: plot_soak.py soak.csv soak.png   (needs python3-matplotlib)"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = list(csv.DictReader(open(sys.argv[1])))
t = [float(r["t_s"]) / 60 for r in rows]
fig, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
series = [
    ("rss_mb", "RSS (MB)"),
    ("open_fds", "open fds"),
    ("p99_ms", "p99 per 10 s (ms)"),
    ("events_per_s", "events/s"),
]
for ax, (key, label) in zip(axes, series):
    ax.plot(t, [float(r[key]) for r in rows])
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
axes[-1].set_xlabel("minutes")
fig.suptitle("meterd soak: churning customers, retries of old ids, 2 min dedupe window")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=80)
