#!/usr/bin/env python3
"""Follows the CPU time of the walsender serving a replication slot: waits until the slot is
active, then writes the walsender's CPU seconds (user + system, from /proc/<pid>/stat) to the
output file every 20 ms until the process ends or this script is stopped. The file then holds
what the walsender spent decoding for its client, to within 20 ms.

Usage: walsender.py <psql> <conninfo> <slot> <output file>"""
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")
psql, conninfo, slot, out = sys.argv[1:5]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


pid = ""
while not pid:
    pid = subprocess.run(
        [psql, "-X", "-At", conninfo, "-c",
         f"SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()
    if not pid:
        time.sleep(0.02)
while True:
    try:
        seconds = cpu_seconds(pid)
    except (FileNotFoundError, ProcessLookupError):
        break
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{seconds:.2f}\n")
    os.replace(tmp, out)
    time.sleep(0.02)
