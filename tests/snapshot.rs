//! Snapshots of existing rows (README: Snapshots): consistency while the table changes,
//! resuming after kills, adding and re-syncing tables, every key shape.

mod common;

use std::collections::BTreeMap;
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
    let replayed = replay(buffer, pipeline, table, key).await;
    let mut normalized = BTreeMap::new();
    for (k, row) in replayed {
        let v: Value = source
            .query_one(
                &format!("SELECT to_jsonb(jsonb_populate_record(NULL::{table}, $1::jsonb))"),
                &[&Value::Object(row)],
            )
            .await
            .expect("rebuild row")
            .get(0);
        normalized.insert(k, v.as_object().unwrap().clone());
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
    // in (at most the chunk in flight per kill), or when it was stale in its chunk and read
    // again. From scratch, the three restarts would add 14,000 copies.
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
        total - distinct <= kills * 400 + 600,
        "{} rows copied twice across {kills} kills ({total} SNAPSHOT events of {distinct} rows)",
        total - distinct
    );
}
