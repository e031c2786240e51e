//! The Kubernetes side: watch `CdcPipeline`s (and the Secrets they reference) and reconcile
//! each as a short chain of steps: read refs → validate → start/stop the pipeline task →
//! status. The data loop itself runs in tasks owned by the [`supervisor`].

pub mod cleanup;
pub mod members;
pub mod refs;
pub mod status;
pub mod supervisor;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, PredicateConfig, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use thiserror::Error;

use crate::crd::{CdcPipeline, CdcPipelineStatus, SlotDeletionPolicy};
use crate::metrics::{ErrorLabels, Metrics, PipelineLabels, ReconcileLabels};
use crate::pipeline::{self, config, PipelineConfig};

use self::refs::{SecretCache, SecretLabel, Secrets};
use self::status::{Inputs, Observed};
use self::supervisor::Supervisor;
use crate::http::Heartbeat;

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "philotes";
/// Finalizer that makes deletion apply `slotDeletionPolicy`.
pub const FINALIZER: &str = "philotes.io/cleanup";
/// Annotation that lets a resource be deleted without touching the source (when the source
/// is gone for good and cleanup cannot succeed).
pub const SKIP_CLEANUP: &str = "philotes.io/skip-cleanup";
/// Annotation that acknowledges the gap a pipeline stopped at (`SlotLost`, `SourceChanged`)
/// and continues on a new slot, like `philotes recover`. Its value names the request: a new
/// value is a new request, the one carried out is kept in `status.recoverRequest`.
pub const RECOVER: &str = "philotes.io/recover";

#[derive(Debug, Error)]
pub enum ReconcileError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("writing the status: {0}")]
    Status(kube::Error),
    #[error("{0}")]
    Cleanup(String),
}

impl ReconcileError {
    pub fn reason(&self) -> &'static str {
        match self {
            ReconcileError::Kube(_) => "KubeApiError",
            ReconcileError::Status(_) => "StatusWriteFailed",
            ReconcileError::Cleanup(_) => "CleanupFailed",
        }
    }
}

pub struct Context {
    pub client: Client,
    pub supervisor: Arc<Supervisor>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Every `CdcPipeline` the controller watches, as last seen.
    pub pipelines: Store<CdcPipeline>,
    /// Told of every reconcile, for `/healthz`.
    pub heartbeat: Arc<Heartbeat>,
    /// The referenced Secrets' data, read only when their metadata changed.
    pub secrets: SecretCache,
    /// This replica's share of the pipelines, when replicas share them.
    pub shard: Option<Shard>,
    /// The status this replica last wrote, per pipeline.
    pub written: status::PerPipeline<CdcPipelineStatus>,
    /// The pipelines this replica wrote itself into `status.owner` of, and has not let go of
    /// since: named here by the watch's copy, such a pipeline is this replica's even while
    /// nothing runs (suspended, an unusable spec), with no need to claim it again.
    pub claimed: status::PerPipeline<()>,
}

/// This replica among the operator's replicas (see [`members`]).
#[derive(Clone, Debug)]
pub struct Shard {
    pub identity: String,
    pub members: tokio::sync::watch::Receiver<members::Membership>,
}

/// Options of `philotes controller`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Watch only this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Use only Secrets carrying this label.
    pub secret_label: Option<SecretLabel>,
    /// Run only this replica's share of the pipelines; `None`: all of them.
    pub shard: Option<Shard>,
}

/// Runs the controller until `shutdown` resolves, then stops every pipeline (flushed and
/// checkpointed).
pub async fn run(
    client: Client,
    opts: Options,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    heartbeat: Arc<Heartbeat>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    // Secrets' metadata only: their data is never listed or watched.
    let (pipelines, secrets): (Api<CdcPipeline>, Api<PartialObjectMeta<Secret>>) =
        match &opts.namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
    let supervisor = Supervisor::new(metrics.clone());
    let reporter = Reporter {
        controller: "philotes".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    // Reconciles come from what a user changes (spec, annotations, finalizers, deletion),
    // from the Secrets watch and from each pipeline's requeue every statusInterval, not from
    // the controller's own status writes: the store sees every change, the controller only
    // those that move `user_visible_change`.
    let (store, writer) = reflector::store();
    let changes = watcher(pipelines, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(user_change, PredicateConfig::default());
    let controller = Controller::for_stream(changes, store.clone());
    // Secrets: metadata only (their data is read when a referenced one changed), and with
    // --secret-label only those carrying the label.
    let secret_config = match &opts.secret_label {
        Some(label) => watcher::Config::default().labels(&label.selector()),
        None => watcher::Config::default(),
    };
    let (secret_meta, secret_writer) = reflector::store();
    let secret_changes = watcher(secrets, secret_config)
        .default_backoff()
        .modify(|m| m.managed_fields_mut().clear())
        .reflect(secret_writer)
        .touched_objects();
    let ctx = Arc::new(Context {
        client: client.clone(),
        supervisor: supervisor.clone(),
        metrics,
        recorder: Recorder::new(client, reporter),
        pipelines: store.clone(),
        heartbeat,
        secrets: SecretCache::new(secret_meta, opts.secret_label.clone()),
        shard: opts.shard.clone(),
        written: status::PerPipeline::default(),
        claimed: status::PerPipeline::default(),
    });
    ready.store(true, Ordering::Relaxed);
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    // The live replicas changed: every pipeline's owner is computed again.
    let replicas_changed = match &opts.shard {
        Some(shard) => futures_util::stream::unfold(shard.members.clone(), |mut m| async move {
            m.changed().await.ok()?;
            Some(((), m))
        })
        .boxed(),
        None => futures_util::stream::pending().boxed(),
    };
    let drain = controller
        .reconcile_all_on(replicas_changed)
        // A changed secret re-reconciles the pipelines that reference it.
        .watches_stream(secret_changes, move |secret: PartialObjectMeta<Secret>| {
            let ns = secret.namespace().unwrap_or_default();
            let name = secret.name_any();
            store
                .state()
                .into_iter()
                .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
                .filter(|p| refs::referenced(p).contains(&name))
                .map(|p| ObjectRef::from_obj(&*p))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(async move {
            shutdown.await;
            let _ = fired_tx.send(());
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile stream");
            }
        });
    let mut drain = std::pin::pin!(drain);
    // Control plane only: which of the two ends first decides nothing on the data path.
    tokio::select! {
        _ = &mut drain => {}
        _ = fired_rx => {}
    }
    // Every pipeline stops now, whatever a reconcile in progress waits for (an API server
    // that does not answer, when this replica was cut off from it), while the controller lets
    // those reconciles finish for as long as a pipeline's stop may take. Nothing is started
    // meanwhile (stop_all closes the supervisor). A reconcile abandoned when that allowance
    // ends was waiting on the API server, not on the data path.
    tracing::info!("controller stopping; stopping pipelines");
    let (_, drained) = tokio::join!(
        supervisor.stop_all(),
        tokio::time::timeout(supervisor::STOP_WAIT, &mut drain)
    );
    if drained.is_err() {
        tracing::warn!("reconciles still waiting on the API server were abandoned");
    }
}

async fn reconcile(p: Arc<CdcPipeline>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let every = config::status_interval(&p.spec).unwrap_or(Duration::from_secs(10));
    let live: std::collections::HashSet<String> = ctx
        .pipelines
        .state()
        .iter()
        .filter(|o| o.meta().deletion_timestamp.is_none())
        .map(|o| key(o))
        .collect();
    ctx.heartbeat.retain(|k| live.contains(k));
    let uids: std::collections::HashSet<String> = ctx
        .pipelines
        .state()
        .iter()
        .filter_map(|o| o.uid())
        .chain(p.uid())
        .collect();
    ctx.written.retain(|uid| uids.contains(uid));
    ctx.claimed.retain(|uid| uids.contains(uid));
    if p.meta().deletion_timestamp.is_some() {
        ctx.heartbeat.forget(&key(&p));
    } else {
        ctx.heartbeat
            .turned(&key(&p), every, std::time::Instant::now());
    }
    let ns = p.namespace().unwrap_or_default();
    let api: Api<CdcPipeline> = Api::namespaced(ctx.client.clone(), &ns);
    // With replicas sharing the pipelines, only the owner goes on; the others make sure it
    // does not run here.
    let p = match &ctx.shard {
        None => p,
        Some(shard) => match placement(shard, &p, &ctx.pipelines.state()) {
            Placement::Elsewhere => return let_go(&api, &p, &ctx, shard, every).await,
            Placement::Held(owner) => {
                tracing::debug!(pipeline = %key(&p), %owner, "waiting for the previous owner to stop it");
                // Another live replica is named: nothing runs here meanwhile (a task left
                // from before would keep taking the slot or buffer lock whenever the named
                // owner's sessions blink).
                if ctx.supervisor.stop(&key(&p)).await {
                    tracing::info!(pipeline = %key(&p), %owner, "named owner is another replica: stopped here");
                }
                ctx.written.forget(&p.uid().unwrap_or_default());
                ctx.claimed.forget(&p.uid().unwrap_or_default());
                return Ok(Action::requeue(HANDOVER_POLL));
            }
            // Named here, and claimed by this replica since it last let go of it.
            Placement::Mine { claimed: true }
                if ctx.claimed.get(&p.uid().unwrap_or_default()).is_some() =>
            {
                p
            }
            // Named here by the watch's copy only: it may be older than this replica's own
            // let-go and another's claim since (an assignment that flipped back within a
            // second), or come from before a restart, so it is claimed again, against the
            // current resourceVersion, before anything starts.
            Placement::Mine { .. } => match claim(&api, &p, &shard.identity).await? {
                Some(p) => {
                    ctx.claimed.set(&p.uid().unwrap_or_default(), ());
                    p
                }
                None => return Ok(Action::requeue(HANDOVER_POLL)),
            },
        },
    };
    let p = ensure_finalizer(&api, p).await?;
    let result = finalizer(&api, FINALIZER, p, |event| async {
        match event {
            Finalizer::Apply(p) => apply(&p, &ctx).await,
            Finalizer::Cleanup(p) => cleanup::cleanup(&p, &ctx).await,
        }
    })
    .await;
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&ReconcileLabels {
            result: label.into(),
        })
        .inc();
    result.map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        kube::runtime::finalizer::Error::AddFinalizer(e)
        | kube::runtime::finalizer::Error::RemoveFinalizer(e) => ReconcileError::Kube(e),
        other => ReconcileError::Cleanup(other.to_string()),
    })
}

/// `status.owner` is written only by [`claim`] and [`let_go`], under a field manager of its
/// own and with the resourceVersion as precondition; the status the controller applies
/// leaves it out, so a reconcile working from a stale copy cannot write it back.
fn owner_params() -> PatchParams {
    PatchParams {
        field_manager: Some(OWNER_FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Field manager of `status.owner`.
const OWNER_FIELD_MANAGER: &str = "philotes-owner";

/// How often a replica looks again at a pipeline being handed over to or from it.
const HANDOVER_POLL: Duration = Duration::from_secs(2);

/// Where a pipeline runs, as this replica sees it.
#[derive(Debug, PartialEq, Eq)]
enum Placement {
    /// Another live replica owns it (or this one is not a member).
    Elsewhere,
    /// This replica owns it, but the previous owner, still live, has not let go of it yet
    /// (`status.owner`).
    Held(String),
    /// This replica owns it; `claimed`: `status.owner` says so already.
    Mine { claimed: bool },
}

/// The handover protocol (README, Sharding): a pipeline runs on the replica the assignment
/// picks among the live members ([`members::Membership::assign`], over every pipeline the
/// controller sees), and only once `status.owner` names that replica. The
/// previous owner stops it (flushed, checkpointed, confirmed) and then clears
/// `status.owner`; the new one writes its name there with the resourceVersion as a
/// precondition before it starts it. A previous owner that is no longer live (its Lease
/// gone or not renewed for a lease duration) is not waited for: it stopped its pipelines
/// itself when it could not renew, before the others could see it gone.
fn placement(shard: &Shard, p: &CdcPipeline, all: &[Arc<CdcPipeline>]) -> Placement {
    let members = shard.members.borrow();
    let uid = p.uid().unwrap_or_default();
    // `p` itself too, should the store not hold it yet.
    let pipelines: Vec<(i64, String)> = all
        .iter()
        .map(|o| &**o)
        .chain([p])
        .map(|o| {
            let created = o
                .meta()
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| t.0.as_second());
            (created, o.uid().unwrap_or_default())
        })
        .collect();
    let owner = members.assign(&pipelines).remove(&uid);
    if !members.member || owner.as_deref() != Some(shard.identity.as_str()) {
        return Placement::Elsewhere;
    }
    match p.status.as_ref().and_then(|s| s.owner.as_deref()) {
        Some(o) if o == shard.identity => Placement::Mine { claimed: true },
        Some(o) if members.live.contains(o) => Placement::Held(o.to_string()),
        _ => Placement::Mine { claimed: false },
    }
}

/// Writes `owner` into `status.owner` (`None` clears it) if the object is still the one
/// read: the updated object, or `None` when it changed meanwhile (looked at again shortly).
async fn write_owner(
    api: &Api<CdcPipeline>,
    p: &CdcPipeline,
    owner: Option<&str>,
) -> Result<Option<CdcPipeline>, ReconcileError> {
    let patch = json!({
        "metadata": {"resourceVersion": p.resource_version()},
        "status": {"owner": owner},
    });
    match api
        .patch_status(&p.name_any(), &owner_params(), &Patch::Merge(&patch))
        .await
    {
        Ok(updated) => Ok(Some(updated)),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        Err(e) => Err(ReconcileError::Status(e)),
    }
}

/// Writes this replica into `status.owner` ([`write_owner`]).
async fn claim(
    api: &Api<CdcPipeline>,
    p: &CdcPipeline,
    identity: &str,
) -> Result<Option<Arc<CdcPipeline>>, ReconcileError> {
    let claimed = write_owner(api, p, Some(identity)).await?;
    if claimed.is_some() {
        tracing::info!(pipeline = %key(p), owner = identity, "pipeline claimed");
    }
    Ok(claimed.map(Arc::new))
}

/// Not this replica's: stops it if it runs here (flushed, checkpointed and confirmed before
/// this returns), then clears `status.owner` if it names this replica, which lets the new
/// owner start it.
async fn let_go(
    api: &Api<CdcPipeline>,
    p: &CdcPipeline,
    ctx: &Context,
    shard: &Shard,
    every: Duration,
) -> Result<Action, ReconcileError> {
    let key = key(p);
    if ctx.supervisor.stop(&key).await {
        tracing::info!(pipeline = %key, "owned by another replica now: stopped here");
    }
    // The next owner writes it; should it come back here, the watch's copy is the one, and
    // it is claimed anew.
    ctx.written.forget(&p.uid().unwrap_or_default());
    ctx.claimed.forget(&p.uid().unwrap_or_default());
    if p.status.as_ref().and_then(|s| s.owner.as_deref()) != Some(shard.identity.as_str()) {
        return Ok(Action::requeue(every));
    }
    match write_owner(api, p, None).await? {
        Some(_) => {
            tracing::info!(pipeline = %key, "pipeline handed over");
            Ok(Action::requeue(every))
        }
        None => Ok(Action::requeue(HANDOVER_POLL)),
    }
}

/// Adds the finalizer with a merge patch guarded by the resourceVersion (a conflict retries).
/// kube's helper would use a JSON patch testing `/metadata/finalizers` against null, which API
/// servers before 1.21 refuse when the field is absent.
async fn ensure_finalizer(
    api: &Api<CdcPipeline>,
    p: Arc<CdcPipeline>,
) -> Result<Arc<CdcPipeline>, ReconcileError> {
    if p.meta().deletion_timestamp.is_some() || p.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(p);
    }
    let mut finalizers = p.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let patch = json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": p.resource_version()}
    });
    let updated = api
        .patch(
            &p.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(Arc::new(updated))
}

fn error_policy(p: Arc<CdcPipeline>, err: &ReconcileError, ctx: Arc<Context>) -> Action {
    tracing::warn!(pipeline = %key(&p), reason = err.reason(), error = ?err, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            reason: err.reason().into(),
        })
        .inc();
    Action::requeue(Duration::from_secs(15))
}

/// What of a `CdcPipeline` a reconcile acts on, hashed: a change of it (or its first sight)
/// reconciles at once. Status is left out, so the controller's own status writes do not
/// reconcile again; `metadata.generation` covers the spec.
fn user_change(p: &CdcPipeline) -> Option<u64> {
    let mut h = DefaultHasher::new();
    p.meta().generation.hash(&mut h);
    p.annotations().hash(&mut h);
    p.finalizers().hash(&mut h);
    // A handover: the new owner waits for the old one to clear it.
    p.status
        .as_ref()
        .and_then(|s| s.owner.as_ref())
        .hash(&mut h);
    p.meta()
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut h);
    Some(h.finish())
}

/// `namespace/name`.
pub fn key(p: &CdcPipeline) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

/// Read refs → validate → start/stop → status.
async fn apply(p: &CdcPipeline, ctx: &Context) -> Result<Action, ReconcileError> {
    let key = key(p);
    let ns = p.namespace().unwrap_or_default();
    // An unusable interval is reported in the status (Invalid); refresh at the default then.
    let every = config::status_interval(&p.spec).unwrap_or(Duration::from_secs(10));

    let mut refused: Option<String> = None;
    let mut recovered: Option<String> = None;
    let (observed, cfg) = if p.spec.suspend.unwrap_or(false) {
        if ctx.supervisor.stop(&key).await {
            tracing::info!(pipeline = %key, "suspended: pipeline stopped, slot kept");
        }
        (Observed::Suspended, None)
    } else {
        let secrets = Secrets::fetch(&ctx.client, &ctx.secrets, p, &ns).await?;
        match PipelineConfig::resolve(&ns, &p.name_any(), &p.spec, &secrets) {
            Err(e) => {
                // An unusable spec or secret: stop what runs and wait for a change (the
                // secret watch brings us back when one is created or fixed).
                ctx.supervisor.stop(&key).await;
                (Observed::Invalid(e.reason().into(), e.to_string()), None)
            }
            Ok(cfg) => {
                let mut h = DefaultHasher::new();
                serde_json::to_string(&p.spec)
                    .unwrap_or_default()
                    .hash(&mut h);
                secrets.fingerprint(&mut h);
                let created = p
                    .meta()
                    .creation_timestamp
                    .as_ref()
                    .map_or(0, |t| t.0.as_second());
                // The identity guard first: a refused change leaves everything as it runs
                // (no recovery, no slot taken from anyone).
                let recorded = p.status.as_ref().and_then(|s| s.checkpoint_of.as_ref());
                refused = ctx.supervisor.refuses(&key, &cfg, recorded).await;
                let mut held: Option<(String, String)> = None;
                if refused.is_none() {
                    if let Some(request) = p.annotations().get(RECOVER) {
                        if previous_request(p, ctx) != Some(request.clone()) {
                            match recover(p, ctx, &key, &cfg, request).await {
                                Recover::Settled(r) => recovered = Some(r),
                                Recover::Retry(reason, why) => held = Some((reason, why)),
                            }
                        }
                    }
                    let others = ctx.pipelines.state();
                    let taken =
                        match slot_recorded_by(others.iter().map(|o| &**o), &key, &cfg, created) {
                            Some(taken) => Err(taken),
                            // A recovery to be retried: nothing is started meanwhile.
                            None if held.is_some() => Ok(supervisor::Started::AlreadyRunning),
                            // The running pipelines' slots are checked under the same lock that
                            // starts this one, so two cannot both start on one slot.
                            None => {
                                ctx.supervisor
                                    .ensure(&key, cfg.clone(), h.finish(), created)
                                    .await
                            }
                        };
                    match taken {
                        Err(taken) => {
                            ctx.supervisor.stop(&key).await;
                            let observed = Observed::Invalid("SlotConflict".into(), taken);
                            return finish(
                                p,
                                ctx,
                                observed,
                                Some(cfg),
                                None,
                                recovered.as_deref(),
                                every,
                            )
                            .await;
                        }
                        Ok(supervisor::Started::Started) => {
                            tracing::info!(pipeline = %key, "pipeline started")
                        }
                        Ok(supervisor::Started::Restarted) => {
                            tracing::info!(pipeline = %key, "spec or secret changed: pipeline restarted")
                        }
                        Ok(supervisor::Started::AlreadyRunning) => {}
                        // The operator is stopping: nothing to report.
                        Ok(supervisor::Started::Closing) => return Ok(Action::await_change()),
                    }
                }
                let observed = match (ctx.supervisor.observe(&key).await, &refused) {
                    (_, _) if held.is_some() => {
                        let (reason, why) = held.unwrap_or_default();
                        Observed::Invalid(reason, why)
                    }
                    (Some(observed), _) => observed,
                    // Nothing runs, and the spec may not: say why.
                    (None, Some(why)) => {
                        Observed::Invalid("IdentityChangeRefused".into(), why.clone())
                    }
                    (None, None) => Observed::Task {
                        progress: pipeline::Progress::default(),
                        snapshot: None,
                        ended: None,
                    },
                };
                (observed, Some(cfg))
            }
        }
    };

    finish(
        p,
        ctx,
        observed,
        cfg,
        refused.as_deref(),
        recovered.as_deref(),
        every,
    )
    .await
}

/// Another `CdcPipeline`, created before `key`, whose checkpoint belongs to the slot `cfg`
/// names on the same source (its `status.checkpointOf`), whether it runs or not (suspended,
/// failed): starting `cfg` would take the slot from under that checkpoint.
fn slot_recorded_by<'a>(
    others: impl Iterator<Item = &'a CdcPipeline>,
    key: &str,
    cfg: &PipelineConfig,
    created: i64,
) -> Option<String> {
    let source = cfg.source.to_string();
    others
        .filter_map(|o| {
            let other = self::key(o);
            let of = o.status.as_ref()?.checkpoint_of.as_ref()?;
            let when = o
                .meta()
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| t.0.as_second());
            (other != key && of.source == source && of.slot == cfg.slot && (when, other.as_str()) < (created, key))
                .then(|| (other.clone(), of.slot.clone()))
        })
        .map(|(other, slot)| {
            format!(
                "CdcPipeline {key} names slot {slot} on source {source}, which the checkpoint of CdcPipeline {other} (created first) \
                 belongs to, running or not: two pipelines on one slot would each get only part of the changes. Give this one its own \
                 spec.source.slot (or leave it unset for one derived from its namespace and name), or delete {other} \
                 (slotDeletionPolicy: Retain keeps the slot for this one)"
            )
        })
        .next()
}

/// The last `philotes.io/recover` request acted on: as this replica last wrote it (the
/// watch's copy may not show it yet, and acting on a request twice would recover twice).
fn previous_request(p: &CdcPipeline, ctx: &Context) -> Option<String> {
    let written = ctx.written.get(&p.uid().unwrap_or_default());
    written
        .as_ref()
        .or(p.status.as_ref())?
        .recover_request
        .clone()
}

/// Carries out a `philotes.io/recover` request, for a pipeline stopped by a gap (`SlotLost`,
/// `SourceChanged`) only: stops the ended task, runs [`pipeline::lifecycle::recover`] and
/// publishes an Event with what was done or why not. Returns the request once it is settled
/// (done, or refused for good), `None` when it is to be tried again at the next reconcile.
/// What became of a `philotes.io/recover` request.
enum Recover {
    /// Done, or refused for good (an Event says which): not to be acted on again.
    Settled(String),
    /// Failed on something passing: to be tried at the next reconcile, with the pipeline
    /// not started meanwhile (`reason`, `message` for its status).
    Retry(String, String),
}

async fn recover(
    p: &CdcPipeline,
    ctx: &Context,
    key: &str,
    cfg: &PipelineConfig,
    request: &str,
) -> Recover {
    // Stopped at a gap: the task ended so, or none runs and the status says so (a request
    // retried, or the operator restarted).
    let stopped_at = match ctx.supervisor.ended(key).await {
        Some(reason) => Some(reason),
        None if !ctx.supervisor.has(key).await => p
            .status
            .as_ref()
            .and_then(status::ready)
            .map(|c| c.reason.clone()),
        None => None,
    };
    let (type_, reason, note) = match stopped_at.as_deref() {
        Some(gap @ ("SlotLost" | "SourceChanged")) => {
            ctx.supervisor.stop(key).await;
            match pipeline::lifecycle::recover(cfg).await {
                Ok(r) => (EventType::Normal, "GapRecovered", r.describe(key)),
                Err(e) if e.is_transient() => {
                    tracing::warn!(pipeline = %key, reason = e.reason(), "recover request {request}: {e}; trying again");
                    return Recover::Retry(
                        gap.to_string(),
                        format!("{RECOVER}={request} is retried: {e}"),
                    );
                }
                Err(e) => (
                    EventType::Warning,
                    "RecoverFailed",
                    format!("{RECOVER}={request}: {e}"),
                ),
            }
        }
        _ => (
            EventType::Warning,
            "RecoverIgnored",
            format!(
                "{RECOVER}={request} ignored: the pipeline is not stopped at a gap (SlotLost or SourceChanged); nothing was changed"
            ),
        ),
    };
    tracing::info!(pipeline = %key, reason, "{note}");
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(truncate(&note, 1000)),
        action: "Recover".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &p.object_ref(&())).await {
        tracing::warn!(pipeline = %key, error = %e, "cannot publish event");
    }
    Recover::Settled(request.to_string())
}

/// Status from what was observed, metrics, Events; the next reconcile in `every`.
async fn finish(
    p: &CdcPipeline,
    ctx: &Context,
    observed: Observed,
    cfg: Option<PipelineConfig>,
    refused: Option<&str>,
    recovered: Option<&str>,
    every: Duration,
) -> Result<Action, ReconcileError> {
    let key = &key(p);
    let now = status::now();
    let uid = p.uid().unwrap_or_default();
    // What this replica last wrote, when the watch's copy has not caught up with it.
    let written = ctx.written.get(&uid);
    let previous = written.as_ref().or(p.status.as_ref());
    let (slot, publication) = match (&observed, &cfg) {
        // The names the pipeline streams from (a checkpointed one keeps those it recorded).
        (Observed::Task { progress, .. }, _) if !progress.slot.is_empty() => (
            Some(progress.slot.as_str()),
            Some(progress.publication.as_str()),
        ),
        (_, Some(c)) => (Some(c.slot.as_str()), Some(c.publication.as_str())),
        (_, None) => (
            previous.and_then(|s| s.slot_name.as_deref()),
            previous.and_then(|s| s.publication_name.as_deref()),
        ),
    };
    // Once the task has a checkpoint, what it belongs to is recorded (and kept), so a
    // change is refused even while the pipeline does not run.
    let checkpoint_of = match (&observed, &cfg, refused) {
        (Observed::Task { progress, .. }, Some(c), None) if progress.checkpoint_lsn > 0 => {
            // The names it streams (a checkpointed pipeline keeps those it recorded).
            let of = supervisor::checkpoint_of(c);
            Some(if progress.slot.is_empty() {
                of
            } else {
                crate::crd::CheckpointOf {
                    slot: progress.slot.clone(),
                    publication: progress.publication.clone(),
                    ..of
                }
            })
        }
        _ => None,
    };
    let status = status::compute(&Inputs {
        generation: p.meta().generation,
        slot,
        publication,
        observed: &observed,
        previous,
        now: &now,
        refused,
        recovered,
        checkpoint_of,
    });
    record_metrics(ctx, key, &status);
    // A pipeline being started (after a create, a restart or a handover) is looked at again
    // within a second, so Ready shows when it streams rather than a statusInterval later.
    // (A failed pipeline being started again shows `Failed` meanwhile: see `status::compute`.)
    let starting = matches!(
        &observed,
        Observed::Task { progress, ended: None, .. } if progress.state == pipeline::State::Starting
    );
    let next = if starting || status.phase.as_deref() == Some("Provisioning") {
        every.min(STARTING_POLL)
    } else {
        every
    };
    if status::to_write(&status, p.status.as_ref(), written.as_ref()) {
        publish_status(ctx, p, previous, &status).await?;
        ctx.written.set(&uid, status);
    }
    Ok(Action::requeue(next))
}

/// How soon a pipeline being started is reconciled again.
const STARTING_POLL: Duration = Duration::from_secs(1);

fn record_metrics(ctx: &Context, key: &str, status: &CdcPipelineStatus) {
    let not_ready = status::ready(status)
        .filter(|c| c.status != "True")
        .map(|c| c.reason.as_str());
    ctx.metrics.set_not_ready(key, not_ready);
    let labels = PipelineLabels {
        pipeline: key.to_string(),
    };
    if let Some(lag) = status.lag_bytes {
        ctx.metrics.lag_bytes.get_or_create(&labels).set(lag);
    }
    if let Some(safe) = status.safe_wal_size_bytes {
        ctx.metrics
            .slot_safe_wal_size_bytes
            .get_or_create(&labels)
            .set(safe);
    }
    let inactive = status
        .inactive_since
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map_or(0, |t| {
            (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds()
        });
    ctx.metrics
        .slot_inactive_seconds
        .get_or_create(&labels)
        .set(inactive.max(0));
    ctx.metrics
        .set_invalidated(key, status.invalidation_reason.as_deref());
    let snapshots: Vec<(String, bool, i64)> = status
        .snapshots
        .iter()
        .map(|t| {
            (
                t.table.clone(),
                t.phase == "Pending" || t.phase == "Copying",
                t.rows_copied,
            )
        })
        .collect();
    ctx.metrics.set_snapshots(key, &snapshots);
    if let Some(lsn) = status
        .confirmed_flush_lsn
        .as_deref()
        .and_then(pipeline::lsn::parse)
    {
        ctx.metrics
            .checkpoint_lsn
            .get_or_create(&labels)
            .set(lsn as i64);
    }
}

/// Writes the status, and an Event when the Ready condition changed from `previous`'s.
async fn publish_status(
    ctx: &Context,
    p: &CdcPipeline,
    previous: Option<&CdcPipelineStatus>,
    status: &CdcPipelineStatus,
) -> Result<(), ReconcileError> {
    let old = previous.and_then(status::ready);
    let new = status::ready(status);
    let transition = match (old, new) {
        (Some(o), Some(n)) => o.status != n.status || o.reason != n.reason,
        (None, Some(_)) => true,
        _ => false,
    };
    let api: Api<CdcPipeline> =
        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    let mut applied = serde_json::to_value(status).unwrap_or_default();
    if let Some(fields) = applied.as_object_mut() {
        // Not this apply's: see `owner_params`.
        fields.remove("owner");
    }
    let patch = json!({
        "apiVersion": "philotes.io/v1alpha1",
        "kind": "CdcPipeline",
        "status": applied,
    });
    api.patch_status(
        &p.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(ReconcileError::Status)?;
    if let Some(c) = status::refusal(status) {
        if previous.and_then(status::refusal).map(|o| &o.message) != Some(&c.message) {
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: c.reason.clone(),
                note: Some(truncate(&c.message, 1000)),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &p.object_ref(&())).await {
                tracing::warn!(pipeline = %key(p), error = %e, "cannot publish event");
            }
        }
    }
    if let (true, Some(n)) = (transition, new) {
        let event = KubeEvent {
            type_: if n.status == "True" {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: n.reason.clone(),
            note: Some(truncate(&n.message, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &p.object_ref(&())).await {
            tracing::warn!(pipeline = %key(p), error = %e, "cannot publish event");
        }
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Whether deletion must drop the slot.
pub fn deletes_slot(p: &CdcPipeline) -> bool {
    p.spec.slot_deletion_policy.unwrap_or_default() == SlotDeletionPolicy::Delete
}

/// Reconcile corner cases against a mocked API server (the real one is in tests/operator.rs).
#[cfg(test)]
mod mock_tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn context() -> (Arc<Context>, Handle) {
        context_with(None)
    }

    fn context_with(shard: Option<Shard>) -> (Arc<Context>, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let metrics = Metrics::new();
        let ctx = Arc::new(Context {
            client: client.clone(),
            supervisor: Supervisor::new(metrics.clone()),
            metrics,
            recorder: Recorder::new(client, "philotes-test".into()),
            pipelines: kube::runtime::reflector::store().0,
            heartbeat: Arc::new(Heartbeat::default()),
            secrets: SecretCache::new(kube::runtime::reflector::store().0, None),
            shard,
            written: status::PerPipeline::default(),
            claimed: status::PerPipeline::default(),
        });
        (ctx, handle)
    }

    fn pipeline(extra: serde_json::Value) -> Arc<CdcPipeline> {
        let mut doc = json!({
            "apiVersion": "philotes.io/v1alpha1", "kind": "CdcPipeline",
            "metadata": {"name": "p", "namespace": "ns", "generation": 2, "resourceVersion": "7",
                         "finalizers": [FINALIZER]},
            "spec": {
                "source": {"connectionSecretRef": {"name": "src"}, "tables": ["t"]},
                "buffer": {"connectionSecretRef": {"name": "buf"}},
            }
        });
        for (k, v) in extra.as_object().unwrap() {
            doc["spec"][k] = v.clone();
        }
        Arc::new(serde_json::from_value(doc).unwrap())
    }

    async fn next(
        handle: &mut Handle,
    ) -> (
        String,
        String,
        serde_json::Value,
        tower_test::mock::SendResponse<Response<Body>>,
    ) {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .expect("a request within 5s")
            .expect("a request");
        let method = req.method().to_string();
        let uri = req.uri().to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (method, uri, body, send)
    }

    fn respond(
        send: tower_test::mock::SendResponse<Response<Body>>,
        status: u16,
        body: serde_json::Value,
    ) {
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }

    fn not_found() -> serde_json::Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
    }

    /// A missing secret: the status says which, an Event is published, nothing is started.
    #[tokio::test]
    async fn missing_secret_fails_with_its_name_and_an_event() {
        let (ctx, mut handle) = context();
        let p = pipeline(json!({}));
        let task = tokio::spawn(reconcile(p.clone(), ctx.clone()));
        for name in ["src", "buf"] {
            let (method, uri, _, send) = next(&mut handle).await;
            assert_eq!(method, "GET");
            assert!(
                uri.ends_with(&format!("/namespaces/ns/secrets/{name}")),
                "{uri}"
            );
            respond(send, 404, not_found());
        }
        let (method, uri, body, send) = next(&mut handle).await;
        assert_eq!(method, "PATCH");
        assert!(
            uri.contains("/namespaces/ns/cdcpipelines/p/status")
                && uri.contains("fieldManager=philotes"),
            "{uri}"
        );
        let status = &body["status"];
        assert_eq!(status["phase"], "Failed");
        assert_eq!(status["observedGeneration"], 2);
        assert_eq!(status["conditions"][0]["reason"], "SecretError");
        assert!(status["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("secret ns/src not found"));
        respond(send, 200, serde_json::to_value(&*p).unwrap());
        let (method, uri, body, send) = next(&mut handle).await;
        assert_eq!(method, "POST");
        assert!(
            uri.contains("/apis/events.k8s.io/v1/namespaces/ns/events"),
            "{uri}"
        );
        assert_eq!(body["reason"], "SecretError");
        assert_eq!(body["type"], "Warning");
        assert!(
            ctx.metrics
                .encode()
                .contains(r#"philotes_pipeline_not_ready{pipeline="ns/p",reason="SecretError"} 1"#),
            "{}",
            ctx.metrics.encode()
        );
        respond(send, 201, body);
        let action = task.await.unwrap().unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
        assert!(ctx.supervisor.running().await.is_empty(), "nothing started");
    }

    /// Suspended: no secret is read, the status says Suspended.
    #[tokio::test]
    async fn suspended_reads_nothing_and_reports_suspended() {
        let (ctx, mut handle) = context();
        let p = pipeline(json!({"suspend": true, "statusInterval": "2s"}));
        let task = tokio::spawn(reconcile(p.clone(), ctx.clone()));
        let (method, uri, body, send) = next(&mut handle).await;
        assert_eq!(method, "PATCH", "{uri}");
        assert_eq!(body["status"]["phase"], "Suspended");
        respond(send, 200, serde_json::to_value(&*p).unwrap());
        let (_, _, event, send) = next(&mut handle).await;
        assert_eq!(event["reason"], "Suspended");
        respond(send, 201, event);
        assert_eq!(
            task.await.unwrap().unwrap(),
            Action::requeue(Duration::from_secs(2))
        );
    }

    /// Deletion with Retain never touches the source: the finalizer is simply removed.
    #[tokio::test]
    async fn deleting_with_retain_only_removes_the_finalizer() {
        let (ctx, mut handle) = context();
        let mut p = (*pipeline(json!({}))).clone();
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx.clone()));
        let (method, _uri, body, send) = next(&mut handle).await;
        assert_eq!(method, "PATCH");
        let ops = body.as_array().expect("a JSON patch");
        assert!(
            ops.iter()
                .any(|o| o["op"] == "remove" && o["path"] == "/metadata/finalizers/0"),
            "{body}"
        );
        respond(send, 200, serde_json::to_value(&p).unwrap());
        task.await.unwrap().unwrap();
    }

    /// A replica `me` among `live`, and a pipeline (UID `uid-1`) with `status.owner`.
    fn sharded(
        me: &str,
        live: &[&str],
        owner: Option<&str>,
    ) -> (Arc<Context>, Handle, Arc<CdcPipeline>, String) {
        let members = members::Membership {
            member: true,
            live: live.iter().map(|m| m.to_string()).collect(),
        };
        let mut p = (*pipeline(json!({}))).clone();
        p.metadata.uid = Some("uid-1".into());
        p.status = Some(CdcPipelineStatus {
            owner: owner.map(str::to_string),
            ..CdcPipelineStatus::default()
        });
        let assigned = members.assign(&[(0, "uid-1".to_string())])["uid-1"].clone();
        let (_tx, rx) = tokio::sync::watch::channel(members);
        let shard = Shard {
            identity: me.to_string(),
            members: rx,
        };
        let (ctx, handle) = context_with(Some(shard));
        (ctx, handle, Arc::new(p), assigned)
    }

    /// No request arrives within a short while.
    async fn quiet(handle: &mut Handle) {
        let next = tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await;
        assert!(next.is_err(), "unexpected request");
    }

    /// Two replicas claiming one pipeline at once: the one whose write fails on the
    /// resourceVersion starts nothing and looks again shortly.
    #[tokio::test]
    async fn a_lost_claim_starts_nothing() {
        let (ctx, mut handle, p, me) = sharded("r1", &["r1"], None);
        let task = tokio::spawn(reconcile(p, ctx.clone()));
        let (method, uri, body, send) = next(&mut handle).await;
        assert_eq!(method, "PATCH");
        assert!(
            uri.contains("/namespaces/ns/cdcpipelines/p/status"),
            "{uri}"
        );
        assert_eq!(body["status"]["owner"], me.as_str());
        assert_eq!(body["metadata"]["resourceVersion"], "7");
        respond(
            send,
            409,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
        );
        let action = task.await.unwrap().unwrap();
        assert_eq!(action, Action::requeue(HANDOVER_POLL));
        quiet(&mut handle).await;
        assert!(ctx.supervisor.running().await.is_empty(), "nothing started");
    }

    /// Named here by the watch's copy, but not claimed by this replica since it last let go
    /// (or since it started): claimed again against the resourceVersion before anything
    /// starts, as the copy may predate another replica's claim. Once claimed here, not again.
    #[tokio::test]
    async fn a_pipeline_named_here_by_an_old_copy_is_claimed_again() {
        let (ctx, mut handle, p, me) = sharded("r1", &["r1"], Some("r1"));
        let task = tokio::spawn(reconcile(p.clone(), ctx.clone()));
        let (method, uri, body, send) = next(&mut handle).await;
        assert_eq!(method, "PATCH");
        assert!(uri.contains("/cdcpipelines/p/status"), "{uri}");
        assert_eq!(body["status"]["owner"], me.as_str());
        assert_eq!(body["metadata"]["resourceVersion"], "7");
        respond(
            send,
            409,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "modified"}),
        );
        assert_eq!(task.await.unwrap().unwrap(), Action::requeue(HANDOVER_POLL));
        assert!(ctx.supervisor.running().await.is_empty(), "nothing started");
        // Claimed here before: the reconcile goes on to the pipeline's Secrets at once.
        ctx.claimed.set(&p.uid().unwrap_or_default(), ());
        let task = tokio::spawn(reconcile(p, ctx.clone()));
        let (method, uri, _, _send) = next(&mut handle).await;
        assert_eq!(method, "GET", "{uri}");
        assert!(uri.contains("/secrets/"), "{uri}");
        task.abort();
    }

    /// The new owner waits while `status.owner` names another live replica: no write, no
    /// start, a look again shortly.
    #[tokio::test]
    async fn a_pipeline_the_previous_owner_still_holds_is_waited_for() {
        // Of the two, the one the assignment picks is "me"; the other still holds it.
        let (_, _, _, owner) = sharded("r1", &["r1", "r2"], None);
        let other = if owner == "r1" { "r2" } else { "r1" };
        let (ctx, mut handle, p, _) = sharded(&owner, &["r1", "r2"], Some(other));
        let action = reconcile(p, ctx.clone()).await.unwrap();
        assert_eq!(action, Action::requeue(HANDOVER_POLL));
        quiet(&mut handle).await;
        assert!(ctx.supervisor.running().await.is_empty(), "nothing started");
        // Once that replica is gone (not live), it is claimed without waiting.
        let (ctx, mut handle, p, _) = sharded(&owner, &[&owner], Some(other));
        let task = tokio::spawn(reconcile(p, ctx));
        let (method, _, body, send) = next(&mut handle).await;
        assert_eq!(method, "PATCH");
        assert_eq!(body["status"]["owner"], owner.as_str());
        respond(
            send,
            409,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "modified"}),
        );
        assert_eq!(task.await.unwrap().unwrap(), Action::requeue(HANDOVER_POLL));
    }

    /// A pipeline the assignment gives to another replica, which `status.owner` says this one
    /// holds: it is let go (`status.owner` cleared, with the resourceVersion as precondition).
    #[tokio::test]
    async fn a_pipeline_of_another_replica_is_let_go() {
        let (_, _, _, owner) = sharded("r1", &["r1", "r2"], None);
        let me = if owner == "r1" { "r2" } else { "r1" };
        let (ctx, mut handle, p, _) = sharded(me, &["r1", "r2"], Some(me));
        let task = tokio::spawn(reconcile(p.clone(), ctx.clone()));
        let (method, uri, body, send) = next(&mut handle).await;
        assert_eq!(method, "PATCH");
        assert!(
            uri.contains("/namespaces/ns/cdcpipelines/p/status"),
            "{uri}"
        );
        assert_eq!(body["status"]["owner"], serde_json::Value::Null);
        assert_eq!(body["metadata"]["resourceVersion"], "7");
        respond(send, 200, serde_json::to_value(&*p).unwrap());
        let action = task.await.unwrap().unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
        quiet(&mut handle).await;
    }
}
