//! One task per pipeline, owned here. Reconcile starts, stops or restarts tasks and reads
//! their progress; it never runs the data loop itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::crd::CheckpointOf;
use crate::metrics::Metrics;
use crate::pipeline::status::{self, Snapshot};
use crate::pipeline::{self, Outcome, PipelineConfig, Progress, RunOptions};

use super::status::Observed;

struct Task {
    /// Identifies the spec and secret values the task runs with.
    fingerprint: u64,
    /// What the task runs.
    cfg: PipelineConfig,
    /// When its resource was created (seconds since the epoch; 0 if unknown): of two
    /// pipelines naming one slot, the one created first keeps it.
    created: i64,
    shutdown: watch::Sender<bool>,
    progress: watch::Receiver<Progress>,
    snapshot: watch::Receiver<Option<Snapshot>>,
    join: Option<JoinHandle<pipeline::Result<Outcome>>>,
    status_task: JoinHandle<()>,
    /// `(reason, message, when)` once the task ended with an error.
    ended: Option<(String, String, Instant)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    AlreadyRunning,
    Started,
    /// The spec or a secret changed: the old task was stopped (flushed) first.
    Restarted,
    /// Nothing started: the operator is stopping ([`Supervisor::stop_all`]).
    Closing,
}

/// How long a pipeline that failed permanently waits before it is tried again with the same
/// spec (the source may have been fixed meanwhile).
pub const FAILED_RETRY: Duration = Duration::from_secs(60);

pub struct Supervisor {
    tasks: Mutex<HashMap<String, Task>>,
    metrics: Arc<Metrics>,
    /// Set by [`Supervisor::stop_all`]: nothing is started any more.
    closed: std::sync::atomic::AtomicBool,
}

impl Supervisor {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            tasks: Mutex::new(HashMap::new()),
            metrics,
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Makes sure a task runs `cfg`; restarts one that runs something else, or that failed
    /// more than [`FAILED_RETRY`] ago. Refused (`Err`, why) when another running pipeline
    /// created earlier streams from the slot `cfg` names on the same source (`host:port/
    /// dbname`; ties: the smaller key): two pipelines on one slot would each get part of the
    /// changes. A running pipeline created later gives the slot up instead: it is stopped
    /// (flushed and confirmed), and its next reconcile finds it refused. Checked and started
    /// under one lock, so two pipelines cannot both start on one slot. Two addresses of one
    /// server are caught when the pipeline starts (the checkpoint's identity, the slot's
    /// position, or PostgreSQL reporting the slot active).
    ///
    /// Tasks this displaces (a restart's old task, pipelines created later on the slot) are
    /// stopped by the new task before it starts streaming, not under the lock: a stop may
    /// take up to [`STOP_WAIT`], and every other reconcile would wait for it.
    pub async fn ensure(
        &self,
        key: &str,
        cfg: PipelineConfig,
        fingerprint: u64,
        created: i64,
    ) -> std::result::Result<Started, String> {
        let mut tasks = self.tasks.lock().await;
        // Read under the lock stop_all takes to set it: a task started here is either
        // stopped by it or not started.
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(Started::Closing);
        }
        let source = cfg.source.to_string();
        let mut later = Vec::new();
        for (other, task) in tasks.iter_mut() {
            if other == key {
                continue;
            }
            reap(task).await;
            if task.ended.is_some() || task.cfg.source.to_string() != source {
                continue;
            }
            if streamed_names(task).0 != cfg.slot {
                continue;
            }
            if (task.created, other.as_str()) <= (created, key) {
                return Err(format!(
                    "CdcPipeline {key} names slot {} on source {source}, which CdcPipeline {other} (created first) streams from: \
                     two pipelines on one slot would each get only part of the changes. Give this one its own spec.source.slot \
                     (or leave it unset for one derived from its namespace and name), or delete one of the two",
                    cfg.slot
                ));
            }
            later.push(other.clone());
        }
        let mut displaced = Vec::new();
        for other in later {
            if let Some(task) = tasks.remove(&other) {
                tracing::warn!(pipeline = %other, slot = %cfg.slot, "CdcPipeline {key}, created earlier, names the same slot: stopping this one");
                self.metrics.forget_pipeline(&other);
                displaced.push(task);
            }
        }
        let mut restarted = false;
        if let Some(task) = tasks.get_mut(key) {
            reap(task).await;
            let stale_failure = task
                .ended
                .as_ref()
                .is_some_and(|(_, _, at)| at.elapsed() >= FAILED_RETRY);
            if task.fingerprint == fingerprint && !stale_failure {
                return Ok(Started::AlreadyRunning);
            }
            if let Some(old) = tasks.remove(key) {
                displaced.push(old);
            }
            restarted = true;
        }
        tasks.insert(
            key.to_string(),
            self.spawn(cfg, fingerprint, created, displaced),
        );
        Ok(if restarted {
            Started::Restarted
        } else {
            Started::Started
        })
    }

    /// Whether a task exists for `key` (running or ended).
    pub async fn has(&self, key: &str) -> bool {
        self.tasks.lock().await.contains_key(key)
    }

    /// Starts a task running `cfg` once the `displaced` tasks have stopped (flushed and
    /// confirmed, or aborted after [`STOP_WAIT`]), so two tasks never stream one slot.
    fn spawn(
        &self,
        cfg: PipelineConfig,
        fingerprint: u64,
        created: i64,
        displaced: Vec<Task>,
    ) -> Task {
        let cfg_kept = cfg.clone();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (progress_tx, progress) = watch::channel(Progress::default());
        let (snapshot_tx, snapshot) = watch::channel(None);
        let status_task = tokio::spawn(status::watch_status(
            cfg.clone(),
            progress.clone(),
            snapshot_tx,
        ));
        let opts = RunOptions {
            until_caught_up: false,
            retry_setup: true,
            observer: Some(self.metrics.clone()),
        };
        let join = tokio::spawn(async move {
            // Aborted while waiting here, the displaced tasks were told to stop already (the
            // first thing `stop_task` does) and finish stopping on their own.
            futures_util::future::join_all(displaced.into_iter().map(stop_task)).await;
            // Stopped itself meanwhile: nothing to set up.
            if *shutdown_rx.borrow() {
                return Ok(Outcome::Stopped);
            }
            pipeline::run(cfg, opts, shutdown_rx, progress_tx).await
        });
        Task {
            fingerprint,
            cfg: cfg_kept,
            created,
            shutdown,
            progress,
            snapshot,
            join: Some(join),
            status_task,
            ended: None,
        }
    }

    /// Stops the pipeline's task, if any, after it flushed and checkpointed.
    pub async fn stop(&self, key: &str) -> bool {
        let task = self.tasks.lock().await.remove(key);
        let stopped = match task {
            Some(t) => {
                stop_task(t).await;
                true
            }
            None => false,
        };
        // After the stop: its last batches would bring the series back.
        self.metrics.forget_pipeline(key);
        stopped
    }

    /// Stops every task, all at once: shutdown takes as long as the slowest pipeline's stop
    /// (at most [`STOP_WAIT`]), not their sum, so it fits in the pod's grace period.
    /// Nothing is started afterwards.
    pub async fn stop_all(&self) {
        let tasks: Vec<Task> = {
            let mut tasks = self.tasks.lock().await;
            self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
            tasks.drain().map(|(_, t)| t).collect()
        };
        futures_util::future::join_all(tasks.into_iter().map(stop_task)).await;
    }

    /// What the task of `key` reports, if one exists.
    pub async fn observe(&self, key: &str) -> Option<Observed> {
        let mut tasks = self.tasks.lock().await;
        let task = tasks.get_mut(key)?;
        reap(task).await;
        let progress = task.progress.borrow().clone();
        let snapshot = task.snapshot.borrow().clone().map(Box::new);
        let ended = task.ended.as_ref().map(|(r, m, _)| (r.clone(), m.clone()));
        Some(Observed::Task {
            progress,
            snapshot,
            ended,
        })
    }

    /// Why `cfg` may not replace what the pipeline's checkpoint belongs to: a checkpoint
    /// belongs to one slot, publication, source and buffer, so a spec or Secret that changes
    /// them is refused. Compared with what a running task that has a checkpoint runs, else
    /// with what the status recorded (`recorded`: the pipeline is suspended, failed, or the
    /// operator restarted). A running task keeps running.
    pub async fn refuses(
        &self,
        key: &str,
        cfg: &PipelineConfig,
        recorded: Option<&CheckpointOf>,
    ) -> Option<String> {
        let running = {
            let mut tasks = self.tasks.lock().await;
            match tasks.get_mut(key) {
                Some(task) => {
                    reap(task).await;
                    (task.ended.is_none() && task.progress.borrow().checkpoint_lsn > 0).then(|| {
                        let (slot, publication) = streamed_names(task);
                        CheckpointOf {
                            slot,
                            publication,
                            ..checkpoint_of(&task.cfg)
                        }
                    })
                }
                None => None,
            }
        };
        let old = running.or_else(|| recorded.cloned())?;
        let changes = identity_changes(&old, cfg);
        (!changes.is_empty()).then(|| {
            format!(
                "CdcPipeline {key}: the pipeline has a checkpoint, and a checkpoint belongs to one slot, publication, source and buffer: \
                 {} refused; the pipeline goes on as before. Revert the change, or move the pipeline (README: Moving a pipeline)",
                changes.join(", ")
            )
        })
    }

    /// The reason the task of `key` ended with, if it ended.
    pub async fn ended(&self, key: &str) -> Option<String> {
        let mut tasks = self.tasks.lock().await;
        let task = tasks.get_mut(key)?;
        reap(task).await;
        task.ended.as_ref().map(|(reason, _, _)| reason.clone())
    }

    pub async fn running(&self) -> Vec<String> {
        self.tasks.lock().await.keys().cloned().collect()
    }
}

/// Collects the result of a task that ended by itself.
async fn reap(task: &mut Task) {
    if !task.join.as_ref().is_some_and(|j| j.is_finished()) {
        return;
    }
    let Some(join) = task.join.take() else {
        return;
    };
    task.status_task.abort();
    task.ended = Some(match join.await {
        Ok(Ok(_)) => (
            "Stopped".into(),
            "the pipeline stopped".into(),
            Instant::now(),
        ),
        Ok(Err(e)) => (e.reason().to_string(), e.to_string(), Instant::now()),
        Err(e) => (
            "Crashed".into(),
            format!("the pipeline task crashed: {e}"),
            Instant::now(),
        ),
    });
}

/// How long a stop waits for a pipeline to flush and confirm before aborting it. Aborting
/// loses nothing: what the buffer did not commit is streamed again from the checkpoint.
/// A shutdown may first wait for a reconcile that is itself stopping a pipeline, then stops
/// every pipeline at once: twice this, plus the lease's release, stays inside the chart's
/// 30 s `terminationGracePeriodSeconds`.
pub const STOP_WAIT: Duration = Duration::from_secs(12);

async fn stop_task(mut task: Task) {
    let _ = task.shutdown.send(true);
    if let Some(join) = task.join.take() {
        // Should this stop itself be dropped before the task ended (the task waiting for it
        // was aborted), the guard aborts the task: a stuck pipeline never outlives the stop
        // that gave up on it. Aborting loses nothing: see STOP_WAIT.
        let mut join = AbortOnDrop(join);
        if tokio::time::timeout(STOP_WAIT, &mut join.0).await.is_err() {
            tracing::warn!(
                pipeline = %task.cfg.id,
                "pipeline did not stop within {STOP_WAIT:?}; aborting it (its checkpoint stays as it was)"
            );
        }
    }
}

/// Aborts the task when dropped (a no-op once it finished).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Drop for Task {
    /// A task dropped is done with: its status poller, and the pipeline if it still runs,
    /// are aborted (a no-op once they finished).
    fn drop(&mut self) {
        self.status_task.abort();
        if let Some(join) = &self.join {
            join.abort();
        }
    }
}

/// What a checkpoint of a pipeline running `cfg` belongs to.
pub fn checkpoint_of(cfg: &PipelineConfig) -> CheckpointOf {
    CheckpointOf {
        source: cfg.source.to_string(),
        buffer: cfg.buffer.to_string(),
        buffer_schema: cfg.buffer_schema.clone(),
        slot: cfg.slot.clone(),
        publication: cfg.publication.clone(),
    }
}

/// The slot and publication a task streams from: those it reported (a checkpointed pipeline
/// keeps the names it recorded), else its spec's.
fn streamed_names(task: &Task) -> (String, String) {
    let p = task.progress.borrow();
    if p.slot.is_empty() {
        (task.cfg.slot.clone(), task.cfg.publication.clone())
    } else {
        (p.slot.clone(), p.publication.clone())
    }
}

/// The fields of `new` that change what a checkpoint of `old` belongs to, described. A slot
/// or publication left to its default is no change: a checkpointed pipeline keeps streaming
/// the names it recorded (README: Upgrading from 0.1); one set explicitly must be those.
pub fn identity_changes(old: &CheckpointOf, new: &PipelineConfig) -> Vec<String> {
    let mut changes = Vec::new();
    let mut check = |field: &str, a: &str, b: &str| {
        if a != b {
            changes.push(format!("changing {field} from {a} to {b}"));
        }
    };
    if new.legacy_slot.is_none() {
        check("spec.source.slot", &old.slot, &new.slot);
    }
    if new.legacy_publication.is_none() {
        check(
            "spec.source.publication",
            &old.publication,
            &new.publication,
        );
    }
    check(
        "the source server (spec.source.connectionSecretRef)",
        &old.source,
        &new.source.to_string(),
    );
    check(
        "the buffer server (spec.buffer.connectionSecretRef)",
        &old.buffer,
        &new.buffer.to_string(),
    );
    check("spec.buffer.schema", &old.buffer_schema, &new.buffer_schema);
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_changes_name_each_field() {
        let old = PipelineConfig::example();
        let of = checkpoint_of(&old);
        assert!(identity_changes(&of, &old).is_empty());
        let mut new = old.clone();
        new.slot = "other".into();
        new.buffer_schema = "events".into();
        new.batch_size = 99;
        assert_eq!(
            identity_changes(&of, &new),
            [
                "changing spec.source.slot from slot to other",
                "changing spec.buffer.schema from philotes to events"
            ]
        );
    }
}
