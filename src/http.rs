//! `/metrics`, `/healthz` and `/readyz`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// Set once the controller can talk to the API server.
    pub ready: Arc<AtomicBool>,
    /// Whether the reconcile loop still turns.
    pub heartbeat: Arc<Heartbeat>,
}

/// Whether the controller's reconcile loop still turns. Every pipeline asks to be reconciled
/// again after its `statusInterval`, so while pipelines exist the loop turns at least that
/// often; one that has not turned for [`WEDGED_AFTER_INTERVALS`] of the shortest interval
/// (and at least [`WEDGED_MIN`]) is wedged, and `/healthz` fails so the kubelet restarts the
/// pod (another replica takes over meanwhile).
#[derive(Default)]
pub struct Heartbeat {
    inner: Mutex<Beats>,
}

#[derive(Default)]
struct Beats {
    last: Option<Instant>,
    /// Each pipeline's requeue interval.
    intervals: HashMap<String, Duration>,
}

pub const WEDGED_AFTER_INTERVALS: u32 = 5;
pub const WEDGED_MIN: Duration = Duration::from_secs(60);

impl Heartbeat {
    /// A reconcile of `pipeline` began; it asks to be reconciled again within `interval`.
    pub fn turned(&self, pipeline: &str, interval: Duration, now: Instant) {
        if let Ok(mut b) = self.inner.lock() {
            b.last = Some(now);
            b.intervals.insert(pipeline.to_string(), interval);
        }
    }

    /// Keeps only the pipelines that still exist (one deleted before it was ever seen
    /// deleting asks for nothing).
    pub fn retain(&self, exists: impl Fn(&str) -> bool) {
        if let Ok(mut b) = self.inner.lock() {
            b.intervals.retain(|k, _| exists(k));
        }
    }

    /// `pipeline` is gone: it no longer asks to be reconciled.
    pub fn forget(&self, pipeline: &str) {
        if let Ok(mut b) = self.inner.lock() {
            b.intervals.remove(pipeline);
        }
    }

    /// Why the loop is taken for wedged at `now`, if it is.
    pub fn wedged(&self, now: Instant) -> Option<String> {
        let b = self.inner.lock().ok()?;
        let shortest = b.intervals.values().min()?;
        let allowed = (*shortest * WEDGED_AFTER_INTERVALS).max(WEDGED_MIN);
        let since = now.saturating_duration_since(b.last?);
        (since > allowed).then(|| {
            format!(
                "the reconcile loop has not turned for {}s (pipelines ask for it every {}s)",
                since.as_secs(),
                shortest.as_secs_f64()
            )
        })
    }
}

pub async fn serve(addr: SocketAddr, health: Health) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.metrics.encode(),
    )
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn healthz(State(h): State<Health>) -> impl IntoResponse {
    match h.heartbeat.wedged(Instant::now()) {
        None => (StatusCode::OK, "ok".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_turning_is_wedged_after_five_intervals() {
        let h = Heartbeat::default();
        let t0 = Instant::now();
        assert_eq!(
            h.wedged(t0 + Duration::from_secs(3600)),
            None,
            "no pipeline: nothing expected"
        );
        h.turned("a/slow", Duration::from_secs(60), t0);
        h.turned("a/fast", Duration::from_secs(30), t0);
        // The shortest interval decides: 5 x 30 s.
        assert_eq!(h.wedged(t0 + Duration::from_secs(150)), None);
        let why = h.wedged(t0 + Duration::from_secs(151)).expect("wedged");
        assert!(why.contains("151s"), "{why}");
        // Turning again heals it.
        h.turned(
            "a/slow",
            Duration::from_secs(60),
            t0 + Duration::from_secs(151),
        );
        assert_eq!(h.wedged(t0 + Duration::from_secs(152)), None);
        // Short intervals are given at least a minute.
        h.turned(
            "a/fast",
            Duration::from_secs(1),
            t0 + Duration::from_secs(200),
        );
        assert_eq!(h.wedged(t0 + Duration::from_secs(259)), None);
        assert!(h.wedged(t0 + Duration::from_secs(261)).is_some());
        // Deleted pipelines expect nothing.
        h.forget("a/fast");
        h.retain(|k| k != "a/slow");
        assert_eq!(h.wedged(t0 + Duration::from_secs(10_000)), None);
    }
}
