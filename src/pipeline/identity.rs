//! What a checkpoint is a checkpoint of: the source system, its timeline, the database, the
//! slot and publication, and where the slot began. A position means something only together
//! with these, so they are stored with the checkpoint and compared with what the source
//! reports on every start and reconnect, before streaming. Nothing here does I/O: the
//! decisions are plain functions with unit tests.

use super::config::PipelineConfig;
use super::error::{Error, Result};
use super::lsn;

/// The identity stored with a checkpoint. Fields are `None` in a checkpoint written by a
/// version of Philotes that did not record them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    pub system_identifier: Option<String>,
    pub timeline: Option<u32>,
    pub database: Option<String>,
    pub slot: Option<String>,
    pub publication: Option<String>,
    pub slot_start_lsn: Option<u64>,
}

impl Recorded {
    /// The identity of a checkpoint taken on `now`'s source, on `cfg`'s slot and
    /// publication, which began at `slot_start_lsn`.
    pub fn of(now: SourceNow, cfg: &PipelineConfig, slot_start_lsn: u64) -> Recorded {
        Recorded {
            system_identifier: Some(now.system_identifier),
            timeline: Some(now.timeline),
            database: Some(now.database),
            slot: Some(cfg.slot.clone()),
            publication: Some(cfg.publication.clone()),
            slot_start_lsn: Some(slot_start_lsn),
        }
    }
}

/// What the source reports now (`IDENTIFY_SYSTEM` on the replication session that is about to
/// stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceNow {
    pub system_identifier: String,
    pub timeline: u32,
    /// The source's WAL flush position.
    pub xlogpos: u64,
    pub database: String,
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotState {
    pub confirmed_flush_lsn: Option<u64>,
    /// `wal_status`, and the invalidation PostgreSQL 16+ reports (`conflicting`,
    /// `invalidation_reason`), as one text when the slot cannot stream any more.
    pub invalidated: Option<String>,
}

/// Checks the slot against a checkpoint at `checkpoint_lsn` before anything is created: a
/// checkpoint on a slot that is missing, invalidated, or ahead of it means changes may be
/// missing, and streaming (or recreating the slot) would hide that.
pub fn check_slot(
    cfg: &PipelineConfig,
    checkpoint_lsn: u64,
    slot: Option<&SlotState>,
) -> Result<()> {
    let from = lsn::format(checkpoint_lsn);
    let recover = format!(
        "the buffer is complete up to {from}; to continue on a new slot and record the gap for consumers, run philotes recover"
    );
    let Some(slot) = slot else {
        return Err(Error::SlotLost(format!(
            "replication slot {} is missing on the source database {} but pipeline {} has a checkpoint at {from}: \
             changes committed after {from} may be missing (the slot was dropped, or the source was replaced by a server without it). \
             Philotes does not recreate it by itself; {recover}",
            cfg.slot, cfg.source, cfg.id
        )));
    };
    if let Some(why) = &slot.invalidated {
        return Err(Error::SlotLost(format!(
            "replication slot {} on the source database {} was invalidated ({why}): changes committed after {from} may be missing; {recover}",
            cfg.slot, cfg.source
        )));
    }
    if let Some(confirmed) = slot.confirmed_flush_lsn.filter(|c| *c > checkpoint_lsn) {
        return Err(Error::SlotLost(format!(
            "replication slot {} on the source database {} is at {}, beyond pipeline {}'s checkpoint at {from}: \
             it was recreated, or another consumer advanced it, so changes between {from} and {} may be missing; {recover}",
            cfg.slot,
            cfg.source,
            lsn::format(confirmed),
            cfg.id,
            lsn::format(confirmed)
        )));
    }
    Ok(())
}

/// Checks the source a checkpoint at `checkpoint_lsn` was taken on against the source now.
/// `history` is the `TIMELINE_HISTORY` file of the current timeline, asked for only when the
/// timeline changed. Returns whether the recorded identity should be updated (a promotion of
/// a standby that continues the same history).
pub fn check_source(
    cfg: &PipelineConfig,
    recorded: &Recorded,
    checkpoint_lsn: u64,
    now: &SourceNow,
    history: Option<&str>,
) -> Result<()> {
    let from = lsn::format(checkpoint_lsn);
    let changed = |what: String| {
        Err(Error::SourceChanged(format!(
            "the source database {} is not the one pipeline {} checkpointed at {from}: {what}. \
             Streaming would mix two histories. Point spec.source back at the original server, or, to continue on this one \
             and record the gap for consumers, run philotes recover",
            cfg.source, cfg.id
        )))
    };
    if let Some(system) = &recorded.system_identifier {
        if *system != now.system_identifier {
            return changed(format!(
                "its system identifier is {}, the checkpoint's is {system} (a different server, or one restored from another's backup)",
                now.system_identifier
            ));
        }
    }
    if let Some(database) = &recorded.database {
        if *database != now.database {
            return changed(format!(
                "the database is {}, the checkpoint's is {database}",
                now.database
            ));
        }
    }
    if now.xlogpos < checkpoint_lsn {
        return changed(format!(
            "its WAL ends at {}, before the checkpoint (it went back in time: a point-in-time restore, or a promoted replica that was behind)",
            lsn::format(now.xlogpos)
        ));
    }
    if let Some(timeline) = recorded.timeline.filter(|t| *t != now.timeline) {
        // A promoted standby: the same history only if the old timeline ended at or after
        // the checkpoint (what the buffer holds happened on the new primary too).
        match history.and_then(|h| switchpoint(h, timeline)) {
            Some(end) if end >= checkpoint_lsn => {}
            Some(end) => {
                return changed(format!(
                    "its timeline {} left timeline {timeline} at {}, before the checkpoint: the buffer holds changes the new primary never had",
                    now.timeline,
                    lsn::format(end)
                ))
            }
            None => {
                return changed(format!(
                    "its timeline {} does not descend from the checkpoint's timeline {timeline}",
                    now.timeline
                ))
            }
        }
    }
    Ok(())
}

/// The slot and publication a pipeline streams from, given what its checkpoint recorded
/// (`None`: no checkpoint yet). A checkpointed pipeline keeps the names it recorded, or, for
/// a checkpoint from before names were recorded, the names that release derived; a spec that
/// names other ones is refused, since the checkpoint belongs to the old slot.
pub fn names(cfg: &PipelineConfig, recorded: Option<&Recorded>) -> Result<(String, String)> {
    let Some(recorded) = recorded else {
        return Ok((cfg.slot.clone(), cfg.publication.clone()));
    };
    let pick = |field: &str, spec: &str, legacy: &Option<String>, stored: &Option<String>| {
        match (stored, legacy) {
            (Some(stored), _) if stored == spec => Ok(stored.clone()),
            // A derived name: the one the checkpoint was taken under.
            (Some(stored), Some(_)) => Ok(stored.clone()),
            (Some(stored), None) => Err(Error::SlotConflict(format!(
                "CdcPipeline {}: {field} is {spec}, but the pipeline has a checkpoint taken on {stored}; \
                 a checkpoint belongs to one slot and publication. Set {field} back to {stored}, or move the \
                 pipeline (README: Moving a pipeline)",
                cfg.id
            ))),
            (None, Some(legacy)) => Ok(legacy.clone()),
            (None, None) => Ok(spec.to_string()),
        }
    };
    Ok((
        pick(
            "spec.source.slot",
            &cfg.slot,
            &cfg.legacy_slot,
            &recorded.slot,
        )?,
        pick(
            "spec.source.publication",
            &cfg.publication,
            &cfg.legacy_publication,
            &recorded.publication,
        )?,
    ))
}

/// `cfg` with the slot and publication of [`names`]: what a pipeline with this stored state
/// streams from.
pub fn streamed(cfg: &PipelineConfig, recorded: Option<&Recorded>) -> Result<PipelineConfig> {
    let (slot, publication) = names(cfg, recorded)?;
    Ok(PipelineConfig {
        slot,
        publication,
        ..cfg.clone()
    })
}

/// Where `timeline` ended according to a timeline history file (lines of
/// `timeline<TAB>switchpoint<TAB>reason`).
pub fn switchpoint(history: &str, timeline: u32) -> Option<u64> {
    history.lines().find_map(|line| {
        let mut fields = line.split('\t');
        let tli: u32 = fields.next()?.trim().parse().ok()?;
        let end = lsn::parse(fields.next()?)?;
        (tli == timeline).then_some(end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PipelineConfig {
        PipelineConfig::example()
    }

    fn recorded() -> Recorded {
        Recorded {
            system_identifier: Some("7001".into()),
            timeline: Some(1),
            database: Some("shop".into()),
            slot: Some("slot".into()),
            publication: Some("pub".into()),
            slot_start_lsn: Some(0x100),
        }
    }

    fn now() -> SourceNow {
        SourceNow {
            system_identifier: "7001".into(),
            timeline: 1,
            xlogpos: 0x5000,
            database: "shop".into(),
        }
    }

    #[test]
    fn a_missing_invalidated_or_advanced_slot_is_lost() {
        let err = check_slot(&cfg(), 0x4000, None).unwrap_err();
        assert_eq!(err.reason(), "SlotLost");
        assert!(err.to_string().contains("slot slot is missing"), "{err}");
        assert!(err.to_string().contains("after 0/4000"), "{err}");
        let lost = SlotState {
            confirmed_flush_lsn: Some(0x4000),
            invalidated: Some("wal_status lost".into()),
        };
        assert_eq!(
            check_slot(&cfg(), 0x4000, Some(&lost))
                .unwrap_err()
                .reason(),
            "SlotLost"
        );
        let ahead = SlotState {
            confirmed_flush_lsn: Some(0x4800),
            invalidated: None,
        };
        let err = check_slot(&cfg(), 0x4000, Some(&ahead)).unwrap_err();
        assert!(
            err.to_string().contains("between 0/4000 and 0/4800"),
            "{err}"
        );
        // Behind the checkpoint is normal: a crash between commit and confirmation.
        let behind = SlotState {
            confirmed_flush_lsn: Some(0x3000),
            invalidated: None,
        };
        check_slot(&cfg(), 0x4000, Some(&behind)).unwrap();
    }

    #[test]
    fn another_system_database_or_an_earlier_position_is_another_source() {
        let mut other = now();
        other.system_identifier = "9999".into();
        let err = check_source(&cfg(), &recorded(), 0x4000, &other, None).unwrap_err();
        assert_eq!(err.reason(), "SourceChanged");
        assert!(
            err.to_string().contains("system identifier is 9999"),
            "{err}"
        );
        let mut db = now();
        db.database = "other".into();
        assert!(check_source(&cfg(), &recorded(), 0x4000, &db, None).is_err());
        let mut rewound = now();
        rewound.xlogpos = 0x3000;
        let err = check_source(&cfg(), &recorded(), 0x4000, &rewound, None).unwrap_err();
        assert!(err.to_string().contains("went back in time"), "{err}");
        check_source(&cfg(), &recorded(), 0x4000, &now(), None).unwrap();
        // A checkpoint from before identities were recorded is accepted.
        check_source(&cfg(), &Recorded::default(), 0x4000, &now(), None).unwrap();
    }

    #[test]
    fn a_checkpointed_pipeline_keeps_its_names() {
        let mut derived = cfg();
        derived.slot = "philotes_a_b_c_1234abcd".into();
        derived.legacy_slot = Some("philotes_a_b_c".into());
        derived.publication = "philotes_a_b_c_1234abcd".into();
        derived.legacy_publication = Some("philotes_b_c".into());
        // New pipeline: the new defaults.
        assert_eq!(names(&derived, None).unwrap().0, "philotes_a_b_c_1234abcd");
        // Checkpointed before names were recorded: the old defaults.
        let old = names(&derived, Some(&Recorded::default())).unwrap();
        assert_eq!(old, ("philotes_a_b_c".into(), "philotes_b_c".into()));
        // Recorded: those.
        let r = Recorded {
            slot: Some("philotes_a_b_c".into()),
            publication: Some("pub".into()),
            ..Recorded::default()
        };
        assert_eq!(names(&derived, Some(&r)).unwrap().1, "pub");
        // An explicit name that differs from the recorded one is refused.
        let err = names(&cfg(), Some(&r)).unwrap_err();
        assert_eq!(err.reason(), "SlotConflict");
        assert!(
            err.to_string().contains("spec.source.slot is slot"),
            "{err}"
        );
    }

    #[test]
    fn a_promoted_standby_continues_only_a_history_that_did_not_diverge() {
        let mut promoted = now();
        promoted.timeline = 2;
        let history = "1\t0/4800\tno recovery target specified\n";
        check_source(&cfg(), &recorded(), 0x4000, &promoted, Some(history)).unwrap();
        let early = "1\t0/3000\tno recovery target specified\n";
        let err = check_source(&cfg(), &recorded(), 0x4000, &promoted, Some(early)).unwrap_err();
        assert!(
            err.to_string().contains("left timeline 1 at 0/3000"),
            "{err}"
        );
        assert!(check_source(&cfg(), &recorded(), 0x4000, &promoted, Some("")).is_err());
        assert_eq!(switchpoint("1\t0/10\tx\n2\t1/0\ty\n", 2), Some(1 << 32));
    }
}
