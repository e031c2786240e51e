//! `philotes verify`: rebuilds each captured table from `cdc_events` (replayed in
//! `(commit_lsn, seq)` order, unchanged TOAST values carried from earlier images) and compares
//! it row by row and column by column with the source table.
//!
//! Meaningful when the source is quiet and the pipeline caught up (for example after
//! `philotes run --until-caught-up`), and when each table was either captured from its
//! creation or copied by a snapshot (README: Snapshots). For a table whose snapshot is done,
//! the consumer contract's rules apply: a SNAPSHOT event, or an UPDATE of a row not seen yet,
//! is an upsert of its image; a DELETE of a row not seen yet does nothing.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::pipeline::config::{quote_ident, PipelineConfig, TableName};
use crate::pipeline::conn::describe_pg_error;
use crate::pipeline::error::{Error, Result};
use crate::pipeline::lsn;

type Row = Map<String, Value>;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableReport {
    pub table: String,
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub truncates: u64,
    pub snapshots: u64,
    pub source_rows: usize,
    pub replayed_rows: usize,
    /// Rows on the source that the replay does not have (lost events).
    pub missing: Vec<String>,
    /// Rows the replay has that the source does not (duplicated or phantom events).
    pub extra: Vec<String>,
    /// Rows whose column values differ.
    pub different: Vec<String>,
    /// Events that make no sense in order: an insert of an existing key, an update or delete
    /// of a missing one.
    pub out_of_order: Vec<String>,
}

impl TableReport {
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.extra.is_empty()
            && self.different.is_empty()
            && self.out_of_order.is_empty()
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub tables: Vec<TableReport>,
    /// The pipeline's checkpoint is behind the source's WAL position: the comparison may show
    /// differences that are only not yet captured.
    pub behind: Option<(String, String)>,
    /// Gaps acknowledged with `philotes recover` (`cdc_gaps`): `(from, to, reason)`. Changes
    /// committed in them are not in the buffer, so the comparison shows them as missing or
    /// different.
    pub gaps: Vec<(String, String, String)>,
    /// Changes set aside in `cdc_dead_letters` (`poisonEvents: DeadLetter`), per table.
    pub dead_letters: Vec<(String, i64)>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.tables.iter().all(TableReport::ok)
    }
    pub fn events(&self) -> u64 {
        self.tables
            .iter()
            .map(|t| t.inserts + t.updates + t.deletes + t.truncates + t.snapshots)
            .sum()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((ckpt, current)) = &self.behind {
            writeln!(
                f,
                "warning: the checkpoint ({ckpt}) is behind the source ({current}); run `philotes run --until-caught-up` first"
            )?;
        }
        for (from, to, reason) in &self.gaps {
            writeln!(
                f,
                "note: an acknowledged gap ({reason}): changes committed between {from} and {to} are not in the buffer (cdc_gaps)"
            )?;
        }
        for (table, n) in &self.dead_letters {
            writeln!(
                f,
                "note: {n} changes of {table} were set aside in cdc_dead_letters, not replayed"
            )?;
        }
        for t in &self.tables {
            let verdict = if t.ok() { "ok" } else { "MISMATCH" };
            writeln!(
                f,
                "{}: {verdict}: {} snapshot rows, {} inserts, {} updates, {} deletes, {} truncates replayed into {} rows; source has {} rows",
                t.table, t.snapshots, t.inserts, t.updates, t.deletes, t.truncates, t.replayed_rows, t.source_rows
            )?;
            for (what, keys) in [
                ("missing (lost)", &t.missing),
                ("extra (duplicated)", &t.extra),
                ("different", &t.different),
                ("out of order", &t.out_of_order),
            ] {
                if !keys.is_empty() {
                    let shown: Vec<&str> = keys.iter().take(10).map(String::as_str).collect();
                    writeln!(
                        f,
                        "  {} rows {what}: {}{}",
                        keys.len(),
                        shown.join(", "),
                        if keys.len() > 10 { ", …" } else { "" }
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn key_of(image: &Value, key_columns: &[String]) -> Option<String> {
    let obj = image.as_object()?;
    let values: Vec<&Value> = key_columns
        .iter()
        .map(|k| obj.get(k).unwrap_or(&Value::Null))
        .collect();
    serde_json::to_string(&values).ok()
}

/// Verifies every table of the pipeline.
pub async fn verify(cfg: &PipelineConfig) -> Result<Report> {
    let source = cfg.source.connect("source").await?;
    let buffer = cfg.buffer.connect("buffer").await?;
    let q = |e: tokio_postgres::Error| Error::Buffer(describe_pg_error(&e));
    let mut report = Report::default();
    let schema = quote_ident(&cfg.buffer_schema);
    let ckpt: Option<String> = buffer
        .query_opt(
            &format!("SELECT lsn::text FROM {schema}.cdc_checkpoints WHERE pipeline = $1"),
            &[&cfg.id],
        )
        .await
        .map_err(q)?
        .map(|r| r.get(0));
    let current: String = source
        .query_one(
            &format!("SELECT {}::text", crate::pipeline::source::CURRENT_WAL_LSN),
            &[],
        )
        .await
        .map_err(|e| Error::Stream(describe_pg_error(&e)))?
        .get(0);
    let ckpt = ckpt.unwrap_or_else(|| "0/0".into());
    if lsn::parse(&ckpt).unwrap_or(0) < lsn::parse(&current).unwrap_or(0) {
        report.behind = Some((ckpt, current));
    }
    report.gaps = buffer
        .query(
            &format!(
                "SELECT from_lsn::text, to_lsn::text, reason FROM {schema}.cdc_gaps WHERE pipeline = $1 ORDER BY cdc_gaps.from_lsn"
            ),
            &[&cfg.id],
        )
        .await
        .map_err(q)?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    report.dead_letters = buffer
        .query(
            &format!(
                "SELECT schema_name || '.' || table_name, count(*) FROM {schema}.cdc_dead_letters \
                 WHERE pipeline = $1 GROUP BY 1 ORDER BY 1"
            ),
            &[&cfg.id],
        )
        .await
        .map_err(q)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for table in &cfg.tables {
        report
            .tables
            .push(verify_table(&source, &buffer, cfg, table).await?);
    }
    Ok(report)
}

async fn verify_table(
    source: &tokio_postgres::Client,
    buffer: &tokio_postgres::Client,
    cfg: &PipelineConfig,
    table: &TableName,
) -> Result<TableReport> {
    let mut r = TableReport {
        table: table.to_string(),
        ..TableReport::default()
    };
    let rows = buffer
        .query(
            &format!(
                "SELECT operation, key_columns, before, after, commit_lsn::text AS position FROM {}.cdc_events
                 WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3 ORDER BY cdc_events.commit_lsn, seq",
                quote_ident(&cfg.buffer_schema)
            ),
            &[&cfg.id, &table.schema, &table.name],
        )
        .await
        .map_err(|e| Error::Buffer(describe_pg_error(&e)))?;
    let mut replay: BTreeMap<String, Row> = BTreeMap::new();
    // Copied by a snapshot: the events of rows the snapshot had not reached yet meet no row,
    // and a row whose last event sorts before the copy's first chunk no longer exists (the
    // copy would have written it otherwise): it was deleted where no event says so (a gap).
    let copy_started: Option<u64> = buffer
        .query_opt(
            &format!(
                "SELECT started_lsn::text FROM {}.cdc_snapshots WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3 \
                 AND phase = 'Done'",
                quote_ident(&cfg.buffer_schema)
            ),
            &[&cfg.id, &table.schema, &table.name],
        )
        .await
        .map_err(|e| Error::Buffer(describe_pg_error(&e)))?
        .map(|r| r.get::<_, Option<String>>(0).and_then(|l| lsn::parse(&l)).unwrap_or(0));
    let snapshotted = copy_started.is_some();
    let mut last_event: BTreeMap<String, u64> = BTreeMap::new();
    // Rows are matched on the primary key (or replica identity index) when the table has one:
    // under REPLICA IDENTITY FULL every column is a "key column", including TOASTed ones an
    // UPDATE may leave out.
    let mut key_columns = source_key_columns(source, table).await?;
    if key_columns.is_empty() {
        key_columns = rows.first().map(|r| r.get(1)).unwrap_or_default();
    }
    for (i, row) in rows.iter().enumerate() {
        let unreadable = |e: tokio_postgres::Error| {
            Error::Buffer(format!(
                "cannot read event {i} of {table} for verification: {e} (documents nested deeper than 128 levels are captured, but cannot be verified this way)"
            ))
        };
        let op: &str = row.try_get(0).map_err(unreadable)?;
        let before: Option<Value> = row.try_get(2).map_err(unreadable)?;
        let after: Option<Value> = row.try_get(3).map_err(unreadable)?;
        let after_key = after.as_ref().and_then(|a| key_of(a, &key_columns));
        let before_key = before.as_ref().and_then(|b| key_of(b, &key_columns));
        let position = row
            .try_get::<_, &str>(4)
            .ok()
            .and_then(lsn::parse)
            .unwrap_or(0);
        if let Some(k) = &after_key {
            last_event.insert(k.clone(), position);
        }
        match op {
            "SNAPSHOT" => {
                r.snapshots += 1;
                let (Some(k), Some(Value::Object(a))) = (after_key, after) else {
                    continue;
                };
                replay.insert(k, a);
            }
            "INSERT" => {
                r.inserts += 1;
                let (Some(k), Some(Value::Object(a))) = (after_key, after) else {
                    continue;
                };
                if replay.insert(k.clone(), a).is_some() {
                    r.out_of_order
                        .push(format!("event {i}: insert of existing {k}"));
                }
            }
            "UPDATE" => {
                r.updates += 1;
                let (Some(new_key), Some(Value::Object(a))) = (after_key, after) else {
                    continue;
                };
                let old_key = before_key.unwrap_or_else(|| new_key.clone());
                match replay.remove(&old_key) {
                    Some(mut old) => {
                        // Absent columns are unchanged TOAST values: keep the old ones.
                        for (c, v) in a {
                            old.insert(c, v);
                        }
                        replay.insert(new_key, old);
                    }
                    None if snapshotted => {
                        replay.insert(new_key, a);
                    }
                    None => r
                        .out_of_order
                        .push(format!("event {i}: update of missing {old_key}")),
                }
            }
            "DELETE" => {
                r.deletes += 1;
                let Some(k) = before_key else { continue };
                if replay.remove(&k).is_none() && !snapshotted {
                    r.out_of_order
                        .push(format!("event {i}: delete of missing {k}"));
                }
            }
            "TRUNCATE" => {
                r.truncates += 1;
                replay.clear();
            }
            _ => {}
        }
    }
    if let Some(started) = copy_started {
        replay.retain(|k, _| last_event.get(k).is_some_and(|&at| at >= started));
    }
    // Both sides go through the source's own types: the replayed images are turned back into
    // rows of the table (`jsonb_populate_record` runs each type's input function on the text
    // Philotes wrote) and both are rendered by `to_jsonb`, so equal values compare equal
    // whatever their text form.
    let mut replayed: BTreeMap<String, Value> = BTreeMap::new();
    let images: Vec<Value> = replay.into_values().map(Value::Object).collect();
    for chunk in images.chunks(1000) {
        let rows = source
            .query(
                &format!(
                    "SELECT to_jsonb(jsonb_populate_record(NULL::{}, r)) FROM jsonb_array_elements($1::jsonb) r",
                    table.quoted()
                ),
                &[&Value::Array(chunk.to_vec())],
            )
            .await
            .map_err(|e| {
                Error::SourceSetup(format!(
                    "cannot read the replayed rows of {table} back as rows of the table: {}",
                    describe_pg_error(&e)
                ))
            })?;
        for row in rows {
            let v: Value = row.try_get(0).map_err(|e| {
                Error::Buffer(format!("cannot read a replayed row of {table}: {e}"))
            })?;
            if let Some(k) = key_of(&v, &key_columns) {
                replayed.insert(k, v);
            }
        }
    }
    // A table captured in part is compared in part: its listed columns, and the rows its
    // row filter selects, as the publication the pipeline streams holds it (printed by the
    // server; read in a read-only transaction, one statement).
    let filter = cfg.filters.get(table);
    let row_filter = match filter.and_then(|f| f.row_filter.as_ref()) {
        None => None,
        Some(_) => crate::pipeline::source::published(source, &cfg.publication)
            .await
            .map_err(|e| Error::SourceSetup(describe_pg_error(&e)))?
            .remove(&table.to_string())
            .and_then(|(p, _)| p.row_filter),
    };
    let select = format!(
        "SELECT to_jsonb(t) FROM {} t{}",
        table.quoted(),
        row_filter
            .map(|w| format!(" WHERE {w}"))
            .unwrap_or_default()
    );
    let read = async {
        source.batch_execute("BEGIN READ ONLY").await?;
        let rows = source.query(&select, &[]).await;
        source.batch_execute("COMMIT").await?;
        rows
    };
    let src_rows = read.await.map_err(|e| {
        Error::SourceSetup(format!("cannot read {table}: {}", describe_pg_error(&e)))
    })?;
    if let Some(columns) = filter.and_then(|f| f.columns.as_ref()) {
        for v in replayed.values_mut() {
            if let Some(o) = v.as_object_mut() {
                o.retain(|k, _| columns.contains(k));
            }
        }
    }
    let mut src: BTreeMap<String, Value> = BTreeMap::new();
    for row in &src_rows {
        let v: Value = row
            .try_get(0)
            .map_err(|e| Error::Buffer(format!("cannot read a row of {table}: {e}")))?;
        let mut v = v;
        if let (Some(columns), Some(o)) =
            (filter.and_then(|f| f.columns.as_ref()), v.as_object_mut())
        {
            o.retain(|k, _| columns.contains(k));
        }
        if let Some(k) = key_of(&v, &key_columns) {
            src.insert(k, v);
        }
    }
    r.source_rows = src.len();
    r.replayed_rows = replayed.len();
    for (k, s) in &src {
        match replayed.get(k) {
            None => r.missing.push(k.clone()),
            Some(got) if got != s => r.different.push(k.clone()),
            Some(_) => {}
        }
    }
    r.extra = replayed
        .keys()
        .filter(|k| !src.contains_key(*k))
        .cloned()
        .collect();
    Ok(r)
}

/// The source table's primary key (or replica identity index) columns, in index order;
/// empty when it has neither (REPLICA IDENTITY FULL).
async fn source_key_columns(
    source: &tokio_postgres::Client,
    table: &TableName,
) -> Result<Vec<String>> {
    let rows = source
        .query(
            "SELECT a.attname::text FROM pg_index i
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
               JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND (i.indisprimary OR i.indisreplident)
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| Error::SourceSetup(describe_pg_error(&e)))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
