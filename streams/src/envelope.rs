//! The event envelope (architecture note §3): protobuf body, routing facts in headers.
use bytes::Bytes;
use chrono::{DateTime, Utc};
use creto_schemas::events::v1::EventEnvelope;
use prost::Message;

use crate::headers::{content_types, names, Headers};
use crate::log::AppendEvent;

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn from_timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

/// What a writer knows about an event before it is appended.
#[derive(Debug, Clone, Default)]
pub struct EventMeta {
    pub id: String,
    pub event_type: String,
    pub schema_version: u32,
    pub tenant: String,
    pub occurred_at: Option<DateTime<Utc>>,
    pub correlation_id: String,
    pub causation_id: String,
    /// W3C `traceparent` of the command that caused the event, if any.
    pub traceparent: Option<String>,
}

/// Wraps a protobuf payload in an envelope ready to append to `subject`.
pub fn seal<M: Message>(subject: String, meta: EventMeta, payload: &M) -> AppendEvent {
    let now = Utc::now();
    let envelope = EventEnvelope {
        id: meta.id.clone(),
        r#type: meta.event_type.clone(),
        schema_version: meta.schema_version.max(1),
        tenant: meta.tenant.clone(),
        occurred_at: Some(timestamp(meta.occurred_at.unwrap_or(now))),
        recorded_at: Some(timestamp(now)),
        correlation_id: meta.correlation_id,
        causation_id: meta.causation_id,
        payload: payload.encode_to_vec(),
    };
    let mut headers = Headers::new()
        .with(names::CONTENT_TYPE, content_types::ENVELOPE)
        .with(names::EVENT_TYPE, &meta.event_type)
        .with(names::TENANT, &meta.tenant);
    if let Some(tp) = &meta.traceparent {
        headers.insert(names::TRACEPARENT, tp);
    }
    AppendEvent {
        subject,
        id: meta.id,
        expected_subject_sequence: None,
        headers,
        payload: Bytes::from(envelope.encode_to_vec()),
    }
}

/// Decodes an envelope body.
pub fn open(payload: &[u8]) -> Result<EventEnvelope, prost::DecodeError> {
    EventEnvelope::decode(payload)
}
