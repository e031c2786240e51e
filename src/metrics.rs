//! Prometheus metrics of the operator and its pipelines.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::pipeline::buffer::Count;
use crate::pipeline::BatchObserver;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub pipeline: String,
    pub table: String,
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    pub pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    pub pipeline: String,
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub pipeline: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub events: Family<EventLabels, Counter>,
    pub lag_bytes: Family<PipelineLabels, Gauge>,
    pub checkpoint_lsn: Family<PipelineLabels, Gauge>,
    pub batch_write_seconds: Family<PipelineLabels, Histogram>,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// 1 for a pipeline that is not Ready, labelled with the reason (the same as its
    /// condition's and Event's); absent while it is Ready.
    pub not_ready: Family<ReasonLabels, Gauge>,
    /// The reason each not-Ready pipeline is reported under, to drop its series later.
    not_ready_reason: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// `safe_wal_size` of the pipeline's slot: WAL it can still take before
    /// `max_slot_wal_keep_size` invalidates it.
    pub slot_safe_wal_size_bytes: Family<PipelineLabels, Gauge>,
    /// Seconds since no session streamed from the slot (PostgreSQL 17+); 0 while active.
    pub slot_inactive_seconds: Family<PipelineLabels, Gauge>,
    /// 1 for a slot the source invalidated, labelled with its `invalidation_reason`.
    pub slot_invalidated: Family<ReasonLabels, Gauge>,
    invalidated_reason: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Rows a table's snapshot copied so far.
    pub snapshot_rows_copied: Family<TableLabels, Gauge>,
    /// 1 while a table's existing rows are being copied, else 0.
    pub snapshot_copying: Family<TableLabels, Gauge>,
    snapshot_tables: std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
    /// The `events` series of each pipeline, so they go with it.
    event_series: std::sync::Mutex<std::collections::HashMap<String, Vec<EventLabels>>>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("philotes");
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "events",
            "Change events written to the buffer",
            events.clone(),
        );
        let lag_bytes = Family::<PipelineLabels, Gauge>::default();
        registry.register(
            "lag_bytes",
            "Bytes of WAL between the source's position and the slot's confirmed position",
            lag_bytes.clone(),
        );
        let checkpoint_lsn = Family::<PipelineLabels, Gauge>::default();
        registry.register(
            "checkpoint_lsn",
            "Checkpointed LSN, as a number",
            checkpoint_lsn.clone(),
        );
        let batch_write_seconds = Family::<PipelineLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "batch_write_seconds",
            "Time to commit one batch and its checkpoint in the buffer, from the commit request (its rows stream in as they are decoded)",
            batch_write_seconds.clone(),
        );
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciliations by result",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciliation errors by reason",
            reconcile_errors.clone(),
        );
        let not_ready = Family::<ReasonLabels, Gauge>::default();
        registry.register(
            "pipeline_not_ready",
            "1 while a pipeline is not Ready, labelled with the reason (SlotLost, SourceChanged, PoisonEvent, StreamTimeout, ...)",
            not_ready.clone(),
        );
        let slot_safe_wal_size_bytes = Family::<PipelineLabels, Gauge>::default();
        registry.register(
            "slot_safe_wal_size_bytes",
            "WAL the slot can still take before max_slot_wal_keep_size invalidates it (safe_wal_size)",
            slot_safe_wal_size_bytes.clone(),
        );
        let slot_inactive_seconds = Family::<PipelineLabels, Gauge>::default();
        registry.register(
            "slot_inactive_seconds",
            "Seconds since no session streamed from the slot (inactive_since, PostgreSQL 17+)",
            slot_inactive_seconds.clone(),
        );
        let slot_invalidated = Family::<ReasonLabels, Gauge>::default();
        registry.register(
            "slot_invalidated",
            "1 for a slot the source invalidated, labelled with its invalidation_reason (PostgreSQL 17+)",
            slot_invalidated.clone(),
        );
        let snapshot_rows_copied = Family::<TableLabels, Gauge>::default();
        registry.register(
            "snapshot_rows_copied",
            "Rows of a table its snapshot copied so far (README: Snapshots)",
            snapshot_rows_copied.clone(),
        );
        let snapshot_copying = Family::<TableLabels, Gauge>::default();
        registry.register(
            "snapshot_copying",
            "1 while a table's existing rows are being copied, else 0",
            snapshot_copying.clone(),
        );
        Arc::new(Metrics {
            registry,
            snapshot_rows_copied,
            snapshot_copying,
            snapshot_tables: Default::default(),
            event_series: Default::default(),
            slot_safe_wal_size_bytes,
            slot_inactive_seconds,
            slot_invalidated,
            invalidated_reason: Default::default(),
            not_ready,
            not_ready_reason: Default::default(),
            events,
            lag_bytes,
            checkpoint_lsn,
            batch_write_seconds,
            reconciles,
            reconcile_errors,
        })
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn forget_pipeline(&self, pipeline: &str) {
        let labels = PipelineLabels {
            pipeline: pipeline.to_string(),
        };
        self.lag_bytes.remove(&labels);
        self.checkpoint_lsn.remove(&labels);
        self.slot_safe_wal_size_bytes.remove(&labels);
        self.slot_inactive_seconds.remove(&labels);
        self.set_not_ready(pipeline, None);
        self.set_invalidated(pipeline, None);
        self.set_snapshots(pipeline, &[]);
        self.batch_write_seconds.remove(&labels);
        let series = self
            .event_series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pipeline)
            .unwrap_or_default();
        for s in series {
            self.events.remove(&s);
        }
    }

    /// Records each table's snapshot `(table, copying, rows copied)`, dropping the series of
    /// tables no longer listed.
    pub fn set_snapshots(&self, pipeline: &str, tables: &[(String, bool, i64)]) {
        let mut known = self
            .snapshot_tables
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let labels = |table: &str| TableLabels {
            pipeline: pipeline.to_string(),
            table: table.to_string(),
        };
        for old in known.remove(pipeline).unwrap_or_default() {
            if !tables.iter().any(|(t, ..)| *t == old) {
                self.snapshot_rows_copied.remove(&labels(&old));
                self.snapshot_copying.remove(&labels(&old));
            }
        }
        for (table, copying, rows) in tables {
            self.snapshot_rows_copied
                .get_or_create(&labels(table))
                .set(*rows);
            self.snapshot_copying
                .get_or_create(&labels(table))
                .set(i64::from(*copying));
        }
        if !tables.is_empty() {
            known.insert(
                pipeline.to_string(),
                tables.iter().map(|(t, ..)| t.clone()).collect(),
            );
        }
    }

    /// Records why a pipeline is not Ready (`None`: it is), dropping the series of any
    /// earlier reason.
    pub fn set_not_ready(&self, pipeline: &str, reason: Option<&str>) {
        set_reason(&self.not_ready, &self.not_ready_reason, pipeline, reason);
    }

    /// Records why the source invalidated the pipeline's slot (`None`: it did not).
    pub fn set_invalidated(&self, pipeline: &str, reason: Option<&str>) {
        set_reason(
            &self.slot_invalidated,
            &self.invalidated_reason,
            pipeline,
            reason,
        );
    }
}

/// Sets the one series of `family` for `pipeline` to `reason` (1), dropping the series of an
/// earlier reason; `None` drops it.
fn set_reason(
    family: &Family<ReasonLabels, Gauge>,
    reasons: &std::sync::Mutex<std::collections::HashMap<String, String>>,
    pipeline: &str,
    reason: Option<&str>,
) {
    let mut current = reasons
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(old) = current.remove(pipeline) {
        family.remove(&ReasonLabels {
            pipeline: pipeline.to_string(),
            reason: old,
        });
    }
    if let Some(reason) = reason {
        current.insert(pipeline.to_string(), reason.to_string());
        family
            .get_or_create(&ReasonLabels {
                pipeline: pipeline.to_string(),
                reason: reason.to_string(),
            })
            .set(1);
    }
}

impl BatchObserver for Metrics {
    fn batch_written(&self, pipeline: &str, counts: &[Count], elapsed: Duration) {
        self.batch_write_seconds
            .get_or_create(&PipelineLabels {
                pipeline: pipeline.to_string(),
            })
            .observe(elapsed.as_secs_f64());
        for c in counts {
            let labels = EventLabels {
                pipeline: pipeline.to_string(),
                table: format!("{}.{}", c.relation.schema, c.relation.name),
                operation: c.operation.as_str().to_string(),
            };
            if self.events.get(&labels).is_none() {
                self.event_series
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(pipeline.to_string())
                    .or_default()
                    .push(labels.clone());
            }
            self.events.get_or_create(&labels).inc_by(c.events);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::buffer::Count;
    use crate::pipeline::decode::{Operation, Relation};

    #[test]
    fn a_forgotten_pipeline_leaves_no_series() {
        let m = Metrics::new();
        let rel = Arc::new(Relation {
            id: 1,
            schema: "public".into(),
            name: "orders".into(),
            replica_identity: 'd',
            columns: Vec::new(),
        });
        let counts = [Count {
            relation: rel,
            operation: Operation::Insert,
            events: 3,
        }];
        m.batch_written("shop/gone", &counts, Duration::from_millis(2));
        m.batch_written("shop/gone", &counts, Duration::from_millis(2));
        m.batch_written("shop/kept", &counts, Duration::from_millis(2));
        let before = m.encode();
        assert!(
            before.contains(r#"pipeline="shop/gone",table="public.orders",operation="INSERT"} 6"#),
            "{before}"
        );
        m.forget_pipeline("shop/gone");
        let after = m.encode();
        assert!(!after.contains("shop/gone"), "{after}");
        assert!(
            after.contains(r#"pipeline="shop/kept",table="public.orders",operation="INSERT"} 3"#),
            "{after}"
        );
    }
}
