#!/usr/bin/env python3
"""Summarise bench/capture.sh's results.tsv (and freshness.tsv): median time per workload and contender, the
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
walsender = defaultdict(list)
for r in rows:
    key = (r["workload"], r["contender"])
    times[key].append(float(r["seconds"]))
    changes[r["workload"]] = int(r["row_changes"])
    if r["peak_rss_kib"]:
        rss[r["workload"]].append(int(r["peak_rss_kib"]))
    if r.get("source_cpu_s"):
        cpu[key].append(tuple(float(r[k]) for k in ("source_cpu_s", "buffer_cpu_s", "client_cpu_s")))
    if r.get("walsender_cpu_s"):
        walsender[key].append(float(r["walsender_cpu_s"]))
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
    if walsender:
        print()
        print("The floor for one slot: the CPU seconds the source's walsender spent decoding for each")
        print("contender (it is single-threaded, so no client of one slot drains faster), and each")
        print("contender's wall time as a multiple of its walsender's CPU time:")
        print()
        print("| workload | walsender CPU (philotes) | philotes / floor | native / floor | pg_recvlogical / floor |")
        print("|---|---:|---:|---:|---:|")
        for wl in workloads:
            f = {c: statistics.median(walsender[(wl, c)]) for c in CONTENDERS if walsender[(wl, c)]}
            m = {c: statistics.median(times[(wl, c)]) for c in CONTENDERS if times[(wl, c)]}
            ratio = lambda c: f"{m[c] / f[c]:.2f}×" if f.get(c) else "–"
            print(f"| {wl} | {f.get('philotes', 0):.2f} s | {ratio('philotes')} | {ratio('native')} | {ratio('recvlogical')} |")

if snapshot_rows:
    st = defaultdict(list)
    scpu = defaultdict(list)
    srss = []
    for r in snapshot_rows:
        st[r["contender"]].append(float(r["seconds"]))
        scpu[r["contender"]].append(tuple(float(r[k]) for k in ("source_cpu_s", "buffer_cpu_s", "client_cpu_s")))
        if r["peak_rss_kib"] and r["contender"] == "philotes":
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
    print("| contender | wall | / native | source server CPU | buffer server CPU | client CPU | total CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in ("copy", "native", "philotes", "halves"):
        samples = scpu.get(c)
        if not samples:
            continue
        src, buf, cli = (statistics.median(x[i] for x in samples) for i in range(3))
        print(f"| {c} | {m[c]:.2f} s | {m[c] / m['native']:.2f}× | {src:.2f} | {buf:.2f} | {cli:.2f} | {src + buf + cli:.2f} |")
    if "halves" in m:
        print()
        print("`halves`: two pipelines copying half the table each (row-filtered publications), run at")
        print("once: what two buffer sessions would reach on this machine, paying for a second slot,")
        print("walsender and reader besides.")
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

fresh = []
if len(sys.argv) > 3:
    try:
        fresh = list(csv.DictReader(open(sys.argv[3]), delimiter="\t"))
    except FileNotFoundError:
        fresh = []
if fresh:
    lat = defaultdict(list)
    frss = []
    phases = []
    for r in fresh:
        if r["phase"] == "rss":
            if r["peak_rss_kib"]:
                frss.append(int(r["peak_rss_kib"]))
            continue
        phases.append(r["phase"])
        lat[(r["phase"], r["contender"])].append(r)
    print()
    print("Freshness: one-row transactions, from the row's insert on the source to its write at the")
    print("destination (milliseconds; per phase, the median over rounds of each percentile):")
    print()
    print("| load | contender | transactions | achieved tx/s | p50 | p95 | p99 | max |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for phase in dict.fromkeys(phases):
        for c in ("native", "philotes"):
            rs = lat[(phase, c)]
            if not rs:
                continue
            med = lambda k: statistics.median(float(r[k]) for r in rs)
            load = "burst" if phase == "burst" else f"{phase} tx/s"
            print(
                f"| {load} | {c} | {int(med('transactions')):,} | {med('tx_per_s'):,.0f} | {med('p50_ms'):.1f} "
                f"| {med('p95_ms'):.1f} | {med('p99_ms'):.1f} | {med('max_ms'):.1f} |"
            )
    print()
    rounds = len({r["round"] for r in fresh})
    peak = f"; philotes peak RSS {max(frss) / 1024:.0f} MB" if frss else ""
    print(f"{rounds} rounds, the order of the contenders rotating{peak}. Default settings (flushInterval 5s).")
