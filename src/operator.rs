//! `philotes controller`: the operator process. Serves health and metrics, joins the
//! operator's replicas (a Lease each) and runs the controller for its share of the pipelines
//! while it is a member.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::controller::{self, members};
use crate::http;
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct OperatorOptions {
    pub namespace: Option<String>,
    pub metrics_addr: SocketAddr,
    /// Share the pipelines with the other replicas (a Lease per replica); off: this process
    /// runs every pipeline (only ever one replica!).
    pub leader_election: bool,
    pub lease_namespace: String,
    /// The replicas' group: the prefix and label value of their Leases.
    pub lease_name: String,
    /// Identity in the Lease; default `$POD_NAME`, else hostname and process id.
    pub identity: Option<String>,
    /// Use only Secrets carrying this label (`--secret-label KEY=VALUE`).
    pub secret_label: Option<crate::controller::refs::SecretLabel>,
}

/// How the process ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Signal received: pipelines flushed, the replica's Lease deleted.
    Signalled,
    /// Membership lost (its Lease not renewed in time, or taken): pipelines stopped; the
    /// process should exit so it restarts and joins again.
    LostLeadership,
}

/// A replica whose Lease did not change for this long is gone: its pipelines move.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often a replica renews its Lease.
pub const LEASE_RENEW: Duration = Duration::from_secs(4);

pub async fn run(
    opts: OperatorOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Exit> {
    // Before the Kubernetes client: its TLS needs the process's crypto provider.
    crate::pipeline::conn::install_crypto_provider();
    let client = kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    run_with_client(client, opts, shutdown).await
}

/// As [`run`], with a given client.
pub async fn run_with_client(
    client: kube::Client,
    opts: OperatorOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Exit> {
    crate::pipeline::conn::install_crypto_provider();
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let heartbeat = Arc::new(http::Heartbeat::default());
    let health = http::Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
        heartbeat: heartbeat.clone(),
    };
    let addr = opts.metrics_addr;
    tokio::spawn(async move {
        if let Err(e) = http::serve(addr, health).await {
            tracing::error!(error = %e, %addr, "metrics server failed");
        }
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let identity = opts
        .identity
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "philotes".into()),
                std::process::id()
            )
        });
    let group = members::MemberConfig {
        namespace: opts.lease_namespace.clone(),
        group: opts.lease_name.clone(),
        identity: identity.clone(),
        duration: LEASE_DURATION,
        renew: LEASE_RENEW,
    };
    let (members_tx, mut members_rx) = watch::channel(members::Membership::default());
    let mut membership: Option<tokio::task::JoinHandle<()>> = None;
    if opts.leader_election {
        membership = Some(tokio::spawn(members::run(
            client.clone(),
            group.clone(),
            members_tx,
        )));
        // Joining is a healthy state: ready as soon as we can reach the API server.
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut stop = stop_rx.clone();
        tracing::info!(group = %group.group, identity = %group.identity, "joining the operator's replicas");
        tokio::select! {
            r = members_rx.wait_for(|m| m.member) => { r.context("membership ended")?; }
            _ = stop.wait_for(|s| *s) => {
                if let Some(m) = membership {
                    m.abort();
                }
                return Ok(Exit::Signalled);
            }
        }
        tracing::info!("a member: starting the controller");
    }

    let lost = Arc::new(AtomicBool::new(false));
    let trigger = {
        let mut stop = stop_rx.clone();
        let mut members_rx = members_rx.clone();
        let sharded = opts.leader_election;
        let lost = lost.clone();
        async move {
            let gone = async {
                if sharded {
                    let _ = members_rx.wait_for(|m| !m.member).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = gone => {
                    tracing::warn!("membership lost (the member lease was not renewed in time, or taken): stopping every pipeline");
                    lost.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    };
    let shard = opts.leader_election.then(|| controller::Shard {
        identity: identity.clone(),
        members: members_rx.clone(),
    });
    controller::run(
        client.clone(),
        controller::Options {
            namespace: opts.namespace.clone(),
            secret_label: opts.secret_label.clone(),
            shard,
        },
        metrics,
        ready,
        heartbeat,
        trigger,
    )
    .await;
    // Every pipeline is stopped (flushed, confirmed): stop renewing, then leave so the
    // others take over at once.
    if let Some(m) = membership {
        m.abort();
    }
    if lost.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(Exit::LostLeadership);
    }
    if opts.leader_election {
        // Bounded: without an answer the others take over once the Lease expires.
        let _ = tokio::time::timeout(Duration::from_secs(5), members::leave(client, &group)).await;
    }
    Ok(Exit::Signalled)
}
