//! Helpers shared by the integration tests: a real PostgreSQL server per test binary (a
//! database per test), pipelines run in-process or as the `philotes` binary, and bounded
//! waits that say what they waited for.
#![allow(dead_code)]

pub mod apiserver;
pub mod hold;
pub mod proxy;

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use philotes::embedded::{Cluster, ClusterOptions};
use philotes::manifest::Manifest;
use philotes::pipeline::{self, Outcome, PipelineConfig, Progress, RunOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

static SHARED: OnceLock<Cluster> = OnceLock::new();

static BINDIR: OnceLock<Option<PathBuf>> = OnceLock::new();

/// The server binaries the tests run: with `PHILOTES_PG_VERSION` set (14-18), that major
/// version, fetched and cached by `scripts/pg-server.sh`; else the default search of
/// [`philotes::embedded::find_bindir`] (`PHILOTES_PG_BINDIR`, `pg_config`, `PATH`, Debian's).
pub fn pg_bindir() -> Option<PathBuf> {
    BINDIR
        .get_or_init(|| {
            let version = std::env::var("PHILOTES_PG_VERSION").ok()?;
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-server.sh");
            let out = Command::new("bash")
                .arg(script)
                .arg(&version)
                .stderr(Stdio::inherit())
                .output()
                .unwrap_or_else(|e| panic!("run {script} {version}: {e}"));
            assert!(
                out.status.success(),
                "{script} {version} failed: PostgreSQL {version} binaries are not available"
            );
            Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
        .clone()
}

/// The test binary's shared server, started on first use and stopped after the process exits.
pub fn shared() -> &'static Cluster {
    SHARED.get_or_init(|| {
        let c = own_cluster(ClusterOptions::default());
        c.stop_when_process_exits()
            .expect("watch the shared PostgreSQL");
        c
    })
}

/// A server of the test's own (for tests that stop or reconfigure it).
pub fn own_cluster(mut opts: ClusterOptions) -> Cluster {
    if opts.bindir.is_none() {
        opts.bindir = pg_bindir();
    }
    Cluster::start(opts).expect("start a PostgreSQL server for this test")
}

pub async fn connect(uri: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(uri, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    tokio::spawn(conn);
    client
}

/// Creates (or recreates) database `name` on `cluster` and returns its URI.
pub async fn fresh_db(cluster: &Cluster, name: &str) -> String {
    let admin = connect(&cluster.uri("postgres")).await;
    // A slot left by an earlier run of the same test would pin the old database.
    admin
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
            &[&name],
        )
        .await
        .expect("drop old slots");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .expect("drop database");
    admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .expect("create database");
    cluster.uri(name)
}

/// A manifest for pipeline `test/<name>` with its two secrets.
pub fn manifest(name: &str, source: &str, buffer: &str, tables: &[&str], extra: &str) -> String {
    let tables = tables
        .iter()
        .map(|t| format!("'{}'", t.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(", ");
    let extra = extra
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect::<String>();
    format!(
        "apiVersion: philotes.io/v1alpha1
kind: CdcPipeline
metadata: {{name: {name}, namespace: test}}
spec:
  source:
    connectionSecretRef: {{name: src}}
    tables: [{tables}]
  buffer:
    connectionSecretRef: {{name: buf}}
{extra}---
apiVersion: v1
kind: Secret
metadata: {{name: src, namespace: test}}
stringData: {{uri: '{source}'}}
---
apiVersion: v1
kind: Secret
metadata: {{name: buf, namespace: test}}
stringData: {{uri: '{buffer}'}}
"
    )
}

pub fn config(manifest: &str) -> PipelineConfig {
    let m = Manifest::parse(manifest, "test manifest").expect("parse manifest");
    philotes::standalone::config_of(&m, None, "test manifest").expect("resolve manifest")
}

/// A pipeline running in this process.
pub struct Running {
    pub shutdown: watch::Sender<bool>,
    pub progress: watch::Receiver<Progress>,
    pub handle: JoinHandle<pipeline::Result<Outcome>>,
}

/// Logs what the code under test says, at `PHILOTES_LOG` (default: warnings), into the test's
/// captured output: a failing test shows the pipeline's own account.
pub fn log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PHILOTES_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub fn start(cfg: PipelineConfig, opts: RunOptions) -> Running {
    log();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (progress_tx, progress) = watch::channel(Progress::default());
    let handle = tokio::spawn(pipeline::run(cfg, opts, shutdown_rx, progress_tx));
    Running {
        shutdown,
        progress,
        handle,
    }
}

impl Running {
    /// Waits until `done(progress)`; panics naming `what` after `timeout`, or if the
    /// pipeline fails first.
    pub async fn wait(&mut self, what: &str, timeout: Duration, done: impl Fn(&Progress) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let p = self.progress.borrow_and_update();
                if done(&p) {
                    return;
                }
                if p.state == pipeline::State::Failed {
                    panic!(
                        "pipeline failed while waiting for {what}: {:?}",
                        p.last_error
                    );
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.progress.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("pipeline ended while waiting for {what}"),
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for {what}; progress: {:?}",
                    *self.progress.borrow()
                ),
            }
        }
    }

    /// Waits until the pipeline streams and has copied what its tables held at the start
    /// (README: Snapshots), so what a test writes next arrives as changes only.
    pub async fn streaming(&mut self) {
        self.wait("the pipeline to stream", Duration::from_secs(60), |p| {
            p.state == pipeline::State::Streaming
                && p.snapshots.iter().all(|t| {
                    !matches!(
                        t.phase,
                        pipeline::snapshot::Phase::Pending | pipeline::snapshot::Phase::Copying
                    )
                })
        })
        .await
    }

    /// Waits until the checkpoint covers `lsn`.
    pub async fn checkpointed(&mut self, lsn: u64) {
        self.wait(
            &format!("checkpoint to reach {}", pipeline::lsn::format(lsn)),
            Duration::from_secs(60),
            |p| p.checkpoint_lsn >= lsn,
        )
        .await
    }

    pub async fn stop(self) -> pipeline::Result<Outcome> {
        let _ = self.shutdown.send(true);
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("pipeline stops within 30s")
            .expect("pipeline task")
    }
}

/// Runs the pipeline in-process until caught up with the source as of now.
pub async fn catch_up(cfg: &PipelineConfig) -> Outcome {
    let r = start(
        cfg.clone(),
        RunOptions {
            until_caught_up: true,
            retry_setup: false,
            ..RunOptions::default()
        },
    );
    tokio::time::timeout(Duration::from_secs(120), r.handle)
        .await
        .expect("catch up within 120s")
        .expect("pipeline task")
        .unwrap_or_else(|e| panic!("catch up failed: {e}"))
}

/// The source's current WAL position.
pub async fn wal_lsn(client: &Client) -> u64 {
    let s: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("pg_current_wal_lsn")
        .get(0);
    pipeline::lsn::parse(&s).expect("lsn")
}

/// Waits until no session holds replication slot `slot` (`active` false), at most `timeout`.
pub async fn slot_released(source: &Client, slot: &str, timeout: Duration) {
    eventually(&format!("slot {slot} to be released"), timeout, || async {
        let active: bool = source
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .ok()?
            .get(0);
        (!active).then_some(())
    })
    .await
}

/// Waits until replication slot `slot`'s `confirmed_flush_lsn` reaches `lsn`, at most 30 s.
pub async fn slot_confirmed(source: &Client, slot: &str, lsn: u64) {
    eventually(
        &format!("slot {slot} to confirm {}", philotes::pipeline::lsn::format(lsn)),
        Duration::from_secs(30),
        || async {
            let s: String = source
                .query_one(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .ok()?
                .get(0);
            (philotes::pipeline::lsn::parse(&s)? >= lsn).then_some(())
        },
    )
    .await
}

/// Polls `check` until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One row of `cdc_events`, as a consumer reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub commit_lsn: String,
    pub seq: i32,
    pub xid: i64,
    pub schema: String,
    pub table: String,
    pub operation: String,
    pub key_columns: Vec<String>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

/// `(name, type)` of every column of `table` (a name as SQL would take it), in order.
pub async fn table_columns(client: &Client, table: &str) -> Vec<(String, String)> {
    client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&table],
        )
        .await
        .unwrap_or_else(|e| panic!("columns of {table}: {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The first column of every row `sql` returns.
pub async fn column<T: tokio_postgres::types::FromSqlOwned>(client: &Client, sql: &str) -> Vec<T> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every event of `pipeline` in `schema`, in commit order. (The order names the table's
/// column: a bare `commit_lsn` would mean the selected `commit_lsn::text`, which sorts
/// `0/10000000` before `0/FFFFFFF`.)
pub async fn events(buffer: &Client, schema: &str, pipeline: &str) -> Vec<EventRow> {
    buffer
        .query(
            &format!(
                "SELECT commit_lsn::text, seq, xid, schema_name, table_name, operation, key_columns, before, after
                 FROM \"{schema}\".cdc_events WHERE pipeline = $1 ORDER BY cdc_events.commit_lsn, seq"
            ),
            &[&pipeline],
        )
        .await
        .expect("read cdc_events")
        .iter()
        .map(|r| EventRow {
            commit_lsn: r.get(0),
            seq: r.get(1),
            xid: r.get(2),
            schema: r.get(3),
            table: r.get(4),
            operation: r.get(5),
            key_columns: r.get(6),
            before: r.get(7),
            after: r.get(8),
        })
        .collect()
}

/// Path of the `philotes` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_philotes"))
}

/// Writes `manifest` to a temporary file that lives as long as the returned guard.
pub fn manifest_file(manifest: &str) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp manifest");
    std::fs::write(f.path(), manifest).expect("write manifest");
    f
}

/// A `philotes` child process that is killed when dropped, so a failing test does not leave
/// it running.
pub struct Proc(pub Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `philotes run -f <file> <args>` with its output appended to `log`.
pub fn spawn_run(file: &std::path::Path, args: &[&str], log: &std::path::Path) -> Proc {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let err = out.try_clone().expect("log file");
    Command::new(bin())
        .arg("run")
        .arg("-f")
        .arg(file)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map(Proc)
        .expect("spawn philotes")
}

/// Runs `philotes <args>` to completion: (exit code, stdout + stderr). Bounded: a run that
/// has not exited after 120 s is killed and the test fails with its output.
pub fn run_cli(args: &[&str]) -> (i32, String) {
    let out = tempfile::NamedTempFile::new().expect("output file");
    // One file description for both, so they share the offset and interleave.
    let stdout = out.reopen().expect("output file");
    let stderr = stdout.try_clone().expect("output file");
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map(Proc)
        .expect("run philotes");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for philotes") {
            break status;
        }
        if Instant::now() > deadline {
            kill9(&mut child);
            panic!(
                "philotes {args:?} still running after 120s; output:\n{}",
                std::fs::read_to_string(out.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = String::from_utf8_lossy(&std::fs::read(out.path()).unwrap_or_default()).into_owned();
    // Output to a file, not a terminal: no colour codes in the logs.
    assert!(
        !text.contains("\u{1b}["),
        "ANSI escape codes in the output of philotes {args:?}:\n{text}"
    );
    (status.code().unwrap_or(-1), text)
}

/// Peak resident memory of a running process, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

pub fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

/// A small deterministic random generator (xorshift), seeded per test and printed, so a
/// failing run can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Rng {
        let seed = std::env::var("PHILOTES_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("random seed {seed} (set PHILOTES_TEST_SEED to replay)");
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What a workload did, per operation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
}

/// A mixed OLTP-like workload on `w(id bigint primary key, n int, v text)`: small
/// transactions of inserts, updates and deletes. Every committed statement is counted;
/// a transaction that fails (source restarting) is rolled back and not counted.
pub struct Workload {
    pub counts: Counts,
    live: Vec<i64>,
    next_id: i64,
    rng: Rng,
}

pub const WORKLOAD_TABLE: &str = "CREATE TABLE w (id bigint PRIMARY KEY, n int NOT NULL, v text)";

impl Workload {
    pub fn new() -> Workload {
        Workload {
            counts: Counts::default(),
            live: Vec::new(),
            next_id: 1,
            rng: Rng::seeded(),
        }
    }

    /// Runs one transaction; returns false if it failed (nothing counted).
    pub async fn step(&mut self, client: &Client) -> bool {
        let mut sql = String::from("BEGIN;");
        let mut c = Counts::default();
        let mut live = self.live.clone();
        let mut next_id = self.next_id;
        for _ in 0..1 + self.rng.below(4) {
            let roll = self.rng.below(10);
            if roll < 5 || live.is_empty() {
                sql.push_str(&format!(
                    "INSERT INTO w VALUES ({next_id}, 0, 'row {next_id} ' || repeat('x', {}));",
                    self.rng.below(200)
                ));
                live.push(next_id);
                next_id += 1;
                c.inserts += 1;
            } else if roll < 8 {
                let id = live[self.rng.below(live.len() as u64) as usize];
                sql.push_str(&format!(
                    "UPDATE w SET n = n + 1, v = v || '!' WHERE id = {id};"
                ));
                c.updates += 1;
            } else {
                let i = self.rng.below(live.len() as u64) as usize;
                let id = live.swap_remove(i);
                sql.push_str(&format!("DELETE FROM w WHERE id = {id};"));
                c.deletes += 1;
            }
        }
        sql.push_str("COMMIT;");
        match client.batch_execute(&sql).await {
            Ok(()) => {
                self.live = live;
                self.next_id = next_id;
                self.counts.inserts += c.inserts;
                self.counts.updates += c.updates;
                self.counts.deletes += c.deletes;
                true
            }
            Err(_) => {
                let _ = client.batch_execute("ROLLBACK").await;
                false
            }
        }
    }
}

/// Replays the pipeline's events for table `w` in `(commit_lsn, seq)` order and checks the
/// result equals the source table row for row, that no insert or delete is duplicated or
/// missing, and that the event counts equal what the workload did.
pub async fn verify_workload(source: &Client, buffer: &Client, pipeline: &str, expected: Counts) {
    use std::collections::BTreeMap;
    let ev = events(buffer, "philotes", pipeline).await;
    // Shown only when the test fails: where the buffer's events start and end, and the
    // checkpoint, to tell a lost stretch from a reordering.
    let ckpt: Vec<String> = column(
        buffer,
        &format!(
            "SELECT lsn::text || ' last ' || coalesce(last_commit_lsn::text, '-') || '/' || coalesce(last_seq::text, '-') \
             || ' slot start ' || coalesce(slot_start_lsn::text, '-') FROM philotes.cdc_checkpoints WHERE pipeline = '{pipeline}'"
        ),
    )
    .await;
    eprintln!(
        "{} events from {:?} to {:?}; checkpoint {:?}",
        ev.len(),
        ev.first().map(|e| &e.commit_lsn),
        ev.last().map(|e| &e.commit_lsn),
        ckpt
    );
    let mut rows: BTreeMap<i64, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
    let mut got = Counts::default();
    for (i, e) in ev.iter().enumerate() {
        let key = |img: &Option<serde_json::Value>| {
            img.as_ref()
                .and_then(|v| v["id"].as_i64())
                .unwrap_or_else(|| panic!("event {i} has no id: {e:?}"))
        };
        match e.operation.as_str() {
            "INSERT" => {
                got.inserts += 1;
                let after = e.after.clone().unwrap();
                let old = rows.insert(key(&e.after), after.as_object().unwrap().clone());
                assert!(
                    old.is_none(),
                    "event {i}: duplicate insert of {}",
                    key(&e.after)
                );
            }
            "UPDATE" => {
                got.updates += 1;
                let old_key = if e.before.is_some() {
                    key(&e.before)
                } else {
                    key(&e.after)
                };
                let mut row = rows
                    .remove(&old_key)
                    .unwrap_or_else(|| panic!("event {i}: update of missing row {old_key}"));
                for (k, v) in e.after.as_ref().unwrap().as_object().unwrap() {
                    row.insert(k.clone(), v.clone());
                }
                rows.insert(key(&e.after), row);
            }
            "DELETE" => {
                got.deletes += 1;
                let k = key(&e.before);
                assert!(
                    rows.remove(&k).is_some(),
                    "event {i}: delete of missing row {k}"
                );
            }
            "TRUNCATE" => rows.clear(),
            // The copy of a table that started empty may catch rows as they arrive: an
            // upsert of the row as it was read, after the events it reflects.
            "SNAPSHOT" => {
                let after = e.after.clone().unwrap();
                rows.insert(key(&e.after), after.as_object().unwrap().clone());
            }
            other => panic!("unknown operation {other}"),
        }
    }
    let source_rows: BTreeMap<i64, serde_json::Map<String, serde_json::Value>> = source
        .query("SELECT id, to_jsonb(w) FROM w", &[])
        .await
        .expect("read source")
        .iter()
        .map(|r| {
            let v: serde_json::Value = r.get(1);
            (r.get(0), v.as_object().unwrap().clone())
        })
        .collect();
    assert_eq!(got, expected, "event counts per operation");
    assert_eq!(rows.len(), source_rows.len(), "row count after replay");
    for (k, v) in &source_rows {
        assert_eq!(rows.get(k), Some(v), "row {k} after replay");
    }
}

/// [`databases`], with `ddl` run on the source; also returns a connection to the source.
pub async fn databases_with(name: &str, ddl: &str) -> (String, String, Client) {
    let (src, buf) = databases(name).await;
    let source = connect(&src).await;
    source
        .batch_execute(ddl)
        .await
        .unwrap_or_else(|e| panic!("{ddl}: {e}"));
    (src, buf, source)
}

/// Fresh source and buffer databases `<name>_src` and `<name>_buf` on the shared server.
pub async fn databases(name: &str) -> (String, String) {
    let cluster = shared();
    (
        fresh_db(cluster, &format!("{name}_src")).await,
        fresh_db(cluster, &format!("{name}_buf")).await,
    )
}

/// `philotes run -f <file> --until-caught-up`: (exit code, output).
pub fn catch_up_cli(file: &std::path::Path) -> (i32, String) {
    run_cli(&[
        "run",
        "-f",
        file.to_str().expect("utf-8 path"),
        "--until-caught-up",
    ])
}

/// `server_version_num` of the server behind `client` (e.g. 170004).
pub async fn server_version(client: &Client) -> i32 {
    client
        .query_one("SHOW server_version_num", &[])
        .await
        .expect("SHOW server_version_num")
        .get::<_, String>(0)
        .parse()
        .expect("a number")
}

/// Runs `cfg` in-process to its catch-up and returns the error it must stop with.
pub async fn start_fails(cfg: PipelineConfig, what: &str) -> pipeline::Error {
    let r = start(
        cfg,
        RunOptions {
            until_caught_up: true,
            ..RunOptions::default()
        },
    );
    tokio::time::timeout(Duration::from_secs(120), r.handle)
        .await
        .unwrap_or_else(|_| panic!("{what}: still running after 120s"))
        .expect("pipeline task")
        .expect_err(what)
}

/// Runs `philotes run -f <file> --until-caught-up` to its end, sampling its peak resident
/// memory (peak KiB). Panics with its log when it fails or runs over 300 s.
/// Runs `philotes run -f file --until-caught-up` to its end: its peak RSS and its log.
pub async fn catch_up_measuring_rss(file: &std::path::Path) -> (u64, String) {
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut child = spawn_run(file, &["--until-caught-up"], log.path());
    let pid = child.id();
    let mut peak_kib = 0;
    let started = Instant::now();
    let status = loop {
        if let Some(kib) = peak_rss_kib(pid) {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait().expect("wait for philotes") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no catch-up after 300s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
    (
        peak_kib,
        std::fs::read_to_string(log.path()).unwrap_or_default(),
    )
}

/// Makes the buffer busy: a row trigger on `cdc_event_log` that sleeps `seconds` per event
/// (the buffer's tables must exist: the pipeline ran once).
pub async fn slow_down_buffer(buffer: &Client, seconds: &str) {
    buffer
        .batch_execute(&format!(
            "CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS
               $$BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END$$;
             CREATE TRIGGER slow BEFORE INSERT ON philotes.cdc_event_log
               FOR EACH ROW EXECUTE FUNCTION public.slow();"
        ))
        .await
        .expect("slow down the buffer");
}
