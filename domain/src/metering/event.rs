//! Validation of producer usage events (CloudEvents 1.0, structured JSON or protobuf).
//!
//! "Now" is always passed in: the live projection uses the time the log recorded the event,
//! so replaying the log years later accepts and rejects exactly the same events.
use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value};

/// Limits on accepted events, all configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestLimits {
    /// Largest accepted event, in bytes.
    pub max_bytes: usize,
    /// How far ahead of the log's clock an event time may be.
    pub max_future: Duration,
    /// How far behind the log's clock an event time may be (the late-event window).
    pub late_window: Duration,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_bytes: 64 * 1024,
            max_future: Duration::minutes(5),
            late_window: Duration::days(7),
        }
    }
}

/// Why an event was refused. `as_str` is the `reason` label of
/// `metering_events_invalid_total` and the dead-letter reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    MalformedJson,
    MalformedProtobuf,
    UnsupportedSpecversion,
    MissingField,
    WrongType,
    InvalidField,
    SubjectMismatch,
    QuantityNegative,
    QuantityNotFinite,
    QuantityTooLarge,
    TimeInFuture,
    TimeTooOld,
    Oversized,
}

impl InvalidReason {
    pub const ALL: [InvalidReason; 13] = [
        Self::MalformedJson,
        Self::MalformedProtobuf,
        Self::UnsupportedSpecversion,
        Self::MissingField,
        Self::WrongType,
        Self::InvalidField,
        Self::SubjectMismatch,
        Self::QuantityNegative,
        Self::QuantityNotFinite,
        Self::QuantityTooLarge,
        Self::TimeInFuture,
        Self::TimeTooOld,
        Self::Oversized,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::MalformedJson => "malformed_json",
            Self::MalformedProtobuf => "malformed_protobuf",
            Self::UnsupportedSpecversion => "unsupported_specversion",
            Self::MissingField => "missing_field",
            Self::WrongType => "wrong_type",
            Self::InvalidField => "invalid_field",
            Self::SubjectMismatch => "subject_mismatch",
            Self::QuantityNegative => "quantity_negative",
            Self::QuantityNotFinite => "quantity_not_finite",
            Self::QuantityTooLarge => "quantity_too_large",
            Self::TimeInFuture => "time_in_future",
            Self::TimeTooOld => "time_too_old",
            Self::Oversized => "oversized",
        }
    }
}

/// A refused event: a machine-readable reason and a sentence that says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct Invalid {
    pub reason: InvalidReason,
    pub detail: String,
}

fn invalid(reason: InvalidReason, detail: impl Into<String>) -> Invalid {
    Invalid {
        reason,
        detail: detail.into(),
    }
}

/// A usage event as a producer sent it, before validation. Every field optional so that
/// "missing" and "wrong type" can be told apart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawUsageEvent {
    pub specversion: Option<Value>,
    pub id: Option<Value>,
    pub source: Option<Value>,
    pub event_type: Option<Value>,
    pub subject: Option<Value>,
    /// RFC 3339 text (JSON) or an already parsed time (protobuf).
    pub time: Option<Value>,
    pub data: Option<Value>,
    /// CloudEvents extension attribute naming the tenant.
    pub tenant: Option<Value>,
}

impl RawUsageEvent {
    /// Parses CloudEvents structured-mode JSON.
    pub fn from_json(bytes: &[u8]) -> Result<RawUsageEvent, Invalid> {
        serde_json::from_slice(bytes).map_err(|e| {
            if e.classify() == serde_json::error::Category::Data {
                // The only type the reader asks for is the top-level object.
                invalid(
                    InvalidReason::MalformedJson,
                    "a CloudEvent must be a JSON object",
                )
            } else {
                invalid(InvalidReason::MalformedJson, format!("not valid JSON: {e}"))
            }
        })
    }
}

/// Reads the attributes straight into their fields, as reading the whole object into a
/// `serde_json::Map` and taking them out of it would (a repeated attribute: the last one wins;
/// other attributes are read and dropped), without building that map and its keys: decoding is
/// most of a rebuild's and a projector's CPU time per event.
impl<'de> serde::Deserialize<'de> for RawUsageEvent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Attributes;
        impl<'de> serde::de::Visitor<'de> for Attributes {
            type Value = RawUsageEvent;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawUsageEvent, A::Error> {
                let mut e = RawUsageEvent::default();
                while let Some(Key(key)) = map.next_key()? {
                    let slot = match key.as_ref() {
                        "specversion" => &mut e.specversion,
                        "id" => &mut e.id,
                        "source" => &mut e.source,
                        "type" => &mut e.event_type,
                        "subject" => &mut e.subject,
                        "time" => &mut e.time,
                        "data" => &mut e.data,
                        "tenant" => &mut e.tenant,
                        _ => {
                            // Read as a value, not skipped: skipping checks less (a number
                            // out of range, a lone surrogate), and an event the log's first
                            // reading refused must be refused by every replay.
                            map.next_value::<Value>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(e)
            }
        }
        d.deserialize_map(Attributes)
    }
}

/// An object key, borrowed from the input unless it had escapes.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> serde::de::Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(s.into()))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(s.to_string().into()))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// An accepted usage event.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub id: String,
    pub source: String,
    pub event_type: String,
    pub subscription_id: String,
    pub tenant: String,
    pub time: DateTime<Utc>,
    pub quantity: f64,
    /// `data` without `quantity`: the dimensions.
    pub dimensions: Map<String, Value>,
}

pub const DEFAULT_TENANT: &str = "default";

/// The largest quantity one event may carry. Usage is summed in 64-bit floats (queries, quotas,
/// the counters in Redis): with 1e308 in two events, a sum overflows and the subscription's
/// usage can no longer be queried. At 10^15 an overflow would take 10^293 events, and one
/// event's whole units stay exact (below 2^53 ≈ 9·10^15).
pub const MAX_QUANTITY: f64 = 1e15;

fn text(field: &'static str, v: Option<Value>, max: usize) -> Result<String, Invalid> {
    match v {
        None | Some(Value::Null) => Err(invalid(
            InvalidReason::MissingField,
            format!("`{field}` is required"),
        )),
        Some(Value::String(s)) if s.is_empty() => Err(invalid(
            InvalidReason::MissingField,
            format!("`{field}` must not be empty"),
        )),
        Some(Value::String(s)) if s.len() > max => Err(invalid(
            InvalidReason::InvalidField,
            format!("`{field}` is longer than {max} bytes"),
        )),
        Some(Value::String(s)) if s.chars().any(char::is_control) => Err(invalid(
            InvalidReason::InvalidField,
            format!("`{field}` contains control characters"),
        )),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(invalid(
            InvalidReason::WrongType,
            format!("`{field}` must be a string, got {}", type_name(&other)),
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Characters allowed in a subscription id: it is a NATS subject token and a Redis key part.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Event types: `agent.execution`, `llm.tokens/v2`.
pub fn is_event_type(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':'))
}

/// Validates a raw event.
///
/// `subject_token` is the last token of the NATS subject it arrived on (None for gRPC);
/// `now` is when the log recorded it; `size` its encoded size in bytes.
pub fn validate(
    raw: RawUsageEvent,
    subject_token: Option<&str>,
    now: DateTime<Utc>,
    size: usize,
    limits: &IngestLimits,
) -> Result<UsageRecord, Invalid> {
    if size > limits.max_bytes {
        return Err(invalid(
            InvalidReason::Oversized,
            format!(
                "event is {size} bytes, the limit is {} bytes",
                limits.max_bytes
            ),
        ));
    }
    match &raw.specversion {
        Some(Value::String(v)) if v == "1.0" => {}
        None | Some(Value::Null) => {
            return Err(invalid(
                InvalidReason::MissingField,
                "`specversion` is required and must be \"1.0\"",
            ))
        }
        Some(other) => {
            return Err(invalid(
                InvalidReason::UnsupportedSpecversion,
                format!("`specversion` must be \"1.0\", got {other}"),
            ))
        }
    }
    let id = text("id", raw.id, 256)?;
    let source = text("source", raw.source, 512)?;
    let event_type = text("type", raw.event_type, 128)?;
    if !is_event_type(&event_type) {
        return Err(invalid(
            InvalidReason::InvalidField,
            "`type` may contain only letters, digits and . _ - / :",
        ));
    }
    let subscription_id = text("subject", raw.subject, 128)?;
    if !is_token(&subscription_id) {
        return Err(invalid(
            InvalidReason::InvalidField,
            "`subject` (the subscription id) may contain only letters, digits, _ and -",
        ));
    }
    if let Some(token) = subject_token {
        if token != subscription_id {
            return Err(invalid(
                InvalidReason::SubjectMismatch,
                format!("`subject` is {subscription_id:?} but the event was published to metering.events.{token}"),
            ));
        }
    }
    let tenant = match raw.tenant {
        None | Some(Value::Null) => DEFAULT_TENANT.to_string(),
        t => text("tenant", t, 128)?,
    };
    let time = match raw.time {
        None | Some(Value::Null) => {
            return Err(invalid(
                InvalidReason::MissingField,
                "`time` is required (RFC 3339)",
            ))
        }
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(&s)
            .map_err(|e| {
                invalid(
                    InvalidReason::InvalidField,
                    format!("`time` is not RFC 3339 ({e}): {s:?}"),
                )
            })?
            .with_timezone(&Utc),
        Some(other) => {
            return Err(invalid(
                InvalidReason::WrongType,
                format!(
                    "`time` must be an RFC 3339 string, got {}",
                    type_name(&other)
                ),
            ))
        }
    };
    if time > now + limits.max_future {
        return Err(invalid(
            InvalidReason::TimeInFuture,
            format!(
                "`time` {time} is more than {} s ahead of the platform clock ({now})",
                limits.max_future.num_seconds()
            ),
        ));
    }
    if time < now - limits.late_window {
        return Err(invalid(
            InvalidReason::TimeTooOld,
            format!(
                "`time` {time} is older than the late-event window of {} h",
                limits.late_window.num_hours()
            ),
        ));
    }
    let mut dimensions = match raw.data {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(invalid(
                InvalidReason::WrongType,
                format!("`data` must be a JSON object, got {}", type_name(&other)),
            ))
        }
    };
    crate::text::check_object("data", &dimensions)
        .map_err(|m| invalid(InvalidReason::InvalidField, m))?;
    let quantity = match dimensions.remove("quantity") {
        None | Some(Value::Null) => 1.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(other) => {
            return Err(invalid(
                InvalidReason::WrongType,
                format!(
                    "`data.quantity` must be a number, got {}",
                    type_name(&other)
                ),
            ))
        }
    };
    if !quantity.is_finite() {
        return Err(invalid(
            InvalidReason::QuantityNotFinite,
            "`data.quantity` must be a finite number",
        ));
    }
    if quantity > MAX_QUANTITY {
        return Err(invalid(
            InvalidReason::QuantityTooLarge,
            format!(
                "`data.quantity` is {quantity:e}; at most {MAX_QUANTITY:e} per event: split larger usage into several events"
            ),
        ));
    }
    if quantity < 0.0 {
        return Err(invalid(
            InvalidReason::QuantityNegative,
            format!(
                "`data.quantity` must be >= 0, got {quantity}; use a correction to reduce usage"
            ),
        ));
    }
    Ok(UsageRecord {
        id,
        source,
        event_type,
        subscription_id,
        tenant,
        time,
        quantity,
        dimensions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap()
    }

    fn check(json: &str, token: Option<&str>) -> Result<UsageRecord, Invalid> {
        let raw = RawUsageEvent::from_json(json.as_bytes())?;
        validate(raw, token, now(), json.len(), &IngestLimits::default())
    }

    fn ev(extra: &str) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"e1","source":"test","type":"agent.execution","subject":"sub_1","time":"2026-11-26T11:59:00Z"{extra}}}"#
        )
    }

    /// What `from_json` replaced: the whole object read into a map, the attributes taken out.
    /// Events already in the log must decode as they did when they were first projected.
    fn via_map(bytes: &[u8]) -> Result<RawUsageEvent, InvalidReason> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|_| InvalidReason::MalformedJson)?;
        let Value::Object(mut o) = value else {
            return Err(InvalidReason::MalformedJson);
        };
        Ok(RawUsageEvent {
            specversion: o.remove("specversion"),
            id: o.remove("id"),
            source: o.remove("source"),
            event_type: o.remove("type"),
            subject: o.remove("subject"),
            time: o.remove("time"),
            data: o.remove("data"),
            tenant: o.remove("tenant"),
        })
    }

    #[test]
    fn reads_attributes_as_the_whole_object_read_would() {
        for json in [
            ev(r#","data":{"quantity":2,"model":"m1"}"#),
            // Repeated attributes (the last wins), an escaped key, unknown and nested fields.
            ev(r#","id":"e2","data":{"a":[1,{"b":null}]},"data":{"quantity":3}"#),
            ev(r#","\u0069d":"escaped","ext":{"deep":[[[]]]},"tenant":"acme""#),
            ev(r#","id":7,"time":null,"data":"text""#),
            // Unknown attributes that are not valid JSON values refuse the event, as before.
            ev(r#","ext":"\ud800""#),
            ev(r#","ext":1e999"#),
            "{}".into(),
            "[]".into(),
            "\"event\"".into(),
            "{\"id\":\"e1\"".into(),
            "{\"id\":\"e1\"} trailing".into(),
            "{\"id\":\"e1\",}".into(),
            "{\"a\":[1,]}".into(),
            "".into(),
        ] {
            let new = RawUsageEvent::from_json(json.as_bytes()).map_err(|e| e.reason);
            assert_eq!(new, via_map(json.as_bytes()), "{json}");
        }
        let not_object = RawUsageEvent::from_json(b"[1]").unwrap_err();
        assert_eq!(not_object.detail, "a CloudEvent must be a JSON object");
        let broken = RawUsageEvent::from_json(b"{\"id\":").unwrap_err();
        assert!(broken.detail.starts_with("not valid JSON"), "{broken}");
    }

    #[test]
    fn accepts_a_well_formed_event_with_default_quantity() {
        let r = check(&ev(r#","data":{"model":"m1"}"#), Some("sub_1")).unwrap();
        assert_eq!(r.quantity, 1.0);
        assert_eq!(r.dimensions["model"], "m1");
        assert_eq!(r.tenant, DEFAULT_TENANT);
    }

    #[test]
    fn each_bad_input_has_its_reason() {
        let cases: Vec<(String, InvalidReason)> = vec![
            ("{not json".into(), InvalidReason::MalformedJson),
            ("[1,2]".into(), InvalidReason::MalformedJson),
            (
                ev("").replace(r#""specversion":"1.0","#, ""),
                InvalidReason::MissingField,
            ),
            (
                ev("").replace(r#""1.0""#, r#""0.3""#),
                InvalidReason::UnsupportedSpecversion,
            ),
            (
                ev("").replace(r#""id":"e1","#, ""),
                InvalidReason::MissingField,
            ),
            (
                ev("").replace(r#""id":"e1""#, r#""id":7"#),
                InvalidReason::WrongType,
            ),
            (
                ev("").replace(r#""subject":"sub_1""#, r#""subject":"sub.1""#),
                InvalidReason::InvalidField,
            ),
            (
                ev("").replace(r#""subject":"sub_1""#, r#""subject":"sub_2""#),
                InvalidReason::SubjectMismatch,
            ),
            (
                ev(r#","data":{"quantity":-1}"#),
                InvalidReason::QuantityNegative,
            ),
            (ev(r#","data":{"quantity":"3"}"#), InvalidReason::WrongType),
            (ev(r#","data":[1]"#), InvalidReason::WrongType),
            (
                ev("").replace("11:59:00Z", "12:05:01Z"),
                InvalidReason::TimeInFuture,
            ),
            (
                ev("").replace("2026-11-26T11", "2026-11-10T11"),
                InvalidReason::TimeTooOld,
            ),
            (
                ev("").replace("2026-11-26T11:59:00Z", "yesterday"),
                InvalidReason::InvalidField,
            ),
            (
                ev(&format!(r#","data":{{"pad":"{}"}}"#, "x".repeat(70_000))),
                InvalidReason::Oversized,
            ),
        ];
        for (json, reason) in cases {
            let err = check(&json, Some("sub_1")).expect_err(&json[..json.len().min(120)]);
            assert_eq!(err.reason, reason, "{json:.120}: {err}");
            assert!(!err.detail.is_empty());
        }
    }

    #[test]
    fn the_edges_of_the_time_window_are_inclusive() {
        assert!(check(&ev("").replace("11:59:00Z", "12:05:00Z"), None).is_ok());
        assert!(check(
            &ev("").replace("2026-11-26T11:59:00Z", "2026-11-19T12:00:00Z"),
            None
        )
        .is_ok());
    }
}
