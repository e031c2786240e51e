//! The replication loop.
//!
//! # LSN rules
//!
//! - **received**: the highest position the stream has reported (a commit's end, or a
//!   keepalive's WAL end). Nothing follows from it.
//! - **submitted**: events stream to the buffer writer as they are decoded, into a buffer
//!   transaction that is not committed yet. `safe_lsn` is the position a checkpoint may claim
//!   once the events before it are committed: the end of the last commit received, or a
//!   keepalive's WAL end when no transaction is open (nothing before it is missing). It never
//!   moves while a transaction is open, so a checkpoint never claims a transaction whose
//!   changes are only partly written. A commit request hands the writer the checkpoint
//!   `submitted` (then equal to `safe_lsn`) to commit with the events.
//! - **checkpointed**: `ckpt.lsn`, committed in the buffer in the same transaction as the
//!   events it covers, and known here once the writer reports that commit. Together with
//!   `ckpt.last_event` (the last event written, possibly part of an unfinished transaction) it
//!   is the whole durable state: a restart streams from `ckpt.lsn` and skips events at or
//!   before `ckpt.last_event`.
//! - **confirmed to the source**: only ever `ckpt.lsn`, and only after the writer reported the
//!   buffer transaction that wrote it committed. Invariant: confirmed ≤ checkpointed ≤
//!   submitted ≤ safe_lsn ≤ received.
//!
//! # Cancellation rule
//!
//! Any await on the data path may be where the loop stops: a `select!` branch not taken, a
//! `timeout`, the task aborted by its supervisor, the process killed. So at every await the
//! in-memory state claims only what is already handed over: `pending.last_event` and the
//! pending counts cover exactly the rows in the encoder and in requests already queued to the
//! writer. Requests are queued with a permit reserved first ([`Writer::reserve`]), and rows are
//! taken from the encoder only once the permit is held, so a wait for room that is cancelled
//! leaves everything where it was. The branches of the loop's `select!` wait only on
//! cancel-safe receivers (the shutdown watch, the writer's and the stream's channels, a
//! timer); the work a branch starts runs to completion. One exception, outside the data: once
//! the stream's worker has ended, `recv` collects its error from the worker's join handle,
//! and if that wait is cancelled the error is lost (the next `recv` reports only that the
//! worker is gone). Nothing is claimed by it: the session ends as a transient stream error,
//! and the next session meets the cause again and classifies it then. Nothing on the data
//! path is wrapped in a `timeout`. If the task is aborted, all of this state is dropped with
//! it: the buffer holds the durable state (its uncommitted transaction is rolled back when the
//! writer dies with the task), and the next session starts from the checkpoint.
//!
//! Snapshots (see [`snapshot`]): the snapshot task's channel is read in a `select!` branch
//! (an mpsc receive: one not taken leaves the chunk queued) and, at a chunk's close
//! watermark, awaited inside the stream branch's work, which is never cancelled by the
//! `select!`. The task itself is aborted when the session ends (`AbortOnDrop`): it holds
//! nothing durable (each chunk's rows and the table's progress are written by the loop in
//! one buffer transaction), and its read-only transaction on the source ends with its
//! connection. A chunk handed over but not yet written is read again by the next session.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationEvent};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use super::buffer::{
    Buffer, Checkpoint, Commit, Committed, Count, DeadLetter, Position, RelationRecord, RowEncoder,
    WriteOp, Writer, ROWS_CHUNK,
};
use super::config::{PipelineConfig, TableName};
use super::decode::{Change, Decoded, Decoder, Poison, Relation};
use super::error::{Error, Result};
use super::identity::{self, Recorded, SourceNow};
use super::snapshot::{self, Closed, Link, Phase, TableProgress, TableState, Watermark, Window};
use super::source;
use crate::crd::PoisonEventPolicy;
use bytes::Bytes;

/// Told about every batch the buffer committed (the operator's metrics).
pub trait BatchObserver: Send + Sync {
    /// `counts`: events per table and operation, in runs; `elapsed`: from the commit request
    /// to the commit.
    fn batch_written(&self, pipeline: &str, counts: &[Count], elapsed: Duration);
}

/// How the standalone runner or the operator wants a pipeline run.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Stop, with [`Outcome::CaughtUp`], once everything committed on the source before the
    /// start is durable in the buffer.
    pub until_caught_up: bool,
    /// Retry transient errors during the first start too (the operator does; the standalone
    /// runner reports them and exits).
    pub retry_setup: bool,
    pub observer: Option<Arc<dyn BatchObserver>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Shut down on request, after flushing and checkpointing.
    Stopped,
    /// `until_caught_up` reached its target.
    CaughtUp,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum State {
    #[default]
    Starting,
    Streaming,
    /// A transient error ended the last session; the loop waits and tries again.
    Retrying,
    Stopped,
    Failed,
}

/// What the loop publishes for status and metrics.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub state: State,
    pub received_lsn: u64,
    pub checkpoint_lsn: u64,
    pub events_total: i64,
    pub last_checkpoint_time: Option<SystemTime>,
    /// `(reason, message)` of the last error, cleared by the next successful write.
    pub last_error: Option<(String, String)>,
    pub slot_created: bool,
    pub publication_created: bool,
    /// The slot and publication streamed from (a checkpointed pipeline keeps the names it
    /// recorded); empty until the first session read its checkpoint.
    pub slot: String,
    pub publication: String,
    /// Snapshots of existing rows, per listed table.
    pub snapshots: Vec<TableProgress>,
}

/// Runs the pipeline until shutdown is signalled (or, with `until_caught_up`, until caught up),
/// retrying transient errors with backoff. Returns the first permanent error.
pub async fn run(
    cfg: PipelineConfig,
    opts: RunOptions,
    mut shutdown: watch::Receiver<bool>,
    progress: watch::Sender<Progress>,
) -> Result<Outcome> {
    let mut carried = Carried {
        buffer: None,
        target: None,
        started: false,
    };
    let mut backoff = Backoff::new();
    let mut isolation = Isolation::default();
    loop {
        let result = session(
            &cfg,
            &opts,
            &mut carried,
            &mut shutdown,
            &progress,
            &isolation,
        )
        .await;
        let result = match result {
            Err(Error::ValueRefused {
                message,
                at,
                upto,
                row,
                copied,
            }) => {
                let refused = Refused {
                    reason: message,
                    at,
                    upto,
                    row,
                    copied,
                };
                match isolate(&cfg, &mut isolation, refused) {
                    Ok(step) => {
                        // The batch was rolled back and nothing of it confirmed: the next
                        // session starts from the checkpoint before it.
                        tracing::warn!(pipeline = %cfg.id, "{step}");
                        progress.send_modify(|p| {
                            p.state = State::Retrying;
                            p.last_error = Some(("BufferRefusedValue".into(), step));
                        });
                        if *shutdown.borrow() {
                            progress.send_modify(|p| p.state = State::Stopped);
                            return Ok(Outcome::Stopped);
                        }
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        match result {
            Ok(outcome) => {
                progress.send_modify(|p| p.state = State::Stopped);
                return Ok(outcome);
            }
            // A slot or writer lock held by another process is waited for even on the first
            // start: after a crash the old session lingers for a moment.
            Err(e)
                if e.is_transient()
                    && (carried.started
                        || opts.retry_setup
                        || matches!(e, Error::SlotInUse(_))) =>
            {
                if matches!(e, Error::Buffer(_)) {
                    carried.buffer = None;
                }
                if carried.buffer.as_ref().is_some_and(|b| b.is_closed()) {
                    carried.buffer = None;
                }
                let wait = backoff.next();
                tracing::warn!(pipeline = %cfg.id, reason = e.reason(), error = %e, retry_in = ?wait, "pipeline interrupted; retrying");
                progress.send_modify(|p| {
                    p.state = State::Retrying;
                    p.last_error = Some((e.reason().to_string(), e.to_string()));
                });
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {
                        progress.send_modify(|p| p.state = State::Stopped);
                        return Ok(Outcome::Stopped);
                    }
                }
            }
            Err(e) => {
                progress.send_modify(|p| {
                    p.state = State::Failed;
                    p.last_error = Some((e.reason().to_string(), e.to_string()));
                });
                return Err(e);
            }
        }
        if *shutdown.borrow() {
            progress.send_modify(|p| p.state = State::Stopped);
            return Ok(Outcome::Stopped);
        }
    }
}

/// How the loop deals with values the buffer server refused (see [`Error::ValueRefused`]): the
/// batch holding one was rolled back, so the changes before it are not written yet either.
#[derive(Clone, Debug, Default, PartialEq)]
struct Isolation {
    /// Changes found refused, at `(commit_lsn, seq)`, with the server's reason: each goes the
    /// way of `poisonEvents` (stop naming it, or set it aside) when the stream reaches it.
    refused: BTreeMap<(u64, i32), String>,
    /// Copied rows found refused, by table and key (a chunk read again puts its rows at new
    /// positions), with why: each goes the way of `poisonEvents` when a chunk holds it.
    refused_rows: BTreeMap<(String, String), String>,
    /// Finding the next one: one change (or set-aside change) per buffer transaction from
    /// the checkpoint, until only the refused one is rolled back and so named; back to
    /// batches once the checkpoint passes `until`, the last change taken before the failure
    /// (the refusal went away).
    finding: Option<Finding>,
}

#[derive(Clone, Debug, PartialEq)]
struct Finding {
    reason: String,
    until: Option<(u64, i32)>,
    /// The refused batch held copied rows. They are read again at new positions, after
    /// `until`, so passing it says nothing: the search ends once a chunk's progress commits
    /// (its rows went in one at a time, none refused).
    copied: bool,
}

/// What the loop knows of a buffer transaction the buffer refused (see [`Error::ValueRefused`]).
struct Refused {
    reason: String,
    at: Option<(u64, i32)>,
    upto: Option<(u64, i32)>,
    row: Option<Box<snapshot::CopiedRow>>,
    copied: bool,
}

/// The next isolation step after the buffer refused a value (`at`: the change, when the
/// refused transaction held just one, and `row`, when that change was a copied row; `upto`:
/// the last change taken), or the error that stops the pipeline. Each step either names a new
/// refused change (a copied row by its table and key) or starts finding one, and a search
/// that names nothing ends only past `upto` (and, for copied rows, once a chunk's progress
/// commits), so a stream with n refused values takes at most 2n steps plus one per chunk.
fn isolate(cfg: &PipelineConfig, now: &mut Isolation, refused: Refused) -> Result<String> {
    let Refused {
        reason,
        at,
        upto,
        row,
        copied,
    } = refused;
    if now.finding.is_none() {
        now.finding = Some(Finding {
            reason: reason.clone(),
            until: upto,
            copied,
        });
        return Ok(format!(
            "the buffer refused a value in a batch ({reason}); writing the changes after the checkpoint one at a time to find it"
        ));
    }
    if let Some(row) = row {
        let key = (row.table.clone(), row.key.clone());
        if now.refused_rows.contains_key(&key) {
            return Err(Error::BufferSetup(format!(
                "the buffer refuses a write of pipeline {} that holds no change it could set aside: {reason}; \
                 remove what refuses it (a trigger or constraint on the buffer's tables) and start again",
                cfg.id
            )));
        }
        now.refused_rows.insert(key, reason.clone());
        now.finding = None;
        return Ok(format!(
            "the buffer refuses the copied row {} of {}: {reason}; everything before it is written first, then spec.poisonEvents applies",
            row.shown, row.table
        ));
    }
    match at {
        Some(at) if !now.refused.contains_key(&at) => {
            now.refused.insert(at, reason.clone());
            now.finding = None;
            Ok(format!(
                "the buffer refuses the change at {} (seq {}): {reason}; everything before it is written first, then spec.poisonEvents applies",
                super::lsn::format(at.0),
                at.1
            ))
        }
        // The refused transaction held a change already set aside, or no change of a table
        // (a table definition): nothing left to set aside.
        _ => Err(Error::BufferSetup(format!(
            "the buffer refuses a write of pipeline {} that holds no change it could set aside: {reason}; \
             remove what refuses it (a trigger or constraint on the buffer's tables) and start again",
            cfg.id
        ))),
    }
}

struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(Duration::from_millis(250))
    }
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(30));
        d
    }
}

/// The transaction whose changes are arriving.
struct OpenTx {
    commit_lsn: u64,
    xid: u32,
    commit_time: i64,
    seq: i32,
}

/// What one session hands the next.
struct Carried {
    /// The buffer connection (with the pipeline's writer lock), while it is usable.
    buffer: Option<Buffer>,
    /// `until_caught_up`'s target, fixed by the first session.
    target: Option<u64>,
    /// A session streamed: setup errors are retried from then on.
    started: bool,
}

/// Holds a table's keys to read again to their bound ([`TableState::max_reread`]): past it,
/// the table's rows are copied again from its start.
fn bound_reread(cfg: &PipelineConfig, state: &mut TableState) {
    let max = TableState::max_reread(cfg.snapshot.chunk_size);
    if state.reread.len() > max {
        tracing::info!(pipeline = %cfg.id, table = %state.table, keys = state.reread.len(), max,
            "more keys to read again than a copy holds; copying the table's rows again from its start");
        state.restart_range();
    }
}

/// One connection's worth of streaming: provision, resume from the checkpoint, loop.
async fn session(
    cfg: &PipelineConfig,
    opts: &RunOptions,
    carried: &mut Carried,
    shutdown: &mut watch::Receiver<bool>,
    progress: &watch::Sender<Progress>,
    isolation: &Isolation,
) -> Result<Outcome> {
    let Carried {
        buffer: buffer_slot,
        target,
        started,
    } = carried;
    if buffer_slot.as_ref().is_none_or(|b| b.is_closed()) {
        *buffer_slot = Some(Buffer::open(cfg).await?);
    }
    let Some(buffer) = buffer_slot.as_mut() else {
        return Err(Error::Buffer("buffer connection missing".into()));
    };

    // Identity before position: the names the checkpoint was taken under, the slot it was
    // taken on, and the source system it came from are checked before anything streams.
    let stored = buffer.checkpoint().await?;
    let new_pipeline = stored.is_none();
    let cfg = &identity::streamed(cfg, stored.as_ref().map(|(_, r)| r))?;
    progress.send_modify(|p| {
        p.slot.clone_from(&cfg.slot);
        p.publication.clone_from(&cfg.publication);
    });
    // The session that streams is the one asked who the source is, so the answer describes
    // the server the stream then reads. With a checkpoint, the source is checked before its
    // slot is looked at (another server is reported as such, not as a lost slot); a new
    // pipeline has nothing to check and starts where the slot it provisions begins.
    let provision = || async {
        let source_client = cfg.source.connect("source").await?;
        source::provision(&source_client, cfg, stored.as_ref().map(|(c, _)| c.lsn)).await
    };
    let first = match &stored {
        Some(_) => None,
        None => Some(provision().await?),
    };
    let start_lsn = match (&stored, &first) {
        (Some((c, _)), _) => c.lsn,
        (None, Some(p)) => p.slot_confirmed_lsn,
        (None, None) => 0,
    };
    let repl_cfg = cfg.source.replication_config(
        &cfg.slot,
        &cfg.publication,
        start_lsn,
        cfg.buffer_size.min(MAX_QUEUED_MESSAGES),
        FEEDBACK_INTERVAL,
        cfg.stream_timeout,
    );
    let mut stream = on_source(cfg, "the replication connection", async {
        ReplicationClient::connect_gated(repl_cfg).await
    })
    .await?;
    let recorded = stored.as_ref().map(|(_, r)| r.clone()).unwrap_or_default();
    let (now, checked) =
        identify(&mut stream, cfg, stored.as_ref().map(|(c, r)| (c.lsn, r))).await?;
    checked?;
    // The client library asks for UTF-8. A SQL_ASCII source stores bytes unchecked, and the
    // walsender would fail the whole stream on the first value that is not UTF-8 (and again
    // on every retry); taking its bytes as they are lets the decoder find such a value and
    // deal with that one change (spec.poisonEvents).
    let encoding = on_source(
        cfg,
        "SHOW server_encoding",
        stream.simple_query("SHOW server_encoding"),
    )
    .await?;
    if encoding
        .first()
        .and_then(|row| row.first())
        .and_then(|v| v.as_deref())
        == Some(b"SQL_ASCII".as_slice())
    {
        on_source(
            cfg,
            "SET client_encoding",
            stream.simple_query("SET client_encoding = 'SQL_ASCII'"),
        )
        .await?;
    }
    // A snapshot renders timestamptz values in the stream's time zone.
    let time_zone = on_source(cfg, "SHOW TimeZone", stream.simple_query("SHOW TimeZone"))
        .await?
        .first()
        .and_then(|row| row.first())
        .and_then(|v| v.as_deref())
        .map(|v| String::from_utf8_lossy(v).into_owned());
    let provisioned = match first {
        Some(p) => p,
        None => provision().await?,
    };
    let target = *target.get_or_insert(provisioned.current_wal_lsn);
    let ckpt = stored.map_or(
        Checkpoint {
            lsn: provisioned.slot_confirmed_lsn,
            ..Checkpoint::default()
        },
        |(c, _)| c,
    );
    progress.send_modify(|p| {
        p.checkpoint_lsn = ckpt.lsn;
        p.received_lsn = p.received_lsn.max(ckpt.lsn);
        p.events_total = ckpt.events_total;
        p.slot_created |= provisioned.slot_created;
        p.publication_created |= provisioned.publication_created;
    });
    let slot_start = recorded
        .slot_start_lsn
        .unwrap_or(if provisioned.slot_created {
            provisioned.slot_confirmed_lsn
        } else {
            ckpt.lsn
        });
    // What to copy is recorded before the checkpoint exists, so a new pipeline that stops
    // before its first checkpoint still copies its tables when it starts again.
    let tables = buffer
        .snapshot_states(
            cfg,
            new_pipeline,
            &provisioned.published,
            &provisioned.pending,
        )
        .await?;
    // Philotes's own publication follows the spec once the copies that calls for are
    // recorded: a stop in between changes it on the next start, and copies then.
    if !provisioned.pending.is_empty() {
        let source_client = cfg.source.connect("source").await?;
        source::publish(&source_client, cfg, &provisioned.pending, true).await?;
    }
    let todo: Vec<TableState> = tables.iter().filter(|t| t.to_copy()).cloned().collect();
    progress.send_modify(|p| {
        p.snapshots = tables
            .iter()
            .map(|t| TableProgress {
                table: t.table.to_string(),
                phase: t.phase,
                rows_copied: t.rows_copied,
                rows_estimate: p
                    .snapshots
                    .iter()
                    .find(|s| s.table == t.table.to_string())
                    .and_then(|s| s.rows_estimate),
                request: t.request.clone(),
            })
            .collect();
    });
    let identity = Recorded::of(now, cfg, slot_start);
    if identity != recorded {
        buffer.save_identity(&ckpt, &identity).await?;
    }
    on_source(cfg, "START_REPLICATION", stream.start()).await?;
    on_source(cfg, "START_REPLICATION", stream.wait_started()).await?;
    if opts.until_caught_up && ckpt.lsn >= target && todo.is_empty() {
        // Nothing committed since the checkpoint: confirm it (a crash may have left the slot
        // behind it) and stop.
        stream.update_applied_lsn(Lsn(ckpt.lsn));
        confirm_and_stop(&mut stream, ckpt.lsn).await;
        return Ok(Outcome::CaughtUp);
    }
    *started = true;
    tracing::info!(pipeline = %cfg.id, slot = %cfg.slot, publication = %cfg.publication,
        from = %super::lsn::format(ckpt.lsn), "streaming");
    progress.send_modify(|p| {
        p.state = State::Streaming;
    });

    let Some(buffer) = buffer_slot.take() else {
        return Err(Error::Buffer("buffer connection missing".into()));
    };
    // The snapshot task runs beside the loop and dies with the session: its state is what
    // the loop wrote to the buffer with each chunk.
    let (snap, _copying) = if todo.is_empty() {
        (None, None)
    } else {
        let token = session_token();
        let (link, task) = snapshot::link(token.clone(), &todo);
        let handle = tokio::spawn(snapshot::copy(
            cfg.clone(),
            token,
            todo,
            task,
            progress.clone(),
            time_zone,
        ));
        (Some(link), Some(AbortOnDrop(handle)))
    };
    let mut st = Streamer {
        cfg,
        opts,
        target,
        decoder: Decoder::new(),
        written_relations: HashMap::new(),
        tx: None,
        encoder: RowEncoder::new(buffer.pipeline_id()),
        pending: Pending {
            events: 0,
            snapshot_events: 0,
            image_bytes: 0,
            counts: Vec::new(),
            relations: Vec::new(),
            dead_letters: Vec::new(),
            snapshots: Vec::new(),
            moved: Vec::new(),
            safe_lsn: ckpt.lsn,
            last_event: ckpt.last_event,
            last_row: None,
            deadline: None,
        },
        submitted: ckpt,
        ckpt,
        writer: Writer::spawn(buffer),
        progress,
        heard: Instant::now(),
        stream_idle: true,
        isolation: isolation.clone(),
        in_flight: VecDeque::new(),
        copying: None,
        snap,
        snapshot_submitted: None,
        snapshots_in_flight: VecDeque::new(),
    };
    let result = st.stream(&mut stream, shutdown).await;
    // Whatever happened, the writer finishes what it was asked to commit (an unfinished
    // transaction is rolled back) before the next session reads the checkpoint.
    let (buffer, closed, unread) = st.writer.close().await;
    *buffer_slot = buffer;
    for _ in unread {
        st.in_flight.pop_front();
        publish_snapshots(&mut st.snapshots_in_flight, st.progress, &st.cfg.id);
    }
    match (result, closed) {
        // Writing one change per transaction, the refused one is the oldest not committed.
        (_, Err(Error::ValueRefused { message, .. })) => {
            let finding = st.isolation.finding.is_some();
            let oldest = st.in_flight.front();
            Err(Error::ValueRefused {
                message,
                at: oldest.and_then(|t| t.one).filter(|_| finding),
                upto: st.pending.last_event,
                row: oldest
                    .and_then(|t| t.row.clone())
                    .filter(|_| finding)
                    .map(Box::new),
                copied: oldest.is_some_and(|t| t.copied),
            })
        }
        // The loop only saw that the writer stopped; the writer knows why.
        (Err(Error::Buffer(_)), Err(e)) | (Ok(_), Err(e)) => Err(e),
        (result, _) => result,
    }
}

/// The state of one streaming session.
struct Streamer<'a> {
    cfg: &'a PipelineConfig,
    opts: &'a RunOptions,
    /// `until_caught_up`'s target.
    target: u64,
    decoder: Decoder,
    /// Table definitions recorded in this session, to record only changes.
    written_relations: HashMap<u32, Arc<Relation>>,
    tx: Option<OpenTx>,
    /// Rows of the batch, encoded and not yet handed to the writer.
    encoder: RowEncoder,
    pending: Pending,
    /// What the last commit request to the writer claims.
    submitted: Checkpoint,
    /// What the buffer holds durably: the last commit the writer reported.
    ckpt: Checkpoint,
    writer: Writer,
    progress: &'a watch::Sender<Progress>,
    /// When the stream last delivered anything (a keepalive included).
    heard: Instant,
    /// Whether the last take from the stream emptied its queue: nothing more had arrived.
    stream_idle: bool,
    /// How a value the buffer refused is being dealt with.
    isolation: Isolation,
    /// Per commit request not yet reported committed, oldest first: what it holds, for
    /// finding a refused value.
    in_flight: VecDeque<InFlight>,
    /// The copied row [`Streamer::on_change`] is about to take (it takes this at once).
    copying: Option<snapshot::CopiedRow>,
    /// The link with this session's snapshot task, while it has tables to copy.
    snap: Option<Link>,
    /// The checkpoint (position, events) of the last commit request that carried snapshot
    /// progress: caught up means copied too, durably.
    snapshot_submitted: Option<(u64, i64)>,
    /// Per commit request not yet reported committed, oldest first: the snapshot progress
    /// it writes, published once it is durable.
    snapshots_in_flight: VecDeque<Vec<TableState>>,
}

/// Whether two descriptions of a table have the same columns (names and types, in order).
fn same_columns(a: &Relation, b: &Relation) -> bool {
    a.columns.len() == b.columns.len()
        && a.columns
            .iter()
            .zip(&b.columns)
            .all(|(x, y)| x.name == y.name && x.type_oid == y.type_oid)
}

/// The oldest commit request was committed: the snapshot progress it wrote is durable, so it
/// is what status and metrics show.
fn publish_snapshots(
    in_flight: &mut VecDeque<Vec<TableState>>,
    progress: &watch::Sender<Progress>,
    pipeline: &str,
) {
    let Some(states) = in_flight.pop_front() else {
        return;
    };
    for next in states {
        let table = next.table.to_string();
        if next.phase == Phase::Done {
            tracing::info!(pipeline = %pipeline, table = %table, rows = next.rows_copied, "snapshot done");
        }
        progress.send_modify(|p| {
            if let Some(t) = p.snapshots.iter_mut().find(|t| t.table == table) {
                t.phase = next.phase;
                t.rows_copied = next.rows_copied;
            }
        });
    }
}

/// The snapshot task ended without saying it copied everything.
fn snapshot_task_gone() -> Error {
    Error::Stream("the snapshot task stopped before copying every table; starting it again".into())
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tells this session's watermarks from those of earlier sessions streamed again.
fn session_token() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{nanos:x}-{:x}-{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

impl Streamer<'_> {
    async fn stream(
        &mut self,
        stream: &mut ReplicationClient,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Outcome> {
        loop {
            tokio::select! {
                biased;
                // 1. Shutdown: write what was received, checkpoint it, confirm it, stop.
                //    What the server sent and the loop has not taken yet is left alone: no
                //    state claims it, and the next session receives it again.
                _ = shutdown.changed() => {
                    self.flush().await?;
                    self.wait_durable(stream).await?;
                    confirm_and_stop(stream, self.ckpt.lsn).await;
                    tracing::info!(pipeline = %self.cfg.id, checkpoint = %super::lsn::format(self.ckpt.lsn), "stopped");
                    return Ok(Outcome::Stopped);
                }
                // 2. The writer committed a batch: now it may be confirmed.
                committed = self.writer.committed() => match committed {
                    Some(c) => self.on_committed(c, stream),
                    None => return Err(Error::Buffer("the buffer writer stopped".into())),
                },
                // The snapshot task's messages: a chunk before its close watermark arrives is
                // kept for it; the task's end is looked at (an error ends the session). A
                // receive not taken loses nothing.
                message = self.snap.as_mut().map_or_else(|| futures_util::future::pending().boxed(), |l| l.chunks.recv().boxed()),
                    if self.snap.as_ref().is_some_and(|l| !l.finished) => {
                    self.on_snapshot_message(message).await?;
                }
                // 3. Flush deadline: no received event waits longer than flushInterval.
                _ = sleep_until(self.pending.deadline.unwrap_or_else(Instant::now)), if self.pending.deadline.is_some() => {
                    self.flush().await?;
                    // Silence is counted while listening: time spent waiting on the buffer
                    // is not the source's.
                    self.heard = Instant::now();
                }
                // 4. The stream (keepalive replies are sent by the client itself), then what
                //    else is already queued, up to a bound, without going round the select
                //    for every message.
                event = stream.recv() => {
                    let mut taken = self.on_received(event).await;
                    self.stream_idle = false;
                    for _ in 0..DRAIN_QUEUED {
                        if taken.is_err() {
                            break;
                        }
                        let Some(event) = stream.recv().now_or_never() else {
                            self.stream_idle = true;
                            break;
                        };
                        taken = self.on_received(event).await;
                    }
                    if let Err(e @ Error::PoisonEvent(_)) = taken {
                        // Everything before it is written and confirmed, then the loop stops.
                        self.flush().await?;
                        self.wait_durable(stream).await?;
                        confirm_and_stop(stream, self.ckpt.lsn).await;
                        return Err(e);
                    }
                    taken?;
                    self.heard = Instant::now();
                }
                // 5. Silence: not even the keepalive the source sends after half of
                //    streamTimeout. The connection is dead (a proxy or NAT dropping traffic
                //    sends no FIN or RST): end the session, whose retry reconnects.
                _ = sleep_until(self.heard + self.cfg.stream_timeout) => {
                    return Err(Error::StreamTimeout(format!(
                        "the replication stream from the source database {} was silent for {:?} (spec.source.streamTimeout): \
                         the connection is presumed dead and is reopened",
                        self.cfg.source, self.cfg.stream_timeout
                    )));
                }
            }
            // 6. Group commit: see [`Streamer::commit_now`].
            if self.commit_now() {
                self.flush().await?;
            }
            if self.caught_up() {
                confirm_and_stop(stream, self.ckpt.lsn).await;
                return Ok(Outcome::CaughtUp);
            }
        }
    }

    /// Whether to commit the batch now rather than at `batchSize` or `flushInterval`: it
    /// holds whole transactions' changes, nothing more has arrived, and the writer is idle.
    /// At low load every transaction is then durable within a buffer commit of arriving; under
    /// load, changes gather while the writer commits the last batch, so batches grow by
    /// themselves up to `batchSize` (group commit). A keepalive's advance alone waits for the
    /// deadline (an idle pipeline does not write a checkpoint per keepalive), and so do a
    /// snapshot's rows, which are written by their bytes (see [`Streamer::on_change`]), except
    /// a table's last chunk: the end of a copy is durable as soon as a change would be.
    fn commit_now(&self) -> bool {
        self.stream_idle
            && self.tx.is_none()
            && self.in_flight.is_empty()
            && (self.pending.events > self.pending.snapshot_events
                || !self.pending.dead_letters.is_empty()
                || self
                    .pending
                    .snapshots
                    .iter()
                    .any(|t| t.phase == Phase::Done))
    }

    async fn on_received(
        &mut self,
        event: std::result::Result<Option<ReplicationEvent>, PgWireError>,
    ) -> Result<()> {
        match event {
            Ok(Some(event)) => self.on_event(event).await,
            Ok(None) => Err(Error::Stream(
                "the source ended the replication stream".into(),
            )),
            Err(e) => Err(stream_error(self.cfg, e)),
        }
    }

    fn caught_up(&self) -> bool {
        self.opts.until_caught_up
            && self.tx.is_none()
            && self.ckpt.lsn >= self.target
            && self.snap.as_ref().is_none_or(|l| l.finished)
            && self.pending.snapshots.is_empty()
            && self.pending.moved.is_empty()
            && self.snapshot_submitted.is_none_or(|(lsn, events)| {
                self.ckpt.lsn >= lsn && self.ckpt.events_total >= events
            })
    }

    async fn on_snapshot_message(&mut self, message: Option<snapshot::Message>) -> Result<()> {
        let Some(link) = self.snap.as_mut() else {
            return Ok(());
        };
        match message {
            Some(snapshot::Message::Chunk(c)) => {
                // The oldest chunk not closed yet, when none waits before it (see
                // [`snapshot::Earlier`]): what it sees, every chunk still to close sees.
                if link.ready.is_empty() {
                    link.earlier.seen_by(&c.visibility);
                }
                link.ready.push_back(c)
            }
            Some(snapshot::Message::Finished(Ok(()))) if link.all_done() => {
                link.finished = true;
                if self.opts.until_caught_up {
                    self.flush().await?;
                }
            }
            Some(snapshot::Message::Finished(Err(e))) => return Err(e),
            // Ended with tables left, or without a word (it panicked): never taken for done.
            Some(snapshot::Message::Finished(Ok(()))) | None => return Err(snapshot_task_gone()),
        }
        Ok(())
    }

    /// A snapshot watermark: opens a chunk's window, or closes it and writes the chunk's
    /// rows that are not stale (see [`snapshot`]) as SNAPSHOT events of the close
    /// watermark's transaction, with the table's progress.
    async fn on_watermark(&mut self, content: &[u8], lsn: u64) -> Result<()> {
        let Some(link) = self.snap.as_mut() else {
            return Ok(());
        };
        let (token, chunk_id, closed_with) = match Watermark::parse(content) {
            Some(Watermark::Open {
                token,
                chunk,
                relation_id,
                key_names,
            }) => {
                if token == link.token {
                    let carried = link.window.take().filter(|w| w.chunk == 0);
                    let at = self.tx.as_ref().map_or(lsn, |t| t.commit_lsn);
                    link.window = Some(Window::open_after(
                        carried,
                        chunk,
                        relation_id,
                        key_names,
                        at,
                    ));
                }
                return Ok(());
            }
            Some(Watermark::Close {
                token,
                chunk,
                definition,
            }) => (token, chunk, definition),
            None => return Ok(()),
        };
        if token != link.token {
            return Ok(());
        }
        // The task waits for the answer to every chunk it handed over: one that cannot be
        // answered ends the session (the next one reads the chunk again), never a silence.
        let Some(window) = link
            .window
            .take()
            .filter(|w| w.chunk == chunk_id && chunk_id > 0)
        else {
            return Err(Error::Stream(format!(
                "snapshot chunk {chunk_id} closed without being opened in this stream; reading it again"
            )));
        };
        // The task hands the chunk over before it writes the close watermark, so it is
        // queued by now (or the task ended and said why).
        let mut chunk = match link.ready.pop_front() {
            Some(c) => c,
            None => match link.chunks.recv().await {
                Some(snapshot::Message::Chunk(c)) => c,
                Some(snapshot::Message::Finished(Err(e))) => return Err(e),
                Some(snapshot::Message::Finished(Ok(()))) | None => {
                    return Err(snapshot_task_gone())
                }
            },
        };
        if chunk.id != chunk_id {
            return Err(Error::Stream(format!(
                "snapshot chunk {} arrived for the close watermark of chunk {chunk_id}; reading it again",
                chunk.id
            )));
        }
        let key_names = window.key_names().to_vec();
        let opened = window.opened_at();
        let began = window.began();
        // The table's definition changed between the chunk's read and its close watermark
        // (a column added, dropped or retyped): the rows no longer fit the events around
        // them, and are read again. Otherwise they are current at the close watermark,
        // whether or not the stream has described the table since the change (it does so
        // only before the table's next change).
        // The window decides first either way: the keys it reads again (rows moved in
        // without a whole image among them) are read again then too.
        let mut closed = window.close(&mut chunk);
        if closed_with != chunk.definition {
            closed = closed.read_again(format!(
                "the definition of {} changed while it was read",
                chunk.plan.table
            ));
        }
        // A transaction of the table that committed before the window began, and that the
        // chunk's snapshot does not see (see [`snapshot::Earlier`]): the rows it changed are
        // older than its events, and the window cannot tell which.
        if closed.why.is_none() {
            let unseen =
                link.earlier
                    .unseen_before(&chunk.visibility, chunk.plan.relation.id, began);
            if let Some(xid) = unseen {
                closed = closed.read_again(format!(
                    "transaction {xid} changed {} before the chunk's window began and was not \
                     visible yet when the chunk was read",
                    chunk.plan.table
                ));
            }
        }
        // Chunks close in the order they were read: every one still to close sees what
        // this one saw.
        link.earlier.seen_by(&chunk.visibility);
        let Closed { rows, reread, why } = closed;
        if let Some(why) = why {
            tracing::info!(pipeline = %self.cfg.id, table = %chunk.plan.table, "reading a snapshot chunk's rows again: {why}");
        }
        let Some(before) = link.states.get(&chunk.plan.table).cloned() else {
            return Err(Error::Stream(format!(
                "a snapshot chunk of {}, which this session does not copy",
                chunk.plan.table
            )));
        };
        let Some(open) = self.tx.as_ref() else {
            return Err(Error::Decode(
                "a snapshot watermark outside a transaction".into(),
            ));
        };
        let (commit_lsn, seq) = (open.commit_lsn, open.seq);
        // The stream's own description when it has the same columns, so the table is not
        // recorded twice; else the definition the rows were read with, recorded here (the
        // stream describes the table again before its next change). Only with rows written:
        // a chunk read again may have been read with a definition that is no longer current.
        let rel = self
            .decoder
            .described(chunk.plan.relation.id)
            .filter(|d| same_columns(d, &chunk.plan.relation))
            .unwrap_or_else(|| chunk.plan.relation.clone());
        let known = self
            .written_relations
            .get(&rel.id)
            .is_some_and(|r| **r == *rel);
        if !known
            && !rows.is_empty()
            && self
                .pending
                .last_event
                .is_none_or(|last| (commit_lsn, seq) > last)
        {
            self.written_relations.insert(rel.id, rel.clone());
            self.pending.relations.push(RelationRecord {
                commit_lsn,
                seq,
                relation: rel.clone(),
            });
        }
        let mut written = 0;
        let table = chunk.plan.table.to_string();
        let shown =
            |key_text: &[String]| format!("({})=({})", key_names.join(", "), key_text.join(", "));
        for row in rows {
            // Only while the buffer refuses rows: nothing more per row otherwise.
            let refused = if self.isolation.refused_rows.is_empty() {
                None
            } else {
                self.isolation
                    .refused_rows
                    .get(&(table.clone(), row.key.clone()))
                    .map(|why| {
                        format!("the buffer refused the row {}: {why}", shown(&row.key_text))
                    })
            };
            // A row that cannot be stored goes the way of `poisonEvents`, as such a change
            // in the stream does: stop, naming it (everything before it written and
            // confirmed), or set its key aside in `cdc_dead_letters` and go on.
            if let Some(reason) = row.unstorable.or(refused) {
                let poison = Poison {
                    relation: rel.clone(),
                    operation: super::decode::Operation::Snapshot,
                    reason,
                };
                self.set_aside(poison, Bytes::from(row.key), lsn).await?;
                continue;
            }
            written += 1;
            let change = Change {
                relation: rel.clone(),
                operation: super::decode::Operation::Snapshot,
                before: None,
                after: Some(row.image),
            };
            // Which row it is matters only while finding a refused value (one change per
            // transaction); taken by `on_change` before it awaits anything.
            if self.isolation.finding.is_some() {
                self.copying = Some(snapshot::CopiedRow {
                    table: table.clone(),
                    shown: shown(&row.key_text),
                    key: row.key,
                });
            }
            self.on_change(change, lsn).await?;
        }
        let mut next = chunk.advance(&before, written, reread, opened, commit_lsn);
        bound_reread(self.cfg, &mut next);
        let phase = next.phase;
        // Published (status, metrics, the log line) once the buffer transaction holding it
        // commits: see `snapshots_committed`.
        self.pending.note(next.clone());
        self.arm_deadline();
        if let Some(link) = self.snap.as_mut() {
            // Changes of the table between this chunk and the next belong to the next one's
            // window (see [`Window::open_after`]).
            if phase != Phase::Done {
                link.window = Some(Window::open(0, rel.id, key_names).beginning_at(commit_lsn));
            }
            link.states.insert(next.table.clone(), next.clone());
            let _ = link.results.send(next);
        }
        Ok(())
    }

    fn arm_deadline(&mut self) {
        let interval = self.cfg.flush_interval;
        self.pending
            .deadline
            .get_or_insert_with(|| Instant::now() + interval);
    }

    async fn on_event(&mut self, event: ReplicationEvent) -> Result<()> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.tx = Some(OpenTx {
                    commit_lsn: final_lsn.0,
                    xid,
                    commit_time: commit_time_micros,
                    seq: 0,
                });
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                let Some(open) = self.tx.as_mut() else {
                    return Err(Error::Decode("change outside a transaction".into()));
                };
                let change = match self.decoder.decode(&data)? {
                    Decoded::Relation(rel) => {
                        let position = (open.commit_lsn, open.seq);
                        let known = self
                            .written_relations
                            .get(&rel.id)
                            .is_some_and(|r| **r == *rel);
                        if !known && self.pending.last_event.is_none_or(|last| position > last) {
                            self.written_relations.insert(rel.id, rel.clone());
                            self.pending.relations.push(RelationRecord {
                                commit_lsn: open.commit_lsn,
                                seq: open.seq,
                                relation: rel,
                            });
                        }
                        return Ok(());
                    }
                    Decoded::Change(c) => c,
                    Decoded::Truncate(cs) => {
                        for c in &cs {
                            self.note_in_window(c)?;
                        }
                        for c in cs {
                            match self.refused(&c) {
                                Some(poison) => {
                                    self.set_aside(poison, data.clone(), wal_start.0).await?
                                }
                                None => self.on_change(c, wal_start.0).await?,
                            }
                        }
                        return Ok(());
                    }
                    Decoded::Nothing => return Ok(()),
                    Decoded::Poison(poison) => return self.on_poison(poison, data, wal_start.0),
                };
                self.note_in_window(&change)?;
                if let Some(poison) = self.refused(&change) {
                    return self.set_aside(poison, data, wal_start.0).await;
                }
                self.on_change(change, wal_start.0).await?;
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.tx = None;
                self.advance(end_lsn.0).await?;
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // With no transaction open, everything before wal_end has been sent: the slot
                // may follow it, so idle tables do not make the source keep WAL.
                if self.tx.is_none() {
                    self.advance(wal_end.0).await?;
                }
            }
            ReplicationEvent::Message {
                prefix,
                content,
                lsn,
                ..
            } if prefix == snapshot::PREFIX => self.on_watermark(&content, lsn.0).await?,
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { .. } => {
                return Err(Error::Stream("the stream stopped unexpectedly".into()));
            }
        }
        Ok(())
    }

    /// Notes a change in the open snapshot window, if any; and a row moved behind the copy
    /// of its table with an incomplete image, whose new key is then read again.
    fn note_in_window(&mut self, change: &Change) -> Result<()> {
        let Some(link) = self.snap.as_mut() else {
            return Ok(());
        };
        if let Some(open) = self.tx.as_ref() {
            if let Some(window) = link.window.as_mut() {
                window.record(open.xid, change);
            }
            // While tables are copied (see [`snapshot::Earlier`]).
            if !link.finished
                && !link
                    .earlier
                    .note(open.xid, change.relation.id, open.commit_lsn)
            {
                return Err(Error::Stream(format!(
                    "more than {} transactions arrived while the snapshot read no chunk; \
                     starting the session again (the copy resumes from its last chunk written)",
                    snapshot::MAX_EARLIER
                )));
            }
        }
        if change.operation != super::decode::Operation::Update || change.before.is_none() {
            return Ok(());
        }
        let rel = &change.relation;
        let Some(state) = link
            .states
            .values_mut()
            .find(|t| t.table.schema == rel.schema && t.table.name == rel.name)
        else {
            return Ok(());
        };
        // Only once a chunk was written under a known key: before, nothing was passed.
        let Some(names) = state
            .key_names
            .as_ref()
            .filter(|_| state.phase == Phase::Copying)
        else {
            return Ok(());
        };
        let Some(key) = snapshot::moved_without_whole_image(change, names) else {
            return Ok(());
        };
        if state.reread.contains(&key) {
            return Ok(());
        }
        // Written with this change, in the same buffer transaction: once the checkpoint
        // is past the change, the key to read again is durable too. (A set lookup above:
        // a large UPDATE moving rows behind the copy notes one key per row.)
        state.reread.push(key);
        bound_reread(self.cfg, state);
        // The state is taken when the batch is handed over (see `Pending::moved`).
        if !self.pending.moved.contains(&state.table) {
            self.pending.moved.push(state.table.clone());
        }
        self.arm_deadline();
        Ok(())
    }

    /// One change of the open transaction: skipped if the buffer has it already, else encoded
    /// for the writer.
    async fn on_change(&mut self, change: Change, lsn: u64) -> Result<()> {
        let copying = self.copying.take();
        let Some(at) = self.next_position(lsn)? else {
            return Ok(());
        };
        self.pending.last_event = Some((at.commit_lsn, at.seq));
        self.pending.last_row = copying;
        self.pending.add(&change);
        self.encoder.push(&at, &change);
        self.arm_deadline();
        if self.encoder.len() >= ROWS_CHUNK {
            // Room first, then the rows: cancelled while waiting, the encoder still holds them.
            if let Some(permit) = self.writer.reserve(1).await?.next() {
                permit.send(WriteOp::Rows(self.encoder.take()));
            }
        }
        // Finding a refused value: one change per transaction.
        let batch_size = match self.isolation.finding {
            Some(_) => 1,
            None => self.cfg.batch_size,
        };
        // Rows of a snapshot count by their bytes only: a buffer transaction commits with a
        // flush of the buffer's WAL, and one per chunk of narrow rows would leave the buffer
        // server idle for most of a copy (bench/RESULTS.md). A kill then costs at most
        // MAX_BATCH_BYTES (or flushInterval) of copying. While finding a refused value they
        // count as changes: one per transaction too.
        let changes = match self.isolation.finding {
            Some(_) => self.pending.events,
            None => self.pending.events - self.pending.snapshot_events,
        };
        if changes >= batch_size || self.pending.image_bytes >= MAX_BATCH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// The position of the open transaction's next change, which it takes; `None` when the
    /// buffer has it already from before a restart (skipped, so it lands once).
    fn next_position(&mut self, lsn: u64) -> Result<Option<Position>> {
        let Some(open) = self.tx.as_mut() else {
            return Err(Error::Decode("change outside a transaction".into()));
        };
        let at = Position {
            commit_lsn: open.commit_lsn,
            seq: open.seq,
            lsn,
            xid: open.xid,
            commit_time: open.commit_time,
        };
        open.seq += 1;
        let position = (at.commit_lsn, at.seq);
        Ok(self
            .pending
            .last_event
            .is_none_or(|last| position > last)
            .then_some(at))
    }

    /// The change about to be taken, as a poison change, if the buffer refused it before.
    fn refused(&self, change: &Change) -> Option<Poison> {
        let open = self.tx.as_ref()?;
        let reason = self.isolation.refused.get(&(open.commit_lsn, open.seq))?;
        Some(Poison {
            relation: change.relation.clone(),
            operation: change.operation,
            reason: format!("the buffer refused it: {reason}"),
        })
    }

    /// A refused change goes the way of `poisonEvents`; while finding one, a change set aside
    /// is written in a transaction of its own, so a refusal of it is told apart.
    async fn set_aside(&mut self, poison: Poison, data: Bytes, lsn: u64) -> Result<()> {
        if self.isolation.finding.is_some() {
            self.flush().await?;
        }
        self.on_poison(poison, data, lsn)?;
        if self.isolation.finding.is_some() {
            self.flush().await?;
        }
        Ok(())
    }

    /// Back to batches once the checkpoint passed the last change taken before the refusal
    /// that started the search (and, if that batch held copied rows, a chunk's progress
    /// committed with it: `progressed`): the refusal went away.
    fn stop_finding_once_past(&mut self, progressed: bool) {
        let past = self.isolation.finding.as_ref().is_some_and(|f| {
            f.until
                .is_some_and(|u| self.ckpt.last_event.is_some_and(|last| last >= u))
                && (!f.copied || progressed)
        });
        if past {
            self.isolation.finding = None;
        }
    }

    /// A change that cannot be stored as an event: set aside in the batch's dead letters, or
    /// [`Error::PoisonEvent`] (the loop then writes and confirms everything before it and
    /// stops).
    fn on_poison(&mut self, poison: Poison, message: Bytes, lsn: u64) -> Result<()> {
        let Some(at) = self.next_position(lsn)? else {
            return Ok(());
        };
        let position = (at.commit_lsn, at.seq);
        let rel = &poison.relation;
        let what = format!(
            "{} of {}.{} at LSN {} (transaction {}, committed at {})",
            poison.operation.as_str(),
            rel.schema,
            rel.name,
            super::lsn::format(lsn),
            at.xid,
            super::lsn::format(at.commit_lsn)
        );
        match self.cfg.poison_events {
            PoisonEventPolicy::Fail => Err(Error::PoisonEvent(format!(
                "pipeline {} cannot store the {what}: {}. Every change before it is in the buffer and confirmed. \
                 Set spec.poisonEvents: DeadLetter to set such changes aside in cdc_dead_letters and go on",
                self.cfg.id, poison.reason
            ))),
            PoisonEventPolicy::DeadLetter => {
                tracing::warn!(pipeline = %self.cfg.id, reason = %poison.reason, "set aside the {what} in cdc_dead_letters");
                self.pending.last_event = Some(position);
                self.pending.dead_letters.push(DeadLetter {
                    at,
                    schema: rel.schema.clone(),
                    table: rel.name.clone(),
                    operation: poison.operation,
                    reason: poison.reason,
                    message,
                });
                self.arm_deadline();
                Ok(())
            }
        }
    }

    /// Moves the position the next checkpoint may claim (no transaction is open).
    async fn advance(&mut self, lsn: u64) -> Result<()> {
        // Readers poll the received position; waking every watcher on each commit would put
        // a notification on the hot path for nothing.
        self.progress.send_if_modified(|p| {
            p.received_lsn = p.received_lsn.max(lsn);
            false
        });
        if lsn <= self.pending.safe_lsn {
            return Ok(());
        }
        self.pending.safe_lsn = lsn;
        // Caught up with the target: write at once, unless a snapshot still copies (its
        // watermark transactions would each make a buffer transaction of their own; batches
        // and the deadline write the copy, and its end is written when the task finishes).
        let copying = self.snap.as_ref().is_some_and(|l| !l.finished);
        if self.opts.until_caught_up && lsn >= self.target && !copying {
            self.flush().await
        } else {
            self.arm_deadline();
            Ok(())
        }
    }

    /// Hands the batch to the writer and asks it to commit the batch, the definitions and
    /// the checkpoint in one buffer transaction. The checkpoint is confirmed to the source
    /// when the writer reports the commit ([`Streamer::on_committed`]).
    async fn flush(&mut self) -> Result<()> {
        if self.pending.events == 0
            && self.pending.relations.is_empty()
            && self.pending.dead_letters.is_empty()
            && self.pending.snapshots.is_empty()
            && self.pending.moved.is_empty()
            && self.pending.safe_lsn <= self.submitted.lsn
        {
            self.pending.deadline = None;
            return Ok(());
        }
        // Room for both requests before anything is taken from the batch: cancelled while
        // waiting, the batch is as it was (see the cancellation rule above).
        let mut permits = self.writer.reserve(2).await?;
        let pending = &mut self.pending;
        pending.deadline = None;
        // The invariant of the LSN rules: the checkpoint never moves back, and never claims a
        // transaction that is still arriving.
        debug_assert!(pending.safe_lsn >= self.submitted.lsn);
        debug_assert!(self
            .tx
            .as_ref()
            .is_none_or(|t| pending.safe_lsn <= t.commit_lsn));
        let next = Checkpoint {
            lsn: pending.safe_lsn,
            last_event: pending.last_event,
            events_total: self.submitted.events_total + pending.events as i64,
        };
        let commit_dead_letters = pending.dead_letters.len();
        for table in std::mem::take(&mut pending.moved) {
            if let Some(state) = self.snap.as_ref().and_then(|l| l.states.get(&table)) {
                pending.note(state.clone());
            }
        }
        if !pending.snapshots.is_empty() {
            self.snapshot_submitted = Some((next.lsn, next.events_total));
        }
        self.snapshots_in_flight
            .push_back(pending.snapshots.clone());
        let commit = Commit {
            tables: self.encoder.take_tables(),
            relations: std::mem::take(&mut pending.relations),
            snapshots: std::mem::take(&mut pending.snapshots),
            dead_letters: std::mem::take(&mut pending.dead_letters),
            checkpoint: next,
            counts: std::mem::take(&mut pending.counts),
        };
        let alone = pending.events == 1 && commit_dead_letters == 0;
        self.in_flight.push_back(InFlight {
            one: pending.last_event.filter(|_| alone),
            row: pending.last_row.take().filter(|_| alone),
            copied: pending.snapshot_events > 0,
        });
        pending.events = 0;
        pending.snapshot_events = 0;
        pending.image_bytes = 0;
        let (Some(rows), Some(end)) = (permits.next(), permits.next()) else {
            return Err(Error::Buffer("the buffer writer stopped".into()));
        };
        if !self.encoder.is_empty() {
            rows.send(WriteOp::Rows(self.encoder.take()));
        }
        end.send(WriteOp::Commit(commit));
        self.submitted = next;
        Ok(())
    }

    /// A buffer transaction committed: its checkpoint is durable, so it may be confirmed.
    fn on_committed(&mut self, committed: Committed, stream: &ReplicationClient) {
        if let Some(observer) = &self.opts.observer {
            observer.batch_written(&self.cfg.id, &committed.counts, committed.elapsed);
        }
        // The window between the buffer commit and the acknowledgement to the source, which
        // the reliability tests crash in on purpose.
        failpoint("after-buffer-commit");
        debug_assert!(committed.checkpoint.lsn >= self.ckpt.lsn);
        self.in_flight.pop_front();
        let progressed = self
            .snapshots_in_flight
            .front()
            .is_some_and(|states| !states.is_empty());
        publish_snapshots(&mut self.snapshots_in_flight, self.progress, &self.cfg.id);
        self.ckpt = committed.checkpoint;
        self.stop_finding_once_past(progressed);
        stream.update_applied_lsn(Lsn(self.ckpt.lsn));
        let ckpt = self.ckpt;
        self.progress.send_modify(|p| {
            p.checkpoint_lsn = ckpt.lsn;
            p.events_total = ckpt.events_total;
            p.last_checkpoint_time = Some(SystemTime::now());
            p.last_error = None;
        });
    }

    /// Waits until everything handed to the writer is committed (and confirmed).
    async fn wait_durable(&mut self, stream: &ReplicationClient) -> Result<()> {
        while self.ckpt != self.submitted {
            match self.writer.committed().await {
                Some(c) => self.on_committed(c, stream),
                None => return Err(Error::Buffer("the buffer writer stopped".into())),
            }
        }
        Ok(())
    }
}

/// How long a stop waits for the source to be told the final checkpoint (see
/// [`FEEDBACK_INTERVAL`]), and then for the stream to end.
const CONFIRM_WAIT: Duration = Duration::from_secs(3);

/// How often the source is told the checkpoint (a standby status update: at most this often
/// when the checkpoint moved, and every interval while messages flow). The slot's
/// `confirmed_flush_lsn` follows the buffer within this, so the source frees WAL sooner and a
/// stop is confirmed sooner: at 1 s, every `--until-caught-up` run and every stop waited half a
/// second on average for the next update (bench/RESULTS.md, 2026-11-26). At most ten small
/// messages a second.
const FEEDBACK_INTERVAL: Duration = Duration::from_millis(100);

/// Queued messages taken in one go after a received one, before shutdown, commits and the
/// flush deadline are looked at again.
const DRAIN_QUEUED: usize = 256;

/// Messages queued between the stream and the loop, at most, whatever `bufferSize` says. The
/// client library's queue counts messages, and a message is a whole row, so memory is bounded
/// by bytes only if the count is small: 16 messages are at most 16 times the largest row. Past
/// them the stream waits in the socket (a kernel buffer bounded in bytes) and then in the
/// walsender. Measured against 1,000 (bench/RESULTS.md): the same drain times, 13 MB instead
/// of 33 MB peak on 20 KB rows; 4 costs a third more CPU in wakeups.
const MAX_QUEUED_MESSAGES: usize = 16;

/// A batch is written early once its row images reach this size, so wide rows do not make a
/// `batchSize` batch large in memory.
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// A commit request not yet reported committed: what the loop needs to know of it when the
/// buffer refuses it.
struct InFlight {
    /// The position of its change, when it holds just one (and nothing set aside).
    one: Option<(u64, i32)>,
    /// That change, when it is a copied row.
    row: Option<snapshot::CopiedRow>,
    /// It holds copied rows.
    copied: bool,
}

/// What is received but not yet handed to the writer in a commit request.
struct Pending {
    /// Events in the batch.
    events: usize,
    /// Of them, rows copied by a snapshot.
    snapshot_events: usize,
    /// Bytes of their row images.
    image_bytes: usize,
    /// Events per table and operation, for the metrics.
    counts: Vec<Count>,
    relations: Vec<RelationRecord>,
    /// Changes set aside (`poisonEvents: DeadLetter`), written with the batch.
    dead_letters: Vec<DeadLetter>,
    /// Snapshot progress of the chunks in the batch, written with their rows.
    snapshots: Vec<TableState>,
    /// Tables whose keys to read again grew with a change in the batch (a row moved behind
    /// the copy): their state is taken from the loop's when the batch is handed over, once,
    /// rather than copied at every move.
    moved: Vec<TableName>,
    /// The LSN the next checkpoint may claim (see the LSN rules above).
    safe_lsn: u64,
    /// The last event accepted: written, or in the batch.
    last_event: Option<(u64, i32)>,
    /// The copied row the last event in the batch is, if it is one.
    last_row: Option<snapshot::CopiedRow>,
    /// When the oldest unwritten event (or checkpoint advance) must be written.
    deadline: Option<Instant>,
}

impl Pending {
    /// A table's snapshot state to write with the batch. Each state holds all that came
    /// before it, so only the table's last one is kept (one state per move, each with every
    /// key noted so far, was quadratic in memory and in what the buffer wrote).
    fn note(&mut self, state: TableState) {
        match self.snapshots.iter_mut().find(|s| s.table == state.table) {
            Some(s) => *s = state,
            None => self.snapshots.push(state),
        }
    }

    fn add(&mut self, change: &Change) {
        self.events += 1;
        if change.operation == super::decode::Operation::Snapshot {
            self.snapshot_events += 1;
        }
        self.image_bytes += change.before.as_ref().map_or(0, String::len)
            + change.after.as_ref().map_or(0, String::len);
        match self.counts.last_mut() {
            Some(c)
                if Arc::ptr_eq(&c.relation, &change.relation)
                    && c.operation == change.operation =>
            {
                c.events += 1
            }
            _ => self.counts.push(Count {
                relation: change.relation.clone(),
                operation: change.operation,
                events: 1,
            }),
        }
    }
}

/// Test hook: `PHILOTES_FAILPOINT=<name>` makes the process abort (like `kill -9`: nothing
/// flushed, nothing acknowledged) when it reaches the named point.
pub(crate) fn failpoint(name: &str) {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("PHILOTES_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Ends the stream once the source has been told `checkpoint`: the client sends it within its
/// status interval, and stopping first would drop it, leaving the slot behind what the buffer
/// holds. Bounded: a source that cannot be told is told by the next session. The stream's
/// remaining messages are read and dropped, since no state claims them.
async fn confirm_and_stop(stream: &mut ReplicationClient, checkpoint: u64) {
    let metrics = stream.metrics();
    let told = Instant::now() + CONFIRM_WAIT;
    while metrics.last_applied_lsn().0 < checkpoint && Instant::now() < told {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stream.stop();
    // Cancelling this wait loses nothing: every message still queued is unclaimed.
    let _ = tokio::time::timeout(CONFIRM_WAIT, async {
        while let Ok(Some(_)) = stream.recv().await {}
    })
    .await;
}

/// Asks the replication session who the source is (`IDENTIFY_SYSTEM`, and the timeline's
/// history when it changed) and checks that against a checkpoint at `stored.0` with the
/// identity `stored.1`. The outer error is the session failing (transient, retried); the inner
/// one the check's verdict.
pub(super) async fn identify(
    stream: &mut ReplicationClient,
    cfg: &PipelineConfig,
    stored: Option<(u64, &Recorded)>,
) -> Result<(SourceNow, Result<()>)> {
    let system = on_source(cfg, "IDENTIFY_SYSTEM", stream.identify_system()).await?;
    let now = SourceNow {
        system_identifier: system.system_id,
        timeline: system.timeline,
        xlogpos: system.xlogpos.0,
        database: system.dbname.unwrap_or_else(|| cfg.source.dbname.clone()),
    };
    let Some((lsn, recorded)) = stored else {
        return Ok((now, Ok(())));
    };
    let history = match recorded.timeline {
        Some(t) if t != now.timeline => {
            let h = on_source(
                cfg,
                "TIMELINE_HISTORY",
                stream.timeline_history(now.timeline),
            )
            .await?;
            Some(String::from_utf8_lossy(&h.content).into_owned())
        }
        _ => None,
    };
    let checked = identity::check_source(cfg, recorded, lsn, &now, history.as_deref());
    Ok((now, checked))
}

/// One step of opening the replication session, bounded by the source's `connect_timeout`.
/// Dropping the step half way loses nothing: nothing is claimed before streaming starts.
pub(super) async fn on_source<T>(
    cfg: &PipelineConfig,
    what: &str,
    step: impl std::future::Future<Output = std::result::Result<T, PgWireError>>,
) -> Result<T> {
    match tokio::time::timeout(cfg.source.connect_timeout, step).await {
        Ok(result) => result.map_err(|e| stream_error(cfg, e)),
        Err(_) => Err(Error::Unreachable {
            target: "source",
            endpoint: cfg.source.to_string(),
            message: format!(
                "no answer to {what} within {:?} (connect_timeout)",
                cfg.source.connect_timeout
            ),
        }),
    }
}

/// The SQLSTATE in a server error as the replication client renders it (`... (SQLSTATE 42704)`).
fn sqlstate(message: &str) -> Option<&str> {
    let start = message.rfind("(SQLSTATE ")? + "(SQLSTATE ".len();
    message.get(start..start + 5)
}

/// Classifies a replication stream error: what retrying can heal (the network, a restarting
/// source, a slot still held by a dying session) is transient; what it cannot (a refused
/// login or pg_hba entry, a missing publication, missing privileges, a value the server
/// cannot convert) stops the pipeline with a reason and what to do.
fn stream_error(cfg: &PipelineConfig, e: PgWireError) -> Error {
    let text = e.to_string();
    let auth = |message: String| Error::Auth {
        target: "source",
        endpoint: cfg.source.to_string(),
        message,
    };
    let in_use = |m: String| {
        Error::SlotInUse(format!(
            "replication slot {} on the source database {} is in use by another process ({m}); \
             stop the other consumer, or give this pipeline its own spec.source.slot",
            cfg.slot, cfg.source
        ))
    };
    let setup = |what: &str| {
        Error::SourceSetup(format!(
            "the source database {} refused the replication stream: {text}; {what}",
            cfg.source
        ))
    };
    match e {
        PgWireError::Auth(m) => auth(m),
        PgWireError::Server(m) => match sqlstate(&m) {
            Some("28P01") => auth(m),
            Some("28000") => auth(format!(
                "{m}; the source's pg_hba.conf needs a `replication` entry for this user and address"
            )),
            Some("55006") => in_use(m),
            Some("42704") => setup(&format!(
                "check that publication {} and slot {} exist (a publication created after the slot is not visible to it \
                 at positions before its creation)",
                cfg.publication, cfg.slot
            )),
            Some("42501") => setup("the source user needs the REPLICATION attribute"),
            Some("22021") => setup("a value cannot be converted to UTF-8; see spec.poisonEvents"),
            _ if m.contains("password authentication") => auth(m),
            // Older servers' wording, should the code be missing.
            _ if m.contains("is active for PID") => in_use(m),
            _ => Error::Stream(text),
        },
        // A certificate the sslmode refuses stays refused.
        PgWireError::Tls(m)
            if ["certificate", "config", "not support", "unsupported"]
                .iter()
                .any(|w| m.to_lowercase().contains(w)) =>
        {
            Error::Tls {
            target: "source",
            endpoint: cfg.source.to_string(),
            message: m,
        }
        }
        PgWireError::Io(_) | PgWireError::Tls(_) => Error::Unreachable {
            target: "source",
            endpoint: cfg.source.to_string(),
            message: text,
        },
        _ => Error::Stream(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_errors_that_retrying_cannot_heal_are_permanent() {
        let cfg = PipelineConfig::example();
        let server = |m: &str| stream_error(&cfg, PgWireError::Server(m.into()));
        let hba = server(
            "server error: no pg_hba.conf entry for replication connection (SQLSTATE 28000)",
        );
        assert_eq!(hba.reason(), "AuthenticationFailed");
        assert!(hba.to_string().contains("`replication` entry"), "{hba}");
        let missing = server("server error: publication \"pub\" does not exist (SQLSTATE 42704)");
        assert_eq!(missing.reason(), "SourceNotReady");
        assert!(!missing.is_transient());
        assert!(
            missing
                .to_string()
                .contains("publication pub and slot slot"),
            "{missing}"
        );
        let busy =
            server("server error: replication slot \"slot\" is active for PID 7 (SQLSTATE 55006)");
        assert!(busy.is_transient());
        let shutdown = server(
            "server error: terminating connection due to administrator command (SQLSTATE 57P01)",
        );
        assert!(shutdown.is_transient());
    }
}
