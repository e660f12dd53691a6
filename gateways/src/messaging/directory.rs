//! The agent key directory as a read model: the `messaging.keys.<tenant>.<agent>` events
//! folded in memory by every replica. It is caught up before any answer that could depend on
//! a newer event (after a write, and before saying a key is unknown), and otherwise follows the
//! log, so a revocation made on one replica holds on all as soon as the log holds it (after
//! an interruption of the log, within [`REFRESH`] of its return).
//! Throwing it away and replaying the subject rebuilds it: that is what a start does.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use creto_domain::messaging::directory::{AgentKeys, Directory};
use creto_schemas::messaging::v1::KeyEvent;
use creto_streams::{Catalog, EventLog, LogError, ReplayFrom, StoredEvent, MESSAGING};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tokio::sync::watch;

/// How long the follower waits before following again after the log failed.
pub const REFRESH: Duration = Duration::from_millis(500);

/// How long a writer waits for the follower to apply its key event before reading the log
/// itself.
const FOLLOWER_WAIT: Duration = Duration::from_secs(2);

pub struct DirectoryView {
    log: Arc<dyn EventLog>,
    catalog: Catalog,
    stream: String,
    state: RwLock<State>,
    /// One catch-up at a time, so events are applied once and in order.
    catching_up: tokio::sync::Mutex<()>,
    /// The sequence of the last key event applied, for writers waiting on the follower.
    applied: watch::Sender<u64>,
    /// Whether `refresh` is following the log right now.
    following: AtomicBool,
}

#[derive(Default)]
struct State {
    agents: Directory,
    applied_through: u64,
}

impl DirectoryView {
    pub fn new(log: Arc<dyn EventLog>, catalog: Catalog) -> Self {
        DirectoryView {
            stream: catalog.stream(MESSAGING),
            log,
            catalog,
            state: RwLock::new(State::default()),
            catching_up: tokio::sync::Mutex::new(()),
            applied: watch::channel(0).0,
            following: AtomicBool::new(false),
        }
    }

    /// Applies every key event appended since the last catch-up.
    pub async fn catch_up(&self) -> Result<(), LogError> {
        let _one = self.catching_up.lock().await;
        let from = self.state.read().expect("directory lock").applied_through + 1;
        let mut events = self
            .log
            .replay(
                &self.stream,
                ReplayFrom::Sequence(from),
                None,
                Some(&self.filter()),
            )
            .await?;
        while let Some(event) = events.try_next().await? {
            self.apply(&event);
        }
        Ok(())
    }

    fn filter(&self) -> String {
        self.catalog.subject("messaging.keys.>")
    }

    /// Folds one key event in, unless it was applied already. Callers hold `catching_up`.
    fn apply(&self, event: &StoredEvent) {
        let logical = self.catalog.strip(&event.subject);
        let mut tokens = logical.split('.').skip(2);
        let (Some(tenant), Some(agent)) = (tokens.next(), tokens.next()) else {
            return;
        };
        let mut state = self.state.write().expect("directory lock");
        if event.sequence <= state.applied_through {
            return;
        }
        state.applied_through = event.sequence;
        self.applied.send_replace(event.sequence);
        match KeyEvent::decode(event.payload.as_ref()) {
            Ok(KeyEvent { event: Some(e) }) => state
                .agents
                .entry((tenant.to_string(), agent.to_string()))
                .or_default()
                .apply(&e, event.sequence),
            // Only the gateway appends here, after validating; anything else is skipped
            // loudly rather than stopping the directory.
            _ => tracing::error!(sequence = event.sequence, "undecodable key event skipped"),
        }
    }

    /// Returns once the key event stored at `sequence` is applied: from the follower when it
    /// runs (no read of the log), else, or if it has not within [`FOLLOWER_WAIT`], by a
    /// catch-up.
    pub async fn caught_up_to(&self, sequence: u64) -> Result<(), LogError> {
        if self.following.load(Ordering::Acquire) {
            let mut applied = self.applied.subscribe();
            let reached = tokio::time::timeout(FOLLOWER_WAIT, applied.wait_for(|a| *a >= sequence));
            if matches!(reached.await, Ok(Ok(_))) {
                return Ok(());
            }
        }
        self.catch_up().await
    }

    /// The agent's keys as of the last catch-up.
    pub fn agent(&self, tenant: &str, agent_id: &str) -> Option<AgentKeys> {
        self.state
            .read()
            .expect("directory lock")
            .agents
            .get(&(tenant.to_string(), agent_id.to_string()))
            .cloned()
    }

    /// The agent's keys, once the agent's last key event is applied when the agent or
    /// `key_id` is not known yet. Only the agent's own subject can hold what is missing: one
    /// lookup of its last sequence, then the follower's progress (a read of the log only when
    /// it is not following), where a catch-up of every key event since the last one, one at a
    /// time, made each envelope naming an unknown agent or key a read of the log that held up
    /// the others (a batch of a thousand, a thousand reads).
    pub async fn agent_fresh(
        &self,
        tenant: &str,
        agent_id: &str,
        key_id: Option<&str>,
    ) -> Result<Option<AgentKeys>, LogError> {
        let known = self.agent(tenant, agent_id);
        let has_key = |a: &AgentKeys| key_id.is_none_or(|k| a.get(k).is_some());
        // Known keys are current while the follower runs; when it does not, a revocation may
        // be in the log and not here, so the agent's subject is looked up as for an unknown.
        if known.as_ref().is_some_and(has_key) && self.following.load(Ordering::Acquire) {
            return Ok(known);
        }
        let subject = self
            .catalog
            .subject(&format!("messaging.keys.{tenant}.{agent_id}"));
        let last = self
            .log
            .last_subject_sequence(&self.stream, &subject)
            .await?;
        if last > self.state.read().expect("directory lock").applied_through {
            self.caught_up_to(last).await?;
        }
        Ok(self.agent(tenant, agent_id))
    }

    /// Keeps the directory current until shutdown: follows the key subjects (one long-lived
    /// reader), so a key event stored by any replica is applied as soon as the log holds it.
    pub async fn refresh(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let from = self.state.read().expect("directory lock").applied_through + 1;
            let followed = self
                .log
                .follow(
                    &self.stream,
                    ReplayFrom::Sequence(from),
                    Some(&self.filter()),
                )
                .await;
            match followed {
                Ok(mut events) => {
                    self.following.store(true, Ordering::Release);
                    let stopped = loop {
                        tokio::select! {
                            next = events.next() => match next {
                                Some(Ok(event)) => {
                                    let _one = self.catching_up.lock().await;
                                    self.apply(&event);
                                }
                                Some(Err(e)) => {
                                    tracing::warn!(error = %e, "key directory follow interrupted; following again");
                                    break false;
                                }
                                None => break false,
                            },
                            _ = shutdown.changed() => break true,
                        }
                    };
                    self.following.store(false, Ordering::Release);
                    if stopped {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "key directory cannot follow the log; retrying")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
