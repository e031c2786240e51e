//! Operations on a stopped pipeline, outside the replication loop: acknowledging a gap and
//! continuing on a new slot (`philotes recover`), and forgetting a deleted pipeline
//! (`slotDeletionPolicy: Delete`).

use pgwire_replication::ReplicationClient;

use super::buffer::{Buffer, Gap};
use super::config::PipelineConfig;
use super::error::{Error, Result};
use super::identity::{self, SourceNow};
use super::lsn;
use super::source;

/// What [`recover`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub gap: Gap,
    /// The unusable slot was dropped before the new one was created.
    pub dropped_old_slot: bool,
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
    let (slot, publication) = identity::names(cfg, Some(&recorded))?;
    let cfg = &PipelineConfig {
        slot,
        publication,
        ..cfg.clone()
    };
    let client = cfg.source.connect("source").await?;
    let state = source::slot_state(&client, cfg).await?;
    let slot_problem = identity::check_slot(cfg, ckpt.lsn, state.as_ref()).err();
    let now = identify(cfg).await?;
    let source_problem = identity::check_source(cfg, &recorded, ckpt.lsn, &now, None).err();
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
    let dropped_old_slot = state.is_some();
    if dropped_old_slot {
        source::drop_slot(&client, cfg).await?;
    }
    let to_lsn = source::create_slot(&client, cfg).await?;
    let gap = Gap {
        from_lsn: ckpt.lsn,
        to_lsn,
        reason: problem.reason().to_string(),
        message: problem.to_string(),
    };
    buffer.record_gap(&gap).await?;
    Ok(Recovered {
        gap,
        dropped_old_slot,
    })
}

/// `IDENTIFY_SYSTEM` on a replication session that never starts streaming.
async fn identify(cfg: &PipelineConfig) -> Result<SourceNow> {
    let repl = cfg.source.replication_config(
        &cfg.slot,
        &cfg.publication,
        0,
        1,
        std::time::Duration::from_secs(1),
        cfg.stream_timeout,
    );
    let unreachable = |message: String| Error::Unreachable {
        target: "source",
        endpoint: cfg.source.to_string(),
        message,
    };
    let step = async {
        let mut client = ReplicationClient::connect_gated(repl).await?;
        client.identify_system().await
    };
    let system = tokio::time::timeout(cfg.source.connect_timeout, step)
        .await
        .map_err(|_| unreachable("no answer to IDENTIFY_SYSTEM".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(SourceNow {
        system_identifier: system.system_id,
        timeline: system.timeline,
        xlogpos: system.xlogpos.0,
        database: system.dbname.unwrap_or_else(|| cfg.source.dbname.clone()),
    })
}

/// For `slotDeletionPolicy: Delete`: drops the slot (and a publication Philotes created) the
/// pipeline streams from, then its checkpoint, so a pipeline created later under the same
/// name starts afresh instead of reporting a lost slot.
pub async fn forget(cfg: &PipelineConfig) -> Result<source::Dropped> {
    let buffer = Buffer::open(cfg).await?;
    let stored = buffer.checkpoint().await?;
    let (slot, publication) = identity::names(cfg, stored.as_ref().map(|(_, r)| r))?;
    let cfg = &PipelineConfig {
        slot,
        publication,
        ..cfg.clone()
    };
    let client = cfg.source.connect("source").await?;
    let dropped = source::drop_provisioned(&client, cfg).await?;
    buffer.delete_checkpoint().await?;
    Ok(dropped)
}
