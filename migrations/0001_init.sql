-- Philotes buffer schema, version 1.
-- Applied by the pipeline at start with search_path set to spec.buffer.schema.
-- These tables are a public contract for downstream consumers: see README.md.

-- One row per row-level change. Ordering by (commit_lsn, seq) replays the source's commit order.
CREATE TABLE cdc_events (
    pipeline     text        NOT NULL,  -- namespace/name of the CdcPipeline
    commit_lsn   pg_lsn      NOT NULL,  -- commit LSN of the source transaction
    seq          integer     NOT NULL,  -- 0-based position of the change within its transaction
    lsn          pg_lsn      NOT NULL,  -- WAL position of the change itself
    xid          bigint      NOT NULL,  -- source transaction id
    commit_time  timestamptz NOT NULL,  -- commit time of the source transaction
    schema_name  text        NOT NULL,
    table_name   text        NOT NULL,
    operation    text        NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')),
    key_columns  text[]      NOT NULL,  -- replica identity columns of the table
    before       jsonb,                 -- old row as PostgreSQL sent it (key columns, or all under REPLICA IDENTITY FULL)
    after        jsonb,                 -- new row; unchanged TOASTed columns are absent
    PRIMARY KEY (pipeline, commit_lsn, seq)
);

-- One row per pipeline: how far the buffer is durable.
CREATE TABLE cdc_checkpoints (
    pipeline         text        PRIMARY KEY,
    lsn              pg_lsn      NOT NULL,  -- every source transaction that committed before this LSN is complete in cdc_events
    last_commit_lsn  pg_lsn,                -- (last_commit_lsn, last_seq): the last event written,
    last_seq         integer,               --   possibly part of a transaction still being written
    events_total     bigint      NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Table definitions as the stream described them. A definition applies to the events of its
-- table from (commit_lsn, seq) on, until the next definition of the same table.
CREATE TABLE cdc_relations (
    pipeline          text    NOT NULL,
    commit_lsn        pg_lsn  NOT NULL,
    seq               integer NOT NULL,
    relation_id       oid     NOT NULL,  -- the table's OID on the source
    schema_name       text    NOT NULL,
    table_name        text    NOT NULL,
    replica_identity  text    NOT NULL,  -- default, nothing, full or index
    columns           jsonb   NOT NULL,  -- [{"name", "type_oid", "type_modifier", "key"}] in column order
    PRIMARY KEY (pipeline, schema_name, table_name, commit_lsn, seq)
);
