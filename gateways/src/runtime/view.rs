//! Every replica's view of the sandboxes: their events folded in memory. Get and List answer
//! from it, and the gauges are computed from it, so they are projections of the log like the
//! PostgreSQL table. The replica that runs a sandbox folds its own appends at once; the others
//! see them within [`TAIL`].
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use creto_domain::runtime::sandbox::Aggregate;
use creto_schemas::runtime::v1::{self as pb, State};
use creto_streams::{Catalog, EventLog, LogError, ReplayFrom, RUNTIME};
use futures::TryStreamExt;
use prost::Message;
use tokio::sync::watch;

use super::metrics;

pub const TAIL: Duration = Duration::from_millis(200);
/// A sandbox requested this long ago with no node recorded was abandoned mid-create.
const ABANDONED_AFTER: chrono::Duration = chrono::Duration::minutes(10);
/// How long an ended sandbox stays in the view (Get, List, a create retried with its request
/// id); past it only the PostgreSQL projection has it. Every replica folded every sandbox ever
/// created, in memory, and scanned them all five times a second for its gauges.
const ENDED_KEPT: chrono::Duration = chrono::Duration::days(7);

#[derive(Default)]
struct Folded {
    sandboxes: HashMap<String, Aggregate>,
    /// (tenant, request_id) → sandbox, for idempotent creates.
    requests: HashMap<(String, String), String>,
    /// Sandboxes in the order they ended, with when (unix seconds): forgotten after
    /// [`ENDED_KEPT`].
    ended: VecDeque<(i64, String)>,
    applied_through: u64,
}

impl Folded {
    /// Forgets the sandboxes that ended before `cut` (unix seconds).
    fn forget_ended(&mut self, cut: i64) {
        while self.ended.front().is_some_and(|(at, _)| *at < cut) {
            let (_, id) = self.ended.pop_front().expect("checked");
            let Some(agg) = self.sandboxes.get(&id).filter(|a| !a.is_live()) else {
                continue;
            };
            let key = (agg.view.tenant.clone(), agg.request_id.clone());
            if self.requests.get(&key) == Some(&id) {
                self.requests.remove(&key);
            }
            self.sandboxes.remove(&id);
        }
    }
}

pub struct RuntimeView {
    log: Arc<dyn EventLog>,
    catalog: Catalog,
    stream: String,
    node: String,
    folded: RwLock<Folded>,
    catching_up: tokio::sync::Mutex<()>,
}

impl RuntimeView {
    pub fn new(log: Arc<dyn EventLog>, catalog: Catalog, node: String) -> Self {
        RuntimeView {
            stream: catalog.stream(RUNTIME),
            log,
            catalog,
            node,
            folded: RwLock::new(Folded::default()),
            catching_up: tokio::sync::Mutex::new(()),
        }
    }

    pub fn sandbox_subject(&self, id: &str) -> String {
        self.catalog.subject(&format!("runtime.sandboxes.{id}"))
    }

    pub fn egress_subject(&self, id: &str) -> String {
        self.catalog.subject(&format!("runtime.egress.{id}"))
    }

    /// Folds one event of sandbox `id` unless the view already has it (the owner folds its own
    /// appends right away; the tail then meets them again).
    pub fn apply(&self, id: &str, e: &pb::SandboxEvent, sequence: u64) {
        let mut f = self.folded.write().expect("fold lock");
        // A sandbox begins with its request: a later event of one forgotten (ended long ago)
        // does not bring back half of it.
        if !f.sandboxes.contains_key(id)
            && !matches!(e.event, Some(pb::sandbox_event::Event::Requested(_)))
        {
            return;
        }
        let agg = f.sandboxes.entry(id.to_string()).or_default();
        if agg.view.version >= sequence {
            return;
        }
        let was_live = agg.is_live();
        agg.apply(id, e, sequence);
        let ended = was_live && !agg.is_live();
        if !agg.request_id.is_empty() && !agg.view.tenant.is_empty() {
            let key = (agg.view.tenant.clone(), agg.request_id.clone());
            f.requests.insert(key, id.to_string());
        }
        let now = chrono::Utc::now().timestamp();
        if ended {
            let at = e.at.as_ref().map_or(now, |t| t.seconds);
            f.ended.push_back((at, id.to_string()));
        }
        f.forget_ended(now - ENDED_KEPT.num_seconds());
    }

    /// Folds every sandbox event appended since the last catch-up.
    pub async fn catch_up(&self) -> Result<(), LogError> {
        let _one = self.catching_up.lock().await;
        let from = self.folded.read().expect("fold lock").applied_through + 1;
        let filter = self.catalog.subject("runtime.sandboxes.>");
        let mut events = self
            .log
            .replay(
                &self.stream,
                ReplayFrom::Sequence(from),
                None,
                Some(&filter),
            )
            .await?;
        while let Some(event) = events.try_next().await? {
            let logical = self.catalog.strip(&event.subject);
            let Some(id) = logical.strip_prefix("runtime.sandboxes.") else {
                continue;
            };
            match pb::SandboxEvent::decode(event.payload.as_ref()) {
                Ok(e) => self.apply(id, &e, event.sequence),
                Err(e) => tracing::error!(
                    sequence = event.sequence,
                    error = %e,
                    "undecodable sandbox event skipped"
                ),
            }
            self.folded.write().expect("fold lock").applied_through = event.sequence;
        }
        self.refresh_gauges();
        Ok(())
    }

    /// The gauges of this replica's sandboxes, by backend.
    pub fn refresh_gauges(&self) {
        let f = self.folded.read().expect("fold lock");
        let mut active: BTreeMap<&str, i64> = BTreeMap::new();
        let mut pooled: BTreeMap<&str, i64> = BTreeMap::new();
        for agg in f.sandboxes.values() {
            if agg.view.node != self.node || agg.view.backend.is_empty() {
                continue;
            }
            let backend = agg.view.backend.as_str();
            active.entry(backend).or_default();
            pooled.entry(backend).or_default();
            if agg.pooled && agg.state() == State::Ready {
                *pooled.entry(backend).or_default() += 1;
            } else if !agg.pooled && agg.is_live() {
                *active.entry(backend).or_default() += 1;
            }
        }
        for (backend, n) in active {
            metrics::ACTIVE.with_label_values(&[backend]).set(n);
        }
        for (backend, n) in pooled {
            metrics::POOL_SIZE.with_label_values(&[backend]).set(n);
        }
    }

    /// The memory (MB) the live sandboxes of this replica asked for, warm ones included.
    pub fn memory_on_node(&self) -> u64 {
        self.on_node(|r| r.memory_mb)
    }

    /// The disk (MB) the live sandboxes of this replica asked for, warm ones included.
    pub fn disk_on_node(&self) -> u64 {
        self.on_node(|r| r.disk_mb)
    }

    fn on_node(&self, of: impl Fn(&pb::Resources) -> u64) -> u64 {
        self.folded
            .read()
            .expect("fold lock")
            .sandboxes
            .values()
            .filter(|a| a.view.node == self.node && a.is_live())
            .map(|a| a.view.resources.as_ref().map_or(0, &of))
            .sum()
    }

    /// Sandboxes of `tenant` live on any replica (as far as this view has followed the log).
    pub fn live_of(&self, tenant: &str) -> usize {
        self.folded
            .read()
            .expect("fold lock")
            .sandboxes
            .values()
            .filter(|a| !a.pooled && a.is_live() && a.view.tenant == tenant)
            .count()
    }

    pub fn get(&self, id: &str) -> Option<Aggregate> {
        self.folded
            .read()
            .expect("fold lock")
            .sandboxes
            .get(id)
            .cloned()
    }

    /// The sandbox, catching up first when this replica has not seen it yet.
    pub async fn get_fresh(&self, id: &str) -> Result<Option<Aggregate>, LogError> {
        if let Some(a) = self.get(id) {
            return Ok(Some(a));
        }
        self.catch_up().await?;
        Ok(self.get(id))
    }

    pub fn by_request(&self, tenant: &str, request_id: &str) -> Option<Aggregate> {
        let f = self.folded.read().expect("fold lock");
        let id = f
            .requests
            .get(&(tenant.to_string(), request_id.to_string()))?;
        f.sandboxes.get(id).cloned()
    }

    /// A checkpoint of one of `tenant`'s sandboxes (of `owner`'s only, when given).
    pub fn checkpoint(
        &self,
        tenant: &str,
        owner: Option<&str>,
        checkpoint_id: &str,
    ) -> Option<pb::CheckpointRef> {
        let f = self.folded.read().expect("fold lock");
        f.sandboxes
            .values()
            .filter(|a| a.view.tenant == tenant && owner.is_none_or(|o| a.view.owner == o))
            .flat_map(|a| a.view.checkpoints.iter())
            .find(|c| c.checkpoint_id == checkpoint_id)
            .cloned()
    }

    /// Sandboxes of `tenant` (of `owner`'s only, when given) in one of `states` (all when
    /// empty) whose metadata holds every pair of `metadata`, newest first.
    pub fn list(
        &self,
        tenant: &str,
        owner: Option<&str>,
        states: &[State],
        metadata: &std::collections::HashMap<String, String>,
        limit: usize,
    ) -> Vec<pb::Sandbox> {
        let f = self.folded.read().expect("fold lock");
        let mut found: Vec<&pb::Sandbox> = f
            .sandboxes
            .values()
            .filter(|a| !a.pooled && a.view.tenant == tenant)
            .filter(|a| owner.is_none_or(|o| a.view.owner == o))
            .map(|a| &a.view)
            .filter(|v| states.is_empty() || states.contains(&v.state()))
            .filter(|v| {
                metadata
                    .iter()
                    .all(|(k, val)| v.metadata.get(k) == Some(val))
            })
            .collect();
        let created = |v: &pb::Sandbox| v.created_at.map(|t| (t.seconds, t.nanos));
        found.sort_by(|a, b| {
            created(b)
                .cmp(&created(a))
                .then_with(|| a.sandbox_id.cmp(&b.sandbox_id))
        });
        found.into_iter().take(limit).cloned().collect()
    }

    /// Sandboxes a previous process of this node left live: their processes and layers are
    /// gone.
    pub fn orphaned(&self, running: &dyn Fn(&str) -> bool) -> Vec<Aggregate> {
        self.folded
            .read()
            .expect("fold lock")
            .sandboxes
            .values()
            .filter(|a| a.view.node == self.node && a.is_live() && !running(&a.view.sandbox_id))
            .cloned()
            .collect()
    }

    /// Sandboxes requested long ago that no node took (a process that died between a
    /// sandbox's first two events): live in the log with nothing behind them.
    pub fn abandoned(&self) -> Vec<Aggregate> {
        let unclaimed_since = (chrono::Utc::now() - ABANDONED_AFTER).timestamp();
        self.folded
            .read()
            .expect("fold lock")
            .sandboxes
            .values()
            .filter(|a| {
                a.view.node.is_empty()
                    && a.is_live()
                    && a.view
                        .created_at
                        .as_ref()
                        .is_some_and(|t| t.seconds < unclaimed_since)
            })
            .cloned()
            .collect()
    }

    /// Keeps the view current until shutdown.
    pub async fn tail(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.catch_up().await {
                tracing::warn!(error = %e, "runtime catch-up failed; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(TAIL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
