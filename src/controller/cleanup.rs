//! Deletion: stop the task (flushed and checkpointed), then apply `slotDeletionPolicy`, and
//! only then let the finalizer go. When the source cannot be reached the resource stays, with
//! a condition and an Event that say why and how to let it go anyway.

use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};

use crate::crd::{CdcPipeline, CdcPipelineStatus};
use crate::pipeline::{lifecycle, source, PipelineConfig};

use super::refs::Secrets;
use super::status::{now, ready_condition};
use super::{deletes_slot, key, publish_status, Context, ReconcileError, SKIP_CLEANUP};

pub async fn cleanup(p: &CdcPipeline, ctx: &Context) -> Result<Action, ReconcileError> {
    let key = key(p);
    ctx.supervisor.stop(&key).await;
    ctx.written.forget(&p.uid().unwrap_or_default());
    ctx.secrets.retain_referenced(
        ctx.pipelines
            .state()
            .iter()
            .map(|o| &**o)
            .filter(|o| super::key(o) != key),
    );
    if !deletes_slot(p) {
        tracing::info!(pipeline = %key, "deleted; slot and publication retained (slotDeletionPolicy Retain)");
        return Ok(Action::await_change());
    }
    if p.annotations().get(SKIP_CLEANUP).map(String::as_str) == Some("true") {
        note(ctx, p, EventType::Warning, "CleanupSkipped",
            format!("{SKIP_CLEANUP}=true: the slot and publication were left on the source; drop them by hand")).await;
        return Ok(Action::await_change());
    }
    match drop_on_source(p, ctx).await {
        Ok(dropped) => {
            tracing::info!(pipeline = %key, slot = dropped.slot, publication = dropped.publication, "deleted; dropped on the source");
            Ok(Action::await_change())
        }
        Err(message) => {
            let message = format!(
                "cannot apply slotDeletionPolicy Delete: {message}. Deletion waits and retries; to delete without \
                 touching the source, annotate the resource {SKIP_CLEANUP}=true"
            );
            let mut status = p.status.clone().unwrap_or_default();
            set_blocked(&mut status, &message, p.meta().generation);
            if super::status::to_write(&status, p.status.as_ref(), None) {
                publish_status(ctx, p, p.status.as_ref(), &status).await?;
            }
            Err(ReconcileError::Cleanup(message))
        }
    }
}

async fn drop_on_source(p: &CdcPipeline, ctx: &Context) -> Result<source::Dropped, String> {
    let ns = p.namespace().unwrap_or_default();
    let secrets = Secrets::fetch(&ctx.client, &ctx.secrets, p, &ns)
        .await
        .map_err(|e| e.to_string())?;
    let cfg = PipelineConfig::resolve(&ns, &p.name_any(), &p.spec, &secrets)
        .map_err(|e| e.to_string())?;
    lifecycle::forget(&cfg).await.map_err(|e| e.to_string())
}

fn set_blocked(status: &mut CdcPipelineStatus, message: &str, generation: Option<i64>) {
    let condition = ready_condition(
        Some(status),
        false,
        "CleanupBlocked".into(),
        message.to_string(),
        generation,
        &now(),
    );
    status.phase = Some("Failed".into());
    status.conditions = vec![condition];
}

async fn note(ctx: &Context, p: &CdcPipeline, type_: EventType, reason: &str, message: String) {
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(message),
        action: "Delete".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &p.object_ref(&())).await {
        tracing::warn!(pipeline = %key(p), error = %e, "cannot publish event");
    }
}
