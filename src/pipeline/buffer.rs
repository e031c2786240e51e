//! The buffer database: migrations, the pipeline's writer lock, and the one write the loop
//! makes — a batch of events, the table definitions they need and the new checkpoint, all in
//! one transaction.
//!
//! The write runs in a task of its own ([`Writer`]) so the loop decodes the next changes while
//! the buffer server stores the previous ones: rows are encoded in COPY's binary format as
//! they are decoded ([`RowEncoder`]) and streamed into an open `COPY`; a commit request ends
//! the transaction with the table definitions and the checkpoint, and the writer reports it
//! back once committed. Only then does the loop confirm the checkpoint to the source.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Statement, Transaction};

use super::config::TableName;
use super::config::{quote_ident, PipelineConfig};
use super::conn::{describe_pg_error, heals_by_retrying};
use super::decode::{write_json_string, Change, Operation, Relation};
use super::error::{Error, Result};
use super::identity::Recorded;
use super::lsn;
use super::snapshot::{Phase, TableState};
use super::source::Pending;
use crate::crd::SnapshotMode;

/// Classifies an error of the buffer: what retrying can heal (the server restarting,
/// read-only for a while, the network) is [`Error::Buffer`]; a write the buffer refuses for
/// good stops the pipeline with what to do. See [`event_error`] for the events' own COPY.
fn buffer_error(e: &tokio_postgres::Error) -> Error {
    classify(e, false)
}

/// [`buffer_error`] for the statement writing events into `cdc_event_log`: a rule of that
/// table refusing a row (a constraint, a row security policy, a trigger raising an error)
/// refuses that change, on every try.
fn event_error(e: &tokio_postgres::Error) -> Error {
    classify(e, true)
}

fn classify(e: &tokio_postgres::Error, events: bool) -> Error {
    let message = describe_pg_error(e);
    let refused_table = e.as_db_error().and_then(|d| d.table());
    let code = e.code().map(|c| c.code());
    let refused = Error::ValueRefused {
        message: message.clone(),
        at: None,
        upto: None,
        row: None,
        copied: false,
    };
    let fix = match code {
        Some("23505") => "the buffer already holds an event at a position this pipeline has not checkpointed \
             (another writer, or a buffer restored from a different point than its checkpoint); \
             Philotes stops rather than overwrite or skip it",
        Some("42501") => "grant the buffer user INSERT, UPDATE and SELECT on the schema's tables and USAGE on its sequences",
        Some("42P01") | Some("42703") => {
            "the buffer schema's tables were dropped or altered by hand; restore them or use a new spec.buffer.schema"
        }
        // Data exceptions and program limits: the same batch would be refused again on every
        // retry. The loop finds the change and applies poisonEvents to it (a refusal no
        // single change causes stops, saying so).
        Some(c) if c.starts_with("22") || c.starts_with("54") => return refused,
        // The events' table refusing a row by a rule added to it: the same.
        Some(c)
            if events
                && ((c.starts_with("23") && refused_table.is_none_or(|t| t == "cdc_event_log"))
                    || matches!(c, "P0001" | "P0002" | "P0003" | "P0004" | "44000")) =>
        {
            return refused
        }
        // The same rules on Philotes's own bookkeeping (checkpoints, definitions, snapshot
        // states, dead letters): no change causes them, so none is to be set aside.
        Some(c) if c.starts_with("23") || c.starts_with("P0") || c == "44000" => {
            "a constraint, row security policy or trigger added to the buffer schema's tables refuses what Philotes \
             records there; drop it"
        }
        // The connection lost, the server restarting, read-only for a while (a standby being
        // promoted), out of resources, a timeout or an I/O error: retried.
        None => return Error::Buffer(message),
        Some(c) if heals_by_retrying(e) || c == "25006" || c.starts_with("58") => {
            return Error::Buffer(message)
        }
        // Anything else the server refused is refused again on every try.
        Some(_) => "the buffer server refuses it on every try; fix what the message names",
    };
    Error::BufferSetup(format!("the buffer refused a write: {message}; {fix}"))
}

/// Where a change sits in the source's commit order.
#[derive(Debug, Clone, Copy)]
pub struct Position {
    pub commit_lsn: u64,
    pub seq: i32,
    pub lsn: u64,
    pub xid: u32,
    /// Microseconds since 2000-01-01 UTC, as PostgreSQL sends it.
    pub commit_time: i64,
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

/// A gap the user acknowledged: changes between `from_lsn` and `to_lsn` may be missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub from_lsn: u64,
    pub to_lsn: u64,
    pub reason: String,
    pub message: String,
}

pub struct Buffer {
    client: Client,
    schema: String,
    pipeline: String,
    /// The pipeline's `cdc_pipelines.id`, which its event rows carry.
    pipeline_id: i32,
    /// This session's epoch in `cdc_writers`, which every commit checks.
    epoch: i64,
    /// Prepared once per session: every buffer transaction runs them, and a statement given
    /// as text costs a round trip to prepare before each use.
    copy_events: Statement,
    insert_relation: String,
    insert_table: String,
    upsert_checkpoint: Statement,
    check_epoch: Statement,
    fenced_by: String,
    select_checkpoint: String,
}

impl Buffer {
    /// Connects, checks the schema is Philotes's own, applies migrations and takes the
    /// pipeline's writer lock, which makes a second process on the same pipeline fail fast.
    pub async fn open(cfg: &PipelineConfig) -> Result<Buffer> {
        let client = cfg.buffer.connect("buffer").await?;
        let schema = quote_ident(&cfg.buffer_schema);
        let setup_err = |e: tokio_postgres::Error| {
            let message = format!(
                "cannot prepare schema {} in the buffer database {}: {}",
                cfg.buffer_schema,
                cfg.buffer,
                describe_pg_error(&e)
            );
            // The connection lost, the server shutting down or read-only for a while (a
            // standby being promoted) heals by retrying.
            if e.is_closed()
                || matches!(
                    e.code().map(|c| c.code()),
                    Some("57P01" | "57P03" | "25006")
                )
            {
                Error::Buffer(message)
            } else {
                Error::BufferSetup(message)
            }
        };
        super::migrate::migrate(&client, cfg).await?;
        // A checkpoint is confirmed to the source once its transaction commits, so the commit
        // must be durable when it returns, whatever the buffer's default: with
        // synchronous_commit off a crash of the buffer server could lose a checkpoint the
        // source has already released WAL for.
        client
            .batch_execute("SET synchronous_commit = on")
            .await
            .map_err(setup_err)?;
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
        let pipeline_id = pipeline_id(&client, &schema, &cfg.id)
            .await
            .map_err(setup_err)?;
        // Under the writer lock: this session supersedes every earlier one (fencing).
        let epoch: i64 = client
            .query_one(
                &format!(
                    "INSERT INTO {schema}.cdc_writers AS w (pipeline, epoch, writer) VALUES ($1, 1, $2) \
                     ON CONFLICT (pipeline) DO UPDATE SET epoch = w.epoch + 1, writer = excluded.writer, since = now() \
                     RETURNING epoch"
                ),
                &[&cfg.id, &writer_name()],
            )
            .await
            .map_err(setup_err)?
            .get(0);
        // A failed prepare is classed as the same statements' failures were when each
        // transaction prepared them: a lock or statement timeout heals by retrying.
        let prepare_err = |e: tokio_postgres::Error| buffer_error(&e);
        let copy_events = client
            .prepare(&format!(
                "COPY {schema}.cdc_event_log (pipeline_id, commit_lsn, seq, lsn, xid, commit_time, table_id, \
                 operation, before, after) FROM STDIN (FORMAT binary)"
            ))
            .await
            .map_err(prepare_err)?;
        // Inserts or updates nothing when another session took the pipeline over: the share
        // lock makes a new session's epoch wait for this transaction, and this one see a newer
        // epoch committed before it.
        let upsert_checkpoint = client
            .prepare(&format!(
                "WITH w AS (SELECT 1 FROM {schema}.cdc_writers WHERE pipeline = $1 AND epoch = $6 FOR SHARE) \
                 INSERT INTO {schema}.cdc_checkpoints AS c (pipeline, lsn, last_commit_lsn, last_seq, events_total, updated_at) \
                 SELECT $1, $2::text::pg_lsn, $3::text::pg_lsn, $4, $5, now() FROM w \
                 ON CONFLICT (pipeline) DO UPDATE SET lsn = excluded.lsn, last_commit_lsn = excluded.last_commit_lsn, \
                 last_seq = excluded.last_seq, events_total = excluded.events_total, updated_at = excluded.updated_at"
            ))
            .await
            .map_err(prepare_err)?;
        let check_epoch = client
            .prepare(&format!(
                "SELECT 1 FROM {schema}.cdc_writers WHERE pipeline = $1 AND epoch = $2 FOR SHARE"
            ))
            .await
            .map_err(prepare_err)?;
        Ok(Buffer {
            client,
            schema: schema.clone(),
            pipeline: cfg.id.clone(),
            pipeline_id,
            epoch,
            copy_events,
            // Returns the row that was already there, if any (a statement does not see its
            // own CTE's insert), to be compared with the one written.
            insert_table: format!(
                "WITH ins AS (INSERT INTO {schema}.cdc_tables (pipeline_id, id, schema_name, table_name, key_columns) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING) \
                 SELECT schema_name, table_name, key_columns FROM {schema}.cdc_tables WHERE pipeline_id = $1 AND id = $2"
            ),
            insert_relation: format!(
                "INSERT INTO {schema}.cdc_relations (pipeline, commit_lsn, seq, relation_id, schema_name, \
                 table_name, replica_identity, columns) VALUES ($1, $2::text::pg_lsn, $3, $4, $5, $6, $7, $8::text::jsonb) \
                 ON CONFLICT DO NOTHING"
            ),
            select_checkpoint: format!(
                "SELECT lsn::text, last_commit_lsn::text, last_seq, events_total, system_identifier, timeline, database, \
                 slot_name, publication_name, slot_start_lsn::text FROM {schema}.cdc_checkpoints WHERE pipeline = $1"
            ),
            upsert_checkpoint,
            check_epoch,
            fenced_by: format!("SELECT writer, epoch, since::text FROM {schema}.cdc_writers WHERE pipeline = $1"),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The id the pipeline's event rows carry (`cdc_pipelines`).
    pub fn pipeline_id(&self) -> i32 {
        self.pipeline_id
    }

    /// A transaction that writes only while this session's epoch is the pipeline's: the
    /// epoch check is its first statement and holds the `cdc_writers` row FOR SHARE to the
    /// commit, as in every transaction of [`Buffer::serve`]. A superseded session gets
    /// `Fenced`, naming the writer that took over, and writes nothing.
    async fn guarded(&mut self) -> Result<Transaction<'_>> {
        let err = |e: tokio_postgres::Error| buffer_error(&e);
        let tx = self.client.transaction().await.map_err(err)?;
        let params: [&(dyn ToSql + Sync); 2] = [&self.pipeline, &self.epoch];
        if tx
            .query_opt(&self.check_epoch, &params)
            .await
            .map_err(err)?
            .is_none()
        {
            return Err(fenced(&tx, &self.fenced_by, &self.pipeline, self.epoch).await);
        }
        Ok(tx)
    }

    /// The durable checkpoint and the identity recorded with it, if the pipeline has one.
    pub async fn checkpoint(&self) -> Result<Option<(Checkpoint, Recorded)>> {
        let row = self
            .client
            .query_opt(&self.select_checkpoint, &[&self.pipeline])
            .await
            .map_err(|e| buffer_error(&e))?;
        Ok(row.map(|row| {
            let last_commit: Option<String> = row.get(1);
            let last_seq: Option<i32> = row.get(2);
            let checkpoint = Checkpoint {
                lsn: lsn::parse(row.get::<_, &str>(0)).unwrap_or(0),
                last_event: last_commit.and_then(|c| lsn::parse(&c)).zip(last_seq),
                events_total: row.get(3),
            };
            let recorded = Recorded {
                system_identifier: row.get(4),
                timeline: row.get::<_, Option<i32>>(5).map(|t| t as u32),
                database: row.get(6),
                slot: row.get(7),
                publication: row.get(8),
                slot_start_lsn: row.get::<_, Option<&str>>(9).and_then(lsn::parse),
            };
            (checkpoint, recorded)
        }))
    }

    /// Records what the checkpoint is a checkpoint of (inserting the checkpoint itself for a
    /// new pipeline). Refused when another pipeline of this buffer already checkpoints the
    /// same slot of the same source: two pipelines on one slot take its changes from each
    /// other.
    pub async fn save_identity(&mut self, checkpoint: &Checkpoint, id: &Recorded) -> Result<()> {
        let err = |e: tokio_postgres::Error| buffer_error(&e);
        let (schema, pipeline) = (self.schema.clone(), self.pipeline.clone());
        let tx = self.guarded().await?;
        let other: Option<String> = tx
            .query_opt(
                &format!(
                    "SELECT pipeline FROM {schema}.cdc_checkpoints WHERE pipeline <> $1 AND slot_name = $2 \
                     AND system_identifier = $3 AND database = $4 LIMIT 1"
                ),
                &[
                    &pipeline as &(dyn ToSql + Sync),
                    &id.slot,
                    &id.system_identifier,
                    &id.database,
                ],
            )
            .await
            .map_err(err)?
            .map(|r| r.get(0));
        if let Some(other) = other {
            return Err(Error::SlotConflict(format!(
                "replication slot {} on source database {} is already streamed by pipeline {other} (its checkpoint is in the same buffer); \
                 give pipeline {pipeline} its own spec.source.slot",
                id.slot.as_deref().unwrap_or("?"),
                id.database.as_deref().unwrap_or("?"),
            )));
        }
        upsert_identity(&tx, &schema, &pipeline, checkpoint, id)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)
    }

    /// The snapshots this start has to carry out, after recording what the spec asks for:
    /// every listed table of a new pipeline (`spec.snapshot.mode: Initial`), a table added
    /// to a pipeline that has snapshots, and the tables of a `spec.snapshot.resync` request
    /// not carried out yet. A pipeline of an earlier release (a checkpoint, no snapshots
    /// recorded) has its tables recorded as `Skipped`: upgrading copies nothing.
    /// A table whose entry in the publication (`published`, by `schema.name`, see
    /// [`Published::describe`](super::source::Published::describe)) is not the one its copy
    /// followed, or that Philotes's own publication is about to publish anew or again
    /// (`pending`: the stream did not carry what the spec asks for), is copied again
    /// (request `changed`); under `mode: Never` only a copy a user asked for and that is
    /// under way is, starting over.
    /// Returns every listed table's state.
    pub async fn snapshot_states(
        &mut self,
        cfg: &PipelineConfig,
        new_pipeline: bool,
        published: &BTreeMap<String, String>,
        pending: &Pending,
    ) -> Result<Vec<TableState>> {
        let err = |e: tokio_postgres::Error| buffer_error(&e);
        let (schema, pipeline) = (self.schema.clone(), self.pipeline.clone());
        let schema = &schema;
        let tx = self.guarded().await?;
        let rows = tx
            .query(
                &format!(
                    "SELECT schema_name, table_name, request, phase, last_key::text, reread::text, rows_copied, range_done, \
                     done_lsn::text, started_lsn::text, key_names::text, key_kinds::text, relation_id, published \
                     FROM {schema}.cdc_snapshots WHERE pipeline = $1"
                ),
                &[&pipeline],
            )
            .await
            .map_err(err)?;
        let mut known: HashMap<TableName, TableState> = HashMap::new();
        let mut followed: HashMap<TableName, Option<String>> = HashMap::new();
        for r in &rows {
            let table = TableName {
                schema: r.get(0),
                name: r.get(1),
            };
            let parse = |i: usize| -> Option<serde_json::Value> {
                r.get::<_, Option<String>>(i)
                    .and_then(|t| serde_json::from_str(&t).ok())
            };
            followed.insert(table.clone(), r.get(13));
            known.insert(
                table.clone(),
                TableState {
                    table,
                    request: r.get(2),
                    phase: Phase::parse(r.get(3)),
                    last_key: parse(4).and_then(|v| serde_json::from_value(v).ok()),
                    reread: parse(5)
                        .and_then(|v| serde_json::from_value::<Vec<Vec<String>>>(v).ok())
                        .unwrap_or_default()
                        .into(),
                    key_names: parse(10).and_then(|v| serde_json::from_value(v).ok()),
                    key_kinds: parse(11).and_then(|v| serde_json::from_value(v).ok()),
                    relation_id: r.get(12),
                    rows_copied: r.get(6),
                    range_done: r.get(7),
                    done_lsn: r.get::<_, Option<&str>>(8).and_then(lsn::parse),
                    started_lsn: r.get::<_, Option<&str>>(9).and_then(lsn::parse),
                    pass: 0,
                },
            );
        }
        let upgraded = !new_pipeline && known.is_empty();
        // A table no longer listed forgets its snapshot: listed again later, it is added
        // anew and copied (its changes in between were not captured).
        for table in known.keys().filter(|t| !cfg.tables.contains(t)) {
            tx.execute(
                &format!(
                    "DELETE FROM {schema}.cdc_snapshots WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3"
                ),
                &[&pipeline, &table.schema, &table.name],
            )
            .await
            .map_err(err)?;
        }
        let mut states = Vec::new();
        for table in &cfg.tables {
            let resync = cfg
                .snapshot
                .resync
                .as_ref()
                .filter(|(_, tables)| tables.contains(table))
                .map(|(id, _)| format!("resync:{id}"));
            let entry = published.get(&table.to_string()).map(String::as_str);
            let followed = followed.get(table).cloned().flatten();
            // The rows the publication takes in or leaves out changed since the copy: rows
            // it takes in now were never copied (a table copied before schema 9 followed
            // what it publishes now).
            let name = table.to_string();
            let changed = pending.add.contains(&name)
                || pending.renew.contains(&name)
                || followed.as_deref().is_some_and(|f| Some(f) != entry);
            let never = cfg.snapshot.mode == SnapshotMode::Never;
            let asked = match known.get(table) {
                Some(s) if resync.as_ref().is_some_and(|r| *r != s.request) => resync,
                // Never: a copy the pipeline asked for itself (a new pipeline, an added or
                // changed table) and has not finished is dropped; one a user asked for
                // explicitly (resync, philotes snapshot, recover) is still carried out.
                Some(s)
                    if s.to_copy()
                        && never
                        && matches!(s.request.as_str(), "initial" | "added" | "changed") =>
                {
                    Some("skipped".to_string())
                }
                // Under Never, and for a resync the spec still names (carried out once per
                // id), the request keeps its name and starts over.
                Some(s) if changed && (!never || s.to_copy()) => {
                    tracing::info!(pipeline = %cfg.id, table = %table, was = followed.as_deref().unwrap_or("?"),
                        now = entry.unwrap_or("?"), "the table's column list or row filter changed; copying it again");
                    Some(if never || resync.as_ref() == Some(&s.request) {
                        s.request.clone()
                    } else {
                        "changed".to_string()
                    })
                }
                Some(s) => {
                    if followed.as_deref() != entry {
                        note_published(&tx, schema, &pipeline, table, entry)
                            .await
                            .map_err(err)?;
                    }
                    states.push(s.clone());
                    continue;
                }
                None if upgraded || never => resync.or(Some("skipped".to_string())),
                None if new_pipeline => resync.or(Some("initial".to_string())),
                None => resync.or(Some("added".to_string())),
            };
            let Some(request) = asked else { continue };
            let state = TableState::requested(table.clone(), request);
            save_request(&tx, schema, &pipeline, &state, entry)
                .await
                .map_err(err)?;
            states.push(state);
        }
        tx.commit().await.map_err(err)?;
        Ok(states)
    }

    /// Asks for the tables to be copied again (`philotes snapshot`, and after a gap).
    pub async fn request_snapshot(&mut self, tables: &[TableName], request: &str) -> Result<()> {
        let err = |e: tokio_postgres::Error| buffer_error(&e);
        let (schema, pipeline) = (self.schema.clone(), self.pipeline.clone());
        let tx = self.guarded().await?;
        for table in tables {
            let state = TableState::requested(table.clone(), request.to_string());
            save_request(&tx, &schema, &pipeline, &state, None)
                .await
                .map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }

    /// Removes the pipeline's checkpoint and its tables' snapshot states, in one transaction
    /// (its events stay for consumers). A pipeline created later under the same name is new:
    /// it copies its tables again, as rows may have changed while no slot kept their changes.
    /// A `Done` state left behind would have it skip the copy and miss those rows.
    pub async fn delete_checkpoint(&mut self) -> Result<()> {
        let err = |e: tokio_postgres::Error| buffer_error(&e);
        let (schema, pipeline) = (self.schema.clone(), self.pipeline.clone());
        let tx = self.guarded().await?;
        for table in ["cdc_checkpoints", "cdc_snapshots"] {
            tx.execute(
                &format!("DELETE FROM {schema}.{table} WHERE pipeline = $1"),
                &[&pipeline],
            )
            .await
            .map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }

    /// Acknowledges a gap: records it in `cdc_gaps`, restarts the checkpoint at `to_lsn`
    /// with the identity of the source and new slot it continues on, and asks for `copy`
    /// (tables, request) to be copied again, in one transaction: a recovery cut short leaves
    /// either all of it or none (and is then carried out again, as the gap is still there).
    pub async fn record_gap(
        &mut self,
        gap: &Gap,
        id: &Recorded,
        copy: Option<(&[TableName], &str)>,
    ) -> Result<()> {
        let err = |e: tokio_postgres::Error| buffer_error(&e);
        let (schema, pipeline) = (self.schema.clone(), self.pipeline.clone());
        let tx = self.guarded().await?;
        tx.execute(
            &format!(
                "INSERT INTO {schema}.cdc_gaps (pipeline, from_lsn, to_lsn, reason, message) \
                 VALUES ($1, $2::text::pg_lsn, $3::text::pg_lsn, $4, $5)"
            ),
            &[
                &pipeline,
                &lsn::format(gap.from_lsn),
                &lsn::format(gap.to_lsn),
                &gap.reason,
                &gap.message,
            ],
        )
        .await
        .map_err(err)?;
        tx.execute(
            &format!(
                "UPDATE {schema}.cdc_checkpoints SET lsn = $2::text::pg_lsn, updated_at = now() WHERE pipeline = $1"
            ),
            &[&pipeline, &lsn::format(gap.to_lsn)],
        )
        .await
        .map_err(err)?;
        let restarted = Checkpoint {
            lsn: gap.to_lsn,
            ..Checkpoint::default()
        };
        upsert_identity(&tx, &schema, &pipeline, &restarted, id)
            .await
            .map_err(err)?;
        for table in copy.map_or(&[][..], |(tables, _)| tables) {
            let request = copy.map_or("", |(_, r)| r).to_string();
            save_request(
                &tx,
                &schema,
                &pipeline,
                &TableState::requested(table.clone(), request),
                None,
            )
            .await
            .map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }

    /// The writer task: runs the requests in order, one buffer transaction per commit
    /// request, until the loop drops its end. A transaction the loop did not ask to commit
    /// is rolled back (the COPY is aborted), and the buffer is handed back either way.
    async fn serve(
        mut self,
        mut ops: mpsc::Receiver<WriteOp>,
        done: mpsc::UnboundedSender<Committed>,
    ) -> (Buffer, Result<()>) {
        let result = match self.serve_requests(&mut ops, &done).await {
            // Said once the transaction is gone (a COPY may have been open in it).
            Err(Error::Fenced(_)) => {
                Err(fenced(&self.client, &self.fenced_by, &self.pipeline, self.epoch).await)
            }
            other => other,
        };
        (self, result)
    }

    async fn serve_requests(
        &mut self,
        ops: &mut mpsc::Receiver<WriteOp>,
        done: &mpsc::UnboundedSender<Committed>,
    ) -> Result<()> {
        let err = |e: tokio_postgres::Error| buffer_error(&e);
        // The COPY into cdc_event_log: a row its rules refuse is a refused change.
        let events_err = |e: tokio_postgres::Error| event_error(&e);
        while let Some(mut op) = ops.recv().await {
            let tx = self.client.transaction().await.map_err(err)?;
            // Fencing first: the epoch check is the transaction's first statement, so a
            // superseded session writes nothing (and says so, rather than run into the new
            // writer's rows), and the share lock it holds to the commit makes a new session's
            // epoch wait for this transaction. It is sent together with the transaction's
            // next statement (pipelined: the server runs them in order) rather than waited for
            // on its own, which cost a round trip per buffer transaction.
            let params: [&(dyn ToSql + Sync); 2] = [&self.pipeline, &self.epoch];
            let check = || tx.query_opt(&self.check_epoch, &params);
            // Open once the first rows arrive, with the epoch checked before it.
            let mut copy = None;
            loop {
                match op {
                    WriteOp::Rows(rows) => {
                        let sink = match copy.as_mut() {
                            Some(sink) => sink,
                            None => {
                                // The check is queued before the COPY, never after it: the
                                // client writes a request queued behind a COPY only once the
                                // COPY ends, and this COPY ends only after the check answered
                                // (a deadlock, seen when both statements were prepared
                                // concurrently and the COPY's was ready first). Its first poll
                                // queues it (the statement is prepared); pipelined with the
                                // COPY, it costs no round trip of its own.
                                let mut check = std::pin::pin!(check());
                                let early = futures_util::poll!(check.as_mut());
                                let started = tx.copy_in::<_, Bytes>(&self.copy_events);
                                let (current, started) = match early {
                                    std::task::Poll::Ready(current) => (current, started.await),
                                    std::task::Poll::Pending => futures_util::join!(check, started),
                                };
                                if current.map_err(err)?.is_none() {
                                    // Dropping the COPY and the transaction aborts both;
                                    // `serve` says who took over, once they are gone.
                                    return Err(Error::Fenced(String::new()));
                                }
                                let mut sink = Box::pin(started.map_err(events_err)?);
                                sink.feed(Bytes::from_static(COPY_HEADER))
                                    .await
                                    .map_err(events_err)?;
                                copy.insert(sink)
                            }
                        };
                        sink.send(rows).await.map_err(events_err)?;
                    }
                    WriteOp::Commit(commit) => {
                        let started = Instant::now();
                        // No rows, so no COPY: the epoch is checked here.
                        if copy.is_none() && check().await.map_err(err)?.is_none() {
                            return Err(Error::Fenced(String::new()));
                        }
                        if let Some(mut sink) = copy.take() {
                            sink.feed(Bytes::from_static(&COPY_TRAILER))
                                .await
                                .map_err(events_err)?;
                            sink.as_mut().finish().await.map_err(events_err)?;
                        }
                        for d in &commit.dead_letters {
                            insert_dead_letter(&tx, &self.schema, &self.pipeline, d)
                                .await
                                .map_err(err)?;
                        }
                        for t in &commit.tables {
                            insert_table(
                                &tx,
                                &self.insert_table,
                                (self.pipeline_id, &self.pipeline),
                                t,
                            )
                            .await?;
                        }
                        for r in &commit.relations {
                            insert_relation(&tx, &self.insert_relation, &self.pipeline, r)
                                .await
                                .map_err(err)?;
                        }
                        for t in &commit.snapshots {
                            save_snapshot(&tx, &self.schema, &self.pipeline, t)
                                .await
                                .map_err(err)?;
                        }
                        let written = upsert_checkpoint(
                            &tx,
                            &self.upsert_checkpoint,
                            (&self.pipeline, self.epoch),
                            &commit.checkpoint,
                        )
                        .await
                        .map_err(err)?;
                        if written == 0 {
                            // Dropping the transaction rolls it back: nothing of it is kept.
                            return Err(Error::Fenced(String::new()));
                        }
                        tx.commit().await.map_err(err)?;
                        // The loop may be gone (it stopped on an error): the commit stands,
                        // and the next session reads the checkpoint from the buffer.
                        let _ = done.send(Committed {
                            checkpoint: commit.checkpoint,
                            counts: commit.counts,
                            elapsed: started.elapsed(),
                        });
                        break;
                    }
                }
                match ops.recv().await {
                    Some(next) => op = next,
                    // The loop stopped mid-transaction: dropping the COPY and the transaction
                    // aborts both.
                    None => return Ok(()),
                }
            }
        }
        Ok(())
    }
}

/// The error of a session whose commit found a newer epoch: who took over, and since when.
async fn fenced(client: &impl GenericClient, statement: &str, pipeline: &str, epoch: i64) -> Error {
    let by = match client.query_opt(statement, &[&pipeline]).await {
        Ok(Some(row)) => {
            let (writer, current, since): (String, i64, String) =
                (row.get(0), row.get(1), row.get(2));
            format!("{writer} (epoch {current}, since {since})")
        }
        _ => "another session".to_string(),
    };
    Error::Fenced(format!(
        "pipeline {pipeline} is now written to the buffer by {by}, not by this session (epoch {epoch}): its last transaction was \
         rolled back and it stops rather than take the pipeline back; if that writer should not exist, stop it first"
    ))
}

/// Records what an event's `table_id` stands for, in the transaction of the first events
/// that use it. Two tables whose 64-bit ids collide stop the pipeline rather than have one's
/// events read as the other's.
async fn insert_table(
    client: &impl GenericClient,
    statement: &str,
    (pipeline_id, pipeline): (i32, &str),
    t: &TableRef,
) -> Result<()> {
    let known = client
        .query_opt(
            statement,
            &[&pipeline_id, &t.id, &t.schema, &t.name, &t.keys],
        )
        .await
        .map_err(|e| buffer_error(&e))?;
    let Some(row) = known else { return Ok(()) };
    let (schema, name, keys): (String, String, Vec<String>) = (row.get(0), row.get(1), row.get(2));
    if schema == t.schema && name == t.name && keys == t.keys {
        return Ok(());
    }
    Err(Error::BufferSetup(format!(
            "table {}.{} (key {:?}) of pipeline {} has the same cdc_tables id {} as {schema}.{name} (key {keys:?}); \
             its events cannot be told apart, so Philotes stops: capture one of them in another pipeline and report this",
            t.schema, t.name, t.keys, pipeline, t.id
        )))
}

/// The pipeline's id in `cdc_pipelines`, added on its first start.
async fn pipeline_id(
    client: &Client,
    schema: &str,
    pipeline: &str,
) -> std::result::Result<i32, tokio_postgres::Error> {
    let select = format!("SELECT id FROM {schema}.cdc_pipelines WHERE name = $1");
    // Read first: a buffer that already knows the pipeline needs no write here.
    if let Some(row) = client.query_opt(&select, &[&pipeline]).await? {
        return Ok(row.get(0));
    }
    let insert = format!(
        "INSERT INTO {schema}.cdc_pipelines (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id"
    );
    if let Some(row) = client.query_opt(&insert, &[&pipeline]).await? {
        return Ok(row.get(0));
    }
    // Another process added it meanwhile.
    Ok(client.query_one(&select, &[&pipeline]).await?.get(0))
}

/// Requests to the [`Writer`], in order.
pub enum WriteOp {
    /// `cdc_events` rows from a [`RowEncoder`], for the transaction being written.
    Rows(Bytes),
    /// Ends the transaction: the table definitions, the checkpoint, COMMIT.
    Commit(Commit),
}

/// A change set aside instead of written as an event.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub at: Position,
    pub schema: String,
    pub table: String,
    pub operation: Operation,
    pub reason: String,
    /// The pgoutput message as received.
    pub message: Bytes,
}

pub struct Commit {
    /// The table references first used by this transaction's rows (`cdc_tables`).
    pub tables: Vec<TableRef>,
    pub relations: Vec<RelationRecord>,
    /// Tables whose snapshot advanced with this transaction's rows (`cdc_snapshots`).
    pub snapshots: Vec<TableState>,
    pub dead_letters: Vec<DeadLetter>,
    pub checkpoint: Checkpoint,
    pub counts: Vec<Count>,
}

/// How many events of one table and operation a transaction wrote (runs, in order).
#[derive(Debug, Clone)]
pub struct Count {
    pub relation: Arc<Relation>,
    pub operation: Operation,
    pub events: u64,
}

/// A buffer transaction that committed, reported in commit order.
pub struct Committed {
    pub checkpoint: Checkpoint,
    pub counts: Vec<Count>,
    /// From the commit request to the commit.
    pub elapsed: Duration,
}

/// Requests queued for the writer at most (each at most a few hundred KB of rows).
const QUEUED_REQUESTS: usize = 8;

/// The loop's end of the writer task. Dropped without [`Writer::close`] (the pipeline's task
/// was aborted), it aborts the writer too, so a writer stuck on an unresponsive buffer does
/// not outlive its pipeline.
pub struct Writer {
    ops: mpsc::Sender<WriteOp>,
    committed: mpsc::UnboundedReceiver<Committed>,
    task: Option<JoinHandle<(Buffer, Result<()>)>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Writer {
    pub fn spawn(buffer: Buffer) -> Writer {
        let (ops, requests) = mpsc::channel(QUEUED_REQUESTS);
        let (done, committed) = mpsc::unbounded_channel();
        Writer {
            ops,
            committed,
            task: Some(tokio::spawn(buffer.serve(requests, done))),
        }
    }

    /// Waits for room for `n` requests in the queue. Cancel-safe: nothing is taken from the
    /// caller until the permits are used, so a caller cancelled here still holds everything
    /// it meant to send.
    pub async fn reserve(&self, n: usize) -> Result<mpsc::PermitIterator<'_, WriteOp>> {
        self.ops
            .reserve_many(n)
            .await
            .map_err(|_| Error::Buffer("the buffer writer stopped".into()))
    }

    /// The next committed transaction; `None` once the writer stopped.
    pub async fn committed(&mut self) -> Option<Committed> {
        self.committed.recv().await
    }

    /// Lets the writer finish what is queued (an unfinished transaction is rolled back) and
    /// hands the buffer back, with the writer's error if it failed.
    /// Also returns the commits reported that the loop had not read yet.
    pub async fn close(mut self) -> (Option<Buffer>, Result<()>, Vec<Committed>) {
        let Some(task) = self.task.take() else {
            return (
                None,
                Err(Error::Buffer("the buffer writer is gone".into())),
                Vec::new(),
            );
        };
        let mut reports = std::mem::replace(&mut self.committed, mpsc::unbounded_channel().1);
        // The writer sees the end of its queue once this side is dropped.
        drop(self);
        let (buffer, result) = match task.await {
            Ok((buffer, result)) => (Some(buffer), result),
            Err(e) => (
                None,
                Err(Error::Buffer(format!("the buffer writer failed: {e}"))),
            ),
        };
        let mut unread = Vec::new();
        while let Ok(c) = reports.try_recv() {
            unread.push(c);
        }
        (buffer, result, unread)
    }
}

async fn insert_relation(
    client: &impl GenericClient,
    statement: &str,
    pipeline: &str,
    r: &RelationRecord,
) -> std::result::Result<u64, tokio_postgres::Error> {
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
    client
        .execute(
            statement,
            &[
                &pipeline,
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
}

/// Records a checkpoint's identity, inserting the checkpoint itself if the pipeline has none.
async fn upsert_identity(
    client: &impl GenericClient,
    schema: &str,
    pipeline: &str,
    checkpoint: &Checkpoint,
    id: &Recorded,
) -> std::result::Result<u64, tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.cdc_checkpoints AS c (pipeline, lsn, events_total, system_identifier, timeline, database, \
                 slot_name, publication_name, slot_start_lsn) VALUES ($1, $2::text::pg_lsn, $3, $4, $5, $6, $7, $8, $9::text::pg_lsn) \
                 ON CONFLICT (pipeline) DO UPDATE SET system_identifier = excluded.system_identifier, timeline = excluded.timeline, \
                 database = excluded.database, slot_name = excluded.slot_name, publication_name = excluded.publication_name, \
                 slot_start_lsn = excluded.slot_start_lsn"
            ),
            &[
                &pipeline,
                &lsn::format(checkpoint.lsn),
                &checkpoint.events_total,
                &id.system_identifier,
                &id.timeline.map(|t| t as i32),
                &id.database,
                &id.slot,
                &id.publication,
                &id.slot_start_lsn.map(lsn::format),
            ],
        )
        .await
}

async fn insert_dead_letter(
    client: &impl GenericClient,
    schema: &str,
    pipeline: &str,
    d: &DeadLetter,
) -> std::result::Result<u64, tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.cdc_dead_letters (pipeline, commit_lsn, seq, lsn, xid, commit_time, schema_name, \
                 table_name, operation, reason, message) VALUES ($1, $2::text::pg_lsn, $3, $4::text::pg_lsn, $5, \
                 timestamptz '2000-01-01 00:00:00+00' + $6::float8 * interval '1 microsecond', $7, $8, $9, $10, $11)"
            ),
            &[
                &pipeline,
                &lsn::format(d.at.commit_lsn),
                &d.at.seq,
                &lsn::format(d.at.lsn),
                &i64::from(d.at.xid),
                &(d.at.commit_time as f64),
                &d.schema,
                &d.table,
                &d.operation.as_str(),
                &d.reason,
                &d.message.as_ref(),
            ],
        )
        .await
}

/// Records a request to copy a table (or that it is skipped: captured without a copy),
/// following `published`: the table's entry in the publication (`None`: unknown here, the one recorded is kept).
async fn save_request(
    client: &impl GenericClient,
    schema: &str,
    pipeline: &str,
    t: &TableState,
    published: Option<&str>,
) -> std::result::Result<u64, tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.cdc_snapshots (pipeline, schema_name, table_name, request, phase, published) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (pipeline, schema_name, table_name) DO UPDATE SET request = excluded.request, phase = excluded.phase, \
                 last_key = NULL, reread = NULL, key_names = NULL, key_kinds = NULL, relation_id = NULL, rows_copied = 0, range_done = false, done_lsn = NULL, started_lsn = NULL, \
                 published = coalesce(excluded.published, cdc_snapshots.published), requested_at = now(), updated_at = now()"
            ),
            &[&pipeline, &t.table.schema, &t.table.name, &t.request, &t.phase.as_str(), &published],
        )
        .await
}

/// Records the table's entry in the publication its copy follows (unchanged in what it
/// takes in, or `mode: Never`).
async fn note_published(
    client: &impl GenericClient,
    schema: &str,
    pipeline: &str,
    table: &TableName,
    published: Option<&str>,
) -> std::result::Result<u64, tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "UPDATE {schema}.cdc_snapshots SET published = $4 WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3"
            ),
            &[&pipeline, &table.schema, &table.name, &published],
        )
        .await
}

/// Records how far a table's snapshot got, with the chunk's rows.
async fn save_snapshot(
    client: &impl GenericClient,
    schema: &str,
    pipeline: &str,
    t: &TableState,
) -> std::result::Result<u64, tokio_postgres::Error> {
    let last_key = t
        .last_key
        .as_ref()
        .map(|k| serde_json::json!(k).to_string());
    let reread = (!t.reread.is_empty()).then(|| serde_json::json!(t.reread.as_slice()).to_string());
    let key_names = t
        .key_names
        .as_ref()
        .map(|k| serde_json::json!(k).to_string());
    let key_kinds = t
        .key_kinds
        .as_ref()
        .map(|k| serde_json::json!(k).to_string());
    client
        .execute(
            &format!(
                "UPDATE {schema}.cdc_snapshots SET phase = $4, last_key = $5::text::json, reread = $6::text::json, rows_copied = $7, \
                 range_done = $8, done_lsn = $9::text::pg_lsn, started_lsn = $10::text::pg_lsn, key_names = $11::text::json, \
                 key_kinds = $12::text::json, relation_id = $13, \
                 updated_at = now() \
                 WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3"
            ),
            &[
                &pipeline,
                &t.table.schema,
                &t.table.name,
                &t.phase.as_str(),
                &last_key,
                &reread,
                &t.rows_copied,
                &t.range_done,
                &t.done_lsn.map(lsn::format),
                &t.started_lsn.map(lsn::format),
                &key_names,
                &key_kinds,
                &t.relation_id,
            ],
        )
        .await
}

/// Upserts the checkpoint if `epoch` is still the pipeline's in `cdc_writers`: 0 rows when
/// it is not.
async fn upsert_checkpoint(
    client: &impl GenericClient,
    statement: &Statement,
    (pipeline, epoch): (&str, i64),
    checkpoint: &Checkpoint,
) -> std::result::Result<u64, tokio_postgres::Error> {
    let (last_commit, last_seq) = match checkpoint.last_event {
        Some((c, s)) => (Some(lsn::format(c)), Some(s)),
        None => (None, None),
    };
    client
        .execute(
            statement,
            &[
                &pipeline,
                &lsn::format(checkpoint.lsn),
                &last_commit,
                &last_seq,
                &checkpoint.events_total,
                &epoch,
            ],
        )
        .await
}

/// Who writes in this process: the operator replica (`$POD_NAME`), else host and process id.
pub fn writer_name() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        format!("{host}/{}", std::process::id())
    })
}

/// The start of a binary COPY stream: signature, flags, header extension length.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The end of a binary COPY stream: a tuple with -1 fields.
const COPY_TRAILER: [u8; 2] = (-1i16).to_be_bytes();
/// `cdc_event_log` has 10 columns.
const EVENT_FIELDS: i16 = 10;

/// What a `cdc_tables` row says: the table of an event, as its rows reference it.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRef {
    pub id: i64,
    pub schema: String,
    pub name: String,
    pub keys: Vec<String>,
}

impl TableRef {
    /// The reference of a table description: a hash of its schema name, name and key columns
    /// (64-bit FNV-1a, halved so it is positive; ids moved from schema version 4 are negative).
    /// Stable across versions and processes, so a restart references the same row.
    pub fn of(rel: &Relation) -> TableRef {
        let keys: Vec<String> = rel.key_columns().map(str::to_string).collect();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let parts = [rel.schema.as_str(), rel.name.as_str()]
            .into_iter()
            .chain(keys.iter().map(String::as_str));
        for part in parts {
            // Each part ends with a byte no name contains, so ("ab", "c") and ("a", "bc")
            // differ.
            for b in part.bytes().chain([0]) {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        TableRef {
            id: (hash >> 1) as i64,
            schema: rel.schema.clone(),
            name: rel.name.clone(),
            keys,
        }
    }
}

/// Encodes `cdc_event_log` rows in COPY's binary format: no escaping on our side and no text
/// parsing of LSNs and timestamps on the buffer server's (which only validates the JSON
/// images).
pub struct RowEncoder {
    pipeline_id: i32,
    /// Per relation id: the definition the reference was made for, and the reference.
    tables: HashMap<u32, (Arc<Relation>, i64)>,
    /// References used by rows encoded in this session, and those not yet taken.
    used: HashSet<i64>,
    fresh: Vec<TableRef>,
    out: BytesMut,
}

impl RowEncoder {
    pub fn new(pipeline_id: i32) -> RowEncoder {
        RowEncoder {
            pipeline_id,
            tables: HashMap::new(),
            used: HashSet::new(),
            fresh: Vec::new(),
            out: BytesMut::with_capacity(ROWS_CHUNK + ROWS_CHUNK / 4),
        }
    }

    /// Appends one row.
    pub fn push(&mut self, at: &Position, change: &Change) {
        let rel = &change.relation;
        let table_id = match self.tables.get(&rel.id) {
            Some((known, id)) if Arc::ptr_eq(known, rel) => *id,
            _ => {
                let table = TableRef::of(rel);
                let id = table.id;
                if self.used.insert(id) {
                    self.fresh.push(table);
                }
                self.tables.insert(rel.id, (rel.clone(), id));
                id
            }
        };
        let out = &mut self.out;
        let images = [&change.before, &change.after];
        out.reserve(
            80 + images
                .iter()
                .map(|i| i.as_ref().map_or(0, |j| j.len() + 5))
                .sum::<usize>(),
        );
        out.put_i16(EVENT_FIELDS);
        out.put_i32(4);
        out.put_i32(self.pipeline_id);
        out.put_i32(8);
        out.put_u64(at.commit_lsn);
        out.put_i32(4);
        out.put_i32(at.seq);
        out.put_i32(8);
        out.put_u64(at.lsn);
        out.put_i32(8);
        out.put_i64(i64::from(at.xid));
        out.put_i32(8);
        out.put_i64(at.commit_time);
        out.put_i32(8);
        out.put_i64(table_id);
        out.put_i32(1);
        out.put_u8(change.operation.code());
        for image in images {
            match image {
                Some(json) => {
                    // json's binary input is its text.
                    put_field(out, json.as_bytes());
                }
                None => out.put_i32(-1),
            }
        }
    }

    /// The table references first used by the rows encoded since the last call: they go in
    /// the same buffer transaction as those rows.
    pub fn take_tables(&mut self) -> Vec<TableRef> {
        std::mem::take(&mut self.fresh)
    }

    /// Bytes encoded and not yet taken.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// The rows encoded since the last call.
    pub fn take(&mut self) -> Bytes {
        let rows = self.out.split().freeze();
        self.out.reserve(ROWS_CHUNK + ROWS_CHUNK / 4);
        rows
    }
}

/// Rows are handed to the writer in chunks of about this size.
pub const ROWS_CHUNK: usize = 128 * 1024;

fn put_field(out: &mut impl BufMut, value: &[u8]) {
    out.put_i32(value.len() as i32);
    out.put_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::decode::Column;

    #[test]
    fn rows_are_encoded_in_binary_copy_format() {
        let rel = Arc::new(Relation {
            id: 1,
            schema: "s".into(),
            name: "t".into(),
            replica_identity: 'd',
            columns: vec![Column {
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
                key: true,
            }],
        });
        let at = Position {
            commit_lsn: 0x1_0000_0010,
            seq: 3,
            lsn: 0x1_0000_0008,
            xid: 77,
            commit_time: -1,
        };
        let change = Change {
            relation: rel,
            operation: Operation::Insert,
            before: None,
            after: Some("{}".into()),
        };
        let mut enc = RowEncoder::new(7);
        enc.push(&at, &change);
        let mut want: Vec<u8> = vec![0, 10];
        let field = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend((b.len() as i32).to_be_bytes());
            out.extend(b);
        };
        field(&mut want, &7i32.to_be_bytes());
        field(&mut want, &0x1_0000_0010u64.to_be_bytes());
        field(&mut want, &3i32.to_be_bytes());
        field(&mut want, &0x1_0000_0008u64.to_be_bytes());
        field(&mut want, &77i64.to_be_bytes());
        field(&mut want, &(-1i64).to_be_bytes());
        let table = TableRef::of(&change.relation);
        field(&mut want, &table.id.to_be_bytes());
        field(&mut want, b"I");
        want.extend((-1i32).to_be_bytes());
        field(&mut want, b"{}");
        assert_eq!(enc.take().as_ref(), want.as_slice());
        assert!(enc.is_empty());
        // The reference is recorded with the first rows that use it, once.
        assert_eq!(
            enc.take_tables(),
            [TableRef {
                id: table.id,
                schema: "s".into(),
                name: "t".into(),
                keys: vec!["id".into()],
            }]
        );
        enc.push(&at, &change);
        assert!(enc.take_tables().is_empty());
    }

    #[test]
    fn table_references_are_stable_and_tell_names_apart() {
        let rel = |schema: &str, name: &str, key: &str| Relation {
            id: 1,
            schema: schema.into(),
            name: name.into(),
            replica_identity: 'd',
            columns: vec![Column {
                name: key.into(),
                type_oid: 23,
                type_modifier: -1,
                key: true,
            }],
        };
        // Fixed: the same table gets the same id in every version and process (the value
        // is FNV-1a 64 of "public\0t\0id\0", shifted right by one, computed independently).
        assert_eq!(
            TableRef::of(&rel("public", "t", "id")).id,
            0x5864_4038_2c2c_db4d
        );
        let ids = [
            TableRef::of(&rel("public", "t", "id")).id,
            TableRef::of(&rel("public", "t", "key")).id,
            TableRef::of(&rel("publi", "ct", "id")).id,
            TableRef::of(&rel("public", "ti", "d")).id,
        ];
        assert!(ids.iter().all(|id| *id >= 0), "{ids:?}");
        let distinct: HashSet<i64> = ids.into_iter().collect();
        assert_eq!(distinct.len(), 4);
    }
}
