//! The source database over ordinary SQL: preflight checks, provisioning (or adopting) the
//! publication and the replication slot, and the slot statistics status reports.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

use super::config::{quote_ident, quote_literal, PipelineConfig, TableFilter, TableName};
use super::conn::{describe_pg_error, heals_by_retrying};

/// A statement of the source's setup failed: retried when that can heal it (the connection
/// lost, the server restarting), else for the user to fix.
fn setup_error(e: &tokio_postgres::Error, message: String) -> Error {
    if heals_by_retrying(e) {
        Error::Stream(message)
    } else {
        Error::SourceSetup(message)
    }
}
use super::error::{Error, Result};
use super::identity::{self, SlotState};
use super::lsn;

/// What provisioning found or made.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub publication_created: bool,
    pub slot_created: bool,
    /// The slot's confirmed position when provisioning ended.
    pub slot_confirmed_lsn: u64,
    /// The source's WAL position when provisioning ended: everything committed before it is
    /// what `--until-caught-up` waits for.
    pub current_wal_lsn: u64,
    /// What the publication holds for each listed table ([`Published::describe`]), by
    /// `schema.name`, once `pending` is carried out.
    pub published: BTreeMap<String, String>,
    /// What Philotes's own publication lacks to follow the spec: changed with [`publish`]
    /// once the copies it calls for are recorded.
    pub pending: Pending,
}

/// The source's WAL position: where it writes, or on a standby (PostgreSQL 16+ decodes on
/// one), what it has replayed.
pub const CURRENT_WAL_LSN: &str =
    "(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)";

/// Checks the source can stream the listed tables, then creates or adopts the publication and
/// the slot. Every refusal names the object and what to change. `checkpoint` is where the
/// pipeline's buffer is complete up to, if it has a checkpoint: its slot must then exist, be
/// valid and not be ahead of it, and is never created anew.
pub async fn provision(
    client: &Client,
    cfg: &PipelineConfig,
    checkpoint: Option<u64>,
) -> Result<Provisioned> {
    let src = &cfg.source;
    let q = |e: tokio_postgres::Error| {
        let hint = if e.code().map(|c| c.code()) == Some("42501") {
            "; the source user needs the REPLICATION attribute and ownership of the captured tables (or superuser)"
        } else {
            ""
        };
        setup_error(
            &e,
            format!("source database {src}: {}{hint}", describe_pg_error(&e)),
        )
    };

    let wal_level: String = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(q)?
        .get(0);
    if wal_level != "logical" {
        return Err(Error::SourceSetup(format!(
            "source database {src} has wal_level={wal_level}; logical replication needs wal_level=logical: \
             run ALTER SYSTEM SET wal_level = logical (or set it in postgresql.conf) and restart PostgreSQL"
        )));
    }

    // A standby decodes from PostgreSQL 16 on (the slot is its own; the publication comes
    // from the primary, since a standby is read-only).
    let standby: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(q)?
        .get(0);
    if standby {
        let version = server_version(client).await.map_err(q)?;
        if version < 160000 {
            return Err(Error::SourceSetup(format!(
                "the source database {src} is a standby running {}.{}; logical decoding on a standby needs PostgreSQL 16 or newer: \
                 point the pipeline at the primary, or upgrade",
                version / 10000,
                version % 10000 / 100
            )));
        }
    }
    for table in &cfg.tables {
        check_table(client, cfg, table).await?;
    }
    if cfg.failover_slot {
        let version = server_version(client).await.map_err(q)?;
        if version < 170000 {
            return Err(Error::SourceSetup(format!(
                "spec.source.failoverSlot needs PostgreSQL 17 or newer (failover slots); the source database {src} runs {}.{}; \
                 leave it unset, or upgrade the source",
                version / 10000,
                version % 10000 / 100
            )));
        }
    }
    if !cfg.filters.is_empty() {
        let version = server_version(client).await.map_err(q)?;
        for (i, table) in cfg.tables.iter().enumerate() {
            if let Some(filter) = cfg.filters.get(table) {
                check_filter(client, cfg, i, table, filter, version).await?;
            }
        }
    }

    let mut wanted_entries = BTreeMap::new();
    let (publication_created, pending) =
        ensure_publication(client, cfg, &mut wanted_entries).await?;
    let slot_created = ensure_slot(client, cfg, checkpoint).await?;
    let entries = published(client, &cfg.publication).await.map_err(q)?;
    let published = cfg
        .tables
        .iter()
        .map(|t| {
            let t = t.to_string();
            let entry = wanted_entries.remove(&t).unwrap_or_else(|| {
                entries
                    .get(&t)
                    .map_or_else(Published::default, |(p, _)| p.clone())
                    .describe()
            });
            (t, entry)
        })
        .collect();

    let row = client
        .query_one(
            &format!(
                "SELECT confirmed_flush_lsn::text, {CURRENT_WAL_LSN}::text FROM pg_replication_slots WHERE slot_name = $1"
            ),
            &[&cfg.slot],
        )
        .await
        .map_err(q)?;
    Ok(Provisioned {
        publication_created,
        slot_created,
        slot_confirmed_lsn: row
            .get::<_, Option<&str>>(0)
            .and_then(lsn::parse)
            .unwrap_or(0),
        current_wal_lsn: lsn::parse(row.get(1)).unwrap_or(0),
        published,
        pending,
    })
}

async fn check_table(client: &Client, cfg: &PipelineConfig, table: &TableName) -> Result<()> {
    let row = client
        .query_opt(
            "SELECT c.relkind::text, c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| {
            setup_error(
                &e,
                format!("source database {}: {}", cfg.source, describe_pg_error(&e)),
            )
        })?;
    let Some(row) = row else {
        return Err(Error::SourceSetup(format!(
            "table {table} listed in spec.source.tables does not exist in the source database {}; create it or remove it from the list",
            cfg.source
        )));
    };
    let (kind, identity, has_pk): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
    if kind != "r" && kind != "p" {
        return Err(Error::SourceSetup(format!(
            "{table} listed in spec.source.tables is not a table (relkind {kind}); only tables can be captured"
        )));
    }
    if identity == "n" || (identity == "d" && !has_pk) {
        return Err(Error::SourceSetup(format!(
            "table {table} has no replica identity (no primary key, REPLICA IDENTITY {}), so its UPDATEs and DELETEs cannot be captured; \
             add a primary key or run ALTER TABLE {} REPLICA IDENTITY FULL",
            if identity == "n" { "NOTHING" } else { "DEFAULT" },
            table.quoted()
        )));
    }
    Ok(())
}

async fn server_version(client: &Client) -> std::result::Result<i32, tokio_postgres::Error> {
    let v: String = client
        .query_one("SHOW server_version_num", &[])
        .await?
        .get(0);
    Ok(v.parse().unwrap_or(0))
}

/// A column list and row filter need PostgreSQL 15; the columns must exist and include the
/// replica identity's (else the source refuses the table's UPDATEs and DELETEs).
async fn check_filter(
    client: &Client,
    cfg: &PipelineConfig,
    i: usize,
    table: &TableName,
    filter: &TableFilter,
    version: i32,
) -> Result<()> {
    let field = format!("spec.source.tables[{i}]");
    let src = &cfg.source;
    if version < 150000 {
        return Err(Error::SourceSetup(format!(
            "{field} has a column list or row filter, which needs PostgreSQL 15 or newer; the source database {src} runs {}.{}; \
             list the table by name only, or upgrade the source",
            version / 10000,
            version % 10000 / 100
        )));
    }
    let Some(columns) = &filter.columns else {
        return Ok(());
    };
    let q = |e: tokio_postgres::Error| {
        setup_error(
            &e,
            format!("source database {src}: {}", describe_pg_error(&e)),
        )
    };
    let rows = client
        .query(
            "SELECT a.attname::text, \
                    CASE c.relreplident \
                      WHEN 'f' THEN true \
                      WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident AND a.attnum = ANY (i.indkey)) \
                      ELSE EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary AND a.attnum = ANY (i.indkey)) \
                    END \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             WHERE n.nspname = $1 AND c.relname = $2 ORDER BY a.attnum",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(q)?;
    let all: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    for (j, c) in columns.iter().enumerate() {
        if !all.contains(c) {
            return Err(Error::SourceSetup(format!(
                "{field}.columns[{j}]: table {table} has no column {c} (it has {})",
                all.join(", ")
            )));
        }
    }
    let missing: Vec<String> = rows
        .iter()
        .filter(|r| r.get::<_, bool>(1) && !columns.contains(&r.get::<_, String>(0)))
        .map(|r| r.get(0))
        .collect();
    if !missing.is_empty() {
        return Err(Error::SourceSetup(format!(
            "{field}.columns leaves out {} of the replica identity of {table}; the source would refuse its UPDATEs and DELETEs. \
             Add them to the list",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// What a publication holds for one table: its column list (`None`: all) and row filter as
/// the server prints it (`None`: every row).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    pub columns: Option<Vec<String>>,
    pub row_filter: Option<String>,
}

impl Published {
    /// How `cdc_snapshots.published` records it: `columns (a, b), rows WHERE (cond)`, the
    /// columns sorted, `all` for either when the publication does not restrict it.
    pub fn describe(&self) -> String {
        let mut columns = self.columns.clone();
        if let Some(c) = columns.as_mut() {
            c.sort();
        }
        format!(
            "columns {}, rows {}",
            columns.map_or("all".to_string(), |c| format!("({})", c.join(", "))),
            self.row_filter
                .as_ref()
                .map_or("all".to_string(), |w| format!("WHERE {w}"))
        )
    }
}

/// The tables publication `name` names (not its partitions), with their column lists and
/// row filters (PostgreSQL 15+), and their kind.
pub async fn published(
    client: &Client,
    name: &str,
) -> std::result::Result<BTreeMap<String, (Published, String)>, tokio_postgres::Error> {
    let filters = server_version(client).await? >= 150000;
    let (columns, filter) = if filters {
        (
            "(SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a \
              WHERE a.attrelid = pr.prrelid AND a.attnum = ANY (pr.prattrs))",
            "pg_get_expr(pr.prqual, pr.prrelid)",
        )
    } else {
        ("NULL::text[]", "NULL::text")
    };
    let rows = client
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, c.relkind::text, {columns}, {filter} \
                 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid \
                 JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE p.pubname = $1"
            ),
            &[&name],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                format!("{}.{}", r.get::<_, &str>(0), r.get::<_, &str>(1)),
                (
                    Published {
                        columns: r.get(3),
                        row_filter: r.get(4),
                    },
                    r.get::<_, String>(2),
                ),
            )
        })
        .collect())
}

/// What `cfg` asks of each table, as [`published`] would show it once the server has
/// printed the row filters: `expected` from a trial publication, in a transaction that is
/// rolled back (the server parses and prints the condition; nothing else ever reads it).
async fn expected(client: &Client, cfg: &PipelineConfig) -> Result<BTreeMap<String, Published>> {
    let mut out: BTreeMap<String, Published> = cfg
        .tables
        .iter()
        .map(|t| {
            let f = cfg.filters.get(t);
            let mut columns = f.and_then(|f| f.columns.clone());
            if let Some(c) = columns.as_mut() {
                c.sort();
            }
            (
                t.to_string(),
                Published {
                    columns,
                    row_filter: None,
                },
            )
        })
        .collect();
    if !cfg.filters.values().any(|f| f.row_filter.is_some()) {
        return Ok(out);
    }
    let trial = format!("philotes_check_{}", std::process::id());
    let printed = async {
        client.batch_execute("BEGIN").await?;
        client
            .execute(&create_publication_sql(cfg, &trial), &[])
            .await?;
        published(client, &trial).await
    }
    .await;
    let _ = client.batch_execute("ROLLBACK").await;
    let printed = printed.map_err(|e| filter_error(cfg, &e))?;
    for (table, (p, _)) in printed {
        if let Some(o) = out.get_mut(&table) {
            o.row_filter = p.row_filter;
        }
    }
    Ok(out)
}

/// The source refused the publication's definition: with a column list or row filter, most
/// likely because of them.
fn filter_error(cfg: &PipelineConfig, e: &tokio_postgres::Error) -> Error {
    if e.code().map(|c| c.code()) == Some("42P10") {
        return Error::InvalidSpec(format!(
            "spec.source.tables: a where condition or column list of publication {} does not fit a table's replica identity, \
             so the source database {} would refuse every UPDATE and DELETE of it ({}); nothing was created or changed. \
             Use only replica identity (primary key) columns in where, list them in columns, or change the table's REPLICA IDENTITY",
            cfg.publication,
            cfg.source,
            describe_pg_error(e)
        ));
    }
    if heals_by_retrying(e) {
        return Error::Stream(format!(
            "the source database {} did not answer while creating or updating the publication {}: {}",
            cfg.source,
            cfg.publication,
            describe_pg_error(e)
        ));
    }
    Error::SourceSetup(format!(
        "the source database {} refused the publication {} for spec.source.tables{}: {}",
        cfg.source,
        cfg.publication,
        if cfg.filters.is_empty() {
            ""
        } else {
            " (check each entry's columns and where: the condition must be a valid SQL condition on the table's own columns)"
        },
        describe_pg_error(e)
    ))
}

/// `CREATE PUBLICATION` for the listed tables, with their column lists and row filters,
/// published via the partition root. One statement: it is sent with the extended protocol,
/// which refuses a second one a row filter might try to smuggle in.
fn create_publication_sql(cfg: &PipelineConfig, name: &str) -> String {
    let list = cfg
        .tables
        .iter()
        .map(|t| {
            let clause = cfg
                .filters
                .get(t)
                .map(TableFilter::publication_clause)
                .unwrap_or_default();
            format!("{}{clause}", t.quoted())
        })
        .collect::<Vec<_>>()
        .join(", ");
    // Via the root: a partitioned table's changes arrive under its own name, from every
    // partition, present and future.
    format!(
        "CREATE PUBLICATION {} FOR TABLE {list} WITH (publish_via_partition_root = true)",
        quote_ident(name)
    )
}

/// The source checks a table's replica identity against the row filter and column list of
/// every publication of it when an UPDATE or DELETE starts, refusing every one of them if
/// they do not cover it: asked now, in the caller's transaction, for each of `tables` with
/// a filter, with statements that touch no row.
async fn probe_identity<'a>(
    client: &Client,
    cfg: &PipelineConfig,
    tables: impl Iterator<Item = &'a TableName>,
) -> std::result::Result<(), tokio_postgres::Error> {
    for t in tables.filter(|t| cfg.filters.contains_key(*t)) {
        let column: Option<String> = client
            .query_opt(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) \
                 AND attnum > 0 AND NOT attisdropped ORDER BY attnum LIMIT 1",
                &[&t.quoted()],
            )
            .await?
            .map(|r| r.get(0));
        if let Some(c) = column {
            let c = quote_ident(&c);
            // DEFAULT: an identity or generated column takes nothing else.
            client
                .execute(
                    &format!("UPDATE {} SET {c} = DEFAULT WHERE false", t.quoted()),
                    &[],
                )
                .await?;
            client
                .execute(&format!("DELETE FROM {} WHERE false", t.quoted()), &[])
                .await?;
        }
    }
    Ok(())
}

/// Whether the publication is one Philotes created for this pipeline (its comment says so).
async fn owned_by(
    client: &Client,
    cfg: &PipelineConfig,
) -> std::result::Result<bool, tokio_postgres::Error> {
    let comment: Option<String> = client
        .query_opt(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await?
        .and_then(|r| r.get(0));
    Ok(comment.as_deref() == Some(format!("created by philotes for {}", cfg.id).as_str()))
}

/// What a publication Philotes owns lacks to follow the spec, to be changed once the copies
/// it calls for are recorded ([`publish`]).
#[derive(Debug, Clone, Default)]
pub struct Pending {
    /// Listed tables it does not publish.
    pub add: BTreeSet<String>,
    /// Listed tables it publishes with another column list or row filter.
    pub renew: BTreeSet<String>,
    /// It publishes tables no longer listed.
    pub unlist: bool,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.renew.is_empty() && !self.unlist
    }
}

/// Makes a publication Philotes owns follow the spec, in one transaction: adds the listed
/// tables it lacks, publishes the `renew` ones anew with the column list and row filter the
/// spec gives them (dropped and added again), and drops the tables no longer listed. The
/// source is asked first whether the new filters would refuse the tables' UPDATEs and
/// DELETEs. With `commit` false, everything is rolled back: a trial, before the copies it
/// calls for are recorded.
pub async fn publish(
    client: &Client,
    cfg: &PipelineConfig,
    pending: &Pending,
    commit: bool,
) -> Result<()> {
    let changed = |t: &&TableName| {
        let t = t.to_string();
        pending.add.contains(&t) || pending.renew.contains(&t)
    };
    let name = quote_ident(&cfg.publication);
    let result = async {
        client.batch_execute("BEGIN").await?;
        let extra = client
            .query(
                "SELECT format('%I.%I', n.nspname, c.relname), n.nspname || '.' || c.relname \
                 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid \
                 JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = $1",
                &[&cfg.publication],
            )
            .await?;
        for t in cfg.tables.iter().filter(|t| pending.renew.contains(&t.to_string())) {
            client
                .execute(&format!("ALTER PUBLICATION {name} DROP TABLE {}", t.quoted()), &[])
                .await?;
        }
        for t in cfg.tables.iter().filter(changed) {
            let clause = cfg
                .filters
                .get(t)
                .map(TableFilter::publication_clause)
                .unwrap_or_default();
            client
                .execute(&format!("ALTER PUBLICATION {name} ADD TABLE {}{clause}", t.quoted()), &[])
                .await?;
        }
        let wanted: BTreeSet<String> = cfg.tables.iter().map(|t| t.to_string()).collect();
        let mut unlisted = Vec::new();
        for r in &extra {
            let (quoted, plain): (String, String) = (r.get(0), r.get(1));
            if !wanted.contains(&plain) {
                client
                    .execute(&format!("ALTER PUBLICATION {name} DROP TABLE {quoted}"), &[])
                    .await?;
                unlisted.push(plain);
            }
        }
        probe_identity(client, cfg, cfg.tables.iter().filter(changed)).await?;
        // A condition that closed its parenthesis to name another table publishes that
        // one too: the publication must hold exactly the listed tables.
        let now: BTreeSet<String> = published(client, &cfg.publication)
            .await?
            .into_keys()
            .collect();
        let verdict = (now == wanted).then_some(unlisted).ok_or(now);
        client
            .batch_execute(if commit && verdict.is_ok() { "COMMIT" } else { "ROLLBACK" })
            .await?;
        Ok(verdict)
    }
    .await;
    match result {
        Ok(Err(now)) => Err(Error::InvalidSpec(format!(
            "spec.source.tables would make publication {} publish [{}] instead of [{}]: \
             a where condition must be one condition on its own table; nothing was changed",
            cfg.publication,
            now.into_iter().collect::<Vec<_>>().join(", "),
            cfg.tables
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        Ok(Ok(unlisted)) => {
            if commit {
                for t in &pending.add {
                    tracing::info!(pipeline = %cfg.id, table = %t, publication = %cfg.publication, "table added to the publication");
                }
                for t in &pending.renew {
                    tracing::info!(pipeline = %cfg.id, table = %t, publication = %cfg.publication,
                        "the table's column list or row filter changed in the spec; published anew");
                }
                for t in &unlisted {
                    tracing::info!(pipeline = %cfg.id, table = %t, publication = %cfg.publication, "table dropped from the publication");
                }
            }
            Ok(())
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(filter_error(cfg, &e))
        }
    }
}

/// Returns whether the publication was created now, and what is left to change in it
/// ([`Provisioned::pending`]), whose entries for those tables, as the spec asks for them, go
/// into `wanted_entries`.
async fn ensure_publication(
    client: &Client,
    cfg: &PipelineConfig,
    wanted_entries: &mut BTreeMap<String, String>,
) -> Result<(bool, Pending)> {
    let name = &cfg.publication;
    let err = |e: tokio_postgres::Error| {
        setup_error(
            &e,
            format!(
                "publication {name} on the source database {}: {}",
                cfg.source,
                describe_pg_error(&e)
            ),
        )
    };
    let existing = client
        .query_opt(
            "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[name],
        )
        .await
        .map_err(err)?;
    let wanted: BTreeSet<String> = cfg.tables.iter().map(|t| t.to_string()).collect();
    let read_only: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(err)?
        .get(0);
    if existing.is_none() && read_only {
        return Err(Error::SourceSetup(format!(
            "the source database {} is a standby (read-only), and publication {name} does not exist there: create it on the primary \
             (it reaches the standby by replication): {}",
            cfg.source,
            create_publication_sql(cfg, name)
        )));
    }
    let Some(row) = existing else {
        // Created and checked in one transaction: if the publication holds anything but the
        // listed tables (a row filter that closed its parenthesis early), nothing stays.
        let created = async {
            client.batch_execute("BEGIN").await?;
            client
                .execute(&create_publication_sql(cfg, name), &[])
                .await?;
            probe_identity(client, cfg, cfg.tables.iter()).await?;
            client
                .execute(
                    &format!(
                        "COMMENT ON PUBLICATION {} IS {}",
                        quote_ident(name),
                        quote_literal(&format!("created by philotes for {}", cfg.id))
                    ),
                    &[],
                )
                .await?;
            published(client, name).await
        }
        .await;
        let names = match created {
            Ok(p) => p.into_keys().collect::<BTreeSet<String>>(),
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                // Created by a concurrent start: adopt it below like any other.
                if e.code().map(|c| c.code()) == Some("42710") {
                    return Box::pin(ensure_publication(client, cfg, wanted_entries)).await;
                }
                return Err(filter_error(cfg, &e));
            }
        };
        if names != wanted {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(Error::InvalidSpec(format!(
                "spec.source.tables would make publication {name} publish [{}] instead of [{}]: \
                 a where condition must be one condition on its own table",
                names.into_iter().collect::<Vec<_>>().join(", "),
                wanted.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        client.batch_execute("COMMIT").await.map_err(err)?;
        return Ok((true, Pending::default()));
    };
    let all_tables: bool = row.get(0);
    let missing_ops: Vec<&str> = [(1, "insert"), (2, "update"), (3, "delete"), (4, "truncate")]
        .iter()
        .filter(|(i, _)| !row.get::<_, bool>(*i))
        .map(|(_, op)| *op)
        .collect();
    if !missing_ops.is_empty() {
        return Err(Error::SourceSetup(format!(
            "publication {name} on the source database {} does not publish {}; those changes would be lost. \
             Run ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate') or choose another spec.source.publication",
            cfg.source,
            missing_ops.join(", "),
            quote_ident(name)
        )));
    }
    // The tables the publication names, not pg_publication_tables: that one lists the
    // partitions of a partitioned table unless it publishes via the root.
    let named = published(client, name).await.map_err(err)?;
    let published_tables: BTreeSet<String> = named.keys().cloned().collect();
    let partitioned: Vec<String> = named
        .iter()
        .filter(|(_, (_, kind))| kind == "p")
        .map(|(t, _)| t.clone())
        .collect();
    if all_tables {
        return Err(Error::SourceSetup(format!(
            "publication {name} already exists on the source database {} and publishes [ALL TABLES], but spec.source.tables lists [{}]; \
             make them match (ALTER PUBLICATION {} SET TABLE ...) or choose another spec.source.publication",
            cfg.source,
            wanted.iter().cloned().collect::<Vec<_>>().join(", "),
            quote_ident(name)
        )));
    }
    // The same tables, columns and rows: a filter in the publication the spec does not ask
    // for would capture silently less. A publication Philotes created for this pipeline
    // follows the spec instead: a table added is published from now on (and copied, README:
    // Snapshots), a table removed no longer is, and a table whose column list or row filter
    // changed is published anew (and copied again).
    let asked = expected(client, cfg).await?;
    let mut pending = Pending {
        unlist: published_tables.iter().any(|t| !wanted.contains(t)),
        ..Pending::default()
    };
    let mut differing = None;
    for (table, want) in &asked {
        match named.get(table) {
            None => {
                pending.add.insert(table.clone());
            }
            Some((has, _)) => {
                let mut has = has.clone();
                if let Some(c) = has.columns.as_mut() {
                    c.sort();
                }
                if &has != want {
                    differing.get_or_insert((table.clone(), has, want.clone()));
                    pending.renew.insert(table.clone());
                }
            }
        }
    }
    if !pending.is_empty() && !owned_by(client, cfg).await.map_err(err)? {
        if published_tables != wanted {
            return Err(Error::SourceSetup(format!(
                "publication {name} already exists on the source database {} and publishes [{}], but spec.source.tables lists [{}]; \
                 make them match (ALTER PUBLICATION {} SET TABLE ...) or choose another spec.source.publication",
                cfg.source,
                published_tables.iter().cloned().collect::<Vec<_>>().join(", "),
                wanted.iter().cloned().collect::<Vec<_>>().join(", "),
                quote_ident(name)
            )));
        }
        if let Some((table, has, want)) = differing {
            return Err(Error::SourceSetup(format!(
                "publication {name} on the source database {} publishes {table} with {}, but spec.source.tables asks for {}; \
                 make them match (ALTER PUBLICATION {} SET TABLE ...) or choose another spec.source.publication",
                cfg.source,
                has.describe(),
                want.describe(),
                quote_ident(name)
            )));
        }
    }
    if !pending.is_empty() && read_only {
        return Err(Error::SourceSetup(format!(
            "the source database {} is a standby (read-only), and publication {name} does not publish what spec.source.tables \
             lists ({} to add, {} with another column list or row filter{}); change it on the primary (it reaches the standby \
             by replication)",
            cfg.source,
            pending.add.len(),
            pending.renew.len(),
            if pending.unlist { ", tables no longer listed" } else { "" }
        )));
    }
    if !pending.is_empty() {
        // Tried now, so a spec the source refuses stops the start before anything is
        // recorded; carried out once the copies it calls for are.
        publish(client, cfg, &pending, false).await?;
    }
    for t in pending.add.iter().chain(&pending.renew) {
        if let Some(want) = asked.get(t) {
            wanted_entries.insert(t.clone(), want.describe());
        }
    }
    let via_root: bool = row.get(5);
    if !via_root && !partitioned.is_empty() {
        return Err(Error::SourceSetup(format!(
            "publication {name} on the source database {} publishes the partitioned table(s) {} through their partitions, \
             so their changes would arrive under each partition's name; run ALTER PUBLICATION {} SET (publish_via_partition_root = true) \
             or choose another spec.source.publication",
            cfg.source,
            partitioned.join(", "),
            quote_ident(name)
        )));
    }
    Ok((false, pending))
}

/// A slot as `pg_replication_slots` shows it.
struct SlotRow {
    kind: String,
    /// Created with `failover = true` (PostgreSQL 17+).
    failover: bool,
    plugin: Option<String>,
    database: Option<String>,
    state: SlotState,
}

fn slot_error(cfg: &PipelineConfig, e: tokio_postgres::Error) -> Error {
    setup_error(
        &e,
        format!(
            "replication slot {} on the source database {}: {}",
            cfg.slot,
            cfg.source,
            describe_pg_error(&e)
        ),
    )
}

async fn slot_row(client: &Client, cfg: &PipelineConfig) -> Result<Option<SlotRow>> {
    // `conflicting` (16+) and `invalidation_reason` (17+) through to_jsonb, so one query
    // serves every version.
    let row = client
        .query_opt(
            "SELECT slot_type, plugin, database, wal_status, confirmed_flush_lsn::text, \
                    to_jsonb(s)->>'conflicting', to_jsonb(s)->>'invalidation_reason', \
                    coalesce((to_jsonb(s)->>'failover')::boolean, false) \
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .map_err(|e| slot_error(cfg, e))?;
    Ok(row.map(|row| {
        let invalidated = match (
            row.get::<_, Option<&str>>(3),
            row.get::<_, Option<&str>>(5),
            row.get::<_, Option<String>>(6),
        ) {
            (_, _, Some(reason)) => Some(format!("invalidation_reason {reason}")),
            (Some("lost"), _, _) => {
                Some("wal_status lost: it needed WAL the source removed".into())
            }
            (_, Some("true"), _) => Some("conflicting with recovery on a standby".into()),
            _ => None,
        };
        SlotRow {
            kind: row.get(0),
            plugin: row.get(1),
            database: row.get(2),
            failover: row.get(7),
            state: SlotState {
                confirmed_flush_lsn: row.get::<_, Option<&str>>(4).and_then(lsn::parse),
                invalidated,
            },
        }
    }))
}

/// The pipeline's slot, if it exists.
pub async fn slot_state(client: &Client, cfg: &PipelineConfig) -> Result<Option<SlotState>> {
    Ok(slot_row(client, cfg).await?.map(|r| r.state))
}

/// Creates the pipeline's logical slot; returns where it begins.
/// The statement that creates the pipeline's slot (`$1`: its name), as a failover slot when
/// `spec.source.failoverSlot` asks (PostgreSQL 17+).
fn create_slot_sql(cfg: &PipelineConfig) -> &'static str {
    if cfg.failover_slot {
        "SELECT * FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT * FROM pg_create_logical_replication_slot($1, 'pgoutput')"
    }
}

pub async fn create_slot(client: &Client, cfg: &PipelineConfig) -> Result<u64> {
    let row = client
        .query_one(
            &format!("SELECT lsn::text FROM ({}) created", create_slot_sql(cfg)),
            &[&cfg.slot],
        )
        .await
        .map_err(|e| slot_error(cfg, e))?;
    Ok(lsn::parse(row.get(0)).unwrap_or(0))
}

/// Drops the pipeline's slot, if it exists (returns whether it did); one in use is refused,
/// not terminated.
pub async fn drop_slot(client: &Client, cfg: &PipelineConfig) -> Result<bool> {
    let Some(row) = client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .map_err(|e| slot_error(cfg, e))?
    else {
        return Ok(false);
    };
    if let Some(pid) = row.get::<_, Option<i32>>(0) {
        return Err(Error::SlotInUse(format!(
            "replication slot {} is in use by process {pid}; stop that consumer first",
            cfg.slot
        )));
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&cfg.slot])
        .await
        .map_err(|e| slot_error(cfg, e))?;
    Ok(true)
}

/// Returns whether the slot was created now.
async fn ensure_slot(
    client: &Client,
    cfg: &PipelineConfig,
    checkpoint: Option<u64>,
) -> Result<bool> {
    let slot = &cfg.slot;
    let Some(row) = slot_row(client, cfg).await? else {
        if let Some(lsn) = checkpoint {
            identity::check_slot(cfg, lsn, None)?;
        }
        let created = client.execute(create_slot_sql(cfg), &[slot]).await;
        return match created {
            Ok(_) => Ok(true),
            Err(e) if e.code().map(|c| c.code()) == Some("42710") => {
                Box::pin(ensure_slot(client, cfg, checkpoint)).await
            }
            Err(e) => Err(slot_error(cfg, e)),
        };
    };
    let SlotRow {
        kind,
        plugin,
        database,
        state,
        failover,
    } = row;
    if cfg.failover_slot && !failover {
        return Err(Error::SourceSetup(format!(
            "replication slot {slot} on the source database {} is not a failover slot, but spec.source.failoverSlot asks for one; \
             make it one (ALTER_REPLICATION_SLOT {slot} (FAILOVER true) on a replication connection, with the slot not in use) \
             or unset spec.source.failoverSlot",
            cfg.source
        )));
    }
    if kind != "logical" || plugin.as_deref() != Some("pgoutput") {
        return Err(Error::SourceSetup(format!(
            "replication slot {slot} already exists on the source database {} as a {kind} slot with plugin {}; \
             Philotes needs a logical slot with plugin pgoutput: drop it or choose another spec.source.slot",
            cfg.source,
            plugin.as_deref().unwrap_or("none")
        )));
    }
    if database.as_deref() != Some(cfg.source.dbname.as_str()) {
        return Err(Error::SourceSetup(format!(
            "replication slot {slot} belongs to database {}, not {}; choose another spec.source.slot",
            database.as_deref().unwrap_or("?"),
            cfg.source.dbname
        )));
    }
    match checkpoint {
        Some(lsn) => identity::check_slot(cfg, lsn, Some(&state))?,
        None => {
            if let Some(why) = &state.invalidated {
                return Err(Error::SlotLost(format!(
                    "replication slot {slot} on the source database {} was invalidated ({why}): changes were lost before Philotes read them. \
                     Drop the slot and start again with a fresh copy of the tables",
                    cfg.source
                )));
            }
        }
    }
    Ok(false)
}

/// The slot as `pg_replication_slots` reports it, and the source's WAL position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotStats {
    pub current_wal_lsn: u64,
    pub confirmed_flush_lsn: Option<u64>,
    pub wal_status: Option<String>,
    pub safe_wal_size: Option<i64>,
    pub active: bool,
    /// Why the server invalidated the slot (`wal_removed`, `idle_timeout`, …; PostgreSQL 17+).
    pub invalidation_reason: Option<String>,
    /// Since when no session streams from the slot (PostgreSQL 17+), RFC 3339.
    pub inactive_since: Option<String>,
    /// Seconds since `inactive_since`.
    pub inactive_seconds: Option<i64>,
    /// `max_slot_wal_keep_size` in bytes, when set (not -1).
    pub max_slot_wal_keep_size: Option<i64>,
    /// `idle_replication_slot_timeout` in seconds, when set (PostgreSQL 18+, not 0).
    pub idle_timeout_seconds: Option<i64>,
}

pub async fn slot_stats(client: &Client, slot: &str) -> Result<SlotStats> {
    let row = client
        .query_one(
            // Columns and settings of newer versions are read by name (to_jsonb, pg_settings),
            // so one query serves 14 to 18.
            &format!("SELECT {CURRENT_WAL_LSN}::text, s.confirmed_flush_lsn::text, s.wal_status, s.safe_wal_size, coalesce(s.active, false), \
                    to_jsonb(s)->>'invalidation_reason', \
                    to_char((to_jsonb(s)->>'inactive_since')::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                    extract(epoch FROM now() - (to_jsonb(s)->>'inactive_since')::timestamptz)::bigint, \
                    (SELECT (setting::numeric * CASE unit WHEN 'MB' THEN 1048576 WHEN 'kB' THEN 1024 ELSE 1 END)::bigint \
                       FROM pg_settings WHERE name = 'max_slot_wal_keep_size' AND setting <> '-1'), \
                    (SELECT (setting::numeric * CASE unit WHEN 'min' THEN 60 WHEN 'ms' THEN 0.001 ELSE 1 END)::bigint \
                       FROM pg_settings WHERE name = 'idle_replication_slot_timeout' AND setting <> '0') \
             FROM (SELECT 1) one LEFT JOIN pg_replication_slots s ON s.slot_name = $1"),
            &[&slot],
        )
        .await
        .map_err(|e| Error::Stream(describe_pg_error(&e)))?;
    Ok(SlotStats {
        current_wal_lsn: lsn::parse(row.get(0)).unwrap_or(0),
        confirmed_flush_lsn: row.get::<_, Option<&str>>(1).and_then(lsn::parse),
        wal_status: row.get(2),
        safe_wal_size: row.get(3),
        active: row.get(4),
        invalidation_reason: row.get(5),
        inactive_since: row.get(6),
        inactive_seconds: row.get(7),
        max_slot_wal_keep_size: row.get(8),
        idle_timeout_seconds: row.get(9),
    })
}

/// What [`drop_provisioned`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dropped {
    pub slot: bool,
    pub publication: bool,
}

/// Drops the pipeline's slot, and its publication if Philotes created it for this pipeline
/// (an adopted publication is left alone). A slot still in use is refused, not terminated.
pub async fn drop_provisioned(client: &Client, cfg: &PipelineConfig) -> Result<Dropped> {
    let err = |what: &str, e: tokio_postgres::Error| {
        setup_error(
            &e,
            format!(
                "cannot drop {what} on the source database {}: {}",
                cfg.source,
                describe_pg_error(&e)
            ),
        )
    };
    let mut dropped = Dropped {
        slot: drop_slot(client, cfg).await?,
        ..Dropped::default()
    };
    let ours: Option<bool> = client
        .query_opt(
            "SELECT obj_description(oid, 'pg_publication') = $2 FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication, &format!("created by philotes for {}", cfg.id)],
        )
        .await
        .map_err(|e| err("the publication", e))?
        .map(|r| r.get::<_, Option<bool>>(0).unwrap_or(false));
    if ours == Some(true) {
        client
            .batch_execute(&format!(
                "DROP PUBLICATION {}",
                quote_ident(&cfg.publication)
            ))
            .await
            .map_err(|e| err("the publication", e))?;
        dropped.publication = true;
    }
    Ok(dropped)
}
