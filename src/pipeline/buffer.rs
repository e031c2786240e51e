//! The buffer database: migrations, the pipeline's writer lock, and the one write the loop
//! makes — a batch of events, the table definitions they need and the new checkpoint, all in
//! one transaction.

use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::Client;

use super::config::{quote_ident, PipelineConfig};
use super::conn::describe_pg_error;
use super::decode::{write_json_string, Change, Relation};
use super::error::{Error, Result};
use super::lsn;

/// Migrations in order, embedded from `migrations/`.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "0001_init.sql",
    include_str!("../../migrations/0001_init.sql"),
)];

/// A change with its place in the source's commit order.
#[derive(Debug, Clone)]
pub struct Event {
    pub commit_lsn: u64,
    pub seq: i32,
    pub lsn: u64,
    pub xid: u32,
    /// Microseconds since 2000-01-01 UTC, as PostgreSQL sends it.
    pub commit_time: i64,
    pub change: Change,
}

/// A table definition that applies from `(commit_lsn, seq)` on.
#[derive(Debug, Clone)]
pub struct RelationRecord {
    pub commit_lsn: u64,
    pub seq: i32,
    pub relation: Arc<Relation>,
}

/// What the buffer holds durably for a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Every source transaction that committed before this LSN is complete in the buffer;
    /// streaming resumes here.
    pub lsn: u64,
    /// The last event written, `(commit_lsn, seq)`: events at or before it are already in the
    /// buffer and are skipped when the source sends them again.
    pub last_event: Option<(u64, i32)>,
    pub events_total: i64,
}

pub struct Buffer {
    client: Client,
    pipeline: String,
    copy_events: String,
    insert_relation: String,
    upsert_checkpoint: String,
    select_checkpoint: String,
}

impl Buffer {
    /// Connects, checks the schema is Philotes's own, applies migrations and takes the
    /// pipeline's writer lock, which makes a second process on the same pipeline fail fast.
    pub async fn open(cfg: &PipelineConfig) -> Result<Buffer> {
        let client = cfg.buffer.connect("buffer").await?;
        let schema = quote_ident(&cfg.buffer_schema);
        let setup_err = |e: tokio_postgres::Error| {
            Error::BufferSetup(format!(
                "cannot prepare schema {} in the buffer database {}: {}",
                cfg.buffer_schema,
                cfg.buffer,
                describe_pg_error(&e)
            ))
        };
        migrate(&client, cfg).await?;
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('philotes:' || $1, 0))",
                &[&cfg.id],
            )
            .await
            .map_err(setup_err)?
            .get(0);
        if !locked {
            return Err(Error::SlotInUse(format!(
                "pipeline {} is already running: another philotes process writes it to the buffer database {}; stop that process first",
                cfg.id, cfg.buffer
            )));
        }
        Ok(Buffer {
            client,
            pipeline: cfg.id.clone(),
            copy_events: format!(
                "COPY {schema}.cdc_events (pipeline, commit_lsn, seq, lsn, xid, commit_time, schema_name, \
                 table_name, operation, key_columns, before, after) FROM STDIN"
            ),
            insert_relation: format!(
                "INSERT INTO {schema}.cdc_relations (pipeline, commit_lsn, seq, relation_id, schema_name, \
                 table_name, replica_identity, columns) VALUES ($1, $2::text::pg_lsn, $3, $4, $5, $6, $7, $8::text::jsonb) \
                 ON CONFLICT DO NOTHING"
            ),
            select_checkpoint: format!(
                "SELECT lsn::text, last_commit_lsn::text, last_seq, events_total FROM {schema}.cdc_checkpoints WHERE pipeline = $1"
            ),
            upsert_checkpoint: format!(
                "INSERT INTO {schema}.cdc_checkpoints AS c (pipeline, lsn, last_commit_lsn, last_seq, events_total, updated_at) \
                 VALUES ($1, $2::text::pg_lsn, $3::text::pg_lsn, $4, $5, now()) \
                 ON CONFLICT (pipeline) DO UPDATE SET lsn = excluded.lsn, last_commit_lsn = excluded.last_commit_lsn, \
                 last_seq = excluded.last_seq, events_total = excluded.events_total, updated_at = excluded.updated_at"
            ),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The durable checkpoint, if the pipeline has written one.
    pub async fn checkpoint(&self) -> Result<Option<Checkpoint>> {
        let row = self
            .client
            .query_opt(&self.select_checkpoint, &[&self.pipeline])
            .await
            .map_err(|e| Error::Buffer(describe_pg_error(&e)))?;
        Ok(row.map(|row| {
            let last_commit: Option<String> = row.get(1);
            let last_seq: Option<i32> = row.get(2);
            Checkpoint {
                lsn: lsn::parse(row.get::<_, &str>(0)).unwrap_or(0),
                last_event: last_commit.and_then(|c| lsn::parse(&c)).zip(last_seq),
                events_total: row.get(3),
            }
        }))
    }

    /// Writes events, table definitions and the checkpoint in one transaction. Nothing is
    /// visible, and the checkpoint does not move, unless all of it commits.
    pub async fn write(
        &mut self,
        events: &[Event],
        relations: &[RelationRecord],
        checkpoint: &Checkpoint,
    ) -> Result<()> {
        let err = |e: tokio_postgres::Error| Error::Buffer(describe_pg_error(&e));
        let tx = self.client.transaction().await.map_err(err)?;
        for r in relations {
            let rel = &r.relation;
            let mut columns = String::from("[");
            for (i, c) in rel.columns.iter().enumerate() {
                if i > 0 {
                    columns.push(',');
                }
                columns.push_str("{\"name\":");
                write_json_string(&mut columns, &c.name);
                let _ = write!(
                    columns,
                    ",\"type_oid\":{},\"type_modifier\":{},\"key\":{}}}",
                    c.type_oid, c.type_modifier, c.key
                );
            }
            columns.push(']');
            let identity = match rel.replica_identity {
                'n' => "nothing",
                'f' => "full",
                'i' => "index",
                _ => "default",
            };
            tx.execute(
                &self.insert_relation,
                &[
                    &self.pipeline,
                    &lsn::format(r.commit_lsn),
                    &r.seq,
                    &rel.id,
                    &rel.schema,
                    &rel.name,
                    &identity,
                    &columns,
                ],
            )
            .await
            .map_err(err)?;
        }
        if !events.is_empty() {
            let sink = tx.copy_in(&self.copy_events).await.map_err(err)?;
            futures_util::pin_mut!(sink);
            let mut chunk = String::with_capacity(64 * 1024);
            for e in events {
                encode_copy_row(&mut chunk, &self.pipeline, e);
                if chunk.len() >= 256 * 1024 {
                    let data = Bytes::from(std::mem::take(&mut chunk));
                    sink.send(data).await.map_err(err)?;
                }
            }
            if !chunk.is_empty() {
                sink.send(Bytes::from(chunk)).await.map_err(err)?;
            }
            sink.finish().await.map_err(err)?;
        }
        let (last_commit, last_seq) = match checkpoint.last_event {
            Some((c, s)) => (Some(lsn::format(c)), Some(s)),
            None => (None, None),
        };
        tx.execute(
            &self.upsert_checkpoint,
            &[
                &self.pipeline,
                &lsn::format(checkpoint.lsn),
                &last_commit,
                &last_seq,
                &checkpoint.events_total,
            ],
        )
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)
    }
}

/// Creates the schema if needed, refuses one that holds objects Philotes did not create, and
/// applies the migrations not yet applied, under a lock so concurrent starts do not race.
async fn migrate(client: &Client, cfg: &PipelineConfig) -> Result<()> {
    let name = &cfg.buffer_schema;
    let schema = quote_ident(name);
    let fail = |what: &str, e: tokio_postgres::Error| {
        let msg = describe_pg_error(&e);
        // Read-only or shutting down: a passing state of the buffer, retried.
        if matches!(
            e.code().map(|c| c.code()),
            Some("25006") | Some("57P01") | Some("57P03")
        ) || e.is_closed()
        {
            return Error::Buffer(format!(
                "cannot {what} schema {name} in the buffer database {}: {msg}",
                cfg.buffer
            ));
        }
        let hint = if e.code().map(|c| c.code()) == Some("42501") {
            "; grant the buffer user CREATE on the database (or create the schema for it)"
        } else {
            ""
        };
        Error::BufferSetup(format!(
            "cannot {what} schema {name} in the buffer database {}: {msg}{hint}",
            cfg.buffer
        ))
    };
    client
        .batch_execute(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended('philotes-migrate', 0))",
        )
        .await
        .map_err(|e| fail("lock", e))?;
    let result = async {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1), \
                        to_regclass(quote_ident($1) || '.philotes_migrations') IS NOT NULL, \
                        EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                &[name],
            )
            .await
            .map_err(|e| fail("inspect", e))?;
        let (objects, ours, exists): (i64, bool, bool) = (row.get(0), row.get(1), row.get(2));
        if ours {
            let applied: i64 = client
                .query_one(&format!("SELECT count(*) FROM {schema}.philotes_migrations"), &[])
                .await
                .map_err(|e| fail("read migrations of", e))?
                .get(0);
            if applied as usize == MIGRATIONS.len() {
                // Up to date: nothing to create (which also works on a read-only buffer).
                return Ok(());
            }
        }
        if exists && objects > 0 && !ours {
            return Err(Error::BufferSetup(format!(
                "schema {name} in the buffer database {} already holds {objects} tables or other objects that Philotes did not create; \
                 set spec.buffer.schema to a schema of its own",
                cfg.buffer
            )));
        }
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema}; \
                 CREATE TABLE IF NOT EXISTS {schema}.philotes_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            ))
            .await
            .map_err(|e| fail("create", e))?;
        let applied: Vec<i32> = client
            .query(&format!("SELECT version FROM {schema}.philotes_migrations"), &[])
            .await
            .map_err(|e| fail("read migrations of", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (version, file, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            client
                .batch_execute(&format!(
                    "SET LOCAL search_path TO {schema}; {sql}; RESET search_path"
                ))
                .await
                .map_err(|e| fail(&format!("apply migration {file} to"), e))?;
            client
                .execute(
                    &format!("INSERT INTO {schema}.philotes_migrations (version, name) VALUES ($1, $2)"),
                    &[version, file],
                )
                .await
                .map_err(|e| fail("record migration in", e))?;
        }
        Ok(())
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    client
        .batch_execute(end)
        .await
        .map_err(|e| fail("commit", e))?;
    result
}

/// Appends one row in COPY text format.
fn encode_copy_row(out: &mut String, pipeline: &str, e: &Event) {
    let rel = &e.change.relation;
    copy_text(out, pipeline);
    let _ = write!(
        out,
        "\t{}\t{}\t{}\t{}\t",
        lsn::format(e.commit_lsn),
        e.seq,
        lsn::format(e.lsn),
        e.xid
    );
    write_timestamp(out, e.commit_time);
    out.push('\t');
    copy_text(out, &rel.schema);
    out.push('\t');
    copy_text(out, &rel.name);
    out.push('\t');
    out.push_str(e.change.operation.as_str());
    out.push('\t');
    // text[] literal, then COPY-escaped: {"a","b \"c\""}
    let mut array = String::from("{");
    for (i, k) in rel.key_columns().enumerate() {
        if i > 0 {
            array.push(',');
        }
        array.push('"');
        for ch in k.chars() {
            if ch == '"' || ch == '\\' {
                array.push('\\');
            }
            array.push(ch);
        }
        array.push('"');
    }
    array.push('}');
    copy_text(out, &array);
    for image in [&e.change.before, &e.change.after] {
        out.push('\t');
        match image {
            Some(json) => copy_text(out, json),
            None => out.push_str("\\N"),
        }
    }
    out.push('\n');
}

/// COPY text escaping: backslash, tab, newline and carriage return.
fn copy_text(out: &mut String, s: &str) {
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'\\' => "\\\\",
            b'\t' => "\\t",
            b'\n' => "\\n",
            b'\r' => "\\r",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        out.push_str(esc);
        start = i + 1;
    }
    out.push_str(&s[start..]);
}

/// PostgreSQL epoch (2000-01-01) in Unix microseconds.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

fn write_timestamp(out: &mut String, pg_micros: i64) {
    match chrono::DateTime::from_timestamp_micros(pg_micros.saturating_add(PG_EPOCH_UNIX_MICROS)) {
        Some(t) => {
            let _ = write!(out, "{}", t.format("%Y-%m-%d %H:%M:%S%.6f+00"));
        }
        None => out.push_str("epoch"),
    }
}

/// Converts PostgreSQL's timestamp (µs since 2000-01-01) to RFC 3339.
pub fn pg_time_to_rfc3339(pg_micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(pg_micros.saturating_add(PG_EPOCH_UNIX_MICROS))
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::decode::{Column, Operation};

    #[test]
    fn copy_rows_escape_everything_copy_cares_about() {
        let rel = Arc::new(Relation {
            id: 1,
            schema: "we\tird".into(),
            name: "t\\n".into(),
            replica_identity: 'd',
            columns: vec![Column {
                name: "i\"d".into(),
                type_oid: 23,
                type_modifier: -1,
                key: true,
            }],
        });
        let e = Event {
            commit_lsn: 0x1_0000_0010,
            seq: 3,
            lsn: 0x1_0000_0008,
            xid: 77,
            commit_time: 0,
            change: Change {
                relation: rel,
                operation: Operation::Insert,
                before: None,
                after: Some("{\"a\":\"x\\ny\"}".into()),
            },
        };
        let mut out = String::new();
        encode_copy_row(&mut out, "ns/p", &e);
        assert_eq!(
            out,
            "ns/p\t1/10\t3\t1/8\t77\t2000-01-01 00:00:00.000000+00\twe\\tird\tt\\\\n\tINSERT\t{\"i\\\\\"d\"}\t\\N\t{\"a\":\"x\\\\ny\"}\n"
        );
    }
}
