-- Philotes buffer schema, version 6: fencing.
--
-- Every session that starts writing a pipeline takes the next epoch here (under the pipeline's
-- advisory lock), and every buffer transaction it commits checks, holding this row with a
-- share lock, that the epoch is still its own. A session that another one has superseded (an
-- operator replica that lost the pipeline to another while it was cut off, or a writer whose
-- advisory lock did not hold, e.g. behind a transaction pooler) therefore cannot commit: its
-- transaction writes nothing and it stops, naming the writer that took over.
CREATE TABLE cdc_writers (
    pipeline  text        PRIMARY KEY,
    epoch     bigint      NOT NULL,              -- 1 for the first session, then +1 per session
    writer    text        NOT NULL,              -- the session's process: operator replica, or host/pid
    since     timestamptz NOT NULL DEFAULT now()
);
