//! The reliability suite: crashes in exact windows, a read-only buffer, hostile names and
//! values, secrets that must not leak — each checked with `philotes verify`, which these
//! tests also prove can fail.

mod common;

use std::time::Duration;

use common::*;
use philotes::pipeline::{RunOptions, State};
use philotes::verify;

async fn verified(cfg: &philotes::pipeline::PipelineConfig) -> verify::Report {
    let report = verify::verify(cfg).await.expect("verify runs");
    // (`behind` may be set: other tests write WAL on the same server.)
    assert!(report.ok(), "verify found problems:\n{report}");
    report
}

/// A crash after the buffer committed a batch and before the source was told: the restart
/// receives those changes again and must not write them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_buffer_commit_and_acknowledgement() {
    let (src, buf, source) = databases_with("failpoint", WORKLOAD_TABLE).await;
    let text = manifest(
        "failpoint",
        &src,
        &buf,
        &["w"],
        "batchSize: 50\nflushInterval: 50ms",
    );
    let file = manifest_file(&text);
    let cfg = config(&text);
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 0, "{out}");
    let mut w = Workload::new();
    let crashes = 5;
    for _ in 0..crashes {
        for _ in 0..60 {
            w.step(&source).await;
        }
        let out = std::process::Command::new(bin())
            .args(["run", "-f"])
            .arg(file.path())
            .env("PHILOTES_FAILPOINT", "after-buffer-commit")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("failpoint after-buffer-commit"), "{text}");
        // The window was hit: the buffer is ahead of what the source was told.
        let buffer = connect(&buf).await;
        let ckpt: String = buffer
            .query_one(
                "SELECT lsn::text FROM philotes.cdc_checkpoints WHERE pipeline = 'test/failpoint'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let confirmed: String = source
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'philotes_test_failpoint'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let (ckpt, confirmed) = (
            philotes::pipeline::lsn::parse(&ckpt).unwrap(),
            philotes::pipeline::lsn::parse(&confirmed).unwrap(),
        );
        assert!(
            ckpt > confirmed,
            "crashed after writing, before acknowledging"
        );
    }
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 0, "{out}");
    verify_workload(&source, &connect(&buf).await, "test/failpoint", w.counts).await;
    verified(&cfg).await;
}

/// A transaction far larger than bufferSize, killed while it is being written, then resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_in_the_middle_of_a_transaction_larger_than_the_buffer() {
    let (src, buf, source) =
        databases_with("bigkill", "CREATE TABLE big (id int PRIMARY KEY, v text)").await;
    let text = manifest(
        "bigkill",
        &src,
        &buf,
        &["big"],
        "batchSize: 200\nbufferSize: 500\nflushInterval: 50ms",
    );
    let file = manifest_file(&text);
    let cfg = config(&text);
    assert_eq!(catch_up_cli(file.path()).0, 0);
    source
        .batch_execute(
            "INSERT INTO big SELECT i, repeat('v', 100) FROM generate_series(1, 60000) i",
        )
        .await
        .unwrap();
    let buffer = connect(&buf).await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut kills = 0;
    for _ in 0..3 {
        let before: i64 = buffer
            .query_one("SELECT count(*) FROM philotes.cdc_events", &[])
            .await
            .unwrap()
            .get(0);
        let mut child = spawn_run(file.path(), &[], log.path());
        let written = eventually(
            "part of the transaction to be written",
            Duration::from_secs(60),
            || {
                let buffer = &buffer;
                async move {
                    let n: i64 = buffer
                        .query_one("SELECT count(*) FROM philotes.cdc_events", &[])
                        .await
                        .ok()?
                        .get(0);
                    (n > before + 1000).then_some(n)
                }
            },
        )
        .await;
        if written >= 60000 {
            kill9(&mut child);
            break;
        }
        kill9(&mut child);
        kills += 1;
    }
    assert!(kills >= 1, "no kill landed mid-transaction");
    let mid: i64 = buffer
        .query_one(
            "SELECT count(*) FROM philotes.cdc_events WHERE pipeline = 'test/bigkill'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let ckpt_is_before_the_commit: bool = buffer
        .query_one(
            "SELECT lsn < (SELECT max(commit_lsn) FROM philotes.cdc_events) FROM philotes.cdc_checkpoints",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if mid < 60000 {
        assert!(
            ckpt_is_before_the_commit,
            "a partial transaction is not claimed complete"
        );
    }
    assert_eq!(catch_up_cli(file.path()).0, 0);
    let report = verified(&cfg).await;
    assert_eq!(report.tables[0].inserts, 60000);
}

/// A read-only buffer: a clear error, the stream not read meanwhile, nothing lost once fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_buffer_backpressure_then_recovery() {
    let (src, buf, source) = databases_with("readonly", WORKLOAD_TABLE).await;
    let cfg = config(&manifest(
        "readonly",
        &src,
        &buf,
        &["w"],
        "flushInterval: 50ms",
    ));
    let mut r = start(cfg.clone(), RunOptions::default());
    r.streaming().await;
    let admin = connect(&shared().uri("postgres")).await;
    admin
        .batch_execute(
            "ALTER DATABASE readonly_buf SET default_transaction_read_only = on;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'readonly_buf';",
        )
        .await
        .unwrap();
    let mut w = Workload::new();
    for _ in 0..100 {
        w.step(&source).await;
    }
    r.wait(
        "the read-only buffer reported",
        Duration::from_secs(30),
        |p| {
            p.state == State::Retrying
                && p.last_error
                    .as_ref()
                    .is_some_and(|(_, m)| m.contains("read-only"))
        },
    )
    .await;
    // Backpressure: while nothing can be written, nothing is confirmed and the stream is not
    // read (between attempts the slot is inactive) rather than buffered in memory.
    let slot = "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = 'philotes_test_readonly'";
    let inactive = || async {
        let row = source.query_one(slot, &[]).await.unwrap();
        (!row.get::<_, bool>(1)).then(|| row.get::<_, String>(0))
    };
    let confirmed = eventually("the slot to go inactive", Duration::from_secs(30), inactive).await;
    // More changes and at least one more attempt later, still nothing confirmed.
    for _ in 0..20 {
        w.step(&source).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = eventually(
        "the slot to go inactive again",
        Duration::from_secs(30),
        inactive,
    )
    .await;
    assert_eq!(
        still, confirmed,
        "nothing confirmed while the buffer is read-only"
    );
    admin
        .batch_execute("ALTER DATABASE readonly_buf RESET default_transaction_read_only")
        .await
        .unwrap();
    for _ in 0..50 {
        w.step(&source).await;
    }
    let lsn = wal_lsn(&source).await;
    r.checkpointed(lsn).await;
    r.stop().await.unwrap();
    verify_workload(&source, &connect(&buf).await, "test/readonly", w.counts).await;
    verified(&cfg).await;
}

/// Names with quotes, spaces, unicode and mixed case; every type family; extreme values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_and_values_are_captured_faithfully() {
    let uri = fresh_db(shared(), "hostile").await;
    let db = connect(&uri).await;
    db.batch_execute(
        r#"CREATE SCHEMA "Mixed Case ü";
           CREATE TYPE "Mixed Case ü".mood AS ENUM ('sad', 'happy', 'it''s "fine"');
           CREATE DOMAIN "Mixed Case ü".positive AS int CHECK (VALUE > 0);
           CREATE TYPE "Mixed Case ü".pair AS (a int, b text);
           CREATE TABLE "Mixed Case ü"."Order ""Items"" 🐘" (
             "Id" int PRIMARY KEY,
             "col with spaces" text,
             "quote""d" text,
             "ünïcødé" text,
             arr int[][], tarr text[], rng tsrange, nr numrange, mood "Mixed Case ü".mood,
             dom "Mixed Case ü".positive, comp "Mixed Case ü".pair,
             n numeric, f float8, ts timestamp, tstz timestamptz, d date,
             long text, bin bytea, doc jsonb, money_ money, bits bit varying(16), iv interval, x xml
           );"#,
    )
    .await
    .unwrap();
    let table = r#""Mixed Case ü"."Order ""Items"" 🐘""#;
    let cfg = config(&manifest(
        "hostile",
        &uri,
        &uri,
        &[table],
        "flushInterval: 50ms",
    ));
    assert_eq!(cfg.tables[0].schema, "Mixed Case ü");
    assert_eq!(cfg.tables[0].name, "Order \"Items\" 🐘");
    catch_up(&cfg).await;
    // Deep enough to matter, within what the verifier's JSON reader takes (128 levels); deeper
    // documents are checked by SQL below.
    let deep = format!("{}1{}", "[".repeat(120), "]".repeat(120));
    db.execute(
        &format!(
            r#"INSERT INTO {table} VALUES
             (1, 'a b', 'q"q', 'ǅ', '{{{{1,2}},{{3,NULL}}}}', '{{"a,b","c\"d",NULL,"NULL"}}', '[2020-01-01,infinity)', '(,5]',
              'it''s "fine"', 7, ROW(1, 'x,y'), 'NaN', '-Infinity', 'infinity', '-infinity', 'epoch',
              repeat('é', 300000), '\x00ff0000'::bytea, $1::text::jsonb, 12.34, B'1011', '1 mon -2 days', '<a>&amp;</a>'),
             (2, NULL, NULL, NULL, NULL, '{{}}', 'empty', NULL, 'sad', 1, ROW(NULL, NULL), '1e-300', 5e-324, '4713-01-01 BC', '294276-12-31 23:59:59.999999+00',
              '5874897-12-31', '', '\x', '{{"\u00e9\t\n": [null, true, 1.0e10]}}', -0.01, B'', '0', NULL)"#
        ),
        &[&deep],
    )
    .await
    .unwrap();
    db.batch_execute(&format!(
        r#"UPDATE {table} SET "quote""d" = 'changed' WHERE "Id" = 1; DELETE FROM {table} WHERE "Id" = 2"#
    ))
    .await
    .unwrap();
    catch_up(&cfg).await;
    let report = verified(&cfg).await;
    assert_eq!(
        (
            report.tables[0].inserts,
            report.tables[0].updates,
            report.tables[0].deletes
        ),
        (2, 1, 1)
    );
    // Column by column, the cast of the text back gives the source value.
    let columns = table_columns(&db, table).await;
    for (col, ty) in columns {
        if col == "quote\"d" {
            continue; // changed by the UPDATE after the INSERT compared here
        }
        let key = col.replace('\'', "''");
        let quoted = format!("\"{}\"", col.replace('"', "\"\""));
        let (lhs, rhs) = match ty.as_str() {
            "jsonb" => (
                format!("(e.after->'{key}')::jsonb"),
                format!("coalesce(t.{quoted}, 'null')"),
            ),
            // xml has no equality operator.
            "xml" => (format!("e.after->>'{key}'"), format!("t.{quoted}::text")),
            _ => (format!("(e.after->>'{key}')::{ty}"), format!("t.{quoted}")),
        };
        let bad = db
            .query_one(
                &format!(
                    "SELECT count(*) FROM {table} t JOIN philotes.cdc_events e
                       ON e.pipeline = 'test/hostile' AND e.operation = 'INSERT' AND (e.after->>'Id')::int = t.\"Id\"
                     WHERE {lhs} IS DISTINCT FROM {rhs}"
                ),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("compare {col} ({ty}): {e}"));
        assert_eq!(bad.get::<_, i64>(0), 0, "column {col} ({ty})");
    }
}

/// `philotes verify` finds a lost event, an altered value and a duplicated row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_lost_altered_and_duplicated_events() {
    let (src, buf, source) = databases_with("tamper", WORKLOAD_TABLE).await;
    let text = manifest("tamper", &src, &buf, &["w"], "flushInterval: 50ms");
    let file = manifest_file(&text);
    let cfg = config(&text);
    catch_up(&cfg).await;
    source
        .batch_execute("INSERT INTO w SELECT i, i, 'v' FROM generate_series(1, 20) i; UPDATE w SET n = 100 WHERE id = 5")
        .await
        .unwrap();
    catch_up(&cfg).await;
    let (code, out) = run_cli(&["verify", "-f", file.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("verified: 21 events"), "{out}");

    let buffer = connect(&buf).await;
    buffer
        .batch_execute(
            // The rows themselves are in cdc_event_log; cdc_events is a view over it.
            "DELETE FROM philotes.cdc_event_log WHERE operation = 'I' AND after->>'id' = '3'
               AND pipeline_id = (SELECT id FROM philotes.cdc_pipelines WHERE name = 'test/tamper');
             UPDATE philotes.cdc_event_log SET after = jsonb_set(after::jsonb, '{v}', '\"tampered\"') WHERE after->>'id' = '7';
             INSERT INTO philotes.cdc_event_log
               SELECT pipeline_id, seq + 1000, commit_lsn, lsn, xid, commit_time, table_id, operation, before,
                      jsonb_set(after::jsonb, '{id}', '99')
               FROM philotes.cdc_event_log WHERE after->>'id' = '9' AND operation = 'I';",
        )
        .await
        .unwrap();
    let (code, out) = run_cli(&["verify", "-f", file.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("MISMATCH"), "{out}");
    assert!(out.contains("1 rows missing (lost): [3]"), "{out}");
    assert!(out.contains("1 rows different: [7]"), "{out}");
    assert!(out.contains("1 rows extra (duplicated): [99]"), "{out}");
}

/// A password full of URI specials works when percent-encoded, and never shows up in any log
/// line, status line or error — also when it is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_with_special_characters_work_and_never_leak() {
    let (src, buf) = databases("secretpw").await;
    let admin = connect(&src).await;
    let password = "p@ss:w/rd?#%&'\" ü=";
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS capture; CREATE ROLE capture LOGIN REPLICATION PASSWORD '{}';
             CREATE TABLE t (id int PRIMARY KEY); ALTER TABLE t OWNER TO capture;
             GRANT CREATE ON DATABASE secretpw_src TO capture;",
            password.replace('\'', "''")
        ))
        .await
        .unwrap();
    let encoded: String =
        percent_encoding::utf8_percent_encode(password, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let port = shared().port;
    let source_uri =
        format!("postgres://capture:{encoded}@127.0.0.1:{port}/secretpw_src?sslmode=disable");
    let text = manifest(
        "secretpw",
        &source_uri,
        &buf,
        &["t"],
        "flushInterval: 50ms\nstatusInterval: 100ms",
    );
    let file = manifest_file(&text);
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["--log-format", "json", "run", "-f"])
        .arg(file.path())
        .env("PHILOTES_LOG", "debug")
        .stdout(std::fs::File::create(log.path()).unwrap())
        .stderr(
            std::fs::File::options()
                .append(true)
                .open(log.path())
                .unwrap(),
        )
        .spawn()
        .map(Proc)
        .unwrap();
    // Streaming, and the (empty) table's copy done, so the two rows arrive as changes only.
    let streaming = tokio::time::timeout(Duration::from_secs(60), async {
        while !std::fs::read_to_string(log.path())
            .unwrap_or_default()
            .contains("\"message\":\"snapshot done\"")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        streaming.is_ok(),
        "{}",
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
    admin
        .batch_execute("INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while !std::fs::read_to_string(log.path())
            .unwrap_or_default()
            .contains("\"events_total\":2")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "no two events as the special-password user:\n{}",
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
    sigterm(&child);
    assert!(child.wait().unwrap().success());
    let wrong = text.replace(&encoded, "wr0ng%40pass");
    let (code, wrong_out) = catch_up_cli(manifest_file(&wrong).path());
    assert_ne!(code, 0);
    let all = format!(
        "{}{wrong_out}",
        std::fs::read_to_string(log.path()).unwrap()
    );
    for needle in [
        password,
        encoded.as_str(),
        "wr0ng",
        "wr0ng%40pass",
        shared().password(),
    ] {
        assert!(!all.contains(needle), "{needle:?} leaked:\n{all}");
    }
    assert!(wrong_out.contains("refused the login"), "{wrong_out}");
}

/// Documents nested thousands of levels deep are captured as they are (the decoder never
/// parses JSON); the buffer holds the same document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn very_deep_json_is_captured() {
    let uri = fresh_db(shared(), "deepjson").await;
    let db = connect(&uri).await;
    db.batch_execute("CREATE TABLE d (id int PRIMARY KEY, doc jsonb, txt json)")
        .await
        .unwrap();
    let cfg = config(&manifest(
        "deepjson",
        &uri,
        &uri,
        &["d"],
        "flushInterval: 50ms",
    ));
    catch_up(&cfg).await;
    let deep = format!("{}\"x\"{}", "{\"a\":".repeat(3000), "}".repeat(3000));
    db.execute(
        "INSERT INTO d VALUES (1, $1::text::jsonb, $1::text::json)",
        &[&deep],
    )
    .await
    .unwrap();
    catch_up(&cfg).await;
    let same: bool = db
        .query_one(
            "SELECT (e.after->'doc')::jsonb = d.doc AND (e.after->'txt')::text = d.txt::text
             FROM d JOIN philotes.cdc_events e ON e.pipeline = 'test/deepjson' AND e.operation = 'INSERT'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(same);
}

/// Fencing: a session that another one superseded in `cdc_writers` (as a replica that took the
/// pipeline over does when it starts) cannot commit. Its transaction writes nothing, it stops
/// with `Fenced` naming the new writer, the slot is not advanced past what the buffer holds,
/// and the next session captures everything exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_writer_is_fenced_by_the_buffer() {
    let (src, buf, source) = databases_with("fence", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let text = manifest("fence", &src, &buf, &["t"], "flushInterval: 50ms");
    let file = manifest_file(&text);
    let cfg = config(&text);
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = spawn_run(file.path(), &[], log.path());
    let buffer = connect(&buf).await;
    source
        .batch_execute("INSERT INTO t SELECT generate_series(1, 10)")
        .await
        .unwrap();
    eventually("10 events durable", Duration::from_secs(30), || {
        let buffer = &buffer;
        async move {
            // The schema does not exist until the pipeline created it.
            let n = buffer
                .query_one(
                    "SELECT count(*) FROM philotes.cdc_events WHERE pipeline = 'test/fence'",
                    &[],
                )
                .await
                .ok()
                .map(|r| r.get::<_, i64>(0));
            (n == Some(10)).then_some(())
        }
    })
    .await;
    // What a new session's start does (here without the advisory lock, which a transaction
    // pooler would not hold either).
    supersede(&buffer, "test/fence", "replica-b").await;
    // The bump waited for any commit holding the row: from here on nothing commits.
    let before: Vec<String> = column(
        &buffer,
        "SELECT lsn::text FROM philotes.cdc_checkpoints WHERE pipeline = 'test/fence'",
    )
    .await;
    source
        .batch_execute("INSERT INTO t SELECT generate_series(11, 15)")
        .await
        .unwrap();
    let status = eventually(
        "the superseded writer exits",
        Duration::from_secs(30),
        || {
            let status = child.0.try_wait().unwrap();
            async move { status }
        },
    )
    .await;
    let out = std::fs::read_to_string(log.path()).unwrap();
    assert!(!status.success(), "{out}");
    assert!(out.contains("Fenced") && out.contains("replica-b"), "{out}");
    // Nothing of its last transaction, and no checkpoint past what the buffer holds.
    assert_eq!(events(&buffer, "philotes", "test/fence").await.len(), 10);
    let after: Vec<String> = column(
        &buffer,
        "SELECT lsn::text FROM philotes.cdc_checkpoints WHERE pipeline = 'test/fence'",
    )
    .await;
    assert_eq!(after, before);
    let confirmed: Vec<Option<String>> = column(
        &source,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'philotes_test_fence'",
    )
    .await;
    let (ckpt, slot) = (
        philotes::pipeline::lsn::parse(&before[0]).unwrap(),
        philotes::pipeline::lsn::parse(confirmed[0].as_deref().unwrap()).unwrap(),
    );
    assert!(slot <= ckpt, "slot {slot:X} past the checkpoint {ckpt:X}");

    // The next session (a new epoch) takes over and captures everything exactly once.
    catch_up(&cfg).await;
    let mut ids: Vec<i64> = events(&buffer, "philotes", "test/fence")
        .await
        .iter()
        .map(|e| e.after.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=15).collect::<Vec<_>>());
    let epoch: Vec<i64> = column(
        &buffer,
        "SELECT epoch FROM philotes.cdc_writers WHERE pipeline = 'test/fence'",
    )
    .await;
    assert_eq!(epoch, [3]);
    verified(&cfg).await;

    // The writes a session makes outside the stream (at its start, and those of `philotes
    // snapshot`, `recover` and the deletion policy) are fenced the same way: superseded, it
    // changes nothing.
    let mut session = philotes::pipeline::buffer::Buffer::open(&cfg)
        .await
        .expect("open");
    supersede(&buffer, "test/fence", "replica-c").await;
    let state = "SELECT (SELECT count(*) FROM philotes.cdc_snapshots WHERE pipeline = 'test/fence' AND request = 'cli:fenced') \
                 || ' ' || (SELECT count(*) FROM philotes.cdc_checkpoints WHERE pipeline = 'test/fence')";
    let table = philotes::pipeline::config::TableName::parse("t").unwrap();
    let e = session
        .request_snapshot(std::slice::from_ref(&table), "cli:fenced")
        .await
        .expect_err("superseded");
    assert_eq!(e.reason(), "Fenced", "{e}");
    assert!(e.to_string().contains("replica-c"), "{e}");
    let e = session.delete_checkpoint().await.expect_err("superseded");
    assert_eq!(e.reason(), "Fenced", "{e}");
    assert_eq!(column::<String>(&buffer, state).await, ["0 1"]);
}

/// What a new session's start does to `pipeline` in `cdc_writers` (here without the advisory
/// lock): the next epoch, written by `writer`.
async fn supersede(buffer: &tokio_postgres::Client, pipeline: &str, writer: &str) {
    buffer
        .execute(
            "UPDATE philotes.cdc_writers SET epoch = epoch + 1, writer = $2, since = now() WHERE pipeline = $1",
            &[&pipeline, &writer],
        )
        .await
        .unwrap();
}

/// The buffer session holds the pipeline's writer lock. Should its client vanish with its
/// node (no FIN, no RST: a partition, a lost node), the buffer server must notice and end
/// it, or the lock keeps the pipeline from its next owner for the OS default of about two
/// hours. So the server's end of the socket is probed after 30 s of silence (its keepalive
/// timer, as the kernel shows it in /proc/net/tcp), not after 7200 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffer_server_probes_the_writer_session() {
    let (src, buf, _source) = databases_with("probed", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let cfg = config(&manifest("probed", &src, &buf, &["t"], ""));
    let mut running = start(cfg.clone(), philotes::pipeline::RunOptions::default());
    running.streaming().await;
    let buffer = connect(&buf).await;
    // The session holding the pipeline's advisory lock, and its client's port.
    let port: Vec<i32> = column(
        &buffer,
        "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE l.locktype = 'advisory' AND l.granted \
         AND ((l.classid::int8 << 32) | l.objid::int8) = hashtextextended('philotes:test/probed', 0)",
    )
    .await;
    assert_eq!(port.len(), 1, "one session holds the writer lock");
    let (server, client) = (shared().port, port[0] as u16);
    // sl local rem st queues tr:when ...: the server's socket of that connection. Read again
    // should a packet be in flight (another timer armed) at that instant.
    let mut read = String::new();
    for _ in 0..10 {
        let tcp = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
        read = tcp
            .lines()
            .find(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 5
                    && f[1].ends_with(&format!(":{server:04X}"))
                    && f[2].ends_with(&format!(":{client:04X}"))
            })
            .unwrap_or_else(|| panic!("no server socket {server} <- {client} in:\n{tcp}"))
            .to_string();
        if read
            .split_whitespace()
            .nth(5)
            .is_some_and(|t| t.starts_with("02:"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line: Vec<&str> = read.split_whitespace().collect();
    let (timer, when) = line[5].split_once(':').expect("tr:tm->when");
    // Timer 2 is the keepalive timer; `when` is in clock ticks (USER_HZ, 100 a second).
    let when = u64::from_str_radix(when, 16).expect("hex");
    assert_eq!(timer, "02", "keepalive timer armed: {line:?}");
    assert!(
        when <= 30 * 100,
        "next probe in {}s, not within 30s: {line:?}",
        when / 100
    );
    running.stop().await.expect("stop");
}
