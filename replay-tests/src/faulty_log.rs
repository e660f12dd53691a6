//! A real log with faults put in front of it, without stopping the shared NATS server: chosen
//! appends refused as unavailable while armed (the outage of a moment, on one kind of event),
//! and durable consumers wrapped (one that loses a delivery, say).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use creto_streams::catalog::StreamSpec;
use creto_streams::headers::names;
use creto_streams::{
    AppendEvent, Appended, ConsumerSpec, DurableConsumer, EnsureOutcome, EventLog, LogError,
    ReplayFrom, StoredEvent, StreamState,
};
use futures::stream::BoxStream;

type Refuses = Box<dyn Fn(&AppendEvent) -> bool + Send + Sync>;
type WrapsConsumer =
    Box<dyn Fn(Box<dyn DurableConsumer>) -> Box<dyn DurableConsumer> + Send + Sync>;

pub struct FaultyLog {
    inner: Arc<dyn EventLog>,
    refuses: Refuses,
    armed: AtomicBool,
    consumers: Option<WrapsConsumer>,
}

impl FaultyLog {
    /// Armed: refuses the appends `refuses` picks until [`Self::disarm`].
    pub fn new(
        inner: Arc<dyn EventLog>,
        refuses: impl Fn(&AppendEvent) -> bool + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(FaultyLog {
            inner,
            refuses: Box::new(refuses),
            armed: AtomicBool::new(true),
            consumers: None,
        })
    }

    /// Refuses nothing; hands out its durable consumers through `wrap`.
    pub fn wrapping_consumers(
        inner: Arc<dyn EventLog>,
        wrap: impl Fn(Box<dyn DurableConsumer>) -> Box<dyn DurableConsumer> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(FaultyLog {
            inner,
            refuses: Box::new(|_| false),
            armed: AtomicBool::new(false),
            consumers: Some(Box::new(wrap)),
        })
    }

    /// Refuses appends of `event_type` (their `Creto-Event-Type`) until [`Self::disarm`].
    pub fn of_type(inner: Arc<dyn EventLog>, event_type: &str) -> Arc<Self> {
        let event_type = event_type.to_string();
        Self::new(inner, move |e| {
            e.headers.get(names::EVENT_TYPE) == Some(event_type.as_str())
        })
    }

    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    fn refuses(&self, e: &AppendEvent) -> bool {
        self.armed.load(Ordering::SeqCst) && (self.refuses)(e)
    }
}

fn refused() -> LogError {
    LogError::Unavailable("refused by the test".into())
}

#[async_trait::async_trait]
impl EventLog for FaultyLog {
    async fn ensure_streams(
        &self,
        specs: &[StreamSpec],
    ) -> Result<Vec<(String, EnsureOutcome)>, LogError> {
        self.inner.ensure_streams(specs).await
    }
    async fn create_missing_streams(
        &self,
        specs: &[StreamSpec],
    ) -> Result<Vec<(String, EnsureOutcome)>, LogError> {
        self.inner.create_missing_streams(specs).await
    }
    async fn append(&self, event: AppendEvent) -> Result<Appended, LogError> {
        if self.refuses(&event) {
            return Err(refused());
        }
        self.inner.append(event).await
    }
    async fn append_batch(&self, events: Vec<AppendEvent>) -> Vec<Result<Appended, LogError>> {
        if events.iter().any(|e| self.refuses(e)) {
            return events.iter().map(|_| Err(refused())).collect();
        }
        self.inner.append_batch(events).await
    }
    async fn replay(
        &self,
        stream: &str,
        from: ReplayFrom,
        to: Option<u64>,
        filter: Option<&str>,
    ) -> Result<BoxStream<'static, Result<StoredEvent, LogError>>, LogError> {
        self.inner.replay(stream, from, to, filter).await
    }
    async fn follow(
        &self,
        stream: &str,
        from: ReplayFrom,
        filter: Option<&str>,
    ) -> Result<BoxStream<'static, Result<StoredEvent, LogError>>, LogError> {
        self.inner.follow(stream, from, filter).await
    }
    async fn get(&self, stream: &str, sequence: u64) -> Result<Option<StoredEvent>, LogError> {
        self.inner.get(stream, sequence).await
    }
    async fn last_subject_sequence(&self, stream: &str, subject: &str) -> Result<u64, LogError> {
        self.inner.last_subject_sequence(stream, subject).await
    }
    async fn stream_state(&self, stream: &str) -> Result<StreamState, LogError> {
        self.inner.stream_state(stream).await
    }
    async fn consumer(
        &self,
        stream: &str,
        spec: ConsumerSpec,
    ) -> Result<Box<dyn DurableConsumer>, LogError> {
        let consumer = self.inner.consumer(stream, spec).await?;
        Ok(match &self.consumers {
            Some(wrap) => wrap(consumer),
            None => consumer,
        })
    }
    async fn delete_consumer(&self, stream: &str, durable: &str) -> Result<(), LogError> {
        self.inner.delete_consumer(stream, durable).await
    }
    async fn delete_stream(&self, stream: &str) -> Result<(), LogError> {
        self.inner.delete_stream(stream).await
    }
}
