//! Helpers shared by the integration tests: a real PostgreSQL server per test binary (a
//! database per test), pipelines run in-process or as the `philotes` binary, and bounded
//! waits that say what they waited for.
#![allow(dead_code)]

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

/// The test binary's shared server, started on first use and stopped after the process exits.
pub fn shared() -> &'static Cluster {
    SHARED.get_or_init(|| {
        let c = Cluster::start(ClusterOptions::default()).expect("start the shared PostgreSQL");
        c.stop_when_process_exits()
            .expect("watch the shared PostgreSQL");
        c
    })
}

/// A server of the test's own (for tests that stop or reconfigure it).
pub fn own_cluster(opts: ClusterOptions) -> Cluster {
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

pub fn start(cfg: PipelineConfig, opts: RunOptions) -> Running {
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
                    panic!("pipeline failed while waiting for {what}: {:?}", p.last_error);
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

    pub async fn streaming(&mut self) {
        self.wait("the pipeline to stream", Duration::from_secs(60), |p| {
            p.state == pipeline::State::Streaming
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

/// Every event of `pipeline` in `schema`, in commit order.
pub async fn events(buffer: &Client, schema: &str, pipeline: &str) -> Vec<EventRow> {
    buffer
        .query(
            &format!(
                "SELECT commit_lsn::text, seq, xid, schema_name, table_name, operation, key_columns, before, after
                 FROM \"{schema}\".cdc_events WHERE pipeline = $1 ORDER BY commit_lsn, seq"
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

/// Starts `philotes run -f <file> <args>` with its output captured to files in `dir`.
pub fn spawn_run(file: &std::path::Path, args: &[&str], log: &std::path::Path) -> Child {
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
        .expect("spawn philotes")
}

/// Runs `philotes <args>` to completion: (exit code, stdout + stderr).
pub fn run_cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run philotes");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
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
