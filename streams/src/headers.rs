//! Message headers, independent of the log backend.
use std::fmt;

/// Header names the platform writes. JetStream's own (`Nats-Msg-Id`, …) are set by the adapter.
pub mod names {
    pub const CONTENT_TYPE: &str = "Content-Type";
    pub const EVENT_TYPE: &str = "Creto-Event-Type";
    pub const TENANT: &str = "Creto-Tenant";
    /// W3C trace context, so one trace spans command, append and projection.
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    pub const DL_REASON: &str = "Creto-DL-Reason";
    pub const DL_DETAIL: &str = "Creto-DL-Detail";
    pub const DL_STREAM: &str = "Creto-DL-Stream";
    pub const DL_SUBJECT: &str = "Creto-DL-Subject";
    pub const DL_SEQUENCE: &str = "Creto-DL-Sequence";
    pub const DL_DELIVERIES: &str = "Creto-DL-Deliveries";
    /// Payload bytes a dead letter left in the original stream (it was too large to park).
    pub const DL_OMITTED: &str = "Creto-DL-Omitted";
    /// Set by `audit restore`: when the log first accepted the event (RFC 3339). The adapters
    /// report it as `StoredEvent::recorded_at`, so a restored stream decides and projects
    /// exactly as the original did, but only for sequences up to the stream's restore marker
    /// (`Catalog::restore_marker_subject`): a producer setting it on a new event is ignored.
    pub const ORIGINAL_RECORDED_AT: &str = "Creto-Original-Recorded-At";
    /// The id of a platform append, in the clear: JetStream's `Nats-Msg-Id` is keyed (see
    /// `jetstream::ids`), so the audit archive takes the id from here.
    pub const EVENT_ID: &str = "Creto-Event-Id";
}

/// Content types of payloads on the log.
pub mod content_types {
    /// `EventEnvelope` protobuf written by the platform.
    pub const ENVELOPE: &str = "application/vnd.creto.envelope+protobuf";
    /// A producer's CloudEvents 1.0 JSON (structured mode).
    pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";
    /// A producer's CloudEvent as `creto.enablement.metering.v1.UsageEvent` protobuf.
    pub const PROTOBUF: &str = "application/protobuf";
}

/// An ordered multi-map of string headers. Wraps the NATS header map so a message read from
/// JetStream needs no conversion, while the type itself stays backend-neutral.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(pub(crate) async_nats::HeaderMap);

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, name: &str, value: impl AsRef<str>) -> Self {
        self.insert(name, value);
        self
    }

    /// Inserts a header. Line breaks would corrupt the wire format, so they become spaces.
    pub fn insert(&mut self, name: &str, value: impl AsRef<str>) {
        let value = value.as_ref();
        if value.contains(['\r', '\n']) {
            self.0
                .insert(name, value.replace(['\r', '\n'], " ").as_str());
        } else {
            self.0.insert(name, value);
        }
    }

    /// Adds a value to a header, keeping those it already has (multi-valued headers).
    pub fn append(&mut self, name: &str, value: impl AsRef<str>) {
        let value = value.as_ref();
        if value.contains(['\r', '\n']) {
            self.0
                .append(name, value.replace(['\r', '\n'], " ").as_str());
        } else {
            self.0.append(name, value);
        }
    }

    /// The original recorded time of a restored event ([`names::ORIGINAL_RECORDED_AT`]).
    pub fn original_recorded_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let value = self.get(names::ORIGINAL_RECORDED_AT)?;
        chrono::DateTime::parse_from_rfc3339(value)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .flat_map(|(k, vs)| vs.iter().map(move |v| (k.as_ref(), v.as_str())))
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().next().is_none()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}
