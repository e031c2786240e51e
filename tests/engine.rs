//! What lands in the buffer: value mapping, TOAST, replica identity, TRUNCATE, ALTER TABLE,
//! commit order, checkpoints and slot progress, against a real PostgreSQL.

mod common;

use std::time::Duration;

use common::*;
use philotes::pipeline::{Outcome, RunOptions};

const FAST: &str = "flushInterval: 100ms\nstatusInterval: 1s";

/// Every value type the contract lists round-trips: `(after->>'col')::type` equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_round_trip_for_every_type() {
    let cluster = shared();
    let uri = fresh_db(cluster, "types").await;
    let db = connect(&uri).await;
    db.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE t (
            id int PRIMARY KEY,
            c_int2 int2, c_int4 int4, c_int8 int8,
            c_float4 float4, c_float8 float8, c_numeric numeric,
            c_bool bool, c_json json, c_jsonb jsonb,
            c_text text, c_varchar varchar(20), c_char char(3),
            c_timestamp timestamp, c_timestamptz timestamptz, c_date date, c_time time, c_interval interval,
            c_uuid uuid, c_bytea bytea, c_int_array int[], c_text_array text[], c_enum mood, c_inet inet,
            c_int4range int4range, c_money_like numeric(12,2)
         );",
    )
    .await
    .unwrap();
    // Buffer schema in the same database, so SQL can compare the two directly.
    let cfg = config(&manifest("types", &uri, &uri, &["public.t"], FAST));
    let mut r = start(cfg.clone(), RunOptions::default());
    r.streaming().await;
    db.batch_execute(
        r#"INSERT INTO t VALUES
          (1, 32767, -2147483648, 9223372036854775807, 3.4028235e38, 1.7976931348623157e308,
           12345678901234567890.123456789012345678901234567890, true, '{"a": [1, 2.50, "x"], "b": null}', '{"k": {"n": 1.000}}',
           E'line\nbreak\ttab "quoted" \\ backslash ünïcödé 🐘', 'short', 'ab',
           '2024-02-29 23:59:59.999999', '2024-02-29 23:59:59.123456+05:30', '2024-02-29', '13:45:00.5', '1 year 2 mons 3 days 04:05:06.7',
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', E'\\x00ff10', '{1,NULL,3}', '{"a b","c,d",NULL}', 'happy', '192.168.0.1/24',
           '[1,10)', 12.30),
          (2, -1, 0, -9223372036854775808, 'NaN', '-Infinity', 'NaN', false, '[]', '"just a string"',
           '', 'x', 'z', 'infinity', '-infinity', 'infinity', '00:00', '-1 day', '00000000-0000-0000-0000-000000000000', E'\\x', '{}', '{}', 'sad', '::1',
           'empty', 0),
          (3, NULL, NULL, NULL, 'Infinity', 5e-324, 'Infinity', NULL, NULL, 'null', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, -0.01);"#,
    )
    .await
    .unwrap();
    let lsn = wal_lsn(&db).await;
    r.checkpointed(lsn).await;
    r.stop().await.unwrap();

    let columns = table_columns(&db, "t").await;
    assert_eq!(columns.len(), 26);
    for (col, ty) in &columns {
        // Documents are embedded, so compare them as jsonb (json has no equality operator);
        // SQL NULL and a JSON null document both read as JSON null.
        let (lhs, rhs) = if ty == "json" || ty == "jsonb" {
            (
                format!("(e.after->'{col}')::jsonb"),
                format!("coalesce(t.{col}::jsonb, 'null')"),
            )
        } else {
            (format!("(e.after->>'{col}')::{ty}"), format!("t.{col}"))
        };
        let bad: i64 = db
            .query_one(
                &format!(
                    "SELECT count(*) FROM t JOIN philotes.cdc_events e
                       ON e.pipeline = 'test/types' AND e.table_name = 't' AND (e.after->>'id')::int = t.id
                     WHERE NOT (e.after::jsonb ? '{col}') OR {lhs} IS DISTINCT FROM {rhs}"
                ),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("compare {col} {ty}: {e}"))
            .get(0);
        assert_eq!(bad, 0, "column {col} ({ty}) differs from the source");
    }
    // The JSON types a consumer sees.
    let row = db
        .query_one(
            "SELECT json_typeof(after->'c_int8'), json_typeof(after->'c_numeric'), json_typeof(after->'c_bool'),
                    json_typeof(after->'c_jsonb'), json_typeof(after->'c_timestamptz'), after->>'c_bytea',
                    after->>'c_int8', after->>'c_numeric'
             FROM philotes.cdc_events WHERE pipeline = 'test/types' AND (after->>'id')::int = 1",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<Option<String>> = (0..8).map(|i| row.get(i)).collect();
    assert_eq!(
        got,
        [
            "number",
            "number",
            "boolean",
            "object",
            "string",
            "\\x00ff10",
            "9223372036854775807",
            "12345678901234567890.123456789012345678901234567890"
        ]
        .map(|s| Some(s.to_string()))
    );
    let specials = db
        .query_one(
            "SELECT json_typeof(after->'c_float4'), after->>'c_float4', json_typeof(after->'c_int2'), json_typeof(after->'c_jsonb')
             FROM philotes.cdc_events WHERE pipeline = 'test/types' AND (after->>'id')::int = 2",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(specials.get::<_, String>(0), "string");
    assert_eq!(specials.get::<_, String>(1), "NaN");
    assert_eq!(specials.get::<_, String>(2), "number");
    assert_eq!(specials.get::<_, String>(3), "string");
    let nulls = db
        .query_one(
            "SELECT json_typeof(after->'c_int2'), json_typeof(after->'c_jsonb') FROM philotes.cdc_events
             WHERE pipeline = 'test/types' AND (after->>'id')::int = 3",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(nulls.get::<_, String>(0), "null", "SQL NULL is JSON null");
    assert_eq!(
        nulls.get::<_, String>(1),
        "null",
        "jsonb 'null' stays JSON null"
    );
    // Images keep the columns in table order (json, not jsonb, which would sort the keys).
    let keys: Vec<String> = column(
        &db,
        "SELECT json_object_keys(after) FROM philotes.cdc_events
         WHERE pipeline = 'test/types' AND (after->>'id')::int = 1",
    )
    .await;
    let names: Vec<String> = columns.iter().map(|(c, _)| c.clone()).collect();
    assert_eq!(keys, names);
}

/// INSERT/UPDATE/DELETE images, unchanged TOAST values, and REPLICA IDENTITY FULL vs DEFAULT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toast_and_replica_identity() {
    let (src, buf, db) = databases_with(
        "toast",
        "CREATE TABLE dflt (id int PRIMARY KEY, n int, big text);
         CREATE TABLE full_id (id int PRIMARY KEY, n int, big text);
         ALTER TABLE full_id REPLICA IDENTITY FULL;",
    )
    .await;
    let cfg = config(&manifest(
        "toast",
        &src,
        &buf,
        &["public.dflt", "public.full_id"],
        FAST,
    ));
    let mut r = start(cfg.clone(), RunOptions::default());
    r.streaming().await;
    // ~200 KB of incompressible text: stored out of line (TOASTed).
    let big = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 6000) i)";
    for table in ["dflt", "full_id"] {
        db.batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 0, {big});
             UPDATE {table} SET n = 1 WHERE id = 1;
             UPDATE {table} SET id = 2 WHERE id = 1;
             DELETE FROM {table} WHERE id = 2;"
        ))
        .await
        .unwrap();
    }
    let lsn = wal_lsn(&db).await;
    r.checkpointed(lsn).await;
    r.stop().await.unwrap();

    let buffer = connect(&buf).await;
    let ev = events(&buffer, "philotes", "test/toast").await;
    let ops: Vec<(&str, &str)> = ev
        .iter()
        .map(|e| (e.table.as_str(), e.operation.as_str()))
        .collect();
    assert_eq!(
        ops,
        [
            ("dflt", "INSERT"),
            ("dflt", "UPDATE"),
            ("dflt", "UPDATE"),
            ("dflt", "DELETE"),
            ("full_id", "INSERT"),
            ("full_id", "UPDATE"),
            ("full_id", "UPDATE"),
            ("full_id", "DELETE"),
        ]
    );
    let big_len = 6000 * 32;
    let d = &ev[..4];
    assert_eq!(
        d[0].after.as_ref().unwrap()["big"].as_str().unwrap().len(),
        big_len
    );
    assert_eq!(d[0].key_columns, ["id"]);
    // The unchanged TOASTed value is absent, not null.
    let upd = d[1].after.as_ref().unwrap();
    assert_eq!(upd["n"], 1);
    assert!(
        upd.get("big").is_none(),
        "unchanged TOAST must be absent: {upd}"
    );
    assert_eq!(
        d[1].before, None,
        "default identity sends no old row when the key is unchanged"
    );
    // Key change: the old key, and only the key.
    assert_eq!(d[2].before, Some(serde_json::json!({"id": 1})));
    assert_eq!(d[3].before, Some(serde_json::json!({"id": 2})));
    assert_eq!(d[3].after, None);

    let f = &ev[4..];
    assert_eq!(f[0].key_columns, ["id", "n", "big"]);
    let before = f[1].before.as_ref().expect("FULL sends the old row");
    assert_eq!(before["n"], 0);
    assert_eq!(
        before["big"].as_str().unwrap().len(),
        big_len,
        "the whole old row"
    );
    let del = f[3].before.as_ref().unwrap();
    assert_eq!((del["id"].clone(), del["n"].clone()), (2.into(), 1.into()));
}

/// TRUNCATE gives one event per table; ALTER TABLE mid-stream is recorded in cdc_relations
/// and later events carry the new column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_and_alter_table_mid_stream() {
    let (src, buf, db) = databases_with(
        "ddl",
        "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY);",
    )
    .await;
    let cfg = config(&manifest("ddl", &src, &buf, &["a", "b"], FAST));
    let mut r = start(cfg.clone(), RunOptions::default());
    r.streaming().await;
    // Each statement its own transaction.
    for sql in [
        "INSERT INTO a VALUES (1, 'one')",
        "INSERT INTO b VALUES (1)",
        "ALTER TABLE a ADD COLUMN extra numeric DEFAULT 1.5",
        "INSERT INTO a VALUES (2, 'two', 2.25)",
        "ALTER TABLE a ALTER COLUMN v TYPE varchar(10)",
        "UPDATE a SET v = 'deux' WHERE id = 2",
        "TRUNCATE a, b",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    let lsn = wal_lsn(&db).await;
    r.checkpointed(lsn).await;
    r.stop().await.unwrap();

    let buffer = connect(&buf).await;
    let ev = events(&buffer, "philotes", "test/ddl").await;
    let ops: Vec<(&str, &str, i32)> = ev
        .iter()
        .map(|e| (e.table.as_str(), e.operation.as_str(), e.seq))
        .collect();
    assert_eq!(
        ops,
        [
            ("a", "INSERT", 0),
            ("b", "INSERT", 0),
            ("a", "INSERT", 0),
            ("a", "UPDATE", 0),
            ("a", "TRUNCATE", 0),
            ("b", "TRUNCATE", 1),
        ]
    );
    assert_eq!(
        ev[4].commit_lsn, ev[5].commit_lsn,
        "one TRUNCATE, one transaction"
    );
    assert_eq!(ev[4].before, None);
    assert_eq!(ev[4].after, None);
    assert_eq!(
        ev[2].after,
        Some(serde_json::json!({"id": 2, "v": "two", "extra": 2.25}))
    );
    // Table definitions over time: before and after each ALTER.
    let defs = buffer
        .query(
            "SELECT commit_lsn::text, seq, columns FROM philotes.cdc_relations
             WHERE pipeline = 'test/ddl' AND table_name = 'a' ORDER BY cdc_relations.commit_lsn, seq",
            &[],
        )
        .await
        .unwrap();
    let shapes: Vec<Vec<(String, i64)>> = defs
        .iter()
        .map(|r| {
            let cols: serde_json::Value = r.get(2);
            cols.as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c["name"].as_str().unwrap().to_string(),
                        c["type_modifier"].as_i64().unwrap(),
                    )
                })
                .collect()
        })
        .collect();
    assert_eq!(
        shapes,
        vec![
            vec![("id".to_string(), -1), ("v".to_string(), -1)],
            vec![
                ("id".to_string(), -1),
                ("v".to_string(), -1),
                ("extra".to_string(), -1)
            ],
            vec![
                ("id".to_string(), -1),
                ("v".to_string(), 14),
                ("extra".to_string(), -1)
            ],
        ]
    );
    // Each definition starts at the event it first describes.
    assert_eq!(defs[1].get::<_, String>(0), ev[2].commit_lsn);
    assert_eq!(defs[2].get::<_, String>(0), ev[3].commit_lsn);
}

/// Interleaved transactions land in commit order, each with its own xid and seq from 0, and
/// rolled-back work never lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_transactions_land_in_commit_order() {
    let (src, buf, setup) =
        databases_with("order", "CREATE TABLE t (id int PRIMARY KEY, who text)").await;
    let cfg = config(&manifest("order", &src, &buf, &["t"], FAST));
    let mut r = start(cfg.clone(), RunOptions::default());
    r.streaming().await;
    let a = connect(&src).await;
    let b = connect(&src).await;
    let c = connect(&src).await;
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1, 'a')")
        .await
        .unwrap();
    b.batch_execute("BEGIN; INSERT INTO t VALUES (2, 'b')")
        .await
        .unwrap();
    c.batch_execute("BEGIN; INSERT INTO t VALUES (99, 'rolled back')")
        .await
        .unwrap();
    a.batch_execute("INSERT INTO t VALUES (3, 'a')")
        .await
        .unwrap();
    b.batch_execute("INSERT INTO t VALUES (4, 'b'); COMMIT")
        .await
        .unwrap();
    c.batch_execute("ROLLBACK").await.unwrap();
    a.batch_execute("INSERT INTO t VALUES (5, 'a'); COMMIT")
        .await
        .unwrap();
    let lsn = wal_lsn(&setup).await;
    r.checkpointed(lsn).await;
    r.stop().await.unwrap();

    let ev = events(&connect(&buf).await, "philotes", "test/order").await;
    let got: Vec<(i64, i32)> = ev
        .iter()
        .map(|e| (e.after.as_ref().unwrap()["id"].as_i64().unwrap(), e.seq))
        .collect();
    assert_eq!(got, [(2, 0), (4, 1), (1, 0), (3, 1), (5, 2)]);
    assert_ne!(ev[0].xid, ev[2].xid);
    assert!(ev[0].commit_lsn < ev[2].commit_lsn);
}

/// When the captured tables are idle but the source is busy elsewhere, the checkpoint and the
/// slot's confirmed position still advance, so the source does not retain WAL for us.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tables_do_not_hold_back_the_slot() {
    let (src, buf, db) = databases_with(
        "idle",
        "CREATE TABLE captured (id int PRIMARY KEY); CREATE TABLE other (id int)",
    )
    .await;
    let cfg = config(&manifest("idle", &src, &buf, &["captured"], FAST));
    let mut r = start(cfg.clone(), RunOptions::default());
    r.streaming().await;
    let before = wal_lsn(&db).await;
    db.batch_execute("INSERT INTO other SELECT generate_series(1, 20000)")
        .await
        .unwrap();
    let after = wal_lsn(&db).await;
    assert!(after > before + 100_000, "the workload wrote WAL");
    r.checkpointed(after).await;
    slot_confirmed(&db, &cfg.slot, after).await;
    r.stop().await.unwrap();
    let ev = events(&connect(&buf).await, "philotes", "test/idle").await;
    assert!(ev.is_empty(), "nothing captured from an uncaptured table");
}

/// --until-caught-up semantics, restart from the checkpoint without duplicates, and the
/// publication and slot being adopted on the second start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_checkpoint_exactly_once() {
    let (src, buf, db) = databases_with("resume", "CREATE TABLE t (id int PRIMARY KEY)").await;
    // Small batches: a transaction is written in several buffer transactions.
    let cfg = config(&manifest(
        "resume",
        &src,
        &buf,
        &["t"],
        "batchSize: 7\nflushInterval: 50ms",
    ));
    assert_eq!(catch_up(&cfg).await, Outcome::CaughtUp);
    db.batch_execute("INSERT INTO t SELECT generate_series(1, 100)")
        .await
        .unwrap();
    assert_eq!(catch_up(&cfg).await, Outcome::CaughtUp);
    db.batch_execute(
        "INSERT INTO t SELECT generate_series(101, 150); DELETE FROM t WHERE id <= 10",
    )
    .await
    .unwrap();
    assert_eq!(catch_up(&cfg).await, Outcome::CaughtUp);
    assert_eq!(
        catch_up(&cfg).await,
        Outcome::CaughtUp,
        "nothing new: returns at once"
    );

    let buffer = connect(&buf).await;
    let ev = events(&buffer, "philotes", "test/resume").await;
    assert_eq!(ev.len(), 160);
    let inserted: Vec<i64> = ev
        .iter()
        .filter(|e| e.operation == "INSERT")
        .map(|e| e.after.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    assert_eq!(inserted, (1..=150).collect::<Vec<_>>());
    let ckpt = buffer
        .query_one(
            "SELECT events_total, lsn >= $1::text::pg_lsn FROM philotes.cdc_checkpoints WHERE pipeline = 'test/resume'",
            &[&philotes::pipeline::lsn::format(wal_lsn(&db).await - 1)],
        )
        .await
        .unwrap();
    assert_eq!(ckpt.get::<_, i64>(0), 160);
    let pubs: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname = 'philotes_test_resume'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pubs, 1);
}

/// Standalone mode prints the status every statusInterval: a human line by default, JSON
/// fields with --log-format json, with positions, lag, slot WAL status, events and a verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_printed_every_interval_as_text_and_json() {
    let (src, buf, db) = databases_with("status", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let file = manifest_file(&manifest(
        "status",
        &src,
        &buf,
        &["t"],
        "flushInterval: 50ms\nstatusInterval: 200ms",
    ));
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 0, "{out}");
    db.batch_execute("INSERT INTO t SELECT generate_series(1, 42)")
        .await
        .unwrap();

    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["--log-format", "json", "run", "-f"])
        .arg(file.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log.path()).unwrap())
        .spawn()
        .map(Proc)
        .unwrap();
    let line = eventually(
        "a healthy status line with 42 events",
        Duration::from_secs(30),
        || {
            let path = log.path().to_path_buf();
            async move {
                let text = std::fs::read_to_string(path).ok()?;
                text.lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|v| v["health"] == "Healthy" && v["events_total"] == 42)
            }
        },
    )
    .await;
    sigterm(&child);
    assert!(child.wait().unwrap().success());
    assert_eq!(line["pipeline"], "test/status");
    assert_eq!(line["reason"], "Streaming");
    assert_eq!(line["wal_status"], "reserved");
    assert!(line["lag_bytes"].as_i64().unwrap() >= 0);
    for field in [
        "last_received_lsn",
        "checkpoint_lsn",
        "current_wal_lsn",
        "last_checkpoint_time",
    ] {
        assert!(
            line[field].as_str().is_some_and(|s| !s.is_empty()),
            "{field} missing in {line}"
        );
    }
    assert!(line["message"].as_str().unwrap().contains("lag"), "{line}");

    // Text form: one compact line.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = spawn_run(file.path(), &[], log.path());
    let text = eventually("a human status line", Duration::from_secs(30), || {
        let path = log.path().to_path_buf();
        async move {
            let text = std::fs::read_to_string(path).ok()?;
            text.lines()
                .find(|l| l.contains("test/status Healthy (Streaming): lag"))
                .map(str::to_string)
        }
    })
    .await;
    assert!(text.contains("42 events"), "{text}");
    kill9(&mut child);
}

/// A buffer written by an older Philotes (schema version 1, jsonb images) is migrated in
/// place: what it holds is kept, and new events land next to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_buffer_is_migrated_and_kept() {
    let uri = fresh_db(shared(), "migrate").await;
    let db = connect(&uri).await;
    db.batch_execute(&format!(
        "CREATE SCHEMA philotes;
         SET search_path TO philotes;
         {}
         CREATE TABLE philotes_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO philotes_migrations (version, name, applied_at) VALUES (1, '0001_init.sql', now() - interval '1 day');
         INSERT INTO cdc_events VALUES ('old/pipeline', '0/10', 0, '0/8', 5, '2026-01-01', 'public', 'old', 'INSERT', '{{id}}',
                                        NULL, '{{\"id\": 1, \"v\": \"kept\"}}');
         RESET search_path;
         CREATE TABLE t (id int PRIMARY KEY, v text);
         DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'philotes_test_reader') THEN
                 CREATE ROLE philotes_test_reader;
             END IF;
         END $$;
         GRANT USAGE ON SCHEMA philotes TO philotes_test_reader;
         GRANT SELECT ON philotes.cdc_events TO philotes_test_reader;",
        include_str!("../migrations/0001_init.sql")
    ))
    .await
    .unwrap();
    let cfg = config(&manifest("migrate", &uri, &uri, &["t"], FAST));
    catch_up(&cfg).await;
    db.execute("INSERT INTO t VALUES (2, 'new')", &[])
        .await
        .unwrap();
    catch_up(&cfg).await;

    // The record moved to sqlx's migrator: every version, successful, with the checksum of
    // the embedded file; version 1 keeps the time the old runner applied it.
    let versions: Vec<i64> = column(
        &db,
        "SELECT version FROM philotes._sqlx_migrations WHERE success ORDER BY version",
    )
    .await;
    let all: Vec<i64> = philotes::pipeline::migrate::MIGRATOR
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(versions, all);
    assert!(all.len() >= 4, "{all:?}");
    let checksums: Vec<Vec<u8>> = column(
        &db,
        "SELECT checksum FROM philotes._sqlx_migrations ORDER BY version",
    )
    .await;
    let embedded: Vec<Vec<u8>> = philotes::pipeline::migrate::MIGRATOR
        .iter()
        .map(|m| m.checksum.to_vec())
        .collect();
    assert_eq!(checksums, embedded);
    let kept: Vec<bool> = column(
        &db,
        "SELECT installed_on < now() - interval '1 second' FROM philotes._sqlx_migrations WHERE version = 1",
    )
    .await;
    assert_eq!(kept, [true]);
    let legacy: Vec<bool> = column(
        &db,
        "SELECT to_regclass('philotes.philotes_migrations') IS NULL",
    )
    .await;
    assert_eq!(legacy, [true]);
    let types: Vec<String> = column(
        &db,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
         WHERE attrelid = 'philotes.cdc_events'::regclass AND attname IN ('before', 'after') ORDER BY attname",
    )
    .await;
    assert_eq!(types, ["json", "json"]);
    let old = events(&db, "philotes", "old/pipeline").await;
    assert_eq!(old.len(), 1);
    assert_eq!(
        old[0].after,
        Some(serde_json::json!({"id": 1, "v": "kept"}))
    );
    let moved: Vec<String> = column(
        &db,
        "SELECT t.schema_name || '.' || t.table_name || ' ' || t.id::text || ' ' || e.operation::text
         FROM philotes.cdc_event_log e JOIN philotes.cdc_tables t ON t.pipeline_id = e.pipeline_id AND t.id = e.table_id
         WHERE t.id < 0",
    )
    .await;
    assert_eq!(moved, ["public.old -1 I"]);
    // A consumer's privilege on the table carries over to the view and the tables behind it.
    let readable: Vec<bool> = column(
        &db,
        "SELECT has_table_privilege('philotes_test_reader', 'philotes.' || t, 'SELECT')
         FROM unnest(ARRAY['cdc_events', 'cdc_event_log', 'cdc_tables', 'cdc_pipelines']) t",
    )
    .await;
    assert_eq!(readable, [true; 4]);
    let new = events(&db, "philotes", "test/migrate").await;
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].after, Some(serde_json::json!({"id": 2, "v": "new"})));
}

/// A trigger a user put on the version-4 `cdc_events` table would be dropped with it by
/// migration 0005: the start is refused, naming it and what to do, and nothing is changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_on_the_old_event_table_stops_the_migration_by_name() {
    let uri = fresh_db(shared(), "migrate_trigger").await;
    let db = connect(&uri).await;
    let mut setup = String::from("CREATE SCHEMA philotes; SET search_path TO philotes;");
    for m in philotes::pipeline::migrate::MIGRATOR
        .iter()
        .filter(|m| m.version <= 4)
    {
        setup.push_str(&m.sql);
        setup.push(';');
    }
    setup.push_str(
        "CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
         CREATE TRIGGER audit_events AFTER INSERT ON cdc_events FOR EACH ROW EXECUTE FUNCTION audit();
         RESET search_path;
         CREATE TABLE t (id int PRIMARY KEY);",
    );
    db.batch_execute(&setup).await.unwrap();
    // What sqlx's migrator would have recorded for versions 1-4.
    db.batch_execute(
        "CREATE TABLE philotes._sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,
             installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL, checksum BYTEA NOT NULL,
             execution_time BIGINT NOT NULL)",
    )
    .await
    .unwrap();
    for m in philotes::pipeline::migrate::MIGRATOR
        .iter()
        .filter(|m| m.version <= 4)
    {
        db.execute(
            "INSERT INTO philotes._sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES ($1, $2, true, $3, 0)",
            &[&m.version, &m.description.to_string(), &m.checksum.to_vec()],
        )
        .await
        .unwrap();
    }
    let cfg = config(&manifest("migtrigger", &uri, &uri, &["t"], FAST));
    let err = start_fails(cfg, "a trigger on cdc_events refused").await;
    assert_eq!(err.reason(), "BufferNotReady", "{err}");
    let message = err.to_string();
    assert!(
        message.contains("audit_events") && message.contains("cdc_event_log"),
        "{message}"
    );
    let kind: Vec<String> = column(
        &db,
        "SELECT relkind::text FROM pg_class WHERE oid = 'philotes.cdc_events'::regclass",
    )
    .await;
    assert_eq!(kind, ["r"], "cdc_events is still the table");
}

/// A buffer left by the previous release (migrations 1 and 2 recorded by its own runner, a
/// checkpoint without identity) is upgraded in place on start and the pipeline resumes from
/// its checkpoint exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_of_the_previous_release_resumes_exactly_once() {
    let (src, buf, source) =
        databases_with("upgrade", "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let manifest = manifest("upgrade", &src, &buf, &["t"], FAST).replace(
        "    tables: ['t']\n",
        "    tables: ['t']\n    slot: upgrade_slot\n    publication: upgrade_pub\n",
    );
    let cfg = config(&manifest);
    catch_up(&cfg).await;
    source
        .batch_execute("INSERT INTO t SELECT i, 'before' FROM generate_series(1, 100) i")
        .await
        .unwrap();
    catch_up(&cfg).await;
    // What 0.1 left: its two migrations in philotes_migrations, no identity, no later tables,
    // its events in a table of their own.
    let buffer = connect(&buf).await;
    buffer
        .batch_execute(
            "CREATE TABLE philotes.events_0_1 AS SELECT * FROM philotes.cdc_events;
             DROP VIEW philotes.cdc_events;
             DROP TABLE philotes.cdc_event_log, philotes.cdc_tables, philotes.cdc_pipelines;
             ALTER TABLE philotes.events_0_1 RENAME TO cdc_events;
             ALTER TABLE philotes.cdc_events ADD PRIMARY KEY (pipeline, commit_lsn, seq);
             ALTER TABLE philotes.cdc_checkpoints DROP COLUMN system_identifier, DROP COLUMN timeline,
                 DROP COLUMN database, DROP COLUMN slot_name, DROP COLUMN publication_name, DROP COLUMN slot_start_lsn;
             DROP TABLE philotes.cdc_gaps, philotes.cdc_dead_letters, philotes.cdc_snapshots, philotes.cdc_writers,
                 philotes._sqlx_migrations;
             CREATE TABLE philotes.philotes_migrations (version integer PRIMARY KEY, name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO philotes.philotes_migrations (version, name) VALUES (1, '0001_init.sql'), (2, '0002_json_images.sql');",
        )
        .await
        .unwrap();
    source
        .batch_execute(
            "INSERT INTO t SELECT i, 'after' FROM generate_series(101, 150) i;
             UPDATE t SET v = 'updated' WHERE id <= 10;
             DELETE FROM t WHERE id > 140;",
        )
        .await
        .unwrap();
    catch_up(&cfg).await;

    let versions: Vec<i64> = column(
        &buffer,
        "SELECT version FROM philotes._sqlx_migrations WHERE success ORDER BY version",
    )
    .await;
    let all: Vec<i64> = philotes::pipeline::migrate::MIGRATOR
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(versions, all);
    // Upgrading copies nothing: the table was captured from its creation, and is recorded
    // as captured without a snapshot.
    let recorded: Vec<String> = column(
        &buffer,
        "SELECT request || ' ' || phase FROM philotes.cdc_snapshots WHERE pipeline = 'test/upgrade'",
    )
    .await;
    assert_eq!(recorded, ["skipped Skipped"]);
    // Every change exactly once: 150 inserts, 10 updates, 10 deletes, in commit order.
    let events = events(&buffer, "philotes", "test/upgrade").await;
    let ops = |op: &str| events.iter().filter(|e| e.operation == op).count();
    assert_eq!(
        (events.len(), ops("INSERT"), ops("UPDATE"), ops("DELETE")),
        (170, 150, 10, 10)
    );
    let mut ids: Vec<i64> = events
        .iter()
        .filter(|e| e.operation == "INSERT")
        .map(|e| e.after.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=150).collect::<Vec<_>>());
    // The 100 events written before the upgrade were moved into cdc_event_log (their table
    // got a negative id); the later ones reference the table by its hash.
    let moved: Vec<i64> = column(
        &buffer,
        "SELECT count(*) FROM philotes.cdc_event_log e JOIN philotes.cdc_tables t
           ON t.pipeline_id = e.pipeline_id AND t.id = e.table_id
         GROUP BY t.id < 0 ORDER BY t.id < 0",
    )
    .await;
    assert_eq!(moved, [70, 100]);
    // The checkpoint now knows what it is a checkpoint of.
    let identity: Vec<Option<String>> = column(
        &buffer,
        "SELECT slot_name FROM philotes.cdc_checkpoints WHERE pipeline = 'test/upgrade'",
    )
    .await;
    assert_eq!(identity, [Some("upgrade_slot".to_string())]);
    let report = philotes::verify::verify(&cfg).await.unwrap();
    assert!(report.ok(), "{report}");
}

/// A migration edited after a buffer applied it is refused by its checksum, with a reason
/// that says which and what to do, and nothing in the schema is changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_migration_is_refused() {
    let (src, buf, _source) = databases_with("edited", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let cfg = config(&manifest("edited", &src, &buf, &["t"], FAST));
    catch_up(&cfg).await;
    let buffer = connect(&buf).await;
    buffer
        .batch_execute("UPDATE philotes._sqlx_migrations SET checksum = '\\x00' WHERE version = 2")
        .await
        .unwrap();
    let err = start_fails(cfg.clone(), "an edited migration is refused").await;
    assert_eq!(err.reason(), "BufferNotReady", "{err}");
    let message = err.to_string();
    assert!(
        message.contains("migration 2") && message.contains("checksum"),
        "{message}"
    );
    let checksum: Vec<Vec<u8>> = column(
        &buffer,
        "SELECT checksum FROM philotes._sqlx_migrations WHERE version = 2",
    )
    .await;
    assert_eq!(checksum, [vec![0u8]]);
}

/// The version matrix runs what it says: with PHILOTES_PG_VERSION set, the server the tests
/// start is that major version (not whatever else is installed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_is_the_version_asked_for() {
    let uri = fresh_db(shared(), "version").await;
    let db = connect(&uri).await;
    let num: String = db
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap()
        .get(0);
    let major = num.parse::<u32>().unwrap() / 10_000;
    eprintln!("PostgreSQL server version {num}");
    if let Ok(asked) = std::env::var("PHILOTES_PG_VERSION") {
        assert_eq!(major.to_string(), asked, "server_version_num {num}");
    }
    assert!((14..=18).contains(&major), "unsupported {num}");
}

/// A partitioned table is captured under its own name from every partition, present and
/// future: the pipeline's own publication is adopted again after a restart, a partition
/// attached mid-stream is captured, a row moved between partitions by an UPDATE of the
/// partition key replays right, and a detached partition is no longer captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_is_captured_under_its_own_name() {
    let (src, buf, source) = databases_with(
        "parted",
        "CREATE TABLE m (id int, k int, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
         CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (100);
         CREATE TABLE m2 PARTITION OF m FOR VALUES FROM (100) TO (200);",
    )
    .await;
    let cfg = config(&manifest("parted", &src, &buf, &["m"], FAST));
    catch_up(&cfg).await;
    source
        .batch_execute("INSERT INTO m SELECT i, i % 200, 'first' FROM generate_series(1, 40) i")
        .await
        .unwrap();
    // A second start adopts the publication it created (its partitions are not its tables).
    catch_up(&cfg).await;
    let running = start(cfg.clone(), RunOptions::default());
    source
        .batch_execute(
            "CREATE TABLE m3 (id int NOT NULL, k int NOT NULL, v text);
             ALTER TABLE m ATTACH PARTITION m3 FOR VALUES FROM (200) TO (300);
             INSERT INTO m SELECT i, 200 + i, 'attached' FROM generate_series(41, 60) i;
             UPDATE m SET k = 150, v = 'moved' WHERE id IN (1, 2, 3);
             UPDATE m SET k = 250, v = 'moved again' WHERE id = 1;
             DELETE FROM m WHERE id = 41;",
        )
        .await
        .unwrap();
    let target = wal_lsn(&source).await;
    let mut running = running;
    running.checkpointed(target).await;
    running.stop().await.unwrap();
    let buffer = connect(&buf).await;
    let all = events(&buffer, "philotes", "test/parted").await;
    assert!(
        all.iter().all(|e| e.schema == "public" && e.table == "m"),
        "{:?}",
        all.iter().map(|e| &e.table).collect::<Vec<_>>()
    );
    let report = philotes::verify::verify(&cfg).await.unwrap();
    assert!(report.ok(), "{report}");

    // Detached, m1 is its own table again: its changes are not the pipeline's.
    source
        .batch_execute(
            "ALTER TABLE m DETACH PARTITION m1;
             INSERT INTO m1 VALUES (900, 9, 'detached');
             INSERT INTO m VALUES (901, 120, 'still captured');",
        )
        .await
        .unwrap();
    catch_up(&cfg).await;
    let after: Vec<i64> = events(&buffer, "philotes", "test/parted")
        .await
        .iter()
        .filter_map(|e| e.after.as_ref()?["id"].as_i64())
        .filter(|id| *id >= 900)
        .collect();
    assert_eq!(after, [901]);
}

/// A buffer schema whose name needs quoting (a space, capitals, a backslash) is created,
/// migrated and written like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_schema_name_that_needs_quoting_works() {
    let (src, buf, source) = databases_with("quoted", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let manifest = manifest("quoted", &src, &buf, &["t"], FAST).replace(
        "{name: buf}\n",
        "{name: buf}\n    schema: 'Change Log\\v2'\n",
    );
    let cfg = config(&manifest);
    assert_eq!(cfg.buffer_schema, "Change Log\\v2");
    catch_up(&cfg).await;
    source
        .batch_execute("INSERT INTO t SELECT generate_series(1, 5)")
        .await
        .unwrap();
    catch_up(&cfg).await;
    let buffer = connect(&buf).await;
    assert_eq!(
        events(&buffer, "Change Log\\v2", "test/quoted").await.len(),
        5
    );
    let versions: Vec<i64> = column(
        &buffer,
        r#"SELECT version FROM "Change Log\v2"._sqlx_migrations ORDER BY version"#,
    )
    .await;
    let all: Vec<i64> = philotes::pipeline::migrate::MIGRATOR
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(versions, all);
}

/// A buffer configured with synchronous_commit = off does not make Philotes confirm what a
/// crash of the buffer server could still lose: its writes commit with synchronous_commit on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_commits_synchronously_whatever_the_buffer_says() {
    let (src, buf, source) =
        databases_with("synccommit", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let buffer = connect(&buf).await;
    // Every checkpoint write records the setting of the session that makes it.
    buffer
        .batch_execute(
            "ALTER DATABASE synccommit_buf SET synchronous_commit = off;
             CREATE TABLE public.seen (setting text);
             CREATE FUNCTION public.record_setting() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO public.seen VALUES (current_setting('synchronous_commit'));
               RETURN NEW;
             END $$;",
        )
        .await
        .unwrap();
    let cfg = config(&manifest("synccommit", &src, &buf, &["t"], FAST));
    catch_up(&cfg).await;
    buffer
        .batch_execute(
            "CREATE TRIGGER seen AFTER INSERT OR UPDATE ON philotes.cdc_checkpoints
               FOR EACH ROW EXECUTE FUNCTION public.record_setting()",
        )
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO t SELECT generate_series(1, 10)")
        .await
        .unwrap();
    catch_up(&cfg).await;
    // A new session of the buffer database gets the database's setting...
    let other = connect(&buf).await;
    let default: String = other
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(default, "off");
    // ...but every checkpoint was written with it on.
    let seen: Vec<String> = column(&buffer, "SELECT DISTINCT setting FROM public.seen").await;
    assert_eq!(seen, ["on"]);
}

/// The status reads what each version tells of a slot in danger: `safe_wal_size` against
/// `max_slot_wal_keep_size` (warned before the limit, `WalAtRisk`), and once the server
/// invalidates the slot, `WalLost` with its `invalidation_reason` (PostgreSQL 17+).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_near_max_slot_wal_keep_size_is_reported_then_its_invalidation() {
    let c = own_cluster(philotes::embedded::ClusterOptions {
        extra_conf: vec![
            "max_slot_wal_keep_size = '64MB'".into(),
            "wal_keep_size = 0".into(),
            "min_wal_size = '32MB'".into(),
            // No checkpoint of its own before the test asks for one.
            "max_wal_size = '1GB'".into(),
        ],
        ..Default::default()
    });
    let uri = fresh_db(&c, "risk").await;
    let db = connect(&uri).await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    db.batch_execute("SELECT pg_create_logical_replication_slot('risk', 'pgoutput')")
        .await
        .unwrap();
    let version = server_version(&db).await;
    let cfg = {
        let mut cfg = config(&manifest("risk", &uri, &uri, &["t"], ""));
        cfg.slot = "risk".into();
        cfg
    };
    let streaming = philotes::pipeline::Progress {
        state: philotes::pipeline::State::Streaming,
        ..Default::default()
    };
    let assess = |stats: &philotes::pipeline::source::SlotStats| {
        philotes::pipeline::status::assess(&cfg, &streaming, Some(stats), None)
    };
    // WAL the slot holds, one segment at a time, until less than a fifth of the limit is left.
    let mut k = 0;
    let stats = loop {
        let stats = philotes::pipeline::source::slot_stats(&db, "risk")
            .await
            .unwrap();
        assert_eq!(stats.max_slot_wal_keep_size, Some(64 * 1024 * 1024));
        if stats
            .safe_wal_size
            .is_some_and(|s| s < 64 * 1024 * 1024 / 5)
        {
            break stats;
        }
        assert_eq!(assess(&stats).reason, "Streaming", "{stats:?}");
        assert!(k < 10, "safe_wal_size never fell: {stats:?}");
        db.batch_execute(&format!("INSERT INTO t VALUES ({k})"))
            .await
            .unwrap();
        db.batch_execute("SELECT pg_switch_wal()").await.unwrap();
        k += 1;
    };
    let s = assess(&stats);
    assert_eq!(s.reason, "WalAtRisk", "{stats:?}");
    assert!(
        s.message.contains("before max_slot_wal_keep_size"),
        "{}",
        s.message
    );
    // Past the limit and a checkpoint: the server invalidates the slot.
    for i in 0..6 {
        db.batch_execute(&format!("INSERT INTO t VALUES ({})", 100 + i))
            .await
            .unwrap();
        db.batch_execute("SELECT pg_switch_wal()").await.unwrap();
    }
    db.batch_execute("CHECKPOINT").await.unwrap();
    let stats = philotes::pipeline::source::slot_stats(&db, "risk")
        .await
        .unwrap();
    assert_eq!(stats.wal_status.as_deref(), Some("lost"), "{stats:?}");
    let s = assess(&stats);
    assert_eq!(s.reason, "WalLost");
    if version >= 170000 {
        assert_eq!(stats.invalidation_reason.as_deref(), Some("wal_removed"));
        assert!(s.message.contains("(wal_removed)"), "{}", s.message);
        assert!(stats.inactive_since.is_some(), "{stats:?}");
    } else {
        assert_eq!(stats.invalidation_reason, None);
    }
    // PostgreSQL 18 also invalidates slots idle for idle_replication_slot_timeout.
    if version >= 180000 {
        db.batch_execute("ALTER SYSTEM SET idle_replication_slot_timeout = '10min'")
            .await
            .unwrap();
        db.batch_execute("SELECT pg_reload_conf()").await.unwrap();
        db.batch_execute("SELECT pg_create_logical_replication_slot('idle', 'pgoutput')")
            .await
            .unwrap();
        let stats = eventually("the timeout visible", Duration::from_secs(10), || {
            let db = &db;
            async move {
                let s = philotes::pipeline::source::slot_stats(db, "idle")
                    .await
                    .unwrap();
                s.idle_timeout_seconds.is_some().then_some(s)
            }
        })
        .await;
        assert_eq!(stats.idle_timeout_seconds, Some(600), "{stats:?}");
        assert!(
            !stats.active && stats.inactive_seconds.is_some(),
            "{stats:?}"
        );
    }
}

/// A table listed with a column list and a row filter (PostgreSQL 15+): only those columns
/// and the matching rows are captured (a row updated out of the filter arrives as a DELETE,
/// into it as an INSERT), the pipeline adopts its own publication again, verify compares
/// in part, a publication whose filter the spec does not ask for is refused, and a condition
/// that tries to add a table leaves nothing behind. On 14: a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_lists_and_row_filters_capture_in_part() {
    let (src, buf, source) = databases_with(
        "filtered",
        "CREATE TABLE f (id int PRIMARY KEY, name text, secret text, status text);
         CREATE TABLE g (id int PRIMARY KEY);",
    )
    .await;
    let version = server_version(&source).await;
    let with_tables = |tables: &str| {
        config(
            &manifest("filtered", &src, &buf, &["f"], FAST)
                .replace("tables: ['f']", &format!("tables: {tables}")),
        )
    };
    let cfg = with_tables(r#"[{name: f, columns: [id, name, status], where: "id < 100"}]"#);
    if version < 150000 {
        let err = start_fails(cfg.clone(), "refused on 14").await;
        assert!(
            err.to_string().contains("needs PostgreSQL 15 or newer")
                && err.to_string().contains("spec.source.tables[0]"),
            "{err}"
        );
        return;
    }
    catch_up(&cfg).await;
    source
        .batch_execute(
            "INSERT INTO f VALUES (1, 'a', 's1', 'ok'), (150, 'b', 's2', 'ok'), (3, 'c', 's3', 'ok');
             UPDATE f SET id = 101 WHERE id = 1;
             UPDATE f SET id = 50, name = 'b2' WHERE id = 150;
             UPDATE f SET name = 'c2' WHERE id = 3;",
        )
        .await
        .unwrap();
    // The second start adopts the publication it created (same columns and filter).
    catch_up(&cfg).await;
    let buffer = connect(&buf).await;
    let events = events(&buffer, "philotes", "test/filtered").await;
    let ops: Vec<(String, i64)> = events
        .iter()
        .map(|e| {
            let image = e.after.as_ref().or(e.before.as_ref()).unwrap();
            (e.operation.clone(), image["id"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(
        ops,
        [
            ("INSERT".to_string(), 1),
            ("INSERT".to_string(), 3),
            ("DELETE".to_string(), 1),
            ("INSERT".to_string(), 50),
            ("UPDATE".to_string(), 3),
        ]
    );
    for e in &events {
        if let Some(after) = &e.after {
            assert!(after.get("secret").is_none(), "{after}");
        }
    }
    let report = philotes::verify::verify(&cfg).await.unwrap();
    assert!(report.ok(), "{report}");

    // A publication filtering what the spec does not ask for captures less: refused.
    source
        .batch_execute("CREATE PUBLICATION narrower FOR TABLE f WHERE (id > 5)")
        .await
        .unwrap();
    let mut plain = with_tables("[f]");
    plain.id = "test/plain".into();
    plain.slot = "plain_slot".into();
    plain.publication = "narrower".into();
    let err = start_fails(plain, "a narrower publication is refused").await;
    assert!(
        err.to_string().contains("rows WHERE") && err.to_string().contains("rows all"),
        "{err}"
    );

    // A condition on a column outside the replica identity would make the source refuse
    // every UPDATE of the table: refused before anything is created.
    let mut outside = with_tables(r#"[{name: f, where: "status <> 'hidden'"}]"#);
    outside.id = "test/outside".into();
    outside.slot = "outside_slot".into();
    outside.publication = "outside_pub".into();
    let err = start_fails(outside, "refused").await;
    assert!(
        err.to_string().contains("replica identity")
            && err.to_string().contains("nothing was created"),
        "{err}"
    );
    source
        .batch_execute("UPDATE f SET status = 'still writable'")
        .await
        .expect("the source's updates still work");

    // A condition that closes its parenthesis to add a table: nothing is left behind.
    let mut sneaky = with_tables(r#"[{name: f, where: "true), TABLE g WHERE (true"}]"#);
    sneaky.id = "test/sneaky".into();
    sneaky.slot = "sneaky_slot".into();
    sneaky.publication = "sneaky_pub".into();
    let err = start_fails(sneaky, "refused").await;
    assert!(err.to_string().contains("spec.source.tables"), "{err}");
    let left: i64 = source
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname IN ('sneaky_pub', 'outside_pub')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

/// Counts the events of every buffer transaction the pipeline commits.
#[derive(Default)]
struct Batches(std::sync::Mutex<Vec<u64>>);

impl philotes::pipeline::BatchObserver for Batches {
    fn batch_written(&self, _: &str, counts: &[philotes::pipeline::buffer::Count], _: Duration) {
        let events = counts.iter().map(|c| c.events).sum();
        self.0.lock().unwrap().push(events);
    }
}

/// Group commit (README: Freshness): a transaction is durable, and confirmed to the source, as
/// soon as the stream has nothing more and the writer is idle, not when `flushInterval` (here
/// an hour) expires; under a burst, changes gather while the writer commits, so a buffer
/// transaction holds many of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_durable_without_waiting_for_flush_interval() {
    let (src, buf, db) = databases_with("fresh", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let cfg = config(&manifest(
        "fresh",
        &src,
        &buf,
        &["t"],
        "flushInterval: 1h\nstatusInterval: 1s",
    ));
    let batches = std::sync::Arc::new(Batches::default());
    let mut r = start(
        cfg.clone(),
        RunOptions {
            observer: Some(batches.clone()),
            ..RunOptions::default()
        },
    );
    r.streaming().await;
    let buffer = connect(&buf).await;
    // One transaction at a time: each is durable before the next is written.
    for id in 1..=20 {
        db.execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .unwrap();
        r.wait(
            &format!("transaction {id} to be durable"),
            Duration::from_secs(30),
            |p| p.events_total >= i64::from(id),
        )
        .await;
        let n: i64 = buffer
            .query_one(
                "SELECT count(*) FROM philotes.cdc_events WHERE pipeline = 'test/fresh'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, i64::from(id), "transaction {id} is in the buffer");
    }
    // The source is told: its slot follows the checkpoint.
    let last: String = buffer
        .query_one(
            "SELECT lsn::text FROM philotes.cdc_checkpoints WHERE pipeline = 'test/fresh'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let last = philotes::pipeline::lsn::parse(&last).unwrap();
    slot_confirmed(&db, &cfg.slot, last).await;
    // A burst of 3,000 one-row transactions.
    db.batch_execute(
        "CREATE PROCEDURE burst() LANGUAGE plpgsql AS $$ BEGIN
           FOR i IN 21..3020 LOOP INSERT INTO t VALUES (i); COMMIT; END LOOP; END $$",
    )
    .await
    .unwrap();
    db.batch_execute("CALL burst()").await.unwrap();
    r.wait("the burst to be durable", Duration::from_secs(60), |p| {
        p.events_total >= 3020
    })
    .await;
    r.stop().await.unwrap();
    let ev = events(&buffer, "philotes", "test/fresh").await;
    let ids: Vec<i64> = ev
        .iter()
        .map(|e| e.after.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ids,
        (1..=3020).collect::<Vec<_>>(),
        "every change once, in commit order"
    );
    let sizes = batches.0.lock().unwrap().clone();
    assert_eq!(sizes.iter().sum::<u64>(), 3020);
    assert!(
        sizes.iter().any(|&n| n > 1),
        "under the burst, buffer transactions grew beyond one change: {sizes:?}"
    );
}
