//! The runtime of one replica: the sandboxes it runs, its warm pool, and the events that record
//! every step. Only the replica that runs a sandbox appends to the sandbox's subject (one
//! command at a time per sandbox), always with the expected last sequence, so the log cannot
//! fork even if two replicas disagree about who owns it.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use creto_domain::runtime::egress::EgressPolicy;
use creto_domain::runtime::sandbox::{self as domain, event, Aggregate, RuntimeLimits};
use creto_projections::archive::Archive;
use creto_schemas::runtime::v1::{self as pb, sandbox_event::Event};
use creto_streams::headers::{content_types, names};
use creto_streams::{append_id, AppendEvent, EventLog, Headers, LogError};
use ed25519_dalek::SigningKey;
use prost::Message;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};

use super::backend::{
    BackendError, EgressAttempt, IsolationBackend, ResourceLimits, Sandbox, SandboxSpec, Template,
};
use super::view::RuntimeView;
use super::{egress_budget, metrics};

/// Checkpoints taken or restored at once on a replica. Each holds its archive in memory (up to
/// the 1 GiB a checkpoint may be): without a bound, one tenant checkpointing many sandboxes
/// full of incompressible data at once could take the replica's memory, and every sandbox on
/// it. Past it, Checkpoint and CreateSandbox with a checkpoint wait their turn.
pub const ARCHIVES_AT_ONCE: usize = 2;

/// What an operator configures for the runtime of a replica.
#[derive(Clone)]
pub struct RuntimeSettings {
    /// This replica's name in events (`Provisioning.node`); Exec goes to the node that runs
    /// the sandbox.
    pub node: String,
    pub limits: RuntimeLimits,
    /// Warm sandboxes to keep ready per template.
    pub pool: BTreeMap<String, usize>,
    pub attestation_key: SigningKey,
}

/// A sandbox being created ([`Runtime::admit`]); its place is given back when dropped (by
/// then the sandbox is in the view, or it failed).
struct Admitted<'a> {
    runtime: &'a Runtime,
    tenant: String,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut creating = self.runtime.creating.lock().expect("creating lock");
        if let Some(n) = creating.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                creating.remove(&self.tenant);
            }
        }
    }
}

/// Memory and disk (MB) of the sandboxes being provisioned on a replica.
#[derive(Default, Clone, Copy)]
struct Provisioning {
    memory_mb: u64,
    disk_mb: u64,
}

/// Room reserved by [`Runtime::reserve`]; given back when dropped.
struct Reserved<'a> {
    runtime: &'a Runtime,
    room: Provisioning,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let mut p = self.runtime.provisioning.lock().expect("provisioning lock");
        p.memory_mb -= self.room.memory_mb;
        p.disk_mb -= self.room.disk_mb;
    }
}

/// A sandbox this replica runs.
pub struct Live {
    pub handle: Arc<dyn Sandbox>,
    /// Values of the sandbox's environment: kept here only, the events carry the names.
    pub env: Mutex<BTreeMap<String, String>>,
    /// The aggregate as this replica appended it; the lock serialises commands per sandbox.
    pub agg: Arc<tokio::sync::Mutex<Aggregate>>,
    /// Execs running at once ([`MAX_EXECS_PER_SANDBOX`]).
    pub execs: Arc<Semaphore>,
}

/// How often the expiry loop looks for sandboxes abandoned mid-create.
const ABANDONED_CHECK_EVERY: Duration = Duration::from_secs(60);

/// The first delay before a failed warm-pool refill is tried again; it doubles up to
/// [`REFILL_BACKOFF_MAX`].
const REFILL_BACKOFF_FIRST: Duration = Duration::from_secs(2);
const REFILL_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// An end to record later: (sandbox id, its aggregate, the event).
type Unrecorded = (String, Arc<tokio::sync::Mutex<Aggregate>>, Event);

/// Execs one sandbox runs at once. Each buffers up to a few MiB of output in the gateway for
/// a client that reads slowly, outside any sandbox's cgroup.
pub const MAX_EXECS_PER_SANDBOX: usize = 16;

pub struct Runtime {
    pub log: Arc<dyn EventLog>,
    pub view: Arc<RuntimeView>,
    pub backend: Arc<dyn IsolationBackend>,
    pub settings: RuntimeSettings,
    pub archive: Option<Arc<dyn Archive>>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Tenant → its sandboxes being created on this replica (not in the view yet).
    creating: Mutex<HashMap<String, usize>>,
    /// Memory and disk of the sandboxes being provisioned here, counted against
    /// `replica_memory_mb` and `replica_disk_mb` until they are in the view.
    provisioning: Mutex<Provisioning>,
    /// Checkpoint archives in memory at once ([`ARCHIVES_AT_ONCE`]).
    archives: Arc<Semaphore>,
    /// Template → ids of warm sandboxes ready to be claimed, oldest first.
    pool: Mutex<HashMap<String, VecDeque<String>>>,
    pool_wanted: Notify,
    egress_tx: mpsc::UnboundedSender<EgressAttempt>,
    egress_rx: Mutex<Option<mpsc::UnboundedReceiver<EgressAttempt>>>,
    /// Set by [`Runtime::terminate_all`]: a sandbox whose provisioning ends after it is
    /// terminated at once instead of outliving the replica.
    stopping: std::sync::atomic::AtomicBool,
    /// Sandboxes ended here (killed, or never started) whose end the log refused to record:
    /// the expiry loop records it when the log takes appends again. Without it such a sandbox
    /// stayed live in the log, and counted against its tenant, for good.
    unrecorded: Mutex<Vec<Unrecorded>>,
    /// Sandboxes whose expiry is being recorded, each in a task of its own (see
    /// [`Runtime::expire`]).
    expiring: Mutex<std::collections::HashSet<String>>,
    /// (tenant, request id) of the creates under way here ([`RequestInFlight`]).
    requests_in_flight: Mutex<std::collections::HashSet<(String, String)>>,
}

/// A create under a request id, from its idempotency check to its end: a second create with
/// the same id meanwhile is told to retry instead of making a second sandbox (both passed the
/// check before either was recorded).
pub struct RequestInFlight {
    runtime: Arc<Runtime>,
    key: (String, String),
}

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        self.runtime
            .requests_in_flight
            .lock()
            .expect("requests lock")
            .remove(&self.key);
    }
}

/// Why a runtime operation failed, before it becomes a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Backend(String),
    #[error("{0}")]
    Exhausted(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl From<domain::Refusal> for RuntimeError {
    fn from(r: domain::Refusal) -> Self {
        match r {
            domain::Refusal::Invalid(m) => RuntimeError::Invalid(m),
            domain::Refusal::Precondition(m) => RuntimeError::Precondition(m),
        }
    }
}

/// Egress decisions recorded one by one, waiting for the recorder: past this, they are held
/// for the next summary instead.
const EGRESS_RECORDS_QUEUED: usize = 10_000;

/// How long a stopping replica goes on recording the egress decisions it holds.
const EGRESS_DRAIN: Duration = Duration::from_secs(5);

/// One `EgressDecided` to append: a decision, or a summary of `attempts` held ones.
struct EgressRecord {
    sandbox_id: String,
    destination: String,
    allowed: bool,
    rule: String,
    attempts: u64,
}

impl EgressRecord {
    fn summary(sandbox_id: String, allowed: bool, attempts: u64) -> Self {
        EgressRecord {
            sandbox_id,
            destination: String::new(),
            allowed,
            rule: String::new(),
            attempts,
        }
    }
}

/// Queues the summaries of what `budgets` held; those the queue cannot take are held again.
fn queue_egress_summaries(
    to_record: &mpsc::Sender<EgressRecord>,
    budgets: &mut egress_budget::Budgets,
) {
    for (sandbox_id, allowed, attempts) in budgets.summaries(Instant::now()) {
        if let Err(e) = to_record.try_send(EgressRecord::summary(sandbox_id, allowed, attempts)) {
            let r = e.into_inner();
            budgets.hold(&r.sandbox_id, r.allowed, r.attempts);
        }
    }
}

/// A create request after validation.
pub struct NewSandbox {
    pub tenant: String,
    pub template: String,
    pub resources: pb::Resources,
    pub timeout: Duration,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub egress: EgressPolicy,
    /// The checkpoint's id and archive (shared, not copied, on its way to the backend).
    pub restore: Option<(String, Bytes)>,
    pub request_id: String,
    /// The caller's subject (see `Sandbox.owner`).
    pub owner: String,
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn egress_pb(p: &EgressPolicy) -> pb::EgressPolicy {
    pb::EgressPolicy {
        allow: p.to_strings(),
    }
}

pub fn limits_of(r: &pb::Resources) -> ResourceLimits {
    ResourceLimits {
        memory_bytes: r.memory_mb * 1024 * 1024,
        pids: r.pids,
        cpu_millis: r.cpu_millis,
        disk_bytes: r.disk_mb * 1024 * 1024,
    }
}

impl Runtime {
    /// A turn to hold a checkpoint archive in memory ([`ARCHIVES_AT_ONCE`]).
    pub async fn archive_turn(&self) -> OwnedSemaphorePermit {
        self.archives
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    pub fn new(
        log: Arc<dyn EventLog>,
        view: Arc<RuntimeView>,
        backend: Arc<dyn IsolationBackend>,
        settings: RuntimeSettings,
        archive: Option<Arc<dyn Archive>>,
    ) -> Arc<Self> {
        let (egress_tx, egress_rx) = mpsc::unbounded_channel();
        Arc::new(Runtime {
            log,
            view,
            backend,
            settings,
            archive,
            live: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashMap::new()),
            provisioning: Mutex::new(Provisioning::default()),
            archives: Arc::new(Semaphore::new(ARCHIVES_AT_ONCE)),
            pool: Mutex::new(HashMap::new()),
            pool_wanted: Notify::new(),
            egress_tx,
            egress_rx: Mutex::new(Some(egress_rx)),
            stopping: Default::default(),
            unrecorded: Mutex::default(),
            expiring: Mutex::default(),
            requests_in_flight: Mutex::default(),
        })
    }

    /// A template of the backend, or an error naming the ones there are.
    pub fn template(&self, name: &str) -> Result<Arc<Template>, RuntimeError> {
        self.backend.template(name).ok_or_else(|| {
            RuntimeError::Invalid(format!(
                "unknown template {name:?}: \"base\" is built in, RUNTIME_TEMPLATES_DIR adds <name>/rootfs/ directories"
            ))
        })
    }

    /// Claims `request_id` of `tenant` for one create; `None` while another holds it.
    pub fn request_in_flight(
        self: &Arc<Self>,
        tenant: &str,
        request_id: &str,
    ) -> Option<RequestInFlight> {
        let key = (tenant.to_string(), request_id.to_string());
        self.requests_in_flight
            .lock()
            .expect("requests lock")
            .insert(key.clone())
            .then(|| RequestInFlight {
                runtime: self.clone(),
                key,
            })
    }

    pub fn live(&self, id: &str) -> Option<Arc<Live>> {
        self.live.lock().expect("live lock").get(id).cloned()
    }

    pub fn pool_size(&self, template: &str) -> usize {
        self.pool
            .lock()
            .expect("pool lock")
            .get(template)
            .map_or(0, VecDeque::len)
    }

    /// The default resources: a request for them can be served from the warm pool.
    pub fn default_resources(&self) -> pb::Resources {
        domain::resources(None, &self.settings.limits).expect("defaults are within bounds")
    }

    /// Appends `events` to sandbox `id`, each expecting the one before, and folds them.
    pub async fn append(
        &self,
        agg: &mut Aggregate,
        id: &str,
        events: Vec<Event>,
    ) -> Result<(), LogError> {
        let subject = self.view.sandbox_subject(id);
        for e in events {
            let e = event(Utc::now(), e);
            let payload = e.encode_to_vec();
            let expected = agg.view.version;
            let mut headers = Headers::new()
                .with(names::CONTENT_TYPE, content_types::PROTOBUF)
                .with(names::EVENT_TYPE, domain::event_type(&e));
            // The tenant the event gives the sandbox (a request's, a claim's), else its own.
            let tenant = match &e.event {
                Some(Event::Requested(r)) => &r.tenant,
                Some(Event::Claimed(c)) => &c.tenant,
                _ => &agg.view.tenant,
            };
            if !tenant.is_empty() {
                headers = headers.with(names::TENANT, tenant);
            }
            let appended = self
                .log
                .append(AppendEvent {
                    id: append_id(&subject, expected, &payload),
                    subject: subject.clone(),
                    expected_subject_sequence: Some(expected),
                    headers,
                    payload: payload.into(),
                })
                .await;
            let sequence = match appended {
                Ok(a) => a.sequence(),
                Err(e) => {
                    self.resync(agg, id).await;
                    return Err(e);
                }
            };
            agg.apply(id, &e, sequence);
            self.view.apply(id, &e, sequence);
        }
        Ok(())
    }

    /// Brings `agg` up to the log after a refused append. A command cancelled once its event
    /// was stored (a client deadline) left the aggregate a version behind, and every later
    /// command on the sandbox, terminate included, conflicted; an append that failed
    /// ambiguously may have been stored too.
    async fn resync(&self, agg: &mut Aggregate, id: &str) {
        if let Err(e) = self.view.catch_up().await {
            tracing::warn!(sandbox = %id, error = %e, "cannot re-read the sandbox after a refused append");
            return;
        }
        if let Some(fresh) = self.view.get(id) {
            if fresh.view.version > agg.view.version {
                *agg = fresh;
            }
        }
    }

    /// A place for one more sandbox of `tenant`, held while it is created: its live
    /// sandboxes on every replica (the view) plus those being created here stay within
    /// `max_live_per_tenant`. Replicas creating at the same moment may together pass it by
    /// what each has in flight.
    fn admit(&self, tenant: &str) -> Result<Admitted<'_>, RuntimeError> {
        let max = self.settings.limits.max_live_per_tenant;
        let mut creating = self.creating.lock().expect("creating lock");
        let live = self.view.live_of(tenant) + creating.get(tenant).copied().unwrap_or(0);
        if live >= max {
            return Err(RuntimeError::Exhausted(format!(
                "tenant {tenant} has {live} live sandboxes, its limit: terminate one first (the \
                 operator sets the limit with RUNTIME_MAX_SANDBOXES_PER_TENANT, now {max})"
            )));
        }
        *creating.entry(tenant.to_string()).or_default() += 1;
        Ok(Admitted {
            runtime: self,
            tenant: tenant.to_string(),
        })
    }

    /// Room in this replica's memory and disk budgets for a sandbox of `resources`, held
    /// while it is provisioned (until it is in the view, which then counts it).
    fn reserve(&self, resources: &pb::Resources) -> Result<Reserved<'_>, RuntimeError> {
        let limits = &self.settings.limits;
        let mut provisioning = self.provisioning.lock().expect("provisioning lock");
        // What `asked` takes of a budget (0 without one), or why it does not fit.
        let take =
            |budget: Option<u64>, held: u64, asked: u64, what: &str, var: &str, field: &str| {
                let Some(budget) = budget else { return Ok(0) };
                if held + asked > budget {
                    return Err(RuntimeError::Exhausted(format!(
                    "this runtime replica's sandboxes hold {held} MB of its {budget} MB of {what} \
                     ({var}): ask for less than {asked} MB in resources.{field}, retry (another \
                     replica may have room), or end a sandbox"
                )));
                }
                Ok(asked)
            };
        // Disk images are sparse: without its budget nothing stops sandboxes together from
        // filling the volume (and, in Kubernetes, getting the pod and all its sandboxes evicted).
        let room = Provisioning {
            memory_mb: take(
                limits.replica_memory_mb,
                self.view.memory_on_node() + provisioning.memory_mb,
                resources.memory_mb,
                "memory",
                "RUNTIME_MEMORY_BUDGET_MB",
                "memory_mb",
            )?,
            disk_mb: take(
                limits.replica_disk_mb,
                self.view.disk_on_node() + provisioning.disk_mb,
                resources.disk_mb,
                "disk",
                "RUNTIME_DISK_BUDGET_MB",
                "disk_mb",
            )?,
        };
        provisioning.memory_mb += room.memory_mb;
        provisioning.disk_mb += room.disk_mb;
        Ok(Reserved {
            runtime: self,
            room,
        })
    }

    /// Claims a warm sandbox when the request matches the pool, else provisions a cold one.
    pub async fn create(&self, new: NewSandbox) -> Result<pb::Sandbox, RuntimeError> {
        let admitted = self.admit(&new.tenant)?;
        let started = Instant::now();
        if new.restore.is_none() && new.resources == self.default_resources() {
            while let Some(id) = self.take_warm(&new.template) {
                match self.claim(&id, &new, started).await {
                    Ok(view) => return Ok(view),
                    Err(e) => {
                        tracing::warn!(sandbox = %id, error = %e, "warm claim failed; trying the next");
                        // Out of the pool now: end it rather than leave it running unclaimed.
                        if let Some(live) = self.live(&id) {
                            let failed = Event::Failed(pb::Failed {
                                reason: format!("warm claim failed: {e}"),
                            });
                            let _ = self.end(&id, &live, failed).await;
                        }
                    }
                }
            }
        }
        let (template, resources) = (new.template.clone(), new.resources);
        self.provision(Some(new), template, resources, started, Some(admitted))
            .await
    }

    fn take_warm(&self, template: &str) -> Option<String> {
        let id = self
            .pool
            .lock()
            .expect("pool lock")
            .get_mut(template)?
            .pop_front();
        // Whatever was taken, the pool refills in the background.
        self.pool_wanted.notify_one();
        id
    }

    async fn claim(
        &self,
        id: &str,
        new: &NewSandbox,
        started: Instant,
    ) -> Result<pb::Sandbox, RuntimeError> {
        let live = self
            .live(id)
            .ok_or_else(|| RuntimeError::Backend(format!("warm sandbox {id} is gone")))?;
        let mut agg = live.agg.lock().await;
        // Ended while waiting for the lock (a shutdown's terminate_all).
        if !agg.is_live() {
            return Err(RuntimeError::Backend(format!(
                "warm sandbox {id} has ended"
            )));
        }
        *live.env.lock().expect("env lock") = new.env.clone();
        live.handle.set_egress(new.egress.clone());
        let claimed = Event::Claimed(pb::Claimed {
            tenant: new.tenant.clone(),
            timeout: Some(duration(new.timeout)),
            metadata: new.metadata.clone().into_iter().collect(),
            egress: Some(egress_pb(&new.egress)),
            env_names: new.env.keys().cloned().collect(),
            request_id: new.request_id.clone(),
            claim_duration: Some(duration(started.elapsed())),
            owner: new.owner.clone(),
        });
        self.append(&mut agg, id, vec![claimed]).await?;
        let backend = self.backend.name();
        metrics::CLAIMS.with_label_values(&[backend]).inc();
        metrics::SPAWN_SECONDS
            .with_label_values(&[backend, "warm"])
            .observe(started.elapsed().as_secs_f64());
        Ok(agg.view.clone())
    }

    /// A cold sandbox for a tenant (`new`), or a warm one for the pool (`None`). `admitted`
    /// (the tenant's place) and the room reserved here are held until its first events are in
    /// the view, which counts it from then on: held for the whole provisioning, they counted
    /// it twice and refused creates that fit.
    async fn provision(
        &self,
        new: Option<NewSandbox>,
        template_name: String,
        resources: pb::Resources,
        started: Instant,
        admitted: Option<Admitted<'_>>,
    ) -> Result<pb::Sandbox, RuntimeError> {
        let template = self.template(&template_name)?;
        let room = self.reserve(&resources)?;
        let id = format!("sb-{}", uuid::Uuid::new_v4().simple());
        let pool = new.is_none();
        let egress = new.as_ref().map(|n| n.egress.clone()).unwrap_or_default();
        let requested = Event::Requested(pb::Requested {
            tenant: new.as_ref().map(|n| n.tenant.clone()).unwrap_or_default(),
            template: template_name.clone(),
            resources: Some(resources),
            timeout: new.as_ref().map(|n| duration(n.timeout)),
            metadata: new
                .as_ref()
                .map(|n| n.metadata.clone().into_iter().collect())
                .unwrap_or_default(),
            egress: Some(egress_pb(&egress)),
            env_names: new
                .as_ref()
                .map(|n| n.env.keys().cloned().collect())
                .unwrap_or_default(),
            restore_checkpoint_id: new
                .as_ref()
                .and_then(|n| n.restore.as_ref().map(|(ck, _)| ck.clone()))
                .unwrap_or_default(),
            request_id: new
                .as_ref()
                .map(|n| n.request_id.clone())
                .unwrap_or_default(),
            pool,
            owner: new.as_ref().map(|n| n.owner.clone()).unwrap_or_default(),
        });
        let provisioning = Event::Provisioning(pb::Provisioning {
            backend: self.backend.name().to_string(),
            node: self.settings.node.clone(),
            template_digest: hex::encode(template.digest),
        });
        let mut agg = Aggregate::default();
        if let Err(e) = self
            .append(&mut agg, &id, vec![requested, provisioning])
            .await
        {
            // Requested may be in: live in the log with nothing behind it.
            self.fail_later(&id, agg, format!("its provisioning was not recorded: {e}"));
            return Err(e.into());
        }
        drop((room, admitted));
        let spec = SandboxSpec {
            id: id.clone(),
            template,
            limits: limits_of(&resources),
            env: BTreeMap::new(),
            egress,
            restore: new
                .as_ref()
                .and_then(|n| n.restore.as_ref().map(|(_, b)| b.clone())),
        };
        let backend = self.backend.name();
        let handle = match self.backend.prepare(spec, self.egress_tx.clone()).await {
            Ok(h) => h,
            Err(e) => {
                metrics::SPAWNS
                    .with_label_values(&[backend, "failure"])
                    .inc();
                let reason = format!("provisioning failed: {e}");
                let failed = Event::Failed(pb::Failed {
                    reason: reason.clone(),
                });
                if let Err(e) = self.append(&mut agg, &id, vec![failed.clone()]).await {
                    self.record_later(&id, Arc::new(tokio::sync::Mutex::new(agg)), failed);
                    return Err(e.into());
                }
                // The request, not the host: e.g. a checkpoint bigger than the disk asked for.
                return Err(match e {
                    BackendError::InvalidSpec(_) => RuntimeError::Invalid(reason),
                    _ => RuntimeError::Backend(reason),
                });
            }
        };
        metrics::SPAWNS
            .with_label_values(&[backend, "success"])
            .inc();
        let live = Arc::new(Live {
            execs: Arc::new(Semaphore::new(MAX_EXECS_PER_SANDBOX)),
            handle,
            env: Mutex::new(new.as_ref().map(|n| n.env.clone()).unwrap_or_default()),
            agg: Arc::new(tokio::sync::Mutex::new(agg)),
        });
        // Held until the sandbox is ready: a concurrent terminate_all waits for it, then sees a
        // live sandbox to end.
        let mut agg = live.agg.lock().await;
        self.live
            .lock()
            .expect("live lock")
            .insert(id.clone(), live.clone());
        // terminate_all sets the flag before it lists the live sandboxes: one inserted after
        // the list is ended here.
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            self.forget(&id).await;
            let stopped = Event::Terminated(pb::Terminated {
                by: "shutdown".into(),
            });
            if let Err(e) = self.append(&mut agg, &id, vec![stopped.clone()]).await {
                self.record_later(&id, live.agg.clone(), stopped);
                return Err(e.into());
            }
            return Err(RuntimeError::Backend("the runtime is shutting down".into()));
        }
        let ready = Event::Ready(pb::Ready {
            spawn_duration: Some(duration(started.elapsed())),
        });
        if let Err(e) = self.append(&mut agg, &id, vec![ready]).await {
            self.forget(&id).await;
            // Killed here, whether or not Ready went in.
            let failed = Event::Failed(pb::Failed {
                reason: format!("its readiness was not recorded ({e}); it was removed"),
            });
            self.record_later(&id, live.agg.clone(), failed);
            return Err(e.into());
        }
        if !pool {
            metrics::SPAWN_SECONDS
                .with_label_values(&[backend, "cold"])
                .observe(started.elapsed().as_secs_f64());
        }
        let view = agg.view.clone();
        drop(agg);
        if pool {
            self.pool
                .lock()
                .expect("pool lock")
                .entry(template_name)
                .or_default()
                .push_back(id);
        }
        Ok(view)
    }

    /// Kills the sandbox and drops it from this replica (the caller records why).
    async fn forget(&self, id: &str) {
        let live = self.live.lock().expect("live lock").remove(id);
        for q in self.pool.lock().expect("pool lock").values_mut() {
            q.retain(|p| p != id);
        }
        if let Some(live) = live {
            if let Err(e) = live.handle.terminate().await {
                tracing::error!(sandbox = %id, error = %e, "terminating the sandbox failed");
            }
        }
    }

    /// Ends a sandbox with `event` (Terminated or Expired); a no-op when it already ended.
    /// Killed at once; when the log refuses the record, it is recorded later
    /// ([`Runtime::record_unrecorded`]).
    pub async fn end(
        &self,
        id: &str,
        live: &Arc<Live>,
        e: Event,
    ) -> Result<pb::Sandbox, RuntimeError> {
        let mut agg = live.agg.lock().await;
        if !agg.is_live() {
            return Ok(agg.view.clone());
        }
        // The deadline read before the lock may have been moved while waiting for it (a
        // SetTimeout answered OK): the sandbox expires by the deadline it has now.
        if matches!(e, Event::Expired(_)) && agg.expires_at().is_some_and(|at| at > Utc::now()) {
            return Ok(agg.view.clone());
        }
        self.forget(id).await;
        if let Err(err) = self.append(&mut agg, id, vec![e.clone()]).await {
            self.record_later(id, live.agg.clone(), e);
            return Err(err.into());
        }
        Ok(agg.view.clone())
    }

    /// Queues an end the log refused for [`Runtime::record_unrecorded`].
    fn record_later(&self, id: &str, agg: Arc<tokio::sync::Mutex<Aggregate>>, e: Event) {
        self.unrecorded
            .lock()
            .expect("unrecorded lock")
            .push((id.to_string(), agg, e));
    }

    /// [`Runtime::record_later`] of a failure, for a sandbox that has no [`Live`] here.
    fn fail_later(&self, id: &str, agg: Aggregate, reason: String) {
        let failed = Event::Failed(pb::Failed { reason });
        self.record_later(id, Arc::new(tokio::sync::Mutex::new(agg)), failed);
    }

    /// Records the ends the log refused before (see [`Runtime::end`]), one at a time, up to
    /// the first it refuses again (each refusal costs an append's retry time: the rest waits
    /// for the next round).
    async fn record_unrecorded(&self) {
        loop {
            let Some((id, held, e)) = self.unrecorded.lock().expect("unrecorded lock").pop() else {
                return;
            };
            let mut agg = held.lock().await;
            // Re-read: an append refused as ambiguous may be in the log after all (a Requested
            // whose aggregate was empty when it was queued).
            self.resync(&mut agg, &id).await;
            if !agg.is_live() {
                continue;
            }
            if let Err(err) = self.append(&mut agg, &id, vec![e.clone()]).await {
                tracing::warn!(sandbox = %id, error = %err, "recording a sandbox's end failed again; retrying");
                drop(agg);
                self.record_later(&id, held, e);
                return;
            }
        }
    }

    /// Keeps every template's warm pool at its minimum until shutdown.
    pub async fn refill_pool(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // Per template that failed: when to try again, and the delay after the next failure.
        // A failing refill (disk full, no loop device) retried every second, and at every
        // claim, appended its events each time.
        let mut backoff: HashMap<String, (Instant, Duration)> = HashMap::new();
        loop {
            for (template, min) in self.settings.pool.clone() {
                if backoff
                    .get(&template)
                    .is_some_and(|(next, _)| *next > Instant::now())
                {
                    continue;
                }
                while self.pool_size(&template) < min && !*shutdown.borrow() {
                    let resources = self.default_resources();
                    if let Err(e) = self
                        .provision(None, template.clone(), resources, Instant::now(), None)
                        .await
                    {
                        // No room on the replica: nothing failed; the next round (within a
                        // second) tries again.
                        if matches!(e, RuntimeError::Exhausted(_)) {
                            break;
                        }
                        let delay = backoff
                            .get(&template)
                            .map_or(REFILL_BACKOFF_FIRST, |(_, d)| *d);
                        tracing::warn!(template = %template, error = %e, retry_in = ?delay, "warm pool refill failed");
                        backoff.insert(
                            template.clone(),
                            (Instant::now() + delay, (delay * 2).min(REFILL_BACKOFF_MAX)),
                        );
                        break;
                    }
                    backoff.remove(&template);
                }
            }
            tokio::select! {
                _ = self.pool_wanted.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Expires sandboxes of this replica whose lifetime ended, until shutdown.
    pub async fn expire(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut abandoned_checked = Instant::now();
        loop {
            let now = Utc::now();
            let due: Vec<(String, Arc<Live>)> = self
                .live
                .lock()
                .expect("live lock")
                .iter()
                .map(|(id, l)| (id.clone(), l.clone()))
                .collect();
            for (id, live) in due {
                let expired = self
                    .view
                    .get(&id)
                    .and_then(|a| a.expires_at())
                    .is_some_and(|at| at <= now);
                // Each in a task of its own: an expiry waits for the sandbox's lock, which a
                // checkpoint holds through its upload, and the others must not wait with it.
                if expired
                    && self
                        .expiring
                        .lock()
                        .expect("expiring lock")
                        .insert(id.clone())
                {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let ended = me.end(&id, &live, Event::Expired(pb::Expired {})).await;
                        if let Err(e) = ended {
                            tracing::error!(sandbox = %id, error = %e, "recording the expiry failed");
                        }
                        me.expiring.lock().expect("expiring lock").remove(&id);
                    });
                }
            }
            // After the expiries are under way: each refused record costs an append's retries.
            self.record_unrecorded().await;
            if abandoned_checked.elapsed() >= ABANDONED_CHECK_EVERY {
                abandoned_checked = Instant::now();
                self.fail_abandoned().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Counts every egress decision the backend reports and records it, one event per
    /// decision within the sandbox's budget, else in a summary ([`egress_budget`]), until
    /// shutdown (held attempts are summarized first). The appends run in a task of their own
    /// behind a bounded queue: while the log is slow or down, decisions are still counted and
    /// held for summaries, instead of queueing in memory without bound behind the appends.
    pub async fn record_egress(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(mut rx) = self.egress_rx.lock().expect("egress lock").take() else {
            return;
        };
        let (to_record, mut recording) = mpsc::channel::<EgressRecord>(EGRESS_RECORDS_QUEUED);
        let recorder = {
            let me = self.clone();
            tokio::spawn(async move {
                while let Some(r) = recording.recv().await {
                    me.record_egress_event(
                        &r.sandbox_id,
                        r.destination,
                        r.allowed,
                        r.rule,
                        r.attempts,
                    )
                    .await;
                }
            })
        };
        let mut budgets = egress_budget::Budgets::default();
        let mut summarize = tokio::time::interval(egress_budget::SUMMARY_EVERY);
        loop {
            tokio::select! {
                a = rx.recv() => {
                    let Some(a) = a else { break };
                    let decision = if a.allowed { "allow" } else { "deny" };
                    metrics::EGRESS_CHECKS.with_label_values(&[decision]).inc();
                    if budgets.admit(&a.sandbox_id, a.allowed, Instant::now()) {
                        let one = EgressRecord {
                            sandbox_id: a.sandbox_id,
                            destination: a.destination.to_string(),
                            allowed: a.allowed,
                            rule: a.rule.unwrap_or_default(),
                            attempts: 1,
                        };
                        if let Err(e) = to_record.try_send(one) {
                            let r = e.into_inner();
                            budgets.hold(&r.sandbox_id, r.allowed, 1);
                        }
                    }
                }
                _ = summarize.tick() => queue_egress_summaries(&to_record, &mut budgets),
                _ = shutdown.changed() => break,
            }
        }
        // Held attempts are summarized first; the recorder then writes what it was given,
        // for a bounded time: with the log down, each append waits out its retries, and a
        // full queue would hold the shutdown for hours.
        for (sandbox_id, allowed, attempts) in budgets.summaries(Instant::now()) {
            if to_record
                .send(EgressRecord::summary(sandbox_id, allowed, attempts))
                .await
                .is_err()
            {
                break;
            }
        }
        drop(to_record);
        if tokio::time::timeout(EGRESS_DRAIN, recorder).await.is_err() {
            tracing::error!(
                "egress decisions not recorded within {EGRESS_DRAIN:?} of the stop; runtime_egress_checks_total counted them"
            );
        }
    }

    /// Appends one `EgressDecided` standing for `attempts` decisions.
    async fn record_egress_event(
        &self,
        sandbox_id: &str,
        destination: String,
        allowed: bool,
        rule: String,
        attempts: u64,
    ) {
        let tenant = self
            .view
            .get(sandbox_id)
            .map(|a| a.view.tenant)
            .unwrap_or_default();
        let e = pb::EgressDecided {
            at: Some(domain::timestamp(Utc::now())),
            sandbox_id: sandbox_id.to_string(),
            tenant: tenant.clone(),
            destination,
            allowed,
            rule,
            attempts,
        };
        let subject = self.view.egress_subject(sandbox_id);
        let mut headers = Headers::new()
            .with(names::CONTENT_TYPE, content_types::PROTOBUF)
            .with(names::EVENT_TYPE, "runtime.egress_decided");
        if !tenant.is_empty() {
            headers = headers.with(names::TENANT, &tenant);
        }
        let append = AppendEvent {
            id: format!("{subject}:{}", uuid::Uuid::new_v4().simple()),
            subject,
            expected_subject_sequence: None,
            headers,
            payload: e.encode_to_vec().into(),
        };
        if let Err(e) = self.log.append(append).await {
            tracing::error!(sandbox = %sandbox_id, error = %e, "recording an egress decision failed");
        }
    }

    /// Marks live sandboxes a previous process of this node left behind as failed, and
    /// removes what the backend left of them.
    pub async fn recover(&self) -> Result<(), RuntimeError> {
        match self.backend.cleanup_orphans().await {
            Ok(n) if n > 0 => {
                tracing::warn!(removed = n, "removed sandboxes left by a previous process")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cleaning up orphaned sandboxes failed"),
        }
        let orphans = self.view.orphaned(&|id| self.live(id).is_some());
        for mut agg in orphans {
            let id = agg.view.sandbox_id.clone();
            let failed = Event::Failed(pb::Failed {
                reason:
                    "the replica that ran it restarted; its processes and writable layer are gone"
                        .into(),
            });
            if let Err(e) = self.append(&mut agg, &id, vec![failed.clone()]).await {
                tracing::warn!(sandbox = %id, error = %e, "could not mark an orphaned sandbox failed; retrying");
                self.record_later(&id, Arc::new(tokio::sync::Mutex::new(agg)), failed);
            }
        }
        self.fail_abandoned().await;
        Ok(())
    }

    /// Fails the sandboxes abandoned mid-create ([`RuntimeView::abandoned`]). Every replica
    /// does it now and then; the first append wins, the others' conflict.
    async fn fail_abandoned(&self) {
        for mut agg in self.view.abandoned() {
            let id = agg.view.sandbox_id.clone();
            let failed = Event::Failed(pb::Failed {
                reason: "abandoned while it was being created: no replica took it".into(),
            });
            if let Err(e) = self.append(&mut agg, &id, vec![failed]).await {
                tracing::debug!(sandbox = %id, error = %e, "an abandoned sandbox was not marked failed here");
            }
        }
    }

    /// Terminates every sandbox of this replica (on shutdown: their processes end with it).
    pub async fn terminate_all(&self, by: &str) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let all: Vec<(String, Arc<Live>)> = self
            .live
            .lock()
            .expect("live lock")
            .iter()
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect();
        for (id, live) in all {
            let e = Event::Terminated(pb::Terminated { by: by.to_string() });
            if let Err(e) = self.end(&id, &live, e).await {
                tracing::warn!(sandbox = %id, error = %e, "recording the termination failed");
            }
        }
    }
}
