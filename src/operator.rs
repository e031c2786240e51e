//! `philotes controller`: the operator process. Serves health and metrics, campaigns for the
//! leader lease, and runs the controller only while leading.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::controller::{self, leader};
use crate::http;
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct OperatorOptions {
    pub namespace: Option<String>,
    pub metrics_addr: SocketAddr,
    pub leader_election: bool,
    pub lease_namespace: String,
    pub lease_name: String,
    /// Identity in the Lease; default `$POD_NAME`, else hostname and process id.
    pub identity: Option<String>,
    /// Use only Secrets carrying this label (`--secret-label KEY=VALUE`).
    pub secret_label: Option<crate::controller::refs::SecretLabel>,
}

/// How the process ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Signal received: pipelines flushed, lease released.
    Signalled,
    /// Leadership lost: pipelines stopped; the process should exit so it restarts as a
    /// candidate.
    LostLeadership,
}

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
    let lease = leader::LeaseConfig {
        namespace: opts.lease_namespace.clone(),
        name: opts.lease_name.clone(),
        identity,
        duration: Duration::from_secs(15),
        renew: Duration::from_secs(4),
    };
    let (leader_tx, mut leader_rx) = watch::channel(!opts.leader_election);
    let mut campaign: Option<tokio::task::JoinHandle<()>> = None; // set when campaigning
    if opts.leader_election {
        campaign = Some(tokio::spawn(leader::campaign(
            client.clone(),
            lease.clone(),
            leader_tx,
        )));
        // Standing by is a healthy state: ready as soon as we can reach the API server.
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut stop = stop_rx.clone();
        tracing::info!(lease = %lease.name, identity = %lease.identity, "waiting for leadership");
        tokio::select! {
            r = leader_rx.wait_for(|l| *l) => { r.context("leader election ended")?; }
            _ = stop.wait_for(|s| *s) => {
                if let Some(c) = campaign {
                    c.abort();
                }
                return Ok(Exit::Signalled);
            }
        }
        tracing::info!("leading: starting the controller");
    }

    let lost = Arc::new(AtomicBool::new(false));
    let trigger = {
        let mut stop = stop_rx.clone();
        let mut leader_rx = leader_rx.clone();
        let lost = lost.clone();
        async move {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = leader_rx.wait_for(|l| !*l) => {
                    tracing::warn!("leadership lost: stopping every pipeline");
                    lost.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    };
    controller::run(
        client.clone(),
        controller::Options {
            namespace: opts.namespace.clone(),
            secret_label: opts.secret_label.clone(),
        },
        metrics,
        ready,
        heartbeat,
        trigger,
    )
    .await;
    // Stop campaigning before giving the lease up, or we would take it straight back.
    if let Some(c) = campaign {
        c.abort();
    }
    if lost.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(Exit::LostLeadership);
    }
    if opts.leader_election {
        leader::release(client, &lease).await;
    }
    Ok(Exit::Signalled)
}
