//! The pipeline's status as the operator reports it: positions, lag, slot health, and a
//! verdict with a reason. [`assess`] is pure; [`watch_status`] refreshes it on a timer.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use super::config::PipelineConfig;
use super::lsn;
use super::run::{Progress, State};
use super::snapshot::Phase;
use super::source::{self, SlotStats};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Health {
    Starting,
    Healthy,
    Degraded,
    Failed,
    Stopped,
}

/// One status refresh.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub pipeline: String,
    pub health: Health,
    pub reason: String,
    pub message: String,
    pub slot_name: String,
    pub publication_name: String,
    pub last_received_lsn: String,
    pub checkpoint_lsn: String,
    pub confirmed_flush_lsn: Option<String>,
    pub current_wal_lsn: Option<String>,
    pub lag_bytes: Option<i64>,
    pub wal_status: Option<String>,
    pub safe_wal_size_bytes: Option<i64>,
    /// Why the server invalidated the slot (PostgreSQL 17+).
    pub invalidation_reason: Option<String>,
    /// Since when no session streams from the slot (PostgreSQL 17+).
    pub inactive_since: Option<String>,
    pub events_total: i64,
    pub last_checkpoint_time: Option<String>,
    /// Tables whose existing rows are being copied: `schema.table phase copied/estimate`.
    pub snapshots: Vec<String>,
    #[serde(skip)]
    checkpoint_raw: u64,
    /// Consecutive refreshes with lag but no checkpoint progress.
    #[serde(skip)]
    stalled_refreshes: u32,
}

impl Snapshot {
    /// A compact line for people: `shop/orders Healthy (Streaming): lag 0 B, 1200 events, ...`.
    pub fn human_line(&self) -> String {
        let lag = self
            .lag_bytes
            .map(|b| format!("{b} B"))
            .unwrap_or_else(|| "?".into());
        let copying = if self.snapshots.is_empty() {
            String::new()
        } else {
            format!(", snapshot: {}", self.snapshots.join(", "))
        };
        format!(
            "{} {:?} ({}): lag {lag}, {} events, received {}, checkpointed {}, source {}, slot {} wal_status {}{copying}",
            self.pipeline,
            self.health,
            self.reason,
            self.events_total,
            self.last_received_lsn,
            self.checkpoint_lsn,
            self.current_wal_lsn.as_deref().unwrap_or("?"),
            self.slot_name,
            self.wal_status.as_deref().unwrap_or("?"),
        )
    }

    /// The snapshot part of the status: tables still being copied.
    pub fn snapshots_of(progress: &Progress) -> Vec<String> {
        progress
            .snapshots
            .iter()
            .filter(|t| matches!(t.phase, Phase::Pending | Phase::Copying))
            .map(|t| {
                format!(
                    "{} {} {}/{}",
                    t.table,
                    t.phase.as_str(),
                    t.rows_copied,
                    t.rows_estimate.map_or("?".to_string(), |e| e.to_string())
                )
            })
            .collect()
    }
}

/// Combines the loop's progress with the slot's statistics (`None` when the source could not
/// be asked) into a verdict. `prev` is the previous refresh, for stall detection.
pub fn assess(
    cfg: &PipelineConfig,
    progress: &Progress,
    stats: Option<&SlotStats>,
    prev: Option<&Snapshot>,
) -> Snapshot {
    let lag_bytes = stats.and_then(|s| {
        s.confirmed_flush_lsn
            .map(|c| s.current_wal_lsn.saturating_sub(c) as i64)
    });
    let advanced = prev.is_none_or(|p| progress.checkpoint_lsn > p.checkpoint_raw);
    let stalled_refreshes =
        if progress.state == State::Streaming && !advanced && lag_bytes.unwrap_or(0) > 0 {
            prev.map_or(0, |p| p.stalled_refreshes) + 1
        } else {
            0
        };
    let error = progress
        .last_error
        .clone()
        .unwrap_or_else(|| ("Unknown".into(), "no error recorded".into()));
    let risk = stats.and_then(|s| wal_risk(cfg, s));
    let (health, reason, message) = match progress.state {
        State::Failed => (Health::Failed, error.0, error.1),
        // While it retries the slot keeps WAL: say when that puts the slot at risk.
        State::Retrying => (
            Health::Degraded,
            error.0,
            match &risk {
                Some(r) => format!("retrying: {}; {r}", error.1),
                None => format!("retrying: {}", error.1),
            },
        ),
        State::Stopped => (Health::Stopped, "Stopped".into(), "the pipeline is not running".into()),
        State::Starting => (Health::Starting, "Starting".into(), "provisioning and connecting".into()),
        State::Streaming => match stats {
            None => (
                Health::Degraded,
                "SourceUnreachable".into(),
                "the source did not answer the status query".into(),
            ),
            Some(s) if s.wal_status.as_deref() == Some("lost") => (
                Health::Failed,
                "WalLost".into(),
                format!(
                    "slot {} was invalidated{}; changes were lost on the source",
                    cfg.slot,
                    match &s.invalidation_reason {
                        Some(r) => format!(" ({r})"),
                        None => " (it lost WAL it needed)".into(),
                    }
                ),
            ),
            Some(s) if s.confirmed_flush_lsn.is_none() => (
                Health::Failed,
                "SlotMissing".into(),
                format!("slot {} no longer exists on the source", cfg.slot),
            ),
            Some(_) if risk.is_some() => (
                Health::Degraded,
                "WalAtRisk".into(),
                risk.clone().unwrap_or_default(),
            ),
            Some(_) if stalled_refreshes >= 2 => (
                Health::Degraded,
                "Stalled".into(),
                format!(
                    "no checkpoint progress over the last {stalled_refreshes} status intervals while the source is {} bytes ahead",
                    lag_bytes.unwrap_or(0)
                ),
            ),
            Some(_) => (Health::Healthy, "Streaming".into(), "streaming changes".into()),
        },
    };
    Snapshot {
        pipeline: cfg.id.clone(),
        health,
        reason,
        message,
        slot_name: cfg.slot.clone(),
        publication_name: cfg.publication.clone(),
        last_received_lsn: lsn::format(progress.received_lsn),
        checkpoint_lsn: lsn::format(progress.checkpoint_lsn),
        confirmed_flush_lsn: stats.and_then(|s| s.confirmed_flush_lsn).map(lsn::format),
        current_wal_lsn: stats.map(|s| lsn::format(s.current_wal_lsn)),
        lag_bytes,
        wal_status: stats.and_then(|s| s.wal_status.clone()),
        safe_wal_size_bytes: stats.and_then(|s| s.safe_wal_size),
        invalidation_reason: stats.and_then(|s| s.invalidation_reason.clone()),
        inactive_since: stats.and_then(|s| s.inactive_since.clone()),
        events_total: progress.events_total,
        last_checkpoint_time: progress
            .last_checkpoint_time
            .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339()),
        checkpoint_raw: progress.checkpoint_lsn,
        stalled_refreshes,
        snapshots: Snapshot::snapshots_of(progress),
    }
}

/// The share of `max_slot_wal_keep_size` (or of `idle_replication_slot_timeout`) left below
/// which a slot is reported at risk.
const RISK_SHARE: f64 = 0.2;

/// Why the slot may soon be invalidated, if it may: the WAL it can still take before
/// `max_slot_wal_keep_size` is reached is below a fifth of it, or it has been inactive for
/// more than four fifths of `idle_replication_slot_timeout` (PostgreSQL 18).
pub fn wal_risk(cfg: &PipelineConfig, s: &SlotStats) -> Option<String> {
    if s.confirmed_flush_lsn.is_none() || s.wal_status.as_deref() == Some("lost") {
        return None;
    }
    if let (Some(safe), Some(limit)) = (s.safe_wal_size, s.max_slot_wal_keep_size) {
        if (safe as f64) < limit as f64 * RISK_SHARE {
            return Some(format!(
                "slot {} can take {safe} more bytes of WAL before max_slot_wal_keep_size ({limit} bytes) invalidates it; \
                 the pipeline must catch up (or raise the limit)",
                cfg.slot
            ));
        }
    }
    if s.wal_status.as_deref() == Some("unreserved") {
        return Some(format!(
            "slot {} holds more WAL than max_slot_wal_keep_size allows; it will be lost unless the pipeline catches up",
            cfg.slot
        ));
    }
    if let (false, Some(idle), Some(timeout)) =
        (s.active, s.inactive_seconds, s.idle_timeout_seconds)
    {
        if idle as f64 > timeout as f64 * (1.0 - RISK_SHARE) {
            return Some(format!(
                "slot {} has been inactive for {idle} s; idle_replication_slot_timeout ({timeout} s) invalidates it at {timeout} s",
                cfg.slot
            ));
        }
    }
    None
}

/// Refreshes the status every `statusInterval` until `progress` closes, publishing each
/// snapshot. The source is asked over a connection of its own, so a slow status query never
/// holds the stream up.
pub async fn watch_status(
    mut cfg: PipelineConfig,
    progress: watch::Receiver<Progress>,
    out: watch::Sender<Option<Snapshot>>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut prev: Option<Snapshot> = None;
    let mut tick = tokio::time::interval(cfg.status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The pipeline is gone once its progress sender is dropped.
        if progress.has_changed().is_err() {
            return;
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = tokio::time::timeout(Duration::from_secs(10), cfg.source.connect("source"))
                .await
                .ok()
                .and_then(|r| r.ok());
        }
        let current = progress.borrow().clone();
        // The names the pipeline actually streams from (kept from its checkpoint).
        if !current.slot.is_empty() {
            cfg.slot.clone_from(&current.slot);
            cfg.publication.clone_from(&current.publication);
        }
        let stats = match &client {
            Some(c) => {
                tokio::time::timeout(Duration::from_secs(10), source::slot_stats(c, &cfg.slot))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
            }
            None => None,
        };
        let snapshot = assess(&cfg, &current, stats.as_ref(), prev.as_ref());
        prev = Some(snapshot.clone());
        if out.send(Some(snapshot)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PipelineConfig {
        PipelineConfig::example()
    }

    fn stats(current: u64, confirmed: u64) -> SlotStats {
        SlotStats {
            current_wal_lsn: current,
            confirmed_flush_lsn: Some(confirmed),
            wal_status: Some("reserved".into()),
            safe_wal_size: None,
            active: true,
            invalidation_reason: None,
            inactive_since: None,
            inactive_seconds: None,
            max_slot_wal_keep_size: None,
            idle_timeout_seconds: None,
        }
    }

    #[test]
    fn the_status_line_names_the_tables_being_copied() {
        let cfg = cfg();
        let table = |name: &str, phase, rows, estimate| super::super::snapshot::TableProgress {
            table: name.into(),
            phase,
            rows_copied: rows,
            rows_estimate: estimate,
            request: "initial".into(),
        };
        let p = Progress {
            state: State::Streaming,
            snapshots: vec![
                table("public.a", Phase::Copying, 1200, Some(50000)),
                table("public.b", Phase::Done, 10, Some(10)),
                table("public.c", Phase::Pending, 0, None),
            ],
            ..Progress::default()
        };
        let s = assess(&cfg, &p, Some(&stats(1, 1)), None);
        assert_eq!(
            s.snapshots,
            vec!["public.a Copying 1200/50000", "public.c Pending 0/?"]
        );
        assert!(
            s.human_line()
                .ends_with(", snapshot: public.a Copying 1200/50000, public.c Pending 0/?"),
            "{}",
            s.human_line()
        );
    }

    #[test]
    fn a_slot_near_its_limits_is_at_risk() {
        let cfg = cfg();
        let p = Progress {
            state: State::Streaming,
            ..Progress::default()
        };
        let mut st = stats(1, 1);
        st.max_slot_wal_keep_size = Some(1000);
        st.safe_wal_size = Some(500);
        assert_eq!(assess(&cfg, &p, Some(&st), None).reason, "Streaming");
        st.safe_wal_size = Some(150);
        let s = assess(&cfg, &p, Some(&st), None);
        assert_eq!(s.reason, "WalAtRisk");
        assert!(s.message.contains("150 more bytes"), "{}", s.message);
        // Idle: only an inactive slot, past four fifths of the timeout.
        let mut st = stats(1, 1);
        st.idle_timeout_seconds = Some(100);
        st.inactive_seconds = Some(90);
        assert!(wal_risk(&cfg, &st).is_none(), "active");
        st.active = false;
        assert!(wal_risk(&cfg, &st).unwrap().contains("inactive for 90 s"));
        st.inactive_seconds = Some(50);
        assert!(wal_risk(&cfg, &st).is_none());
        // Retrying: the risk is added to the error.
        let p = Progress {
            state: State::Retrying,
            last_error: Some(("BufferError".into(), "down".into())),
            ..Progress::default()
        };
        st.inactive_seconds = Some(95);
        let s = assess(&cfg, &p, Some(&st), None);
        assert_eq!(s.reason, "BufferError");
        assert!(
            s.message.contains("idle_replication_slot_timeout"),
            "{}",
            s.message
        );
        // Invalidated: the server's reason is named.
        let p = Progress {
            state: State::Streaming,
            ..Progress::default()
        };
        let mut st = stats(1, 1);
        st.wal_status = Some("lost".into());
        st.invalidation_reason = Some("wal_removed".into());
        let s = assess(&cfg, &p, Some(&st), None);
        assert_eq!(s.reason, "WalLost");
        assert!(s.message.contains("(wal_removed)"), "{}", s.message);
    }

    #[test]
    fn a_pipeline_that_stops_checkpointing_turns_degraded_within_two_refreshes() {
        let cfg = cfg();
        let mut p = Progress {
            state: State::Streaming,
            checkpoint_lsn: 100,
            ..Progress::default()
        };
        let s1 = assess(&cfg, &p, Some(&stats(200, 100)), None);
        assert_eq!(s1.health, Health::Healthy);
        assert_eq!(s1.lag_bytes, Some(100));
        let s2 = assess(&cfg, &p, Some(&stats(300, 100)), Some(&s1));
        assert_eq!(s2.health, Health::Healthy);
        let s3 = assess(&cfg, &p, Some(&stats(400, 100)), Some(&s2));
        assert_eq!(
            (s3.health, s3.reason.as_str()),
            (Health::Degraded, "Stalled")
        );
        // Progress resumes: healthy again at once.
        p.checkpoint_lsn = 400;
        let s4 = assess(&cfg, &p, Some(&stats(400, 400)), Some(&s3));
        assert_eq!(s4.health, Health::Healthy);
        assert_eq!(s4.lag_bytes, Some(0));
    }

    #[test]
    fn errors_and_slot_trouble_name_their_reason() {
        let cfg = cfg();
        let p = Progress {
            state: State::Retrying,
            last_error: Some((
                "BufferError".into(),
                "writing to the buffer failed: x".into(),
            )),
            ..Progress::default()
        };
        let s = assess(&cfg, &p, None, None);
        assert_eq!(
            (s.health, s.reason.as_str()),
            (Health::Degraded, "BufferError")
        );
        let p = Progress {
            state: State::Streaming,
            ..Progress::default()
        };
        let mut st = stats(1, 1);
        st.wal_status = Some("lost".into());
        assert_eq!(assess(&cfg, &p, Some(&st), None).reason, "WalLost");
        st.wal_status = Some("unreserved".into());
        assert_eq!(assess(&cfg, &p, Some(&st), None).reason, "WalAtRisk");
        assert_eq!(assess(&cfg, &p, None, None).reason, "SourceUnreachable");
    }
}
