//! Bad input gets one clear message naming the object and what to do, a non-zero exit, no
//! panic, no password in the output — and nothing the user has is touched.

mod common;

use common::*;
use philotes::embedded::ClusterOptions;

/// Runs `philotes run -f` on `manifest` and returns (exit code, output), checking the output
/// is a clean message: no panic, no Rust debug dump, no password.
fn run_bad(manifest: &str, password: &str) -> (i32, String) {
    let file = manifest_file(manifest);
    let (code, out) = catch_up_cli(file.path());
    assert_ne!(code, 0, "expected failure, got success: {out}");
    assert!(!out.contains("panicked"), "panic: {out}");
    assert!(
        !out.contains("Error {") && !out.contains("kind:"),
        "debug dump: {out}"
    );
    assert!(!out.contains(password), "password leaked: {out}");
    (code, out)
}

fn expect(out: &str, phrases: &[&str]) {
    for p in phrases {
        assert!(out.contains(p), "expected {p:?} in:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_and_secret_errors_name_the_field() {
    let c = shared();
    let uri = c.uri("postgres");
    let pw = c.password();
    let base = manifest("bad", &uri, &uri, &["public.t"], "");

    let (code, out) = run_bad(&base.replace("name: src}", "name: nope}"), pw);
    assert_eq!(code, 2);
    expect(
        &out,
        &[
            "spec.source.connectionSecretRef",
            "secret test/nope not found",
        ],
    );

    let (_, out) = run_bad(&base.replace("{name: buf}", "{name: buf, key: dsn}"), pw);
    expect(&out, &["secret test/buf has no key `dsn`", "uri"]);

    let (_, out) = run_bad(&base.replace("  buffer:", "  batchSize: 0\n  buffer:"), pw);
    expect(
        &out,
        &[
            "CdcPipeline test/bad",
            "spec.batchSize must be at least 1 (got 0)",
        ],
    );

    let (_, out) = run_bad(
        &base.replace("  buffer:", "  flushInterval: 5 seconds\n  buffer:"),
        pw,
    );
    expect(&out, &["spec.flushInterval", "is not a duration", "1m30s"]);

    let (_, out) = run_bad(
        &base.replace("  buffer:", "  statusInterval: 100000h\n  buffer:"),
        pw,
    );
    expect(&out, &["spec.statusInterval must be between 10ms and 24h"]);

    let (_, out) = run_bad(
        &base.replace("  buffer:", "  bufferSize: 99999999999\n  buffer:"),
        pw,
    );
    expect(&out, &["spec.bufferSize"]);

    let (_, out) = run_bad(&base.replace("  buffer:", "  batchSize: -1\n  buffer:"), pw);
    expect(&out, &["spec.batchSize", "-1"]);

    let (_, out) = run_bad(&base.replace("tables:", "tabels:"), pw);
    expect(&out, &["unknown field `tabels`"]);

    let (_, out) = run_bad(&base.replace(&uri, &format!("mysql://x:{pw}@h/db")), pw);
    expect(
        &out,
        &[
            "secret test/src key `uri` is not a usable connection URI",
            "postgres://",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_say_which_database_and_why() {
    let c = shared();
    let good = fresh_db(c, "bad_conn").await;
    let pw = c.password();
    let closed =
        format!("postgres://postgres:{pw}@127.0.0.1:1/x?sslmode=disable&connect_timeout=2");
    let (_, out) = run_bad(&manifest("conn", &closed, &good, &["t"], ""), pw);
    expect(
        &out,
        &["cannot connect to the source database at 127.0.0.1:1/x"],
    );
    let (_, out) = run_bad(&manifest("conn", &good, &closed, &["t"], ""), pw);
    expect(
        &out,
        &["cannot connect to the buffer database at 127.0.0.1:1/x"],
    );

    let wrong = good.replace(pw, "not-the-password");
    let (_, out) = run_bad(&manifest("conn", &wrong, &good, &["t"], ""), pw);
    expect(&out, &["source database", "refused the login", "password"]);
    assert!(!out.contains("not-the-password"));

    let missing_db = c.uri("no_such_db");
    let (_, out) = run_bad(&manifest("conn", &good, &missing_db, &["t"], ""), pw);
    expect(&out, &["buffer database", "no_such_db", "does not exist"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_setup_errors_name_the_object_and_leave_it_alone() {
    let (src, buf) = databases("bad").await;
    let pw = shared().password();
    let db = connect(&src).await;
    db.batch_execute(
        "CREATE TABLE ok (id int PRIMARY KEY);
         CREATE TABLE nokey (v int);
         CREATE TABLE other (id int PRIMARY KEY);
         CREATE PUBLICATION taken FOR TABLE other;",
    )
    .await
    .unwrap();
    db.batch_execute("SELECT pg_create_logical_replication_slot('wrong_plugin', 'test_decoding')")
        .await
        .unwrap();

    let (_, out) = run_bad(
        &manifest("s1", &src, &buf, &["ok", "public.missing"], ""),
        pw,
    );
    expect(
        &out,
        &["table public.missing listed in spec.source.tables does not exist"],
    );

    let (_, out) = run_bad(&manifest("s2", &src, &buf, &["nokey"], ""), pw);
    expect(
        &out,
        &[
            "table public.nokey has no replica identity",
            "REPLICA IDENTITY FULL",
        ],
    );

    let (_, out) = run_bad(
        &manifest("s3", &src, &buf, &["ok"], "")
            .replace("tables:", "slot: wrong_plugin\n    tables:"),
        pw,
    );
    expect(
        &out,
        &[
            "replication slot wrong_plugin",
            "plugin test_decoding",
            "pgoutput",
        ],
    );

    let (_, out) = run_bad(
        &manifest("s4", &src, &buf, &["ok"], "")
            .replace("tables:", "publication: taken\n    tables:"),
        pw,
    );
    expect(
        &out,
        &[
            "publication taken already exists",
            "publishes [public.other]",
            "[public.ok]",
        ],
    );

    // Nothing the user had was changed or dropped.
    let row = db
        .query_one(
            "SELECT (SELECT plugin FROM pg_replication_slots WHERE slot_name = 'wrong_plugin'),
                    (SELECT string_agg(tablename, ',') FROM pg_publication_tables WHERE pubname = 'taken')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "test_decoding");
    assert_eq!(row.get::<_, String>(1), "other");

    // A buffer schema holding someone else's tables is refused, and left as it was.
    let b = connect(&buf).await;
    b.batch_execute("CREATE SCHEMA theirs; CREATE TABLE theirs.precious (x int); INSERT INTO theirs.precious VALUES (1)")
        .await
        .unwrap();
    let (_, out) = run_bad(
        &manifest("s5", &src, &buf, &["ok"], "")
            .replace("{name: buf}", "{name: buf}\n    schema: theirs"),
        pw,
    );
    expect(
        &out,
        &[
            "schema theirs",
            "Philotes did not create",
            "spec.buffer.schema",
        ],
    );
    let n: i64 = b
        .query_one("SELECT count(*) FROM theirs.precious", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_refused_with_the_fix() {
    let c = own_cluster(ClusterOptions {
        wal_level: Some("replica".into()),
        ..ClusterOptions::default()
    });
    let src = fresh_db(&c, "walrep").await;
    connect(&src)
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let (_, out) = run_bad(&manifest("wal", &src, &src, &["t"], ""), c.password());
    expect(
        &out,
        &["wal_level=replica", "wal_level = logical", "restart"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_pipeline_waits_and_says_why() {
    let (src, buf) = databases("twice").await;
    connect(&src)
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let file = manifest_file(&manifest(
        "twice",
        &src,
        &buf,
        &["t"],
        "flushInterval: 100ms",
    ));
    let log1 = tempfile::NamedTempFile::new().unwrap();
    let log2 = tempfile::NamedTempFile::new().unwrap();
    let mut first = spawn_run(file.path(), &[], log1.path());
    eventually(
        "the first process to stream",
        std::time::Duration::from_secs(60),
        || {
            let p = log1.path().to_path_buf();
            async move {
                std::fs::read_to_string(p)
                    .ok()?
                    .contains("streaming")
                    .then_some(())
            }
        },
    )
    .await;
    let mut second = spawn_run(file.path(), &[], log2.path());
    let said = eventually(
        "the second process to explain",
        std::time::Duration::from_secs(30),
        || {
            let p = log2.path().to_path_buf();
            async move {
                let text = std::fs::read_to_string(p).ok()?;
                text.contains("already running").then_some(text)
            }
        },
    )
    .await;
    assert!(!said.contains("streaming"), "{said}");
    // The waiting process takes over when the first dies, and nothing is lost or doubled.
    let source = connect(&src).await;
    source
        .batch_execute("INSERT INTO t SELECT generate_series(1, 100)")
        .await
        .unwrap();
    kill9(&mut first);
    source
        .batch_execute("INSERT INTO t SELECT generate_series(101, 200)")
        .await
        .unwrap();
    eventually(
        "the second process to stream",
        std::time::Duration::from_secs(60),
        || {
            let p = log2.path().to_path_buf();
            async move {
                std::fs::read_to_string(p)
                    .ok()?
                    .contains("streaming")
                    .then_some(())
            }
        },
    )
    .await;
    kill9(&mut second);
    let (code, out) = catch_up_cli(file.path());
    assert_eq!(code, 0, "{out}");
    let cfg = config(&std::fs::read_to_string(file.path()).unwrap());
    let report = philotes::verify::verify(&cfg).await.unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.tables[0].inserts, 200);
}
