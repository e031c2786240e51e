//! The ordinary operational paths around a pipeline, which must keep "nothing lost": stops
//! while a backlog is being caught up, a lost slot, similar pipeline names, a silent network,
//! values the buffer cannot take. Each test failed on the release before these fixes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use philotes::pipeline::lsn;

/// `(checkpoint lsn, slot's confirmed_flush_lsn)` of a pipeline.
async fn checkpoint_and_confirmed(
    buffer: &tokio_postgres::Client,
    source: &tokio_postgres::Client,
    pipeline: &str,
    slot: &str,
) -> (u64, u64) {
    let ckpt: String = buffer
        .query_one(
            "SELECT lsn::text FROM philotes.cdc_checkpoints WHERE pipeline = $1",
            &[&pipeline],
        )
        .await
        .expect("read the checkpoint")
        .get(0);
    let confirmed: String = source
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("read the slot")
        .get(0);
    (
        lsn::parse(&ckpt).expect("lsn"),
        lsn::parse(&confirmed).expect("lsn"),
    )
}

/// Waits for a child to exit, at most `timeout`; panics with its log otherwise.
async fn exit_status(
    child: &mut Proc,
    timeout: Duration,
    log: &std::path::Path,
) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if started.elapsed() > timeout {
            panic!(
                "philotes did not exit within {timeout:?}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM, five times, while a 100,000-row backlog is caught up into a busy buffer (a row
/// trigger that sleeps stands in for the load): each stop writes what it claims, confirms
/// its checkpoint to the source, and in the end every row is in the buffer exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_busy_backlog_loses_nothing() {
    let (src, buf, source) =
        databases_with("termbusy", "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let text = manifest("termbusy", &src, &buf, &["t"], "");
    let file = manifest_file(&text);
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 0, "{out}");
    let buffer = connect(&buf).await;
    buffer
        .batch_execute(
            "CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS
               $$BEGIN PERFORM pg_sleep(0.0002); RETURN NEW; END$$;
             CREATE TRIGGER slow BEFORE INSERT ON philotes.cdc_events
               FOR EACH ROW EXECUTE FUNCTION public.slow();",
        )
        .await
        .expect("slow down the buffer");
    let rows = 100_000;
    for i in 0..100 {
        source
            .batch_execute(&format!(
                "INSERT INTO t SELECT g, 'row ' || g FROM generate_series({} + 1, {} + 1000) g",
                i * 1000,
                i * 1000
            ))
            .await
            .expect("write the backlog");
    }
    let end = wal_lsn(&source).await;
    let count = || async {
        buffer
            .query_one("SELECT count(*) FROM philotes.cdc_events", &[])
            .await
            .expect("count events")
            .get::<_, i64>(0)
    };
    let log = tempfile::NamedTempFile::new().expect("log file");
    for round in 0..5 {
        let before = count().await;
        let mut child = spawn_run(file.path(), &[], log.path());
        // More of the backlog written, or all of it checkpointed (rows a stop lost never
        // arrive, so the count alone would stall short of the total).
        eventually(
            &format!(
                "round {round}: the backlog to be written past {before} events, or checkpointed"
            ),
            Duration::from_secs(60),
            || async {
                let (ckpt, _) = checkpoint_and_confirmed(
                    &buffer,
                    &source,
                    "test/termbusy",
                    "philotes_test_termbusy",
                )
                .await;
                (count().await > before + 1000 || ckpt >= end).then_some(())
            },
        )
        .await;
        sigterm(&child);
        let status = exit_status(&mut child, Duration::from_secs(30), log.path()).await;
        assert!(
            status.success(),
            "round {round}: exit {status}: {}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        // A clean stop confirms exactly what it checkpointed (read once the walsender let go
        // of the slot).
        eventually(
            "the slot to be released",
            Duration::from_secs(10),
            || async {
                let active: bool = source
                    .query_one(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = 'philotes_test_termbusy'",
                        &[],
                    )
                    .await
                    .ok()?
                    .get(0);
                (!active).then_some(())
            },
        )
        .await;
        let (ckpt, confirmed) =
            checkpoint_and_confirmed(&buffer, &source, "test/termbusy", "philotes_test_termbusy")
                .await;
        assert_eq!(
            lsn::format(confirmed),
            lsn::format(ckpt),
            "round {round}: the slot's confirmed_flush_lsn equals the checkpoint after a clean stop"
        );
    }
    buffer
        .batch_execute("DROP TRIGGER slow ON philotes.cdc_events")
        .await
        .expect("drop the trigger");
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 0, "{out}");
    let ids: Vec<i64> = column(
        &buffer,
        "SELECT count(DISTINCT (after->>'id')::int) FROM philotes.cdc_events",
    )
    .await;
    assert_eq!(
        (count().await, ids[0]),
        (rows, rows),
        "every row exactly once"
    );
    let report = philotes::verify::verify(&config(&text))
        .await
        .expect("verify runs");
    assert!(report.ok(), "{report}");
}
