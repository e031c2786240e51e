//! The operator's replicas sharing the pipelines: `philotes controller` processes against a
//! real kube-apiserver, as the deploy/ ServiceAccount, each through a TCP proxy that can cut it
//! off, with 30 pipelines on a real PostgreSQL.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::apiserver;
use common::proxy::Proxy;
use common::*;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use philotes::crd::CdcPipeline;
use philotes::embedded::ClusterOptions;
use serde_json::json;

const NS: &str = "fleet";
const PIPELINES: usize = 30;

/// One `philotes controller` process, talking to the API server through its own proxy.
struct Replica {
    child: Child,
    proxy: Proxy,
    log: PathBuf,
}

impl Replica {
    async fn start(dir: &Path, api_port: u16, name: &str) -> Replica {
        let proxy = Proxy::start(api_port).await;
        let kubeconfig = dir.join(format!("{name}.kubeconfig"));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:{}
    insecure-skip-tls-verify: true
users:
- name: operator
  user:
    token: operator-token
contexts:
- name: test
  context:
    cluster: test
    user: operator
current-context: test
",
                proxy.port
            ),
        )
        .unwrap();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(bin())
            .args([
                "controller",
                "--namespace",
                NS,
                "--metrics-addr",
                &format!("127.0.0.1:{metrics}"),
                "--lease-namespace",
                "philotes-system",
                "--lease-name",
                "fleet",
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", name)
            .env(
                "PHILOTES_LOG",
                "info,tokio_postgres=warn,pgwire_replication=warn",
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn philotes controller");
        Replica { child, proxy, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most `within`) for the process to exit; its exit code.
    async fn exited(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn table(i: usize) -> String {
    format!("t{i:02}")
}

fn name(i: usize) -> String {
    format!("p{i:02}")
}

/// Waits until every pipeline is Running under one of `live`, with `rows` events, the owners
/// split within one of even; returns pipeline → owner. Fails with the replicas' logs.
async fn settled(
    pipelines: &Api<CdcPipeline>,
    live: &[&str],
    rows: i64,
    replicas: &BTreeMap<&str, Replica>,
) -> BTreeMap<String, String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(120) {
        let list = pipelines.list(&ListParams::default()).await.unwrap();
        let mut owners = BTreeMap::new();
        let mut waiting = Vec::new();
        for p in &list.items {
            let name = p.metadata.name.clone().unwrap_or_default();
            let s = p.status.clone().unwrap_or_default();
            match (&s.owner, s.phase.as_deref(), s.events_total) {
                (Some(o), Some("Running"), Some(n)) if live.contains(&o.as_str()) && n == rows => {
                    owners.insert(name, o.clone());
                }
                _ => waiting.push(format!(
                    "{name}: owner {:?} phase {:?} events {:?}",
                    s.owner, s.phase, s.events_total
                )),
            }
        }
        if waiting.is_empty() && owners.len() == PIPELINES {
            let loads = loads(&owners);
            if loads.len() == live.len() && loads[loads.len() - 1] - loads[0] <= 1 {
                return owners;
            }
            waiting.push(format!("split {loads:?} over {live:?}"));
        }
        last = waiting.join("\n");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (name, r) in replicas {
        eprintln!("===== replica {name} =====\n{}", r.log());
    }
    panic!("the pipelines did not settle over {live:?} with {rows} events each:\n{last}");
}

/// Waits until `status.owner` of every pipeline names `owner` (whether or not it streams).
async fn claimed_by(pipelines: &Api<CdcPipeline>, owner: &str) {
    let started = Instant::now();
    let mut last = Vec::new();
    while started.elapsed() < Duration::from_secs(60) {
        let list = pipelines.list(&ListParams::default()).await.unwrap();
        last = list
            .items
            .iter()
            .filter_map(|p| {
                let o = p.status.as_ref().and_then(|s| s.owner.clone());
                (o.as_deref() != Some(owner)).then(|| format!("{:?}: {o:?}", p.metadata.name))
            })
            .collect();
        if last.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("not all claimed by {owner}: {last:?}");
}

/// Pipelines per owner, sorted.
fn loads(owners: &BTreeMap<String, String>) -> Vec<usize> {
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for o in owners.values() {
        *per.entry(o.as_str()).or_default() += 1;
    }
    let mut v: Vec<usize> = per.into_values().collect();
    v.sort_unstable();
    v
}

/// Inserts rows `from..=to` into every table, one transaction per table.
async fn write_rows(source: &tokio_postgres::Client, from: i64, to: i64) {
    for i in 0..PIPELINES {
        source
            .batch_execute(&format!(
                "INSERT INTO {} SELECT generate_series({from}, {to})",
                table(i)
            ))
            .await
            .unwrap();
    }
}

async fn put_secret(admin: &Client, name: &str, uri: &str) {
    apiserver::put_secret(admin, NS, name, uri).await
}

/// Three replicas split 30 pipelines evenly; a fourth joins and takes its share; one is
/// killed with SIGKILL, one is cut off from the API server and one is frozen past its lease,
/// and the others take theirs over; one stops on SIGTERM and hands over at once. Rows are
/// written between every step, and each is captured exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_the_pipelines_and_hand_them_over_exactly_once() {
    let (api, admin, pipelines) = apiserver::namespace(NS).await;
    // A server of its own: 30 slots and walsenders, and their connections.
    let pg = own_cluster(ClusterOptions {
        extra_conf: vec![
            "max_replication_slots = 64".into(),
            "max_wal_senders = 64".into(),
            "max_connections = 300".into(),
        ],
        ..ClusterOptions::default()
    });
    let src = fresh_db(&pg, "fleet_src").await;
    let buf = fresh_db(&pg, "fleet_buf").await;
    let source = connect(&src).await;
    for i in 0..PIPELINES {
        source
            .batch_execute(&format!("CREATE TABLE {} (id int PRIMARY KEY)", table(i)))
            .await
            .unwrap();
    }
    put_secret(&admin, "fleet-src", &src).await;
    put_secret(&admin, "fleet-buf", &buf).await;
    for i in 0..PIPELINES {
        let p: CdcPipeline = serde_json::from_value(json!({
            "apiVersion": "philotes.io/v1alpha1", "kind": "CdcPipeline",
            "metadata": {"name": name(i)},
            "spec": {
                "source": {"connectionSecretRef": {"name": "fleet-src"}, "tables": [table(i)]},
                "buffer": {"connectionSecretRef": {"name": "fleet-buf"}},
                "flushInterval": "100ms",
                "statusInterval": "1s",
            },
        }))
        .unwrap();
        pipelines.create(&PostParams::default(), &p).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut replicas: BTreeMap<&str, Replica> = BTreeMap::new();
    for r in ["a", "b", "c"] {
        replicas.insert(r, Replica::start(dir.path(), api.port, r).await);
    }

    // The split: ten each, each pipeline streaming (its slot active: PostgreSQL allows one
    // walsender per slot, so no two replicas run one).
    let owners = settled(&pipelines, &["a", "b", "c"], 0, &replicas).await;
    assert_eq!(loads(&owners), [10, 10, 10]);
    let active: Vec<i64> = column(
        &source,
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'philotes_fleet_%' AND active",
    )
    .await;
    assert_eq!(active, [PIPELINES as i64]);
    write_rows(&source, 1, 10).await;
    settled(&pipelines, &["a", "b", "c"], 10, &replicas).await;

    // A replica joins: it takes its share, every pipeline keeps its changes.
    replicas.insert("d", Replica::start(dir.path(), api.port, "d").await);
    write_rows(&source, 11, 20).await;
    let owners = settled(&pipelines, &["a", "b", "c", "d"], 20, &replicas).await;
    assert_eq!(loads(&owners), [7, 7, 8, 8]);

    // SIGKILL: the others take its pipelines over once its Lease has not changed for a lease
    // duration.
    let killed_at = Instant::now();
    replicas.get_mut("c").unwrap().child.kill().unwrap();
    write_rows(&source, 21, 30).await;
    let owners = settled(&pipelines, &["a", "b", "d"], 30, &replicas).await;
    assert_eq!(loads(&owners), [10, 10, 10]);
    eprintln!(
        "SIGKILL to every pipeline streaming elsewhere: {:.1}s",
        killed_at.elapsed().as_secs_f64()
    );

    // Cut off from the API server: it cannot renew its Lease, so it stops its pipelines and
    // exits (code 3) before the others count it gone.
    let b = replicas.get_mut("b").unwrap();
    b.proxy.partition();
    assert_eq!(
        b.exited(Duration::from_secs(60)).await,
        Some(3),
        "{}",
        b.log()
    );
    assert!(b.log().contains("membership lost"), "{}", b.log());
    write_rows(&source, 31, 40).await;
    let owners = settled(&pipelines, &["a", "d"], 40, &replicas).await;
    assert_eq!(loads(&owners), [15, 15]);

    // The handovers so far waited for each other: no replica ever found a pipeline's slot or
    // buffer lock still held by another (the database's guards were never needed).
    for (name, r) in &replicas {
        let log = r.log();
        assert!(!log.contains("SlotInUse"), "replica {name}:\n{log}");
    }

    // Frozen (SIGSTOP) past its lease, still believing it runs its pipelines: the other
    // claims them, but the frozen one's connections still hold their slots (one walsender per
    // slot) and buffer locks, so nothing streams them twice meanwhile.
    let frozen: Vec<String> = owners
        .iter()
        .filter(|(_, o)| o.as_str() == "d")
        .map(|(p, _)| format!("{NS}/{p}"))
        .collect();
    let slots: Vec<String> = frozen
        .iter()
        .map(|p| format!("philotes_{}", p.replace('/', "_")))
        .collect();
    // The walsenders streaming the frozen replica's slots.
    let walsenders = format!(
        "SELECT active_pid FROM pg_replication_slots WHERE active AND slot_name IN ('{}') ORDER BY 1",
        slots.join("', '")
    );
    let streaming: Vec<i32> = column(&source, &walsenders).await;
    assert_eq!(streaming.len(), frozen.len());
    let d = replicas.get_mut("d").unwrap();
    let pid = d.child.id().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    write_rows(&source, 41, 50).await;
    claimed_by(&pipelines, "a").await;
    let held: Vec<i32> = column(&source, &walsenders).await;
    assert_eq!(
        held, streaming,
        "the frozen replica's walsenders still hold its slots"
    );
    // Then the servers end its sessions, as TCP keepalives would on a partition: the other
    // replica takes the slots and locks, supersedes its writer epochs and streams, while the
    // frozen one still believes it runs them.
    source
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE active AND slot_name IN ('{}')",
            slots.join("', '")
        ))
        .await
        .unwrap();
    // The writer lock of a pipeline: `Buffer::open`'s advisory lock, as pg_locks shows a
    // 64-bit key.
    let buffer = connect(&buf).await;
    let ended: Vec<i64> = column(
        &buffer,
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
             WHERE locktype = 'advisory' AND objsubid = 1 AND granted \
             AND ((classid::int8 << 32) | objid::int8) IN \
             (SELECT hashtextextended('philotes:' || p, 0) FROM unnest(ARRAY['{}']) p)",
            frozen.join("', '")
        ),
    )
    .await;
    assert_eq!(
        ended,
        [frozen.len() as i64],
        "one buffer session per frozen pipeline"
    );
    let owners = settled(&pipelines, &["a"], 50, &replicas).await;
    assert_eq!(loads(&owners), [30]);
    // Resumed, it writes nothing (its sessions are gone, and a new one would find the lock
    // taken: every pipeline's rows are checked exactly once below) and its membership has
    // lapsed for good: it stops everything and exits 3, not resuming as a member although
    // its next renewal would get through.
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    let d = replicas.get_mut("d").unwrap();
    assert_eq!(
        d.exited(Duration::from_secs(60)).await,
        Some(3),
        "{}",
        d.log()
    );
    assert!(d.log().contains("membership lost"), "{}", d.log());
    write_rows(&source, 51, 55).await;
    let owners = settled(&pipelines, &["a"], 55, &replicas).await;
    assert_eq!(loads(&owners), [30]);

    // A new replica joins, then the first stops on SIGTERM: it stops its pipelines, leaves,
    // and the new one takes them at once.
    replicas.insert("e", Replica::start(dir.path(), api.port, "e").await);
    let owners = settled(&pipelines, &["a", "e"], 55, &replicas).await;
    assert_eq!(loads(&owners), [15, 15]);
    let a = replicas.get_mut("a").unwrap();
    sigterm(&a.child);
    assert_eq!(
        a.exited(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        a.log()
    );
    write_rows(&source, 56, 60).await;
    let owners = settled(&pipelines, &["e"], 60, &replicas).await;
    assert_eq!(loads(&owners), [30]);

    // Every row exactly once, in every pipeline: the events, and `philotes verify`'s replay
    // of them against the source table.
    for i in 0..PIPELINES {
        let events = events(&buffer, "philotes", &format!("{NS}/{}", name(i))).await;
        let mut ids: Vec<i64> = events
            .iter()
            .filter(|e| e.operation == "INSERT")
            .map(|e| e.after.as_ref().unwrap()["id"].as_i64().unwrap())
            .collect();
        assert_eq!(events.len(), ids.len(), "{}", name(i));
        ids.sort_unstable();
        assert_eq!(ids, (1..=60).collect::<Vec<_>>(), "{}", name(i));
        let cfg = config(
            &manifest(&name(i), &src, &buf, &[&table(i)], "")
                .replace("namespace: test", &format!("namespace: {NS}")),
        );
        let report = philotes::verify::verify(&cfg).await.expect("verify");
        assert!(report.ok() && report.events() == 60, "{}: {report}", cfg.id);
    }
    // The last sessions are e's; every pipeline had sessions before (each a new epoch in
    // cdc_writers).
    let writers: Vec<String> = column(
        &buffer,
        "SELECT writer || ' ' || (epoch > 1)::text FROM philotes.cdc_writers ORDER BY pipeline",
    )
    .await;
    assert_eq!(writers, vec!["e true".to_string(); PIPELINES]);
}
