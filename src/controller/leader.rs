//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never stream the same
//! slot. The holder renews every `renew`; a lease not renewed for `duration` may be taken over.
//! Updates use the lease's resourceVersion, so two candidates cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub renew: Duration,
}

/// Campaigns for the lease forever, publishing whether we hold it. Losing it (or failing to
/// renew in time) publishes `false` at once.
pub async fn campaign(client: Client, cfg: LeaseConfig, leader: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        let held = match try_acquire(&api, &cfg).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, lease = %cfg.name, "cannot read or renew the leader lease");
                // Keep leading only while the last renewal is still valid.
                last_renewed.is_some_and(|t| t.elapsed() < cfg.duration - cfg.renew)
            }
        };
        if held {
            last_renewed = Some(tokio::time::Instant::now());
        }
        if *leader.borrow() != held {
            tracing::info!(identity = %cfg.identity, leader = held, "leadership changed");
            let _ = leader.send(held);
        }
        tokio::time::sleep(cfg.renew).await;
    }
}

fn micro_now() -> MicroTime {
    MicroTime(Timestamp::now())
}

async fn try_acquire(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = micro_now();
    let secs = cfg.duration.as_secs().max(1) as i32;
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let ours = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
            let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
                (Some(renewed), Some(d)) => {
                    let age = Timestamp::now().duration_since(renewed.0);
                    age.as_secs() >= i64::from(d)
                }
                _ => true,
            };
            tracing::debug!(holder = ?spec.holder_identity, ours, expired, "lease observed");
            if !ours && !expired && spec.holder_identity.is_some() {
                return Ok(false);
            }
            let mut new = spec.clone();
            if !ours {
                new.acquire_time = Some(now.clone());
                new.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            new.holder_identity = Some(cfg.identity.clone());
            new.lease_duration_seconds = Some(secs);
            new.renew_time = Some(now);
            lease.spec = Some(new);
            // The resourceVersion in `lease` makes this a compare-and-swap.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Gives the lease up (on shutdown), so a standby takes over without waiting for expiry.
pub async fn release(client: Client, cfg: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await {
        if let Some(spec) = lease.spec.as_mut() {
            if spec.holder_identity.as_deref() == Some(cfg.identity.as_str()) {
                // As client-go releases: no holder, a one-second lease.
                spec.holder_identity = None;
                spec.lease_duration_seconds = Some(1);
                spec.renew_time = Some(micro_now());
                match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                    Ok(_) => tracing::info!(lease = %cfg.name, "leader lease released"),
                    Err(e) => {
                        tracing::warn!(lease = %cfg.name, error = %e, "cannot release the leader lease; a standby takes over when it expires")
                    }
                }
            }
        }
    }
}
