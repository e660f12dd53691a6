//! The agent key directory as a read model: the `messaging.keys.<tenant>.<agent>` events
//! folded in memory by every replica. It is caught up before any answer that could depend on
//! a newer event (after a write, and before saying a key is unknown) and every
//! [`REFRESH`] otherwise, so a revocation made on one replica holds on all within that time.
//! Throwing it away and replaying the subject rebuilds it: that is what a start does.
use std::sync::{Arc, RwLock};
use std::time::Duration;

use creto_domain::messaging::directory::{AgentKeys, Directory};
use creto_schemas::messaging::v1::KeyEvent;
use creto_streams::{Catalog, EventLog, LogError, ReplayFrom, MESSAGING};
use futures::TryStreamExt;
use prost::Message;
use tokio::sync::watch;

pub const REFRESH: Duration = Duration::from_millis(500);

pub struct DirectoryView {
    log: Arc<dyn EventLog>,
    catalog: Catalog,
    stream: String,
    state: RwLock<State>,
    /// One catch-up at a time, so events are applied once and in order.
    catching_up: tokio::sync::Mutex<()>,
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
        }
    }

    /// Applies every key event appended since the last catch-up.
    pub async fn catch_up(&self) -> Result<(), LogError> {
        let _one = self.catching_up.lock().await;
        let from = self.state.read().expect("directory lock").applied_through + 1;
        let filter = self.catalog.subject("messaging.keys.>");
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
            let mut tokens = logical.split('.').skip(2);
            let (Some(tenant), Some(agent)) = (tokens.next(), tokens.next()) else {
                continue;
            };
            let mut state = self.state.write().expect("directory lock");
            state.applied_through = event.sequence;
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
        Ok(())
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

    /// The agent's keys, catching up first when the agent or `key_id` is not known yet.
    pub async fn agent_fresh(
        &self,
        tenant: &str,
        agent_id: &str,
        key_id: Option<&str>,
    ) -> Result<Option<AgentKeys>, LogError> {
        let known = self.agent(tenant, agent_id);
        let has_key = |a: &AgentKeys| key_id.is_none_or(|k| a.get(k).is_some());
        if known.as_ref().is_some_and(has_key) {
            return Ok(known);
        }
        self.catch_up().await?;
        Ok(self.agent(tenant, agent_id))
    }

    /// Keeps the directory current until shutdown.
    pub async fn refresh(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.catch_up().await {
                tracing::warn!(error = %e, "key directory catch-up failed; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
