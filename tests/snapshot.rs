//! Snapshots of existing rows (README: Snapshots): consistency while the table changes,
//! resuming after kills, adding and re-syncing tables, every key shape.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use philotes::pipeline;
use serde_json::{Map, Value};
use tokio_postgres::Client;

/// Replays a table's events by the consumer contract's rules: a SNAPSHOT or an UPDATE of a
/// row not seen yet is an upsert of its image, a DELETE of a row not seen does nothing, an
/// UPDATE keeps the columns its image leaves out. Keyed by `key` (JSON of the key columns).
async fn replay(
    buffer: &Client,
    pipeline: &str,
    table: &str,
    key: &[&str],
) -> BTreeMap<String, Map<String, Value>> {
    let rows = buffer
        .query(
            "SELECT operation, before::jsonb, after::jsonb FROM philotes.cdc_events
             WHERE pipeline = $1 AND schema_name || '.' || table_name = $2 ORDER BY commit_lsn, seq",
            &[&pipeline, &table],
        )
        .await
        .expect("read events");
    let key_of = |v: &Value| -> String {
        let k: Vec<&Value> = key.iter().map(|c| &v[*c]).collect();
        serde_json::to_string(&k).unwrap()
    };
    let mut out: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for r in rows {
        let op: String = r.get(0);
        let before: Option<Value> = r.get(1);
        let after: Option<Value> = r.get(2);
        match op.as_str() {
            "SNAPSHOT" | "INSERT" => {
                let a = after.expect("image");
                out.insert(key_of(&a), a.as_object().unwrap().clone());
            }
            "UPDATE" => {
                let a = after.expect("image");
                let old = before.as_ref().map(key_of).unwrap_or_else(|| key_of(&a));
                let mut row = out.remove(&old).unwrap_or_default();
                for (k, v) in a.as_object().unwrap() {
                    row.insert(k.clone(), v.clone());
                }
                out.insert(key_of(&a), row);
            }
            "DELETE" => {
                out.remove(&key_of(&before.expect("old image")));
            }
            "TRUNCATE" => out.clear(),
            other => panic!("unknown operation {other}"),
        }
    }
    out
}

/// The source table as the replay should hold it.
async fn source_rows(
    source: &Client,
    table: &str,
    key: &[&str],
) -> BTreeMap<String, Map<String, Value>> {
    let rows = source
        .query(&format!("SELECT to_jsonb(t) FROM {table} t"), &[])
        .await
        .expect("read source");
    rows.iter()
        .map(|r| {
            let v: Value = r.get(0);
            let k: Vec<&Value> = key.iter().map(|c| &v[*c]).collect();
            (
                serde_json::to_string(&k).unwrap(),
                v.as_object().unwrap().clone(),
            )
        })
        .collect()
}

/// The replay, with each value brought to the source's own rendering (`to_jsonb` of the
/// row rebuilt from the image), equals the source table.
async fn assert_replay_equals_source(
    source: &Client,
    buffer: &Client,
    pipeline: &str,
    table: &str,
    key: &[&str],
) {
    let replayed: Vec<Value> = replay(buffer, pipeline, table, key)
        .await
        .into_values()
        .map(Value::Object)
        .collect();
    let mut normalized = BTreeMap::new();
    for batch in replayed.chunks(1000) {
        let rows = source
            .query(
                &format!(
                    "SELECT to_jsonb(jsonb_populate_record(NULL::{table}, r)) FROM jsonb_array_elements($1::jsonb) r"
                ),
                &[&Value::Array(batch.to_vec())],
            )
            .await
            .expect("rebuild rows");
        for row in rows {
            let v: Value = row.get(0);
            // Keyed as the source's rows are (its rendering of the key values).
            let k: Vec<&Value> = key.iter().map(|c| &v[*c]).collect();
            normalized.insert(
                serde_json::to_string(&k).unwrap(),
                v.as_object().unwrap().clone(),
            );
        }
    }
    let want = source_rows(source, table, key).await;
    assert_eq!(normalized.len(), want.len(), "rows of {table} after replay");
    for (k, v) in &want {
        assert_eq!(
            normalized.get(k),
            Some(v),
            "row {k} of {table} after replay"
        );
    }
}

/// Waits until every table is copied and everything written on the source so far is
/// checkpointed, then stops the pipeline.
/// The copy is still under way after `what` was done to the table: else the test did not
/// test what it says (the table is too small).
fn assert_still_copying(running: &Running, what: &str) {
    let copying = running
        .progress
        .borrow()
        .snapshots
        .iter()
        .any(|t| t.phase == pipeline::snapshot::Phase::Copying);
    assert!(
        copying,
        "the copy ended before {what}; make the table larger"
    );
}

async fn finish_copy(mut running: Running, source: &Client) {
    running
        .wait("the copy to finish", Duration::from_secs(300), |p| {
            // Not before the session has read the tables' states.
            !p.snapshots.is_empty()
                && p.snapshots
                    .iter()
                    .all(|t| t.phase == pipeline::snapshot::Phase::Done)
        })
        .await;
    let lsn = wal_lsn(source).await;
    running.checkpointed(lsn).await;
    running.stop().await.expect("stops");
}

async fn snapshot_events(buffer: &Client, pipeline: &str, table: &str) -> i64 {
    buffer
        .query_one(
            "SELECT count(*) FROM philotes.cdc_events WHERE pipeline = $1 AND operation = 'SNAPSHOT' \
             AND schema_name || '.' || table_name = $2",
            &[&pipeline, &table],
        )
        .await
        .expect("count")
        .get(0)
}

async fn phase(buffer: &Client, pipeline: &str, table: &str) -> (String, i64) {
    let r = buffer
        .query_one(
            "SELECT phase, rows_copied FROM philotes.cdc_snapshots WHERE pipeline = $1 AND schema_name || '.' || table_name = $2",
            &[&pipeline, &table],
        )
        .await
        .expect("snapshot row");
    (r.get(0), r.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pipeline_copies_the_rows_tables_already_hold() {
    let (src, buf, source) = databases_with(
        "snap_initial",
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         INSERT INTO a SELECT g, 'row ' || g FROM generate_series(1, 2500) g;
         CREATE TABLE empty (id int PRIMARY KEY);",
    )
    .await;
    let cfg = config(&manifest(
        "snap-initial",
        &src,
        &buf,
        &["a", "empty"],
        "snapshot: {chunkSize: 1000}",
    ));
    assert_eq!(catch_up(&cfg).await, pipeline::Outcome::CaughtUp);
    let buffer = connect(&buf).await;
    assert_eq!(
        snapshot_events(&buffer, "test/snap-initial", "public.a").await,
        2500
    );
    assert_eq!(
        phase(&buffer, "test/snap-initial", "public.a").await,
        ("Done".into(), 2500)
    );
    assert_eq!(
        phase(&buffer, "test/snap-initial", "public.empty").await,
        ("Done".into(), 0)
    );
    assert_replay_equals_source(&source, &buffer, "test/snap-initial", "public.a", &["id"]).await;
}

/// Random transactions on table `s` (id, n, big): inserts, updates of `n` alone (the TOASTed
/// `big` column left out of the new image), updates of both, key moves and deletes, over the
/// whole key range, so the chunk being copied is among the rows changed.
async fn churn(client: Client, stop: tokio::sync::watch::Receiver<bool>) -> u64 {
    let mut rng = Rng::seeded();
    let mut done = 0u64;
    while !*stop.borrow() {
        let mut sql = String::from("BEGIN;");
        for _ in 0..1 + rng.below(4) {
            let id = 1 + rng.below(12_000);
            sql.push_str(&match rng.below(10) {
                0..=1 => format!(
                    "INSERT INTO s VALUES ({}, 0, repeat(md5('{id}'), 100)) ON CONFLICT DO NOTHING;",
                    20_000 + rng.below(1_000_000)
                ),
                2..=4 => format!("UPDATE s SET n = n + 1 WHERE id = {id};"),
                5..=6 => format!("UPDATE s SET n = n + 1, big = big || 'x' WHERE id = {id};"),
                7 => format!(
                    "UPDATE s SET id = {} WHERE id = {id} AND NOT EXISTS (SELECT 1 FROM s WHERE id = {});",
                    2_000_000 + id,
                    2_000_000 + id
                ),
                _ => format!("DELETE FROM s WHERE id = {id};"),
            });
        }
        sql.push_str("COMMIT;");
        if client.batch_execute(&sql).await.is_ok() {
            done += 1;
        } else {
            let _ = client.batch_execute("ROLLBACK").await;
        }
    }
    done
}

/// Guarantees 1-3: the table changes throughout (rows of the chunk being read among them),
/// the process is killed with SIGKILL three times mid-snapshot, and still the replay equals
/// the source; each kill costs at most the chunk in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_under_writes_and_kills_replays_to_the_source() {
    let (src, buf, source) = databases_with(
        "snap_kills",
        "CREATE TABLE s (id bigint PRIMARY KEY, n int NOT NULL, big text);
         ALTER TABLE s ALTER big SET STORAGE EXTERNAL;
         INSERT INTO s SELECT g, 0, CASE WHEN g % 3 = 0 THEN repeat(md5(g::text), 100) ELSE 'small' END
           FROM generate_series(1, 12000) g;",
    )
    .await;
    let m = manifest_file(&manifest(
        "snap-kills",
        &src,
        &buf,
        &["s"],
        "flushInterval: 200ms\nsnapshot: {chunkSize: 400}",
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(churn(connect(&src).await, stop_rx));
    let buffer = connect(&buf).await;
    let log = tempfile::NamedTempFile::new().expect("log");
    let copied = || async {
        buffer
            .query_opt(
                "SELECT rows_copied FROM philotes.cdc_snapshots WHERE pipeline = 'test/snap-kills'",
                &[],
            )
            .await
            .ok()
            .flatten()
            .map_or(0i64, |r| r.get(0))
    };
    let mut kills = 0;
    for threshold in [1500i64, 4500, 8000] {
        let mut child = spawn_run(m.path(), &[], log.path());
        eventually(
            "the snapshot to pass the next kill point",
            Duration::from_secs(120),
            || async { (copied().await >= threshold).then_some(()) },
        )
        .await;
        kill9(&mut child);
        kills += 1;
    }
    let before_last = copied().await;
    assert!(
        before_last < 12_000,
        "the snapshot finished before the last kill ({before_last} rows)"
    );
    let mut child = spawn_run(m.path(), &[], log.path());
    eventually("the snapshot to finish", Duration::from_secs(180), || async {
        let done: Option<String> = buffer
            .query_opt("SELECT phase FROM philotes.cdc_snapshots WHERE pipeline = 'test/snap-kills' AND phase = 'Done'", &[])
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0));
        done.map(|_| ())
    })
    .await;
    stop_tx.send(true).expect("stop writer");
    let transactions = writer.await.expect("writer");
    assert!(
        transactions > 100,
        "only {transactions} transactions ran during the snapshot"
    );
    kill9(&mut child);
    let (code, out) = catch_up_cli(m.path());
    assert_eq!(
        code,
        0,
        "{out}\n{}",
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
    assert_replay_equals_source(&source, &buffer, "test/snap-kills", "public.s", &["id"]).await;
    // Resumed, not restarted: a row is copied again only when a kill lost the chunk it was
    // in (what was copied since the last buffer commit: at most flushInterval, 200 ms, of
    // copying per kill), or when it was stale in its chunk and read again. From scratch, the
    // three restarts would add 14,000 copies.
    let (total, distinct): (i64, i64) = {
        let r = buffer
            .query_one(
                "SELECT count(*), count(DISTINCT after::jsonb->'id') FROM philotes.cdc_events \
                 WHERE pipeline = 'test/snap-kills' AND operation = 'SNAPSHOT'",
                &[],
            )
            .await
            .expect("count");
        (r.get(0), r.get(1))
    };
    eprintln!(
        "{total} SNAPSHOT events of {distinct} rows, {transactions} transactions, {kills} kills"
    );
    assert!(distinct >= 8_000, "{distinct} rows copied");
    assert!(
        total - distinct <= kills * 1500 + 600,
        "{} rows copied twice across {kills} kills ({total} SNAPSHOT events of {distinct} rows)",
        total - distinct
    );
}

/// Every key shape a table can be read in chunks by, each copied in several chunks and
/// compared with the source: a composite key, text keys whose order depends on the
/// collation (chunk boundaries must compare as the column does), a unique index under
/// REPLICA IDENTITY FULL, a partitioned table, an empty table, a column list and row filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_shape_is_copied_in_chunks() {
    let (src, buf, source) = databases_with(
        "snap_keys",
        r#"CREATE TABLE composite (a int, b text, v int, PRIMARY KEY (a, b));
           INSERT INTO composite SELECT g % 7, 'k' || g, g FROM generate_series(1, 300) g;
           CREATE TABLE words (w text COLLATE "C" PRIMARY KEY, v int);
           INSERT INTO words SELECT x, row_number() OVER () FROM (SELECT DISTINCT unnest(ARRAY[
             'apple', 'Apple', 'APPLE', 'banana', 'Banana', 'b', 'B', '_under', 'zeta', 'Zeta', 'élan', 'Élan',
             'a b', 'a-b', 'a.b', 'ab', 'aB', '0', '10', '9', ' space', 'quote''s', 'back\slash']) || s
             FROM generate_series(1, 12) s) t(x);
           CREATE TABLE full_unique (code text NOT NULL, v int);
           CREATE UNIQUE INDEX ON full_unique (code);
           ALTER TABLE full_unique REPLICA IDENTITY FULL;
           INSERT INTO full_unique SELECT 'c' || g, g FROM generate_series(1, 250) g;
           CREATE TABLE parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
           CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100);
           CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM (100) TO (1000);
           INSERT INTO parted SELECT g, 'p' || g FROM generate_series(1, 400) g;
           CREATE TABLE nothing (id int PRIMARY KEY);
           CREATE TABLE part (id int, keep text, secret text, region text, PRIMARY KEY (id, region));
           INSERT INTO part SELECT g, 'k' || g, 's' || g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END
             FROM generate_series(1, 200) g;"#,
    )
    .await;
    // Chunk boundaries in a linguistic collation too, where the server has one (ICU).
    let icu: Vec<i64> = column(
        &source,
        "SELECT count(*) FROM pg_collation WHERE collname = 'und-x-icu'",
    )
    .await;
    let mut tables = vec!["composite", "words", "full_unique", "parted", "nothing"];
    if icu[0] > 0 {
        source
            .batch_execute(
                r#"CREATE TABLE words_icu (w text COLLATE "und-x-icu" PRIMARY KEY, v int);
                   INSERT INTO words_icu SELECT w, v FROM words;"#,
            )
            .await
            .expect("ICU table");
        tables.push("words_icu");
    }
    let version = server_version(&source).await;
    // Column lists and row filters need PostgreSQL 15.
    let filtered = version >= 150000;
    let mut m = manifest(
        "snap-keys",
        &src,
        &buf,
        &tables,
        "snapshot: {chunkSize: 37}",
    );
    if filtered {
        m = m.replace(
            &format!("'{}']", tables[tables.len() - 1]),
            &format!(
                r#"'{}', {{name: part, columns: [id, keep, region], where: "region = 'eu'"}}]"#,
                tables[tables.len() - 1]
            ),
        );
    }
    let cfg = config(&m);
    assert_eq!(catch_up(&cfg).await, pipeline::Outcome::CaughtUp);
    let buffer = connect(&buf).await;
    for (table, key, rows) in [
        ("public.composite", &["a", "b"][..], 300),
        ("public.words", &["w"][..], 276),
        ("public.full_unique", &["code"][..], 250),
        ("public.parted", &["id"][..], 400),
        ("public.nothing", &["id"][..], 0),
        ("public.words_icu", &["w"][..], 276),
    ] {
        if !tables.contains(&&table["public.".len()..]) {
            continue;
        }
        assert_eq!(
            snapshot_events(&buffer, "test/snap-keys", table).await,
            rows,
            "{table}"
        );
        assert_eq!(
            phase(&buffer, "test/snap-keys", table).await,
            ("Done".into(), rows),
            "{table}"
        );
        assert_replay_equals_source(&source, &buffer, "test/snap-keys", table, key).await;
    }
    if filtered {
        let images: Vec<String> = column(
            &buffer,
            "SELECT after::text FROM philotes.cdc_events WHERE pipeline = 'test/snap-keys' AND table_name = 'part' ORDER BY commit_lsn, seq LIMIT 1",
        )
        .await;
        assert_eq!(
            images,
            vec![r#"{"id":2,"keep":"k2","region":"eu"}"#.to_string()]
        );
        assert_eq!(
            snapshot_events(&buffer, "test/snap-keys", "public.part").await,
            100
        );
    }
    // The chunks streamed as they were read: the tables were read in more than one chunk
    // each, and the checkpoint moved past them.
    let (code, out) = run_cli(&[
        "verify",
        "-f",
        manifest_file(&m).path().to_str().expect("path"),
    ]);
    assert_eq!(code, 0, "{out}");
}

/// A table without a key cannot be read in chunks consistently: refused with the table and
/// what to do, before anything is copied; with `mode: Never` the pipeline streams it.
/// A table the source user cannot read: refused naming the table and the privilege.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_that_cannot_be_copied_are_refused_with_what_to_do() {
    let (src, buf, source) = databases_with(
        "snap_refused",
        "CREATE TABLE keyless (v int); ALTER TABLE keyless REPLICA IDENTITY FULL;
         INSERT INTO keyless VALUES (1), (1), (2);
         CREATE TABLE hidden (id int PRIMARY KEY);
         DROP ROLE IF EXISTS snap_reader; CREATE ROLE snap_reader LOGIN REPLICATION PASSWORD 'pw';
         GRANT CREATE ON DATABASE snap_refused_src TO snap_reader;",
    )
    .await;
    let err = start_fails(
        config(&manifest("snap-keyless", &src, &buf, &["keyless"], "")),
        "a keyless table",
    )
    .await;
    assert_eq!(err.reason(), "SnapshotFailed");
    let text = err.to_string();
    assert!(
        text.contains("cannot copy the existing rows of public.keyless")
            && text.contains("add a primary key, or set spec.snapshot.mode: Never"),
        "{text}"
    );
    let buffer = connect(&buf).await;
    assert_eq!(
        snapshot_events(&buffer, "test/snap-keyless", "public.keyless").await,
        0
    );
    let never = config(&manifest(
        "snap-keyless",
        &src,
        &buf,
        &["keyless"],
        "snapshot: {mode: Never}",
    ));
    assert_eq!(catch_up(&never).await, pipeline::Outcome::CaughtUp);
    assert_eq!(
        phase(&buffer, "test/snap-keyless", "public.keyless").await,
        ("Skipped".into(), 0)
    );

    // The table belongs to another role, and the pipeline's user cannot read it.
    source
        .batch_execute("ALTER TABLE hidden OWNER TO postgres")
        .await
        .expect("owner");
    let reader = format!(
        "postgres://snap_reader:pw@127.0.0.1:{}/snap_refused_src?sslmode=disable",
        shared().port
    );
    source
        .batch_execute("CREATE PUBLICATION hidden_pub FOR TABLE hidden WITH (publish_via_partition_root = true)")
        .await
        .expect("publication");
    let m = manifest("snap-hidden", &reader, &buf, &["hidden"], "").replace(
        "    tables: [",
        "    publication: hidden_pub\n    tables: [",
    );
    let err = start_fails(config(&m), "a table the user cannot read").await;
    assert_eq!(err.reason(), "SnapshotFailed", "{err}");
    assert!(
        err.to_string()
            .contains("the source user snap_reader lacks the SELECT privilege on it; run GRANT SELECT ON \"public\".\"hidden\" TO \"snap_reader\""),
        "{err}"
    );
}

/// A table added to a running pipeline is published and copied alone, while the table
/// that was there streams on; a resync request copies a table again once per id; and
/// `philotes snapshot` copies one again from the command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_is_added_resynced_and_copied_again_on_demand() {
    let (src, buf, source) = databases_with(
        "snap_add",
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 50) g;
         CREATE TABLE b (id int PRIMARY KEY, v text);
         INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 700) g;",
    )
    .await;
    let buffer = connect(&buf).await;
    let only_a = manifest(
        "snap-add",
        &src,
        &buf,
        &["a"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 100}",
    );
    assert_eq!(
        catch_up(&config(&only_a)).await,
        pipeline::Outcome::CaughtUp
    );
    assert_eq!(
        snapshot_events(&buffer, "test/snap-add", "public.a").await,
        50
    );
    // b is added while a keeps changing.
    let both = manifest(
        "snap-add",
        &src,
        &buf,
        &["a", "b"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 100}",
    );
    // A transaction that changed b before it was published, still open then, commits
    // after the copy could have read the row: its change is in the copy.
    let open = connect(&src).await;
    open.batch_execute("BEGIN; UPDATE b SET v = 'in flight' WHERE id = 9")
        .await
        .expect("open transaction");
    let mut running = start(config(&both), pipeline::RunOptions::default());
    running
        .wait("the stream", Duration::from_secs(60), |p| {
            p.state == pipeline::State::Streaming
        })
        .await;
    source
        .batch_execute("INSERT INTO a VALUES (51, 'new'); UPDATE b SET v = 'changed' WHERE id = 7; DELETE FROM b WHERE id = 8;")
        .await
        .expect("writes");
    tokio::time::sleep(Duration::from_secs(2)).await;
    open.batch_execute("COMMIT").await.expect("commit");
    running
        .wait("b to be copied", Duration::from_secs(60), |p| {
            p.snapshots
                .iter()
                .any(|t| t.table == "public.b" && t.phase == pipeline::snapshot::Phase::Done)
        })
        .await;
    let lsn = wal_lsn(&source).await;
    running.checkpointed(lsn).await;
    running.stop().await.expect("stops");
    let published: Vec<String> = column(
        &source,
        &format!(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = '{}' ORDER BY 1",
            config(&both).publication
        ),
    )
    .await;
    assert_eq!(published, vec!["a", "b"]);
    assert_eq!(
        snapshot_events(&buffer, "test/snap-add", "public.a").await,
        50,
        "a is not copied again"
    );
    let b_rows = snapshot_events(&buffer, "test/snap-add", "public.b").await;
    assert!((699..=700).contains(&b_rows), "{b_rows} rows of b copied");
    assert_eq!(phase(&buffer, "test/snap-add", "public.b").await.0, "Done");
    let requests: Vec<String> = column(
        &buffer,
        "SELECT table_name || ' ' || request FROM philotes.cdc_snapshots WHERE pipeline = 'test/snap-add' ORDER BY 1",
    )
    .await;
    assert_eq!(requests, vec!["a initial", "b added"]);
    assert_replay_equals_source(&source, &buffer, "test/snap-add", "public.a", &["id"]).await;
    assert_replay_equals_source(&source, &buffer, "test/snap-add", "public.b", &["id"]).await;

    // Resync a, once per id.
    let resync = manifest(
        "snap-add",
        &src,
        &buf,
        &["a", "b"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 100, resync: {id: r1, tables: [a]}}",
    );
    for _ in 0..2 {
        assert_eq!(
            catch_up(&config(&resync)).await,
            pipeline::Outcome::CaughtUp
        );
        assert_eq!(
            snapshot_events(&buffer, "test/snap-add", "public.a").await,
            50 + 51
        );
    }
    assert_eq!(
        snapshot_events(&buffer, "test/snap-add", "public.b").await,
        b_rows
    );
    // And from the command line.
    let file = manifest_file(&both);
    let (code, out) = run_cli(&[
        "snapshot",
        "-f",
        file.path().to_str().expect("path"),
        "--table",
        "b",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("copied public.b again"), "{out}");
    assert_eq!(
        snapshot_events(&buffer, "test/snap-add", "public.b").await,
        b_rows + 699
    );
    let (code, out) = run_cli(&[
        "snapshot",
        "-f",
        file.path().to_str().expect("path"),
        "--table",
        "c",
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("--table c: pipeline test/snap-add does not capture public.c"),
        "{out}"
    );
    let (code, out) = run_cli(&["verify", "-f", file.path().to_str().expect("path")]);
    assert_eq!(code, 0, "{out}");

    // Under mode Never, an explicit request is still carried out.
    let never = manifest(
        "snap-add",
        &src,
        &buf,
        &["a", "b"],
        "flushInterval: 100ms\nsnapshot: {mode: Never}",
    );
    let never_file = manifest_file(&never);
    let before_a = snapshot_events(&buffer, "test/snap-add", "public.a").await;
    let (code, out) = run_cli(&[
        "snapshot",
        "-f",
        never_file.path().to_str().expect("path"),
        "--table",
        "a",
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        snapshot_events(&buffer, "test/snap-add", "public.a").await,
        before_a + 51
    );

    // A table removed from the list forgets its copy; listed again, it is copied again
    // (what changed while it was not captured comes back).
    assert_eq!(
        catch_up(&config(&only_a)).await,
        pipeline::Outcome::CaughtUp
    );
    source
        .batch_execute("UPDATE b SET v = 'while away' WHERE id = 9")
        .await
        .expect("update");
    let before_b = snapshot_events(&buffer, "test/snap-add", "public.b").await;
    assert_eq!(catch_up(&config(&both)).await, pipeline::Outcome::CaughtUp);
    assert_eq!(
        snapshot_events(&buffer, "test/snap-add", "public.b").await,
        before_b + 699
    );
    assert_eq!(
        phase(&buffer, "test/snap-add", "public.b").await,
        ("Done".into(), 699)
    );
    assert_replay_equals_source(&source, &buffer, "test/snap-add", "public.b", &["id"]).await;
}

/// Memory is bounded by the chunk, not the table: 120 rows of 1 MB each, after 3,000
/// narrow ones, are copied in chunks of at most 8 MB (plus a row), also when a chunk's rows
/// turn out wider than its first rows said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_rows_are_copied_in_memory_bounded_by_the_chunk() {
    let (src, buf, source) = databases_with(
        "snap_huge",
        "CREATE TABLE huge (id int PRIMARY KEY, doc text);
         ALTER TABLE huge ALTER doc SET STORAGE EXTERNAL;
         INSERT INTO huge SELECT g, md5(g::text) FROM generate_series(-2999, 0) g;
         INSERT INTO huge SELECT g, repeat(md5(g::text), 32768) FROM generate_series(1, 120) g;",
    )
    .await;
    let file = manifest_file(&manifest("snap-huge", &src, &buf, &["huge"], ""));
    let (peak_kib, log) = catch_up_measuring_rss(file.path()).await;
    let buffer = connect(&buf).await;
    assert_eq!(
        snapshot_events(&buffer, "test/snap-huge", "public.huge").await,
        3120
    );
    assert_replay_equals_source(&source, &buffer, "test/snap-huge", "public.huge", &["id"]).await;
    // The first chunk asked for more rows than 8 MB of the wide ones: its read was cut.
    assert!(
        log.contains("the read was cut"),
        "no read was cut short:\n{log}"
    );
    // 120 MB of rows; a chunk is at most 8 MB of images plus the row that crosses the
    // bound, and three are in memory at most (being read, queued, being written).
    eprintln!("peak RSS {peak_kib} KiB copying 120 MB of rows");
    assert!(
        peak_kib < 100 * 1024,
        "peak RSS {peak_kib} KiB copying 120 MB of rows"
    );
}

/// Guarantee 2: while a table is copied, the changes of another table keep arriving, the
/// slot keeps advancing, and no transaction of Philotes on the source stays open longer than
/// a chunk (no `xmin` held for the table's whole copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_goes_on_while_a_table_is_copied() {
    let (src, buf, source) = databases_with(
        "snap_stream",
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 300000) g;
         CREATE TABLE other (id int PRIMARY KEY);",
    )
    .await;
    let cfg = config(&manifest(
        "snap-stream",
        &src,
        &buf,
        &["big", "other"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 500}",
    ));
    let slot = cfg.slot.clone();
    let mut running = start(cfg, pipeline::RunOptions::default());
    running
        .wait("the copy to start", Duration::from_secs(60), |p| {
            p.snapshots
                .iter()
                .any(|t| t.table == "public.big" && t.rows_copied > 0)
        })
        .await;
    let confirmed = || async {
        let lsn: Vec<Option<String>> = column(
            &source,
            &format!("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        )
        .await;
        pipeline::lsn::parse(lsn[0].as_deref().unwrap_or("0/0")).unwrap_or(0)
    };
    let before = confirmed().await;
    let buffer = connect(&buf).await;
    let mut longest = Duration::ZERO;
    for i in 1..=20 {
        source
            .execute("INSERT INTO other VALUES ($1)", &[&i])
            .await
            .expect("insert");
        // Philotes's sessions on the source database only: the buffer here is another
        // database of the same server (its writes are not the source's transactions), and a
        // walsender's decoding is not a snapshot of the source's rows.
        let age: Vec<Option<f64>> = column(
            &source,
            "SELECT extract(epoch FROM max(clock_timestamp() - xact_start))::float8 FROM pg_stat_activity \
             WHERE application_name = 'philotes' AND xact_start IS NOT NULL \
             AND datname = current_database() AND backend_type = 'client backend'",
        )
        .await;
        longest = longest.max(Duration::from_secs_f64(age[0].unwrap_or(0.0)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually("the other table's changes, during the copy", Duration::from_secs(30), || {
        let b = &buffer;
        async move {
            let n: i64 = b
                .query_one(
                    "SELECT count(*) FROM philotes.cdc_events WHERE pipeline = 'test/snap-stream' AND table_name = 'other' \
                     AND operation = 'INSERT'",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (n == 20).then_some(())
        }
    })
    .await;
    let after = confirmed().await;
    let still_copying = running
        .progress
        .borrow()
        .snapshots
        .iter()
        .any(|t| t.table == "public.big" && t.phase == pipeline::snapshot::Phase::Copying);
    assert!(
        still_copying,
        "the copy ended before the checks; make the table larger"
    );
    assert!(
        after > before,
        "the slot did not advance during the copy ({before} → {after})"
    );
    assert!(
        longest < Duration::from_secs(2),
        "a transaction stayed open {longest:?}"
    );
    finish_copy(running, &source).await;
    assert_replay_equals_source(&source, &buffer, "test/snap-stream", "public.big", &["id"]).await;
    assert_replay_equals_source(
        &source,
        &buffer,
        "test/snap-stream",
        "public.other",
        &["id"],
    )
    .await;
}

/// The copy reads values as the stream renders them, whatever the source's settings (a
/// database with another DateStyle, IntervalStyle and bytea_output; keys of timestamptz and
/// bytea compared while they are updated), and follows a column added in the middle of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_reads_values_as_the_stream_does_and_follows_a_new_column() {
    let (src, buf, source) = databases_with(
        "snap_styles",
        "ALTER DATABASE snap_styles_src SET datestyle = 'SQL, DMY';
         ALTER DATABASE snap_styles_src SET intervalstyle = 'sql_standard';
         ALTER DATABASE snap_styles_src SET bytea_output = 'escape';
         CREATE TABLE ev (at timestamptz, k bytea, n int NOT NULL, d interval, PRIMARY KEY (at, k));
         INSERT INTO ev SELECT '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 second',
                               decode(md5(g::text), 'hex'), 0, g * interval '1 minute'
           FROM generate_series(1, 20000) g;",
    )
    .await;
    let cfg = config(&manifest(
        "snap-styles",
        &src,
        &buf,
        &["ev"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 200}",
    ));
    let mut running = start(cfg, pipeline::RunOptions::default());
    running
        .wait("the copy to start", Duration::from_secs(60), |p| {
            p.snapshots.iter().any(|t| t.rows_copied > 0)
        })
        .await;
    // A new connection gets the database's settings; the updates hit rows all over the key
    // range, the ones being copied among them.
    let writer = connect(&src).await;
    let mut rng = Rng::seeded();
    for round in 0..400 {
        let g = 1 + rng.below(20_000);
        writer
            .batch_execute(&format!(
                "UPDATE ev SET n = n + 1, d = d + interval '1 day' \
                 WHERE at = '2026-01-01 00:00:00+00'::timestamptz + {g} * interval '1 second'"
            ))
            .await
            .expect("update");
        if round == 150 {
            writer
                .batch_execute("ALTER TABLE ev ADD COLUMN note text")
                .await
                .expect("add column");
        }
        if round > 150 && round % 3 == 0 {
            writer
                .batch_execute(&format!(
                    "UPDATE ev SET note = 'g{g}' WHERE at = '2026-01-01 00:00:00+00'::timestamptz + {g} * interval '1 second'"
                ))
                .await
                .expect("update note");
        }
    }
    finish_copy(running, &source).await;
    let buffer = connect(&buf).await;
    // The key as the replay sees it is the image's text; the source's rows are read with the
    // same settings to compare.
    source
        .batch_execute(
            "SET datestyle = 'ISO, MDY'; SET intervalstyle = postgres; SET bytea_output = hex",
        )
        .await
        .expect("settings");
    assert_replay_equals_source(
        &source,
        &buffer,
        "test/snap-styles",
        "public.ev",
        &["at", "k"],
    )
    .await;
    // Copied rows are written as the stream writes them: ISO timestamps, hex bytea.
    let sample: Vec<String> = column(
        &buffer,
        "SELECT (after->>'at') || ' ' || (after->>'k') FROM philotes.cdc_events \
         WHERE pipeline = 'test/snap-styles' AND operation = 'SNAPSHOT' ORDER BY commit_lsn, seq LIMIT 1",
    )
    .await;
    assert!(
        sample[0].starts_with("2026-01-01 00:00:01+00 \\x"),
        "{sample:?}"
    );
}

/// A TRUNCATE in the middle of a copy, and rows inserted after it: the chunks read before it
/// are superseded by the TRUNCATE event, those the copy's snapshot read after it hold only
/// the new rows; the replay equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_during_a_copy_replays_to_the_source() {
    let (src, buf, source) = databases_with(
        "snap_truncate",
        "CREATE TABLE tr (id int PRIMARY KEY, v text);
         INSERT INTO tr SELECT g, 'old ' || g FROM generate_series(1, 30000) g;",
    )
    .await;
    let cfg = config(&manifest(
        "snap-truncate",
        &src,
        &buf,
        &["tr"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 200}",
    ));
    let mut running = start(cfg, pipeline::RunOptions::default());
    running
        .wait("the copy to be under way", Duration::from_secs(60), |p| {
            p.snapshots.iter().any(|t| t.rows_copied >= 2000)
        })
        .await;
    source
        .batch_execute(
            "TRUNCATE tr; INSERT INTO tr SELECT g, 'new ' || g FROM generate_series(1, 30000, 7) g;",
        )
        .await
        .expect("truncate");
    assert_still_copying(&running, "the TRUNCATE");
    finish_copy(running, &source).await;
    let buffer = connect(&buf).await;
    assert_replay_equals_source(&source, &buffer, "test/snap-truncate", "public.tr", &["id"]).await;
}

/// Hot rows: rows with a TOASTed column updated without it, over and over, faster than a
/// chunk goes from its read to its close. Each close finds them changed by transactions its
/// snapshot does not see, with images that leave the TOASTed column out; they used to be read
/// again, and again, until the updates paused. The row at the close is now built from the
/// chunk's row and those images, and the copy finishes while the updates go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_rows_updated_without_their_toasted_column_do_not_hold_the_copy_back() {
    let (src, buf, source) = databases_with(
        "snap_hot",
        "CREATE TABLE hot (id int PRIMARY KEY, n int NOT NULL, doc text);
         ALTER TABLE hot ALTER doc SET STORAGE EXTERNAL;
         INSERT INTO hot SELECT g, 0, CASE WHEN g <= 20 THEN repeat(md5(g::text), 100) ELSE 'small' END
           FROM generate_series(1, 4000) g;",
    )
    .await;
    let cfg = config(&manifest(
        "snap-hot",
        &src,
        &buf,
        &["hot"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 200}",
    ));
    // Two sessions, each updating its ten rows as fast as it commits.
    let stop = Arc::new(AtomicBool::new(false));
    let updates = Arc::new(AtomicU64::new(0));
    let mut updaters = Vec::new();
    for rows in ["id <= 10", "id > 10 AND id <= 20"] {
        let (stop, updates) = (stop.clone(), updates.clone());
        let client = connect(&src).await;
        let sql = format!("UPDATE hot SET n = n + 1 WHERE {rows}");
        updaters.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                client.execute(&sql, &[]).await.expect("update");
                updates.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut running = start(cfg, pipeline::RunOptions::default());
    running
        .wait(
            "the copy to finish while the rows are updated",
            Duration::from_secs(90),
            |p| {
                !p.snapshots.is_empty()
                    && p.snapshots
                        .iter()
                        .all(|t| t.phase == pipeline::snapshot::Phase::Done)
            },
        )
        .await;
    let at_done = updates.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        updates.load(Ordering::Relaxed) > at_done,
        "the updates had stopped"
    );
    stop.store(true, Ordering::Relaxed);
    for updater in updaters {
        updater.await.expect("updater");
    }
    finish_copy(running, &source).await;
    let buffer = connect(&buf).await;
    assert_replay_equals_source(&source, &buffer, "test/snap-hot", "public.hot", &["id"]).await;
}

/// `slotDeletionPolicy: Delete` forgets a pipeline (its slot, checkpoint and snapshot states);
/// one created later under the same name starts afresh and copies its tables again, since
/// rows changed while no slot kept their changes. It used to find the old `Done` states and
/// copy nothing, missing those rows for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_created_again_after_being_forgotten_copies_its_tables_again() {
    let (src, buf, source) = databases_with(
        "forgotten",
        "CREATE TABLE f (id int PRIMARY KEY, v text);
         INSERT INTO f SELECT g, 'v' || g FROM generate_series(1, 100) g;",
    )
    .await;
    let cfg = config(&manifest("forgotten", &src, &buf, &["f"], ""));
    assert_eq!(catch_up(&cfg).await, pipeline::Outcome::CaughtUp);
    philotes::pipeline::lifecycle::forget(&cfg)
        .await
        .expect("forget");
    // Written while no slot exists: only a new copy brings them.
    source
        .batch_execute(
            "INSERT INTO f SELECT g, 'late' FROM generate_series(101, 150) g;
             UPDATE f SET v = 'changed' WHERE id <= 10;
             DELETE FROM f WHERE id BETWEEN 11 AND 20;",
        )
        .await
        .expect("changes with no slot");
    assert_eq!(catch_up(&cfg).await, pipeline::Outcome::CaughtUp);
    let buffer = connect(&buf).await;
    let state = buffer
        .query_one(
            "SELECT phase, request, rows_copied FROM philotes.cdc_snapshots WHERE pipeline = 'test/forgotten'",
            &[],
        )
        .await
        .expect("the table's snapshot state");
    assert_eq!(
        (
            state.get::<_, &str>(0),
            state.get::<_, &str>(1),
            state.get::<_, i64>(2)
        ),
        ("Done", "initial", 140),
        "copied again as a new pipeline's table"
    );
    // The replay rules (README: Snapshots), with the copy's started_lsn removing the rows
    // deleted while no slot existed, give the source table.
    let report = philotes::verify::verify(&cfg).await.expect("verify");
    assert!(report.ok(), "{report}");
}

/// A row moved by an UPDATE from a key the copy has not reached to one it has passed, its
/// TOASTed column unchanged and so left out of the image: the copy never reads the new key
/// by range, and the event carries no whole image of it, so the key is read again by itself.
/// It used to be read again only when the chunk's snapshot did not see the move; a move the
/// next chunk's snapshot saw, or one made while the pipeline was stopped mid-copy, left the
/// row without its column for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moved_behind_the_copy_keeping_a_toasted_column_is_copied_whole() {
    let (src, buf, source) = databases_with(
        "snap_moved",
        "CREATE TABLE mv (id int PRIMARY KEY, n int NOT NULL, doc text);
         ALTER TABLE mv ALTER doc SET STORAGE EXTERNAL;
         INSERT INTO mv SELECT g, 0, repeat(md5(g::text), 80) FROM generate_series(1, 6000) g;",
    )
    .await;
    let cfg = config(&manifest(
        "snap-moved",
        &src,
        &buf,
        &["mv"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 100}",
    ));
    let mut running = start(cfg.clone(), pipeline::RunOptions::default());
    running
        .wait("the copy to start", Duration::from_secs(60), |p| {
            p.snapshots.iter().any(|t| t.rows_copied > 0)
        })
        .await;
    // A busy buffer (a row trigger that sleeps) keeps the copy going while the rows move.
    let buffer = connect(&buf).await;
    slow_down_buffer(&buffer, "0.002").await;
    // Each move commits on its own, between chunks or while one is read.
    for i in 1..=8 {
        source
            .batch_execute(&format!(
                "UPDATE mv SET id = -{i}, n = n + 1 WHERE id = 6001 - {i}"
            ))
            .await
            .expect("move a row behind the copy");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_still_copying(&running, "the moves");
    // One more right before a stop: its chunk's window is lost with the session while the
    // checkpoint written at the stop is past it. And more while the pipeline is stopped
    // mid-copy: they arrive before the first chunk of the session that resumes the copy.
    source
        .batch_execute("UPDATE mv SET id = -9, n = n + 1 WHERE id = 5992")
        .await
        .expect("move a row behind the copy");
    running.stop().await.expect("stops");
    let copying = phase(&buffer, "test/snap-moved", "public.mv").await;
    assert_eq!(copying.0, "Copying", "{copying:?}; make the table larger");
    for i in 11..=15 {
        source
            .batch_execute(&format!(
                "UPDATE mv SET id = -{i}, n = n + 1 WHERE id = 6001 - {i}"
            ))
            .await
            .expect("move a row behind the copy");
    }
    let running = start(cfg, pipeline::RunOptions::default());
    finish_copy(running, &source).await;
    assert_replay_equals_source(&source, &buffer, "test/snap-moved", "public.mv", &["id"]).await;
}

/// Runs `cfg` until its copy of `table` has written a chunk (a busy buffer, a row trigger
/// that sleeps, keeps it going until then) and stops it mid-copy; returns the rows copied.
/// The buffer is quick again after.
async fn stop_after_a_chunk(cfg: &pipeline::PipelineConfig, buffer: &Client, table: &str) -> i64 {
    let mut running = start(cfg.clone(), pipeline::RunOptions::default());
    running
        .wait("the copy to start", Duration::from_secs(60), |p| {
            !p.snapshots.is_empty()
        })
        .await;
    slow_down_buffer(buffer, "0.0003").await;
    running
        .wait("the copy to write a chunk", Duration::from_secs(60), |p| {
            p.snapshots.iter().any(|t| t.rows_copied > 0)
        })
        .await;
    running.stop().await.expect("stops");
    let (copying, copied) = phase(buffer, &cfg.id, table).await;
    assert_eq!(copying, "Copying", "copied {copied}; make the table larger");
    buffer
        .batch_execute("DROP TRIGGER slow ON philotes.cdc_event_log")
        .await
        .expect("drop the trigger");
    copied
}

/// More keys to read again than one chunk's bytes hold (here 8,000 rows of 3 KB moved behind
/// the copy, their TOASTed column left out of the stream's images; a chunk holds 8 MB): the
/// keys a chunk did not get to stay noted and are read by the next ones. They used to be
/// dropped with those it read, and the table was Done with thousands of rows never copied
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_to_read_again_beyond_a_chunk_s_bytes_are_all_read() {
    let (src, buf, source) = databases_with(
        "snap_many_moved",
        "CREATE TABLE mm (id int PRIMARY KEY, n int NOT NULL, doc text);
         ALTER TABLE mm ALTER doc SET STORAGE EXTERNAL;
         INSERT INTO mm SELECT g, 0, repeat(md5(g::text), 100) FROM generate_series(1, 20000) g;",
    )
    .await;
    let cfg = config(&manifest(
        "snap-many-moved",
        &src,
        &buf,
        &["mm"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 10000}",
    ));
    let buffer = connect(&buf).await;
    stop_after_a_chunk(&cfg, &buffer, "public.mm").await;
    // Behind the copy, whatever it has read: 8,000 keys to read again, 24 MB of rows.
    source
        .batch_execute("UPDATE mm SET id = -id, n = n + 1 WHERE id > 12000")
        .await
        .expect("move rows behind the copy");
    let running = start(cfg, pipeline::RunOptions::default());
    finish_copy(running, &source).await;
    assert_replay_equals_source(
        &source,
        &buffer,
        "test/snap-many-moved",
        "public.mm",
        &["id"],
    )
    .await;
}

/// More keys to read again than a copy holds (ten times `chunkSize`, at least 10,000: here
/// 12,000 rows moved behind the copy, their TOASTed column left out of the stream's images):
/// the table's rows are copied again from its start instead. The keys used to be held, and
/// written with every chunk's progress, however many there were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_keys_to_read_again_than_a_copy_holds_copy_the_table_again() {
    let (src, buf, source) = databases_with(
        "snap_too_many_moved",
        "CREATE TABLE tm (id int PRIMARY KEY, n int NOT NULL, doc text);
         ALTER TABLE tm ALTER doc SET STORAGE EXTERNAL;
         INSERT INTO tm SELECT g, 0, repeat(md5(g::text), 70) FROM generate_series(1, 14000) g;",
    )
    .await;
    let cfg = config(&manifest(
        "snap-too-many-moved",
        &src,
        &buf,
        &["tm"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 100}",
    ));
    let buffer = connect(&buf).await;
    let copied = stop_after_a_chunk(&cfg, &buffer, "public.tm").await;
    // 12,000 keys to read again, whatever the copy has read.
    source
        .batch_execute("UPDATE tm SET id = -id, n = n + 1 WHERE id > 2000")
        .await
        .expect("move rows behind the copy");
    let running = start(cfg, pipeline::RunOptions::default());
    // The most keys to read again the buffer ever holds for the table, until the copy is done.
    let mut most = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the copy was not done within 300s ({most} keys to read again at most)"
        );
        let r = buffer
            .query_one(
                "SELECT coalesce(json_array_length(reread), 0), phase FROM philotes.cdc_snapshots
                 WHERE pipeline = 'test/snap-too-many-moved' AND table_name = 'tm'",
                &[],
            )
            .await
            .expect("progress");
        most = most.max(r.get::<_, i32>(0));
        if r.get::<_, String>(1) == "Done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        most <= 10_000,
        "{most} keys to read again held; at most 10,000"
    );
    // Copied again from its start: every row of the table once more, after what was copied
    // before the stop.
    let copies = snapshot_events(&buffer, "test/snap-too-many-moved", "public.tm").await;
    assert!(copies >= copied + 14_000, "{copies} rows copied in all");
    finish_copy(running, &source).await;
    assert_replay_equals_source(
        &source,
        &buffer,
        "test/snap-too-many-moved",
        "public.tm",
        &["id"],
    )
    .await;
}

/// One UPDATE of more rows than a chunk's window keeps changes of (100,000), committed while
/// the table is copied: the window stops noting them and its chunk is read again, and the
/// copy still replays to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_larger_than_a_window_during_a_copy_replays_to_the_source() {
    let (src, buf, source) = databases_with(
        "snap_big_update",
        "CREATE TABLE bu (id int PRIMARY KEY, n int NOT NULL, s text);
         INSERT INTO bu SELECT g, 0, md5(g::text) FROM generate_series(1, 120000) g;",
    )
    .await;
    let cfg = config(&manifest(
        "snap-big-update",
        &src,
        &buf,
        &["bu"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 1000}",
    ));
    let buffer = connect(&buf).await;
    let mut running = start(cfg, pipeline::RunOptions::default());
    running
        .wait("the copy to write a chunk", Duration::from_secs(60), |p| {
            p.snapshots.iter().any(|t| t.rows_copied > 0)
        })
        .await;
    source
        .batch_execute("UPDATE bu SET n = n + 1, s = s || 'x'")
        .await
        .expect("update every row");
    let (phase_now, copied) = phase(&buffer, "test/snap-big-update", "public.bu").await;
    assert_eq!(
        phase_now, "Copying",
        "copied {copied} before the UPDATE ended; make the table larger"
    );
    finish_copy(running, &source).await;
    assert_replay_equals_source(
        &source,
        &buffer,
        "test/snap-big-update",
        "public.bu",
        &["id"],
    )
    .await;
}

/// A transaction whose commit record the source has written, so the stream carries it, but
/// that no snapshot sees yet: its backend is between writing the record and marking the
/// transaction committed (a loaded machine can deschedule it there, as CI's did once; gdb
/// holds it there here). Chunks read meanwhile hold the rows as they were before it, and the
/// windows that opened after its commit do not hold its changes. They used to be written
/// after it all the same, over its changes: the replay kept the old rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_not_yet_visible_to_a_chunk_read_after_it_is_not_written_over() {
    let (src, buf, source) = databases_with(
        "snap_unseen",
        "CREATE TABLE seed (id int PRIMARY KEY);
         CREATE TABLE uv (id int PRIMARY KEY, n int NOT NULL);
         INSERT INTO uv SELECT g, 0 FROM generate_series(1, 14000) g;",
    )
    .await;
    // The buffer's tables exist once the pipeline ran; a row trigger that sleeps for each
    // copied row keeps the copy of `uv`, added after, going for some seconds.
    let seed = config(&manifest("snap-unseen", &src, &buf, &["seed"], ""));
    assert_eq!(catch_up(&seed).await, pipeline::Outcome::CaughtUp);
    let buffer = connect(&buf).await;
    buffer
        .batch_execute(
            "CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS
               $$BEGIN PERFORM pg_sleep(0.0002); RETURN NEW; END$$;
             CREATE TRIGGER slow BEFORE INSERT ON philotes.cdc_event_log
               FOR EACH ROW WHEN (NEW.operation = 'S') EXECUTE FUNCTION public.slow();",
        )
        .await
        .expect("slow down the copy");
    // The transaction's session, its next commit to be held (gdb attached now: attaching
    // takes a while, the copy does not).
    let writer = connect(&src).await;
    let pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let mut hold = hold::CommitHold::attach(pid);
    let cfg = config(&manifest(
        "snap-unseen",
        &src,
        &buf,
        &["seed", "uv"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 100}",
    ));
    let mut running = start(cfg, pipeline::RunOptions::default());
    running
        .wait("the copy to write a chunk", Duration::from_secs(60), |p| {
            p.snapshots
                .iter()
                .any(|t| t.table == "public.uv" && t.rows_copied > 0)
        })
        .await;
    writer
        .batch_execute("BEGIN; UPDATE uv SET n = n + 1")
        .await
        .expect("update every row");
    let commit = tokio::spawn(async move { writer.batch_execute("COMMIT").await });
    hold.wait_stopped();
    assert_still_copying(&running, "the commit was held");
    // Its commit is in the WAL: once the pipeline has checkpointed past it, the copy writes
    // three more chunks. The window that holds the commit closes with the first at the latest;
    // the others were read after it, while the transaction is still not visible.
    let lsn = wal_lsn(&source).await;
    running.checkpointed(lsn).await;
    let last_key = || async {
        let r = buffer
            .query_one(
                "SELECT coalesce((last_key->>0)::int, 0), range_done FROM philotes.cdc_snapshots
                 WHERE pipeline = 'test/snap-unseen' AND table_name = 'uv'",
                &[],
            )
            .await
            .expect("progress");
        (r.get::<_, i32>(0), r.get::<_, bool>(1))
    };
    let (from, _) = last_key().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (at, done) = last_key().await;
        if at >= from + 300 {
            break;
        }
        assert!(
            !done && std::time::Instant::now() < deadline,
            "the copy wrote no three chunks past key {from} while the commit was held \
             (at {at}, range done: {done}); make the table larger"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hold.release();
    commit.await.expect("commit task").expect("commit");
    finish_copy(running, &source).await;
    assert_replay_equals_source(&source, &buffer, "test/snap-unseen", "public.uv", &["id"]).await;
}

/// The copy's connection to the source lost while it waits for the loop (the session
/// terminated; a source restart or a network cut does the same): the copy resumes from the
/// last chunk written, as the stream does, instead of failing for good. It used to stop the
/// pipeline with SnapshotFailed ("cannot read the definition of …").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_connection_is_cut_resumes() {
    let (src, buf, source) = databases_with(
        "snap_cut",
        "CREATE TABLE seed (id int PRIMARY KEY);
         CREATE TABLE cut (id int PRIMARY KEY, v text);
         INSERT INTO cut SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, 5000) g;",
    )
    .await;
    // The buffer's tables exist once the pipeline ran; `cut` is added after.
    let seed = config(&manifest("snap-cut", &src, &buf, &["seed"], ""));
    assert_eq!(catch_up(&seed).await, pipeline::Outcome::CaughtUp);
    // A busy buffer (a row trigger that sleeps) holds the loop back, so the copy's
    // connection waits, idle, for the loop's answer most of the time.
    let buffer = connect(&buf).await;
    slow_down_buffer(&buffer, "0.005").await;
    let cfg = config(&manifest(
        "snap-cut",
        &src,
        &buf,
        &["seed", "cut"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 100}",
    ));
    let mut running = start(cfg, pipeline::RunOptions::default());
    let copied = |p: &pipeline::Progress| {
        p.snapshots
            .iter()
            .find(|t| t.table == "public.cut")
            .map(|t| (t.rows_copied, t.phase == pipeline::snapshot::Phase::Done))
            .unwrap_or_default()
    };
    running
        .wait("the copy to start", Duration::from_secs(60), |p| {
            copied(p).0 > 0
        })
        .await;
    // Every idle session of the pipeline on the source, the copy's among them, cut again
    // and again until the copy is done.
    let mut cut = 0;
    while cut < 3 && !copied(&running.progress.borrow()).1 {
        let ended: Vec<bool> = column(
            &source,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'philotes' AND state = 'idle'",
        )
        .await;
        if ended.contains(&true) {
            cut += 1;
            // Until the copy is back at work.
            let before = copied(&running.progress.borrow()).0;
            running
                .wait("the copy to go on", Duration::from_secs(60), |p| {
                    let (rows, done) = copied(p);
                    rows > before || done
                })
                .await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        cut >= 2,
        "the copy ended after {cut} cuts; make the table larger"
    );
    finish_copy(running, &source).await;
    assert_replay_equals_source(&source, &buffer, "test/snap-cut", "public.cut", &["id"]).await;
    assert_eq!(
        phase(&buffer, "test/snap-cut", "public.cut").await.0,
        "Done"
    );
}

/// A column added and another dropped while a table is copied, and no change of the table
/// after them: the stream has no reason to describe the table again, yet the chunks read
/// after the ALTER are as current as the ones before. The copy finishes, each chunk written
/// with the definition it was read with. It used to read every later chunk again, without
/// end, until the table changed once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_finishes_after_an_alter_while_the_table_is_quiet() {
    let (src, buf, source) = databases_with(
        "snap_alter",
        "CREATE TABLE al (id int PRIMARY KEY, gone text, v text);
         INSERT INTO al SELECT g, 'gone', repeat(md5(g::text), 8) FROM generate_series(1, 20000) g;",
    )
    .await;
    let cfg = config(&manifest(
        "snap-alter",
        &src,
        &buf,
        &["al"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 200}",
    ));
    let mut running = start(cfg, pipeline::RunOptions::default());
    running
        .wait("the copy to start", Duration::from_secs(60), |p| {
            p.snapshots.iter().any(|t| t.rows_copied > 0)
        })
        .await;
    source
        .batch_execute(
            "UPDATE al SET v = 'changed' WHERE id = 1;
             ALTER TABLE al ADD COLUMN note text; ALTER TABLE al DROP COLUMN gone;",
        )
        .await
        .expect("alter the table");
    assert_still_copying(&running, "the ALTER");
    running
        .wait("the copy to finish", Duration::from_secs(60), |p| {
            p.snapshots
                .iter()
                .all(|t| t.phase == pipeline::snapshot::Phase::Done)
        })
        .await;
    finish_copy(running, &source).await;
    let buffer = connect(&buf).await;
    assert_eq!(
        phase(&buffer, "test/snap-alter", "public.al").await,
        ("Done".into(), 20000)
    );
    assert_replay_equals_source(&source, &buffer, "test/snap-alter", "public.al", &["id"]).await;
    // Each chunk's rows as they were read: with `gone` before the ALTER, with `note` after.
    let images: Vec<String> = column(
        &buffer,
        "SELECT DISTINCT (SELECT string_agg(k, ',' ORDER BY k) FROM jsonb_object_keys(after::jsonb) k)
         FROM philotes.cdc_events WHERE pipeline = 'test/snap-alter' AND operation = 'SNAPSHOT' ORDER BY 1",
    )
    .await;
    assert_eq!(images, ["gone,id,v", "id,note,v"]);
}

/// The key the chunks are ordered by changing during a copy: the progress noted under the old
/// key means nothing under the new one, so the table is copied again from its start under the
/// new key. It used to go on after the old key's last value, compared with the new key's
/// values, and to finish with most rows never copied.
async fn copy_while_the_key_changes(name: &str, change: &str, key_after: &str) {
    let (src, buf, source) = databases_with(
        &name.replace('-', "_"),
        "CREATE TABLE rk (id int PRIMARY KEY, u int NOT NULL UNIQUE, v text);
         INSERT INTO rk SELECT g, -g, repeat(md5(g::text), 8) FROM generate_series(1, 20000) g;",
    )
    .await;
    let cfg = config(&manifest(
        name,
        &src,
        &buf,
        &["rk"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 200}",
    ));
    let mut running = start(cfg.clone(), pipeline::RunOptions::default());
    running
        .wait("the copy to start", Duration::from_secs(60), |p| {
            p.snapshots.iter().any(|t| t.rows_copied > 0)
        })
        .await;
    source.batch_execute(change).await.expect("change the key");
    assert_still_copying(&running, "the change");
    finish_copy(running, &source).await;
    let buffer = connect(&buf).await;
    let pipeline = format!("test/{name}");
    assert_eq!(phase(&buffer, &pipeline, "public.rk").await.0, "Done");
    // The copy noticed the new key and went on under it.
    let key: Vec<Option<String>> = column(
        &buffer,
        &format!(
            "SELECT key_names::text FROM philotes.cdc_snapshots WHERE pipeline = '{pipeline}' AND table_name = 'rk'"
        ),
    )
    .await;
    assert_eq!(key, [Some(key_after.to_string())]);
    assert_replay_equals_source(&source, &buffer, &pipeline, "public.rk", &["id"]).await;
    let report = philotes::verify::verify(&cfg).await.expect("verify");
    assert!(report.ok(), "{report}");
}

/// The replica identity moved to another unique index, whose order is the reverse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_key_changes_starts_over_under_the_new_key() {
    copy_while_the_key_changes(
        "snap-rekey",
        "ALTER TABLE rk REPLICA IDENTITY USING INDEX rk_u_key",
        r#"["u"]"#,
    )
    .await;
}

/// The primary key moved to another column, whose order is the reverse: only the table's
/// indexes changed (its columns and replica identity setting did not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_primary_key_moves_starts_over_under_the_new_key() {
    copy_while_the_key_changes(
        "snap-repk",
        "ALTER TABLE rk DROP CONSTRAINT rk_pkey, ADD PRIMARY KEY (u)",
        r#"["u"]"#,
    )
    .await;
}

/// The table is replaced under its name mid-copy, as online schema change tools do (a new
/// table filled, then swapped in by renames in one transaction): its copy starts over from its
/// start with a new `started_lsn`. The rows of the new table before the point reached used to
/// be missing for good, and the old table's rows to stay in the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_swapped_in_under_its_name_mid_copy_is_copied_from_its_start() {
    let (src, buf, source) = databases_with(
        "snap_swap",
        "CREATE TABLE sw (id int PRIMARY KEY, v text);
         INSERT INTO sw SELECT g, 'old ' || g FROM generate_series(1, 20000) g;
         CREATE TABLE sw_new (id int PRIMARY KEY, v text);
         INSERT INTO sw_new SELECT g, 'new ' || g FROM generate_series(1, 20000, 3) g;",
    )
    .await;
    let cfg = config(&manifest(
        "snap-swap",
        &src,
        &buf,
        &["sw"],
        "flushInterval: 100ms\nsnapshot: {chunkSize: 200}",
    ));
    let publication = cfg.publication.clone();
    let mut running = start(cfg.clone(), pipeline::RunOptions::default());
    running
        .wait("the copy to be under way", Duration::from_secs(60), |p| {
            p.snapshots.iter().any(|t| t.rows_copied >= 2000)
        })
        .await;
    source
        .batch_execute(&format!(
            "BEGIN; ALTER TABLE sw RENAME TO sw_old; ALTER TABLE sw_new RENAME TO sw; \
             ALTER PUBLICATION {publication} SET TABLE sw; COMMIT;"
        ))
        .await
        .expect("swap");
    assert_still_copying(&running, "the swap");
    // Changes to the new table after the swap stream as usual.
    source
        .batch_execute("UPDATE sw SET v = 'changed' WHERE id = 4; DELETE FROM sw WHERE id = 7;")
        .await
        .expect("change");
    finish_copy(running, &source).await;
    // The consumer rule of a finished copy (rows whose last event sorts before its
    // started_lsn no longer exist) drops the old table's rows; verify applies it.
    let report = philotes::verify::verify(&cfg).await.expect("verify");
    assert!(report.ok(), "{report}");
    let buffer = connect(&buf).await;
    assert_eq!(
        phase(&buffer, "test/snap-swap", "public.sw").await.0,
        "Done"
    );
}

/// The key column's type changed (int to text): same names, another order ('10000' < '2000').
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_key_type_changes_starts_over() {
    copy_while_the_key_changes(
        "snap-retype",
        "ALTER TABLE rk ALTER COLUMN id TYPE text",
        r#"["id"]"#,
    )
    .await;
}

/// The pipeline `manifest` with its one table given as `entry` (a column list, a condition).
fn with_entry(name: &str, src: &str, buf: &str, entry: &str) -> String {
    manifest(name, src, buf, &["f"], "snapshot: {chunkSize: 100}").replace("['f']", entry)
}

/// What the pipeline's publication holds for `f`: its columns and its row filter.
async fn publication_entry(source: &Client, publication: &str) -> (Vec<String>, String) {
    let r = source
        .query_one(
            "SELECT attnames::text[], rowfilter FROM pg_publication_tables WHERE pubname = $1 AND tablename = 'f'",
            &[&publication],
        )
        .await
        .expect("publication entry");
    (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default())
}

/// `f`'s copy: (request, phase, rows copied), and the SNAPSHOT events written for it so far.
async fn copy_of_f(buffer: &Client, pipeline: &str) -> (String, String, i64, i64) {
    let r = buffer
        .query_one(
            "SELECT request, phase, rows_copied FROM philotes.cdc_snapshots WHERE pipeline = $1 AND table_name = 'f'",
            &[&pipeline],
        )
        .await
        .expect("snapshot row");
    (
        r.get(0),
        r.get(1),
        r.get(2),
        snapshot_events(buffer, pipeline, "public.f").await,
    )
}

/// A table's column list or row filter changed in the spec of a running pipeline: the
/// publication Philotes owns follows it, and the table is copied again, so the rows it now
/// takes in are captured and the consumer rule of a finished copy removes the rows it leaves
/// out (`philotes verify` replays by that rule). The publication already holding the new
/// entry when the pipeline starts (a stop right after it was changed) still copies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_whose_columns_or_row_filter_change_is_copied_again() {
    let (src, buf, source) = databases_with(
        "snap_refilter",
        "CREATE TABLE f (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text, secret text);
         INSERT INTO f OVERRIDING SYSTEM VALUE SELECT g, 'v' || g, 's' || g FROM generate_series(1, 1000) g;
         CREATE TABLE g (id int PRIMARY KEY);",
    )
    .await;
    if server_version(&source).await < 150000 {
        eprintln!("column lists and row filters need PostgreSQL 15; skipped");
        return;
    }
    let buffer = connect(&buf).await;
    let pipeline = "test/snap-refilter";
    let verify = |m: &str| {
        let file = manifest_file(m);
        let (code, out) = run_cli(&["verify", "-f", file.path().to_str().expect("path")]);
        assert_eq!(code, 0, "{out}");
    };

    let first = with_entry(
        "snap-refilter",
        &src,
        &buf,
        r#"[{name: f, columns: [id, v], where: "id <= 300"}]"#,
    );
    let cfg = config(&first);
    assert_eq!(catch_up(&cfg).await, pipeline::Outcome::CaughtUp);
    assert_eq!(
        copy_of_f(&buffer, pipeline).await,
        ("initial".into(), "Done".into(), 300, 300)
    );
    verify(&first);

    // Changed while it is stopped: a row it captures, and one it will take in.
    source
        .batch_execute("UPDATE f SET v = 'changed' WHERE id IN (250, 350)")
        .await
        .expect("updates");
    // A condition on a column outside the replica identity would make the source refuse
    // the table's UPDATEs and DELETEs: refused, the publication left as it was.
    let outside = with_entry(
        "snap-refilter",
        &src,
        &buf,
        r#"[{name: f, columns: [id, v], where: "v <> 'hidden'"}]"#,
    );
    let err = start_fails(config(&outside), "a condition outside the key").await;
    assert!(err.to_string().contains("replica identity"), "{err}");
    assert_eq!(
        publication_entry(&source, &cfg.publication).await,
        (
            vec!["id".to_string(), "v".to_string()],
            "(id <= 300)".to_string()
        )
    );
    source
        .batch_execute("UPDATE f SET v = v WHERE id = 1; DELETE FROM f WHERE id = 2; INSERT INTO f OVERRIDING SYSTEM VALUE VALUES (2, 'v2', 's2')")
        .await
        .expect("the source's updates still work");
    // A condition that closes its parenthesis to publish another table: refused, nothing
    // changed.
    let sneaky = with_entry(
        "snap-refilter",
        &src,
        &buf,
        r#"[{name: f, columns: [id, v], where: "id <= 400), g WHERE (true"}]"#,
    );
    let err = start_fails(config(&sneaky), "a condition naming another table").await;
    assert!(err.to_string().contains("spec.source.tables"), "{err}");
    let tables: Vec<String> = column(
        &source,
        &format!(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = '{}'",
            cfg.publication
        ),
    )
    .await;
    assert_eq!(tables, vec!["f"]);

    // More columns, and rows moved: 1-200 left out, 301-700 taken in. A transaction that
    // changed a row it takes in before the publication changed, still open then, commits
    // after the pipeline started: its change is in the copy.
    let second = with_entry(
        "snap-refilter",
        &src,
        &buf,
        r#"[{name: f, columns: [id, v, secret], where: "id > 200 AND id <= 700"}]"#,
    );
    let open = connect(&src).await;
    open.batch_execute("BEGIN; UPDATE f SET v = 'in flight' WHERE id = 400")
        .await
        .expect("open transaction");
    let run = tokio::spawn({
        let cfg = config(&second);
        async move { catch_up(&cfg).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    open.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(
        run.await.expect("pipeline task"),
        pipeline::Outcome::CaughtUp
    );
    let (columns, filter) = publication_entry(&source, &cfg.publication).await;
    assert_eq!(columns, vec!["id", "v", "secret"]);
    assert_eq!(filter, "((id > 200) AND (id <= 700))");
    assert_eq!(
        copy_of_f(&buffer, pipeline).await,
        ("changed".into(), "Done".into(), 500, 800)
    );
    let images: Vec<String> = column(
        &buffer,
        "SELECT after::text FROM philotes.cdc_events WHERE pipeline = 'test/snap-refilter' AND operation = 'SNAPSHOT' \
         AND after->>'id' = '350'",
    )
    .await;
    assert_eq!(
        images,
        vec![r#"{"id":350,"v":"changed","secret":"s350"}"#.to_string()]
    );
    assert_eq!(
        replay(&buffer, pipeline, "public.f", &["id"]).await["[400]"]["v"],
        "in flight"
    );
    verify(&second);
    // Started again as it is: nothing copied again.
    assert_eq!(
        catch_up(&config(&second)).await,
        pipeline::Outcome::CaughtUp
    );
    assert_eq!(copy_of_f(&buffer, pipeline).await.3, 800);

    // The publication already holds the next entry, changed by hand while the pipeline was
    // stopped: the copy follows what the publication holds.
    source
        .batch_execute(&format!(
            "ALTER PUBLICATION {pub} DROP TABLE f; ALTER PUBLICATION {pub} ADD TABLE f (id, v, secret) WHERE (id > 600)",
            pub = cfg.publication
        ))
        .await
        .expect("publication changed");
    source
        .batch_execute("DELETE FROM f WHERE id = 650; INSERT INTO f OVERRIDING SYSTEM VALUE VALUES (1001, 'new', 's')")
        .await
        .expect("writes");
    let third = with_entry(
        "snap-refilter",
        &src,
        &buf,
        r#"[{name: f, columns: [id, v, secret], where: "id > 600"}]"#,
    );
    assert_eq!(catch_up(&config(&third)).await, pipeline::Outcome::CaughtUp);
    assert_eq!(
        copy_of_f(&buffer, pipeline).await,
        ("changed".into(), "Done".into(), 400, 1200)
    );
    verify(&third);
}
