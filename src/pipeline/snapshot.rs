//! Snapshots: the rows a table already holds, copied as `SNAPSHOT` events while every table
//! keeps streaming.
//!
//! # Watermarks
//!
//! The scheme is the one of Netflix's DBLog ("DBLog: A Watermark Based Change-Data-Capture
//! Framework", 2019), which Debezium's incremental snapshots also use, with PostgreSQL's
//! snapshot visibility instead of a low watermark. A table is read in chunks ordered by its
//! key. For each chunk the snapshot task, on a connection of its own:
//!
//! 1. writes an *open* watermark into the WAL (`pg_logical_emit_message`, transactional, so
//!    its commit returns once the WAL before it is flushed), and waits until every
//!    transaction the source already marked committed is also visible to new snapshots
//!    (one held back by synchronous replication is committed before it is visible);
//! 2. reads the chunk in a `REPEATABLE READ READ ONLY` transaction: the next `chunkSize`
//!    rows after the last key copied, and the transaction's snapshot `S`
//!    (`pg_current_snapshot()`), then commits (no transaction stays open longer than one
//!    chunk, so no `xmin` is held for a whole table);
//! 3. hands the chunk to the loop and writes a *close* watermark.
//!
//! Both the read (2) and the close watermark (3) lock the table `ACCESS SHARE` and note its
//! definition ([`definition_sql`]): no ALTER TABLE commits between the definition read and
//! the rows read, or the watermark. A chunk whose two definitions differ is read again; else
//! its rows fit the table as it is at the close watermark, whatever the stream last said.
//!
//! The loop sees the watermarks in the stream, in WAL order among the transactions. Between
//! them it notes every change of the table with its transaction's id ([`Window`]). At the
//! close watermark a chunk row is stale exactly when a transaction the chunk's snapshot does
//! not see changed that key: such a transaction committed before the close watermark, so its
//! change is already in the event log, and it is newer than the row read. Those keys are
//! dropped from the chunk; the other rows are written as `SNAPSHOT` events inside the close
//! watermark's transaction, so they sort after everything the rows already reflect and
//! before everything they do not. Changes committed after the close watermark follow them.
//!
//! A transaction that committed before the open watermark and that `S` does not see would be
//! missed by a window that began there. So the window of a chunk begins where the previous
//! chunk of the table closed ([`Window::open_after`]), and step 1's wait covers every
//! transaction the source shows as committed. A commit record can still precede a window and
//! its transaction be invisible to `S`: its backend writes the record (the stream carries it
//! from then on) before it marks the transaction committed, and a loaded machine can
//! deschedule it in between. While tables are copied, the loop notes every transaction the
//! stream carries that a chunk still to close may not see ([`Earlier`]); a chunk whose
//! snapshot does not see one that changed its table before its window began is read again. What remains is a transaction committed
//! before the position the session's stream resumed from and not visible when the session
//! reads a chunk: stalled at that step through a whole restart of the pipeline.
//!
//! A dropped row whose newer images are incomplete (UPDATEs that left an unchanged TOASTed
//! column out) is built at the close from the chunk's row with those images laid over it,
//! when only UPDATEs that kept its key changed it ([`Window::close`]); otherwise it is read
//! again in a later chunk of its own (`reread`), so every row ends with a whole image. So is
//! a key an UPDATE moved a row to with such an image
//! ([`moved_without_whole_image`]): the copy may have passed it. The loop adds such a key to
//! the table's `reread` as the change arrives, whatever window is open, and writes it with
//! the change, so a restart after the checkpoint passed the change still reads it again.
//!
//! # Durability
//!
//! A chunk's events and the table's progress in `cdc_snapshots` are written in one buffer
//! transaction, so a restart resumes after the last chunk written. The watermarks carry a
//! token of the task that wrote them: watermarks of an earlier session, streamed again after
//! a restart, are ignored. Nothing here confirms anything to the source.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{Client, SimpleQueryMessage};

use super::config::{quote_ident, quote_literal, PipelineConfig, TableName};
use super::conn::{describe_pg_error, heals_by_retrying};
use super::decode::{oid, write_json_string, write_value, Change, Column, Operation, Relation};
use super::error::{Error, Result};
use super::run::Progress;

/// The prefix of Philotes's watermark messages.
pub const PREFIX: &str = "philotes.snapshot";

/// A chunk holds at most this many bytes of row images, whatever `chunkSize` says.
pub const MAX_CHUNK_BYTES: usize = 8 * 1024 * 1024;

/// A window holds at most this many changes of its table, besides TRUNCATEs and rows moved in
/// without a whole image: past it, the chunk's rows are read again instead of being decided
/// change by change (a large UPDATE of the table being copied would otherwise be held, key by
/// key, until the chunk closes).
const MAX_WINDOW_TOUCHES: usize = 100_000;

/// The keys to read again are at most this many times `chunkSize` (and at least
/// [`MIN_REREAD_KEYS`]): past it, the table's range is copied again from its start instead
/// ([`TableState::restart_range`]), so their memory, and the bytes written with each chunk's
/// progress, follow the chunk size and not the table's.
const REREAD_CHUNKS: usize = 10;
const MIN_REREAD_KEYS: usize = 10_000;

/// Rows fetched from the chunk's cursor per round trip.
const FETCH_ROWS: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Copying,
    Done,
    Skipped,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Copying => "Copying",
            Phase::Done => "Done",
            Phase::Skipped => "Skipped",
        }
    }

    pub fn parse(s: &str) -> Phase {
        match s {
            "Copying" => Phase::Copying,
            "Done" => Phase::Done,
            "Skipped" => Phase::Skipped,
            _ => Phase::Pending,
        }
    }
}

/// Keys to read again, in the order they were noted, each once: noting a key looks it up in
/// a set, not along the list (a large UPDATE moving rows behind the copy notes one per row).
#[derive(Clone, Debug, Default)]
pub struct Keys {
    order: Vec<Vec<String>>,
    set: HashSet<Vec<String>>,
}

impl Keys {
    /// Notes `key`, unless it is noted already.
    pub fn push(&mut self, key: Vec<String>) {
        if !self.set.contains(&key) {
            self.set.insert(key.clone());
            self.order.push(key);
        }
    }

    pub fn contains(&self, key: &[String]) -> bool {
        self.set.contains(key)
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Vec<String>> {
        self.order.iter()
    }

    pub fn as_slice(&self) -> &[Vec<String>] {
        &self.order
    }

    pub fn clear(&mut self) {
        self.order.clear();
        self.set.clear();
    }

    /// Keeps the keys `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&Vec<String>) -> bool) {
        let set = &mut self.set;
        self.order.retain(|k| {
            let kept = keep(k);
            if !kept {
                set.remove(k);
            }
            kept
        });
    }
}

impl From<Vec<Vec<String>>> for Keys {
    fn from(keys: Vec<Vec<String>>) -> Keys {
        let mut noted = Keys::default();
        for k in keys {
            noted.push(k);
        }
        noted
    }
}

impl PartialEq for Keys {
    fn eq(&self, other: &Keys) -> bool {
        self.order == other.order
    }
}

impl PartialEq<Vec<Vec<String>>> for Keys {
    fn eq(&self, other: &Vec<Vec<String>>) -> bool {
        &self.order == other
    }
}

/// A table's snapshot, as `cdc_snapshots` records it.
#[derive(Clone, Debug, PartialEq)]
pub struct TableState {
    pub table: TableName,
    pub request: String,
    pub phase: Phase,
    /// The key of the last row copied, as text values in key order.
    pub last_key: Option<Vec<String>>,
    /// Keys to read again before going on.
    pub reread: Keys,
    /// The names of the key columns `last_key` and `reread` hold values of (`None`: not
    /// known yet, or written before they were noted).
    pub key_names: Option<Vec<String>>,
    /// Each key column's type and collation (`<type oid>/<collation oid>`): a key of the
    /// same names whose values order differently is another key.
    pub key_kinds: Option<Vec<String>>,
    /// The source table's OID the copy reads (`None`: not known yet, or written before it
    /// was noted). Another one under the same name is another table.
    pub relation_id: Option<u32>,
    pub rows_copied: i64,
    /// The chunks in key order reached the end of the table (rows to read again may remain).
    pub range_done: bool,
    /// Where this request's first chunk began (its window's opening watermark).
    pub started_lsn: Option<u64>,
    /// Set once done: the commit position of the chunk that completed it.
    pub done_lsn: Option<u64>,
    /// How many times this session copied the range again from its start
    /// ([`TableState::restart_range`]): chunks of the range read before no longer move it.
    /// Not written: the next session starts from what was.
    pub pass: u32,
}

impl TableState {
    /// A table to copy (or, with request `skipped`, captured without a copy).
    pub fn requested(table: TableName, request: String) -> TableState {
        TableState {
            table,
            phase: if request == "skipped" {
                Phase::Skipped
            } else {
                Phase::Pending
            },
            request,
            last_key: None,
            reread: Keys::default(),
            key_names: None,
            key_kinds: None,
            relation_id: None,
            rows_copied: 0,
            range_done: false,
            started_lsn: None,
            done_lsn: None,
            pass: 0,
        }
    }

    /// The most keys to read again a copy in chunks of `chunk_size` holds.
    pub fn max_reread(chunk_size: usize) -> usize {
        chunk_size
            .saturating_mul(REREAD_CHUNKS)
            .max(MIN_REREAD_KEYS)
    }

    /// Copies the table's range again from its start, instead of reading the keys noted one
    /// by one: the range reads every row that exists, whole, in a chunk read after they were
    /// noted (a key it does not find holds no row). Chunks of the range read before keep
    /// their rows but no longer move its position.
    pub fn restart_range(&mut self) {
        self.last_key = None;
        self.range_done = false;
        self.reread.clear();
        self.pass += 1;
    }

    /// Still to copy.
    pub fn to_copy(&self) -> bool {
        matches!(self.phase, Phase::Pending | Phase::Copying)
    }
}

/// What the operator and the status line show of one table's snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableProgress {
    pub table: String,
    pub phase: Phase,
    pub rows_copied: i64,
    pub rows_estimate: Option<i64>,
    pub request: String,
}

/// A table as a snapshot reads it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub table: TableName,
    /// As pgoutput describes it: the published columns, the replica identity's flagged.
    pub relation: Arc<Relation>,
    /// Indexes into `relation.columns` of the key the chunks are ordered by.
    pub key: Vec<usize>,
    /// `FROM` clause target: `ONLY t` for a plain table (its inheritance children are
    /// published on their own), the table for a partitioned one (its partitions are
    /// published under its name).
    from: String,
    /// The publication's row filter as the server prints it.
    row_filter: Option<String>,
    pub estimate: Option<i64>,
    /// What precedes each column's value in an image: `{"id":`, `,"name":`, ...
    prefixes: Vec<String>,
    /// The table's definition when the plan was made, as [`definition_sql`] gives it.
    pub definition: String,
    /// The key columns' types and collations (see [`TableState::key_kinds`]).
    pub key_kinds: Vec<String>,
}

/// A query giving a fingerprint of table `relid`'s definition (its schema and name, which
/// the chunks' queries go by; its columns with their types, collations and NOT NULL; its
/// replica identity; and its valid indexes, which decide the key: [`plan`]), or `gone` once
/// it no longer exists. Equal fingerprints read in two
/// transactions mean no column was added, dropped or retyped in between, and the key the
/// chunks go by is the same.
fn definition_sql(relid: u32) -> String {
    format!(
        "SELECT coalesce((SELECT md5(c.relnamespace::text || ' ' || c.relname || ' ' || c.relreplident::text || ' ' || string_agg(a.attname || ' ' || a.atttypid || ' ' || a.atttypmod \
                || ' ' || a.attcollation || ' ' || a.attnotnull, ',' ORDER BY a.attnum) || ' ' || coalesce((SELECT string_agg(i.indexrelid \
                || ' ' || i.indisprimary || ' ' || i.indisreplident || ' ' || i.indisunique || ' ' || i.indkey::text || ' ' \
                || (i.indpred IS NULL) || ' ' || (i.indexprs IS NULL), ',' ORDER BY i.indexrelid) \
              FROM pg_index i WHERE i.indrelid = c.oid AND i.indisvalid), '')) \
           FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
           WHERE c.oid = {relid} GROUP BY c.oid, c.relnamespace, c.relname, c.relreplident), 'gone')"
    )
}

impl Plan {
    /// The image prefixes of `relation`'s columns (the `prefixes` field).
    fn prefixes(relation: &Relation) -> Vec<String> {
        relation
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut p = String::from(if i == 0 { "{" } else { "," });
                write_json_string(&mut p, &c.name);
                p.push(':');
                p
            })
            .collect()
    }

    /// The key the chunks go by: its column names, and their types and collations.
    pub fn key_id(&self) -> (Vec<String>, Vec<String>) {
        (
            self.key_names().iter().map(|k| k.to_string()).collect(),
            self.key_kinds.clone(),
        )
    }

    fn key_names(&self) -> Vec<&str> {
        self.key
            .iter()
            .map(|&i| self.relation.columns[i].name.as_str())
            .collect()
    }

    fn key_list(&self) -> String {
        let names: Vec<String> = self.key_names().into_iter().map(quote_ident).collect();
        format!("({})", names.join(", "))
    }

    fn tuple(values: &[String]) -> String {
        let v: Vec<String> = values.iter().map(|s| quote_literal(s)).collect();
        format!("({})", v.join(", "))
    }

    /// The query of one chunk.
    fn query(&self, chunk: &ChunkKind, limit: usize) -> String {
        let columns: Vec<String> = self
            .relation
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        let mut conditions = Vec::new();
        match chunk {
            ChunkKind::After(Some(last)) => {
                conditions.push(format!("{} > {}", self.key_list(), Plan::tuple(last)))
            }
            ChunkKind::After(None) => {}
            ChunkKind::Reread(keys) => {
                let keys: Vec<String> = keys.iter().map(|k| Plan::tuple(k)).collect();
                conditions.push(format!("{} IN ({})", self.key_list(), keys.join(", ")));
            }
        }
        if let Some(f) = &self.row_filter {
            conditions.push(format!("({f})"));
        }
        let order: Vec<String> = self.key_names().into_iter().map(quote_ident).collect();
        format!(
            "SELECT {} FROM {}{} ORDER BY {} LIMIT {limit}",
            columns.join(", "),
            self.from,
            if conditions.is_empty() {
                String::new()
            } else {
                format!(" WHERE {}", conditions.join(" AND "))
            },
            order.join(", ")
        )
    }

    /// A row read by a chunk as an event image, its key as the loop compares keys, and its
    /// key's text values.
    fn row(&self, values: &[Option<&str>]) -> Result<Row> {
        let mut image = String::with_capacity(
            self.prefixes.iter().map(|p| p.len()).sum::<usize>()
                + values.iter().flatten().map(|v| v.len() + 2).sum::<usize>()
                + 2,
        );
        for ((col, prefix), value) in self.relation.columns.iter().zip(&self.prefixes).zip(values) {
            image.push_str(prefix);
            match value {
                None => image.push_str("null"),
                Some(text) => write_value(&mut image, col.type_oid, text),
            }
        }
        if image.is_empty() {
            image.push('{');
        }
        image.push('}');
        let mut key = String::from("[");
        let mut key_text = Vec::with_capacity(self.key.len());
        for (n, &i) in self.key.iter().enumerate() {
            let Some(text) = values.get(i).copied().flatten() else {
                return Err(Error::Snapshot(format!(
                    "a row of {} has no value in key column {}",
                    self.table, self.relation.columns[i].name
                )));
            };
            if n > 0 {
                key.push(',');
            }
            write_value(&mut key, self.relation.columns[i].type_oid, text);
            key_text.push(text.to_string());
        }
        key.push(']');
        Ok(Row {
            key,
            key_text,
            image,
            unstorable: None,
        })
    }

    /// `row` with `images` (JSON objects of some of its columns, in order) laid over it:
    /// each column's value from the last image holding it, else the row's. `None` when an
    /// image names a column the plan does not have, or is not an object.
    fn fold(&self, row: &Row, images: &[&str]) -> Option<Row> {
        let mut values: HashMap<String, &RawValue> = serde_json::from_str(&row.image).ok()?;
        for image in images {
            let fields: HashMap<String, &RawValue> = serde_json::from_str(image).ok()?;
            for (name, value) in fields {
                *values.get_mut(&name)? = value;
            }
        }
        let mut image = String::with_capacity(row.image.len());
        for (col, prefix) in self.relation.columns.iter().zip(&self.prefixes) {
            image.push_str(prefix);
            image.push_str(values.get(col.name.as_str())?.get());
        }
        if image.is_empty() {
            image.push('{');
        }
        image.push('}');
        Some(Row {
            image,
            ..row.clone()
        })
    }

    /// A row with values that are not UTF-8 (`bad`: their columns; a `SQL_ASCII` source
    /// stores bytes unchecked): kept as its key, with why it cannot be stored, for
    /// `spec.poisonEvents` to deal with as with such a change in the stream. A key that is
    /// not UTF-8 itself cannot be copied past: refused, naming the table and column.
    fn unstorable(&self, values: &[Option<&str>], bad: &[usize]) -> Result<Row> {
        let name = |i: usize| self.relation.columns[i].name.as_str();
        if let Some(&i) = bad.iter().find(|i| self.key.contains(i)) {
            return Err(Error::Snapshot(format!(
                "cannot copy the existing rows of {}: key column {} of a row holds a value that is not valid UTF-8 \
                 (a SQL_ASCII source stores bytes unchecked); fix the value on the source, or remove the table from \
                 spec.source.tables",
                self.table,
                name(i)
            )));
        }
        let mut row = self.row(values)?;
        let key: Vec<String> = self.key.iter().map(|&i| name(i).to_string()).collect();
        let columns: Vec<&str> = bad.iter().map(|&i| name(i)).collect();
        row.image = String::new();
        row.unstorable = Some(format!(
            "the row ({})=({}) holds a value that is not valid UTF-8 in column {} (a SQL_ASCII source stores bytes \
             unchecked); the row stays in the table, and fixing the value on the source captures it",
            key.join(", "),
            row.key_text.join(", "),
            columns.join(", ")
        ));
        Ok(row)
    }
}

/// One row of a chunk.
#[derive(Debug, Clone)]
pub struct Row {
    /// The key's values as JSON, in key order: `[1,"a"]`.
    pub key: String,
    pub key_text: Vec<String>,
    pub image: String,
    /// Why the row cannot be stored as an event (then `image` is empty).
    pub unstorable: Option<String>,
}

/// A copied row, as the loop knows it across sessions: its position is new each time its
/// chunk is read, its table and key are not.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CopiedRow {
    /// `schema.table`.
    pub table: String,
    /// The key's values as JSON ([`Row::key`]).
    pub key: String,
    /// The key for people: `(id)=(4)`.
    pub shown: String,
}

/// Which rows a chunk reads.
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkKind {
    /// The next rows after this key (from the start when `None`).
    After(Option<Vec<String>>),
    /// These keys again.
    Reread(Vec<Vec<String>>),
}

/// What a snapshot of the source can see: `pg_current_snapshot()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visibility {
    xmin: u64,
    xmax: u64,
    xip: HashSet<u64>,
}

impl Visibility {
    /// Parses `xmin:xmax:xip,...`.
    pub fn parse(s: &str) -> Option<Visibility> {
        let mut parts = s.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => HashSet::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<HashSet<u64>>>()?,
        };
        Some(Visibility { xmin, xmax, xip })
    }

    /// Whether the snapshot sees the committed transaction `xid` (32 bits, as the stream
    /// carries it; its epoch is the one nearest to the snapshot's).
    pub fn sees(&self, xid: u32) -> bool {
        let epoch = self.xmax & !0xffff_ffff;
        let mut full = epoch | u64::from(xid);
        if full > self.xmax + (1 << 31) && full >= (1 << 32) {
            full -= 1 << 32;
        } else if full + (1 << 31) < self.xmax {
            full += 1 << 32;
        }
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

/// One chunk, read and handed to the loop before its close watermark is written.
#[derive(Debug)]
pub struct Chunk {
    pub id: u64,
    pub plan: Arc<Plan>,
    pub kind: ChunkKind,
    pub visibility: Visibility,
    pub rows: Vec<Row>,
    /// The key's text values of the last row read (the loop takes the rows it writes).
    pub last_key: Option<Vec<String>>,
    /// A range chunk that reached the end of the table.
    pub end: bool,
    /// The pass of the range it was read in ([`TableState::pass`]).
    pub pass: u32,
    /// The table's definition the rows were read with ([`definition_sql`]), the plan's.
    pub definition: String,
}

impl Chunk {
    /// The table's state `before` this chunk, once its kept rows (`written` of them) are
    /// written and `reread` keys are left to read again; `at` is where they are written,
    /// `opened` where the chunk's window began.
    pub fn advance(
        &self,
        before: &TableState,
        written: usize,
        reread: Vec<Vec<String>>,
        opened: u64,
        at: u64,
    ) -> TableState {
        let mut next = before.clone();
        let (names, kinds) = self.plan.key_id();
        let replaced = another_table(&next, self.plan.relation.id);
        if another_key(&next, &names, &kinds) || replaced {
            // Read under a new key, or from another table under the same name (see
            // `copy_tables`): what was noted under the old one means nothing now; the copy
            // starts over from this chunk.
            next.last_key = None;
            next.reread.clear();
            next.range_done = false;
        }
        if replaced {
            // The rows of the table replaced are gone with it, no event saying so: from
            // here on, a row whose last event sorts before this chunk no longer exists
            // (README: the consumer rule of a finished copy). A window is carried (opened
            // at 0) only across chunks of one relation, so this chunk's opened at its own
            // watermark.
            debug_assert!(
                opened != 0,
                "a chunk of a replaced table opened a window of its own"
            );
            next.started_lsn = Some(opened);
        }
        next.key_names = Some(names);
        next.key_kinds = Some(kinds);
        next.relation_id = Some(self.plan.relation.id);
        next.rows_copied += written as i64;
        // Everything of the table from here on is in the log: events after it, or rows
        // of the copy (README: the consumer rule of a finished copy).
        next.started_lsn.get_or_insert(opened);
        match &self.kind {
            // Read before the range started over: its rows are written, its position is past.
            ChunkKind::After(_) if self.pass != next.pass => {}
            ChunkKind::After(_) => {
                if let Some(last) = &self.last_key {
                    next.last_key = Some(last.clone());
                }
                next.range_done |= self.end;
            }
            ChunkKind::Reread(taken) => {
                let taken: HashSet<&Vec<String>> = taken.iter().collect();
                next.reread.retain(|k| !taken.contains(k));
            }
        }
        for k in reread {
            next.reread.push(k);
        }
        if next.range_done && next.reread.is_empty() {
            next.phase = Phase::Done;
            next.done_lsn = Some(at);
        } else {
            next.phase = Phase::Copying;
        }
        next
    }
}

/// Whether `state`'s progress was noted reading another table than `relid` under its name
/// (not when it does not say: progress written before migration 0008).
fn another_table(state: &TableState, relid: u32) -> bool {
    state.relation_id.is_some_and(|r| r != relid)
}

/// Whether `state`'s progress was noted under another key than `names` with `kinds` (not
/// when it does not say: progress written before the key was noted).
fn another_key(state: &TableState, names: &[String], kinds: &[String]) -> bool {
    state.key_names.as_deref().is_some_and(|k| k != names)
        || state.key_kinds.as_deref().is_some_and(|k| k != kinds)
}

/// What the loop made of a chunk at its close watermark: the rows to write, and the keys
/// to read again later.
#[derive(Debug)]
pub struct Closed {
    pub rows: Vec<Row>,
    pub reread: Vec<Vec<String>>,
    /// Why every row of the chunk is read again, if it is.
    pub why: Option<String>,
}

impl Closed {
    /// Every row of the chunk read again, besides the keys it already reads again.
    pub fn read_again(self, why: String) -> Closed {
        let mut reread: Vec<Vec<String>> = self.rows.into_iter().map(|r| r.key_text).collect();
        reread.extend(self.reread);
        Closed {
            rows: Vec::new(),
            reread,
            why: Some(why),
        }
    }
}

/// Transactions the stream carried that changed a table, as long as a chunk's snapshot may
/// not see them: for each, its table and its commit position.
///
/// A transaction's commit record can be in the WAL, and in the stream, before the snapshot
/// of a chunk read after it sees the transaction: its backend writes the record, then marks
/// the transaction committed in the commit log, then ends it for snapshots. The task's wait
/// (see [`wait_committed_visible`]) covers the last gap; nothing a client can ask covers the
/// first. When a window begins after such a commit, the window does not hold its changes and
/// cannot drop the rows they made stale. The loop notes every transaction here instead, and
/// reads a chunk again when its snapshot does not see a transaction of its table that
/// committed before its window began ([`Earlier::unseen_before`]).
///
/// Chunks are read one after another and closed in that order, so what the snapshot of the
/// oldest chunk not closed yet sees, every chunk still to close sees: such transactions are
/// forgotten, and not noted from then on ([`Earlier::seen_by`], with each chunk as it
/// arrives while none is waiting, and at each close). What stays is the transactions that
/// committed after the oldest chunk still open was read. Should they reach [`MAX_EARLIER`]
/// (the copy has not read a chunk for that long), the session ends and the next one resumes
/// the copy from its last chunk written: forgetting them would leave the chunks still to
/// close unchecked.
#[derive(Debug, Default)]
pub struct Earlier {
    /// (xid, relation id) → commit position.
    xids: HashMap<(u32, u32), u64>,
    /// The last one noted: a transaction's changes of one table come one after another.
    last: Option<(u32, u32)>,
    /// What every chunk still to close sees.
    floor: Option<Visibility>,
}

/// The most transactions [`Earlier`] holds (some 50 MB).
pub const MAX_EARLIER: usize = 1_000_000;

impl Earlier {
    /// Notes that transaction `xid`, committing at `commit_lsn`, changed relation `relid`;
    /// `false` when [`MAX_EARLIER`] are held already (it is not noted).
    pub fn note(&mut self, xid: u32, relid: u32, commit_lsn: u64) -> bool {
        if self.last == Some((xid, relid)) {
            return true;
        }
        if self.floor.as_ref().is_some_and(|f| f.sees(xid)) {
            self.last = Some((xid, relid));
            return true;
        }
        if self.xids.len() >= MAX_EARLIER && !self.xids.contains_key(&(xid, relid)) {
            return false;
        }
        self.last = Some((xid, relid));
        self.xids.entry((xid, relid)).or_insert(commit_lsn);
        true
    }

    /// A transaction that changed `relid`, committed before `since`, that `vis` does not see.
    pub fn unseen_before(&self, vis: &Visibility, relid: u32, since: u64) -> Option<u32> {
        self.xids
            .iter()
            .find(|((xid, rel), at)| *rel == relid && **at < since && !vis.sees(*xid))
            .map(|((xid, _), _)| *xid)
    }

    /// `vis` is the snapshot of the oldest chunk not closed yet, or of one older: forgets the
    /// transactions it sees, and notes none of them from now on.
    pub fn seen_by(&mut self, vis: &Visibility) {
        self.xids.retain(|(xid, _), _| !vis.sees(*xid));
        self.floor = Some(vis.clone());
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.xids.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.xids.is_empty()
    }
}

/// One change of the table seen in a window.
#[derive(Debug)]
struct Touch {
    xid: u32,
    /// `None` for TRUNCATE (every key).
    key: Option<String>,
    /// The key's text values, to read it again.
    key_text: Vec<String>,
    /// The image is the whole row (an INSERT, or an UPDATE that left nothing out).
    whole: bool,
    deleted: bool,
    /// The new key of an UPDATE that changed the key.
    moved_in: bool,
    /// What the change adds to the chunk's row of its key, built at the close.
    fold: Fold,
}

/// How a change of a key enters the row built at the close from the chunk's row and the
/// changes its snapshot does not see (see [`Window::close`]).
#[derive(Debug)]
enum Fold {
    /// Not from an UPDATE that kept its key, or its image was not kept: no row is built.
    No,
    /// The old image of an UPDATE that kept its key: the new one says it all.
    Skip,
    /// The new image of an UPDATE that kept its key and left a TOASTed column out.
    Image(String),
}

/// The changes of one table between a chunk's watermarks.
#[derive(Debug)]
pub struct Window {
    pub chunk: u64,
    pub relation_id: u32,
    key_names: Vec<String>,
    touches: Vec<Touch>,
    /// Transactions with a change whose key could not be read.
    unknown: Vec<u32>,
    /// Changes past `limit` were not kept (see [`MAX_WINDOW_TOUCHES`]).
    overflowed: bool,
    limit: usize,
    /// The bytes of the images kept ([`Fold::Image`]), at most `MAX_CHUNK_BYTES`.
    image_bytes: usize,
    /// The commit position of the watermark that opened it (0: carried from a close).
    opened_at: u64,
    /// Where it began in the stream: the commit position of the watermark that opened it, or
    /// of the close it was carried from. Changes before are not in it ([`Earlier`]).
    began: u64,
}

impl Window {
    /// Opens the window of `chunk`, continuing `carried` (the changes of the same table
    /// since the previous chunk closed) when there is one: a transaction that committed
    /// just before this chunk's open watermark and that its snapshot does not see is then
    /// in the window too.
    pub fn open_after(
        carried: Option<Window>,
        chunk: u64,
        relation_id: u32,
        key_names: Vec<String>,
        at: u64,
    ) -> Window {
        match carried {
            Some(mut w) if w.relation_id == relation_id && w.key_names == key_names => {
                w.chunk = chunk;
                w
            }
            _ => Window {
                opened_at: at,
                began: at,
                ..Window::open(chunk, relation_id, key_names)
            },
        }
    }

    /// Where the window began: the commit position of the watermark that opened it.
    pub fn opened_at(&self) -> u64 {
        self.opened_at
    }

    /// Where the window began in the stream (see [`Earlier`]).
    pub fn began(&self) -> u64 {
        self.began
    }

    /// The window, beginning at `lsn`: the commit position of the close it is carried from.
    pub fn beginning_at(self, lsn: u64) -> Window {
        Window { began: lsn, ..self }
    }

    /// The names of the key the window tracks.
    pub fn key_names(&self) -> &[String] {
        &self.key_names
    }

    pub fn open(chunk: u64, relation_id: u32, key_names: Vec<String>) -> Window {
        Window {
            opened_at: 0,
            began: 0,
            chunk,
            relation_id,
            key_names,
            touches: Vec::new(),
            unknown: Vec::new(),
            overflowed: false,
            limit: MAX_WINDOW_TOUCHES,
            image_bytes: 0,
        }
    }

    /// Notes a change of the window's table by transaction `xid`.
    pub fn record(&mut self, xid: u32, change: &Change) {
        if change.relation.id != self.relation_id {
            return;
        }
        let rel = &change.relation;
        let key_types = key_types(rel, &self.key_names);
        match change.operation {
            Operation::Truncate => self.touch(Touch {
                xid,
                key: None,
                key_text: Vec::new(),
                whole: true,
                deleted: true,
                moved_in: false,
                fold: Fold::No,
            }),
            Operation::Snapshot => {}
            op => {
                let whole_after = change
                    .after
                    .as_deref()
                    .map(|a| image_columns(a) == Some(rel.columns.len()));
                // (old key, new key) of an UPDATE that sent its old key.
                let old_key = match (op, &change.before, &change.after) {
                    (Operation::Update, Some(b), Some(a)) => {
                        image_key(b, &self.key_names, &key_types)
                            .zip(image_key(a, &self.key_names, &key_types))
                            .map(|((o, _), (n, _))| (o, n))
                    }
                    _ => None,
                };
                for (image, is_after) in [(&change.before, false), (&change.after, true)] {
                    let Some(image) = image else { continue };
                    match image_key(image, &self.key_names, &key_types) {
                        Some((key, key_text)) => {
                            let deleted = op == Operation::Delete
                                || (!is_after
                                    && old_key.as_ref().is_some_and(|(_, new)| *new != key));
                            let moved_in = is_after
                                && op == Operation::Update
                                && old_key.as_ref().is_some_and(|(old, _)| *old != key);
                            let whole =
                                is_after && (op == Operation::Insert || whole_after == Some(true));
                            let fold = match (op, deleted || moved_in, is_after) {
                                (Operation::Update, false, false) => Fold::Skip,
                                (Operation::Update, false, true)
                                    if !whole
                                        && self.image_bytes + image.len() <= MAX_CHUNK_BYTES =>
                                {
                                    self.image_bytes += image.len();
                                    Fold::Image(image.clone())
                                }
                                _ => Fold::No,
                            };
                            self.touch(Touch {
                                moved_in,
                                xid,
                                key: Some(key),
                                key_text,
                                whole,
                                deleted,
                                fold,
                            });
                        }
                        // The old image of an UPDATE carries the key only when it changed.
                        None if !is_after && op == Operation::Update => {}
                        None if self.unknown.last() == Some(&xid) => {}
                        None => self.unknown.push(xid),
                    }
                }
            }
        }
    }

    /// Keeps a change, within the window's limit. Past it, only what the chunk's rows read
    /// again would not cover is kept: a TRUNCATE, and a row moved in without a whole image
    /// (its key may be outside the chunk).
    fn touch(&mut self, t: Touch) {
        if self.touches.len() < self.limit || t.key.is_none() || (t.moved_in && !t.whole) {
            self.touches.push(t);
        } else {
            self.overflowed = true;
        }
    }

    /// Decides the chunk at its close watermark (see the module's documentation), taking
    /// the rows it keeps out of the chunk.
    pub fn close(self, chunk: &mut Chunk) -> Closed {
        let vis = &chunk.visibility;
        let truncated = self
            .touches
            .iter()
            .any(|t| t.key.is_none() && !vis.sees(t.xid));
        // Per key: changed by a transaction the chunk does not see; a whole image seen since
        // the key last held no row (a row moved in or inserted after a delete is another
        // row); the last change deleted it.
        let mut keys: HashMap<&str, (bool, bool, bool, &[String])> = HashMap::new();
        let mut moved_in: HashSet<&str> = HashSet::new();
        let mut moved_partial: HashSet<&str> = HashSet::new();
        for t in &self.touches {
            let Some(k) = &t.key else { continue };
            if t.moved_in {
                moved_in.insert(k.as_str());
                if !t.whole {
                    moved_partial.insert(k.as_str());
                }
            }
            let e = keys
                .entry(k.as_str())
                .or_insert((false, false, false, &t.key_text));
            e.0 |= !vis.sees(t.xid);
            e.1 = if t.deleted { false } else { e.1 || t.whole };
            e.2 = t.deleted;
        }
        // A key the chunk did not hold that an UPDATE moved a row to, leaving columns out:
        // the row never had a whole image, whether the chunk's snapshot saw the move or not
        // (a key the copy has passed is not read by range again; any other key not in the
        // chunk is copied by its own chunk, or was, whole). Read again by itself; a key
        // still ahead of the copy is then copied twice, both times whole.
        // Past the window's limit the changes that would tell (a delete, a whole image) may
        // not have been kept: every key a row was moved in to without a whole image is read
        // again (one that no longer exists costs nothing).
        let mut moved_reread = Vec::new();
        if !moved_in.is_empty() {
            let in_chunk: HashSet<&str> = chunk.rows.iter().map(|r| r.key.as_str()).collect();
            for (k, (_, whole, deleted, text)) in &keys {
                let unsure = self.overflowed && moved_partial.contains(k);
                if unsure || (!whole && !deleted && !in_chunk.contains(k) && moved_in.contains(k)) {
                    moved_reread.push(text.to_vec());
                }
            }
        }
        // A change whose key the image does not show (an UPDATE that left a TOASTed key
        // column out), or more changes than the window keeps: every row of the chunk is read
        // again by key, and the keys moved in.
        let unknown = self.unknown.iter().find(|x| !vis.sees(**x)).map(|xid| {
            format!(
                "transaction {xid} changed a row of {} whose key its image does not show",
                chunk.plan.table
            )
        });
        let overflowed = self.overflowed.then(|| {
            format!(
                "more than {} changes of {} arrived while it was read",
                self.limit, chunk.plan.table
            )
        });
        if let Some(why) = unknown.or(overflowed) {
            let mut reread: Vec<Vec<String>> =
                chunk.rows.iter().map(|r| r.key_text.clone()).collect();
            reread.append(&mut moved_reread);
            return Closed {
                rows: Vec::new(),
                reread,
                why: Some(why),
            };
        }
        // A row changed only by UPDATEs that kept its key, the last ones unseen and leaving
        // a TOASTed column out: the row at the close is the chunk's row with their images
        // laid over it in the stream's order (a column an image leaves out is unchanged
        // since the one before). Updates of one row commit in the order they become visible
        // (each waits for the last one's lock, released once it is visible), so the seen ones
        // come first; should an unseen one come before a seen one, it is read again instead.
        let mut folds: HashMap<&str, Option<Vec<&str>>> = HashMap::new();
        if !truncated {
            for row in &chunk.rows {
                if let Some((&k, (true, false, false, _))) = keys.get_key_value(row.key.as_str()) {
                    if row.unstorable.is_none() {
                        folds.insert(k, Some(Vec::new()));
                    }
                }
            }
        }
        if !folds.is_empty() {
            for t in &self.touches {
                let Some(Some(list)) = t.key.as_deref().and_then(|k| folds.get_mut(k)) else {
                    continue;
                };
                let keep = match &t.fold {
                    Fold::Skip => true,
                    Fold::Image(image) if !vis.sees(t.xid) => {
                        list.push(image);
                        true
                    }
                    Fold::Image(_) => list.is_empty(),
                    Fold::No => false,
                };
                if !keep {
                    if let Some(k) = t.key.as_deref() {
                        folds.insert(k, None);
                    }
                }
            }
        }
        let mut reread = Vec::new();
        let mut rows = Vec::with_capacity(chunk.rows.len());
        for row in chunk.rows.drain(..) {
            match keys.get(row.key.as_str()) {
                Some((true, whole, deleted, _)) => {
                    if !whole && !deleted && !truncated {
                        let folded = match folds.get(row.key.as_str()) {
                            Some(Some(images)) if !images.is_empty() => {
                                chunk.plan.fold(&row, images)
                            }
                            _ => None,
                        };
                        match folded {
                            Some(row) => rows.push(row),
                            None => reread.push(row.key_text),
                        }
                    }
                }
                _ if truncated => {}
                _ => rows.push(row),
            }
        }
        reread.append(&mut moved_reread);
        Closed {
            rows,
            reread,
            why: None,
        }
    }
}

/// The new key's text values of an UPDATE that moved a row to another key of `key_names`
/// leaving columns out of its image (an unchanged TOASTed value): that row has no whole image
/// anywhere, and if the copy of its table has passed the new key, it is never read by range.
pub fn moved_without_whole_image(change: &Change, key_names: &[String]) -> Option<Vec<String>> {
    if change.operation != Operation::Update {
        return None;
    }
    let (before, after) = (change.before.as_deref()?, change.after.as_deref()?);
    let rel = &change.relation;
    if image_columns(after) == Some(rel.columns.len()) {
        return None;
    }
    let key_types = key_types(rel, key_names);
    let (old, _) = image_key(before, key_names, &key_types)?;
    let (new, text) = image_key(after, key_names, &key_types)?;
    (old != new).then_some(text)
}

/// The types of `key_names` as `rel` describes them (0 for a column it does not have).
fn key_types(rel: &Relation, key_names: &[String]) -> Vec<u32> {
    key_names
        .iter()
        .map(|k| {
            rel.columns
                .iter()
                .find(|c| &c.name == k)
                .map_or(0, |c| c.type_oid)
        })
        .collect()
}

/// The number of top-level members of a JSON object image, if it is one.
fn image_columns(image: &str) -> Option<usize> {
    serde_json::from_str::<HashMap<String, &RawValue>>(image)
        .ok()
        .map(|m| m.len())
}

/// The key of a row image as the loop compares keys (`[v1,v2]`, each value's JSON text as
/// written), and its text values; `None` if the image lacks a key column.
pub fn image_key(image: &str, names: &[String], types: &[u32]) -> Option<(String, Vec<String>)> {
    let fields: HashMap<String, &RawValue> = serde_json::from_str(image).ok()?;
    let mut key = String::from("[");
    let mut text = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let raw = fields.get(name)?.get();
        if i > 0 {
            key.push(',');
        }
        key.push_str(raw);
        text.push(json_text(raw, types.get(i).copied().unwrap_or(0))?);
    }
    key.push(']');
    Some((key, text))
}

/// PostgreSQL's text for a value written by [`write_value`].
fn json_text(raw: &str, type_oid: u32) -> Option<String> {
    match raw {
        "null" => None,
        _ if type_oid == oid::JSON || type_oid == oid::JSONB => Some(raw.to_string()),
        "true" => Some("t".into()),
        "false" => Some("f".into()),
        _ if raw.starts_with('"') => serde_json::from_str::<String>(raw).ok(),
        _ => Some(raw.to_string()),
    }
}

/// Reads what a snapshot of `table` needs from the source's catalog, in one snapshot: the
/// columns, the key and the definition's fingerprint agree with each other.
pub async fn plan(client: &Client, cfg: &PipelineConfig, table: &TableName) -> Result<Plan> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| source_error(cfg, &e))?;
    let planned = plan_in_tx(client, cfg, table).await;
    let end = if planned.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    let ended = client.batch_execute(end).await;
    let planned = planned?;
    ended.map_err(|e| source_error(cfg, &e))?;
    Ok(planned)
}

async fn plan_in_tx(client: &Client, cfg: &PipelineConfig, table: &TableName) -> Result<Plan> {
    // The connection lost, the server restarting or out of connections: the next session
    // reads the definition again and resumes after the last chunk written. Anything else
    // the source refused is for the user to fix.
    let err = |e: tokio_postgres::Error| {
        let message = format!(
            "cannot read the definition of {table} on the source database {} for its snapshot: {}",
            cfg.source,
            describe_pg_error(&e)
        );
        if heals_by_retrying(&e) {
            Error::Stream(message)
        } else {
            Error::Snapshot(message)
        }
    };
    let row = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, c.relkind::text, has_table_privilege(c.oid, 'SELECT'), current_user::text, \
                    CASE WHEN c.relkind = 'p' THEN \
                      (SELECT CASE WHEN bool_and(p.reltuples >= 0) THEN sum(p.reltuples)::int8 END \
                         FROM pg_partition_tree(c.oid) t JOIN pg_class p ON p.oid = t.relid WHERE t.isleaf) \
                    WHEN c.reltuples >= 0 THEN c.reltuples::int8 END, \
                    pg_is_in_recovery() \
             FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await
        .map_err(err)?
        .ok_or_else(|| {
            Error::Snapshot(format!(
                "table {table} does not exist on the source database {}",
                cfg.source
            ))
        })?;
    let relid: u32 = row.get(0);
    let identity: String = row.get(1);
    let kind: String = row.get(2);
    let can_select: bool = row.get(3);
    let user: String = row.get(4);
    let estimate: Option<i64> = row.get(5);
    let standby: bool = row.get(6);
    if standby {
        return Err(Error::Snapshot(format!(
            "cannot copy the existing rows of {table}: the source database {} is a standby, and a snapshot writes its \
             watermarks into the WAL; copy from the primary, or set spec.snapshot.mode: Never",
            cfg.source
        )));
    }
    if !can_select {
        return Err(Error::Snapshot(format!(
            "cannot copy the existing rows of {table}: the source user {user} lacks the SELECT privilege on it; \
             run GRANT SELECT ON {} TO {} on the source, or set spec.snapshot.mode: Never",
            table.quoted(),
            quote_ident(&user)
        )));
    }
    let columns = client
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, a.attnum, a.attcollation FROM pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
            &[&relid],
        )
        .await
        .map_err(err)?;
    let indexes = client
        .query(
            "SELECT i.indisprimary, i.indisreplident, i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL \
                    AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = i.indrelid \
                                    AND a.attnum = ANY (i.indkey::int2[]) AND NOT a.attnotnull), \
                    i.indkey::int2[] \
             FROM pg_index i WHERE i.indrelid = $1 AND i.indisvalid ORDER BY i.indnatts, i.indexrelid",
            &[&relid],
        )
        .await
        .map_err(err)?;
    let listed = cfg.filters.get(table).and_then(|f| f.columns.clone());
    let kept: Vec<(String, u32, i32, i16)> = columns
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .filter(|(name, ..): &(String, u32, i32, i16)| {
            listed.as_ref().is_none_or(|l| l.contains(name))
        })
        .collect();
    let index_cols = |pick: &dyn Fn(&tokio_postgres::Row) -> bool| -> Option<Vec<i16>> {
        indexes
            .iter()
            .find(|r| pick(r))
            .map(|r| r.get::<_, Vec<i16>>(3))
    };
    let primary = index_cols(&|r| r.get(0));
    let replident = index_cols(&|r| r.get(1));
    let identity_cols: Option<Vec<i16>> = match identity.as_str() {
        "d" => primary.clone(),
        "i" => replident.clone(),
        _ => None,
    };
    let full = identity == "f";
    let relation = Arc::new(Relation {
        id: relid,
        schema: table.schema.clone(),
        name: table.name.clone(),
        replica_identity: identity.chars().next().unwrap_or('d'),
        columns: kept
            .iter()
            .map(|(name, type_oid, type_modifier, attnum)| Column {
                name: name.clone(),
                type_oid: *type_oid,
                type_modifier: *type_modifier,
                key: full || identity_cols.as_ref().is_some_and(|k| k.contains(attnum)),
            })
            .collect(),
    });
    // The key the chunks are ordered by: the replica identity's index when it has one (its
    // columns are in every old image), else the primary key, else a unique index over
    // columns that cannot be null (under REPLICA IDENTITY FULL every image holds them).
    let position = |attnums: &[i16]| -> Option<Vec<usize>> {
        attnums
            .iter()
            .map(|n| kept.iter().position(|(.., a)| a == n))
            .collect()
    };
    let candidates = [
        identity_cols.clone(),
        primary,
        if full {
            index_cols(&|r| r.get(2))
        } else {
            None
        },
    ];
    let key = candidates
        .iter()
        .flatten()
        .find_map(|cols| position(cols))
        .ok_or_else(|| {
            Error::Snapshot(format!(
                "cannot copy the existing rows of {table}: it has no primary key, replica identity index, or unique index \
                 over NOT NULL columns among the captured columns, and a snapshot reads a table in chunks ordered by such a \
                 key (README: Snapshots); add a primary key, or set spec.snapshot.mode: Never"
            ))
        })?;
    let row_filter = match cfg.filters.get(table).and_then(|f| f.row_filter.as_ref()) {
        None => None,
        Some(_) => super::source::published(client, &cfg.publication)
            .await
            .map_err(err)?
            .remove(&table.to_string())
            .and_then(|(p, _)| p.row_filter),
    };
    let prefixes = Plan::prefixes(&relation);
    let key_kinds = key
        .iter()
        .map(|&i| {
            let (_, type_oid, _, attnum) = &kept[i];
            let collation: u32 = columns
                .iter()
                .find(|r| r.get::<_, i16>(3) == *attnum)
                .map_or(0, |r| r.get(4));
            format!("{type_oid}/{collation}")
        })
        .collect();
    let definition: String = client
        .query_one(&definition_sql(relid), &[])
        .await
        .map_err(err)?
        .get(0);
    Ok(Plan {
        table: table.clone(),
        relation,
        key,
        from: if kind == "p" {
            table.quoted()
        } else {
            format!("ONLY {}", table.quoted())
        },
        row_filter,
        estimate,
        prefixes,
        definition,
        key_kinds,
    })
}

/// The snapshot task's end of the link with the loop.
pub struct Task {
    pub chunks: mpsc::Sender<Message>,
    pub results: mpsc::UnboundedReceiver<TableState>,
}

/// From the snapshot task to the loop.
#[derive(Debug)]
pub enum Message {
    Chunk(Box<Chunk>),
    /// The task ended: every table copied, or why not.
    Finished(Result<()>),
}

/// The loop's end of the link.
pub struct Link {
    pub token: String,
    pub chunks: mpsc::Receiver<Message>,
    pub results: mpsc::UnboundedSender<TableState>,
    /// A chunk received before its close watermark.
    pub ready: std::collections::VecDeque<Box<Chunk>>,
    pub window: Option<Window>,
    /// The task ended: every table is copied (or it failed and said so).
    pub finished: bool,
    /// Each table's state as written with its last chunk (or read at the start): the loop
    /// owns it, the task follows it through `results`.
    pub states: HashMap<TableName, TableState>,
    /// The transactions a chunk's snapshot may not see yet.
    pub earlier: Earlier,
}

impl Link {
    /// Every table this session copies is done.
    pub fn all_done(&self) -> bool {
        self.states.values().all(|t| t.phase == Phase::Done)
    }
}

/// Starts a link; the task side goes to [`copy`].
pub fn link(token: String, todo: &[TableState]) -> (Link, Task) {
    let (chunks_tx, chunks_rx) = mpsc::channel(1);
    let (results_tx, results_rx) = mpsc::unbounded_channel();
    (
        Link {
            token,
            chunks: chunks_rx,
            results: results_tx,
            ready: std::collections::VecDeque::new(),
            window: None,
            finished: false,
            states: todo.iter().map(|t| (t.table.clone(), t.clone())).collect(),
            earlier: Earlier::default(),
        },
        Task {
            chunks: chunks_tx,
            results: results_rx,
        },
    )
}

/// A watermark as written into the WAL: `open <token> <chunk> <relation id> <key json>` or
/// `close <token> <chunk>`.
#[derive(Debug, PartialEq)]
pub enum Watermark {
    Open {
        token: String,
        chunk: u64,
        relation_id: u32,
        key_names: Vec<String>,
    },
    Close {
        token: String,
        chunk: u64,
        /// The table's definition when the watermark was written ([`definition_sql`]).
        definition: String,
    },
}

impl Watermark {
    pub fn parse(content: &[u8]) -> Option<Watermark> {
        let text = std::str::from_utf8(content).ok()?;
        let mut parts = text.splitn(5, ' ');
        match parts.next()? {
            "open" => Some(Watermark::Open {
                token: parts.next()?.to_string(),
                chunk: parts.next()?.parse().ok()?,
                relation_id: parts.next()?.parse().ok()?,
                key_names: serde_json::from_str(parts.next()?).ok()?,
            }),
            "close" => Some(Watermark::Close {
                token: parts.next()?.to_string(),
                chunk: parts.next()?.parse().ok()?,
                definition: parts.next()?.to_string(),
            }),
            _ => None,
        }
    }
}

/// The snapshot task: copies every table in `todo`, chunk by chunk, in turn. Runs beside the
/// loop of one session and ends with it (it is aborted then: all its state is in the buffer,
/// written by the loop with each chunk).
pub async fn copy(
    cfg: PipelineConfig,
    token: String,
    todo: Vec<TableState>,
    mut task: Task,
    progress: watch::Sender<Progress>,
    time_zone: Option<String>,
) {
    let result = copy_tables(&cfg, &token, todo, &mut task, &progress, time_zone).await;
    // The loop ends the session on an error; it reads this even while holding a chunk.
    let _ = task.chunks.send(Message::Finished(result)).await;
}

/// The snapshot task's session on the source, set up so values read as the stream renders
/// them.
struct Session {
    client: Client,
    settings: String,
}

impl Session {
    async fn open(cfg: &PipelineConfig, time_zone: Option<String>) -> Result<Session> {
        let client = cfg.source.connect("source").await?;
        // Values must read exactly as the stream renders them (keys are compared as text,
        // and the images are the contract): the settings the replication session pins, and
        // its time zone. Row security off: a policy that would hide rows makes the read fail
        // instead (pgoutput ignores policies).
        let mut settings = String::from(
            "SET standard_conforming_strings = on; SET statement_timeout = 0; SET datestyle = 'ISO, MDY'; \
             SET intervalstyle = postgres; SET extra_float_digits = 1; SET bytea_output = hex; SET row_security = off;",
        );
        if let Some(tz) = &time_zone {
            let _ = write!(settings, " SET TimeZone = {};", quote_literal(tz));
        }
        // As the stream does: a SQL_ASCII source's text is taken as the bytes it stores,
        // since the server would fail the whole read on the first value that is not UTF-8
        // (and again on every retry); such a row then goes the way of spec.poisonEvents (see
        // `Plan::unstorable`).
        let encoding = client
            .query_one("SHOW server_encoding", &[])
            .await
            .map_err(|e| source_error(cfg, &e))?;
        if encoding.try_get::<_, &str>(0).ok() == Some("SQL_ASCII") {
            settings.push_str(" SET client_encoding = 'SQL_ASCII';");
        }
        client
            .batch_execute(&settings)
            .await
            .map_err(|e| source_error(cfg, &e))?;
        Ok(Session { client, settings })
    }

    /// A new connection in place of one whose read was cut short (see [`read_range`]).
    async fn reopen(&mut self, cfg: &PipelineConfig) -> Result<()> {
        // The COPY still running is cancelled: dropped, the connection would read the rest
        // of it before closing (tokio-postgres drains a response nobody waits for), and its
        // server process would go on sending it, snapshot and lock held. The old session runs
        // no other statement, so the cancel cannot land on one. Should it fail, the old
        // connection drains and closes: rows read twice, nothing lost.
        if let Err(e) = cfg
            .source
            .cancel("source", &self.client.cancel_token())
            .await
        {
            tracing::warn!(pipeline = %cfg.id, error = %e, "could not cancel a chunk's read cut short; its connection reads the rest before closing");
        }
        let client = cfg.source.connect("source").await?;
        client
            .batch_execute(&self.settings)
            .await
            .map_err(|e| source_error(cfg, &e))?;
        self.client = client;
        Ok(())
    }
}

async fn copy_tables(
    cfg: &PipelineConfig,
    token: &str,
    todo: Vec<TableState>,
    task: &mut Task,
    progress: &watch::Sender<Progress>,
    time_zone: Option<String>,
) -> Result<()> {
    if todo.is_empty() {
        return Ok(());
    }
    let mut source = Session::open(cfg, time_zone).await?;
    // A table just added to the publication, or published with another column list or row
    // filter: a transaction running when the publication changed may have changed its rows
    // before, unpublished then, and commit after a chunk read them. Once those transactions
    // have ended, every chunk sees what they wrote. Any copy asked for at a start may follow
    // such a change (an added or changed table, or a resync asked for in the same start),
    // but a new pipeline's first ones: its slot, created after its publication, waited for
    // them already. The other tables' changes stream meanwhile (the loop does not wait for
    // the task).
    if todo
        .iter()
        .any(|t| t.phase == Phase::Pending && t.request != "initial")
    {
        wait_running_ended(
            &source.client,
            cfg,
            "tables are to be copied that the publication may have just begun to publish",
        )
        .await?;
    }
    let mut chunk_id = 0u64;
    for mut state in todo {
        let mut plan = Arc::new(plan(&source.client, cfg, &state.table).await?);
        let mut fresh_plan = true;
        let table = state.table.to_string();
        progress.send_modify(|p| {
            if let Some(t) = p.snapshots.iter_mut().find(|t| t.table == table) {
                t.rows_estimate = plan.estimate;
            }
        });
        tracing::info!(pipeline = %cfg.id, table = %table, request = %state.request, "copying existing rows");
        // Up to two chunks in flight: the next one is read while the loop writes the last.
        // The loop owns the table's state (it writes it with each chunk); the task reads the
        // range ahead of it and learns the keys to read again from its answers.
        let mut next_after = state.last_key.clone();
        let mut range_sent = state.range_done;
        // The key the copy goes by: `last_key` and `reread` are its values.
        let mut copy_key = TableState {
            key_names: state.key_names.clone(),
            key_kinds: state.key_kinds.clone(),
            relation_id: state.relation_id,
            ..TableState::requested(state.table.clone(), String::new())
        };
        let mut in_flight: std::collections::VecDeque<bool> = std::collections::VecDeque::new();
        let mut seen = Seen::default();
        let mut pass = state.pass;
        loop {
            while let Ok(next) = task.results.try_recv() {
                state = next;
                in_flight.pop_front();
            }
            if state.phase == Phase::Done {
                break;
            }
            // The loop started the range over (too many keys to read again): from the start.
            if state.pass != pass {
                pass = state.pass;
                next_after = None;
                range_sent = false;
            }
            let reread_in_flight = in_flight.iter().any(|r| *r);
            // Keys noted under another key (the loop has not written a chunk under the new
            // one yet) are not read: the copy starts over anyway.
            let same_key = copy_key
                .key_names
                .as_ref()
                .zip(copy_key.key_kinds.as_ref())
                .is_none_or(|(names, kinds)| !another_key(&state, names, kinds))
                && copy_key
                    .relation_id
                    .is_none_or(|r| !another_table(&state, r));
            let kind = if !state.reread.is_empty() && !reread_in_flight && same_key {
                Some(ChunkKind::Reread(
                    state
                        .reread
                        .iter()
                        .take(cfg.snapshot.chunk_size)
                        .cloned()
                        .collect(),
                ))
            } else if !range_sent {
                Some(ChunkKind::After(next_after.clone()))
            } else {
                None
            };
            let Some(mut kind) = kind.filter(|_| in_flight.len() < 2) else {
                // Wait for the loop's answer: the state it wrote decides what comes next.
                match task.results.recv().await {
                    Some(next) => {
                        state = next;
                        in_flight.pop_front();
                        continue;
                    }
                    None => return Ok(()),
                }
            };
            chunk_id += 1;
            // Planned again when the table's definition changed since the plan: a column
            // added or dropped meanwhile is read as the table now is, and a new key is seen
            // here (the loop also reads a chunk's rows again when the stream's definition
            // differs from the one they were read with). One query, not the plan's several,
            // for each chunk.
            if !fresh_plan
                && definition(&source.client, cfg, plan.relation.id).await? != plan.definition
            {
                plan = Arc::new(self::plan(&source.client, cfg, &state.table).await?);
            }
            fresh_plan = false;
            // A key changed since the copy began (a new replica identity index or primary
            // key): the values noted mean nothing under it, so the copy starts over from the
            // table's start (the loop drops them with this chunk, see `Chunk::advance`).
            let key = plan.key_id();
            if another_key(&copy_key, &key.0, &key.1) {
                tracing::info!(pipeline = %cfg.id, table = %table, from = ?copy_key.key_names, to = ?key.0,
                    "the key of a table changed during its copy; copying it again from its start");
                next_after = None;
                range_sent = false;
                kind = ChunkKind::After(None);
            }
            // Another table under the name (swapped in by renames): its rows before the
            // point reached were never read, so its copy starts from its start.
            if another_table(&copy_key, plan.relation.id) {
                tracing::info!(pipeline = %cfg.id, table = %table, from = ?copy_key.relation_id, to = plan.relation.id,
                    "another table was put in place of a table during its copy; copying it from its start");
                next_after = None;
                range_sent = false;
                kind = ChunkKind::After(None);
            }
            copy_key.key_names = Some(key.0.clone());
            copy_key.key_kinds = Some(key.1.clone());
            copy_key.relation_id = Some(plan.relation.id);
            emit(
                &source.client,
                cfg,
                &format!(
                    "open {token} {chunk_id} {} {}",
                    plan.relation.id,
                    serde_json::to_string(&plan.key_names()).unwrap_or_default()
                ),
            )
            .await?;
            wait_committed_visible(&source.client, cfg).await?;
            let mut read = read_chunk(&source.client, cfg, &plan, &kind, &mut seen).await?;
            if read.cut {
                source.reopen(cfg).await?;
            }
            // A column added, dropped or retyped after the plan was made: the rows were read
            // for the old columns. Planned and read again, in the same window (any snapshot
            // taken after its open watermark will do).
            let mut tries = 0;
            while read.definition != plan.definition {
                tries += 1;
                if tries > 3 {
                    return Err(Error::Stream(format!(
                        "the definition of {} kept changing while a chunk of it was read; reading it again",
                        state.table
                    )));
                }
                plan = Arc::new(self::plan(&source.client, cfg, &state.table).await?);
                // The open watermark named the old key, and the values to read after are
                // its: the next session starts the table over under the new one.
                if plan.key_id() != key || copy_key.relation_id != Some(plan.relation.id) {
                    return Err(Error::Stream(format!(
                        "the key of {}, or the table under its name, changed while a chunk of it was read; \
                         copying it again from its start",
                        state.table
                    )));
                }
                read = read_chunk(&source.client, cfg, &plan, &kind, &mut seen).await?;
                if read.cut {
                    source.reopen(cfg).await?;
                }
            }
            // Keys to read again whose rows did not fit in the chunk's bytes: the chunk
            // answers for those it read (the rows come in key order, so it stopped at some
            // key), and the others stay noted for the next chunks.
            if let ChunkKind::Reread(taken) = &mut kind {
                if !read.whole {
                    let got: HashSet<&[String]> =
                        read.rows.iter().map(|r| r.key_text.as_slice()).collect();
                    taken.retain(|k| got.contains(k.as_slice()));
                    if taken.is_empty() {
                        // The rows read back do not show the keys as noted (they come from
                        // the stream's text): reading them again would read the same rows.
                        return Err(Error::Snapshot(format!(
                            "the keys of {} to read again do not match the rows read back for them; \
                             re-sync the table (spec.snapshot.resync)",
                            state.table
                        )));
                    }
                }
            }
            let Read {
                visibility,
                rows,
                end,
                definition,
                ..
            } = read;
            let last_key = rows.last().map(|r| r.key_text.clone());
            if let ChunkKind::After(_) = kind {
                if last_key.is_some() {
                    next_after = last_key.clone();
                }
                range_sent |= end;
            }
            in_flight.push_back(matches!(kind, ChunkKind::Reread(_)));
            let chunk = Chunk {
                id: chunk_id,
                plan: plan.clone(),
                kind,
                visibility,
                rows,
                last_key,
                end,
                pass,
                definition,
            };
            if task
                .chunks
                .send(Message::Chunk(Box::new(chunk)))
                .await
                .is_err()
            {
                return Ok(());
            }
            emit_close(
                &source.client,
                cfg,
                &plan,
                &format!("close {token} {chunk_id}"),
            )
            .await?;
        }
        tracing::info!(pipeline = %cfg.id, table = %table, rows = state.rows_copied, "existing rows copied");
    }
    Ok(())
}

fn source_error(cfg: &PipelineConfig, e: &tokio_postgres::Error) -> Error {
    let message = format!(
        "snapshot read on the source database {} failed: {}",
        cfg.source,
        describe_pg_error(e)
    );
    match e.code().map(|c| c.code()) {
        Some("42501") => Error::Snapshot(format!(
            "{message}; grant the source user SELECT on the captured tables and EXECUTE on pg_logical_emit_message"
        )),
        // A column dropped between reading the table's definition and reading the chunk:
        // the next session reads both again.
        Some("42703") => Error::Stream(message),
        Some(c) if c.starts_with("42") => Error::Snapshot(message),
        _ => Error::Stream(message),
    }
}

/// Writes a watermark: a transactional logical message, whose commit returns once the WAL
/// before it is flushed.
async fn emit(client: &Client, cfg: &PipelineConfig, content: &str) -> Result<()> {
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&PREFIX, &content],
        )
        .await
        .map(drop)
        .map_err(|e| source_error(cfg, &e))
}

/// The fingerprint of table `relid`'s definition now ([`definition_sql`]).
async fn definition(client: &Client, cfg: &PipelineConfig, relid: u32) -> Result<String> {
    let rows = client
        .simple_query(&definition_sql(relid))
        .await
        .map_err(|e| source_error(cfg, &e))?;
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(String::from),
            _ => None,
        })
        .ok_or_else(|| Error::Stream("the source returned no definition for a table".into()))
}

/// Writes a chunk's close watermark carrying the table's definition at that point in the
/// WAL: with the table locked against ALTER TABLE (`ACCESS SHARE`, as a read takes), no
/// change of the definition commits between reading it and the watermark's commit.
async fn emit_close(
    client: &Client,
    cfg: &PipelineConfig,
    plan: &Plan,
    content: &str,
) -> Result<()> {
    let sql = format!(
        "BEGIN; LOCK TABLE {} IN ACCESS SHARE MODE; \
         SELECT pg_logical_emit_message(true, {}, {} || ' ' || ({})); COMMIT",
        plan.from,
        quote_literal(PREFIX),
        quote_literal(content),
        definition_sql(plan.relation.id)
    );
    let result = client.batch_execute(&sql).await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result.map_err(|e| source_error(cfg, &e))
}

/// Waits until the transactions the source has marked committed but not yet made visible
/// (waiting for a synchronous standby, or between the two steps) are visible.
async fn wait_committed_visible(client: &Client, cfg: &PipelineConfig) -> Result<()> {
    let mut left = in_progress(client, cfg, true).await?;
    let mut wait = Duration::from_millis(1);
    while !left.is_empty() {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(100));
        let running: HashSet<String> = in_progress(client, cfg, false).await?.into_iter().collect();
        left.retain(|x| running.contains(x));
    }
    Ok(())
}

/// Waits until the transactions running now have ended, saying so every minute (a
/// transaction left open, or a prepared one, holds it). By the horizon of the source's
/// snapshots, which a standby keeps too: every transaction id below the first one not yet
/// assigned now.
async fn wait_running_ended(client: &Client, cfg: &PipelineConfig, why: &str) -> Result<()> {
    let err = |e: tokio_postgres::Error| source_error(cfg, &e);
    let horizon: String = client
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .map_err(err)?
        .get(0);
    let started = std::time::Instant::now();
    let mut said = Duration::ZERO;
    let mut wait = Duration::from_millis(1);
    loop {
        let ended: bool = client
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8",
                &[&horizon],
            )
            .await
            .map_err(err)?
            .get(0);
        if ended {
            return Ok(());
        }
        if started.elapsed() >= said + Duration::from_secs(if said.is_zero() { 10 } else { 60 }) {
            said = started.elapsed();
            tracing::info!(pipeline = %cfg.id, waited_s = said.as_secs(),
                "{why}: waiting for the source's transactions that were running then to end (see pg_stat_activity.backend_xid, pg_prepared_xacts)");
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(100));
    }
}

/// The transactions a snapshot taken now sees as in progress (`committed`: only those the
/// commit log already marks committed).
async fn in_progress(
    client: &Client,
    cfg: &PipelineConfig,
    committed: bool,
) -> Result<Vec<String>> {
    let sql = if committed {
        "SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) x WHERE pg_xact_status(x) = 'committed'"
    } else {
        "SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) x"
    };
    Ok(client
        .query(sql, &[])
        .await
        .map_err(|e| source_error(cfg, &e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// What one read of a chunk got.
struct Read {
    visibility: Visibility,
    rows: Vec<Row>,
    /// A range chunk that reached the end of the table.
    end: bool,
    /// Every row the query would return was read: not cut short by `MAX_CHUNK_BYTES`.
    whole: bool,
    /// The table's definition the rows were read with ([`definition_sql`]).
    definition: String,
    /// The read stopped a `COPY` before its end: the connection is still receiving it, and
    /// is to be replaced before its next use.
    cut: bool,
}

/// Reads one chunk in a read-only repeatable-read transaction, with the snapshot it read in.
/// `seen`: what the table's last chunk read, to size the range's first read.
async fn read_chunk(
    client: &Client,
    cfg: &PipelineConfig,
    plan: &Plan,
    kind: &ChunkKind,
    seen: &mut Seen,
) -> Result<Read> {
    let limit = match kind {
        ChunkKind::After(_) => cfg.snapshot.chunk_size,
        ChunkKind::Reread(keys) => keys.len(),
    };
    let result = read_chunk_in_tx(client, cfg, plan, kind, limit, seen).await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// The rows and image bytes the table's last chunk read: their average size decides how
/// many rows a range read asks for at once.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    rows: usize,
    bytes: usize,
}

impl Seen {
    /// How many rows to ask for next: as many as fit in the bytes left at the average size
    /// seen (one when nothing was seen), at most twice as many as were seen (a table's rows
    /// may grow wider further on), at most `left`.
    fn ask(&self, here: Seen, left: usize) -> usize {
        let (rows, bytes) = if here.rows > 0 {
            (here.rows, here.bytes)
        } else {
            (self.rows, self.bytes)
        };
        if rows == 0 {
            return 1.min(left);
        }
        let average = bytes / rows + 1;
        let fit = (MAX_CHUNK_BYTES.saturating_sub(here.bytes) / average).max(1);
        fit.min(rows.max(self.rows) * 2).min(left)
    }
}

async fn read_chunk_in_tx(
    client: &Client,
    cfg: &PipelineConfig,
    plan: &Plan,
    kind: &ChunkKind,
    limit: usize,
    seen: &mut Seen,
) -> Result<Read> {
    let err = |e: tokio_postgres::Error| source_error(cfg, &e);
    // The lock before the snapshot (`LOCK` takes none): the definition the snapshot's
    // catalog shows is then the one the read uses.
    let mut sql = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; LOCK TABLE {} IN ACCESS SHARE MODE; \
         SELECT pg_current_snapshot()::text, ({}); ",
        plan.from,
        definition_sql(plan.relation.id)
    );
    if let ChunkKind::Reread(_) = kind {
        let _ = write!(
            sql,
            "DECLARE philotes_chunk NO SCROLL CURSOR FOR {}",
            plan.query(kind, limit)
        );
    }
    let opened = client.simple_query(&sql).await.map_err(err)?;
    let (visibility, definition) = opened
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r
                .get(0)
                .and_then(Visibility::parse)
                .zip(r.get(1).map(String::from)),
            _ => None,
        })
        .ok_or_else(|| Error::Stream("the source returned no snapshot for a chunk".into()))?;
    if let ChunkKind::After(after) = kind {
        let read = read_range(client, cfg, plan, after.clone(), limit, seen).await?;
        // A cut read's transaction ends with its connection: COMMIT would wait for the rest
        // of the COPY. It only read, so ending it either way loses nothing.
        if !read.cut {
            client.batch_execute("COMMIT").await.map_err(err)?;
        }
        return Ok(Read {
            visibility,
            end: read.exhausted,
            whole: read.exhausted || read.rows.len() == limit,
            rows: read.rows,
            definition,
            cut: read.cut,
        });
    }
    let mut rows = Vec::new();
    let mut bytes = 0usize;
    let mut exhausted = false;
    // One row first, then up to twice as many each time, as fit a quarter of the bytes left
    // at the size seen so far: a chunk of wide rows stays near MAX_CHUNK_BYTES (plus a row).
    let mut fetch = 1usize;
    while rows.len() < limit && bytes < MAX_CHUNK_BYTES {
        let want = fetch.min(limit - rows.len());
        let fetched = client
            .simple_query(&format!("FETCH {want} FROM philotes_chunk"))
            .await
            .map_err(err)?;
        let mut n = 0;
        // One vector of values for every row of the batch (they borrow from it).
        let mut values: Vec<Option<&str>> = Vec::new();
        for m in &fetched {
            if let SimpleQueryMessage::Row(r) = m {
                n += 1;
                values.clear();
                let mut bad = Vec::new();
                for i in 0..r.len() {
                    match r.try_get(i) {
                        Ok(v) => values.push(v),
                        Err(_) => {
                            bad.push(i);
                            values.push(None);
                        }
                    }
                }
                let row = if bad.is_empty() {
                    plan.row(&values)?
                } else {
                    plan.unstorable(&values, &bad)?
                };
                bytes += row.image.len();
                rows.push(row);
            }
        }
        if n < want {
            exhausted = true;
            break;
        }
        let average = bytes / rows.len().max(1) + 1;
        fetch = ((MAX_CHUNK_BYTES - bytes.min(MAX_CHUNK_BYTES)) / 4 / average)
            .min(fetch * 2)
            .clamp(1, FETCH_ROWS);
    }
    client.batch_execute("COMMIT").await.map_err(err)?;
    Ok(Read {
        visibility,
        end: false,
        whole: exhausted || rows.len() == limit,
        rows,
        definition,
        cut: false,
    })
}

/// What a range read got.
struct Range {
    rows: Vec<Row>,
    /// The table holds no row after the last one read.
    exhausted: bool,
    /// A `COPY` was left before its end (see [`Read::cut`]).
    cut: bool,
}

/// Reads up to `limit` rows after `after` in key order, inside the chunk's transaction, with
/// `COPY (SELECT …) TO STDOUT`: the source sends rows as a stream in the text format its
/// output functions write (the text a query returns), at less of its CPU than a cursor's
/// `FETCH` rounds. Each `COPY` asks for as many rows as [`Seen::ask`] expects to fit in
/// `MAX_CHUNK_BYTES`. One that brings more (the rows grew wider) is left at
/// `MAX_CHUNK_BYTES`: its connection is cancelled and replaced ([`Session::reopen`]; reading
/// the rest could mean gigabytes), and the chunk ends at the last row read: the next chunk
/// begins after it.
async fn read_range(
    client: &Client,
    cfg: &PipelineConfig,
    plan: &Plan,
    mut after: Option<Vec<String>>,
    limit: usize,
    seen: &mut Seen,
) -> Result<Range> {
    let err = |e: tokio_postgres::Error| source_error(cfg, &e);
    let mut rows: Vec<Row> = Vec::new();
    let mut here = Seen::default();
    let mut text = CopyText::default();
    let mut exhausted = false;
    let mut cut = false;
    while rows.len() < limit && here.bytes < MAX_CHUNK_BYTES {
        let want = seen.ask(here, limit - rows.len());
        let sql = format!(
            "COPY ({}) TO STDOUT",
            plan.query(&ChunkKind::After(after.take()), want)
        );
        let stream = client.copy_out(sql.as_str()).await.map_err(err)?;
        let mut stream = std::pin::pin!(stream);
        let mut n = 0;
        let mut ended = false;
        // Leaving the stream before its end (the bytes are full) loses nothing: the rows
        // not read are after the last one kept, and the next chunk reads them.
        while let Some(data) = stream.next().await {
            let data = data.map_err(err)?;
            text.rows(plan, &data, |row| {
                n += 1;
                here.rows += 1;
                here.bytes += row.image.len();
                rows.push(row);
                Ok(())
            })?;
            if here.bytes >= MAX_CHUNK_BYTES {
                // The last row asked for may be the one just read: then the stream only
                // has its end left.
                ended = n == want;
                break;
            }
        }
        if here.bytes >= MAX_CHUNK_BYTES {
            cut = !ended;
            break;
        }
        // The server ends every row with a newline, and a COPY with its last row.
        if !text.partial.is_empty() {
            return Err(Error::Stream(format!(
                "a chunk's COPY of {} ended in the middle of a row; reading it again",
                plan.table
            )));
        }
        if n < want {
            exhausted = true;
            break;
        }
        after = rows.last().map(|r| r.key_text.clone());
    }
    if here.rows > 0 {
        *seen = here;
    }
    // Cut: the rows grew wider than the chunk's average says; the next chunk goes by the
    // last row's width.
    if let (true, Some(last)) = (cut, rows.last()) {
        *seen = Seen {
            rows: 1,
            bytes: last.image.len(),
        };
    }
    if cut {
        tracing::info!(pipeline = %cfg.id, table = %plan.table, rows = here.rows,
            "the rows grew wider than their chunk's read expected; the read was cut and its connection is replaced");
    }
    Ok(Range {
        rows,
        exhausted,
        cut,
    })
}

/// Splits `COPY … TO STDOUT` text-format data into rows, and rows into values. The server
/// sends a row per message; a row split across messages is carried over all the same.
#[derive(Default)]
struct CopyText {
    partial: Vec<u8>,
    /// Where each value of the current row is (`None`: NULL).
    spans: Vec<Option<Span>>,
    /// The unescaped values of the current row that held escapes.
    scratch: Vec<u8>,
}

#[derive(Clone, Copy)]
enum Span {
    Line(usize, usize),
    Scratch(usize, usize),
}

impl CopyText {
    /// Calls `each` with every row `data` completes.
    fn rows(
        &mut self,
        plan: &Plan,
        data: &[u8],
        mut each: impl FnMut(Row) -> Result<()>,
    ) -> Result<()> {
        let mut rest = data;
        if !self.partial.is_empty() {
            let Some(end) = memchr::memchr(b'\n', rest) else {
                self.partial.extend_from_slice(rest);
                return Ok(());
            };
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&rest[..end]);
            each(self.row(plan, &line)?)?;
            rest = &rest[end + 1..];
        }
        while let Some(end) = memchr::memchr(b'\n', rest) {
            each(self.row(plan, &rest[..end])?)?;
            rest = &rest[end + 1..];
        }
        self.partial.extend_from_slice(rest);
        Ok(())
    }

    /// One line of the text format as a row: values separated by tabs, `\N` for NULL, and
    /// backslash escapes (`\t`, `\n`, `\\`, octal and hex bytes, ...) in values.
    fn row(&mut self, plan: &Plan, line: &[u8]) -> Result<Row> {
        self.spans.clear();
        self.scratch.clear();
        let mut start = 0;
        let mut escaped = false;
        // One pass: each tab ends a value, a backslash marks it as escaped.
        for at in memchr::memchr2_iter(b'\t', b'\\', line) {
            if line[at] == b'\\' {
                escaped = true;
                continue;
            }
            self.field(line, start, at, escaped);
            start = at + 1;
            escaped = false;
        }
        self.field(line, start, line.len(), escaped);
        // The line checked at once: its values split at tabs are then valid too.
        let whole = std::str::from_utf8(line).ok();
        let mut bad = Vec::new();
        let mut values: Vec<Option<&str>> = Vec::with_capacity(self.spans.len());
        for (i, span) in self.spans.iter().enumerate() {
            let text = match *span {
                None => {
                    values.push(None);
                    continue;
                }
                Some(Span::Line(a, b)) => match whole {
                    Some(w) => w.get(a..b),
                    None => std::str::from_utf8(&line[a..b]).ok(),
                },
                Some(Span::Scratch(a, b)) => std::str::from_utf8(&self.scratch[a..b]).ok(),
            };
            if text.is_none() {
                bad.push(i);
            }
            values.push(text);
        }
        if values.len() != plan.relation.columns.len() {
            return Err(Error::Stream(format!(
                "a row of {} read back {} values for {} columns; reading the chunk again",
                plan.table,
                values.len(),
                plan.relation.columns.len()
            )));
        }
        if bad.is_empty() {
            plan.row(&values)
        } else {
            plan.unstorable(&values, &bad)
        }
    }

    /// Notes the value at `line[start..end]`.
    fn field(&mut self, line: &[u8], start: usize, end: usize, escaped: bool) {
        let raw = &line[start..end];
        self.spans.push(if raw == b"\\N" {
            None
        } else if escaped {
            let from = self.scratch.len();
            unescape(raw, &mut self.scratch);
            Some(Span::Scratch(from, self.scratch.len()))
        } else {
            Some(Span::Line(start, end))
        });
    }
}

/// Appends `raw` with the text format's backslash escapes undone (PostgreSQL's
/// `CopyReadAttributesText`): `\b \f \n \r \t \v`, one to three octal digits, `\x` and one
/// or two hex digits, and a backslash before any other byte stands for that byte.
fn unescape(raw: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        i += 1;
        if b != b'\\' || i == raw.len() {
            out.push(b);
            continue;
        }
        let c = raw[i];
        i += 1;
        match c {
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            b'x' if raw.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u32;
                for _ in 0..2 {
                    match raw.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                        }
                        None => break,
                    }
                }
                out.push(v as u8);
            }
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            other => out.push(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel() -> Arc<Relation> {
        Arc::new(Relation {
            id: 7,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: 'd',
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: oid::INT4,
                    type_modifier: -1,
                    key: true,
                },
                Column {
                    name: "v".into(),
                    type_oid: 25,
                    type_modifier: -1,
                    key: false,
                },
            ],
        })
    }

    fn plan() -> Arc<Plan> {
        Arc::new(Plan {
            table: TableName::parse("t").unwrap(),
            relation: rel(),
            key: vec![0],
            from: "ONLY public.t".into(),
            row_filter: None,
            estimate: None,
            prefixes: Plan::prefixes(&rel()),
            definition: "d".into(),
            key_kinds: vec!["23/0".into()],
        })
    }

    #[test]
    fn the_copy_text_format_is_read_back_as_the_values_a_query_returns() {
        // A value with every escape COPY writes (PostgreSQL's CopyAttributeOutText), one
        // with escapes it only reads, a NULL, and a row split across two messages.
        let mut text = CopyText::default();
        let mut rows = Vec::new();
        let data: &[u8] = b"1\ta\\tb\\nc\\\\d\\re\\bf\\fg\\vh\n2\t\\N\n3\t\\101\\x42\\7\\q";
        text.rows(&plan(), data, |r| {
            rows.push(r);
            Ok(())
        })
        .unwrap();
        assert_eq!(rows.len(), 2);
        text.rows(&plan(), b"C\n4\t\n", |r| {
            rows.push(r);
            Ok(())
        })
        .unwrap();
        let images: Vec<&str> = rows.iter().map(|r| r.image.as_str()).collect();
        assert_eq!(
            images,
            [
                r#"{"id":1,"v":"a\tb\nc\\d\re\u0008f\u000cg\u000bh"}"#,
                r#"{"id":2,"v":null}"#,
                r#"{"id":3,"v":"AB\u0007qC"}"#,
                r#"{"id":4,"v":""}"#,
            ]
        );
        assert_eq!(rows[3].key_text, ["4"]);
    }

    #[test]
    fn a_copied_value_that_is_not_utf8_is_kept_as_its_key_and_a_wrong_width_is_refused() {
        let mut text = CopyText::default();
        let mut rows = Vec::new();
        text.rows(&plan(), b"5\t\\377x\n", |r| {
            rows.push(r);
            Ok(())
        })
        .unwrap();
        assert_eq!(rows[0].key, "[5]");
        assert!(rows[0].image.is_empty());
        assert!(rows[0]
            .unstorable
            .as_deref()
            .unwrap_or("")
            .contains("column v"));
        let wrong = text.rows(&plan(), b"6\n", |_| Ok(()));
        assert!(matches!(wrong, Err(Error::Stream(m)) if m.contains("1 values for 2 columns")));
    }

    #[test]
    fn keys_to_read_again_are_noted_once_in_order_and_can_be_noted_again_once_read() {
        let k = |v: &str| vec![v.to_string()];
        let mut keys = Keys::default();
        for v in ["3", "1", "3", "2", "1"] {
            keys.push(k(v));
        }
        assert_eq!(keys, vec![k("3"), k("1"), k("2")]);
        keys.retain(|key| key != &k("1"));
        assert!(!keys.contains(&k("1")) && keys.contains(&k("3")));
        keys.push(k("1"));
        assert_eq!(keys, vec![k("3"), k("2"), k("1")]);
        assert_eq!(Keys::from(vec![k("5"), k("5")]).len(), 1);
    }

    #[test]
    fn a_range_read_asks_for_what_fits_in_a_chunk_s_bytes() {
        let nothing = Seen::default();
        // Nothing seen yet: one row, then twice the rows read, up to what fits.
        assert_eq!(nothing.ask(nothing, 10_000), 1);
        let one = Seen {
            rows: 1,
            bytes: 100,
        };
        assert_eq!(nothing.ask(one, 9_999), 2);
        // Narrow rows seen in earlier chunks: the whole chunk at once.
        let narrow = Seen {
            rows: 10_000,
            bytes: 1_000_000,
        };
        assert_eq!(narrow.ask(nothing, 10_000), 10_000);
        // Rows of 1 MB: eight fit.
        let wide = Seen {
            rows: 8,
            bytes: 8 << 20,
        };
        assert_eq!(wide.ask(nothing, 10_000), 7);
        assert_eq!(
            wide.ask(
                Seen {
                    rows: 4,
                    bytes: 4 << 20
                },
                9_996
            ),
            3
        );
    }

    fn state() -> TableState {
        TableState {
            table: TableName::parse("t").unwrap(),
            request: "initial".into(),
            phase: Phase::Pending,
            last_key: None,
            reread: Keys::default(),
            key_names: None,
            key_kinds: None,
            relation_id: None,
            rows_copied: 0,
            range_done: false,
            started_lsn: None,
            done_lsn: None,
            pass: 0,
        }
    }

    fn chunk(ids: &[i32], snapshot: &str) -> Chunk {
        let p = plan();
        let rows = ids
            .iter()
            .map(|i| p.row(&[Some(&i.to_string()), Some("old")]).unwrap())
            .collect();
        Chunk {
            id: 1,
            plan: p,
            kind: ChunkKind::After(None),
            visibility: Visibility::parse(snapshot).unwrap(),
            last_key: ids.last().map(|i| vec![i.to_string()]),
            rows,
            end: true,
            pass: 0,
            definition: "d".into(),
        }
    }

    fn change(op: Operation, before: Option<&str>, after: Option<&str>) -> Change {
        Change {
            relation: rel(),
            operation: op,
            before: before.map(String::from),
            after: after.map(String::from),
        }
    }

    fn kept(closed: Closed) -> (Vec<String>, Vec<Vec<String>>) {
        assert_eq!(closed.why, None);
        (
            closed.rows.into_iter().map(|r| r.key).collect(),
            closed.reread,
        )
    }

    #[test]
    fn visibility_follows_the_snapshot() {
        let v = Visibility::parse("100:105:101,103").unwrap();
        assert!(v.sees(99) && v.sees(100) && v.sees(102) && v.sees(104));
        assert!(!v.sees(101) && !v.sees(103) && !v.sees(105) && !v.sees(200));
        // The stream's 32-bit ids against a snapshot in a later epoch.
        let v = Visibility::parse("4294967396:4294967400:").unwrap();
        assert!(v.sees(99) && !v.sees(104));
        assert!(v.sees(u32::MAX - 5));
    }

    #[test]
    fn earlier_transactions_a_chunk_does_not_see_are_found_then_forgotten() {
        let mut e = Earlier::default();
        // Table 7: transaction 101 committed at 1000, 106 at 3000; table 8: 103 at 1500.
        e.note(101, 7, 1000);
        e.note(101, 7, 1000);
        e.note(103, 8, 1500);
        e.note(106, 7, 3000);
        assert_eq!(e.len(), 3);
        // A chunk of table 7 whose window began at 2000, read in a snapshot that does not
        // see 101 (in progress) nor 106 (at or past xmax).
        let read = Visibility::parse("100:105:101,103").unwrap();
        assert_eq!(e.unseen_before(&read, 7, 2000), Some(101));
        // 106 committed inside the window: the window decides it, key by key.
        assert_eq!(e.unseen_before(&read, 7, 1000), None);
        // Table 8's transaction is not table 7's.
        e.seen_by(&Visibility::parse("102:105:103").unwrap());
        assert_eq!(e.unseen_before(&read, 7, 2000), None);
        assert_eq!(e.unseen_before(&read, 8, 2000), Some(103));
        // Forgotten once a snapshot sees them: 101 is seen, 103 and 106 are not yet.
        assert_eq!(e.len(), 2);
        // Nor noted again: every chunk still to close sees 101.
        e.note(101, 9, 4000);
        assert_eq!(e.len(), 2);
        e.seen_by(&Visibility::parse("107:107:").unwrap());
        assert!(e.is_empty());
    }

    #[test]
    fn earlier_transactions_past_the_limit_are_refused() {
        let mut e = Earlier::default();
        for xid in 0..MAX_EARLIER as u32 {
            assert!(e.note(1000 + xid, 7, u64::from(xid)));
        }
        assert!(!e.note(5_000_000, 7, 1), "one more");
        // One noted already still is.
        assert!(e.note(1000, 7, 0));
        assert_eq!(e.len(), MAX_EARLIER);
    }

    #[test]
    fn rows_changed_by_transactions_the_chunk_does_not_see_are_dropped() {
        // Transactions 1-9 are visible, 10 and up are not.
        let mut c = chunk(&[1, 2, 3, 4, 5], "10:10:");
        let mut w = Window::open(1, 7, vec!["id".into()]);
        // Seen by the chunk: the row read is at least as new.
        w.record(
            5,
            &change(Operation::Update, None, Some(r#"{"id":1,"v":"a"}"#)),
        );
        // Not seen: the stream's image is newer.
        w.record(
            11,
            &change(Operation::Update, None, Some(r#"{"id":2,"v":"b"}"#)),
        );
        w.record(12, &change(Operation::Delete, Some(r#"{"id":3}"#), None));
        // A key moved: both the old and the new key are newer in the stream.
        w.record(
            13,
            &change(
                Operation::Update,
                Some(r#"{"id":4}"#),
                Some(r#"{"id":40,"v":"x"}"#),
            ),
        );
        let (rows, reread) = kept(w.close(&mut c));
        assert_eq!(rows, vec!["[1]", "[5]"]);
        assert!(reread.is_empty(), "{reread:?}");
    }

    #[test]
    fn an_incomplete_newer_image_is_read_again_unless_the_row_can_be_built() {
        // An UPDATE that left the TOASTed column v out: the row is built from the chunk's.
        let mut c = chunk(&[1, 2], "10:10:");
        let mut w = Window::open(1, 7, vec!["id".into()]);
        w.record(11, &change(Operation::Update, None, Some(r#"{"id":2}"#)));
        let (rows, reread) = kept(w.close(&mut c));
        assert_eq!(rows, vec!["[1]", "[2]"]);
        assert!(reread.is_empty(), "{reread:?}");
        // Its image not kept (the window's images are full): read again.
        let mut c = chunk(&[1, 2], "10:10:");
        let mut w = Window::open(1, 7, vec!["id".into()]);
        w.image_bytes = MAX_CHUNK_BYTES;
        w.record(11, &change(Operation::Update, None, Some(r#"{"id":2}"#)));
        let (rows, reread) = kept(w.close(&mut c));
        assert_eq!(rows, vec!["[1]"]);
        assert_eq!(reread, vec![vec!["2".to_string()]]);
    }

    #[test]
    fn a_row_moved_to_a_key_outside_the_chunk_without_a_whole_image_is_read_again() {
        let mut c = chunk(&[5, 6], "10:10:");
        let mut w = Window::open(1, 7, vec!["id".into()]);
        // Seen by the chunk (3) and not seen (11), each leaving v out: neither new key is
        // in the chunk, so neither has a whole image anywhere.
        w.record(
            3,
            &change(
                Operation::Update,
                Some(r#"{"id":90}"#),
                Some(r#"{"id":-1}"#),
            ),
        );
        w.record(
            11,
            &change(
                Operation::Update,
                Some(r#"{"id":91}"#),
                Some(r#"{"id":-2}"#),
            ),
        );
        // With a whole image, or moved away again: nothing to read.
        w.record(
            3,
            &change(
                Operation::Update,
                Some(r#"{"id":92}"#),
                Some(r#"{"id":-3,"v":"x"}"#),
            ),
        );
        w.record(
            4,
            &change(
                Operation::Update,
                Some(r#"{"id":93}"#),
                Some(r#"{"id":-4}"#),
            ),
        );
        w.record(5, &change(Operation::Delete, Some(r#"{"id":-4}"#), None));
        let (rows, mut reread) = kept(w.close(&mut c));
        assert_eq!(rows, vec!["[5]", "[6]"]);
        reread.sort();
        assert_eq!(reread, vec![vec!["-1".to_string()], vec!["-2".to_string()]]);
    }

    #[test]
    fn a_whole_image_before_the_key_is_deleted_does_not_cover_a_row_moved_in_after() {
        let mut c = chunk(&[4, 5, 6], "10:10:");
        let mut w = Window::open(1, 7, vec!["id".into()]);
        // One transaction the chunk does not see: row 5 updated whole, moved away to -5,
        // then row 50 (ahead of the copy) moved in to 5, leaving v out.
        w.record(
            11,
            &change(Operation::Update, None, Some(r#"{"id":5,"v":"y"}"#)),
        );
        w.record(
            11,
            &change(Operation::Update, Some(r#"{"id":5}"#), Some(r#"{"id":-5}"#)),
        );
        w.record(
            11,
            &change(Operation::Update, Some(r#"{"id":50}"#), Some(r#"{"id":5}"#)),
        );
        let (rows, mut reread) = kept(w.close(&mut c));
        assert_eq!(rows, vec!["[4]", "[6]"]);
        reread.sort();
        // 5 has no whole image since row 50 moved in. (-5 is read again too: a key moved in
        // without a whole image is, though the consumer holds it whole from row 5's.)
        assert_eq!(reread, vec![vec!["-5".to_string()], vec!["5".to_string()]]);
    }

    #[test]
    fn a_change_whose_key_is_unknown_still_reads_rows_moved_in_again() {
        let mut c = chunk(&[5, 6], "10:10:");
        let mut w = Window::open(1, 7, vec!["id".into()]);
        w.record(
            3,
            &change(
                Operation::Update,
                Some(r#"{"id":90}"#),
                Some(r#"{"id":-1}"#),
            ),
        );
        // An UPDATE whose image does not show the key (a TOASTed key column left out).
        w.record(11, &change(Operation::Update, None, Some(r#"{"v":"x"}"#)));
        let closed = w.close(&mut c);
        assert!(closed.why.is_some());
        assert!(closed.rows.is_empty(), "{:?}", closed.rows);
        let mut reread = closed.reread;
        reread.sort();
        assert_eq!(
            reread,
            vec![
                vec!["-1".to_string()],
                vec!["5".to_string()],
                vec!["6".to_string()]
            ]
        );
    }

    #[test]
    fn a_window_past_its_limit_keeps_no_more_changes_and_reads_the_chunk_again() {
        let mut c = chunk(&[1, 2, 3], "10:10:");
        let mut w = Window::open(1, 7, vec!["id".into()]);
        w.limit = 4;
        // Seen by the chunk, but more than the window keeps: which rows are newer in the
        // stream is no longer known.
        for id in 100..110 {
            w.record(
                5,
                &change(
                    Operation::Update,
                    None,
                    Some(&format!(r#"{{"id":{id},"v":"x"}}"#)),
                ),
            );
        }
        // Still kept past the limit: a row moved in without a whole image.
        w.record(
            11,
            &change(
                Operation::Update,
                Some(r#"{"id":90}"#),
                Some(r#"{"id":-1}"#),
            ),
        );
        assert_eq!(w.touches.len(), 5);
        let closed = w.close(&mut c);
        assert!(closed.why.is_some());
        assert!(closed.rows.is_empty(), "{:?}", closed.rows);
        let mut reread = closed.reread;
        reread.sort();
        let want: Vec<Vec<String>> = ["-1", "1", "2", "3"]
            .iter()
            .map(|k| vec![k.to_string()])
            .collect();
        assert_eq!(reread, want);
    }

    #[test]
    fn past_its_limit_a_window_reads_every_key_moved_in_without_a_whole_image_again() {
        let mut c = chunk(&[1, 2, 3], "10:10:");
        let mut w = Window::open(1, 7, vec!["id".into()]);
        w.limit = 2;
        // Key 500 inserted whole, then more changes than the window keeps, then 500
        // deleted (not kept) and row 90 moved in to it leaving v out (kept).
        w.record(
            11,
            &change(Operation::Insert, None, Some(r#"{"id":500,"v":"a"}"#)),
        );
        for id in 100..110 {
            w.record(
                11,
                &change(
                    Operation::Update,
                    None,
                    Some(&format!(r#"{{"id":{id},"v":"x"}}"#)),
                ),
            );
        }
        w.record(11, &change(Operation::Delete, Some(r#"{"id":500}"#), None));
        w.record(
            11,
            &change(
                Operation::Update,
                Some(r#"{"id":90}"#),
                Some(r#"{"id":500}"#),
            ),
        );
        let closed = w.close(&mut c);
        assert!(closed.why.is_some());
        assert!(
            closed.reread.contains(&vec!["500".to_string()]),
            "{:?}",
            closed.reread
        );
    }

    #[test]
    fn a_row_updated_unseen_leaving_a_toasted_column_out_is_built_from_the_chunk_s_row() {
        // id, n, doc: doc is the TOASTed column the UPDATEs leave out.
        let rel = Arc::new(Relation {
            columns: vec![
                rel().columns[0].clone(),
                Column {
                    name: "n".into(),
                    type_oid: oid::INT4,
                    type_modifier: -1,
                    key: false,
                },
                Column {
                    name: "doc".into(),
                    type_oid: 25,
                    type_modifier: -1,
                    key: false,
                },
            ],
            ..(*rel()).clone()
        });
        let plan = Arc::new(Plan {
            relation: rel.clone(),
            prefixes: Plan::prefixes(&rel),
            ..(*plan()).clone()
        });
        let update = |after: &str| Change {
            relation: rel.clone(),
            operation: Operation::Update,
            before: None,
            after: Some(after.to_string()),
        };
        let close = |changes: &[(u32, Change)]| {
            let mut c = Chunk {
                plan: plan.clone(),
                rows: [5, 6]
                    .iter()
                    .map(|i| {
                        plan.row(&[Some(&i.to_string()), Some("1"), Some("big")])
                            .unwrap()
                    })
                    .collect(),
                ..chunk(&[5, 6], "100:100:")
            };
            let mut w = Window::open(1, 7, vec!["id".into()]);
            for (xid, change) in changes {
                w.record(*xid, change);
            }
            let closed = w.close(&mut c);
            assert_eq!(closed.why, None);
            let rows: Vec<String> = closed.rows.into_iter().map(|r| r.image).collect();
            (rows, closed.reread)
        };
        // Seen (99), then two unseen: the row at the close, doc from the chunk's row.
        let (rows, reread) = close(&[
            (99, update(r#"{"id":5,"n":1}"#)),
            (101, update(r#"{"id":5,"n":2}"#)),
            (102, update(r#"{"id":5,"n":3}"#)),
        ]);
        assert!(reread.is_empty(), "{reread:?}");
        assert_eq!(
            rows,
            [
                r#"{"id":5,"n":3,"doc":"big"}"#,
                r#"{"id":6,"n":1,"doc":"big"}"#
            ]
        );
        // Unseen, then deleted: dropped (the DELETE is in the log), not built.
        let delete = Change {
            operation: Operation::Delete,
            before: Some(r#"{"id":5}"#.into()),
            after: None,
            ..update("{}")
        };
        let (rows, reread) = close(&[(101, update(r#"{"id":5,"n":2}"#)), (102, delete)]);
        assert!(reread.is_empty());
        assert_eq!(rows, [r#"{"id":6,"n":1,"doc":"big"}"#]);
        // An unseen UPDATE before a seen one cannot be laid over the row: read again.
        let (rows, reread) = close(&[
            (101, update(r#"{"id":5,"n":2}"#)),
            (99, update(r#"{"id":5,"n":1}"#)),
        ]);
        assert_eq!(reread, [vec!["5".to_string()]]);
        assert_eq!(rows, [r#"{"id":6,"n":1,"doc":"big"}"#]);
        // An image naming a column the chunk's row does not have: read again.
        let (_, reread) = close(&[(101, update(r#"{"id":5,"m":2}"#))]);
        assert_eq!(reread, [vec!["5".to_string()]]);
    }

    #[test]
    fn a_move_is_read_again_only_without_a_whole_image() {
        let names = vec!["id".to_string()];
        let moved = |before: Option<&str>, after: &str| {
            moved_without_whole_image(&change(Operation::Update, before, Some(after)), &names)
        };
        assert_eq!(
            moved(Some(r#"{"id":90}"#), r#"{"id":-1}"#),
            Some(vec!["-1".to_string()])
        );
        // A whole image, no old key (the key did not change), or the same key.
        assert_eq!(moved(Some(r#"{"id":90}"#), r#"{"id":-1,"v":"x"}"#), None);
        assert_eq!(moved(None, r#"{"id":-1}"#), None);
        assert_eq!(moved(Some(r#"{"id":-1}"#), r#"{"id":-1}"#), None);
        assert_eq!(
            moved_without_whole_image(
                &change(Operation::Delete, Some(r#"{"id":1}"#), None),
                &names
            ),
            None
        );
    }

    #[test]
    fn a_truncate_the_chunk_does_not_see_drops_it_and_unknown_keys_reread_it() {
        let mut c = chunk(&[1, 2], "10:10:");
        let mut w = Window::open(1, 7, vec!["id".into()]);
        w.record(11, &change(Operation::Truncate, None, None));
        let (rows, _) = kept(w.close(&mut c));
        assert!(rows.is_empty());
        // A change whose image does not show the key: every row is read again by key.
        let mut c = chunk(&[1, 2], "10:10:");
        let mut w = Window::open(1, 7, vec!["id".into()]);
        w.record(
            11,
            &change(Operation::Update, None, Some(r#"{"v":"no key"}"#)),
        );
        let closed = w.close(&mut c);
        assert!(closed.rows.is_empty() && closed.why.is_some());
        assert_eq!(
            closed.reread,
            vec![vec!["1".to_string()], vec!["2".to_string()]]
        );
    }

    #[test]
    fn a_chunk_advances_the_table_and_the_last_one_completes_it() {
        let c = chunk(&[1, 2], "10:10:");
        let mut before = state();
        before.reread = vec![vec!["9".to_string()]].into();
        let next = c.advance(&before, 2, vec![vec!["2".to_string()]], 70, 77);
        assert_eq!(next.last_key, Some(vec!["2".to_string()]));
        assert!(next.range_done && next.phase == Phase::Copying);
        assert_eq!(
            next.reread,
            vec![vec!["9".to_string()], vec!["2".to_string()]]
        );
        let reread = Chunk {
            kind: ChunkKind::Reread(next.reread.as_slice().to_vec()),
            ..chunk(&[2], "10:10:")
        };
        let done = reread.advance(&next, 1, vec![], 90, 99);
        assert_eq!(
            (done.phase, done.done_lsn, done.rows_copied),
            (Phase::Done, Some(99), 3)
        );
    }

    #[test]
    fn a_range_started_over_is_not_moved_by_chunks_read_before() {
        let mut before = state();
        before.last_key = Some(vec!["500".to_string()]);
        before.reread = (0..20)
            .map(|k| vec![k.to_string()])
            .collect::<Vec<_>>()
            .into();
        // Ten times a chunk of 1 row, but at least 10,000.
        assert_eq!(TableState::max_reread(1), 10_000);
        assert_eq!(TableState::max_reread(5_000), 50_000);
        before.restart_range();
        assert_eq!(before.pass, 1);
        assert!(before.last_key.is_none() && before.reread.is_empty() && !before.range_done);
        // A chunk of the range read before: its rows count, its position does not.
        let old = Chunk {
            end: true,
            ..chunk(&[501, 502], "10:10:")
        };
        let next = old.advance(&before, 2, vec![], 70, 77);
        assert_eq!((next.last_key.clone(), next.range_done), (None, false));
        assert_eq!((next.phase, next.rows_copied), (Phase::Copying, 2));
        // One read after: both.
        let new = Chunk {
            pass: 1,
            end: true,
            ..chunk(&[1, 2], "10:10:")
        };
        let done = new.advance(&next, 2, vec![], 80, 88);
        assert_eq!(done.last_key, Some(vec!["2".to_string()]));
        assert_eq!((done.phase, done.done_lsn), (Phase::Done, Some(88)));
    }

    #[test]
    fn a_chunk_under_a_new_key_drops_what_was_noted_under_the_old_one() {
        let mut before = state();
        before.key_names = Some(vec!["other".to_string()]);
        before.last_key = Some(vec!["900".to_string()]);
        before.reread = vec![vec!["5".to_string()]].into();
        before.range_done = true;
        before.rows_copied = 900;
        let c = Chunk {
            end: false,
            ..chunk(&[1, 2], "10:10:")
        };
        let next = c.advance(&before, 2, vec![], 70, 77);
        assert_eq!(next.key_names, Some(vec!["id".to_string()]));
        assert_eq!(next.last_key, Some(vec!["2".to_string()]));
        assert!(next.reread.is_empty() && !next.range_done);
        assert_eq!((next.phase, next.rows_copied), (Phase::Copying, 902));
        // Under the same key, nothing is dropped.
        let again = c.advance(&next, 2, vec![vec!["1".to_string()]], 80, 88);
        assert_eq!(again.reread, vec![vec!["1".to_string()]]);
    }

    #[test]
    fn keys_compare_as_written_and_read_back_as_text() {
        let names = vec!["a".to_string(), "b".to_string()];
        let (key, text) = image_key(
            r#"{"a":"x\"y","b":1.50,"c":true}"#,
            &names,
            &[25, oid::NUMERIC],
        )
        .unwrap();
        assert_eq!(key, r#"["x\"y",1.50]"#);
        assert_eq!(text, vec!["x\"y".to_string(), "1.50".to_string()]);
        let p = plan();
        let row = p.row(&[Some("7"), None]).unwrap();
        assert_eq!(row.image, r#"{"id":7,"v":null}"#);
        assert_eq!(row.key, "[7]");
    }

    #[test]
    fn chunk_queries_resume_after_the_last_key_and_reread_keys() {
        let p = plan();
        assert_eq!(
            p.query(&ChunkKind::After(Some(vec!["4".into()])), 10),
            r#"SELECT "id", "v" FROM ONLY public.t WHERE ("id") > ('4') ORDER BY "id" LIMIT 10"#
        );
        assert_eq!(
            p.query(&ChunkKind::Reread(vec![vec!["o'k".into()]]), 1),
            r#"SELECT "id", "v" FROM ONLY public.t WHERE ("id") IN (('o''k')) ORDER BY "id" LIMIT 1"#
        );
    }

    #[test]
    fn watermarks_round_trip() {
        assert_eq!(
            Watermark::parse(br#"open tok 3 16384 ["id","b c"]"#),
            Some(Watermark::Open {
                token: "tok".into(),
                chunk: 3,
                relation_id: 16384,
                key_names: vec!["id".into(), "b c".into()]
            })
        );
        assert_eq!(
            Watermark::parse(b"close tok 3 0123abcd"),
            Some(Watermark::Close {
                token: "tok".into(),
                chunk: 3,
                definition: "0123abcd".into(),
            })
        );
        assert_eq!(Watermark::parse(b"other"), None);
    }
}
