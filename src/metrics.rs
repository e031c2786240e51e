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
        Arc::new(Metrics {
            registry,
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
        self.set_not_ready(pipeline, None);
    }

    /// Records why a pipeline is not Ready (`None`: it is), dropping the series of any
    /// earlier reason.
    pub fn set_not_ready(&self, pipeline: &str, reason: Option<&str>) {
        let mut current = self
            .not_ready_reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(old) = current.remove(pipeline) {
            self.not_ready.remove(&ReasonLabels {
                pipeline: pipeline.to_string(),
                reason: old,
            });
        }
        if let Some(reason) = reason {
            current.insert(pipeline.to_string(), reason.to_string());
        }
        if let Some(reason) = reason {
            self.not_ready
                .get_or_create(&ReasonLabels {
                    pipeline: pipeline.to_string(),
                    reason: reason.to_string(),
                })
                .set(1);
        }
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
            self.events
                .get_or_create(&EventLabels {
                    pipeline: pipeline.to_string(),
                    table: format!("{}.{}", c.relation.schema, c.relation.name),
                    operation: c.operation.as_str().to_string(),
                })
                .inc_by(c.events);
        }
    }
}
