//! `philotes controller` against a real kube-apiserver, run as the `deploy/` ServiceAccount
//! (so the RBAC is tested for sufficiency), with real PostgreSQL servers.

mod common;

use std::time::Duration;

use common::apiserver::{self, ApiServer};
use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use philotes::crd::CdcPipeline;
use philotes::operator::{Exit, OperatorOptions};
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Operator {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<anyhow::Result<Exit>>,
    metrics_port: u16,
}

impl Operator {
    /// A controller for one namespace, authenticated as the operator's ServiceAccount.
    fn start(api: &ApiServer, namespace: &str, lease: Option<&str>) -> Operator {
        Operator::start_with(api, namespace, lease, None)
    }

    /// As [`Operator::start`], restricted to Secrets carrying `secret_label` (KEY=VALUE).
    fn start_with(
        api: &ApiServer,
        namespace: &str,
        lease: Option<&str>,
        secret_label: Option<&str>,
    ) -> Operator {
        let (tx, rx) = oneshot::channel::<()>();
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let opts = OperatorOptions {
            namespace: Some(namespace.to_string()),
            metrics_addr: format!("127.0.0.1:{metrics_port}").parse().unwrap(),
            leader_election: lease.is_some(),
            lease_namespace: "philotes-system".into(),
            lease_name: lease.unwrap_or("unused").to_string(),
            identity: Some(format!("test-operator-{metrics_port}")),
            secret_label: secret_label
                .map(|l| philotes::controller::refs::SecretLabel::parse(l).unwrap()),
        };
        let client = api.operator();
        let handle = tokio::spawn(async move {
            philotes::operator::run_with_client(client, opts, async {
                let _ = rx.await;
            })
            .await
        });
        Operator {
            stop: Some(tx),
            handle,
            metrics_port,
        }
    }

    async fn stop(mut self) -> Exit {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("operator stops within 60s")
            .expect("operator task")
            .expect("operator result")
    }

    async fn metrics(&self) -> String {
        self.get("/metrics").await
    }

    /// The whole HTTP response to `GET path` on the metrics port.
    async fn get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .expect("metrics port");
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}

async fn setup(name: &str) -> (&'static ApiServer, Client, Api<CdcPipeline>) {
    apiserver::namespace(name).await
}

async fn put_secret(admin: &Client, ns: &str, name: &str, uri: &str) {
    apiserver::put_secret(admin, ns, name, uri).await
}

fn pipeline(name: &str, tables: &[&str], extra: serde_json::Value) -> CdcPipeline {
    let mut spec = json!({
        "source": {"connectionSecretRef": {"name": format!("{name}-src")}, "tables": tables},
        "buffer": {"connectionSecretRef": {"name": format!("{name}-buf")}},
        "flushInterval": "100ms",
        "statusInterval": "500ms",
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    serde_json::from_value(json!({
        "apiVersion": "philotes.io/v1alpha1", "kind": "CdcPipeline",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

/// Sets `spec.suspend` of pipeline `name`.
async fn set_suspend(api: &Api<CdcPipeline>, name: &str, on: bool) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"suspend": on}})),
    )
    .await
    .unwrap();
}

/// Waits until the pipeline's status satisfies `done`; panics with the last status.
async fn wait_status(
    api: &Api<CdcPipeline>,
    name: &str,
    what: &str,
    done: impl Fn(&philotes::crd::CdcPipelineStatus) -> bool,
) -> philotes::crd::CdcPipelineStatus {
    let mut last = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(p) = api.get(name).await {
            if let Some(s) = &p.status {
                if done(s) {
                    return s.clone();
                }
            }
            last = p.status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}; last status: {last:#?}");
}

fn ready(s: &philotes::crd::CdcPipelineStatus) -> (String, String) {
    s.conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone()))
        .unwrap_or_default()
}

async fn slot_pid(db: &tokio_postgres::Client, slot: &str) -> Option<Option<i32>> {
    db.query_opt(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_provision_ready_count_suspend_restart_delete() {
    let ns = "lifecycle";
    let (api, admin, pipelines) = setup(ns).await;
    let (src, buf, db) = databases_with(
        "op_life",
        "CREATE TABLE orders (id int PRIMARY KEY, v text)",
    )
    .await;
    put_secret(&admin, ns, "orders-src", &src).await;
    put_secret(&admin, ns, "orders-buf", &buf).await;
    let op = Operator::start(api, ns, None);

    pipelines
        .create(
            &PostParams::default(),
            &pipeline(
                "orders",
                &["orders"],
                json!({"slotDeletionPolicy": "Delete"}),
            ),
        )
        .await
        .unwrap();
    let s = wait_status(&pipelines, "orders", "Running and Ready", |s| {
        s.phase.as_deref() == Some("Running") && ready(s).0 == "True" && s.lag_bytes.is_some()
    })
    .await;
    assert_eq!(s.slot_name.as_deref(), Some("philotes_lifecycle_orders"));
    assert_eq!(
        s.publication_name.as_deref(),
        Some("philotes_lifecycle_orders")
    );
    assert_eq!(s.observed_generation, Some(1));
    assert!(s.wal_status.is_some() && s.current_wal_lsn.is_some());
    let slot = "philotes_lifecycle_orders";
    assert!(
        matches!(slot_pid(&db, slot).await, Some(Some(_))),
        "slot active"
    );

    db.batch_execute("INSERT INTO orders SELECT i, 'x' FROM generate_series(1, 10) i")
        .await
        .unwrap();
    wait_status(&pipelines, "orders", "10 events counted", |s| {
        s.events_total == Some(10) && s.last_checkpoint_time.is_some()
    })
    .await;
    let metrics = op.metrics().await;
    assert!(
        metrics.contains(r#"philotes_events_total{pipeline="lifecycle/orders",table="public.orders",operation="INSERT"} 10"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("philotes_batch_write_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("philotes_reconciles_total"), "{metrics}");

    // Another slot for a pipeline that has a checkpoint: refused, and it keeps streaming
    // where it was; reverted, the condition goes.
    let pid = slot_pid(&db, slot).await;
    pipelines
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"source": {"slot": "another_slot"}}})),
        )
        .await
        .unwrap();
    let s = wait_status(&pipelines, "orders", "the slot change refused", |s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "SpecAccepted" && c.reason == "IdentityChangeRefused")
    })
    .await;
    let refusal = s
        .conditions
        .iter()
        .find(|c| c.type_ == "SpecAccepted")
        .unwrap();
    assert!(
        refusal
            .message
            .contains("changing spec.source.slot from philotes_lifecycle_orders to another_slot"),
        "{}",
        refusal.message
    );
    assert_eq!(s.phase.as_deref(), Some("Running"));
    assert_eq!(
        slot_pid(&db, slot).await,
        pid,
        "the same session streams on"
    );
    assert_eq!(
        slot_pid(&db, "another_slot").await,
        None,
        "no other slot made"
    );
    pipelines
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"source": {"slot": null}}})),
        )
        .await
        .unwrap();
    wait_status(&pipelines, "orders", "the refusal cleared", |s| {
        s.phase.as_deref() == Some("Running")
            && !s.conditions.iter().any(|c| c.type_ == "SpecAccepted")
    })
    .await;
    assert_eq!(slot_pid(&db, slot).await, pid, "still the same session");

    // Suspend: streaming stops, the slot stays.
    pipelines
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    wait_status(&pipelines, "orders", "Suspended", |s| {
        s.phase.as_deref() == Some("Suspended") && ready(s) == ("False".into(), "Suspended".into())
    })
    .await;
    eventually("the slot to go inactive", Duration::from_secs(30), || {
        let db = &db;
        async move { matches!(slot_pid(db, slot).await, Some(None)).then_some(()) }
    })
    .await;
    // The stop confirmed exactly what the buffer checkpointed.
    let confirmed: String = db
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    let checkpoint: String = connect(&buf)
        .await
        .query_one(
            "SELECT lsn::text FROM philotes.cdc_checkpoints WHERE pipeline = 'lifecycle/orders'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(confirmed, checkpoint, "suspend confirms the checkpoint");
    db.batch_execute("INSERT INTO orders SELECT i, 'y' FROM generate_series(11, 15) i")
        .await
        .unwrap();

    // Resumed with another buffer schema: refused though nothing runs (the status recorded
    // what the checkpoint belongs to), and nothing is started there.
    pipelines
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": false, "buffer": {"schema": "elsewhere"}}})),
        )
        .await
        .unwrap();
    let s = wait_status(&pipelines, "orders", "the schema change refused", |s| {
        ready(s) == ("False".into(), "IdentityChangeRefused".into())
    })
    .await;
    assert!(
        s.conditions[0]
            .message
            .contains("changing spec.buffer.schema from philotes to elsewhere"),
        "{s:?}"
    );
    assert_eq!(
        s.checkpoint_of.as_ref().map(|c| c.buffer_schema.as_str()),
        Some("philotes")
    );
    let elsewhere: i64 = connect(&buf)
        .await
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'elsewhere'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(elsewhere, 0, "nothing created in the other schema");
    assert_eq!(slot_pid(&db, slot).await, Some(None), "not streaming");

    // Reverted: what was written while suspended arrives.
    pipelines
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"buffer": {"schema": null}}})),
        )
        .await
        .unwrap();
    wait_status(&pipelines, "orders", "15 events after resume", |s| {
        s.phase.as_deref() == Some("Running") && s.events_total == Some(15)
    })
    .await;

    // A spec change restarts the pipeline: a new walsender serves the slot.
    let pid_before = slot_pid(&db, slot).await.flatten();
    pipelines
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"batchSize": 7}})),
        )
        .await
        .unwrap();
    // Generations: 1 created, 2-3 the refused slot and its revert, 4 suspend, 5 resume with
    // the refused schema, 6 its revert.
    wait_status(&pipelines, "orders", "the new generation observed", |s| {
        s.observed_generation == Some(7) && s.phase.as_deref() == Some("Running")
    })
    .await;
    eventually(
        "a new walsender after the restart",
        Duration::from_secs(30),
        || {
            let db = &db;
            async move {
                let now = slot_pid(db, slot).await.flatten();
                (now.is_some() && now != pid_before).then_some(())
            }
        },
    )
    .await;

    // Events were published on transitions.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), ns);
    let list = events.list(&Default::default()).await.unwrap();
    let reasons: Vec<String> = list.items.iter().filter_map(|e| e.reason.clone()).collect();
    assert!(reasons.iter().any(|r| r == "Suspended"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "Streaming"), "{reasons:?}");

    // Delete with policy Delete: slot and publication are dropped, the resource goes.
    pipelines
        .delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the resource to be gone", Duration::from_secs(60), || {
        let pipelines = &pipelines;
        async move {
            pipelines
                .get_opt("orders")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    assert_eq!(slot_pid(&db, slot).await, None, "slot dropped");
    let pubs: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname = 'philotes_lifecycle_orders'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pubs, 0, "publication dropped");
    let buffer = connect(&buf).await;
    assert_eq!(events_count(&buffer, "lifecycle/orders").await, 15);
    let checkpoints: i64 = buffer
        .query_one(
            "SELECT count(*) FROM philotes.cdc_checkpoints WHERE pipeline = 'lifecycle/orders'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        checkpoints, 0,
        "slotDeletionPolicy Delete removes the checkpoint too"
    );
    assert_eq!(op.stop().await, Exit::Signalled);
}

async fn events_count(buffer: &tokio_postgres::Client, pipeline: &str) -> i64 {
    buffer
        .query_one(
            "SELECT count(*) FROM philotes.cdc_events WHERE pipeline = $1",
            &[&pipeline],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_resources_are_reported_and_do_not_stop_the_others() {
    let ns = "errors";
    let (api, admin, pipelines) = setup(ns).await;
    let (src, buf, db) = databases_with("op_err", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let pw = shared().password().to_string();
    put_secret(&admin, ns, "good-src", &src).await;
    put_secret(&admin, ns, "good-buf", &buf).await;
    put_secret(&admin, ns, "badpw-src", &src.replace(&pw, "wrong-password")).await;
    put_secret(&admin, ns, "badpw-buf", &buf).await;
    let op = Operator::start(api, ns, None);

    // The schema rejects what it can at apply time (sent untyped, as kubectl would).
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        admin.clone(),
        ns,
        &kube::api::ApiResource::erase::<CdcPipeline>(&()),
    );
    for bad in [
        json!({"batchSize": 0}),
        json!({"flushInterval": "soon"}),
        json!({"slotDeletionPolicy": "Sometimes"}),
        json!({"source": {"connectionSecretRef": {"name": "x"}, "tables": []}}),
        json!({"source": {"tables": ["t"]}}),
    ] {
        let mut doc = serde_json::to_value(pipeline("rejected", &["t"], json!({}))).unwrap();
        for (k, v) in bad.as_object().unwrap() {
            doc["spec"][k] = v.clone();
        }
        let obj: kube::api::DynamicObject = serde_json::from_value(doc).unwrap();
        let err = raw
            .create(&PostParams::default(), &obj)
            .await
            .expect_err(&format!("the schema rejects {bad}"));
        assert!(err.to_string().contains("spec."), "{bad}: {err}");
    }

    for p in [
        pipeline("good", &["t"], json!({})),
        pipeline("badpw", &["t"], json!({})),
        pipeline("nosecret", &["t"], json!({})),
    ] {
        pipelines.create(&PostParams::default(), &p).await.unwrap();
    }
    let s = wait_status(&pipelines, "badpw", "a bad password reported", |s| {
        ready(s) == ("False".into(), "AuthenticationFailed".into())
    })
    .await;
    let message = &s.conditions[0].message;
    assert!(message.contains("refused the login"), "{message}");
    assert!(
        !message.contains("wrong-password") && !message.contains(&pw),
        "{message}"
    );
    let s = wait_status(&pipelines, "nosecret", "a missing secret reported", |s| {
        s.phase.as_deref() == Some("Failed") && ready(s).1 == "SecretError"
    })
    .await;
    assert!(s.conditions[0]
        .message
        .contains("secret errors/nosecret-src not found"));
    wait_status(&pipelines, "good", "the good one running", |s| {
        s.phase.as_deref() == Some("Running")
    })
    .await;

    // No password in any Event or status field.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), ns);
    let everything = format!(
        "{:?}{:?}",
        events.list(&Default::default()).await.unwrap().items,
        pipelines.list(&Default::default()).await.unwrap().items
    );
    assert!(
        everything.contains("AuthenticationFailed"),
        "events and status were read"
    );
    for secret in [pw.as_str(), "wrong-password"] {
        assert!(
            !everything.contains(secret),
            "{secret} leaked into events or status"
        );
    }

    // A pipeline whose buffer turns read-only goes Degraded with the reason within a couple of
    // status intervals, and back to Running when it is fixed.
    let buf_db = buf
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_string();
    let pg_admin = connect(&shared().uri("postgres")).await;
    pg_admin
        .batch_execute(&format!(
            "ALTER DATABASE {buf_db} SET default_transaction_read_only = on;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{buf_db}';"
        ))
        .await
        .unwrap();
    db.batch_execute("INSERT INTO t VALUES (1000)")
        .await
        .unwrap();
    let s = wait_status(&pipelines, "good", "Degraded on a read-only buffer", |s| {
        s.phase.as_deref() == Some("Degraded")
            && ready(s).0 == "False"
            && s.conditions[0].message.contains("read-only")
    })
    .await;
    assert_eq!(ready(&s).1, "BufferError");
    pg_admin
        .batch_execute(&format!(
            "ALTER DATABASE {buf_db} RESET default_transaction_read_only"
        ))
        .await
        .unwrap();
    wait_status(&pipelines, "good", "Running again", |s| {
        s.phase.as_deref() == Some("Running") && ready(s).0 == "True"
    })
    .await;

    // Fixing the secret is enough: the secret watch restarts the pipeline.
    put_secret(&admin, ns, "badpw-src", &src).await;
    wait_status(&pipelines, "badpw", "running with the new password", |s| {
        s.phase.as_deref() == Some("Running") && ready(s).0 == "True"
    })
    .await;

    // Retain: deletion leaves the slot.
    pipelines
        .delete("good", &DeleteParams::default())
        .await
        .unwrap();
    eventually("good to be gone", Duration::from_secs(60), || {
        let pipelines = &pipelines;
        async move {
            pipelines
                .get_opt("good")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    assert!(
        slot_pid(&db, "philotes_errors_good").await.is_some(),
        "slot retained"
    );

    // Delete policy with the source unreachable: the resource stays and says why, until the
    // user lets it go.
    put_secret(
        &admin,
        ns,
        "nosecret-src",
        "postgres://u:p@127.0.0.1:1/x?sslmode=disable&connect_timeout=1",
    )
    .await;
    put_secret(&admin, ns, "nosecret-buf", &buf).await;
    pipelines
        .patch(
            "nosecret",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"slotDeletionPolicy": "Delete"}})),
        )
        .await
        .unwrap();
    pipelines
        .delete("nosecret", &DeleteParams::default())
        .await
        .unwrap();
    let s = wait_status(
        &pipelines,
        "nosecret",
        "deletion blocked, with the reason",
        |s| ready(s).1 == "CleanupBlocked",
    )
    .await;
    assert!(
        s.conditions[0].message.contains("philotes.io/skip-cleanup"),
        "{s:?}"
    );
    pipelines
        .patch(
            "nosecret",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"philotes.io/skip-cleanup": "true"}}}),
            ),
        )
        .await
        .unwrap();
    eventually("nosecret to be gone", Duration::from_secs(60), || {
        let pipelines = &pipelines;
        async move {
            pipelines
                .get_opt("nosecret")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    op.stop().await;
}

/// Two CdcPipelines naming one slot on one source: the one created later is refused with a
/// condition and an Event while the first keeps streaming every change; once the first is
/// deleted (slot retained), the second adopts the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pipeline_on_the_same_slot_is_refused() {
    let ns = "sameslot";
    let (api, admin, pipelines) = setup(ns).await;
    let (src, buf, db) = databases_with("op_same", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let (_, buf2) = databases("op_same2").await;
    put_secret(&admin, ns, "first-src", &src).await;
    put_secret(&admin, ns, "first-buf", &buf).await;
    put_secret(&admin, ns, "second-src", &src).await;
    put_secret(&admin, ns, "second-buf", &buf2).await;
    let op = Operator::start(api, ns, None);
    let shared_slot = json!({"source": {"connectionSecretRef": {"name": "first-src"}, "tables": ["t"], "slot": "shared_slot"}});
    pipelines
        .create(
            &PostParams::default(),
            &pipeline("first", &["t"], shared_slot.clone()),
        )
        .await
        .unwrap();
    wait_status(&pipelines, "first", "the first pipeline running", |s| {
        s.phase.as_deref() == Some("Running") && s.checkpoint_of.is_some()
    })
    .await;
    // Suspended, the first still owns the slot: its checkpoint belongs to it.
    set_suspend(&pipelines, "first", true).await;
    wait_status(&pipelines, "first", "the first pipeline suspended", |s| {
        s.phase.as_deref() == Some("Suspended")
    })
    .await;
    // Created a second later: the API server's creationTimestamp has one-second resolution.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = json!({"source": {"connectionSecretRef": {"name": "second-src"}, "tables": ["t"], "slot": "shared_slot"}});
    pipelines
        .create(&PostParams::default(), &pipeline("second", &["t"], second))
        .await
        .unwrap();
    let s = wait_status(&pipelines, "second", "the second pipeline refused", |s| {
        ready(s) == ("False".into(), "SlotConflict".into())
    })
    .await;
    let message = &s.conditions[0].message;
    assert!(
        message.contains("shared_slot")
            && message.contains("sameslot/first")
            && message.contains("running or not"),
        "{message}"
    );
    assert_eq!(s.phase.as_deref(), Some("Failed"));
    set_suspend(&pipelines, "first", false).await;
    wait_status(
        &pipelines,
        "first",
        "the first pipeline running again",
        |s| s.phase.as_deref() == Some("Running"),
    )
    .await;
    let s = pipelines.get("second").await.unwrap().status.unwrap();
    assert_eq!(ready(&s), ("False".into(), "SlotConflict".into()));
    let metrics = op.metrics().await;
    assert!(
        metrics.contains(
            r#"philotes_pipeline_not_ready{pipeline="sameslot/second",reason="SlotConflict"} 1"#
        ),
        "{metrics}"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), ns);
    eventually(
        "a SlotConflict event for the second pipeline",
        Duration::from_secs(30),
        || {
            let events = &events;
            async move {
                events
                    .list(&Default::default())
                    .await
                    .unwrap()
                    .items
                    .into_iter()
                    .find(|e| {
                        e.reason.as_deref() == Some("SlotConflict")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                                == Some("second")
                    })
            }
        },
    )
    .await;
    // The first keeps every change; the second wrote nothing.
    db.batch_execute("INSERT INTO t SELECT generate_series(1, 50)")
        .await
        .unwrap();
    let first_buffer = connect(&buf).await;
    eventually(
        "50 events in the first buffer",
        Duration::from_secs(30),
        || {
            let b = &first_buffer;
            async move { (events_count(b, "sameslot/first").await == 50).then_some(()) }
        },
    )
    .await;
    let s = pipelines.get("first").await.unwrap().status.unwrap();
    assert_eq!(ready(&s), ("True".into(), "Streaming".into()), "{s:?}");
    let second_buffer = connect(&buf2).await;
    let written: i64 = second_buffer
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'cdc_events'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if written > 0 {
        assert_eq!(events_count(&second_buffer, "sameslot/second").await, 0);
    }

    // The first goes (its slot retained): the second takes the slot over.
    pipelines
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    wait_status(&pipelines, "second", "the second pipeline running", |s| {
        s.phase.as_deref() == Some("Running")
    })
    .await;
    db.batch_execute("INSERT INTO t SELECT generate_series(51, 60)")
        .await
        .unwrap();
    eventually(
        "the second pipeline streams (after copying the 50 rows the table held: it is new)",
        Duration::from_secs(30),
        || {
            let b = &second_buffer;
            async move { (events_count(b, "sameslot/second").await == 60).then_some(()) }
        },
    )
    .await;
    let inserts: i64 = second_buffer
        .query_one(
            "SELECT count(*) FROM philotes.cdc_events WHERE pipeline = 'sameslot/second' AND operation = 'INSERT'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(inserts, 10);
    op.stop().await;
}

/// A lost slot under the operator: `Failed`/`SlotLost`, nothing recreated; the
/// `philotes.io/recover` annotation acknowledges the gap once (recorded in `cdc_gaps`, an
/// Event) and the pipeline continues on a new slot; a request while nothing is lost is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_is_recovered_by_annotation() {
    let ns = "recover";
    let (api, admin, pipelines, db) = one_pipeline(ns).await;
    let op = Operator::start(api, ns, None);
    let s = wait_status(&pipelines, "p", "running", |s| {
        s.phase.as_deref() == Some("Running")
    })
    .await;
    let slot = s.slot_name.clone().expect("slot in status");
    let buffer = connect(&pipelines_buffer_uri(&admin, ns).await).await;
    db.batch_execute("INSERT INTO t SELECT generate_series(1, 10)")
        .await
        .unwrap();
    eventually("10 events", Duration::from_secs(30), || {
        let b = &buffer;
        async move { (events_count(b, "recover/p").await == 10).then_some(()) }
    })
    .await;
    set_suspend(&pipelines, "p", true).await;
    wait_status(&pipelines, "p", "suspended", |s| {
        s.phase.as_deref() == Some("Suspended")
    })
    .await;
    eventually("the slot released", Duration::from_secs(30), || {
        let (db, slot) = (&db, &slot);
        async move { (slot_pid(db, slot).await == Some(None)).then_some(()) }
    })
    .await;
    db.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    db.batch_execute("INSERT INTO t SELECT generate_series(11, 15)")
        .await
        .unwrap();
    set_suspend(&pipelines, "p", false).await;
    let s = wait_status(&pipelines, "p", "SlotLost", |s| {
        ready(s) == ("False".into(), "SlotLost".into())
    })
    .await;
    assert!(s.conditions[0].message.contains(&slot), "{s:?}");
    assert_eq!(
        slot_pid(&db, &slot).await,
        None,
        "the slot is not recreated"
    );

    let annotate = |request: &'static str| {
        let pipelines = pipelines.clone();
        async move {
            pipelines
                .patch(
                    "p",
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"metadata": {"annotations": {"philotes.io/recover": request}}}),
                    ),
                )
                .await
                .unwrap();
        }
    };
    annotate("r1").await;
    wait_status(&pipelines, "p", "recovered and running", |s| {
        s.recover_request.as_deref() == Some("r1") && s.phase.as_deref() == Some("Running")
    })
    .await;
    db.batch_execute("INSERT INTO t SELECT generate_series(16, 22)")
        .await
        .unwrap();
    eventually(
        "17 inserts: 10 before the gap, 7 after",
        Duration::from_secs(30),
        || {
            let b = &buffer;
            async move {
                let n: i64 = b
                    .query_one(
                        "SELECT count(*) FROM philotes.cdc_events WHERE pipeline = 'recover/p' AND operation = 'INSERT'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (n == 17).then_some(())
            }
        },
    )
    .await;
    // The recovery copied the table again: the rows the gap took (11..=15) are back.
    let s = wait_status(&pipelines, "p", "the table copied again", |s| {
        s.snapshots
            .first()
            .is_some_and(|t| t.phase == "Done" && t.request.starts_with("gap:"))
    })
    .await;
    assert!(s.snapshots[0].rows_copied >= 15, "{s:?}");
    let copied: Vec<i32> = column(
        &buffer,
        "SELECT DISTINCT (after->>'id')::int FROM philotes.cdc_events WHERE pipeline = 'recover/p' AND operation = 'SNAPSHOT' \
         AND (after->>'id')::int BETWEEN 11 AND 15 ORDER BY 1",
    )
    .await;
    assert_eq!(copied, (11..=15).collect::<Vec<i32>>());
    let gaps: Vec<String> = buffer
        .query(
            "SELECT reason FROM philotes.cdc_gaps WHERE pipeline = 'recover/p'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(gaps, ["SlotLost"]);
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), ns);
    let reasons = || {
        let events = events.clone();
        async move {
            events
                .list(&Default::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .filter_map(|e| e.reason)
                .collect::<Vec<_>>()
        }
    };
    let seen = reasons().await;
    for reason in ["SlotLost", "GapRecovered"] {
        assert!(seen.contains(&reason.to_string()), "{reason}: {seen:?}");
    }

    // A new request while nothing is lost changes nothing.
    annotate("r2").await;
    wait_status(&pipelines, "p", "the second request settled", |s| {
        s.recover_request.as_deref() == Some("r2")
    })
    .await;
    assert!(reasons().await.contains(&"RecoverIgnored".to_string()));
    let gaps: i64 = buffer
        .query_one("SELECT count(*) FROM philotes.cdc_gaps", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(gaps, 1);
    assert_eq!(
        pipelines
            .get("p")
            .await
            .unwrap()
            .status
            .unwrap()
            .phase
            .as_deref(),
        Some("Running")
    );
    op.stop().await;
}

/// The buffer URI the `p` pipeline of `ns` uses (from its Secret).
async fn pipelines_buffer_uri(admin: &Client, ns: &str) -> String {
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let s = secrets.get("p-buf").await.unwrap();
    let data = s.data.unwrap_or_default();
    String::from_utf8(data["uri"].0.clone()).unwrap()
}

/// Namespace `ns` with pipeline `p` capturing table `t` of database `op_<ns>_src`.
async fn one_pipeline(
    ns: &str,
) -> (
    &'static ApiServer,
    Client,
    Api<CdcPipeline>,
    tokio_postgres::Client,
) {
    one_pipeline_with(ns, json!({})).await
}

/// As [`one_pipeline`], with `extra` spec fields.
async fn one_pipeline_with(
    ns: &str,
    extra: serde_json::Value,
) -> (
    &'static ApiServer,
    Client,
    Api<CdcPipeline>,
    tokio_postgres::Client,
) {
    let (api, admin, pipelines) = setup(ns).await;
    let (src, buf) = databases(&format!("op_{ns}")).await;
    let db = connect(&src).await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    put_secret(&admin, ns, "p-src", &src).await;
    put_secret(&admin, ns, "p-buf", &buf).await;
    pipelines
        .create(&PostParams::default(), &pipeline("p", &["t"], extra))
        .await
        .unwrap();
    (api, admin, pipelines, db)
}

/// Two replicas: the pipeline runs on the one `status.owner` names (the other runs nothing);
/// when that one stops, the other takes it over at once and streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_runs_a_pipeline_and_the_other_takes_over_on_stop() {
    let ns = "leader";
    let (api, admin, pipelines, db) = one_pipeline(ns).await;
    let first = Operator::start(api, ns, Some("leader-test"));
    let second = Operator::start(api, ns, Some("leader-test"));
    let identity = |op: &Operator| format!("test-operator-{}", op.metrics_port);
    // The owner the assignment picks from these two replicas.
    let p = pipelines.get("p").await.unwrap();
    let members = philotes::controller::members::Membership {
        member: true,
        live: [identity(&first), identity(&second)].into(),
    };
    let created = p
        .metadata
        .creation_timestamp
        .as_ref()
        .unwrap()
        .0
        .as_second();
    let uid = p.metadata.uid.clone().unwrap();
    let owner = members.assign(&[(created, uid.clone())])[&uid].clone();
    wait_status(&pipelines, "p", "running under its owner", |s| {
        s.phase.as_deref() == Some("Running") && s.owner.as_deref() == Some(owner.as_str())
    })
    .await;
    let (running, other) = if owner == identity(&first) {
        (first, second)
    } else {
        assert_eq!(owner, identity(&second));
        (second, first)
    };
    // Each replica holds a Lease of its own.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(admin.clone(), "philotes-system");
    for op in [&running, &other] {
        let lease = leases
            .get(&philotes::controller::members::lease_name(
                "leader-test",
                &identity(op),
            ))
            .await
            .unwrap();
        assert_eq!(
            lease.spec.and_then(|s| s.holder_identity),
            Some(identity(op))
        );
    }
    assert!(running.metrics().await.contains("leader/p"));
    assert!(!other.metrics().await.contains("leader/p"));

    // The owner stops (leaving): the other takes over and streams.
    assert_eq!(running.stop().await, Exit::Signalled);
    db.batch_execute("INSERT INTO t SELECT generate_series(1, 3)")
        .await
        .unwrap();
    let status = wait_status(&pipelines, "p", "the other replica streaming", |s| {
        s.events_total == Some(3)
    })
    .await;
    assert_eq!(status.owner, Some(identity(&other)));
    other.stop().await;
}

/// A replica that loses its lease (here: another holder writes itself in) stops its pipelines
/// and exits so it restarts as a candidate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_lease_stops_the_pipelines() {
    let ns = "lose";
    let (api, admin, pipelines, db) = one_pipeline(ns).await;
    let op = Operator::start(api, ns, Some("lose-test"));
    wait_status(&pipelines, "p", "running", |s| {
        s.phase.as_deref() == Some("Running")
    })
    .await;
    assert!(matches!(
        slot_pid(&db, "philotes_lose_p").await,
        Some(Some(_))
    ));

    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(admin.clone(), "philotes-system");
    let name = philotes::controller::members::lease_name(
        "lose-test",
        &format!("test-operator-{}", op.metrics_port),
    );
    let mut lease = leases.get(&name).await.unwrap();
    let spec = lease.spec.as_mut().unwrap();
    spec.holder_identity = Some("someone-else".into());
    spec.lease_duration_seconds = Some(600);
    spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    leases
        .replace(&name, &PostParams::default(), &lease)
        .await
        .unwrap();

    let exit = tokio::time::timeout(Duration::from_secs(60), op.handle)
        .await
        .expect("the replica exits after losing the lease")
        .unwrap()
        .unwrap();
    assert_eq!(exit, Exit::LostLeadership);
    eventually("the slot to be released", Duration::from_secs(30), || {
        let db = &db;
        async move { matches!(slot_pid(db, "philotes_lose_p").await, Some(None)).then_some(()) }
    })
    .await;
}

/// The `Snapshotting` condition of a status.
fn snapshotting(s: &philotes::crd::CdcPipelineStatus) -> &philotes::crd::Condition {
    s.conditions
        .iter()
        .find(|c| c.type_ == "Snapshotting")
        .expect("Snapshotting condition")
}

/// A snapshot under the operator: while the rows a table held are copied, the status shows
/// the table `Copying` with its progress and the estimate, the `Snapshotting` condition is
/// True and the phase reads `Snapshotting` (still Ready: changes stream meanwhile); once
/// copied, `Done`, the condition False, and the metrics say the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_reports_its_progress_in_status_and_metrics() {
    let ns = "snapshot";
    let (api, admin, pipelines) = setup(ns).await;
    let (src, buf) = databases(&format!("op_{ns}")).await;
    let db = connect(&src).await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
         ANALYZE t;",
    )
    .await
    .unwrap();
    put_secret(&admin, ns, "p-src", &src).await;
    put_secret(&admin, ns, "p-buf", &buf).await;
    pipelines
        .create(
            &PostParams::default(),
            &pipeline("p", &["t"], json!({"snapshot": {"chunkSize": 150}})),
        )
        .await
        .unwrap();
    let op = Operator::start(api, ns, None);
    let copying = wait_status(&pipelines, "p", "a snapshot in progress", |s| {
        s.snapshots
            .first()
            .is_some_and(|t| t.phase == "Copying" && t.rows_copied > 0 && t.rows_copied < 20000)
    })
    .await;
    let table = &copying.snapshots[0];
    assert_eq!(
        (
            table.table.as_str(),
            table.rows_estimate,
            table.request.as_str()
        ),
        ("public.t", Some(20000), "initial")
    );
    let condition = snapshotting(&copying);
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("True", "Copying")
    );
    assert!(condition.message.contains("public.t ("), "{condition:?}");
    // Changes stream while the copy runs.
    db.batch_execute(
        "UPDATE t SET v = 'changed' WHERE id = 19999; INSERT INTO t VALUES (20001, 'new')",
    )
    .await
    .unwrap();
    let done = wait_status(&pipelines, "p", "the snapshot done", |s| {
        s.phase.as_deref() == Some("Running")
            && s.snapshots.first().is_some_and(|t| t.phase == "Done")
    })
    .await;
    assert_eq!(ready(&done), ("True".into(), "Streaming".into()));
    let copied = done.snapshots[0].rows_copied;
    assert!((19_999..=20_001).contains(&copied), "{copied} rows copied");
    let condition = snapshotting(&done);
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "SnapshotsDone")
    );
    let metrics = op.metrics().await;
    for line in [
        format!("philotes_snapshot_rows_copied{{pipeline=\"{ns}/p\",table=\"public.t\"}} {copied}"),
        format!("philotes_snapshot_copying{{pipeline=\"{ns}/p\",table=\"public.t\"}} 0"),
    ] {
        assert!(metrics.contains(&line), "missing {line} in:\n{metrics}");
    }
    let buffer = connect(&buf).await;
    let updated: Vec<String> = column(
        &buffer,
        "SELECT after->>'v' FROM philotes.cdc_events WHERE pipeline = 'snapshot/p' AND (after->>'id')::int = 19999 \
         ORDER BY commit_lsn DESC, seq DESC LIMIT 1",
    )
    .await;
    assert_eq!(updated, ["changed"]);
    // A resync request in the spec copies the table again, once.
    pipelines
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"snapshot": {"resync": {"id": "r1", "tables": ["t"]}}}})),
        )
        .await
        .unwrap();
    let again = wait_status(&pipelines, "p", "the table copied again", |s| {
        s.phase.as_deref() == Some("Running")
            && s.snapshots
                .first()
                .is_some_and(|t| t.request == "resync:r1" && t.phase == "Done")
    })
    .await;
    assert_eq!(again.snapshots[0].rows_copied, 20001);
    let copies: Vec<i64> = column(
        &buffer,
        "SELECT count(*) FROM philotes.cdc_events WHERE pipeline = 'snapshot/p' AND operation = 'SNAPSHOT'",
    )
    .await;
    assert_eq!(copies[0], copied + 20001);
    // A row filter put on the table in the spec (PostgreSQL 15+): the publication follows
    // it and the table is copied again, the rows it takes in only.
    if server_version(&db).await >= 150000 {
        pipelines
            .patch(
                "p",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {
                    "source": {"tables": [{"name": "t", "where": "id > 15000"}]},
                    "snapshot": {"resync": null},
                }})),
            )
            .await
            .unwrap();
        let filtered = wait_status(&pipelines, "p", "the table copied under its filter", |s| {
            s.phase.as_deref() == Some("Running")
                && s.snapshots
                    .first()
                    .is_some_and(|t| t.request == "changed" && t.phase == "Done")
        })
        .await;
        assert_eq!(filtered.snapshots[0].rows_copied, 5001);
        let filter: Vec<Option<String>> = column(
            &db,
            "SELECT rowfilter FROM pg_publication_tables WHERE tablename = 't'",
        )
        .await;
        assert_eq!(filter, [Some("(id > 15000)".to_string())]);
    }
    op.stop().await;
}

/// Reconciles counted by the operator's metrics (every result).
fn reconciles(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("philotes_reconciles_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Quiet on the API server. The controller's own status writes do not reconcile the pipeline
/// again: while a trickle of changes makes every refresh write the status, a pipeline is
/// reconciled once per statusInterval, not twice. And with nothing a user would notice
/// changing, nothing is written: while the source writes WAL for other tables only (the
/// slot's positions move, the lag stays under 1 MiB), the status is not patched at all; the
/// next captured change is written within an interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_writes_do_not_trigger_reconciles() {
    let ns = "quiet";
    let (api, _admin, pipelines, db) = one_pipeline_with(ns, json!({"statusInterval": "2s"})).await;
    let op = Operator::start(api, ns, None);
    wait_status(&pipelines, "p", "running", |s| {
        s.phase.as_deref() == Some("Running")
    })
    .await;
    let window = Duration::from_secs(12);
    let writes = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let mut id = 0;
        while started.elapsed() < window {
            id += 1;
            db.execute("INSERT INTO t VALUES ($1)", &[&id])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (id, db)
    });
    let before = reconciles(&op.metrics().await);
    let events_before = pipelines
        .get("p")
        .await
        .unwrap()
        .status
        .unwrap()
        .events_total;
    let mut versions = std::collections::BTreeSet::new();
    let started = std::time::Instant::now();
    while started.elapsed() < window {
        versions.insert(pipelines.get("p").await.unwrap().metadata.resource_version);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = reconciles(&op.metrics().await);
    let (written, db) = writes.await.unwrap();
    let events_after = pipelines
        .get("p")
        .await
        .unwrap()
        .status
        .unwrap()
        .events_total;
    // The status was written throughout (so each write could have reconciled again)...
    assert!(
        versions.len() >= 4 && events_after > events_before,
        "status written {} times, events {events_before:?} -> {events_after:?} ({written} inserts)",
        versions.len()
    );
    // ...and the pipeline was reconciled about once per 2 s interval (6 in 12 s), not after
    // each of its own writes too (about 12).
    let n = after - before;
    assert!(
        n <= 9.0,
        "{n} reconciles in {window:?} with statusInterval 2s"
    );
    // The loop turns: /healthz says so.
    let health = op.get("/healthz").await;
    assert!(health.contains(" 200 "), "{health}");

    // Nothing a user would notice: the source writes WAL, for a table not captured only.
    let total = Some(i64::from(written));
    wait_status(&pipelines, "p", "every insert counted", |s| {
        s.events_total == total && s.lag_bytes.is_some()
    })
    .await;
    db.batch_execute("CREATE TABLE other (id int PRIMARY KEY, pad text)")
        .await
        .unwrap();
    let slot = pipelines
        .get("p")
        .await
        .unwrap()
        .status
        .unwrap()
        .slot_name
        .expect("slot in status");
    // (the source's WAL position, the slot's confirmed position), in bytes.
    let positions = "SELECT (pg_current_wal_lsn() - '0/0')::int8, \
                     (confirmed_flush_lsn - '0/0')::int8 \
                     FROM pg_replication_slots WHERE slot_name = $1";
    let before = db.query_one(positions, &[&slot]).await.unwrap();
    let version = pipelines.get("p").await.unwrap().metadata.resource_version;
    let started = std::time::Instant::now();
    let mut n = 0;
    // Five intervals of 2 s; each a few kilobytes of WAL.
    while started.elapsed() < Duration::from_secs(10) {
        n += 1;
        db.execute(
            "INSERT INTO other SELECT g, repeat('x', 20) FROM generate_series($1::int * 10, $1::int * 10 + 9) g",
            &[&n],
        )
        .await
        .unwrap();
        let now = pipelines.get("p").await.unwrap();
        assert_eq!(
            now.metadata.resource_version, version,
            "the status was written while only other tables changed: {:?}",
            now.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = db.query_one(positions, &[&slot]).await.unwrap();
    // The source did write, and the slot did follow it: an exact copy of the positions in
    // the status would have been rewritten at every interval.
    assert!(
        after.get::<_, i64>(0) > before.get::<_, i64>(0)
            && after.get::<_, i64>(1) > before.get::<_, i64>(1),
        "WAL {} -> {}, slot {} -> {}",
        before.get::<_, i64>(0),
        after.get::<_, i64>(0),
        before.get::<_, i64>(1),
        after.get::<_, i64>(1)
    );
    // A change a user would notice is written.
    db.execute("INSERT INTO t VALUES (0)", &[]).await.unwrap();
    let total = Some(i64::from(written) + 1);
    let s = wait_status(&pipelines, "p", "the next event counted", |s| {
        s.events_total == total
    })
    .await;
    // ...with the exact positions of that moment.
    let confirmed = s
        .confirmed_flush_lsn
        .as_deref()
        .and_then(philotes::pipeline::lsn::parse)
        .expect("confirmedFlushLsn");
    assert!(
        confirmed >= after.get::<_, i64>(1) as u64,
        "status confirmedFlushLsn {confirmed} behind the slot's {}",
        after.get::<_, i64>(1)
    );
    op.stop().await;
}

/// With `--secret-label`, a pipeline may use only Secrets carrying the label: an unlabelled
/// one is refused by name with the command that labels it, and labelling it starts the
/// pipeline (the watch of labelled Secrets' metadata brings the change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_labelled_secrets_are_used_when_the_operator_is_restricted() {
    let ns = "labelled";
    let (api, admin, pipelines, _db) = one_pipeline(ns).await;
    let op = Operator::start_with(api, ns, None, Some("philotes.io/use=true"));
    let refused = wait_status(&pipelines, "p", "the unlabelled secret refused", |s| {
        s.conditions.iter().any(|c| {
            c.type_ == "Ready"
                && c.status == "False"
                && c.message.contains("does not carry the label")
        })
    })
    .await;
    let message = &refused
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message;
    assert!(
        message.contains("secret labelled/p-src")
            && message.contains("kubectl -n labelled label secret p-src philotes.io/use=true"),
        "{message}"
    );
    assert!(
        !message.contains("postgres://"),
        "no secret value in status: {message}"
    );
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    for name in ["p-src", "p-buf"] {
        secrets
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"philotes.io/use": "true"}}})),
            )
            .await
            .unwrap();
    }
    wait_status(
        &pipelines,
        "p",
        "running once the secrets are labelled",
        |s| s.phase.as_deref() == Some("Running"),
    )
    .await;
    op.stop().await;
}
