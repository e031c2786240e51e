//! From what the supervisor observes to the resource's status: phase, the `Ready` condition
//! and the numbers. Pure functions, so every mapping has a unit test.

use crate::crd::{CdcPipelineStatus, CheckpointOf, Condition, TableSnapshotStatus};
use crate::pipeline::snapshot::Phase;
use crate::pipeline::status::{Health, Snapshot};
use crate::pipeline::{lsn, Progress, State};

/// What the controller knows about a pipeline at one reconcile.
#[derive(Debug, Clone)]
pub enum Observed {
    /// Suspended by the spec: the task is stopped, the slot kept.
    Suspended,
    /// The spec or its secrets are unusable: `(reason, message)`.
    Invalid(String, String),
    /// A task runs (or ended with an error).
    Task {
        progress: Progress,
        snapshot: Option<Box<Snapshot>>,
        /// `(reason, message)` of the error that ended it.
        ended: Option<(String, String)>,
    },
}

pub struct Inputs<'a> {
    pub generation: Option<i64>,
    pub slot: Option<&'a str>,
    pub publication: Option<&'a str>,
    pub observed: &'a Observed,
    pub previous: Option<&'a CdcPipelineStatus>,
    pub now: &'a str,
    /// Why the current spec was not applied (the task keeps running the previous one).
    pub refused: Option<&'a str>,
    /// A `philotes.io/recover` request acted on in this reconcile.
    pub recovered: Option<&'a str>,
    /// What the running task's checkpoint belongs to, once it has one.
    pub checkpoint_of: Option<CheckpointOf>,
}

/// The status to write. Transition times are kept when a condition did not change.
pub fn compute(i: &Inputs<'_>) -> CdcPipelineStatus {
    let (phase, ready, reason, message) = match i.observed {
        Observed::Suspended => (
            "Suspended",
            false,
            "Suspended".to_string(),
            "spec.suspend is true: streaming is stopped and the slot kept (the source retains WAL for it)"
                .to_string(),
        ),
        Observed::Invalid(reason, message) => ("Failed", false, reason.clone(), message.clone()),
        Observed::Task {
            progress,
            snapshot,
            ended,
        } => match (ended, progress.state) {
            (Some((reason, message)), _) => ("Failed", false, reason.clone(), message.clone()),
            (None, State::Starting) => (
                "Provisioning",
                false,
                "Provisioning".into(),
                "checking the source, creating or adopting publication and slot, connecting".into(),
            ),
            (None, State::Retrying) => {
                let (reason, message) = progress
                    .last_error
                    .clone()
                    .unwrap_or_else(|| ("Retrying".into(), "retrying".into()));
                ("Degraded", false, reason, format!("retrying: {message}"))
            }
            (None, State::Failed) => {
                let (reason, message) = progress
                    .last_error
                    .clone()
                    .unwrap_or_else(|| ("Failed".into(), "the pipeline failed".into()));
                ("Failed", false, reason, message)
            }
            (None, State::Stopped) => (
                "Pending",
                false,
                "Stopped".into(),
                "the pipeline is not running".into(),
            ),
            (None, State::Streaming) => match snapshot {
                Some(s) if s.health == Health::Healthy => {
                    ("Running", true, s.reason.clone(), s.message.clone())
                }
                Some(s) if s.health == Health::Failed => {
                    ("Failed", false, s.reason.clone(), s.message.clone())
                }
                Some(s) if s.health == Health::Degraded => {
                    ("Degraded", false, s.reason.clone(), s.message.clone())
                }
                _ => (
                    "Running",
                    true,
                    "Streaming".into(),
                    "streaming changes".into(),
                ),
            },
        },
    };
    // A failed pipeline being started again (a minute later, or after a change) shows its
    // failure while the attempt starts: a pipeline failing in a loop does not flap Ready (and
    // publish two Events) at every attempt. Whatever the attempt then does shows: streaming,
    // failing, or retrying an error of its own.
    let attempt = matches!(
        i.observed,
        Observed::Task { progress, ended: None, .. } if progress.state == State::Starting
    );
    let failed_before = i
        .previous
        .filter(|p| p.phase.as_deref() == Some("Failed"))
        .and_then(self::ready);
    let (phase, reason, message) = match failed_before {
        Some(c) if attempt => ("Failed", c.reason.clone(), c.message.clone()),
        _ => (phase, reason, message),
    };
    let mut status = CdcPipelineStatus {
        phase: Some(phase.to_string()),
        observed_generation: i.generation,
        slot_name: i.slot.map(str::to_string),
        publication_name: i.publication.map(str::to_string),
        // Written by the handover only (see `owner_params` in the controller): kept as read.
        owner: i.previous.and_then(|p| p.owner.clone()),
        ..CdcPipelineStatus::default()
    };
    // Keep the last known numbers while the task is not reporting.
    if let Some(prev) = i.previous {
        status.events_total = prev.events_total;
        status.last_checkpoint_time = prev.last_checkpoint_time.clone();
        status.confirmed_flush_lsn = prev.confirmed_flush_lsn.clone();
        status.last_received_lsn = prev.last_received_lsn.clone();
        status.recover_request = prev.recover_request.clone();
        status.checkpoint_of = prev.checkpoint_of.clone();
        status.snapshots = prev.snapshots.clone();
    }
    if let Some(of) = &i.checkpoint_of {
        status.checkpoint_of = Some(of.clone());
    }
    if let Some(request) = i.recovered {
        status.recover_request = Some(request.to_string());
    }
    if let Observed::Task {
        progress, snapshot, ..
    } = i.observed
    {
        if progress.received_lsn > 0 {
            status.last_received_lsn = Some(lsn::format(progress.received_lsn));
        }
        if !progress.snapshots.is_empty() {
            status.snapshots = progress
                .snapshots
                .iter()
                .map(|t| TableSnapshotStatus {
                    table: t.table.clone(),
                    phase: t.phase.as_str().to_string(),
                    rows_copied: t.rows_copied,
                    rows_estimate: t.rows_estimate,
                    request: t.request.clone(),
                })
                .collect();
        }
        // Before the task has read its checkpoint it knows no totals: keep the last ones.
        if progress.checkpoint_lsn > 0 {
            status.events_total = Some(progress.events_total);
        }
        if let Some(t) = progress.last_checkpoint_time {
            status.last_checkpoint_time =
                Some(chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339());
        }
        if let Some(s) = snapshot {
            status.confirmed_flush_lsn = s.confirmed_flush_lsn.clone();
            status.current_wal_lsn = s.current_wal_lsn.clone();
            status.lag_bytes = s.lag_bytes;
            status.wal_status = s.wal_status.clone();
            status.safe_wal_size_bytes = s.safe_wal_size_bytes;
            status.invalidation_reason = s.invalidation_reason.clone();
            status.inactive_since = s.inactive_since.clone();
        }
    }
    status.conditions = vec![ready_condition(
        i.previous,
        ready,
        reason,
        message,
        i.generation,
        i.now,
    )];
    if let Some(c) = snapshotting_condition(&status, i.previous, i.generation, i.now) {
        if c.status == "True" && phase == "Running" {
            status.phase = Some("Snapshotting".into());
        }
        status.conditions.push(c);
    }
    if let Some(message) = i.refused {
        let last_transition_time = match i.previous.and_then(refusal) {
            Some(c) => c.last_transition_time.clone(),
            None => i.now.to_string(),
        };
        status.conditions.push(Condition {
            type_: SPEC_ACCEPTED.into(),
            status: "False".into(),
            reason: "IdentityChangeRefused".into(),
            message: message.to_string(),
            last_transition_time,
            observed_generation: i.generation,
        });
    }
    status
}

/// `Snapshotting`: True while a table's existing rows are being copied (the pipeline streams
/// meanwhile), False once every table is copied; absent for a pipeline without snapshots.
fn snapshotting_condition(
    status: &CdcPipelineStatus,
    previous: Option<&CdcPipelineStatus>,
    generation: Option<i64>,
    now: &str,
) -> Option<Condition> {
    // Nothing copied at all (every table captured without a snapshot): no condition.
    if status
        .snapshots
        .iter()
        .all(|t| t.phase == Phase::Skipped.as_str())
    {
        return None;
    }
    let copying: Vec<String> = status
        .snapshots
        .iter()
        .filter(|t| t.phase == Phase::Pending.as_str() || t.phase == Phase::Copying.as_str())
        .map(|t| match t.rows_estimate {
            Some(e) => format!("{} ({} of about {e} rows)", t.table, t.rows_copied),
            None => format!("{} ({} rows)", t.table, t.rows_copied),
        })
        .collect();
    let (state, reason, message) = if copying.is_empty() {
        (
            "False",
            "SnapshotsDone",
            "every table's existing rows are copied".to_string(),
        )
    } else {
        (
            "True",
            "Copying",
            format!(
                "copying existing rows while streaming: {}",
                copying.join(", ")
            ),
        )
    };
    let last_transition_time =
        match previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == SNAPSHOTTING)) {
            Some(c) if c.status == state => c.last_transition_time.clone(),
            _ => now.to_string(),
        };
    Some(Condition {
        type_: SNAPSHOTTING.into(),
        status: state.into(),
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: generation,
    })
}

/// The condition set while existing rows are copied.
pub const SNAPSHOTTING: &str = "Snapshotting";

/// The condition set while a spec change is refused.
pub const SPEC_ACCEPTED: &str = "SpecAccepted";

/// The `SpecAccepted` condition of a status, present only while a change is refused.
pub fn refusal(status: &CdcPipelineStatus) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == SPEC_ACCEPTED)
}

/// The `Ready` condition; its transition time is the previous one's while the status (True
/// or False) stays the same, else `now`.
pub fn ready_condition(
    previous: Option<&CdcPipelineStatus>,
    ready_now: bool,
    reason: String,
    message: String,
    generation: Option<i64>,
    now: &str,
) -> Condition {
    let status = if ready_now { "True" } else { "False" };
    let last_transition_time = match previous.and_then(ready) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now.to_string(),
    };
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason,
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// What of a status a user would notice changing: the status is written only when this
/// differs from the one last written (issue: quiet on the API server). Positions that move
/// with every byte of WAL the source writes (`lastReceivedLsn`, `confirmedFlushLsn`,
/// `currentWalLsn`, `lastCheckpointTime`) do not count on their own, and `lagBytes` and
/// `safeWalSizeBytes` count by [`bucket`]. Counters (`eventsTotal`, rows copied), the phase,
/// the conditions and the slot's state count as they are. Each write carries the exact
/// current values of every field; the metrics are refreshed at every reconcile.
pub fn visible(status: &CdcPipelineStatus) -> CdcPipelineStatus {
    CdcPipelineStatus {
        last_received_lsn: None,
        confirmed_flush_lsn: None,
        current_wal_lsn: None,
        last_checkpoint_time: None,
        // Written by the handover, not with the rest (see `owner_params`).
        owner: None,
        lag_bytes: status.lag_bytes.map(bucket),
        safe_wal_size_bytes: status.safe_wal_size_bytes.map(bucket),
        ..status.clone()
    }
}

/// What this replica keeps per pipeline (by UID) beside the watch's copy: the status it last
/// wrote (the copy lags behind the writes, by more than a second with hundreds of pipelines
/// starting at once, and a status compared only with it would be judged unchanged against
/// one already replaced), and the pipelines it claimed. Forgotten when the pipeline is
/// handed over or deleted.
pub struct PerPipeline<V>(std::sync::Mutex<std::collections::HashMap<String, V>>);

impl<V> Default for PerPipeline<V> {
    fn default() -> Self {
        PerPipeline(std::sync::Mutex::default())
    }
}

impl<V: Clone> PerPipeline<V> {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, V>> {
        // A panic while holding the lock leaves a map still usable.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, uid: &str) -> Option<V> {
        self.map().get(uid).cloned()
    }

    pub fn set(&self, uid: &str, value: V) {
        self.map().insert(uid.to_string(), value);
    }

    pub fn forget(&self, uid: &str) {
        self.map().remove(uid);
    }

    /// Keeps only the pipelines for which `keep` holds.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.map().retain(|uid, _| keep(uid));
    }
}

/// Whether `status` is to be written: something a user would notice differs from the copy
/// the watch has (`seen`: a user or another writer may have changed it) or from what this
/// replica last wrote (`written`: the watch may not have caught up with it yet).
pub fn to_write(
    status: &CdcPipelineStatus,
    seen: Option<&CdcPipelineStatus>,
    written: Option<&CdcPipelineStatus>,
) -> bool {
    let now = visible(status);
    seen.map(visible).as_ref() != Some(&now) || written.is_some_and(|w| visible(w) != now)
}

/// A byte count by order of magnitude: 0 below 1 MiB, then one step per factor of 4
/// (1 MiB, 4 MiB, 16 MiB, …, 1 GiB, 4 GiB, …). A lag growing from nothing to 64 GiB is
/// written 9 times; one wandering within a few kilobytes of caught up, never.
pub fn bucket(bytes: i64) -> i64 {
    let mib = bytes.max(0) >> 20;
    if mib == 0 {
        0
    } else {
        i64::from(63 - mib.leading_zeros()) / 2 + 1
    }
}

/// The current time as conditions record it.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The `Ready` condition of a status.
pub fn ready(status: &CdcPipelineStatus) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == "Ready")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_behind_the_last_write_does_not_hide_a_change() {
        let running = CdcPipelineStatus {
            phase: Some("Running".into()),
            ..CdcPipelineStatus::default()
        };
        let provisioning = CdcPipelineStatus {
            phase: Some("Provisioning".into()),
            ..CdcPipelineStatus::default()
        };
        // The watch still shows Running from before a handover; this replica wrote
        // Provisioning since: Running again is a change.
        assert!(to_write(&running, Some(&running), Some(&provisioning)));
        // Caught up, or nothing written by this replica yet: only a difference counts.
        assert!(!to_write(&running, Some(&running), Some(&running)));
        assert!(!to_write(&running, Some(&running), None));
        assert!(to_write(&running, Some(&provisioning), None));
        assert!(to_write(&running, None, None));
        // Someone else cleared or changed what this replica wrote: written again.
        assert!(to_write(&running, Some(&provisioning), Some(&running)));
    }

    #[test]
    fn a_failed_pipeline_tried_again_does_not_flap() {
        let failed = Observed::Task {
            progress: Progress::default(),
            snapshot: None,
            ended: Some(("SlotLost".into(), "slot philotes_x is missing".into())),
        };
        let s = compute(&inputs(&failed, None, "t1"));
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        // Tried again a minute later: while it starts, nothing to write.
        let again = Observed::Task {
            progress: Progress::default(),
            snapshot: None,
            ended: None,
        };
        let s2 = compute(&inputs(&again, Some(&s), "t2"));
        assert_eq!(visible(&s2), visible(&s), "nothing to write");
        // An error of its own (the user fixed the cause, the source is down now) shows.
        let retrying = Observed::Task {
            progress: Progress {
                state: State::Retrying,
                last_error: Some(("SourceUnreachable".into(), "connection refused".into())),
                ..Progress::default()
            },
            snapshot: None,
            ended: None,
        };
        let s2 = compute(&inputs(&retrying, Some(&s), "t2"));
        assert_eq!(s2.phase.as_deref(), Some("Degraded"));
        assert_eq!(ready(&s2).unwrap().reason, "SourceUnreachable");
        // Streaming again, it shows.
        let streaming = Observed::Task {
            progress: Progress {
                state: State::Streaming,
                ..Progress::default()
            },
            snapshot: None,
            ended: None,
        };
        let s3 = compute(&inputs(&streaming, Some(&s), "t3"));
        assert_eq!(s3.phase.as_deref(), Some("Running"));
        // And a pipeline that was not failed shows Provisioning as before.
        let starting = Observed::Task {
            progress: Progress::default(),
            snapshot: None,
            ended: None,
        };
        let s4 = compute(&inputs(&starting, Some(&s3), "t4"));
        assert_eq!(s4.phase.as_deref(), Some("Provisioning"));
    }

    #[test]
    fn lag_counts_by_order_of_magnitude() {
        let mib = 1 << 20;
        assert_eq!(bucket(-5), 0);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(mib - 1), 0);
        assert_eq!(bucket(mib), 1);
        assert_eq!(bucket(4 * mib - 1), 1);
        assert_eq!(bucket(4 * mib), 2);
        assert_eq!(bucket(1 << 30), 6);
        assert_eq!(bucket(64 << 30), 9);
        assert_eq!(bucket(i64::MAX), 22);
    }

    #[test]
    fn moving_positions_alone_are_not_a_visible_change() {
        let written = CdcPipelineStatus {
            phase: Some("Running".into()),
            confirmed_flush_lsn: Some("0/1000".into()),
            current_wal_lsn: Some("0/1800".into()),
            last_received_lsn: Some("0/1000".into()),
            lag_bytes: Some(0x800),
            events_total: Some(7),
            last_checkpoint_time: Some("2026-01-01T00:00:00Z".into()),
            ..CdcPipelineStatus::default()
        };
        // The source wrote WAL for other tables, and the slot followed it.
        let mut now = written.clone();
        now.confirmed_flush_lsn = Some("0/9000".into());
        now.current_wal_lsn = Some("0/9100".into());
        now.last_received_lsn = Some("0/9000".into());
        now.lag_bytes = Some(0x100);
        now.last_checkpoint_time = Some("2026-01-01T00:00:10Z".into());
        assert_eq!(visible(&written), visible(&now));
        // One more event, or a lag past 1 MiB, is.
        let mut more = now.clone();
        more.events_total = Some(8);
        assert_ne!(visible(&written), visible(&more));
        let mut behind = now;
        behind.lag_bytes = Some(3 << 20);
        assert_ne!(visible(&written), visible(&behind));
    }

    fn inputs<'a>(
        o: &'a Observed,
        prev: Option<&'a CdcPipelineStatus>,
        now: &'a str,
    ) -> Inputs<'a> {
        Inputs {
            generation: Some(3),
            slot: Some("s"),
            publication: Some("p"),
            observed: o,
            previous: prev,
            now,
            refused: None,
            recovered: None,
            checkpoint_of: None,
        }
    }

    #[test]
    fn phases_follow_the_task() {
        let streaming = Observed::Task {
            progress: Progress {
                state: State::Streaming,
                events_total: 5,
                checkpoint_lsn: 100,
                ..Progress::default()
            },
            snapshot: None,
            ended: None,
        };
        let s = compute(&inputs(&streaming, None, "t1"));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(ready(&s).unwrap().status, "True");
        assert_eq!(s.events_total, Some(5));
        assert_eq!(s.observed_generation, Some(3));

        let retrying = Observed::Task {
            progress: Progress {
                state: State::Retrying,
                last_error: Some(("BufferError".into(), "buffer down".into())),
                ..Progress::default()
            },
            snapshot: None,
            ended: None,
        };
        let s2 = compute(&inputs(&retrying, Some(&s), "t2"));
        assert_eq!(s2.phase.as_deref(), Some("Degraded"));
        let c = ready(&s2).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "BufferError")
        );
        assert_eq!(c.last_transition_time, "t2");
        assert_eq!(s2.events_total, Some(5), "kept until the new session knows");

        let ended = Observed::Task {
            progress: Progress::default(),
            snapshot: None,
            ended: Some(("AuthenticationFailed".into(), "bad password".into())),
        };
        let s3 = compute(&inputs(&ended, Some(&s2), "t3"));
        assert_eq!(s3.phase.as_deref(), Some("Failed"));
        // Still False: the transition time stays at the first failure.
        assert_eq!(ready(&s3).unwrap().last_transition_time, "t2");
        assert_eq!(ready(&s3).unwrap().reason, "AuthenticationFailed");

        let s4 = compute(&inputs(&Observed::Suspended, Some(&s3), "t4"));
        assert_eq!(s4.phase.as_deref(), Some("Suspended"));
        assert_eq!(
            s4.events_total, s3.events_total,
            "numbers kept while suspended"
        );
    }
}
