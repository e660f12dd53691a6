//! This replica's in-memory quota books, kept current from the METERING stream.
//!
//! One [`QuotaBook`] per tenant behind a read-write lock: CheckQuota takes the read lock, finds
//! the tenant's book and asks it (allocation-free). The tail applies the stream in order:
//! - `metering.quotas.<tenant>.<subscription>`: the [`QuotaEvent`], at the time the log
//!   recorded it;
//! - `metering.events.*` / `metering.backfill.*`: usage, decoded exactly as the metering
//!   projector does ([`decode`]), counted against the quota keyed by the event's `type` with
//!   its `data.quantity`. An event id already counted for the same tenant and subscription is
//!   not counted again (the log may hold a duplicate older than its duplicate window);
//! - `metering.corrections.*`: a void counts minus the event's current quantity, an amend the
//!   difference, both at the original event's time.
//!
//! Crossed thresholds are appended (once: see `creto_projections::metering::quotas`), and each
//! counter the tail changed is written to the cache after every catch-up, and every 100 ms
//! while the tail follows the log: under
//! `quota-usage:{tenant}:{subscription}:{event_type}:{period start, unix seconds}` (fields
//! `used`, decimal, and `sequence`, the stream sequence it reflects) and as the key's latest
//! under `quota-usage:{tenant}:{subscription}:{event_type}` (plus `period_start` and
//! `period_start_nanos`); then the
//! watermark `quota-usage-watermark`: every counter change up to it is in the cache. A failed
//! write is retried with the next one and holds the watermark back.
//!
//! Warming: a replica serves CheckQuota only after it has applied the stream up to the last
//! sequence it saw when it started (UNAVAILABLE before), so it never answers from nothing.
//! With a watermark in the cache it warms from the counters ([`QuotaView::warm_from_cache`]):
//! the quota definitions are replayed, each key's latest counter restored on top of the
//! definitions up to its sequence, and the stream replayed from the lowest such sequence,
//! skipping what each key already holds. Each counter is a consistent (used, sequence) pair,
//! so a lagging replica overwriting a newer one only makes the replay longer. Without a
//! watermark (a new or flushed cache, the embedded in-process cache after a restart), or with
//! `METERING_QUOTA_WARM_FROM=stream`, it replays the whole stream. After a cache warm-up,
//! a duplicate of a usage event older than the restored counters (one the log kept past its
//! duplicate window) is not recognised.
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use creto_domain::metering::quota::{
    Applied, CheckResult, Entitlement, Quantity, QuotaBook, QuotaError, QuotaEvent,
};
use creto_domain::metering::IngestLimits;
use creto_projections::cache::{Cache, CacheWrite};
use creto_projections::metering::billing::{BillingFact, CorrectionKind};
use creto_projections::metering::decode::{decode, Decoded};
use creto_projections::metering::quotas::{decode_quota, seal_threshold, QuotaFact, ThresholdFact};
use creto_streams::{Catalog, EventLog, LogError, ReplayFrom, StoredEvent, METERING};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::watch;

/// How long the tail waits before following the log again after an error.
const FOLLOW_RETRY: Duration = Duration::from_millis(100);
/// While it follows, how often the tail appends the crossings and writes the counters its
/// runs left (one cache write per interval, not per run: under a trickle of events each run
/// is one event).
const FOLLOW_FLUSH: Duration = Duration::from_millis(100);
/// Events applied together (under one lock) at most, when the follower has that many ready.
const FOLLOW_RUN: usize = 2_000;
/// Counters outlive their period by a margin, then expire.
const COUNTER_TTL: Duration = Duration::from_secs(40 * 24 * 3600);

type Key = (String, String, String);
/// Usage to count: (tenant, subscription, event type), quantity, event time, and the event's
/// dedupe hash (none for a correction).
type Usage = (Key, Quantity, DateTime<Utc>, Option<u64>);
/// Per key, the latest counter of a batch: (period start, used, sequence).
type Latest<'a> = HashMap<(&'a str, &'a str, &'a str), (DateTime<Utc>, Quantity, u64)>;
/// Counters changed by a catch-up: (tenant, subscription, event type, period start) → (used,
/// sequence).
type Dirty = HashMap<(String, String, String, DateTime<Utc>), (Quantity, u64)>;

/// What a run of applied events leaves to do once it ends ([`QuotaView::finish`]).
struct Pass {
    dirty: Dirty,
    crossings: Vec<ThresholdFact>,
}

impl Pass {
    /// A new run, retrying the crossings an earlier one could not append.
    fn begin(state: &mut State) -> Pass {
        Pass {
            dirty: HashMap::new(),
            crossings: std::mem::take(&mut state.pending),
        }
    }
}

impl State {
    /// Whether the event (its hash of tenant, subscription and id) counted, under any event
    /// type: the read model keys events by tenant, subscription and id, so a second event
    /// under a counted id is a duplicate there whatever its type, and must not count here.
    fn was_counted(&self, hash: u64) -> bool {
        self.ids.contains(&hash)
    }

    /// The start of the period the key's event counted in, if it did.
    fn counted_in(&self, key: &Key, hash: u64) -> Option<DateTime<Utc>> {
        self.counted
            .get(key)
            .filter(|(_, seen)| seen.contains(&hash))
            .map(|(start, _)| *start)
    }

    /// Records that the key counted usage in the period starting at `period_start` (and the
    /// event, if it is one).
    fn count(&mut self, key: Key, period_start: DateTime<Utc>, hash: Option<u64>) {
        if self
            .warmed
            .get(&key)
            .is_some_and(|(start, _)| *start != period_start)
        {
            self.warmed.remove(&key);
        }
        let entry = self
            .counted
            .entry(key)
            .or_insert_with(|| (period_start, HashSet::new()));
        if entry.0 != period_start {
            let (_, ended) = std::mem::replace(entry, (period_start, HashSet::new()));
            for h in ended {
                self.ids.remove(&h);
            }
        }
        if let Some(h) = hash {
            entry.1.insert(h);
            self.ids.insert(h);
        }
    }

    /// The start of the period a warm-up restored for the key (still current) when the key's
    /// event at `sequence` is among those its counter holds; whether it counted there depends
    /// on the event's time.
    fn warmed_period(&self, key: &Key, sequence: u64) -> Option<DateTime<Utc>> {
        self.warmed
            .get(key)
            .filter(|(_, through)| sequence <= *through)
            .map(|(start, _)| *start)
    }

    /// Whether the key's event at `sequence` is already in the book (restored from the cache).
    fn skips(&self, tenant: &str, subscription_id: &str, key: &str, sequence: u64) -> bool {
        if self.restored.is_empty() {
            return false;
        }
        self.restored
            .get(&(
                tenant.to_string(),
                subscription_id.to_string(),
                key.to_string(),
            ))
            .is_some_and(|c| sequence <= *c)
    }
}

#[derive(Default)]
struct State {
    /// Per key, the usage events counted in its current period, as 64-bit hashes of (tenant,
    /// subscription, event id): a duplicate is not counted twice, a correction of an event
    /// that never counted is ignored. Dropped when the key's period rolls over (events of an
    /// earlier period no longer count against the quota anyway).
    counted: HashMap<Key, (DateTime<Utc>, HashSet<u64>)>,
    /// Every hash of `counted`, whatever its key's event type.
    ids: HashSet<u64>,
    /// The current quantity of corrected events, by (tenant, subscription, event id).
    corrected: HashMap<Key, f64>,
    /// Crossings not yet appended (the log was unavailable).
    pending: Vec<ThresholdFact>,
    /// After a warm-up from the cache: the sequence each key's state was restored at; the
    /// key's events up to it are already in the book.
    restored: HashMap<Key, u64>,
    /// Per key restored from the cache, its counter's period start and sequence, kept until
    /// the key's period rolls over: the key's events up to that sequence, from that start on,
    /// counted in it, so their corrections count too (`counted` does not hold them).
    warmed: HashMap<Key, (DateTime<Utc>, u64)>,
    /// Counters whose write to the cache failed, written with the next ones.
    unwritten: Dirty,
    /// The last watermark written to the cache (or that needed none: no cache).
    watermark: u64,
}

pub struct QuotaView {
    log: Arc<dyn EventLog>,
    catalog: Catalog,
    limits: IngestLimits,
    cache: Option<(Arc<dyn Cache>, String)>,
    stream: String,
    books: RwLock<HashMap<String, QuotaBook>>,
    applied: AtomicU64,
    warm: AtomicBool,
    /// Sequence this replica must reach before it is warm.
    warm_target: AtomicU64,
    /// One reader of the log at a time; it catches up for every waiter.
    catching_up: tokio::sync::Mutex<State>,
    hasher: std::collections::hash_map::RandomState,
    label_budget: creto_projections::metrics::LabelBudget,
    /// Threshold crossings appended by this replica (tests and logs).
    pub raised: AtomicU64,
    /// Warm from the cache when it can (`METERING_QUOTA_WARM_FROM=stream` turns it off).
    cache_warm: bool,
}

impl QuotaView {
    pub fn new(
        log: Arc<dyn EventLog>,
        catalog: Catalog,
        limits: IngestLimits,
        cache: Option<(Arc<dyn Cache>, String)>,
        label_limit: usize,
    ) -> QuotaView {
        QuotaView {
            stream: catalog.stream(METERING),
            log,
            catalog,
            limits,
            cache,
            books: RwLock::new(HashMap::new()),
            applied: AtomicU64::new(0),
            warm: AtomicBool::new(false),
            warm_target: AtomicU64::new(u64::MAX),
            catching_up: tokio::sync::Mutex::new(State::default()),
            hasher: std::collections::hash_map::RandomState::new(),
            label_budget: creto_projections::metrics::LabelBudget::new(label_limit),
            raised: AtomicU64::new(0),
            cache_warm: std::env::var("METERING_QUOTA_WARM_FROM").map_or(true, |v| v != "stream"),
        }
    }

    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    pub fn is_warm(&self) -> bool {
        self.warm.load(Ordering::Acquire)
    }

    /// `(applied, target)` while warming.
    pub fn warming(&self) -> (u64, u64) {
        (self.applied(), self.warm_target.load(Ordering::Acquire))
    }

    /// The check and whether the quota is hard; `None` when the tenant's subscription has no
    /// metered quota there.
    pub fn check(
        &self,
        tenant: &str,
        subscription_id: &str,
        event_type: &str,
        quantity: Quantity,
        at: DateTime<Utc>,
    ) -> Option<(CheckResult, bool)> {
        let books = self.books.read().expect("quota books lock");
        let quota = books.get(tenant)?.metered(subscription_id, event_type)?;
        Some((quota.check(quantity, at), quota.hard()))
    }

    /// The subscription's entitlement under `key`, cloned.
    pub fn entitlement(
        &self,
        tenant: &str,
        subscription_id: &str,
        key: &str,
    ) -> Option<Entitlement> {
        let books = self.books.read().expect("quota books lock");
        books
            .get(tenant)?
            .entitlement(subscription_id, key)
            .cloned()
    }

    /// Whether `event` may be accepted now by the tenant's book.
    pub fn admit(&self, tenant: &str, event: &QuotaEvent) -> Result<(), QuotaError> {
        let books = self.books.read().expect("quota books lock");
        match books.get(tenant) {
            Some(book) => book.admit(event),
            None => QuotaBook::new().admit(event),
        }
    }

    /// The `subscription_id` label of `metering_quota_exceeded_total`, within the budget.
    pub fn subscription_label(&self, subscription_id: &str) -> String {
        self.label_budget.label(subscription_id).to_string()
    }

    /// Warms (replays the stream up to its current end) then follows it until shutdown.
    pub async fn tail(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            match self.log.last_sequence(&self.stream).await {
                Ok(last) => {
                    self.warm_target.store(last, Ordering::Release);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "quota book cannot read the METERING stream; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
        if self.cache_warm {
            match self.warm_from_cache().await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!("no quota counters in the cache: warming from the stream")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot warm from the cache: warming from the stream")
                }
            }
        }
        // Warm up with one replay to the end, then follow the log with one long-lived reader
        // (not a replay per look: each is a new consumer on JetStream, which at ingest rates
        // kept nats-server busy creating them).
        loop {
            match self.catch_up_to(u64::MAX).await {
                // A replay to the stream's end, which was past the warm target when it began:
                // warm, even when the target itself is no longer stored (the last event
                // removed), which no later event would ever reach (and metering would never
                // be ready).
                Ok(()) => self.mark_warm(),
                Err(e) => tracing::warn!(error = %e, "quota book catch-up failed; retrying"),
            }
            let from = ReplayFrom::Sequence(self.applied() + 1);
            match self.log.follow(&self.stream, from, None).await {
                Ok(events) => {
                    let mut runs = events.ready_chunks(FOLLOW_RUN);
                    let mut flush = tokio::time::interval(FOLLOW_FLUSH);
                    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            run = runs.next() => match run {
                                Some(run) => {
                                    if let Err(e) = self.apply_run(run).await {
                                        tracing::warn!(error = %e, "quota book follow interrupted; following again");
                                        break;
                                    }
                                    self.warm_when_there();
                                }
                                None => break,
                            },
                            _ = flush.tick() => self.flush_deferred().await,
                            _ = shutdown.changed() => return,
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "quota book cannot follow the log; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_RETRY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    fn warm_when_there(&self) {
        if self.applied() >= self.warm_target.load(Ordering::Acquire) {
            self.mark_warm();
        }
    }

    fn mark_warm(&self) {
        if !self.warm.swap(true, Ordering::AcqRel) {
            tracing::info!(applied = self.applied(), "quota book warm");
        }
    }

    /// Appends the crossings and writes the counters the follower's runs left, and the
    /// watermark when it moved (a failed write is retried at the next flush).
    async fn flush_deferred(&self) {
        let mut state = self.catching_up.lock().await;
        if state.pending.is_empty()
            && state.unwritten.is_empty()
            && self.applied() <= state.watermark
        {
            return;
        }
        let pass = Pass::begin(&mut state);
        self.finish(&mut state, pass).await;
    }

    /// Applies the events the follower had ready (those a catch-up applied meanwhile are
    /// skipped) and leaves their crossings and counters to the next flush; an error ends the
    /// run after what came before it.
    async fn apply_run(&self, run: Vec<Result<StoredEvent, LogError>>) -> Result<(), LogError> {
        let mut state = self.catching_up.lock().await;
        let mut pass = Pass::begin(&mut state);
        let mut outcome = Ok(());
        for event in run {
            match event {
                Ok(e) if e.sequence <= self.applied() => {}
                Ok(e) => self.apply_event(&mut state, &mut pass, &e).await,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        // Applied in log order under the lock: these counters are newer than any left before.
        state.unwritten.extend(pass.dirty);
        state.pending.extend(pass.crossings);
        outcome
    }

    /// Makes sure everything up to `sequence` is applied (`u64::MAX`: up to the stream's end
    /// now). One reader catches up for all the callers waiting.
    pub async fn catch_up_to(&self, sequence: u64) -> Result<(), LogError> {
        if self.applied() >= sequence {
            return Ok(());
        }
        let mut state = self.catching_up.lock().await;
        if self.applied() >= sequence {
            return Ok(());
        }
        let from = self.applied() + 1;
        let mut events = self
            .log
            .replay(&self.stream, ReplayFrom::Sequence(from), None, None)
            .await?;
        let mut pass = Pass::begin(&mut state);
        while let Some(event) = events.try_next().await? {
            self.apply_event(&mut state, &mut pass, &event).await;
        }
        drop(events);
        self.finish(&mut state, pass).await;
        Ok(())
    }

    /// Applies one event of the stream, in order (see the module documentation).
    async fn apply_event(&self, state: &mut State, pass: &mut Pass, event: &StoredEvent) {
        let mut usage: Vec<Usage> = Vec::new();
        if let Some(fact) = decode_quota(&self.catalog, event) {
            match fact {
                Ok(QuotaFact::Quota { tenant, event: q }) => {
                    let (sub, key) = q.key();
                    if !state.skips(&tenant, sub, key, event.sequence) {
                        let mut books = self.books.write().expect("quota books lock");
                        books
                            .entry(tenant)
                            .or_default()
                            .apply(&q, event.recorded_at);
                    }
                }
                Ok(QuotaFact::Threshold(_)) => {}
                Err(detail) => {
                    tracing::warn!(sequence = event.sequence, %detail, "unreadable quota fact skipped")
                }
            }
        } else {
            match decode(event, &self.catalog, &self.limits) {
                Decoded::Usage(r) => {
                    let k: Key = (r.tenant, r.subscription_id, r.event_type);
                    let h = self.hasher.hash_one((&k.0, &k.1, &r.id));
                    let restored = state.skips(&k.0, &k.1, &k.2, event.sequence);
                    if !restored && !state.was_counted(h) {
                        if let Ok(q) = Quantity::from_f64(r.quantity) {
                            // Counted when it was recorded at the latest: an event stamped
                            // in the next period (a few minutes ahead is valid) would move
                            // the book there early, and the rest of this period's usage would
                            // land in a closed period and count against nothing.
                            usage.push((k, q, r.time.min(event.recorded_at), Some(h)));
                        }
                    }
                }
                Decoded::Billing(BillingFact::Correction(c)) => {
                    let key = (
                        c.tenant.clone(),
                        c.subscription_id.clone(),
                        c.event_id.clone(),
                    );
                    let usage_key: Key = (
                        c.tenant.clone(),
                        c.subscription_id.clone(),
                        c.event_type.clone(),
                    );
                    let h = self
                        .hasher
                        .hash_one((&c.tenant, &c.subscription_id, &c.event_id));
                    let counted_in = state.counted_in(&usage_key, h);
                    let warmed_in = counted_in
                        .is_none()
                        .then(|| state.warmed_period(&usage_key, c.event_sequence))
                        .flatten();
                    let original = if warmed_in.is_some() || !state.corrected.contains_key(&key) {
                        self.original(c.event_sequence).await
                    } else {
                        None
                    };
                    let before = match state.corrected.get(&key) {
                        Some(q) => *q,
                        None => original.map_or(0.0, |(q, _)| q),
                    };
                    // Held by a warmed counter, it counted there if the book counted it in
                    // that period: by the original's time, as the usage case above.
                    let counted_in = counted_in
                        .or(warmed_in.filter(|start| original.is_some_and(|(_, at)| at >= *start)));
                    let after = match c.kind {
                        CorrectionKind::Void => 0.0,
                        CorrectionKind::Amend => c.quantity.unwrap_or(before),
                    };
                    // A voided event stays voided: later corrections change nothing. An
                    // event that did not count (no quota then) is not taken back either.
                    let voided = state.corrected.get(&key).is_some_and(|q| q.is_nan());
                    let restored =
                        state.skips(&c.tenant, &c.subscription_id, &c.event_type, event.sequence);
                    if let (Some(at), false, false) = (counted_in, voided, restored) {
                        state.corrected.insert(
                            key,
                            if c.kind == CorrectionKind::Void {
                                f64::NAN
                            } else {
                                after
                            },
                        );
                        if let Ok(delta) = Quantity::from_f64(after - before) {
                            if delta != Quantity::ZERO {
                                // In the period the event counted in (its time may be
                                // past it, see above).
                                usage.push((
                                    (c.tenant, c.subscription_id, c.event_type),
                                    delta,
                                    at,
                                    None,
                                ));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if !usage.is_empty() {
            let mut books = self.books.write().expect("quota books lock");
            for ((tenant, sub, event_type), q, time, id) in usage {
                let Some(book) = books.get_mut(&tenant) else {
                    continue;
                };
                let applied = book.apply_usage(&sub, &event_type, q, time);
                if let Applied::Counted {
                    period_start, used, ..
                } = applied
                {
                    state.count(
                        (tenant.clone(), sub.clone(), event_type.clone()),
                        period_start,
                        id,
                    );
                    for reached in applied.thresholds_reached(&sub, &event_type) {
                        pass.crossings.push(ThresholdFact {
                            tenant: tenant.clone(),
                            reached,
                        });
                    }
                    pass.dirty.insert(
                        (
                            tenant.clone(),
                            sub.clone(),
                            event_type.clone(),
                            period_start,
                        ),
                        (used, event.sequence),
                    );
                }
            }
        }
        self.applied.store(event.sequence, Ordering::Release);
    }

    /// After a run of events: appends the crossings, writes the changed counters to the cache
    /// (with those a failed write left), then the watermark.
    async fn finish(&self, state: &mut State, mut pass: Pass) {
        for fact in pass.crossings {
            match self.log.append(seal_threshold(&self.catalog, &fact)).await {
                Ok(a) if !a.is_duplicate() => {
                    self.raised.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        tenant = %fact.tenant,
                        subscription_id = %fact.reached.subscription_id,
                        event_type = %fact.reached.meter,
                        pct = fact.reached.pct,
                        "quota threshold reached"
                    );
                }
                Ok(_) | Err(LogError::Conflict { .. }) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "threshold crossing not appended; will retry");
                    state.pending.push(fact);
                }
            }
        }
        if state
            .restored
            .values()
            .max()
            .is_some_and(|c| self.applied() >= *c)
        {
            // Past every restored key's sequence: nothing left to skip.
            state.restored.clear();
        }
        for (k, (used, seq)) in std::mem::take(&mut state.unwritten) {
            let newer = pass.dirty.get(&k).is_some_and(|(_, s)| *s >= seq);
            if !newer {
                pass.dirty.insert(k, (used, seq));
            }
        }
        if let Err(unwritten) = self.write_counters(pass.dirty).await {
            state.unwritten = unwritten;
        } else if self.write_watermark().await {
            state.watermark = self.applied();
        }
    }

    /// Everything this replica counted up to `applied` is in the cache: record it, so that a
    /// replica warming from the cache knows a key without a counter had no usage by then.
    /// Whether the cache has it now (true without a cache: nothing to write).
    async fn write_watermark(&self) -> bool {
        let Some((cache, prefix)) = &self.cache else {
            return true;
        };
        let write = CacheWrite::Set {
            key: watermark_key(prefix),
            value: self.applied().to_string(),
        };
        match cache.write(vec![write]).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "quota counters watermark not written to the cache");
                false
            }
        }
    }

    /// Warms from the cache instead of replaying all of the stream, when the cache holds a
    /// watermark W (everything counted up to W was written): the quota definitions are
    /// replayed (their subjects only); each metered key's latest counter (used, period start,
    /// sequence C) is restored on top of the definitions up to C (a key without a counter
    /// gets the definitions up to W, and no usage); the tail then replays the stream from
    /// the lowest of those sequences, skipping each key's events up to its own. False (and
    /// nothing changed) when there is no cache or watermark: the caller replays the stream.
    pub async fn warm_from_cache(&self) -> Result<bool, String> {
        let Some((cache, prefix)) = &self.cache else {
            return Ok(false);
        };
        let watermark = cache
            .get(&watermark_key(prefix))
            .await
            .map_err(|e| e.to_string())?
            .and_then(|v| v.parse::<u64>().ok());
        let Some(watermark) = watermark else {
            return Ok(false);
        };
        // A key without a counter is taken for a key without usage: true only where the cache
        // evicts nothing. Where it may (the runbook's `allkeys-lru`), an evicted counter would
        // restore a subscription's usage as zero, past its hard limit.
        if !cache
            .keeps_what_it_is_given()
            .await
            .map_err(|e| e.to_string())?
        {
            tracing::info!("the cache may evict keys (maxmemory with an evicting policy, or CONFIG refused): quota counters are rebuilt from the stream, not read from it");
            return Ok(false);
        }
        let mut state = self.catching_up.lock().await;
        if self.applied() > 0 {
            return Ok(false);
        }
        let filter = self.catalog.subject("metering.quotas.>");
        let mut events = self
            .log
            .replay(&self.stream, ReplayFrom::Start, None, Some(&filter))
            .await
            .map_err(|e| e.to_string())?;
        let mut defs: Vec<(u64, DateTime<Utc>, String, QuotaEvent)> = Vec::new();
        while let Some(event) = events.try_next().await.map_err(|e| e.to_string())? {
            if let Some(Ok(QuotaFact::Quota { tenant, event: q })) =
                decode_quota(&self.catalog, &event)
            {
                defs.push((event.sequence, event.recorded_at, tenant, q));
            }
        }
        drop(events);
        let mut at: HashMap<Key, u64> = HashMap::new();
        let mut counters: HashMap<Key, (DateTime<Utc>, Quantity)> = HashMap::new();
        for (_, _, tenant, q) in &defs {
            let (sub, key) = q.key();
            let k = (tenant.clone(), sub.to_string(), key.to_string());
            if at.contains_key(&k) {
                continue;
            }
            let fields = cache
                .hash(&latest_key(prefix, tenant, sub, key))
                .await
                .map_err(|e| e.to_string())?;
            let parsed = (|| {
                // Exact: an anchor with a fraction of a second, cut to whole seconds, put the
                // start in the period before, and the warmed counter started again from zero.
                // Whole seconds only in counters written before the exact field existed.
                let start = match fields.get("period_start_nanos") {
                    Some(n) => DateTime::from_timestamp_nanos(n.parse().ok()?),
                    None => DateTime::from_timestamp(fields.get("period_start")?.parse().ok()?, 0)?,
                };
                let used = fields.get("used")?.parse::<Quantity>().ok()?;
                let seq = fields.get("sequence")?.parse::<u64>().ok()?;
                Some((start, used, seq))
            })();
            match parsed {
                Some((start, used, seq)) => {
                    counters.insert(k.clone(), (start, used));
                    at.insert(k, seq);
                }
                None => {
                    at.insert(k, watermark);
                }
            }
        }
        let mut books: HashMap<String, QuotaBook> = HashMap::new();
        for (seq, recorded_at, tenant, q) in &defs {
            let (sub, key) = q.key();
            let k = (tenant.clone(), sub.to_string(), key.to_string());
            if *seq <= at[&k] {
                books
                    .entry(tenant.clone())
                    .or_default()
                    .apply(q, *recorded_at);
            }
        }
        for ((tenant, sub, key), (start, used)) in &counters {
            if let Some(book) = books.get_mut(tenant) {
                book.restore_usage(sub, key, *start, *used);
            }
        }
        let from = at
            .values()
            .copied()
            .min()
            .unwrap_or(watermark)
            .min(watermark);
        *self.books.write().expect("quota books lock") = books;
        state.warmed = counters
            .iter()
            .map(|(k, (start, _))| (k.clone(), (*start, at[k])))
            .collect();
        state.restored = at;
        self.applied.store(from, Ordering::Release);
        tracing::info!(
            watermark,
            from,
            restored = counters.len(),
            "quota book warmed from the cache; replaying the stream from there"
        );
        Ok(true)
    }

    /// The accepted quantity of the usage event at `sequence` and the time the book counted it
    /// at (its time, or when it was recorded if that was earlier); None if it cannot be read.
    async fn original(&self, sequence: u64) -> Option<(f64, DateTime<Utc>)> {
        let stored = self.log.get(&self.stream, sequence).await.ok()??;
        match decode(&stored, &self.catalog, &self.limits) {
            Decoded::Usage(r) => Some((r.quantity, r.time.min(stored.recorded_at))),
            _ => None,
        }
    }

    /// Writes each counter under its period's key and as the key's latest; the counters
    /// back when the write failed.
    async fn write_counters(&self, dirty: Dirty) -> Result<(), Dirty> {
        let Some((cache, prefix)) = &self.cache else {
            return Ok(());
        };
        if dirty.is_empty() {
            return Ok(());
        }
        // Per key, only the latest period's counter is the key's latest.
        let mut latest: Latest = HashMap::new();
        for ((tenant, sub, event_type, start), (used, seq)) in &dirty {
            let e = latest
                .entry((tenant, sub, event_type))
                .or_insert((*start, *used, *seq));
            if *seq > e.2 {
                *e = (*start, *used, *seq);
            }
        }
        let mut writes: Vec<CacheWrite> = dirty
            .iter()
            .map(
                |((tenant, sub, event_type, start), (used, seq))| CacheWrite::Hash {
                    key: counter_key(prefix, tenant, sub, event_type, *start),
                    fields: vec![
                        ("used".into(), used.to_string()),
                        ("sequence".into(), seq.to_string()),
                    ],
                    ttl: Some(COUNTER_TTL),
                },
            )
            .collect();
        writes.extend(
            latest.iter().map(
                |((tenant, sub, event_type), (start, used, seq))| CacheWrite::Hash {
                    key: latest_key(prefix, tenant, sub, event_type),
                    fields: vec![
                        ("period_start".into(), start.timestamp().to_string()),
                        (
                            "period_start_nanos".into(),
                            start.timestamp_nanos_opt().unwrap_or_default().to_string(),
                        ),
                        ("used".into(), used.to_string()),
                        ("sequence".into(), seq.to_string()),
                    ],
                    ttl: Some(COUNTER_TTL),
                },
            ),
        );
        drop(latest);
        match cache.write(writes).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "quota counters not written to the cache; will retry");
                Err(dirty)
            }
        }
    }
}

/// `{prefix}quota-usage:{tenant}:{subscription}:{event_type}`: the key's latest counter
/// (`period_start` in unix seconds and `period_start_nanos`, `used`, `sequence`), which a
/// warming replica reads.
pub fn latest_key(prefix: &str, tenant: &str, subscription_id: &str, event_type: &str) -> String {
    format!("{prefix}quota-usage:{tenant}:{subscription_id}:{event_type}")
}

/// `{prefix}quota-usage-watermark`: every counter change up to this sequence is in the cache.
pub fn watermark_key(prefix: &str) -> String {
    format!("{prefix}quota-usage-watermark")
}

/// `{prefix}quota-usage:{tenant}:{subscription}:{event_type}:{period start, unix seconds}`.
pub fn counter_key(
    prefix: &str,
    tenant: &str,
    subscription_id: &str,
    event_type: &str,
    period_start: DateTime<Utc>,
) -> String {
    format!(
        "{prefix}quota-usage:{tenant}:{subscription_id}:{event_type}:{}",
        period_start.timestamp()
    )
}
