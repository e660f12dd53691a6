//! Every replica's view of the OVERSIGHT stream: policies and requests folded in memory, with
//! the deadlines in time order for the timers. Commands decide on it and append with the
//! aggregate's expected sequence, so a stale view can only cause a retry, never a wrong write.
//! It is caught up after every write of this replica and every [`TAIL`] otherwise; a fresh
//! replica replays the stream before it serves.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use creto_domain::oversight::Aggregate;
use creto_schemas::oversight::v1 as pb;
use creto_schemas::oversight::v1::{Priority, State};
use creto_streams::{Catalog, EventLog, LogError, ReplayFrom, OVERSIGHT};
use futures::TryStreamExt;
use prost::Message;
use tokio::sync::watch;

use super::metrics;

pub const TAIL: Duration = Duration::from_millis(200);

/// `WatchRequest` streams one request may have at once on a replica (the agent that asked, an
/// operator's screen or two): a bound on how many tasks one request's change wakes.
pub const MAX_WATCHERS: usize = 16;
/// Bytes of requests one ListRequests answer holds at most (below gRPC clients' default 4 MiB).
pub const MAX_LIST_BYTES: usize = 3 * 1024 * 1024;

type Key = (String, String);

#[derive(Default)]
struct Folded {
    /// Ordered by (tenant, id): a tenant's list reads its own requests only.
    requests: BTreeMap<Key, Aggregate>,
    /// tenant → policy id → (policy, its subject's last sequence): the policies in force.
    policies: HashMap<String, BTreeMap<String, (pb::Policy, u64)>>,
    /// (tenant, policy id) → its subject's last sequence, removed or undecodable ones included:
    /// what the next PutPolicy or DeletePolicy of that id appends after.
    policy_versions: HashMap<Key, u64>,
    deadlines: BTreeSet<(DateTime<Utc>, String, String)>,
    /// Priority → pending requests, kept as events are folded: the gauge is set from it
    /// without going over every request ever folded.
    pending: HashMap<i32, i64>,
    applied_through: u64,
}

pub struct OversightView {
    log: Arc<dyn EventLog>,
    catalog: Catalog,
    stream: String,
    folded: RwLock<Folded>,
    catching_up: tokio::sync::Mutex<()>,
    /// Bumped whenever events were folded in: the timers wait on it.
    changed: watch::Sender<u64>,
    /// Bumped when a watched request's events were folded in: its `WatchRequest` streams wait
    /// on it, so a change wakes the watchers of that request, not every watcher.
    watched: Mutex<HashMap<Key, watch::Sender<u64>>>,
}

impl OversightView {
    pub fn new(log: Arc<dyn EventLog>, catalog: Catalog) -> Self {
        OversightView {
            stream: catalog.stream(OVERSIGHT),
            log,
            catalog,
            folded: RwLock::new(Folded::default()),
            catching_up: tokio::sync::Mutex::new(()),
            changed: watch::channel(0).0,
            watched: Mutex::new(HashMap::new()),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Changes of one request, unless it has [`MAX_WATCHERS`] watchers already. A watcher
    /// calls [`Self::unwatch`] when it ends.
    pub fn watch(&self, tenant: &str, id: &str) -> Option<watch::Receiver<u64>> {
        let mut watched = self.watched.lock().expect("watch lock");
        let sender = watched
            .entry((tenant.to_string(), id.to_string()))
            .or_insert_with(|| watch::channel(0).0);
        (sender.receiver_count() < MAX_WATCHERS).then(|| sender.subscribe())
    }

    /// Forgets a request nobody watches any more (called by a watcher after it dropped its
    /// receiver).
    pub fn unwatch(&self, tenant: &str, id: &str) {
        let mut watched = self.watched.lock().expect("watch lock");
        let key = (tenant.to_string(), id.to_string());
        if watched.get(&key).is_some_and(|s| s.receiver_count() == 0) {
            watched.remove(&key);
        }
    }

    pub fn request_subject(&self, tenant: &str, id: &str) -> String {
        self.catalog
            .subject(&format!("oversight.requests.{tenant}.{id}"))
    }

    pub fn policy_subject(&self, tenant: &str, id: &str) -> String {
        self.catalog
            .subject(&format!("oversight.policies.{tenant}.{id}"))
    }

    /// The OVERSIGHT stream's name in this deployment.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn notification_subject(&self, tenant: &str, id: &str) -> String {
        self.catalog
            .subject(&format!("oversight.notifications.{tenant}.{id}"))
    }

    /// Folds every event the log held when this was called: what another replica appended
    /// before a command began is in what the command decides on. One look at the stream's end
    /// when nothing is new; callers that find it folded do not queue behind a replay.
    pub async fn catch_up(&self) -> Result<(), LogError> {
        let last = self.log.last_sequence(&self.stream).await?;
        self.catch_up_to(last).await
    }

    /// Makes sure everything up to `sequence` is folded: one reader catches up for all the
    /// writers that were waiting (concurrent commands share one replay).
    pub async fn catch_up_to(&self, sequence: u64) -> Result<(), LogError> {
        let applied = || self.folded.read().expect("fold lock").applied_through;
        if applied() >= sequence {
            return Ok(());
        }
        let _one = self.catching_up.lock().await;
        if applied() >= sequence {
            return Ok(());
        }
        let from = self.folded.read().expect("fold lock").applied_through + 1;
        let filter = self.catalog.subject("oversight.>");
        let mut events = self
            .log
            .replay(
                &self.stream,
                ReplayFrom::Sequence(from),
                None,
                Some(&filter),
            )
            .await?;
        let mut any = false;
        let mut touched: HashSet<Key> = HashSet::new();
        while let Some(event) = events.try_next().await? {
            any = true;
            let logical = self.catalog.strip(&event.subject).to_string();
            let mut tokens = logical.split('.').skip(1);
            let (Some(kind), Some(tenant), Some(id)) =
                (tokens.next(), tokens.next(), tokens.next())
            else {
                continue;
            };
            let mut f = self.folded.write().expect("fold lock");
            f.applied_through = event.sequence;
            match kind {
                "requests" => match pb::RequestEvent::decode(event.payload.as_ref()) {
                    Ok(e) => {
                        let key = (tenant.to_string(), id.to_string());
                        // Under the fold's lock: a watcher that starts after this check reads
                        // the request after this event is folded (its read waits for the lock).
                        if self.watched.lock().expect("watch lock").contains_key(&key) {
                            touched.insert(key.clone());
                        }
                        let agg = f.requests.entry(key).or_default();
                        let before = agg.deadline();
                        let was = agg.is_open().then_some(agg.view.priority);
                        agg.apply(&e, event.sequence);
                        let after = agg.deadline();
                        let now = agg.is_open().then_some(agg.view.priority);
                        if was != now {
                            if let Some(p) = was {
                                *f.pending.entry(p).or_default() -= 1;
                            }
                            if let Some(p) = now {
                                *f.pending.entry(p).or_default() += 1;
                            }
                        }
                        if before != after {
                            if let Some(d) = before {
                                f.deadlines.remove(&(d, tenant.to_string(), id.to_string()));
                            }
                            if let Some(d) = after {
                                f.deadlines.insert((d, tenant.to_string(), id.to_string()));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(sequence = event.sequence, error = %e, "undecodable oversight event skipped");
                        // Still the subject's last event: the next append to the request
                        // expects it, or every answer and timer conflicts with it for ever.
                        let key = (tenant.to_string(), id.to_string());
                        if let Some(agg) = f.requests.get_mut(&key) {
                            agg.view.version = event.sequence;
                        }
                    }
                },
                "policies" => {
                    f.policy_versions
                        .insert((tenant.to_string(), id.to_string()), event.sequence);
                    match pb::PolicyDefined::decode(event.payload.as_ref()) {
                        Ok(pb::PolicyDefined { removed: true, .. }) => {
                            if let Some(m) = f.policies.get_mut(tenant) {
                                m.remove(id);
                            }
                        }
                        Ok(pb::PolicyDefined {
                            policy: Some(p), ..
                        }) => {
                            f.policies
                                .entry(tenant.to_string())
                                .or_default()
                                .insert(id.to_string(), (p, event.sequence));
                        }
                        _ => tracing::error!(
                            sequence = event.sequence,
                            "undecodable policy event skipped"
                        ),
                    }
                }
                _ => {}
            }
        }
        // The replay read to the stream's end, which `sequence` (an event of it) does not pass:
        // a last event outside the filter, or removed, is not looked for again on every call.
        {
            let mut f = self.folded.write().expect("fold lock");
            if sequence != u64::MAX {
                f.applied_through = f.applied_through.max(sequence);
            }
        }
        if any {
            self.refresh_pending_gauge();
            self.changed.send_modify(|n| *n += 1);
            let watched = self.watched.lock().expect("watch lock");
            for key in &touched {
                if let Some(sender) = watched.get(key) {
                    sender.send_modify(|n| *n += 1);
                }
            }
        }
        Ok(())
    }

    fn refresh_pending_gauge(&self) {
        let counts = &self.folded.read().expect("fold lock").pending;
        for p in [
            Priority::Low,
            Priority::Normal,
            Priority::High,
            Priority::Critical,
        ] {
            metrics::PENDING
                .with_label_values(&[priority_name(p)])
                .set(counts.get(&(p as i32)).copied().unwrap_or(0));
        }
    }

    pub fn get(&self, tenant: &str, id: &str) -> Option<Aggregate> {
        self.folded
            .read()
            .expect("fold lock")
            .requests
            .get(&(tenant.to_string(), id.to_string()))
            .cloned()
    }

    /// The request, catching up first when this replica has not seen it yet.
    pub async fn get_fresh(&self, tenant: &str, id: &str) -> Result<Option<Aggregate>, LogError> {
        if let Some(a) = self.get(tenant, id) {
            return Ok(Some(a));
        }
        self.catch_up().await?;
        Ok(self.get(tenant, id))
    }

    /// The last sequence of policy `id`'s subject (0: never defined).
    pub fn policy_version(&self, tenant: &str, id: &str) -> u64 {
        self.folded
            .read()
            .expect("fold lock")
            .policy_versions
            .get(&(tenant.to_string(), id.to_string()))
            .copied()
            .unwrap_or(0)
    }

    pub fn policies(&self, tenant: &str) -> Vec<(pb::Policy, u64)> {
        self.folded
            .read()
            .expect("fold lock")
            .policies
            .get(tenant)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Requests of `tenant` matching the filters: pending ones by priority (highest first) then
    /// age (oldest first); others newest first.
    pub fn list(
        &self,
        tenant: &str,
        state: Option<State>,
        priority: Option<Priority>,
        agent: Option<&str>,
        limit: usize,
    ) -> Vec<pb::ApprovalRequest> {
        self.select(
            tenant,
            |a| {
                state.is_none_or(|s| a.state() == s)
                    && priority.is_none_or(|p| a.view.priority == p as i32)
                    && agent.is_none_or(|g| a.view.agent_id == g)
            },
            limit,
        )
    }

    /// Pending requests of `tenant` that `approver` may answer, in [`Self::list`]'s order:
    /// chosen before the cut to one answer's size, or an approver whose requests sort after
    /// others' was told nothing waits.
    pub fn pending_for(
        &self,
        tenant: &str,
        approver: &str,
        limit: usize,
    ) -> Vec<pb::ApprovalRequest> {
        self.select(
            tenant,
            |a| {
                let allowed = a.allowed_approvers();
                a.is_open() && (allowed.is_empty() || allowed.iter().any(|x| x == approver))
            },
            limit,
        )
    }

    fn select(
        &self,
        tenant: &str,
        keep: impl Fn(&Aggregate) -> bool,
        limit: usize,
    ) -> Vec<pb::ApprovalRequest> {
        let f = self.folded.read().expect("fold lock");
        let mut found: Vec<&Aggregate> = f
            .requests
            .range((tenant.to_string(), String::new())..)
            .take_while(|((t, _), _)| t == tenant)
            .map(|(_, a)| a)
            .filter(|a| keep(a))
            .collect();
        let created = |a: &Aggregate| a.view.created_at.map(|t| (t.seconds, t.nanos));
        found.sort_by(|a, b| {
            match (a.is_open(), b.is_open()) {
                (true, true) => b
                    .view
                    .priority
                    .cmp(&a.view.priority)
                    .then_with(|| created(a).cmp(&created(b))),
                (true, false) => std::cmp::Ordering::Less,
                (false, true) => std::cmp::Ordering::Greater,
                (false, false) => created(b).cmp(&created(a)),
            }
            .then_with(|| a.view.request_id.cmp(&b.view.request_id))
        });
        // At most `limit`, and as many as fit one answer a client takes (4 MiB by default):
        // a thousand requests with large parameters did not.
        let mut bytes = 0;
        found
            .into_iter()
            .take(limit)
            .take_while(|a| {
                bytes += prost::Message::encoded_len(&a.view);
                bytes <= MAX_LIST_BYTES
            })
            .map(|a| a.view.clone())
            .collect()
    }

    /// Requests whose deadline is at or before `now`.
    pub fn due(&self, now: DateTime<Utc>) -> Vec<Key> {
        self.folded
            .read()
            .expect("fold lock")
            .deadlines
            .iter()
            .take_while(|(d, _, _)| *d <= now)
            .map(|(_, t, id)| (t.clone(), id.clone()))
            .collect()
    }

    pub fn next_deadline(&self) -> Option<DateTime<Utc>> {
        self.folded
            .read()
            .expect("fold lock")
            .deadlines
            .iter()
            .next()
            .map(|(d, _, _)| *d)
    }

    /// Keeps the view current until shutdown.
    pub async fn tail(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.catch_up().await {
                tracing::warn!(error = %e, "oversight catch-up failed; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(TAIL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

pub fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::Unspecified => "unspecified",
        Priority::Low => "low",
        Priority::Normal => "normal",
        Priority::High => "high",
        Priority::Critical => "critical",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use creto_streams::embedded::SledLog;
    use creto_streams::{AppendEvent, Headers};

    /// A view of an embedded log in a directory of its own (kept while the first is held).
    async fn on_an_embedded_log() -> (tempfile::TempDir, Arc<SledLog>, OversightView) {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::default();
        let log = Arc::new(SledLog::open(dir.path(), catalog.clone()).unwrap());
        log.ensure_streams(&catalog.specs()).await.unwrap();
        let view = OversightView::new(log.clone(), catalog);
        (dir, log, view)
    }

    /// Appends one request event to request `id` of tenant t1.
    async fn append_event(
        log: &SledLog,
        view: &OversightView,
        id: &str,
        n: u64,
        e: pb::RequestEvent,
    ) {
        log.append(AppendEvent {
            subject: view.request_subject("t1", id),
            id: format!("{id}-{n}"),
            expected_subject_sequence: None,
            headers: Headers::new(),
            payload: e.encode_to_vec().into(),
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn pending_counts_follow_the_folded_requests() {
        use pb::request_event::Event;
        let (_dir, log, view) = on_an_embedded_log().await;
        let requested = |priority: Priority, auto: bool| pb::RequestEvent {
            event: Some(Event::Requested(pb::Requested {
                priority: priority as i32,
                auto_approved: auto,
                ..Default::default()
            })),
            ..Default::default()
        };
        let cancelled = pb::RequestEvent {
            event: Some(Event::Cancelled(pb::Cancelled::default())),
            ..Default::default()
        };
        let recount = |view: &OversightView| {
            let f = view.folded.read().unwrap();
            let mut counts: HashMap<i32, i64> = HashMap::new();
            for agg in f.requests.values().filter(|a| a.is_open()) {
                *counts.entry(agg.view.priority).or_default() += 1;
            }
            let mut kept: Vec<_> = f
                .pending
                .iter()
                .filter(|(_, n)| **n != 0)
                .map(|(p, n)| (*p, *n))
                .collect();
            let mut counted: Vec<_> = counts.into_iter().collect();
            kept.sort();
            counted.sort();
            (kept, counted)
        };
        append_event(&log, &view, "a", 1, requested(Priority::High, false)).await;
        append_event(&log, &view, "b", 1, requested(Priority::High, false)).await;
        append_event(&log, &view, "c", 1, requested(Priority::Low, false)).await;
        append_event(&log, &view, "d", 1, requested(Priority::Low, true)).await;
        view.catch_up().await.unwrap();
        let (kept, counted) = recount(&view);
        assert_eq!(kept, counted);
        assert_eq!(
            kept,
            vec![(Priority::Low as i32, 1), (Priority::High as i32, 2)]
        );
        append_event(&log, &view, "a", 2, cancelled.clone()).await;
        append_event(&log, &view, "c", 2, cancelled.clone()).await;
        // Cancelled twice: counted once.
        append_event(&log, &view, "c", 3, cancelled).await;
        view.catch_up().await.unwrap();
        let (kept, counted) = recount(&view);
        assert_eq!(kept, counted);
        assert_eq!(kept, vec![(Priority::High as i32, 1)]);
    }

    #[tokio::test]
    async fn a_change_wakes_the_watchers_of_its_request_only() {
        let (_dir, log, view) = on_an_embedded_log().await;
        let mut a = view.watch("t1", "a").unwrap();
        let b = view.watch("t1", "b").unwrap();
        append_event(&log, &view, "a", 1, pb::RequestEvent::default()).await;
        view.catch_up().await.unwrap();
        assert!(a.has_changed().unwrap() && !b.has_changed().unwrap());
        a.mark_unchanged();
        append_event(&log, &view, "b", 1, pb::RequestEvent::default()).await;
        append_event(&log, &view, "c", 1, pb::RequestEvent::default()).await;
        view.catch_up().await.unwrap();
        assert!(!a.has_changed().unwrap() && b.has_changed().unwrap());

        // A bounded number of watchers per request; the last to leave forgets the request.
        let more: Vec<_> = (1..MAX_WATCHERS)
            .map(|_| view.watch("t1", "a").unwrap())
            .collect();
        assert!(view.watch("t1", "a").is_none());
        drop((a, more));
        view.unwatch("t1", "a");
        assert!(!view
            .watched
            .lock()
            .unwrap()
            .contains_key(&("t1".into(), "a".into())));
        assert!(view.watch("t1", "a").is_some());
    }
}
