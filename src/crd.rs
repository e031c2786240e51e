//! The `CdcPipeline` custom resource: spec, status and defaults. No I/O lives here.
//!
//! The same types are read by the operator (from the API server) and by `philotes run -f`
//! (from a manifest file), so a pipeline behaves the same wherever it is declared.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Philotes resource.
pub const GROUP: &str = "philotes.io";
/// API version of `CdcPipeline`.
pub const VERSION: &str = "v1alpha1";

pub const DEFAULT_BATCH_SIZE: u32 = 10_000;
pub const DEFAULT_BUFFER_SIZE: u32 = 10_000;
pub const DEFAULT_FLUSH_INTERVAL: &str = "5s";
pub const DEFAULT_STATUS_INTERVAL: &str = "10s";
pub const DEFAULT_STREAM_TIMEOUT: &str = "60s";
pub const DEFAULT_BUFFER_SCHEMA: &str = "philotes";
pub const DEFAULT_SECRET_KEY: &str = "uri";
pub const DEFAULT_SNAPSHOT_CHUNK_SIZE: u32 = 10_000;

/// Pattern every duration field must match: the Kubernetes/Go form such as `250ms`, `5s`, `1m30s`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// A change-data-capture pipeline: streams row changes of the listed tables from a source
/// PostgreSQL into an ordered event log in a buffer PostgreSQL.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "philotes.io",
    version = "v1alpha1",
    kind = "CdcPipeline",
    plural = "cdcpipelines",
    shortname = "cdcp",
    namespaced,
    status = "CdcPipelineStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Lag","type":"integer","jsonPath":".status.lagBytes","description":"Bytes of WAL the source holds that are not yet checkpointed"}"#,
    printcolumn = r#"{"name":"Events","type":"integer","jsonPath":".status.eventsTotal"}"#,
    printcolumn = r#"{"name":"Slot","type":"string","jsonPath":".status.slotName","priority":1}"#,
    printcolumn = r#"{"name":"Owner","type":"string","jsonPath":".status.owner","priority":1,"description":"The operator replica that runs it"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CdcPipelineSpec {
    /// The PostgreSQL database whose changes are captured.
    pub source: SourceSpec,
    /// The PostgreSQL database the change events are written to.
    pub buffer: BufferSpec,
    /// Maximum number of events written to the buffer in one transaction. Rows stream to the
    /// buffer as they arrive, and a transaction commits as soon as nothing more has arrived
    /// and the previous one committed (group commit: batches grow under load by themselves);
    /// this bounds them. Default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub batch_size: Option<u32>,
    /// Maximum time a received event waits before it is written to the buffer, as a
    /// Kubernetes duration (`250ms`, `5s`, `1m30s`). An upper bound: changes are usually
    /// written within milliseconds (README: Freshness). Default `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub flush_interval: Option<String>,
    /// Maximum number of change messages queued between the replication stream and the
    /// loop. At most 16 whatever this says, so that memory is bounded by a few times the
    /// largest row (README: Guarantees); kept for compatibility. Default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub buffer_size: Option<u32>,
    /// How often lag and health are refreshed, as a Kubernetes duration. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub status_interval: Option<String>,
    /// Stop streaming, keeping the slot (the source retains WAL meanwhile). Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// What happens to a change that cannot be stored as an event: `Fail` (default) stops the
    /// pipeline after writing everything before it; `DeadLetter` sets it aside in
    /// `cdc_dead_letters` and goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poison_events: Option<PoisonEventPolicy>,
    /// What deleting the resource does on the source: `Retain` (default) leaves the slot and
    /// publication; `Delete` drops the slot, a publication Philotes created, and the
    /// pipeline's checkpoint (its events stay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_deletion_policy: Option<SlotDeletionPolicy>,
    /// Copying the rows the tables already hold (README: Snapshots). By default a new
    /// pipeline copies every listed table, and a table added later is copied when it is
    /// added, while the other tables keep streaming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotSpec>,
}

/// How existing rows are copied.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotSpec {
    /// `Initial` (default): a new pipeline, and a table added to `spec.source.tables`, is
    /// copied first (as `SNAPSHOT` events) while changes keep streaming. `Never`: only
    /// changes made after the slot exists are captured. A pipeline that already has a
    /// checkpoint is not copied again when this changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<SnapshotMode>,
    /// Rows read from the source per chunk, at most (each chunk is one short read-only
    /// transaction on the source; memory is bounded by a few chunks of at most 8 MB each).
    /// Default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub chunk_size: Option<u32>,
    /// Copy these tables again, while the others stream. Carried out once per `id`: change
    /// the id to ask again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncSpec>,
}

/// A request to copy some tables again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResyncSpec {
    /// Names this request; a table is copied once per id.
    #[schemars(length(min = 1))]
    pub id: String,
    /// Tables to copy again, as in `spec.source.tables` (names only); each must be listed
    /// there.
    #[schemars(length(min = 1))]
    pub tables: Vec<String>,
}

/// Whether existing rows are copied. `Initial` (default): a new pipeline, and a table added
/// to `spec.source.tables`, is copied first (as `SNAPSHOT` events) while changes keep
/// streaming. `Never`: only changes made after the slot exists are captured (copies not done
/// yet are dropped). A pipeline that already has a checkpoint is not copied again when this
/// changes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SnapshotMode {
    /// A new pipeline, and a table added later, is copied first.
    #[default]
    Initial,
    /// Only changes made after the slot exists are captured.
    Never,
}

/// What happens to a change the buffer cannot store as an event (a text value that is not
/// UTF-8, from a `SQL_ASCII` source).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PoisonEventPolicy {
    /// Write and checkpoint every change before it, then stop with `Failed` (reason
    /// `PoisonEvent`) naming the table, column and LSN. Nothing is skipped.
    #[default]
    Fail,
    /// Set it aside in `cdc_dead_letters` (the message as received, with the reason), in the
    /// same buffer transaction as the events around it, and go on.
    DeadLetter,
}

/// What deleting a `CdcPipeline` does to its replication slot and publication.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SlotDeletionPolicy {
    /// Leave slot and publication in place (the source keeps retaining WAL for the slot).
    #[default]
    Retain,
    /// Drop the slot, and the publication if Philotes created it.
    Delete,
}

/// Where changes come from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    /// Secret holding the source's `postgres://` connection URI. The user needs the
    /// REPLICATION attribute (or superuser) and, to create the publication, ownership of
    /// the tables.
    pub connection_secret_ref: SecretKeyRef,
    /// Tables to capture, as `schema.table` (or `table` for `public`). Quote names that
    /// need it the SQL way: `"My Schema"."Order Items"`. An entry may also be
    /// `{name: ..., columns: [...], where: "..."}` to capture only those columns and the rows
    /// matching the condition (a publication column list and row filter, PostgreSQL 15+).
    #[schemars(length(min = 1))]
    pub tables: Vec<TableEntry>,
    /// Publication to stream from. Created `FOR TABLE` the listed tables if missing;
    /// adopted if it exists and publishes exactly those tables. Default: derived from
    /// namespace and name like the slot. Cannot be changed once the pipeline has a
    /// checkpoint; a value set explicitly cannot be changed at all (the API server refuses
    /// it, Kubernetes 1.25+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.source.publication cannot be changed: a pipeline's checkpoint belongs to its slot and publication. To use another, create a new CdcPipeline (README: Moving a pipeline)"))]
    pub publication: Option<String>,
    /// Logical replication slot to stream from. Created with the `pgoutput` plugin if
    /// missing; adopted if it exists. Default: derived from namespace and name
    /// (`philotes_<namespace>_<name>`, with a hash of both appended when either holds a
    /// character a slot name cannot, so distinct pipelines never share a slot). Cannot be
    /// changed once the pipeline has a checkpoint; a value set explicitly cannot be changed
    /// at all (the API server refuses it, Kubernetes 1.25+). Two pipelines naming the same
    /// slot on one source: the one created later is refused (`SlotConflict`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.source.slot cannot be changed: a pipeline's checkpoint belongs to its slot and publication. To use another, create a new CdcPipeline (README: Moving a pipeline)"))]
    pub slot: Option<String>,
    /// How long the replication stream may stay silent (no data and no keepalive from the
    /// source) before the connection is considered dead and reopened, as a Kubernetes
    /// duration. It also becomes `wal_sender_timeout` of the stream's own walsender, which
    /// then sends a keepalive after half of it and gives the slot up after all of it when the
    /// connection died. Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub stream_timeout: Option<String>,
    /// Create the slot with `failover = true` (PostgreSQL 17+), so a standby with
    /// `sync_replication_slots = on` keeps a synchronised copy and the pipeline continues
    /// exactly once after a failover to it. Default false; refused on older sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_slot: Option<bool>,
}

/// One entry of `spec.source.tables`: a name, or a name with a column list and a row
/// filter. The API server keeps either shape (a schema cannot say "a string or an object"
/// structurally); Philotes checks the entry and names it in its error.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum TableEntry {
    Name(String),
    Filtered(FilteredTable),
    /// Anything else, kept so the pipeline can report it (a resource the controller could
    /// not read would be skipped without a word).
    Invalid(serde_json::Value),
}

/// A table captured in part.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilteredTable {
    /// The table, as in the plain form.
    pub name: String,
    /// Columns to capture (the replica identity's among them); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// A condition on the row (SQL, as in `WHERE ...`); every row when absent. Its columns
    /// must be in the replica identity for UPDATEs and DELETEs to be published.
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub where_: Option<String>,
}

impl From<&str> for TableEntry {
    fn from(name: &str) -> TableEntry {
        TableEntry::Name(name.to_string())
    }
}

impl JsonSchema for TableEntry {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TableEntry".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "`schema.table`, or {name, columns, where}",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

/// Where change events go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BufferSpec {
    /// Secret holding the buffer's `postgres://` connection URI.
    pub connection_secret_ref: SecretKeyRef,
    /// Schema the event tables live in; created if missing. Default `philotes`. Cannot be
    /// changed: the checkpoint and the events are in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.buffer.schema cannot be changed: the pipeline's checkpoint and events are in it. To use another, create a new CdcPipeline (README: Moving a pipeline)"))]
    pub schema: Option<String>,
}

/// A key of a Secret in the pipeline's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key within the Secret whose value is the connection URI. Default `uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl SecretKeyRef {
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or(DEFAULT_SECRET_KEY)
    }
}

/// Observed state of a pipeline.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CdcPipelineStatus {
    /// Pending, Provisioning, Running, Degraded, Suspended or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replication slot in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_name: Option<String>,
    /// Publication in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publication_name: Option<String>,
    /// Highest WAL position received from the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_received_lsn: Option<String>,
    /// Position durable in the buffer and confirmed to the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_flush_lsn: Option<String>,
    /// The source's current WAL write position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_wal_lsn: Option<String>,
    /// Bytes of WAL between the source's current position and the slot's confirmed position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<i64>,
    /// `wal_status` of the slot (`reserved`, `extended`, `unreserved`, `lost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_status: Option<String>,
    /// Why the source invalidated the slot (`wal_removed`, `idle_timeout`, …; PostgreSQL 17+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalidation_reason: Option<String>,
    /// Since when no session streams from the slot (PostgreSQL 17+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactive_since: Option<String>,
    /// Bytes of WAL that can still be written before the slot is in danger of being lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safe_wal_size_bytes: Option<i64>,
    /// Change events written to the buffer by this pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_total: Option<i64>,
    /// When the checkpoint last advanced (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint_time: Option<String>,
    /// What the pipeline's checkpoint belongs to, recorded once it has one: a spec or Secret
    /// that points elsewhere is refused (condition `SpecAccepted`), also while the pipeline
    /// does not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_of: Option<CheckpointOf>,
    /// The operator replica that runs the pipeline, when replicas share the pipelines: written
    /// by the new owner before it starts it and cleared by the old one once it stopped it
    /// (README: Sharding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The value of the `philotes.io/recover` annotation last acted on, so one request is
    /// carried out once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recover_request: Option<String>,
    /// Snapshots of existing rows, per table (README: Snapshots).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<TableSnapshotStatus>,
    /// Latest observations of the pipeline's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One table's snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TableSnapshotStatus {
    /// `schema.table`.
    pub table: String,
    /// `Pending`, `Copying`, `Done`, or `Skipped` (captured without a snapshot).
    pub phase: String,
    /// Rows copied so far.
    pub rows_copied: i64,
    /// The source's estimate of the table's rows (`pg_class.reltuples`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_estimate: Option<i64>,
    /// What asked for it (`initial`, `added`, `changed`, `resync:<id>`, `gap:<lsn>`, `cli:<time>`).
    pub request: String,
}

/// The source, buffer and names a checkpoint belongs to (no credentials).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointOf {
    /// The source as `host:port/database`.
    pub source: String,
    /// The buffer as `host:port/database`.
    pub buffer: String,
    /// `spec.buffer.schema`.
    pub buffer_schema: String,
    /// The replication slot.
    pub slot: String,
    /// The publication.
    pub publication: String,
}

/// One observation of the pipeline's state, in the shape of `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Short CamelCase reason for the last transition.
    pub reason: String,
    /// Human-readable details.
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
    /// The `metadata.generation` the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    /// The API server keeps an explicitly named slot, publication and buffer schema as they
    /// are (CEL transition rules, Kubernetes 1.25+; older servers ignore them and the
    /// controller's guard answers instead).
    #[test]
    fn names_a_checkpoint_belongs_to_are_immutable_rules() {
        let crd = serde_json::to_value(super::CdcPipeline::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"];
        for (path, field) in [
            ("spec.source.slot", &spec["source"]["properties"]["slot"]),
            (
                "spec.source.publication",
                &spec["source"]["properties"]["publication"],
            ),
            (
                "spec.buffer.schema",
                &spec["buffer"]["properties"]["schema"],
            ),
        ] {
            let rules = field["x-kubernetes-validations"]
                .as_array()
                .unwrap_or_else(|| panic!("{path} has no rules: {field}"));
            assert_eq!(rules.len(), 1, "{path}: {rules:?}");
            assert_eq!(rules[0]["rule"], "self == oldSelf", "{path}");
            let message = rules[0]["message"].as_str().unwrap();
            assert!(
                message.starts_with(&format!("{path} cannot be changed"))
                    && message.contains("Moving a pipeline"),
                "{path}: {message}"
            );
        }
        // Nothing else is frozen: a Secret may be renamed, tables added, settings tuned.
        let all = crd.to_string();
        assert_eq!(all.matches("x-kubernetes-validations").count(), 3, "{all}");
    }
}
