#!/usr/bin/env bash
# Capture throughput of philotes side by side with PostgreSQL's own tools, in one run on one
# machine. See bench/README.md. Usage: bench/capture.sh [workload ...]   (default: all six)
# Environment: BENCH_ROWS (row changes per workload, default 1000000), BENCH_ROUNDS (3),
#              BENCH_SNAPSHOT_ROWS (rows of the snapshot workload's table, default 5000000),
#              BENCH_SNAPSHOT_CONTENDERS (default "copy native philotes"; add "halves" for two
#              pipelines copying half the table each at once, PostgreSQL 15+),
#              BENCH_SNAPSHOT_SPEC (more of the snapshot pipeline's spec.snapshot, e.g.
#              "chunkSize: 50000"; default: none, the defaults users get),
#              BENCH_DURABILITY (production: fsync, synchronous_commit and full_page_writes on,
#              the default; off: fsync and full_page_writes off, a labelled variant),
#              BENCH_FRESH_RATES (transactions per second of the freshness workload's trickles,
#              default "50 500"), BENCH_FRESH_SECONDS (30 per trickle), BENCH_FRESH_BURST
#              (one-row transactions of its burst, 20000),
#              BENCH_OUT (results directory, default bench/out), BENCH_PG_BINDIR (the servers'
#              initdb, pg_ctl and postgres, e.g. another major version from
#              scripts/pg-server.sh; default: pg_config --bindir, which also gives psql).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROWS=${BENCH_ROWS:-1000000}
ROUNDS=${BENCH_ROUNDS:-3}
OUT=${BENCH_OUT:-$ROOT/bench/out}
SNAP_ROWS=${BENCH_SNAPSHOT_ROWS:-5000000}
read -r -a SNAP_CONTENDERS <<< "${BENCH_SNAPSHOT_CONTENDERS:-copy native philotes}"
DURABILITY=${BENCH_DURABILITY:-production}
case $DURABILITY in
  production) DURABLE="fsync = on
full_page_writes = on
synchronous_commit = on";;
  off) DURABLE="fsync = off
full_page_writes = off";;
  *) echo "BENCH_DURABILITY must be production or off" >&2; exit 1;;
esac
WORKLOADS=("$@"); [ ${#WORKLOADS[@]} -gt 0 ] || WORKLOADS=(insert mixed bigtx wide snapshot freshness)
read -r -a FRESH_RATES <<< "${BENCH_FRESH_RATES:-50 500}"
FRESH_SECONDS=${BENCH_FRESH_SECONDS:-30}
FRESH_BURST=${BENCH_FRESH_BURST:-20000}
mkdir -p "$OUT"
BIN=$(pg_config --bindir)                # client programs: psql, pg_recvlogical
SERVER_BIN=${BENCH_PG_BINDIR:-$BIN}      # server programs: initdb, pg_ctl, postgres
[ -x "$SERVER_BIN/postgres" ] || { echo "PostgreSQL server binaries not found in $SERVER_BIN (BENCH_PG_BINDIR, else pg_config --bindir)" >&2; exit 1; }

echo "==> building philotes (release)"
cargo build --release -q
PHILOTES=$ROOT/target/release/philotes

WORK=$(mktemp -d /tmp/philotes-bench-XXXXXX)
AS=""; if [ "$(id -u)" = 0 ]; then chown postgres: "$WORK"; AS="runuser -u postgres --"; fi
SRC_PORT=55433; BUF_PORT=55432
cleanup() {
  for d in src buf; do [ -d "$WORK/$d" ] && $AS "$SERVER_BIN/pg_ctl" -D "$WORK/$d" -m immediate stop >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

start_pg() { # dir port
  $AS "$SERVER_BIN/initdb" -D "$WORK/$1" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
  cat >> "$WORK/$1/postgresql.conf" <<CONF
port = $2
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
max_worker_processes = 16
max_logical_replication_workers = 8
shared_buffers = 512MB
max_wal_size = 8GB
checkpoint_timeout = 30min
$DURABLE
logical_decoding_work_mem = 256MB
wal_retrieve_retry_interval = 100ms
CONF
  $AS "$SERVER_BIN/pg_ctl" -D "$WORK/$1" -l "$WORK/$1.log" -w start >/dev/null
}
echo "==> starting source (:$SRC_PORT) and buffer (:$BUF_PORT) with identical settings (durability: $DURABILITY)"
start_pg src $SRC_PORT
start_pg buf $BUF_PORT
SRC="host=127.0.0.1 port=$SRC_PORT user=postgres dbname=postgres"
BUF="host=127.0.0.1 port=$BUF_PORT user=postgres dbname=postgres"
psrc() { "$BIN/psql" -X -q -v ON_ERROR_STOP=1 "$SRC" "$@"; }
pbuf() { "$BIN/psql" -X -q -v ON_ERROR_STOP=1 "$BUF" "$@"; }
now() { date +%s.%N; }
# The client's CPU time and peak RSS (GNU time: user s, system s, max RSS KiB).
TIME="/usr/bin/time -f %U\t%S\t%M -o $WORK/client"
[ -x /usr/bin/time ] || { echo "GNU time is needed (/usr/bin/time; Debian package time)" >&2; exit 1; }
# CPU seconds each server has used so far (see bench/cpu.py).
server_cpu() { python3 "$ROOT/bench/cpu.py" "$WORK/src" "$WORK/buf"; }

TABLE_DDL="CREATE TABLE t (id bigint PRIMARY KEY, a int, n numeric, s1 text, s2 text, ts timestamptz)"
WIDE_DDL="CREATE TABLE t (id bigint PRIMARY KEY, a int, big text, doc jsonb)"

prepare() { # workload: tables on both sides, rows that exist before the slots
  psrc -c "DROP TABLE IF EXISTS t; DROP PUBLICATION IF EXISTS bench"
  pbuf -c "DROP TABLE IF EXISTS t; DROP SCHEMA IF EXISTS philotes CASCADE"
  case $1 in
    wide) psrc -c "$WIDE_DDL"; pbuf -c "$WIDE_DDL";;
    *) psrc -c "$TABLE_DDL"; pbuf -c "$TABLE_DDL";;
  esac
  # Rows that exist before the slots, on both sides (the native subscriber updates them).
  local seed=""
  case $1 in
    bigtx) seed="INSERT INTO t SELECT i, i, i * 1.5, md5(i::text), 'x', '2026-01-01' FROM generate_series(1, $ROWS) i";;
    mixed) seed="INSERT INTO t SELECT i, i, i * 1.5, md5(i::text), 'x', '2026-01-01' FROM generate_series(1, 100000) i";;
  esac
  if [ -n "$seed" ]; then psrc -c "$seed"; pbuf -c "$seed"; fi
  psrc -c "ALTER TABLE t SET (autovacuum_enabled = off); CREATE PUBLICATION bench FOR TABLE t; CHECKPOINT"
}

workload() {
  case $1 in
    insert) # 1,000 transactions of 1,000 inserts (scaled with BENCH_ROWS)
      local per=1000 n=$((ROWS / 1000))
      psrc -c "CREATE OR REPLACE PROCEDURE w() LANGUAGE plpgsql AS \$\$ BEGIN
        FOR k IN 0..$((n - 1)) LOOP
          INSERT INTO t SELECT i, i % 1000, i * 1.25, md5(i::text), 'row ' || i, now()
            FROM generate_series(k * $per + 1, (k + 1) * $per) i;
          COMMIT;
        END LOOP; END \$\$"; psrc -c "CALL w()";;
    mixed) # small OLTP transactions: 5 inserts, 3 updates, 2 deletes each
      psrc -c "CREATE OR REPLACE PROCEDURE w() LANGUAGE plpgsql AS \$\$ DECLARE base bigint := 1000000; BEGIN
        FOR k IN 0..$((ROWS / 10 - 1)) LOOP
          INSERT INTO t SELECT base + k * 5 + j, j, j * 2.5, md5(j::text), 'm', now() FROM generate_series(1, 5) j;
          UPDATE t SET a = a + 1, s2 = 'u' WHERE id IN (k * 3 % 100000 + 1, k * 3 % 100000 + 2, k * 3 % 100000 + 3);
          DELETE FROM t WHERE id IN (base + k * 5 + 1, base + k * 5 + 2);
          COMMIT;
        END LOOP; END \$\$"; psrc -c "CALL w()";;
    bigtx) # one transaction of ROWS updates
      psrc -c "UPDATE t SET a = a + 1, s2 = 'big'";;
    wide) # rows with a ~20 KB TOASTed text and a jsonb document, then updates that keep the TOAST
      local wide=$((ROWS / 50)) upd=$((ROWS - ROWS / 50))
      psrc -c "CREATE OR REPLACE PROCEDURE w() LANGUAGE plpgsql AS \$\$ BEGIN
        FOR k IN 0..$((wide / 100 - 1)) LOOP
          INSERT INTO t SELECT i, 0, (SELECT string_agg(md5((i * 1000 + g)::text), '') FROM generate_series(1, 640) g),
                 jsonb_build_object('id', i, 'tags', jsonb_build_array('a', 'b', i), 'nested', jsonb_build_object('x', i * 1.5))
            FROM generate_series(k * 100 + 1, (k + 1) * 100) i;
          COMMIT;
        END LOOP;
        FOR k IN 0..$((upd / 1000 - 1)) LOOP
          UPDATE t SET a = a + 1 WHERE id IN (SELECT (k * 1000 + g) % $wide + 1 FROM generate_series(0, 999) g);
          COMMIT;
        END LOOP; END \$\$"; psrc -c "CALL w()";;
  esac
}

expected_changes() { # row changes the workload made = what each contender must receive
  psrc -At -c "SELECT sum(n_tup_ins + n_tup_upd + n_tup_del) FROM pg_stat_user_tables WHERE relname = 't'"
}

run_recvlogical() {
  $TIME "$BIN/pg_recvlogical" -d "$SRC" --slot=recv --start -o proto_version=1 -o publication_names=bench \
    -E "$TARGET" -f /dev/null --no-loop
}

run_native() {
  pbuf -c "CREATE SUBSCRIPTION sub CONNECTION 'host=127.0.0.1 port=$SRC_PORT user=postgres dbname=postgres' PUBLICATION bench WITH (create_slot = false, slot_name = 'native', copy_data = false)"
  until [ "$(psrc -At -c "SELECT confirmed_flush_lsn >= '$TARGET' FROM pg_replication_slots WHERE slot_name = 'native'")" = t ]; do sleep 0.05; done
}

write_pipeline() { # file slot snapshot-mode [table publication name tables-entry]
  cat > "$1" <<YAML
apiVersion: philotes.io/v1alpha1
kind: CdcPipeline
metadata: {name: ${6:-bench}, namespace: bench}
spec:
  source: {connectionSecretRef: {name: src}, tables: [${7:-public.${4:-t}}], publication: ${5:-bench}, slot: $2}
  buffer: {connectionSecretRef: {name: buf}}
  snapshot: {mode: $3${BENCH_SNAPSHOT_SPEC:+, $BENCH_SNAPSHOT_SPEC}}
---
apiVersion: v1
kind: Secret
metadata: {name: src, namespace: bench}
stringData: {uri: "postgres://postgres@127.0.0.1:$SRC_PORT/postgres?sslmode=disable"}
---
apiVersion: v1
kind: Secret
metadata: {name: buf, namespace: bench}
stringData: {uri: "postgres://postgres@127.0.0.1:$BUF_PORT/postgres?sslmode=disable"}
YAML
}

run_philotes() {
  # The slot exists before the workload, like the other contenders'; nothing to copy.
  write_pipeline "$WORK/pipeline.yaml" philotes Never
  $TIME "$PHILOTES" run -f "$WORK/pipeline.yaml" --until-caught-up 2>"$WORK/philotes.log" \
    || { cat "$WORK/philotes.log" >&2; return 1; }
}

slot_of() { case $1 in recvlogical) echo recv;; *) echo "$1";; esac; }

check() { # contender: did it receive the whole workload?
  case $1 in
    recvlogical) [ "$(psrc -At -c "SELECT confirmed_flush_lsn >= '$TARGET' FROM pg_replication_slots WHERE slot_name = 'recv'")" = t ];;
    native) [ "$(pbuf -At -c "SELECT count(*) FROM t")" = "$(psrc -At -c "SELECT count(*) FROM t")" ];;
    philotes) [ "$(pbuf -At -c "SELECT count(*) FROM philotes.cdc_events")" = "$EXPECTED" ];;
  esac
}

# The snapshot workload: copying a table's existing rows, side by side with PostgreSQL's own
# initial table sync and with COPY to /dev/null (the read floor).
prepare_snapshot() {
  psrc -c "DROP TABLE IF EXISTS t; DROP PUBLICATION IF EXISTS bench, bench_lo, bench_hi"
  pbuf -c "DROP TABLE IF EXISTS t; DROP SCHEMA IF EXISTS philotes CASCADE"
  psrc -c "$TABLE_DDL"; pbuf -c "$TABLE_DDL"
  psrc -c "INSERT INTO t SELECT i, i % 1000, i * 1.25, md5(i::text), 'row ' || i, now() FROM generate_series(1, $SNAP_ROWS) i"
  psrc -c "ALTER TABLE t SET (autovacuum_enabled = off)" -c "VACUUM ANALYZE t" -c "CREATE PUBLICATION bench FOR TABLE t" -c "CHECKPOINT"
  if [[ " ${SNAP_CONTENDERS[*]} " == *" halves "* ]]; then
    psrc -c "CREATE PUBLICATION bench_lo FOR TABLE t WHERE (id <= $((SNAP_ROWS / 2)))" \
         -c "CREATE PUBLICATION bench_hi FOR TABLE t WHERE (id > $((SNAP_ROWS / 2)))"
  fi
}

run_copy() {
  $TIME "$BIN/psql" -X -q "$SRC" -c "COPY t TO STDOUT" > /dev/null
}

run_native_sync() {
  pbuf -c "TRUNCATE t"
  pbuf -c "CREATE SUBSCRIPTION sub CONNECTION 'host=127.0.0.1 port=$SRC_PORT user=postgres dbname=postgres' PUBLICATION bench WITH (copy_data = true)"
  # r: the table is copied and its sync worker handed over to the apply worker.
  until [ "$(pbuf -At -c "SELECT bool_and(srsubstate = 'r') FROM pg_subscription_rel")" = t ]; do sleep 0.05; done
}

run_philotes_snapshot() {
  # A new pipeline with default settings: it copies the table, then has caught up.
  write_pipeline "$WORK/snapshot.yaml" philotes_snapshot Initial
  $TIME "$PHILOTES" run -f "$WORK/snapshot.yaml" --until-caught-up 2>"$WORK/philotes.log" \
    || { cat "$WORK/philotes.log" >&2; return 1; }
}

# What two buffer sessions copying at once would reach on this machine (a pessimistic stand-in):
# two pipelines, each copying half the table (a row filter on its publication), run at once.
# Each has its own slot, walsender and source reads, which one pipeline writing through two
# sessions would not need.
run_halves() {
  write_pipeline "$WORK/lo.yaml" philotes_lo Initial t bench_lo lo "{name: public.t, where: \"id <= $((SNAP_ROWS / 2))\"}"
  write_pipeline "$WORK/hi.yaml" philotes_hi Initial t bench_hi hi "{name: public.t, where: \"id > $((SNAP_ROWS / 2))\"}"
  local lo hi
  ${TIME}.lo "$PHILOTES" run -f "$WORK/lo.yaml" --until-caught-up 2>"$WORK/lo.log" & lo=$!
  ${TIME}.hi "$PHILOTES" run -f "$WORK/hi.yaml" --until-caught-up 2>"$WORK/hi.log" & hi=$!
  wait "$lo" || { cat "$WORK/lo.log" >&2; return 1; }
  wait "$hi" || { cat "$WORK/hi.log" >&2; return 1; }
  # One line as GNU time writes it: CPU of both, the larger peak RSS.
  paste <(tail -1 "$WORK/client.lo") <(tail -1 "$WORK/client.hi") |
    awk -F'\t' '{ printf "%.2f\t%.2f\t%d\n", $1 + $4, $2 + $5, ($3 > $6 ? $3 : $6) }' > "$WORK/client"
}

check_snapshot() {
  case $1 in
    copy) true;;
    native) [ "$(pbuf -At -c "SELECT count(*) FROM t")" = "$SNAP_ROWS" ];;
    philotes|halves) [ "$(pbuf -At -c "SELECT count(*) FROM philotes.cdc_events WHERE operation = 'SNAPSHOT'")" = "$SNAP_ROWS" ];;
  esac
}

cleanup_snapshot() {
  case $1 in
    native) pbuf -c "DROP SUBSCRIPTION sub" >/dev/null;;
    philotes) psrc -c "SELECT pg_drop_replication_slot('philotes_snapshot')" >/dev/null
              pbuf -c "DROP SCHEMA philotes CASCADE" >/dev/null;;
    halves) psrc -c "SELECT pg_drop_replication_slot(s) FROM unnest(ARRAY['philotes_lo', 'philotes_hi']) s" >/dev/null
            pbuf -c "DROP SCHEMA philotes CASCADE" >/dev/null;;
  esac
}

snapshot_round() { # round
  local round=$1 c order
  echo "==> snapshot, round $round/$ROUNDS: preparing ($SNAP_ROWS rows)"
  prepare_snapshot
  local contenders=("${SNAP_CONTENDERS[@]}") k=${#SNAP_CONTENDERS[@]}
  order=("${contenders[@]:$(( (round - 1) % k ))}" "${contenders[@]:0:$(( (round - 1) % k ))}")
  for c in "${order[@]}"; do
    psrc -c "CHECKPOINT" >/dev/null; pbuf -c "CHECKPOINT" >/dev/null
    rm -f "$WORK/client"
    read -r src0 buf0 < <(server_cpu)
    t0=$(now)
    case $c in copy) run_copy;; native) run_native_sync;; philotes) run_philotes_snapshot;; halves) run_halves;; esac
    t1=$(now)
    read -r src1 buf1 < <(server_cpu)
    check_snapshot "$c" || { echo "$c did not copy the whole table" >&2; exit 1; }
    client="0 0 "; [ -f "$WORK/client" ] && client=$(tail -1 "$WORK/client")
    python3 - snapshot "$round" "$c" "$t0" "$t1" "$SNAP_ROWS" "$src0" "$src1" "$buf0" "$buf1" $client <<'PY' | tee -a "$RESULTS"
import sys
wl, rnd, c, t0, t1, n, s0, s1, b0, b1, cu, cs = sys.argv[1:13]
rss = sys.argv[13] if len(sys.argv) > 13 and c in ("philotes", "halves") else ""
print(f"{wl}\t{rnd}\t{c}\t{float(t1) - float(t0):.3f}\t{n}\t{rss}\t{float(s1) - float(s0):.2f}\t{float(b1) - float(b0):.2f}\t{float(cu) + float(cs):.2f}\t")
PY
    cleanup_snapshot "$c"
  done
}

# The freshness workload: how stale the copy is. A steady trickle of one-row transactions at
# FRESH_RATES per second for FRESH_SECONDS each, then a burst of FRESH_BURST as fast as one
# session commits them; per transaction, the time from the row's insert on the source
# (clock_timestamp(), just before its commit) to its write at the destination (a column
# defaulting to the destination's clock_timestamp(): on cdc_event_log for philotes, on the
# subscriber's table for native). Both servers share this machine's clock.
FRESH_DDL="CREATE TABLE f (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(), pad text)"
prepare_freshness() {
  psrc -c "DROP TABLE IF EXISTS f; DROP PUBLICATION IF EXISTS fresh"
  pbuf -c "DROP TABLE IF EXISTS f; DROP SCHEMA IF EXISTS philotes CASCADE"
  psrc -c "$FRESH_DDL" -c "CREATE PUBLICATION fresh FOR TABLE f"
  pbuf -c "CREATE TABLE f (id bigint PRIMARY KEY, at timestamptz, pad text, written timestamptz NOT NULL DEFAULT clock_timestamp())"
  psrc -c "CREATE OR REPLACE PROCEDURE trickle(rate int, seconds int) LANGUAGE plpgsql AS \$\$
    DECLARE t0 float8 := extract(epoch FROM clock_timestamp()); BEGIN
      FOR i IN 1..rate * seconds LOOP
        INSERT INTO f (pad) VALUES (md5(i::text)); COMMIT;
        PERFORM pg_sleep(greatest(0, t0 + i::float8 / rate - extract(epoch FROM clock_timestamp())));
      END LOOP; END \$\$" \
       -c "CREATE OR REPLACE PROCEDURE burst(n int) LANGUAGE plpgsql AS \$\$ BEGIN
      FOR i IN 1..n LOOP INSERT INTO f (pad) VALUES (md5(i::text)); COMMIT; END LOOP; END \$\$"
}

start_fresh() { # contender
  case $1 in
    native)
      pbuf -c "CREATE SUBSCRIPTION fsub CONNECTION 'host=127.0.0.1 port=$SRC_PORT user=postgres dbname=postgres' PUBLICATION fresh WITH (copy_data = false)"
      until [ "$(pbuf -At -c "SELECT count(*) FROM pg_stat_subscription WHERE subname = 'fsub' AND received_lsn IS NOT NULL")" = 1 ]; do sleep 0.05; done;;
    philotes)
      # Default settings (flushInterval 5s, batchSize 10000); the slot is created at start.
      write_pipeline "$WORK/fresh.yaml" philotes_fresh Never f fresh fresh
      "$PHILOTES" run -f "$WORK/fresh.yaml" 2>"$WORK/philotes-fresh.log" & FRESH_PID=$!
      until [ "$(psrc -At -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'philotes_fresh' AND active")" = 1 ]; do sleep 0.05; done
      # The measuring column, on the buffer's event table (not part of the contract).
      pbuf -c "ALTER TABLE philotes.cdc_event_log ADD COLUMN bench_written timestamptz DEFAULT clock_timestamp()";;
  esac
}

stop_fresh() { # contender
  case $1 in
    native) pbuf -c "DROP SUBSCRIPTION fsub" >/dev/null;;
    philotes)
      FRESH_RSS=$(awk '/VmHWM/ {print $2}' "/proc/$FRESH_PID/status")
      kill -TERM "$FRESH_PID"; wait "$FRESH_PID" || { cat "$WORK/philotes-fresh.log" >&2; return 1; }
      psrc -c "SELECT pg_drop_replication_slot('philotes_fresh')" >/dev/null
      pbuf -c "DROP SCHEMA philotes CASCADE" >/dev/null;;
  esac
}

fresh_latencies() { # contender lo hi: one latency in ms per transaction, once all arrived
  local n=$(($3 - $2 + 1)) q
  case $1 in
    native) q="SELECT extract(epoch FROM written - at) * 1000 FROM f WHERE id BETWEEN $2 AND $3";;
    philotes) q="SELECT extract(epoch FROM bench_written - (after->>'at')::timestamptz) * 1000 FROM philotes.cdc_event_log
                 WHERE (after->>'id')::bigint BETWEEN $2 AND $3";;
  esac
  until [ "$(pbuf -At -c "SELECT count(*) FROM ($q) x")" = "$n" ]; do sleep 0.2; done
  pbuf -At -c "$q"
}

freshness_round() { # round
  local round=$1 c order phase lo hi t0 t1
  echo "==> freshness, round $round/$ROUNDS"
  prepare_freshness
  local contenders=(native philotes)
  order=("${contenders[@]:$(( (round - 1) % 2 ))}" "${contenders[@]:0:$(( (round - 1) % 2 ))}")
  for c in "${order[@]}"; do
    FRESH_RSS=""
    start_fresh "$c"
    for phase in "${FRESH_RATES[@]}" burst; do
      lo=$(( $(psrc -At -c "SELECT coalesce(max(id), 0) FROM f") + 1 ))
      t0=$(now)
      case $phase in burst) psrc -c "CALL burst($FRESH_BURST)";; *) psrc -c "CALL trickle($phase, $FRESH_SECONDS)";; esac
      t1=$(now)
      hi=$(psrc -At -c "SELECT max(id) FROM f")
      fresh_latencies "$c" "$lo" "$hi" > "$WORK/latencies"
      python3 - "$round" "$c" "$phase" "$lo" "$hi" "$t0" "$t1" "$WORK/latencies" <<'PY' | tee -a "$FRESH_RESULTS"
import statistics, sys
rnd, c, phase, lo, hi, t0, t1, path = sys.argv[1:9]
ms = sorted(float(x) for x in open(path) if x.strip())
def pct(p):
    return ms[min(len(ms) - 1, int(round(p / 100 * (len(ms) - 1))))]
n = int(hi) - int(lo) + 1
rate = n / (float(t1) - float(t0))
print(f"{rnd}\t{c}\t{phase}\t{n}\t{rate:.0f}\t{pct(50):.1f}\t{pct(95):.1f}\t{pct(99):.1f}\t{ms[-1]:.1f}")
PY
    done
    stop_fresh "$c"
    if [ "$c" = philotes ]; then echo -e "$round\tphilotes\trss\t\t\t\t\t\t\t$FRESH_RSS" >> "$FRESH_RESULTS"; fi
  done
}

RESULTS=$OUT/results.tsv
echo -e "workload\tround\tcontender\tseconds\trow_changes\tpeak_rss_kib\tsource_cpu_s\tbuffer_cpu_s\tclient_cpu_s\twalsender_cpu_s" > "$RESULTS"
FRESH_RESULTS=$OUT/freshness.tsv
echo -e "round\tcontender\tphase\ttransactions\ttx_per_s\tp50_ms\tp95_ms\tp99_ms\tmax_ms\tpeak_rss_kib" > "$FRESH_RESULTS"
CONTENDERS=(recvlogical native philotes)
for wl in "${WORKLOADS[@]}"; do
  if [ "$wl" = freshness ]; then
    for round in $(seq 1 "$ROUNDS"); do freshness_round "$round"; done
    continue
  fi
  if [ "$wl" = snapshot ]; then
    for round in $(seq 1 "$ROUNDS"); do snapshot_round "$round"; done
    continue
  fi
  for round in $(seq 1 "$ROUNDS"); do
    echo "==> $wl, round $round/$ROUNDS: preparing"
    prepare "$wl"
    # One slot per contender, created before the workload: all drain exactly the same WAL.
    for s in recv native philotes; do psrc -c "SELECT pg_create_logical_replication_slot('$s', 'pgoutput')" >/dev/null; done
    echo "    workload"
    psrc -c "SELECT pg_stat_reset()" >/dev/null
    workload "$wl"
    sleep 1 # let the statistics collector catch up
    EXPECTED=$(expected_changes)
    TARGET=$(psrc -At -c "SELECT pg_current_wal_lsn()")
    # Alternate the order between rounds.
    order=("${CONTENDERS[@]:$(( (round - 1) % 3 ))}" "${CONTENDERS[@]:0:$(( (round - 1) % 3 ))}")
    for c in "${order[@]}"; do
      psrc -c "CHECKPOINT" >/dev/null; pbuf -c "CHECKPOINT" >/dev/null
      rm -f "$WORK/client"
      read -r src0 buf0 < <(server_cpu)
      # The floor: the CPU the walsender serving this contender's slot spends decoding.
      rm -f "$WORK/walsender"
      python3 "$ROOT/bench/walsender.py" "$BIN/psql" "$SRC" "$(slot_of "$c")" "$WORK/walsender" & sampler=$!
      t0=$(now); "run_$c"; t1=$(now)
      read -r src1 buf1 < <(server_cpu)
      sleep 0.1; kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
      walsender=""; [ -f "$WORK/walsender" ] && walsender=$(cat "$WORK/walsender")
      check "$c" || { echo "$c did not receive the whole $wl workload" >&2; exit 1; }
      # Native logical replication has no client process: its apply worker is in the buffer server.
      client="0 0 "; [ -f "$WORK/client" ] && client=$(tail -1 "$WORK/client")
      python3 - "$wl" "$round" "$c" "$t0" "$t1" "$EXPECTED" "$src0" "$src1" "$buf0" "$buf1" "$walsender" $client <<'PY' | tee -a "$RESULTS"
import sys
wl, rnd, c, t0, t1, n, s0, s1, b0, b1, ws, cu, cs = sys.argv[1:14]
rss = sys.argv[14] if len(sys.argv) > 14 and c == "philotes" else ""
print(f"{wl}\t{rnd}\t{c}\t{float(t1) - float(t0):.3f}\t{n}\t{rss}\t{float(s1) - float(s0):.2f}\t{float(b1) - float(b0):.2f}\t{float(cu) + float(cs):.2f}\t{ws}")
PY
    done
    pbuf -c "DROP SUBSCRIPTION sub" >/dev/null
    for s in recv philotes; do psrc -c "SELECT pg_drop_replication_slot('$s')" >/dev/null; done
  done
done
python3 bench/report.py "$RESULTS" "$DURABILITY" "$FRESH_RESULTS" > "$OUT/summary.md"
cat "$OUT/summary.md"
