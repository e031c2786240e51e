#!/usr/bin/env bash
# What the buffer server's share of a snapshot costs in each way an event could be stored, and
# what storing the source's rows themselves costs (the floor of native's table sync), on one
# server with the durability settings users run. See bench/README.md.
#
# Every variant is one COPY of the same rows from a file on the server (no client, no network),
# into a fresh table, after a CHECKPOINT:
#   rows       the source table's rows into a table of the same shape (what native's sync stores)
#   events     SNAPSHOT events as Philotes stores them (cdc_event_log of migrations/0005, a JSON
#              object image per row in a json column)
#   no-check   the same without the operation CHECK constraint
#   array      the image as a JSON array of the values (column names stored once elsewhere)
#   text       the image in a text column (not validated as JSON by the server)
#   array-text both: the array in a text column
#   events-2   the events as Philotes stores them, by two sessions at once (alternate chunks,
#              one transaction each), as a writer with a second buffer session would
#
# Environment: BENCH_ROWS (rows, default 1000000), BENCH_ROUNDS (3), BENCH_OUT (bench/out),
#              BENCH_PG_BINDIR (the server's binaries; default: pg_config --bindir).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROWS=${BENCH_ROWS:-1000000}
ROUNDS=${BENCH_ROUNDS:-3}
OUT=${BENCH_OUT:-$ROOT/bench/out}
BIN=$(pg_config --bindir)
SERVER_BIN=${BENCH_PG_BINDIR:-$BIN}
[ -x "$SERVER_BIN/postgres" ] || { echo "PostgreSQL server binaries not found in $SERVER_BIN (BENCH_PG_BINDIR, else pg_config --bindir)" >&2; exit 1; }
mkdir -p "$OUT"
RESULTS=$OUT/buffer-formats-$(date +%Y%m%d-%H%M%S).tsv

WORK=$(mktemp -d /tmp/philotes-formats-XXXXXX)
AS=""; if [ "$(id -u)" = 0 ]; then chown postgres: "$WORK"; AS="runuser -u postgres --"; fi
PORT=55434
cleanup() {
  [ -d "$WORK/db" ] && $AS "$SERVER_BIN/pg_ctl" -D "$WORK/db" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

$AS "$SERVER_BIN/initdb" -D "$WORK/db" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
# As bench/capture.sh's servers, production durability.
cat >> "$WORK/db/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
shared_buffers = 512MB
max_wal_size = 8GB
checkpoint_timeout = 30min
fsync = on
full_page_writes = on
synchronous_commit = on
CONF
$AS "$SERVER_BIN/pg_ctl" -D "$WORK/db" -l "$WORK/db.log" -w start >/dev/null
DB="host=127.0.0.1 port=$PORT user=postgres dbname=postgres"
sql() { "$BIN/psql" -X -q -v ON_ERROR_STOP=1 "$DB" "$@"; }

echo "==> preparing $ROWS rows and their events"
# The rows of bench/capture.sh's snapshot workload, and the SNAPSHOT events Philotes writes
# for them: the image as Philotes renders it (column order, compact, ISO timestamps).
EVENT_LOG="(
    pipeline_id  integer     NOT NULL,
    seq          integer     NOT NULL,
    commit_lsn   pg_lsn      NOT NULL,
    lsn          pg_lsn      NOT NULL,
    xid          bigint      NOT NULL,
    commit_time  timestamptz NOT NULL,
    table_id     bigint      NOT NULL,
    operation    \"char\"      NOT NULL %s,
    before       %s,
    after        %s,
    PRIMARY KEY (pipeline_id, commit_lsn, seq))"
sql <<SQL
SET TimeZone = 'UTC';
CREATE TABLE src (id bigint PRIMARY KEY, a int, n numeric, s1 text, s2 text, ts timestamptz);
INSERT INTO src SELECT i, i % 1000, i * 1.25, md5(i::text), 'row ' || i, now() FROM generate_series(1, $ROWS) i;
CREATE TABLE events_src $(printf "$EVENT_LOG" "" json json);
-- One chunk of 10,000 rows per source transaction: the positions a snapshot gives them.
-- Every file is written in key order (a plain COPY of a large table may start mid-table, where
-- the last scan left off), as the rows arrive at the buffer.
INSERT INTO events_src
SELECT 1, ((id - 1) % 10000)::int, ('0/' || to_hex(1000000 + (id - 1) / 10000))::pg_lsn,
       ('0/' || to_hex(1000000 + (id - 1) / 10000))::pg_lsn, 1000 + (id - 1) / 10000, now(), 42, 'S', NULL,
       format('{"id":%s,"a":%s,"n":%s,"s1":%s,"s2":%s,"ts":%s}', id, a, n, to_json(s1), to_json(s2), to_json(ts::text))::json
FROM src;
COPY (SELECT * FROM src ORDER BY id) TO '$WORK/rows.txt';
COPY (SELECT * FROM events_src ORDER BY commit_lsn, seq) TO '$WORK/events.bin' (FORMAT binary);
COPY (SELECT * FROM events_src WHERE xid % 2 = 0 ORDER BY commit_lsn, seq) TO '$WORK/events-even.bin' (FORMAT binary);
COPY (SELECT * FROM events_src WHERE xid % 2 = 1 ORDER BY commit_lsn, seq) TO '$WORK/events-odd.bin' (FORMAT binary);
COPY (SELECT pipeline_id, seq, commit_lsn, lsn, xid, commit_time, table_id, operation, before,
             (SELECT json_agg(v) FROM json_each(after) x(k, v))
      FROM events_src ORDER BY commit_lsn, seq) TO '$WORK/array.bin' (FORMAT binary);
DROP TABLE src, events_src;
CREATE TABLE rows_t (id bigint PRIMARY KEY, a int, n numeric, s1 text, s2 text, ts timestamptz);
CREATE TABLE events_t $(printf "$EVENT_LOG" "CHECK (operation IN ('I', 'U', 'D', 'T', 'S'))" json json);
CREATE TABLE no_check_t $(printf "$EVENT_LOG" "" json json);
CREATE TABLE array_t $(printf "$EVENT_LOG" "CHECK (operation IN ('I', 'U', 'D', 'T', 'S'))" json json);
CREATE TABLE text_t $(printf "$EVENT_LOG" "CHECK (operation IN ('I', 'U', 'D', 'T', 'S'))" text text);
CREATE TABLE array_text_t $(printf "$EVENT_LOG" "CHECK (operation IN ('I', 'U', 'D', 'T', 'S'))" text text);
SQL

now() { date +%s.%N; }
printf 'variant\tround\tseconds\trows\ttable_mb\n' | tee "$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
  for v in rows events no-check array text array-text events-2; do
    case $v in
      rows) t=rows_t; from="'$WORK/rows.txt'";;
      events) t=events_t; from="'$WORK/events.bin' (FORMAT binary)";;
      no-check) t=no_check_t; from="'$WORK/events.bin' (FORMAT binary)";;
      array) t=array_t; from="'$WORK/array.bin' (FORMAT binary)";;
      text) t=text_t; from="'$WORK/events.bin' (FORMAT binary)";;
      array-text) t=array_text_t; from="'$WORK/array.bin' (FORMAT binary)";;
      events-2) t=events_t;;
    esac
    sql -c "CHECKPOINT"
    t0=$(now)
    if [ "$v" = events-2 ]; then
      sql -c "COPY $t FROM '$WORK/events-even.bin' (FORMAT binary)" &
      sql -c "COPY $t FROM '$WORK/events-odd.bin' (FORMAT binary)"
      wait $!
    else
      sql -c "COPY $t FROM $from"
    fi
    t1=$(now)
    [ "$(sql -At -c "SELECT count(*) FROM $t")" = "$ROWS" ] || { echo "$v: $t does not hold $ROWS rows" >&2; exit 1; }
    mb=$(sql -At -c "SELECT pg_total_relation_size('$t') / 1048576")
    sql -c "TRUNCATE $t"
    python3 -c "import sys; print(f'{sys.argv[1]}\t{sys.argv[2]}\t{float(sys.argv[4]) - float(sys.argv[3]):.3f}\t{sys.argv[5]}\t{sys.argv[6]}')" \
      "$v" "$round" "$t0" "$t1" "$ROWS" "$mb" | tee -a "$RESULTS"
  done
done
echo "==> medians"
python3 - "$RESULTS" <<'PY'
import csv, statistics, sys
runs = {}
for r in csv.DictReader(open(sys.argv[1]), delimiter="\t"):
    runs.setdefault(r["variant"], []).append((float(r["seconds"]), r["table_mb"]))
base = statistics.median(s for s, _ in runs["rows"])
print("| variant | median s | / rows | table + index MB |")
print("|---|---:|---:|---:|")
for v, rs in runs.items():
    m = statistics.median(s for s, _ in rs)
    print(f"| {v} | {m:.2f} | {m / base:.2f}x | {rs[-1][1]} |")
PY
echo "results: $RESULTS"
