//! Operations on a stopped pipeline, outside the replication loop: acknowledging a gap and
//! continuing on a new slot (`philotes recover`), and forgetting a deleted pipeline
//! (`slotDeletionPolicy: Delete`).

use std::time::Duration;

use pgwire_replication::ReplicationClient;

use super::buffer::{Buffer, Gap};
use super::config::PipelineConfig;
use super::config::TableName;
use super::error::{Error, Result};
use super::identity::{self, Recorded};
use super::lsn;
use super::run::{failpoint, identify, on_source};
use super::source;
use crate::crd::SnapshotMode;

/// What [`recover`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub gap: Gap,
    /// The unusable slot was dropped before the new one was created.
    pub dropped_old_slot: bool,
}

impl Recovered {
    /// What was done, for the command's output and the operator's Event.
    pub fn describe(&self, pipeline: &str) -> String {
        format!(
            "recovered {pipeline}: changes between {} and {} may be missing ({}); recorded in cdc_gaps; \
             the pipeline continues from {} on a new slot{}",
            lsn::format(self.gap.from_lsn),
            lsn::format(self.gap.to_lsn),
            self.gap.reason,
            lsn::format(self.gap.to_lsn),
            if self.dropped_old_slot {
                " (the unusable slot was dropped)"
            } else {
                ""
            }
        )
    }
}

/// Acknowledges the gap a start refused to stream over (`SlotLost`, `SourceChanged`): drops
/// the unusable slot (never one in use), creates a new one, records the gap in `cdc_gaps`,
/// and restarts the checkpoint where the new slot begins. Refused when there is no gap: a
/// pipeline whose slot and source match its checkpoint is left alone.
pub async fn recover(cfg: &PipelineConfig) -> Result<Recovered> {
    let mut buffer = Buffer::open(cfg).await?;
    let Some((ckpt, recorded)) = buffer.checkpoint().await? else {
        return Err(Error::InvalidSpec(format!(
            "pipeline {} has no checkpoint in the buffer database {}: there is nothing to recover; start it with philotes run",
            cfg.id, cfg.buffer
        )));
    };
    let cfg = &identity::streamed(cfg, Some(&recorded))?;
    // IDENTIFY_SYSTEM on a replication session that never starts streaming, checked as a
    // start would check it (a promoted standby that continues the history is no gap).
    let mut session = on_source(cfg, "the replication connection", async {
        ReplicationClient::connect_gated(cfg.source.replication_config(
            &cfg.slot,
            &cfg.publication,
            ckpt.lsn,
            1,
            Duration::from_secs(1),
            cfg.stream_timeout,
        ))
        .await
    })
    .await?;
    let (now, checked) = identify(&mut session, cfg, Some((ckpt.lsn, &recorded))).await?;
    drop(session);
    let source_problem = checked.err();
    let client = cfg.source.connect("source").await?;
    let state = source::slot_state(&client, cfg).await?;
    let slot_problem = identity::check_slot(cfg, ckpt.lsn, state.as_ref()).err();
    let Some(problem) = source_problem.or(slot_problem) else {
        return Err(Error::InvalidSpec(format!(
            "pipeline {} has no gap to recover: slot {} on the source database {} matches its checkpoint at {}; start it with philotes run",
            cfg.id,
            cfg.slot,
            cfg.source,
            lsn::format(ckpt.lsn)
        )));
    };
    // Events already in the buffer sort before everything the new slot will bring.
    let written = ckpt.last_event.map_or(ckpt.lsn, |(c, _)| c.max(ckpt.lsn));
    if now.xlogpos <= written {
        return Err(Error::SourceChanged(format!(
            "cannot continue pipeline {} on the source database {}: its WAL position {} is not beyond what the buffer already holds ({}), \
             so new events would sort among old ones. Give the pipeline a new buffer schema (spec.buffer.schema) or a new name",
            cfg.id,
            cfg.source,
            lsn::format(now.xlogpos),
            lsn::format(written)
        )));
    }
    let dropped_old_slot = source::drop_slot(&client, cfg).await?;
    let to_lsn = source::create_slot(&client, cfg).await?;
    let gap = Gap {
        from_lsn: ckpt.lsn,
        to_lsn,
        reason: problem.reason().to_string(),
        message: problem.to_string(),
    };
    // The new checkpoint belongs to this source and this new slot, so the next start checks
    // against them.
    // What the gap may have lost is copied again from the tables as they are now, while
    // the pipeline streams on from the new slot (README: Snapshots). Asked for in the gap's
    // own transaction: a recovery cut short between the two would have found no gap left
    // to recover, and copied nothing.
    let request = format!("gap:{}", lsn::format(to_lsn));
    let copy =
        (cfg.snapshot.mode == SnapshotMode::Initial).then_some((&cfg.tables[..], request.as_str()));
    buffer
        .record_gap(&gap, &Recorded::of(now, cfg, to_lsn), copy)
        .await?;
    // Cut short before this point, nothing is recorded and the gap is still there to
    // recover (the new slot begins past the checkpoint); from here on, all of it is.
    failpoint("recover-after-gap");
    Ok(Recovered {
        gap,
        dropped_old_slot,
    })
}

/// Asks for `tables` to be copied again (`philotes snapshot`); the next run of the pipeline
/// copies them while the others stream. Refused while another process runs the pipeline.
pub async fn request_snapshot(cfg: &PipelineConfig, tables: &[String]) -> Result<Vec<TableName>> {
    let mut asked = Vec::new();
    for t in tables {
        let table =
            TableName::parse(t).map_err(|e| Error::InvalidSpec(format!("--table {t}: {e}")))?;
        if !cfg.tables.contains(&table) {
            return Err(Error::InvalidSpec(format!(
                "--table {t}: pipeline {} does not capture {table} (spec.source.tables); only captured tables can be copied",
                cfg.id
            )));
        }
        asked.push(table);
    }
    let mut buffer = Buffer::open(cfg).await?;
    let when = unix_seconds();
    buffer
        .request_snapshot(&asked, &format!("cli:{when}"))
        .await?;
    Ok(asked)
}

/// Seconds since the epoch, to tell requests apart.
fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// For `slotDeletionPolicy: Delete`: drops the slot (and a publication Philotes created) the
/// pipeline streams from, then its checkpoint and snapshot states, so a pipeline created later
/// under the same name starts afresh (copying its tables again) instead of reporting a lost
/// slot.
pub async fn forget(cfg: &PipelineConfig) -> Result<source::Dropped> {
    let mut buffer = Buffer::open(cfg).await?;
    let stored = buffer.checkpoint().await?;
    let cfg = &identity::streamed(cfg, stored.as_ref().map(|(_, r)| r))?;
    let client = cfg.source.connect("source").await?;
    let dropped = source::drop_provisioned(&client, cfg).await?;
    buffer.delete_checkpoint().await?;
    Ok(dropped)
}
