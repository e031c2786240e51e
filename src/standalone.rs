//! `philotes run -f pipeline.yaml`: one pipeline from a manifest file, no cluster.

use std::path::Path;

use tokio::sync::watch;

use crate::manifest::Manifest;
use crate::pipeline::status::{self, Snapshot};
use crate::pipeline::{self, Error, Outcome, PipelineConfig, Progress, RunOptions};

/// Reads and checks a manifest, resolving the chosen pipeline's secrets from its documents.
pub fn load(path: &Path, pipeline: Option<&str>) -> Result<(Manifest, PipelineConfig), Error> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::InvalidSpec(format!("cannot read {origin}: {e}")))?;
    let manifest = Manifest::parse(&text, &origin)?;
    for skipped in &manifest.skipped {
        tracing::warn!(document = %skipped, "ignoring a document philotes run does not use");
    }
    let cfg = config_of(&manifest, pipeline, &origin)?;
    Ok((manifest, cfg))
}

/// Resolves the chosen pipeline of a parsed manifest.
pub fn config_of(
    manifest: &Manifest,
    pipeline: Option<&str>,
    origin: &str,
) -> Result<PipelineConfig, Error> {
    let p = manifest.pipeline(pipeline, origin)?;
    let ns = p.metadata.namespace.as_deref().unwrap_or("default");
    let name = p.metadata.name.as_deref().unwrap_or_default();
    PipelineConfig::resolve(ns, name, &p.spec, manifest)
}

/// Runs the pipeline until SIGINT/SIGTERM (or until caught up), logging status every
/// `statusInterval`. `json` switches the status lines to structured fields.
pub async fn run(cfg: PipelineConfig, opts: RunOptions) -> Result<Outcome, Error> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; flushing and checkpointing");
        let _ = shutdown_tx.send(true);
    });
    run_with_shutdown(cfg, opts, shutdown_rx).await
}

/// As [`run`], stopping when `shutdown` turns true.
pub async fn run_with_shutdown(
    cfg: PipelineConfig,
    opts: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<Outcome, Error> {
    let (progress_tx, progress_rx) = watch::channel(Progress::default());
    let (status_tx, mut status_rx) = watch::channel::<Option<Snapshot>>(None);
    let status_task = tokio::spawn(status::watch_status(cfg.clone(), progress_rx, status_tx));
    let printer = tokio::spawn(async move {
        while status_rx.changed().await.is_ok() {
            if let Some(s) = status_rx.borrow_and_update().clone() {
                log_status(&s);
            }
        }
    });
    let result = pipeline::run(cfg, opts, shutdown, progress_tx).await;
    status_task.abort();
    printer.abort();
    result
}

fn log_status(s: &Snapshot) {
    tracing::info!(
        target: "philotes::status",
        pipeline = %s.pipeline,
        health = ?s.health,
        reason = %s.reason,
        last_received_lsn = %s.last_received_lsn,
        checkpoint_lsn = %s.checkpoint_lsn,
        current_wal_lsn = s.current_wal_lsn.as_deref().unwrap_or(""),
        lag_bytes = s.lag_bytes.unwrap_or(-1),
        wal_status = s.wal_status.as_deref().unwrap_or(""),
        safe_wal_size_bytes = s.safe_wal_size_bytes.unwrap_or(-1),
        events_total = s.events_total,
        last_checkpoint_time = s.last_checkpoint_time.as_deref().unwrap_or(""),
        "{}",
        s.human_line()
    );
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
