-- Philotes buffer schema, version 3: a checkpoint knows what it is a checkpoint of; gaps the
-- user acknowledged and changes that could not be stored are recorded where consumers see them.
--
-- A position means something only together with the source system, timeline, database and
-- slot it belongs to. On every start Philotes compares these with what the source reports and
-- refuses to stream when they do not match (see README, Guarantees). Rows written by earlier
-- versions have NULLs here; they are filled in on the next start.
ALTER TABLE cdc_checkpoints
    ADD COLUMN system_identifier text,     -- the source's IDENTIFY_SYSTEM systemid (decimal)
    ADD COLUMN timeline          integer,  -- the source's timeline when last checked
    ADD COLUMN database          text,     -- the source database the slot belongs to
    ADD COLUMN slot_name         text,     -- the replication slot streamed from
    ADD COLUMN publication_name  text,     -- the publication streamed
    ADD COLUMN slot_start_lsn    pg_lsn;   -- where the slot began (its position when created,
                                           --   or when first recorded for an adopted slot)

-- One row per gap a user acknowledged with `philotes recover`: changes committed on the source
-- between from_lsn and to_lsn may be missing from cdc_events (the slot was lost, or the source
-- was replaced). Consumers that need completeness check this table.
CREATE TABLE cdc_gaps (
    pipeline     text        NOT NULL,
    from_lsn     pg_lsn      NOT NULL,  -- the checkpoint when the gap was found: complete up to here
    to_lsn       pg_lsn      NOT NULL,  -- where capture resumed on the new slot
    reason       text        NOT NULL,  -- SlotLost, SourceChanged
    message      text        NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, from_lsn, recorded_at)
);

-- Changes that could not be stored as events (spec.poisonEvents: DeadLetter), e.g. a text value
-- that is not UTF-8. Each takes the (commit_lsn, seq) position its event would have had in
-- cdc_events, so a consumer replaying in order sees where it belongs.
CREATE TABLE cdc_dead_letters (
    pipeline     text        NOT NULL,
    commit_lsn   pg_lsn      NOT NULL,
    seq          integer     NOT NULL,
    lsn          pg_lsn      NOT NULL,
    xid          bigint      NOT NULL,
    commit_time  timestamptz NOT NULL,
    schema_name  text        NOT NULL,
    table_name   text        NOT NULL,
    operation    text        NOT NULL,
    reason       text        NOT NULL,  -- names the column and what is wrong with its value
    message      bytea       NOT NULL,  -- the pgoutput message as received, byte for byte
    PRIMARY KEY (pipeline, commit_lsn, seq)
);
