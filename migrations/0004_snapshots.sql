-- Philotes buffer schema, version 4: snapshots of existing rows.
--
-- A SNAPSHOT event is a row as it was read from the source table: the whole row in `after`,
-- `before` NULL. Replayed in (commit_lsn, seq) order it is an upsert (README: Snapshots).
ALTER TABLE cdc_events DROP CONSTRAINT IF EXISTS cdc_events_operation_check;
ALTER TABLE cdc_events ADD CONSTRAINT cdc_events_operation_check
    CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'SNAPSHOT'));

-- One row per pipeline and table: the table's snapshot, written in the same buffer
-- transaction as the SNAPSHOT events of each chunk, so a restart resumes after the last
-- chunk written.
CREATE TABLE cdc_snapshots (
    pipeline      text        NOT NULL,
    schema_name   text        NOT NULL,
    table_name    text        NOT NULL,
    request       text        NOT NULL,  -- what asked for it: initial, added, resync:<id>, gap:<lsn>, cli:<time>, or
                                         --   skipped (captured without a snapshot: spec.snapshot.mode Never, or
                                         --   before this version)
    phase         text        NOT NULL CHECK (phase IN ('Pending', 'Copying', 'Done', 'Skipped')),
    last_key      json,                  -- the key of the last row copied (text values, key column order)
    reread        json,                  -- keys to read again before going on (see README)
    rows_copied   bigint      NOT NULL DEFAULT 0,
    range_done    boolean     NOT NULL DEFAULT false,  -- the chunks in key order reached the end of the table
    requested_at  timestamptz NOT NULL DEFAULT now(),
    started_lsn   pg_lsn,                -- commit_lsn of the request's first chunk: once phase = 'Done', a row whose
                                         --   last event sorts before it no longer exists (README: Snapshots)
    done_lsn      pg_lsn,                -- commit_lsn of the chunk that completed it: once phase = 'Done',
                                         --   replaying the table's events up to here gives the whole table
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, schema_name, table_name)
);
