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
durability = sys.argv[2] if len(sys.argv) > 2 else "production"
print(
    "Durability: "
    + (
        "production (fsync, synchronous_commit and full_page_writes on, on both servers)."
        if durability == "production"
        else "off (fsync and full_page_writes off on both servers; a labelled variant, not what users run)."
    )
)
print()
snapshot_rows = [r for r in rows if r["workload"] == "snapshot"]
rows = [r for r in rows if r["workload"] != "snapshot"]
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

if rows:
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

if snapshot_rows:
    st = defaultdict(list)
    scpu = defaultdict(list)
    srss = []
    for r in snapshot_rows:
        st[r["contender"]].append(float(r["seconds"]))
        scpu[r["contender"]].append(tuple(float(r[k]) for k in ("source_cpu_s", "buffer_cpu_s", "client_cpu_s")))
        if r["peak_rss_kib"]:
            srss.append(int(r["peak_rss_kib"]))
    n = int(snapshot_rows[0]["row_changes"])
    m = {c: statistics.median(v) for c, v in st.items()}
    print()
    print("Snapshot: copying a table's existing rows (the `insert` shape), side by side with `COPY t TO STDOUT`")
    print("to /dev/null (the read floor) and native logical replication's initial table sync")
    print("(`CREATE SUBSCRIPTION ... WITH (copy_data = true)`, until the table is ready):")
    print()
    print("| rows | COPY to /dev/null | native table sync | philotes | philotes / native | philotes / COPY | philotes rows/s | philotes peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {n:,} | {m['copy']:.2f} s | {m['native']:.2f} s | {m['philotes']:.2f} s | {m['philotes'] / m['native']:.2f}× "
        f"| {m['philotes'] / m['copy']:.2f}× | {n / m['philotes']:,.0f} | {max(srss) / 1024:.0f} MB |"
    )
    print()
    print("| contender | wall | source server CPU | buffer server CPU | client CPU |")
    print("|---|---:|---:|---:|---:|")
    for c in ("copy", "native", "philotes"):
        samples = scpu[c]
        src, buf, cli = (statistics.median(x[i] for x in samples) for i in range(3))
        print(f"| {c} | {m[c]:.2f} s | {src:.2f} | {buf:.2f} | {cli:.2f} |")
    print()
    print(f"Median of {len(st['philotes'])} rounds; the order rotates between rounds.")

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
