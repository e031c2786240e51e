#!/usr/bin/env python3
"""Prints the CPU time (seconds, user + system) a PostgreSQL server has used so far, for each
data directory given: the postmaster's own time, the time of its children that have exited
(the kernel adds it to the postmaster once reaped) and that of its live children (backends,
walsenders, the subscription's apply worker). The difference between two readings is what
the server spent in between, whichever processes came and went."""
import os
import sys

TICK = os.sysconf("SC_CLK_TCK")


def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        # Fields after the command name, which is in parentheses and may hold spaces.
        return f.read().rsplit(")", 1)[1].split()


def server_seconds(datadir):
    with open(os.path.join(datadir, "postmaster.pid")) as f:
        pm = int(f.readline())
    fields = stat(pm)
    # utime, stime, cutime, cstime are fields 14-17 of stat(5); [0] here is field 3.
    ticks = sum(int(x) for x in fields[11:15])
    with open(f"/proc/{pm}/task/{pm}/children") as f:
        children = f.read().split()
    for child in children:
        try:
            ticks += sum(int(x) for x in stat(child)[11:13])
        except (FileNotFoundError, ProcessLookupError):
            pass  # exited meanwhile: counted in the postmaster's cutime from now on
    return ticks / TICK


print(" ".join(f"{server_seconds(d):.2f}" for d in sys.argv[1:]))
