//! A `CdcPipeline` spec with its defaults applied, its secrets resolved and every field
//! checked. Nothing here touches the network, so every rule has a plain unit test.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;

use crate::crd::{self, CdcPipelineSpec, SecretKeyRef, TableEntry};
use crate::duration;

use super::conn::ConnInfo;
use super::error::{Error, Result};

/// A schema-qualified table name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// Parses `schema.table`, `table` (schema `public`), or SQL-quoted parts such as
    /// `"My Schema"."Order Items"`. Unquoted parts are folded to lower case, as PostgreSQL does.
    pub fn parse(input: &str) -> std::result::Result<TableName, String> {
        let mut parts = Vec::new();
        let mut chars = input.trim().chars().peekable();
        loop {
            let mut part = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            part.push('"');
                        }
                        Some('"') => break,
                        Some(c) => part.push(c),
                        None => return Err(format!("`{input}` has an unterminated quote")),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == '.' {
                        break;
                    }
                    if c == '"' || c.is_whitespace() {
                        return Err(format!(
                            "`{input}` is not a table name; quote names with spaces or quotes, e.g. \"My Table\""
                        ));
                    }
                    part.push(c.to_ascii_lowercase());
                    chars.next();
                }
            }
            if part.is_empty() {
                return Err(format!("`{input}` has an empty name part"));
            }
            parts.push(part);
            match chars.next() {
                None => break,
                Some('.') => continue,
                Some(_) => return Err(format!("`{input}` has text after a quoted name")),
            }
        }
        match parts.len() {
            1 => Ok(TableName {
                schema: "public".into(),
                name: parts.remove(0),
            }),
            2 => {
                let name = parts.remove(1);
                Ok(TableName {
                    schema: parts.remove(0),
                    name,
                })
            }
            _ => Err(format!(
                "`{input}` has more than two parts; use schema.table"
            )),
        }
    }

    /// The SQL-quoted form, safe to splice into a statement.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A column list and a row filter of one table (a publication's, PostgreSQL 15+).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableFilter {
    /// Column names as stored (unquoted ones folded to lower case); `None`: all.
    pub columns: Option<Vec<String>>,
    /// The condition, as the user wrote it; `None`: every row.
    pub row_filter: Option<String>,
}

impl TableFilter {
    /// The entry at `field`, checked; an error is `(field, what is wrong)`.
    fn parse(
        field: &str,
        f: &crd::FilteredTable,
    ) -> std::result::Result<TableFilter, (String, String)> {
        let invalid = |field: &str, why: String| (field.to_string(), why);
        let columns = match &f.columns {
            None => None,
            Some(cols) if cols.is_empty() => {
                return Err(invalid(
                    &format!("{field}.columns"),
                    "is empty; list the columns to capture, or leave it out for all".into(),
                ))
            }
            Some(cols) => {
                let mut names = Vec::new();
                for (j, c) in cols.iter().enumerate() {
                    let name = parse_identifier(c)
                        .map_err(|e| invalid(&format!("{field}.columns[{j}]"), e))?;
                    if names.contains(&name) {
                        return Err(invalid(
                            &format!("{field}.columns[{j}]"),
                            format!("lists {name} twice"),
                        ));
                    }
                    names.push(name);
                }
                Some(names)
            }
        };
        let row_filter = match f.where_.as_deref().map(str::trim) {
            None => None,
            Some("") => {
                return Err(invalid(
                    &format!("{field}.where"),
                    "is empty; write a condition, or leave it out for every row".into(),
                ))
            }
            Some(w) => Some(w.to_string()),
        };
        Ok(TableFilter {
            columns,
            row_filter,
        })
    }

    /// `(col, ...) WHERE (cond)` for `CREATE PUBLICATION ... FOR TABLE t <this>`.
    pub fn publication_clause(&self) -> String {
        let mut out = String::new();
        if let Some(cols) = &self.columns {
            out.push_str(" (");
            out.push_str(
                &cols
                    .iter()
                    .map(|c| quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            out.push(')');
        }
        if let Some(w) = &self.row_filter {
            out.push_str(&format!(" WHERE ({w})"));
        }
        out
    }
}

/// One identifier: quoted the SQL way, or folded to lower case.
fn parse_identifier(input: &str) -> std::result::Result<String, String> {
    let t = input.trim();
    if let Some(inner) = t.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        if inner.is_empty() || inner.replace("\"\"", "").contains('"') {
            return Err(format!("`{input}` is not a column name"));
        }
        return Ok(inner.replace("\"\"", "\""));
    }
    if t.is_empty() || t.contains(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$')) {
        return Err(format!(
            "`{input}` is not a column name (quote names that need it: \"Order Id\")"
        ));
    }
    Ok(t.to_lowercase())
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Everything a running pipeline needs, checked.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// `namespace/name`: the value of the `pipeline` column in the buffer.
    pub id: String,
    pub source: ConnInfo,
    pub buffer: ConnInfo,
    pub tables: Vec<TableName>,
    /// Column lists and row filters, for the tables that have one.
    pub filters: BTreeMap<TableName, TableFilter>,
    /// Create the slot with `failover = true` (PostgreSQL 17+).
    pub failover_slot: bool,
    pub publication: String,
    pub slot: String,
    pub buffer_schema: String,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub buffer_size: usize,
    pub status_interval: Duration,
    /// Silence on the replication stream after which the connection is reopened.
    pub stream_timeout: Duration,
    pub poison_events: crd::PoisonEventPolicy,
    /// How existing rows are copied (`spec.snapshot`).
    pub snapshot: SnapshotConfig,
    /// When the slot name is derived: the name releases before 0.2 derived, which a pipeline
    /// that checkpointed under it keeps (see [`crate::pipeline::identity::names`]).
    pub legacy_slot: Option<String>,
    /// Likewise for the publication.
    pub legacy_publication: Option<String>,
}

/// `spec.snapshot`, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotConfig {
    pub mode: crd::SnapshotMode,
    pub chunk_size: usize,
    /// `spec.snapshot.resync`: its id and tables.
    pub resync: Option<(String, Vec<TableName>)>,
}

impl Default for SnapshotConfig {
    fn default() -> SnapshotConfig {
        SnapshotConfig {
            mode: crd::SnapshotMode::Initial,
            chunk_size: crd::DEFAULT_SNAPSHOT_CHUNK_SIZE as usize,
            resync: None,
        }
    }
}

/// Where secret values come from: the manifest's own `Secret` documents when standalone, the
/// API server in the operator.
pub trait SecretSource {
    /// The decoded value of `key` in secret `namespace/name`, or an error saying which of
    /// the two is missing.
    fn get(&self, namespace: &str, name: &str, key: &str) -> Result<String>;
}

/// A Secret's values as a pipeline reads them: `data` decoded as UTF-8 text (`None` for a
/// value that is not text), then `stringData` over it, as the API server does.
pub type SecretValues = BTreeMap<String, Option<String>>;

pub fn secret_values(secret: Secret) -> SecretValues {
    let mut values: SecretValues = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).ok()))
        .collect();
    values.extend(
        secret
            .string_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, Some(v))),
    );
    values
}

/// `key` of secret `namespace/name`, from its values; the errors say what to do.
pub fn secret_value(
    values: &SecretValues,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<String> {
    match values.get(key) {
        Some(Some(v)) => Ok(v.clone()),
        Some(None) => Err(Error::Secret(format!(
            "secret {namespace}/{name} key `{key}` is not UTF-8 text; store the connection URI as text"
        ))),
        None => Err(Error::Secret(format!(
            "secret {namespace}/{name} has no key `{key}` (it has: {}); add it or set connectionSecretRef.key",
            values.keys().cloned().collect::<Vec<_>>().join(", ")
        ))),
    }
}

impl PipelineConfig {
    pub fn resolve(
        namespace: &str,
        name: &str,
        spec: &CdcPipelineSpec,
        secrets: &dyn SecretSource,
    ) -> Result<PipelineConfig> {
        let invalid = |field: &str, why: String| {
            Error::InvalidSpec(format!("CdcPipeline {namespace}/{name}: {field} {why}"))
        };
        if spec.source.tables.is_empty() {
            return Err(invalid(
                "spec.source.tables",
                "is empty; list at least one table to capture, e.g. [public.orders]".into(),
            ));
        }
        let mut tables = Vec::new();
        let mut filters = BTreeMap::new();
        for (i, t) in spec.source.tables.iter().enumerate() {
            let field = format!("spec.source.tables[{i}]");
            let (name, filter) = match t {
                TableEntry::Name(name) => (name.as_str(), None),
                TableEntry::Filtered(f) => (
                    f.name.as_str(),
                    Some(TableFilter::parse(&field, f).map_err(|(f, why)| invalid(&f, why))?),
                ),
                TableEntry::Invalid(v) => {
                    let why = match serde_json::from_value::<crd::FilteredTable>(v.clone()) {
                        Err(e) if v.is_object() => e.to_string(),
                        _ => "it is neither a name nor an object".to_string(),
                    };
                    return Err(invalid(
                        &field,
                        format!("is not `schema.table` or {{name, columns, where}}: {why}"),
                    ));
                }
            };
            let table = TableName::parse(name).map_err(|e| invalid(&field, e))?;
            if tables.contains(&table) {
                return Err(invalid(&field, format!("lists {table} twice")));
            }
            if let Some(filter) = filter {
                filters.insert(table.clone(), filter);
            }
            tables.push(table);
        }
        let slot = match &spec.source.slot {
            Some(s) => {
                check_replication_name(s).map_err(|e| invalid("spec.source.slot", e))?;
                s.clone()
            }
            None => default_name(namespace, name),
        };
        let publication = match &spec.source.publication {
            Some(p) => {
                check_replication_name(p).map_err(|e| invalid("spec.source.publication", e))?;
                p.clone()
            }
            None => default_name(namespace, name),
        };
        // What releases before 0.2 derived, for pipelines that checkpointed under them.
        let legacy_slot = spec
            .source
            .slot
            .is_none()
            .then(|| derive_name(&format!("philotes_{namespace}_{name}")));
        let legacy_publication = spec
            .source
            .publication
            .is_none()
            .then(|| derive_name(&format!("philotes_{name}")));
        let stream_timeout = interval(&spec.source.stream_timeout, crd::DEFAULT_STREAM_TIMEOUT)
            .map_err(|why| invalid("spec.source.streamTimeout", why))?;
        let buffer_schema = spec
            .buffer
            .schema
            .clone()
            .unwrap_or_else(|| crd::DEFAULT_BUFFER_SCHEMA.to_string());
        if buffer_schema.is_empty() || buffer_schema.len() > 63 || buffer_schema.starts_with("pg_")
        {
            return Err(invalid(
                "spec.buffer.schema",
                format!("`{buffer_schema}` is not a usable schema name (1 to 63 characters, not starting with pg_)"),
            ));
        }
        let positive = |field: &str, v: Option<u32>, default: u32| -> Result<usize> {
            match v.unwrap_or(default) {
                0 => Err(invalid(field, "must be at least 1 (got 0)".into())),
                n => Ok(n as usize),
            }
        };
        let batch_size = positive("spec.batchSize", spec.batch_size, crd::DEFAULT_BATCH_SIZE)?;
        let buffer_size = positive(
            "spec.bufferSize",
            spec.buffer_size,
            crd::DEFAULT_BUFFER_SIZE,
        )?;
        let flush_interval = interval(&spec.flush_interval, crd::DEFAULT_FLUSH_INTERVAL)
            .map_err(|why| invalid("spec.flushInterval", why))?;
        let status_interval =
            status_interval(spec).map_err(|why| invalid("spec.statusInterval", why))?;
        let snapshot_spec = spec.snapshot.clone().unwrap_or_default();
        let chunk_size = positive(
            "spec.snapshot.chunkSize",
            snapshot_spec.chunk_size,
            crd::DEFAULT_SNAPSHOT_CHUNK_SIZE,
        )?;
        let resync = match snapshot_spec.resync {
            None => None,
            Some(r) => {
                let mut listed = Vec::new();
                for (i, t) in r.tables.iter().enumerate() {
                    let field = format!("spec.snapshot.resync.tables[{i}]");
                    let table = TableName::parse(t).map_err(|e| invalid(&field, e))?;
                    if !tables.contains(&table) {
                        return Err(invalid(
                            &field,
                            format!("names {table}, which spec.source.tables does not list; only captured tables can be copied again"),
                        ));
                    }
                    listed.push(table);
                }
                if r.id.is_empty() {
                    return Err(invalid(
                        "spec.snapshot.resync.id",
                        "must not be empty".into(),
                    ));
                }
                Some((r.id, listed))
            }
        };
        let snapshot = SnapshotConfig {
            mode: snapshot_spec.mode.unwrap_or_default(),
            chunk_size,
            resync,
        };
        let source = conn_from_secret(
            namespace,
            &spec.source.connection_secret_ref,
            "spec.source.connectionSecretRef",
            secrets,
        )?;
        let buffer = conn_from_secret(
            namespace,
            &spec.buffer.connection_secret_ref,
            "spec.buffer.connectionSecretRef",
            secrets,
        )?;
        Ok(PipelineConfig {
            id: format!("{namespace}/{name}"),
            source,
            buffer,
            tables,
            filters,
            failover_slot: spec.source.failover_slot.unwrap_or(false),
            publication,
            slot,
            buffer_schema,
            batch_size,
            flush_interval,
            buffer_size,
            status_interval,
            stream_timeout,
            poison_events: spec.poison_events.unwrap_or_default(),
            snapshot,
            legacy_slot,
            legacy_publication,
        })
    }
}

#[cfg(test)]
impl PipelineConfig {
    /// A pipeline `ns/p` on slot `slot` and publication `pub`, for unit tests.
    pub fn example() -> PipelineConfig {
        let conn = ConnInfo::parse("postgres://u:pw@db:5432/shop", "test").expect("uri");
        PipelineConfig {
            id: "ns/p".into(),
            source: conn.clone(),
            buffer: conn,
            tables: vec![],
            filters: BTreeMap::new(),
            failover_slot: false,
            publication: "pub".into(),
            slot: "slot".into(),
            buffer_schema: "philotes".into(),
            batch_size: 1,
            flush_interval: Duration::from_secs(1),
            buffer_size: 1,
            status_interval: Duration::from_secs(1),
            stream_timeout: Duration::from_secs(60),
            poison_events: crd::PoisonEventPolicy::Fail,
            snapshot: SnapshotConfig::default(),
            legacy_slot: None,
            legacy_publication: None,
        }
    }
}

fn conn_from_secret(
    namespace: &str,
    r: &SecretKeyRef,
    field: &str,
    secrets: &dyn SecretSource,
) -> Result<ConnInfo> {
    let value = secrets
        .get(namespace, &r.name, r.key())
        .map_err(|e| match e {
            Error::Secret(m) => Error::Secret(format!("{field}: {m}")),
            other => other,
        })?;
    ConnInfo::parse(
        &value,
        &format!("{field}: secret {namespace}/{} key `{}`", r.name, r.key()),
    )
}

/// Slot and publication names: PostgreSQL allows only lower-case letters, digits and
/// underscores in slot names; publications are held to the same rule because
/// `publication_names` folds case and splits on commas.
fn check_replication_name(s: &str) -> std::result::Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!("`{s}` must be 1 to 63 characters long"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(format!(
            "`{s}` may contain only lower-case letters, digits and underscores"
        ));
    }
    Ok(())
}

/// The default slot and publication name of pipeline `namespace/name`:
/// `philotes_<namespace>_<name>` when both parts are plain (lower-case letters and digits, so
/// the `_` between them cannot be confused with anything in them), else the same with the
/// other characters replaced and a hash of `namespace/name` appended: `a-b/c` and `a/b-c`
/// both clean to `a_b_c`, and only the hash keeps them apart.
pub fn default_name(namespace: &str, name: &str) -> String {
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    };
    let raw = format!("philotes_{namespace}_{name}");
    if plain(namespace) && plain(name) {
        return derive_name(&raw);
    }
    let clean = derive_name(&raw);
    let hash = format!("{:08x}", fnv1a(&format!("{namespace}/{name}")));
    let keep = clean.len().min(63 - 1 - hash.len());
    format!("{}_{hash}", &clean[..keep])
}

/// FNV-1a: stable across releases (a derived name must not change between versions).
fn fnv1a(raw: &str) -> u32 {
    let mut h: u32 = 0x811c9dc5;
    for b in raw.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    h
}

/// A valid slot/publication name from arbitrary text: lower-cased, other characters replaced
/// by `_`, and cut to 63 bytes with a hash suffix when longer, so two long names stay distinct.
pub fn derive_name(raw: &str) -> String {
    let clean: String = raw
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.len() <= 63 {
        return clean;
    }
    format!("{}_{:08x}", &clean[..54], fnv1a(raw))
}

/// A duration field: `default` when unset, and between 10ms and 24h. The error says what is
/// wrong with the value.
fn interval(value: &Option<String>, default: &str) -> std::result::Result<Duration, String> {
    let d = duration::parse(value.as_deref().unwrap_or(default))?;
    if d < Duration::from_millis(10) || d > Duration::from_secs(24 * 3600) {
        return Err(format!(
            "must be between 10ms and 24h (got {})",
            duration::format(d)
        ));
    }
    Ok(d)
}

/// `spec.statusInterval`, or its default when unset.
pub fn status_interval(spec: &CdcPipelineSpec) -> std::result::Result<Duration, String> {
    interval(&spec.status_interval, crd::DEFAULT_STATUS_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<(String, String), HashMap<String, String>>);
    impl SecretSource for Map {
        fn get(&self, ns: &str, name: &str, key: &str) -> Result<String> {
            let s = self
                .0
                .get(&(ns.to_string(), name.to_string()))
                .ok_or_else(|| Error::Secret(format!("secret {ns}/{name} not found")))?;
            s.get(key)
                .cloned()
                .ok_or_else(|| Error::Secret(format!("secret {ns}/{name} has no key `{key}`")))
        }
    }

    fn secrets() -> Map {
        let mut m = HashMap::new();
        m.insert(
            ("shop".to_string(), "src".to_string()),
            HashMap::from([("uri".to_string(), "postgres://u:pw@h:5433/s".to_string())]),
        );
        m.insert(
            ("shop".to_string(), "buf".to_string()),
            HashMap::from([("dsn".to_string(), "postgres://u:pw@h/b".to_string())]),
        );
        Map(m)
    }

    fn spec(extra: &str) -> CdcPipelineSpec {
        serde_yaml::from_str(&format!(
            "source: {{connectionSecretRef: {{name: src}}, tables: [public.orders, Customers]}}\n\
             buffer: {{connectionSecretRef: {{name: buf, key: dsn}}}}\n{extra}"
        ))
        .unwrap()
    }

    fn with_tables(tables: &str) -> Result<PipelineConfig> {
        let spec: CdcPipelineSpec = serde_yaml::from_str(&format!(
            "source: {{connectionSecretRef: {{name: src}}, tables: {tables}}}\n\
             buffer: {{connectionSecretRef: {{name: buf, key: dsn}}}}\n"
        ))
        .unwrap();
        PipelineConfig::resolve("shop", "orders", &spec, &secrets())
    }

    #[test]
    fn table_entries_take_a_column_list_and_a_row_filter() {
        let c =
            with_tables(r#"[plain, {name: '"My T"', columns: [id, '"Name"'], where: "id > 1"}]"#)
                .unwrap();
        let t = TableName::parse(r#""My T""#).unwrap();
        let f = &c.filters[&t];
        assert_eq!(
            f.columns.as_deref(),
            Some(&["id".to_string(), "Name".to_string()][..])
        );
        assert_eq!(f.publication_clause(), r#" ("id", "Name") WHERE (id > 1)"#);
        assert!(!c.filters.contains_key(&TableName::parse("plain").unwrap()));
        for (tables, says) in [
            ("[{name: t, colums: [a]}]", "spec.source.tables[0] is not `schema.table` or {name, columns, where}: unknown field `colums`"),
            ("[t, 5]", "spec.source.tables[1] is not `schema.table` or {name, columns, where}: it is neither a name nor an object"),
            ("[{name: t, columns: []}]", "spec.source.tables[0].columns is empty"),
            ("[{name: t, columns: [a, A]}]", "spec.source.tables[0].columns[1] lists a twice"),
            ("[{name: t, columns: ['a b']}]", "spec.source.tables[0].columns[0] `a b` is not a column name"),
            ("[{name: t, where: ' '}]", "spec.source.tables[0].where is empty"),
        ] {
            let e = with_tables(tables).unwrap_err().to_string();
            assert!(e.contains(says), "{tables}: {e}");
        }
    }

    #[test]
    fn defaults_are_applied() {
        let c = PipelineConfig::resolve("shop", "orders", &spec(""), &secrets()).unwrap();
        assert_eq!(c.id, "shop/orders");
        assert_eq!(c.slot, "philotes_shop_orders");
        assert_eq!(c.publication, "philotes_shop_orders");
        assert_eq!(c.legacy_publication.as_deref(), Some("philotes_orders"));
        assert_eq!(c.stream_timeout, Duration::from_secs(60));
        assert_eq!(c.buffer_schema, "philotes");
        assert_eq!(c.batch_size, 10_000);
        assert_eq!(c.buffer_size, 10_000);
        assert_eq!(c.flush_interval, Duration::from_secs(5));
        assert_eq!(c.status_interval, Duration::from_secs(10));
        assert_eq!(c.tables[1].to_string(), "public.customers");
        assert_eq!(c.source.port, 5433);
        assert_eq!(c.buffer.dbname, "b");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("batchSize: 0", "spec.batchSize must be at least 1"),
            ("bufferSize: 0", "spec.bufferSize must be at least 1"),
            (
                "flushInterval: soon",
                "spec.flushInterval `soon` is not a duration",
            ),
            ("statusInterval: 1ns", "spec.statusInterval must be between"),
        ];
        for (extra, want) in cases {
            let err = PipelineConfig::resolve("shop", "orders", &spec(extra), &secrets())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{extra}: {err}");
            assert!(err.contains("CdcPipeline shop/orders"), "{err}");
        }
    }

    #[test]
    fn missing_secret_and_key_are_named() {
        let mut s = spec("");
        s.source.connection_secret_ref.name = "nope".into();
        let err = PipelineConfig::resolve("shop", "o", &s, &secrets())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.source.connectionSecretRef: secret shop/nope not found"),
            "{err}"
        );
        let mut s = spec("");
        s.buffer.connection_secret_ref.key = Some("uri".into());
        let err = PipelineConfig::resolve("shop", "o", &s, &secrets())
            .unwrap_err()
            .to_string();
        assert!(err.contains("secret shop/buf has no key `uri`"), "{err}");
    }

    #[test]
    fn table_names_parse_like_sql() {
        let t = TableName::parse(r#""My Schema"."Order ""Items""""#).unwrap();
        assert_eq!(t.schema, "My Schema");
        assert_eq!(t.name, "Order \"Items\"");
        assert_eq!(t.quoted(), r#""My Schema"."Order ""Items""""#);
        assert_eq!(
            TableName::parse("Orders").unwrap().to_string(),
            "public.orders"
        );
        for bad in ["", "a.b.c", "a..b", "\"open", "two words"] {
            assert!(TableName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn derived_names_are_valid_and_distinct() {
        let a = derive_name(&format!("philotes_{}_x", "n".repeat(80)));
        let b = derive_name(&format!("philotes_{}_y", "n".repeat(80)));
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
        check_replication_name(&a).unwrap();
        assert_eq!(
            derive_name("philotes_My-NS_orders.v2"),
            "philotes_my_ns_orders_v2"
        );
        // Names that clean to the same text get distinct defaults; plain ones stay as they were.
        let (x, y) = (default_name("a-b", "c"), default_name("a", "b-c"));
        assert_ne!(x, y);
        assert!(x.starts_with("philotes_a_b_c_"), "{x}");
        check_replication_name(&x).unwrap();
        assert_eq!(default_name("shop", "orders"), "philotes_shop_orders");
        let long = default_name(&"n".repeat(63), &"m-".repeat(120));
        assert!(long.len() <= 63, "{long}");
        check_replication_name(&long).unwrap();
        assert!(check_replication_name("Bad-Name").is_err());
    }

    #[test]
    fn secret_values_take_string_data_over_data_and_refuse_binary() {
        use k8s_openapi::ByteString;
        let secret = Secret {
            data: Some(BTreeMap::from([
                ("uri".to_string(), ByteString(b"postgres://old".to_vec())),
                ("cert".to_string(), ByteString(vec![0xff, 0xfe])),
            ])),
            string_data: Some(BTreeMap::from([(
                "uri".to_string(),
                "postgres://new".to_string(),
            )])),
            ..Secret::default()
        };
        let values = secret_values(secret);
        assert_eq!(
            secret_value(&values, "ns", "s", "uri").unwrap(),
            "postgres://new"
        );
        let binary = secret_value(&values, "ns", "s", "cert")
            .unwrap_err()
            .to_string();
        assert!(
            binary.contains("secret ns/s key `cert` is not UTF-8 text"),
            "{binary}"
        );
        let missing = secret_value(&values, "ns", "s", "url")
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("has no key `url` (it has: cert, uri)"),
            "{missing}"
        );
    }
}
