#!/usr/bin/env python3
"""Summarise bench/capture.sh's results.tsv: median time per workload and contender, the
ratios philotes/pg_recvlogical and philotes/native, rows per second, philotes's peak RSS."""
import csv
import statistics
import sys
from collections import defaultdict

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
times = defaultdict(list)
changes = {}
rss = defaultdict(list)
for r in rows:
    times[(r["workload"], r["contender"])].append(float(r["seconds"]))
    changes[r["workload"]] = int(r["row_changes"])
    if r["peak_rss_kib"]:
        rss[r["workload"]].append(int(r["peak_rss_kib"]))

print("| workload | row changes | pg_recvlogical | native | philotes | philotes / pg_recvlogical | philotes / native | philotes rows/s | philotes peak RSS |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for wl in dict.fromkeys(r["workload"] for r in rows):
    m = {c: statistics.median(times[(wl, c)]) for c in ("recvlogical", "native", "philotes") if times[(wl, c)]}
    n = changes[wl]
    print(
        f"| {wl} | {n:,} | {m['recvlogical']:.2f} s | {m['native']:.2f} s | {m['philotes']:.2f} s "
        f"| {m['philotes'] / m['recvlogical']:.2f}× | {m['philotes'] / m['native']:.2f}× "
        f"| {n / m['philotes']:,.0f} | {max(rss[wl]) / 1024:.0f} MB |"
    )
print()
print(f"Median of {max(len(v) for v in times.values())} rounds per cell; the order of the contenders rotates between rounds.")
