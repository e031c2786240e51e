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
    slow_down_buffer(&buffer, "0.0002").await;
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
    let started = |log: &tempfile::NamedTempFile| {
        std::fs::read_to_string(log.path())
            .unwrap_or_default()
            .matches("streaming pipeline=")
            .count()
    };
    for round in 0..5 {
        let before = count().await;
        let streamed = started(&log);
        let mut child = spawn_run(file.path(), &[], log.path());
        // Streaming first: a SIGTERM within the few milliseconds before the process installs
        // its handler would end it by the signal's default (once everything is checkpointed,
        // the wait below is over at once).
        eventually(
            &format!("round {round}: the process to stream"),
            Duration::from_secs(60),
            || async { (started(&log) > streamed).then_some(()) },
        )
        .await;
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
        slot_released(&source, "philotes_test_termbusy", Duration::from_secs(10)).await;
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
        .batch_execute("DROP TRIGGER slow ON philotes.cdc_event_log")
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

/// The slot is dropped on the source (a DBA clearing it, a failover to a server without it)
/// and rows are written meanwhile: the pipeline refuses to stream (it used to recreate the
/// slot and report Healthy while those rows never arrived), names the slot and the range that
/// may be missing, and continues only once the gap is acknowledged and recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_is_reported_not_recreated() {
    let (src, buf, source) =
        databases_with("slotlost", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let text = manifest("slotlost", &src, &buf, &["t"], "");
    let file = manifest_file(&text);
    let cfg = config(&text);
    let insert = |from: i32, to: i32| {
        let source = &source;
        async move {
            source
                .batch_execute(&format!(
                    "INSERT INTO t SELECT generate_series({from}, {to})"
                ))
                .await
                .expect("insert");
        }
    };
    assert_eq!(catch_up_cli(file.path()).0, 0);
    insert(1, 10).await;
    assert_eq!(catch_up_cli(file.path()).0, 0);
    let buffer = connect(&buf).await;
    let ckpt: Vec<String> = column(
        &buffer,
        "SELECT lsn::text FROM philotes.cdc_checkpoints WHERE pipeline = 'test/slotlost'",
    )
    .await;
    source
        .batch_execute("SELECT pg_drop_replication_slot('philotes_test_slotlost')")
        .await
        .expect("drop the slot");
    insert(11, 110).await;
    // Deleted in the gap: no event will ever say so.
    source
        .batch_execute("DELETE FROM t WHERE id IN (2, 3)")
        .await
        .expect("delete");

    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 1, "{out}");
    for phrase in [
        "SlotLost",
        "replication slot philotes_test_slotlost is missing",
        &format!("changes committed after {} may be missing", ckpt[0]),
        "philotes recover",
    ] {
        assert!(out.contains(phrase), "missing `{phrase}` in:\n{out}");
    }
    let slots: Vec<i64> = column(
        &source,
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'philotes_test_slotlost'",
    )
    .await;
    assert_eq!(
        slots[0], 0,
        "the slot was not recreated behind the user's back"
    );
    // The operator's path (which retries transient setup errors): the loop ends Failed with
    // the reason, without retrying.
    let mut r = start(
        cfg.clone(),
        philotes::pipeline::RunOptions {
            retry_setup: true,
            ..philotes::pipeline::RunOptions::default()
        },
    );
    let ended = tokio::time::timeout(Duration::from_secs(30), &mut r.handle)
        .await
        .expect("the pipeline gives up at once")
        .expect("pipeline task");
    assert_eq!(ended.expect_err("refused").reason(), "SlotLost");
    assert_eq!(r.progress.borrow().state, philotes::pipeline::State::Failed);

    // A recovery killed as soon as it recorded the gap: the copy of the tables it asks for
    // was recorded with it (it used to be written in a transaction of its own, after the
    // gap's: killed in between, the next recover found no gap left, and nothing was copied).
    let out = std::process::Command::new(bin())
        .args(["recover", "-f"])
        .arg(file.path())
        .env("PHILOTES_FAILPOINT", "recover-after-gap")
        .output()
        .expect("run philotes");
    assert!(!out.status.success(), "{out:?}");
    let recorded: Vec<String> = column(
        &buffer,
        "SELECT (SELECT count(*) FROM philotes.cdc_gaps)::text || ' ' || \
         (SELECT count(*) FROM philotes.cdc_snapshots WHERE request LIKE 'gap:%' AND phase = 'Pending')::text",
    )
    .await;
    assert_eq!(
        recorded,
        ["1 1"],
        "the gap and the copy it asks for, together"
    );
    let gaps: Vec<String> = column(
        &buffer,
        "SELECT g.from_lsn::text || ' ' || g.reason || ' ' || g.to_lsn::text || ' ' || c.lsn::text
         FROM philotes.cdc_gaps g JOIN philotes.cdc_checkpoints c USING (pipeline)
         WHERE pipeline = 'test/slotlost'",
    )
    .await;
    let new_slot: Vec<String> = column(
        &source,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'philotes_test_slotlost'",
    )
    .await;
    // The gap runs from the old checkpoint to where the new slot begins, and the checkpoint
    // restarts there.
    assert_eq!(
        gaps,
        vec![format!(
            "{} SlotLost {} {}",
            ckpt[0], new_slot[0], new_slot[0]
        )]
    );
    // A second recover finds nothing to do.
    let (code, out) = run_cli(&["recover", "-f", file.path().to_str().expect("path")]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("has no gap to recover"), "{out}");

    insert(111, 120).await;
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 0, "{out}");
    let ids: Vec<i32> = column(
        &buffer,
        "SELECT (after->>'id')::int FROM philotes.cdc_events WHERE pipeline = 'test/slotlost' AND operation = 'INSERT' \
         ORDER BY commit_lsn, seq",
    )
    .await;
    let want: Vec<i32> = (1..=10).chain(111..=120).collect();
    assert_eq!(ids, want, "before the gap, and after it, exactly once");
    // The recovery copied the table again, so what the gap took (11..=110) is back, as
    // SNAPSHOT events after the gap.
    let copied: Vec<i32> = column(
        &buffer,
        "SELECT (after->>'id')::int FROM philotes.cdc_events WHERE pipeline = 'test/slotlost' AND operation = 'SNAPSHOT' \
         ORDER BY (after->>'id')::int",
    )
    .await;
    let want: Vec<i32> = (1..=120).filter(|i| *i != 2 && *i != 3).collect();
    assert_eq!(copied, want);
    let request: Vec<String> = column(
        &buffer,
        "SELECT request || ' ' || phase FROM philotes.cdc_snapshots WHERE pipeline = 'test/slotlost'",
    )
    .await;
    assert_eq!(request, vec![format!("gap:{} Done", new_slot[0])]);
    // verify names the acknowledged gap, and the replay matches the source again: by the
    // rule of a finished copy, the rows deleted in the gap (last event before the copy) are
    // gone.
    let (code, out) = run_cli(&["verify", "-f", file.path().to_str().expect("path")]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("an acknowledged gap (SlotLost)")
            && out.contains("118 snapshot rows")
            && out.contains("replayed into 118 rows; source has 118 rows"),
        "{out}"
    );

    // Recreated behind the pipeline's back (dropped and created again, so it begins beyond
    // the checkpoint): also SlotLost, with the range.
    for sql in [
        "SELECT pg_drop_replication_slot('philotes_test_slotlost')",
        "INSERT INTO t VALUES (121)",
        "SELECT pg_create_logical_replication_slot('philotes_test_slotlost', 'pgoutput')",
    ] {
        source
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("SlotLost")
            && out.contains("it was recreated, or another consumer advanced it"),
        "{out}"
    );
}

/// The source is replaced by another server holding the same database (a restore onto a new
/// cluster, a Secret pointing elsewhere): refused with SourceChanged before anything streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_server_behind_the_same_name_is_refused() {
    let ddl = "CREATE TABLE t (id int PRIMARY KEY)";
    let (src, buf, _source) = databases_with("moved", ddl).await;
    let text = manifest("moved", &src, &buf, &["t"], "");
    assert_eq!(catch_up_cli(manifest_file(&text).path()).0, 0);
    let other = own_cluster(philotes::embedded::ClusterOptions::default());
    let other_src = fresh_db(&other, "moved_src").await;
    connect(&other_src)
        .await
        .batch_execute(ddl)
        .await
        .expect("create the table on the other server");
    let moved = manifest("moved", &other_src, &buf, &["t"], "");
    let (code, out) = catch_up_cli(manifest_file(&moved).path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("SourceChanged"), "{out}");
    assert!(out.contains("system identifier"), "{out}");
}

/// Pipelines `a-b/c` and `a/b-c` on one source, each with its own buffer and default names:
/// both used to derive slot `philotes_a_b_c` and take changes from each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn similar_pipeline_names_get_their_own_slots() {
    let (src, buf1, source) =
        databases_with("similar", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let buf2 = fresh_db(shared(), "similar_buf2").await;
    let in_ns =
        |text: String, ns: &str| text.replace("namespace: test", &format!("namespace: {ns}"));
    let one = config(&in_ns(
        manifest("c", &src, &buf1, &["t"], "flushInterval: 50ms"),
        "a-b",
    ));
    let two = config(&in_ns(
        manifest("b-c", &src, &buf2, &["t"], "flushInterval: 50ms"),
        "a",
    ));
    assert_ne!(one.slot, two.slot);
    assert_ne!(one.publication, two.publication);
    let mut r1 = start(one.clone(), philotes::pipeline::RunOptions::default());
    let mut r2 = start(two.clone(), philotes::pipeline::RunOptions::default());
    r1.streaming().await;
    r2.streaming().await;
    for i in 0..200 {
        source
            .batch_execute(&format!("INSERT INTO t VALUES ({i})"))
            .await
            .expect("insert");
    }
    let end = wal_lsn(&source).await;
    r1.checkpointed(end).await;
    r2.checkpointed(end).await;
    r1.stop().await.expect("stop a-b/c");
    r2.stop().await.expect("stop a/b-c");
    for (buf, id) in [(&buf1, "a-b/c"), (&buf2, "a/b-c")] {
        let n: Vec<i64> = column(
            &connect(buf).await,
            &format!("SELECT count(*) FROM philotes.cdc_events WHERE pipeline = '{id}'"),
        )
        .await;
        assert_eq!(n[0], 200, "pipeline {id} captured every change");
    }
    for cfg in [&one, &two] {
        let report = philotes::verify::verify(cfg).await.expect("verify");
        assert!(report.ok(), "{}: {report}", cfg.id);
    }
}

/// The replication connection goes silent (a black-holing proxy or NAT: no data, no FIN, no
/// RST). The pipeline notices within streamTimeout, says so in its status, reconnects, and
/// catches up exactly once within about twice the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_noticed_and_reopened() {
    let (src, buf, source) = databases_with("silent", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let proxy = proxy::Proxy::start(shared().port).await;
    let through_proxy = src.replace(
        &format!("127.0.0.1:{}", shared().port),
        &format!("127.0.0.1:{}", proxy.port),
    );
    let timeout = Duration::from_secs(3);
    let cfg = config(
        &manifest(
            "silent",
            &through_proxy,
            &buf,
            &["t"],
            "flushInterval: 50ms",
        )
        .replace("    tables: [", "    streamTimeout: 3s\n    tables: ["),
    );
    assert_eq!(cfg.stream_timeout, timeout);
    let mut r = start(cfg.clone(), philotes::pipeline::RunOptions::default());
    r.streaming().await;
    source
        .batch_execute("INSERT INTO t SELECT generate_series(1, 50)")
        .await
        .expect("insert");
    r.checkpointed(wal_lsn(&source).await).await;

    proxy.black_hole();
    let silenced = Instant::now();
    source
        .batch_execute("INSERT INTO t SELECT generate_series(51, 150)")
        .await
        .expect("insert");
    let end = wal_lsn(&source).await;
    // Retrying is what status reports as Degraded, with this reason.
    r.wait("the silence to be reported", timeout * 3, |p| {
        p.state == philotes::pipeline::State::Retrying
            && p.last_error
                .as_ref()
                .is_some_and(|(reason, _)| reason == "StreamTimeout")
    })
    .await;
    r.checkpointed(end).await;
    let took = silenced.elapsed();
    assert!(
        took < timeout * 3,
        "caught up {took:?} after the network went silent (streamTimeout {timeout:?})"
    );
    r.stop().await.expect("stop");
    let ids: Vec<i64> = column(
        &connect(&buf).await,
        "SELECT count(DISTINCT after->>'id') FROM philotes.cdc_events WHERE pipeline = 'test/silent'",
    )
    .await;
    let total: Vec<i64> = column(
        &connect(&buf).await,
        "SELECT count(*) FROM philotes.cdc_events WHERE pipeline = 'test/silent'",
    )
    .await;
    assert_eq!((ids[0], total[0]), (150, 150), "every row exactly once");
    let report = philotes::verify::verify(&cfg).await.expect("verify");
    assert!(report.ok(), "{report}");
}

/// A new `SQL_ASCII` database `name` on the shared server (it stores text bytes unchecked,
/// so a value may not be UTF-8), after dropping one of that name and its slots; its URI.
async fn sql_ascii_database(name: &str) -> String {
    let admin = connect(&shared().uri("postgres")).await;
    for sql in [
        format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{name}'"),
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"),
    ] {
        admin
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    shared().uri(name)
}

/// A `SQL_ASCII` source holds text that is not UTF-8. It used to be retried forever, and not
/// even the changes committed before it landed. Now they land and are confirmed, the pipeline
/// stops naming the table, column and LSN (`poisonEvents: Fail`, the default), and with
/// `poisonEvents: DeadLetter` the change is set aside in `cdc_dead_letters` and the rest flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_is_not_utf8_is_reported_or_set_aside() {
    let src = sql_ascii_database("poison_src").await;
    let buf = fresh_db(shared(), "poison_buf").await;
    let source = connect(&src).await;
    source
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .expect("create table");
    let text = manifest("poison", &src, &buf, &["t"], "");
    let file = manifest_file(&text);
    assert_eq!(catch_up_cli(file.path()).0, 0);
    for tx in [
        "INSERT INTO t VALUES (1, 'ok'), (2, 'fine')",
        r"BEGIN; INSERT INTO t VALUES (3, 'before'); INSERT INTO t VALUES (4, E'caf\xe9');
          INSERT INTO t VALUES (5, 'after'); COMMIT",
        "INSERT INTO t VALUES (6, 'later')",
    ] {
        source.batch_execute(tx).await.expect("write");
    }
    let buffer = connect(&buf).await;
    let ids = || async {
        column::<i32>(
            &buffer,
            "SELECT (after->>'id')::int FROM philotes.cdc_events WHERE pipeline = 'test/poison' ORDER BY commit_lsn, seq",
        )
        .await
    };
    for attempt in 0..2 {
        let started = Instant::now();
        let (code, out) = catch_up_cli(file.path());
        assert_eq!(code, 1, "attempt {attempt}: {out}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "gave up at once"
        );
        for phrase in [
            "PoisonEvent",
            "cannot store the INSERT of public.t at LSN",
            "column v of public.t holds a value that is not valid UTF-8",
            "poisonEvents: DeadLetter",
        ] {
            assert!(
                out.contains(phrase),
                "attempt {attempt}: no `{phrase}` in:\n{out}"
            );
        }
        assert_eq!(ids().await, vec![1, 2, 3], "everything before it landed");
    }
    let (ckpt, confirmed) =
        checkpoint_and_confirmed(&buffer, &source, "test/poison", "philotes_test_poison").await;
    assert_eq!(
        lsn::format(confirmed),
        lsn::format(ckpt),
        "and was confirmed"
    );

    let dead_letter = manifest_file(&manifest(
        "poison",
        &src,
        &buf,
        &["t"],
        "poisonEvents: DeadLetter",
    ));
    let (code, out) = catch_up_cli(dead_letter.path());
    assert_eq!(code, 0, "{out}");
    assert_eq!(ids().await, vec![1, 2, 3, 5, 6], "the rest flows");
    let set_aside = buffer
        .query_one(
            "SELECT d.seq, d.operation, d.reason, d.message,
                    d.commit_lsn = (SELECT commit_lsn FROM philotes.cdc_events WHERE after->>'id' = '5')
             FROM philotes.cdc_dead_letters d WHERE pipeline = 'test/poison'",
            &[],
        )
        .await
        .expect("one dead letter");
    assert_eq!(
        set_aside.get::<_, i32>(0),
        1,
        "in the position its event would take"
    );
    assert_eq!(set_aside.get::<_, &str>(1), "INSERT");
    assert!(set_aside.get::<_, &str>(2).contains("column v"));
    let message: Vec<u8> = set_aside.get(3);
    assert!(
        message.windows(4).any(|w| w == b"caf\xe9"),
        "the message is kept byte for byte"
    );
    assert!(set_aside.get::<_, bool>(4), "in the same transaction");
}

/// A row the snapshot copies holds text that is not UTF-8 (a `SQL_ASCII` source): it goes the
/// way of `poisonEvents` as such a change in the stream does. By default the pipeline stops,
/// naming the table, the row's key and the column, with what came before it written; with
/// `DeadLetter` the row's key is set aside in `cdc_dead_letters` and the copy goes on, and
/// fixing the value on the source brings the row in (an UPDATE of a row not seen yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_value_that_is_not_utf8_is_reported_or_set_aside() {
    let src = sql_ascii_database("poisoncopy_src").await;
    let buf = fresh_db(shared(), "poisoncopy_buf").await;
    let source = connect(&src).await;
    source
        .batch_execute(
            r"CREATE TABLE t (id int PRIMARY KEY, v text);
              INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, E'caf\xe9'), (5, 'e'), (6, 'f')",
        )
        .await
        .expect("create table");
    let buffer = connect(&buf).await;
    let copied = || async {
        column::<i32>(
            &buffer,
            "SELECT DISTINCT (after->>'id')::int FROM philotes.cdc_events WHERE pipeline = 'test/poisoncopy' ORDER BY 1",
        )
        .await
    };
    let file = manifest_file(&manifest("poisoncopy", &src, &buf, &["t"], ""));
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 1, "{out}");
    for phrase in [
        "PoisonEvent",
        "cannot store the SNAPSHOT of public.t",
        "the row (id)=(4) holds a value that is not valid UTF-8 in column v",
        "poisonEvents: DeadLetter",
    ] {
        assert!(out.contains(phrase), "no `{phrase}` in:\n{out}");
    }
    assert_eq!(copied().await, vec![1, 2, 3], "the rows before it landed");

    let dead_letter = manifest_file(&manifest(
        "poisoncopy",
        &src,
        &buf,
        &["t"],
        "poisonEvents: DeadLetter",
    ));
    let (code, out) = catch_up_cli(dead_letter.path());
    assert_eq!(code, 0, "{out}");
    assert_eq!(copied().await, vec![1, 2, 3, 5, 6], "the copy went on");
    let set_aside = buffer
        .query_one(
            "SELECT operation, schema_name || '.' || table_name, reason, message FROM philotes.cdc_dead_letters \
             WHERE pipeline = 'test/poisoncopy'",
            &[],
        )
        .await
        .expect("one dead letter");
    assert_eq!(set_aside.get::<_, &str>(0), "SNAPSHOT");
    assert_eq!(set_aside.get::<_, &str>(1), "public.t");
    assert!(set_aside.get::<_, &str>(2).contains("(id)=(4)"));
    assert_eq!(set_aside.get::<_, Vec<u8>>(3), b"[4]", "the row's key");
    let state: Vec<String> = column(
        &buffer,
        "SELECT phase || ' ' || rows_copied FROM philotes.cdc_snapshots WHERE pipeline = 'test/poisoncopy'",
    )
    .await;
    assert_eq!(state, ["Done 5"]);

    // Fixed on the source: the UPDATE carries the whole row, and the replay matches.
    source
        .batch_execute("UPDATE t SET v = 'cafe' WHERE id = 4")
        .await
        .expect("fix");
    let (code, out) = catch_up_cli(dead_letter.path());
    assert_eq!(code, 0, "{out}");
    let cfg = config(&manifest("poisoncopy", &src, &buf, &["t"], ""));
    let report = philotes::verify::verify(&cfg).await.expect("verify");
    assert!(report.ok(), "{report}");
    assert_eq!(report.dead_letters, vec![("public.t".to_string(), 1)]);
}

/// Makes the buffer refuse the events matching `condition` (on `NEW`, a `cdc_event_log` row)
/// with a data exception, `id … is not welcome`, as a trigger or constraint a user added
/// would.
async fn refuse_events_where(buffer: &tokio_postgres::Client, condition: &str) {
    buffer
        .batch_execute(&format!(
            "CREATE FUNCTION philotes_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF {condition} THEN
                 RAISE EXCEPTION 'id % is not welcome', NEW.after->>'id' USING ERRCODE = '22023';
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER refuse BEFORE INSERT ON philotes.cdc_event_log
               FOR EACH ROW EXECUTE FUNCTION philotes_refuse();"
        ))
        .await
        .expect("a trigger on cdc_event_log");
}

/// A copied row the buffer refuses (here a trigger raising a data exception) is found as a
/// refused change in the stream is: from the checkpoint, the copy's rows are written one per
/// transaction until only it is rolled back; then `poisonEvents` applies to it, by its key,
/// whenever its chunk is read again. `Fail` stops naming the table and the row; `DeadLetter`
/// sets its key aside and the copy goes on. Never a search that starts over on every try
/// (a row alone in its chunk, table `one`, used to be looked for forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_row_the_buffer_refuses_is_isolated_then_reported_or_set_aside() {
    let (src, buf, source) = databases_with(
        "refusedrow",
        "CREATE TABLE seed (id int PRIMARY KEY);
         CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 6) i;
         CREATE TABLE one (id int PRIMARY KEY, v text);
         INSERT INTO one VALUES (7, 'seven');",
    )
    .await;
    // The buffer's tables exist once the pipeline started; `t` and `one` are added after.
    let seed = manifest_file(&manifest("refusedrow", &src, &buf, &["seed"], ""));
    assert_eq!(catch_up_cli(seed.path()).0, 0);
    let buffer = connect(&buf).await;
    refuse_events_where(
        &buffer,
        "NEW.operation = 'S' AND NEW.after->>'id' IN ('4', '7')",
    )
    .await;
    let copied = |table: &'static str| {
        let buffer = &buffer;
        async move {
            column::<i32>(
                buffer,
                &format!(
                    "SELECT DISTINCT (after->>'id')::int FROM philotes.cdc_events \
                     WHERE pipeline = 'test/refusedrow' AND table_name = '{table}' ORDER BY 1"
                ),
            )
            .await
        }
    };
    let text = manifest("refusedrow", &src, &buf, &["seed", "t", "one"], "");

    // Fail (the default): the rows before it are written and confirmed, then it is named.
    let started = Instant::now();
    let (code, out) = catch_up_cli(manifest_file(&text).path());
    assert_eq!(code, 1, "{out}");
    assert!(started.elapsed() < Duration::from_secs(60), "no retry loop");
    for phrase in [
        "PoisonEvent",
        "cannot store the SNAPSHOT of public.t",
        "the buffer refused the row (id)=(4)",
        "id 4 is not welcome",
        "Every change before it is in the buffer and confirmed",
        "poisonEvents: DeadLetter",
    ] {
        assert!(out.contains(phrase), "no `{phrase}` in:\n{out}");
    }
    assert_eq!(
        copied("t").await,
        vec![1, 2, 3],
        "the rows before it landed"
    );
    let (ckpt, confirmed) = checkpoint_and_confirmed(
        &buffer,
        &source,
        "test/refusedrow",
        "philotes_test_refusedrow",
    )
    .await;
    assert_eq!(ckpt, confirmed, "what is written is confirmed");

    // DeadLetter: each refused row's key is set aside with the server's reason; the copies
    // complete.
    let dead_text = text.replace("spec:\n", "spec:\n  poisonEvents: DeadLetter\n");
    let dead = manifest_file(&dead_text);
    let started = Instant::now();
    let (code, out) = catch_up_cli(dead.path());
    assert_eq!(code, 0, "{out}");
    assert!(started.elapsed() < Duration::from_secs(60), "no retry loop");
    assert_eq!(copied("t").await, vec![1, 2, 3, 5, 6], "the copy went on");
    assert_eq!(copied("one").await, Vec::<i32>::new());
    let letters: Vec<String> = column(
        &buffer,
        "SELECT table_name || ' ' || operation || ' ' || convert_from(message, 'UTF8') || ': ' || reason \
         FROM philotes.cdc_dead_letters WHERE pipeline = 'test/refusedrow' ORDER BY commit_lsn, seq",
    )
    .await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    for (letter, (table, id)) in letters.iter().zip([("t", 4), ("one", 7)]) {
        assert!(
            letter.starts_with(&format!(
                "{table} SNAPSHOT [{id}]: the buffer refused the row (id)=({id})"
            )) && letter.contains(&format!("id {id} is not welcome")),
            "{letters:?}"
        );
    }
    let state: Vec<String> = column(
        &buffer,
        "SELECT table_name || ' ' || phase FROM philotes.cdc_snapshots \
         WHERE pipeline = 'test/refusedrow' ORDER BY table_name",
    )
    .await;
    assert_eq!(state, ["one Done", "seed Done", "t Done"]);

    // The refusal removed and the rows changed on the source: the UPDATEs carry the whole
    // rows, and the replay matches the source.
    buffer
        .batch_execute("DROP TRIGGER refuse ON philotes.cdc_event_log")
        .await
        .expect("drop trigger");
    source
        .batch_execute("UPDATE t SET v = 'four' WHERE id = 4; UPDATE one SET v = 'SEVEN'")
        .await
        .expect("fix");
    assert_eq!(catch_up_cli(dead.path()).0, 0);
    let report = philotes::verify::verify(&config(&dead_text))
        .await
        .expect("verify");
    assert!(report.ok(), "{report}");
}

/// Two pipelines of one buffer naming the same slot: the second is refused with
/// SlotConflict instead of taking changes from the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_checkpointed_by_another_pipeline_is_refused() {
    let (src, buf, _source) =
        databases_with("claimed", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let first = manifest("first", &src, &buf, &["t"], "")
        .replace("    tables: [", "    slot: claimed_slot\n    tables: [");
    let second = manifest("second", &src, &buf, &["t"], "")
        .replace("    tables: [", "    slot: claimed_slot\n    tables: [");
    assert_eq!(catch_up_cli(manifest_file(&first).path()).0, 0);
    let (code, out) = catch_up_cli(manifest_file(&second).path());
    assert_eq!(code, 1, "{out}");
    for phrase in [
        "SlotConflict",
        "replication slot claimed_slot",
        "already streamed by pipeline test/first",
    ] {
        assert!(out.contains(phrase), "no `{phrase}` in:\n{out}");
    }
}

/// Errors retrying cannot heal stop the pipeline with a reason instead of backing off
/// forever: here the buffer holds events the checkpoint does not know of (a crash between the
/// buffer commit and the acknowledgement, then a checkpoint restored from before it), so the
/// replay hits a unique violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_buffer_refuses_for_good_stops_with_a_reason() {
    let (src, buf, source) = databases_with("refused", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let text = manifest("refused", &src, &buf, &["t"], "");
    let file = manifest_file(&text);
    assert_eq!(catch_up_cli(file.path()).0, 0);
    source
        .batch_execute("INSERT INTO t SELECT generate_series(1, 20)")
        .await
        .expect("insert");
    let out = std::process::Command::new(bin())
        .args(["run", "-f"])
        .arg(file.path())
        .env("PHILOTES_FAILPOINT", "after-buffer-commit")
        .output()
        .expect("run philotes");
    assert!(!out.status.success());
    let buffer = connect(&buf).await;
    buffer
        .batch_execute(
            "UPDATE philotes.cdc_checkpoints SET last_commit_lsn = NULL, last_seq = NULL,
               lsn = (SELECT min(commit_lsn) FROM philotes.cdc_events)",
        )
        .await
        .expect("restore an older checkpoint");
    let started = Instant::now();
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 1, "{out}");
    assert!(started.elapsed() < Duration::from_secs(60), "no retrying");
    for phrase in [
        "BufferNotReady",
        "the buffer already holds an event",
        "duplicate key",
    ] {
        assert!(out.contains(phrase), "no `{phrase}` in:\n{out}");
    }
    assert!(!out.contains("retrying"), "{out}");
}

/// A value the buffer refuses (here a trigger raising a data exception; a limit of the server
/// would do the same) is found by writing one change per transaction from the checkpoint,
/// everything before it lands, and then `poisonEvents` applies: `Fail` stops naming it,
/// `DeadLetter` sets it aside and goes on. Never the same batch retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_buffer_refuses_is_isolated_then_reported_or_set_aside() {
    let (src, buf, source) =
        databases_with("refusedvalue", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let text = manifest("refusedvalue", &src, &buf, &["t"], "");
    let file = manifest_file(&text);
    assert_eq!(catch_up_cli(file.path()).0, 0);
    source
        .batch_execute("INSERT INTO t SELECT generate_series(1, 20)")
        .await
        .unwrap();
    assert_eq!(catch_up_cli(file.path()).0, 0);
    let buffer = connect(&buf).await;
    refuse_events_where(&buffer, "NEW.after->>'id' IN ('25', '27')").await;
    // One transaction: the refused row is in the middle of it.
    source
        .batch_execute("INSERT INTO t SELECT generate_series(21, 30)")
        .await
        .unwrap();
    let ids = || async {
        column::<i32>(
            &buffer,
            "SELECT (after->>'id')::int FROM philotes.cdc_events WHERE pipeline = 'test/refusedvalue' ORDER BY commit_lsn, seq",
        )
        .await
    };

    // Fail (the default): everything before it is written and confirmed, then it is named.
    let started = Instant::now();
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 1, "{out}");
    assert!(started.elapsed() < Duration::from_secs(60), "no retry loop");
    for phrase in [
        "PoisonEvent",
        "INSERT of public.t",
        "the buffer refused it",
        "id 25 is not welcome",
        "Every change before it is in the buffer and confirmed",
    ] {
        assert!(out.contains(phrase), "no `{phrase}` in:\n{out}");
    }
    assert_eq!(ids().await, (1..=24).collect::<Vec<_>>());
    let (ckpt, confirmed) = checkpoint_and_confirmed(
        &buffer,
        &source,
        "test/refusedvalue",
        "philotes_test_refusedvalue",
    )
    .await;
    assert_eq!(ckpt, confirmed, "what is written is confirmed");

    // DeadLetter: set aside with the server's reason, the rest lands exactly once.
    let dead = manifest_file(&text.replace("spec:\n", "spec:\n  poisonEvents: DeadLetter\n"));
    let (code, out) = catch_up_cli(dead.path());
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        ids().await,
        (1..=24).chain([26]).chain(28..=30).collect::<Vec<_>>()
    );
    let letters: Vec<String> = column(
        &buffer,
        "SELECT table_name || ' ' || operation || ': ' || reason FROM philotes.cdc_dead_letters WHERE pipeline = 'test/refusedvalue'",
    )
    .await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    for (letter, id) in letters.iter().zip([25, 27]) {
        assert!(
            letter.starts_with("t INSERT: the buffer refused it")
                && letter.contains(&format!("id {id} is not welcome")),
            "{letters:?}"
        );
    }
    let (code, out) = run_cli(&["verify", "-f", dead.path().to_str().unwrap()]);
    assert!(
        out.contains("2 changes of public.t were set aside in cdc_dead_letters"),
        "{code} {out}"
    );

    // A refusal that goes away while the changes are written one at a time: back to
    // batches, nothing set aside that the buffer would take.
    buffer
        .batch_execute(
            "CREATE OR REPLACE FUNCTION philotes_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               -- A sequence is not rolled back: the first attempt only is refused.
               IF NEW.after->>'id' = '35' AND nextval('public.refused_once') = 1 THEN
                 RAISE EXCEPTION 'not yet' USING ERRCODE = '22023';
               END IF;
               RETURN NEW;
             END $$;
             CREATE SEQUENCE public.refused_once;",
        )
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO t SELECT generate_series(31, 40)")
        .await
        .unwrap();
    let (code, out) = catch_up_cli(dead.path());
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        ids().await,
        (1..=24).chain([26]).chain(28..=40).collect::<Vec<_>>()
    );
    let letters: i64 = buffer
        .query_one("SELECT count(*) FROM philotes.cdc_dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(letters, 2, "nothing more set aside");
}

/// Refusals by the buffer's own rules, not only data exceptions: a CHECK constraint
/// (23514) and a trigger's `RAISE EXCEPTION` without an ERRCODE (P0001) refuse the same
/// change on every try, so they are found and `poisonEvents` applies, as for a value the
/// buffer cannot store. They used to be retried forever with the same batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_buffer_rules_refuse_is_isolated_not_retried_forever() {
    let (src, buf, source) =
        databases_with("refusedrule", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let text = manifest("refusedrule", &src, &buf, &["t"], "");
    let file = manifest_file(&text);
    assert_eq!(catch_up_cli(file.path()).0, 0);
    let buffer = connect(&buf).await;
    buffer
        .batch_execute(
            "ALTER TABLE philotes.cdc_event_log ADD CONSTRAINT no_five
               CHECK (after->>'id' IS DISTINCT FROM '5') NOT VALID;
             CREATE FUNCTION philotes_rule() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.after->>'id' = '7' THEN RAISE EXCEPTION 'seven is reserved'; END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER rule BEFORE INSERT ON philotes.cdc_event_log
               FOR EACH ROW EXECUTE FUNCTION philotes_rule();",
        )
        .await
        .expect("rules on cdc_event_log");
    source
        .batch_execute("INSERT INTO t SELECT generate_series(1, 10)")
        .await
        .expect("insert");
    let ids = || async {
        column::<i32>(
            &buffer,
            "SELECT (after->>'id')::int FROM philotes.cdc_events WHERE pipeline = 'test/refusedrule' ORDER BY commit_lsn, seq",
        )
        .await
    };

    // Fail (the default): what comes before it is written and confirmed, then it is named.
    let started = Instant::now();
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 1, "{out}");
    assert!(started.elapsed() < Duration::from_secs(60), "no retry loop");
    for phrase in [
        "PoisonEvent",
        "INSERT of public.t",
        "the buffer refused it",
        "no_five",
    ] {
        assert!(out.contains(phrase), "no `{phrase}` in:\n{out}");
    }
    assert_eq!(ids().await, (1..=4).collect::<Vec<_>>());
    let (ckpt, confirmed) = checkpoint_and_confirmed(
        &buffer,
        &source,
        "test/refusedrule",
        "philotes_test_refusedrule",
    )
    .await;
    assert_eq!(ckpt, confirmed, "what is written is confirmed");

    // DeadLetter: both are set aside with the server's reason; the rest lands once.
    let dead = manifest_file(&text.replace("spec:\n", "spec:\n  poisonEvents: DeadLetter\n"));
    let started = Instant::now();
    let (code, out) = catch_up_cli(dead.path());
    assert_eq!(code, 0, "{out}");
    assert!(started.elapsed() < Duration::from_secs(60), "no retry loop");
    assert_eq!(ids().await, vec![1, 2, 3, 4, 6, 8, 9, 10]);
    let letters: Vec<String> = column(
        &buffer,
        "SELECT reason FROM philotes.cdc_dead_letters WHERE pipeline = 'test/refusedrule' ORDER BY commit_lsn, seq",
    )
    .await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letters[0].contains("no_five"), "{letters:?}");
    assert!(letters[1].contains("seven is reserved"), "{letters:?}");

    // A constraint on Philotes's own bookkeeping: no change is to blame, none is set aside;
    // the pipeline stops naming the constraint and what to do.
    buffer
        .batch_execute(
            "ALTER TABLE philotes.cdc_checkpoints ADD CONSTRAINT frozen
               CHECK (events_total <= 8) NOT VALID",
        )
        .await
        .expect("a constraint on cdc_checkpoints");
    source
        .batch_execute("INSERT INTO t VALUES (11)")
        .await
        .expect("insert");
    let started = Instant::now();
    let (code, out) = catch_up_cli(dead.path());
    assert_eq!(code, 1, "{out}");
    assert!(started.elapsed() < Duration::from_secs(60), "no retry loop");
    for phrase in ["BufferNotReady", "frozen", "drop it"] {
        assert!(out.contains(phrase), "no `{phrase}` in:\n{out}");
    }
    // A trigger there raising an error names no table: known by the statement it failed.
    buffer
        .batch_execute(
            "ALTER TABLE philotes.cdc_checkpoints DROP CONSTRAINT frozen;
             CREATE FUNCTION philotes_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'checkpoints are frozen'; END $$;
             CREATE TRIGGER frozen BEFORE UPDATE ON philotes.cdc_checkpoints
               FOR EACH ROW EXECUTE FUNCTION philotes_frozen();",
        )
        .await
        .expect("a trigger on cdc_checkpoints");
    let started = Instant::now();
    let (code, out) = catch_up_cli(dead.path());
    assert_eq!(code, 1, "{out}");
    assert!(started.elapsed() < Duration::from_secs(60), "no retry loop");
    for phrase in ["BufferNotReady", "checkpoints are frozen", "drop it"] {
        assert!(out.contains(phrase), "no `{phrase}` in:\n{out}");
    }
    assert_eq!(
        ids().await,
        vec![1, 2, 3, 4, 6, 8, 9, 10],
        "nothing more written"
    );
    let letters: i64 = buffer
        .query_one("SELECT count(*) FROM philotes.cdc_dead_letters", &[])
        .await
        .expect("count dead letters")
        .get(0);
    assert_eq!(letters, 2, "nothing set aside for it");
}

/// `spec.source.failoverSlot` (PostgreSQL 17+): the slot is created with `failover = true`, a
/// standby with `sync_replication_slots` keeps a copy, and after the standby is promoted and
/// the pipeline pointed at it, it continues exactly once (same system, new timeline). On
/// 14-16 the option is refused with the version needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_slot_survives_promoting_a_standby() {
    let mut primary = own_cluster(philotes::embedded::ClusterOptions::default());
    let src = fresh_db(&primary, "fo_src").await;
    let buf = fresh_db(shared(), "fo_buf").await;
    let db = connect(&src).await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let version = server_version(&db).await;
    let with_failover = |source: &str| {
        manifest("failover", source, &buf, &["t"], "flushInterval: 100ms")
            .replace("    tables: [", "    failoverSlot: true\n    tables: [")
    };
    let file = manifest_file(&with_failover(&src));
    if version < 170000 {
        let (code, out) = catch_up_cli(file.path());
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("spec.source.failoverSlot needs PostgreSQL 17 or newer"),
            "{out}"
        );
        return;
    }
    // The standby's physical slot.
    db.batch_execute("SELECT pg_create_physical_replication_slot('standby')")
        .await
        .unwrap();
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 0, "{out}");
    let failover: bool = db
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = 'philotes_test_failover'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failover);
    drop(db);
    let standby = philotes::embedded::Cluster::standby_of(
        &mut primary,
        &[
            "primary_slot_name = 'standby'".into(),
            "hot_standby_feedback = on".into(),
            "sync_replication_slots = on".into(),
        ],
    )
    .expect("a standby");
    let db = connect(&src).await;
    let insert = |from: i32, to: i32| {
        let db = &db;
        async move {
            db.batch_execute(&format!(
                "INSERT INTO t SELECT generate_series({from}, {to})"
            ))
            .await
            .unwrap();
        }
    };
    insert(1, 100).await;
    // The standby persists its copy of the slot once the slot has moved past where the
    // standby began: a running-transactions record for it to move to, then consume.
    db.batch_execute("SELECT pg_log_standby_snapshot()")
        .await
        .unwrap();
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 0, "{out}");
    // Written on the primary, not yet captured: the standby must carry them over.
    insert(101, 150).await;
    let target: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let standby_db = connect(&standby.uri("fo_src")).await;
    eventually(
        "the standby to replay everything and hold a synchronised slot",
        Duration::from_secs(90),
        || {
            let (s, target) = (&standby_db, &target);
            async move {
                let ok: bool = s
                    .query_one(
                        "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn
                            AND EXISTS (SELECT 1 FROM pg_replication_slots
                                        WHERE slot_name = 'philotes_test_failover' AND synced AND NOT temporary)",
                        &[target],
                    )
                    .await
                    .unwrap()
                    .get(0);
                ok.then_some(())
            }
        },
    )
    .await;
    drop(db);
    primary.stop_server("fast").unwrap();
    standby.promote().expect("promote");

    // The Secret now points at the new primary: same system, a new timeline.
    let moved = manifest_file(&with_failover(&standby.uri("fo_src")));
    let (code, out) = catch_up_cli(moved.path());
    assert_eq!(code, 0, "{out}");
    standby_db
        .batch_execute("INSERT INTO t SELECT generate_series(151, 200)")
        .await
        .unwrap();
    let (code, out) = catch_up_cli(moved.path());
    assert_eq!(code, 0, "{out}");
    let buffer = connect(&buf).await;
    let ids: Vec<i32> = column(
        &buffer,
        "SELECT (after->>'id')::int FROM philotes.cdc_events WHERE pipeline = 'test/failover' ORDER BY commit_lsn, seq",
    )
    .await;
    assert_eq!(ids, (1..=200).collect::<Vec<_>>(), "every row exactly once");
    let timeline: Vec<Option<i32>> = column(
        &buffer,
        "SELECT timeline FROM philotes.cdc_checkpoints WHERE pipeline = 'test/failover'",
    )
    .await;
    assert_eq!(timeline, [Some(2)], "the promoted standby's timeline");
    let report = philotes::verify::verify(&config(&with_failover(&standby.uri("fo_src"))))
        .await
        .unwrap();
    assert!(report.ok(), "{report}");
}

/// A hot standby as the source (PostgreSQL 16+): the slot is the standby's own, the
/// publication comes from the primary (a missing one is named with the statement to run
/// there), and the changes made on the primary arrive exactly once. On 14-15: refused with
/// the version needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_a_source() {
    let mut primary = own_cluster(philotes::embedded::ClusterOptions::default());
    let src = fresh_db(&primary, "sb_src").await;
    let buf = fresh_db(shared(), "sb_buf").await;
    let db = connect(&src).await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY);
         SELECT pg_create_physical_replication_slot('standby');",
    )
    .await
    .unwrap();
    drop(db);
    let standby = philotes::embedded::Cluster::standby_of(
        &mut primary,
        &[
            "primary_slot_name = 'standby'".into(),
            "hot_standby_feedback = on".into(),
        ],
    )
    .expect("a standby");
    let db = connect(&src).await;
    let version = server_version(&db).await;
    let on_standby = manifest(
        "fromstandby",
        &standby.uri("sb_src"),
        &buf,
        &["t"],
        "flushInterval: 100ms",
    )
    .replace(
        "    tables: [",
        "    publication: standby_pub\n    tables: [",
    );
    let file = manifest_file(&on_standby);
    if version < 160000 {
        let (code, out) = catch_up_cli(file.path());
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("logical decoding on a standby needs PostgreSQL 16 or newer"),
            "{out}"
        );
        return;
    }
    // No publication yet: a standby cannot create one; the message says what to run where.
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("is a standby (read-only)")
            && out.contains("CREATE PUBLICATION \"standby_pub\" FOR TABLE \"public\".\"t\""),
        "{out}"
    );
    db.batch_execute(
        "CREATE PUBLICATION standby_pub FOR TABLE t WITH (publish_via_partition_root = true)",
    )
    .await
    .unwrap();
    // A slot on a standby waits for the primary to log the running transactions.
    let nudge = {
        let src = src.clone();
        tokio::spawn(async move {
            let db = connect(&src).await;
            loop {
                let _ = db.batch_execute("SELECT pg_log_standby_snapshot()").await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let standby_db = connect(&standby.uri("sb_src")).await;
    eventually(
        "the publication on the standby",
        Duration::from_secs(30),
        || {
            let s = &standby_db;
            async move {
                let n: i64 = s
                    .query_one(
                        "SELECT count(*) FROM pg_publication WHERE pubname = 'standby_pub'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (n == 1).then_some(())
            }
        },
    )
    .await;
    // A snapshot writes its watermarks into the WAL, which a standby cannot: refused with
    // what to do; with spec.snapshot.mode Never the pending copy is dropped.
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("SnapshotFailed")
            && out.contains("is a standby, and a snapshot writes its watermarks into the WAL")
            && out.contains("spec.snapshot.mode: Never"),
        "{out}"
    );
    let file = manifest_file(&on_standby.replace(
        "flushInterval: 100ms",
        "flushInterval: 100ms\n  snapshot: {mode: Never}",
    ));
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 0, "{out}");
    db.batch_execute("INSERT INTO t SELECT generate_series(1, 100)")
        .await
        .unwrap();
    let target: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    eventually(
        "the standby to replay the writes",
        Duration::from_secs(30),
        || {
            let (s, target) = (&standby_db, &target);
            async move {
                let ok: bool = s
                    .query_one(
                        "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                        &[target],
                    )
                    .await
                    .unwrap()
                    .get(0);
                ok.then_some(())
            }
        },
    )
    .await;
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 0, "{out}");
    nudge.abort();
    let buffer = connect(&buf).await;
    let ids: Vec<i32> = column(
        &buffer,
        "SELECT (after->>'id')::int FROM philotes.cdc_events WHERE pipeline = 'test/fromstandby' ORDER BY commit_lsn, seq",
    )
    .await;
    assert_eq!(ids, (1..=100).collect::<Vec<_>>(), "every row exactly once");
    let slot_on_standby: i64 = standby_db
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'philotes_test_fromstandby'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slot_on_standby, 1);
    let report = philotes::verify::verify(&config(&on_standby))
        .await
        .unwrap();
    assert!(report.ok(), "{report}");
}

/// A standby that was behind is promoted and the pipeline pointed at it: its new timeline
/// branched off before the pipeline's checkpoint (the old primary's last transactions, in the
/// buffer, never reached it). That history is reported (`SourceChanged`), never merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_that_was_behind_is_refused() {
    let mut primary = own_cluster(philotes::embedded::ClusterOptions::default());
    let src = fresh_db(&primary, "behind_src").await;
    let buf = fresh_db(shared(), "behind_buf").await;
    connect(&src)
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let mut standby =
        philotes::embedded::Cluster::standby_of(&mut primary, &[]).expect("a standby");
    let file = manifest_file(&manifest(
        "behind",
        &src,
        &buf,
        &["t"],
        "flushInterval: 100ms",
    ));
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 0, "{out}");
    // The standby stops following; the primary goes on, and the pipeline captures it.
    standby.stop_server("fast").unwrap();
    connect(&src)
        .await
        .batch_execute("INSERT INTO t SELECT generate_series(1, 50)")
        .await
        .unwrap();
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 0, "{out}");
    primary.stop_server("immediate").unwrap();
    standby.start_server().unwrap();
    standby.promote().expect("promote");
    let moved = manifest_file(&manifest(
        "behind",
        &standby.uri("behind_src"),
        &buf,
        &["t"],
        "flushInterval: 100ms",
    ));
    let (code, out) = catch_up_cli(moved.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("SourceChanged"), "{out}");
    assert!(out.contains("a promoted replica that was behind"), "{out}");
    // Once the new primary has written past the checkpoint, its timeline's history says where
    // it branched off: still refused.
    connect(&standby.uri("behind_src"))
        .await
        .batch_execute("INSERT INTO t SELECT generate_series(1000, 3000)")
        .await
        .unwrap();
    let (code, out) = catch_up_cli(moved.path());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("SourceChanged") && out.contains("timeline"),
        "{out}"
    );
    // Nothing of the new timeline was written.
    let buffer = connect(&buf).await;
    let n: i64 = buffer
        .query_one(
            "SELECT count(*) FROM philotes.cdc_events WHERE pipeline = 'test/behind'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 50);
}

/// Shutdown fits in the pod's grace period (30 s by default) however many pipelines run:
/// they are stopped all at once, not one after another. Three pipelines whose buffer went
/// silent (each stop then waits its whole allowance, then aborts) stop in one allowance, not
/// three; and the abort loses nothing: a later run writes every change exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_stop_in_parallel_within_the_grace_period() {
    use philotes::controller::status::Observed;
    use philotes::controller::supervisor::{Supervisor, STOP_WAIT};

    let proxy = proxy::Proxy::start(shared().port).await;
    let supervisor = Supervisor::new(philotes::metrics::Metrics::new());
    let mut pipelines = Vec::new();
    for i in 0..3 {
        let name = format!("parstop{i}");
        let (src, buf, source) = databases_with(&name, "CREATE TABLE t (id int PRIMARY KEY)").await;
        let through_proxy = buf.replace(
            &format!("127.0.0.1:{}", shared().port),
            &format!("127.0.0.1:{}", proxy.port),
        );
        let cfg = config(&manifest(
            &name,
            &src,
            &through_proxy,
            &["t"],
            "flushInterval: 50ms",
        ));
        let key = format!("test/{name}");
        supervisor
            .ensure(&key, cfg.clone(), 1, i)
            .await
            .expect("started");
        pipelines.push((key, cfg, source, buf));
    }
    for (key, _, _, _) in &pipelines {
        eventually(
            &format!("{key} to stream"),
            Duration::from_secs(60),
            || async {
                match supervisor.observe(key).await {
                    Some(Observed::Task { progress, .. })
                        if progress.state == philotes::pipeline::State::Streaming
                            && progress.checkpoint_lsn > 0
                            && progress
                                .snapshots
                                .iter()
                                .all(|t| t.phase == philotes::pipeline::snapshot::Phase::Done) =>
                    {
                        Some(())
                    }
                    _ => None,
                }
            },
        )
        .await;
    }
    // The buffer goes silent, then every source gets changes the loops cannot write.
    proxy.black_hole();
    for (_, _, source, _) in &pipelines {
        source
            .batch_execute("INSERT INTO t SELECT generate_series(1, 100)")
            .await
            .expect("insert");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    supervisor.stop_all().await;
    let took = started.elapsed();
    assert!(
        took >= STOP_WAIT && took < STOP_WAIT * 2,
        "three stops that each wait {STOP_WAIT:?} took {took:?}"
    );
    assert!(supervisor.running().await.is_empty());
    for (key, cfg, _, buf) in &pipelines {
        // The aborted writers' buffer sessions sit in their transactions (holding the
        // pipeline's lock) until the buffer server notices their peer is gone, which its TCP
        // keepalive would do in minutes: ended here at once.
        let buffer = connect(buf).await;
        buffer
            .batch_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .await
            .expect("end the silent sessions");
        // New connections pass the proxy: the next run writes what the aborted one did not.
        assert_eq!(catch_up(cfg).await, philotes::pipeline::Outcome::CaughtUp);
        let n: Vec<i64> = column(
            &connect(buf).await,
            &format!("SELECT count(*) FROM philotes.cdc_events WHERE pipeline = '{key}'"),
        )
        .await;
        assert_eq!(n[0], 100, "{key}: every change once");
        let report = philotes::verify::verify(cfg).await.expect("verify");
        assert!(report.ok(), "{key}: {report}");
    }
}
