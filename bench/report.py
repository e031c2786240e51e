#!/usr/bin/env python3
"""Summarise bench/capture.sh's results.tsv: median time per workload and contender, the
ratios philotes/pg_recvlogical and philotes/native, rows per second, philotes's peak RSS;
then where the CPU went: median CPU seconds of the source server, the buffer server and the
client process for each contender."""
import csv
import statistics
import sys
from collections import defaultdict

CONTENDERS = ("recvlogical", "native", "philotes")
NAMES = {"recvlogical": "pg_recvlogical", "native": "native", "philotes": "philotes"}

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
times = defaultdict(list)
cpu = defaultdict(list)
changes = {}
rss = defaultdict(list)
for r in rows:
    key = (r["workload"], r["contender"])
    times[key].append(float(r["seconds"]))
    changes[r["workload"]] = int(r["row_changes"])
    if r["peak_rss_kib"]:
        rss[r["workload"]].append(int(r["peak_rss_kib"]))
    if r.get("source_cpu_s"):
        cpu[key].append(tuple(float(r[k]) for k in ("source_cpu_s", "buffer_cpu_s", "client_cpu_s")))
workloads = list(dict.fromkeys(r["workload"] for r in rows))

print("| workload | row changes | pg_recvlogical | native | philotes | philotes / pg_recvlogical | philotes / native | philotes rows/s | philotes peak RSS |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for wl in workloads:
    m = {c: statistics.median(times[(wl, c)]) for c in CONTENDERS if times[(wl, c)]}
    n = changes[wl]
    print(
        f"| {wl} | {n:,} | {m['recvlogical']:.2f} s | {m['native']:.2f} s | {m['philotes']:.2f} s "
        f"| {m['philotes'] / m['recvlogical']:.2f}× | {m['philotes'] / m['native']:.2f}× "
        f"| {n / m['philotes']:,.0f} | {max(rss[wl]) / 1024:.0f} MB |"
    )
print()
print(f"Median of {max(len(v) for v in times.values())} rounds per cell; the order of the contenders rotates between rounds.")

if cpu:
    print()
    print("Where the CPU went (median CPU seconds while each contender drained its slot; the source")
    print("server's figure includes its walsender, the buffer server's the COPY backend or the")
    print("subscription's apply worker, the client's is pg_recvlogical or philotes):")
    print()
    print("| workload | contender | wall | source server | buffer server | client | total CPU |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for wl in workloads:
        for c in CONTENDERS:
            samples = cpu[(wl, c)]
            if not samples:
                continue
            src, buf, cli = (statistics.median(s[i] for s in samples) for i in range(3))
            total = statistics.median(sum(s) for s in samples)
            wall = statistics.median(times[(wl, c)])
            print(f"| {wl} | {NAMES[c]} | {wall:.2f} s | {src:.2f} | {buf:.2f} | {cli:.2f} | {total:.2f} |")
