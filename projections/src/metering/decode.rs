//! From a log message to a metering fact: CloudEvents JSON, the protobuf `UsageEvent`, or an
//! envelope written by the gateway (meter definitions).
use chrono::SecondsFormat;
use creto_domain::metering::{
    self, IngestLimits, Invalid, InvalidReason, Meter, RawUsageEvent, UsageRecord,
};
use creto_schemas::metering::v1 as pb;
use creto_streams::envelope;
use creto_streams::headers::{content_types, names};
use creto_streams::{Catalog, StoredEvent};
use prost::Message;
use serde_json::{Map, Number, Value};

pub const METER_DEFINED: &str = "creto.metering.v1.MeterDefined";

/// Historical events imported by `enablement backfill metering` are appended to
/// `metering.backfill.<subscription_id>`: producers' NATS credentials only allow
/// `metering.events.*`, so only the platform writes here.
pub const BACKFILL_SUBJECT_PREFIX: &str = "metering.backfill.";
/// On a backfilled event only: the late-event window (hours) the backfill validated it with
/// (`--accept-late`), so the projection and every replay decide as the backfill did.
pub const LATE_WINDOW_HOURS: &str = "Creto-Late-Window-Hours";

#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// Nothing to project: the log's own bookkeeping (the restore marker).
    Marker,
    /// A quota or threshold fact: the gateways' books and `quotas::QuotasProjector` read it,
    /// not this projector.
    Quota,
    Usage(UsageRecord),
    MeterDefined {
        meter: Meter,
        tenant: String,
    },
    Invalid(Invalid),
    /// A correction, plan, attachment or issued invoice (`metering::billing`).
    Billing(super::billing::BillingFact),
}

/// Converts a protobuf `Struct` into JSON. Non-finite numbers have no JSON form: the caller
/// checks them first.
pub fn struct_to_json(s: &prost_types::Struct) -> Map<String, Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

fn value_to_json(v: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => {
            // Integral values stay integers so dimensions read back as "3", not "3.0".
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::Number(Number::from(*n as i64))
            } else {
                Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
    }
}

/// A protobuf usage event as a raw CloudEvent, ready for the one validation path.
pub fn raw_from_proto(e: &pb::UsageEvent, tenant: Option<&str>) -> Result<RawUsageEvent, Invalid> {
    let data = match &e.data {
        None => None,
        Some(s) => {
            if let Some(prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(q)),
            }) = s.fields.get("quantity")
            {
                if !q.is_finite() {
                    return Err(Invalid {
                        reason: InvalidReason::QuantityNotFinite,
                        detail: "`data.quantity` must be a finite number".into(),
                    });
                }
            }
            Some(Value::Object(struct_to_json(s)))
        }
    };
    let time = match &e.time {
        None => None,
        Some(t) => Some(Value::String(
            envelope::from_timestamp(t)
                .ok_or_else(|| Invalid {
                    reason: InvalidReason::InvalidField,
                    detail: "`time` is out of range".into(),
                })?
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        )),
    };
    let opt = |s: &str| (!s.is_empty()).then(|| Value::String(s.to_string()));
    Ok(RawUsageEvent {
        specversion: Some(Value::String("1.0".into())),
        id: opt(&e.id),
        source: opt(&e.source),
        event_type: opt(&e.r#type),
        subject: opt(&e.subject),
        time,
        data,
        tenant: tenant.map(|t| Value::String(t.to_string())),
    })
}

/// Decodes and validates one message of the metering stream. Validation uses the time the log
/// recorded the message, so a replay decides exactly as the live projection did.
pub fn decode(event: &StoredEvent, catalog: &Catalog, limits: &IngestLimits) -> Decoded {
    if event.subject.ends_with("._restored")
        && catalog.restore_marker_subject(&event.stream).as_deref() == Some(event.subject.as_str())
    {
        return Decoded::Marker;
    }
    let subject = catalog.strip(&event.subject);
    let invalid = |reason, detail: String| Decoded::Invalid(Invalid { reason, detail });
    let live = subject.strip_prefix("metering.events.");
    let backfill = subject.strip_prefix(BACKFILL_SUBJECT_PREFIX);
    if let Some(token) = live.or(backfill) {
        let mut limits = *limits;
        if backfill.is_some() {
            if let Some(h) = event
                .headers
                .get(LATE_WINDOW_HOURS)
                .and_then(|h| h.parse::<i64>().ok())
            {
                // Clamped: a malformed header must not panic the projector (≈ 114 years).
                let h = h.clamp(0, 1_000_000);
                limits.late_window = limits.late_window.max(chrono::Duration::hours(h));
            }
        }
        let limits = &limits;
        let content_type = event
            .headers
            .get(names::CONTENT_TYPE)
            .unwrap_or(content_types::CLOUDEVENTS_JSON);
        let raw = if content_type.starts_with(content_types::PROTOBUF) {
            match pb::UsageEvent::decode(event.payload.as_ref()) {
                Ok(e) => raw_from_proto(&e, event.headers.get(names::TENANT)),
                Err(e) => {
                    return invalid(
                        InvalidReason::MalformedProtobuf,
                        format!("not a UsageEvent: {e}"),
                    )
                }
            }
        } else {
            RawUsageEvent::from_json(&event.payload)
        };
        return match raw.and_then(|r| {
            metering::event::validate(
                r,
                Some(token),
                event.recorded_at,
                event.payload.len(),
                limits,
            )
        }) {
            Ok(record) => Decoded::Usage(record),
            Err(e) => Decoded::Invalid(e),
        };
    }
    if subject.starts_with("metering.meters.") {
        let env = match envelope::open(&event.payload) {
            Ok(env) if env.r#type == METER_DEFINED => env,
            Ok(env) => {
                return invalid(
                    InvalidReason::InvalidField,
                    format!("unexpected event type {}", env.r#type),
                )
            }
            Err(e) => {
                return invalid(
                    InvalidReason::MalformedProtobuf,
                    format!("not an envelope: {e}"),
                )
            }
        };
        let meter = pb::MeterDefined::decode(env.payload.as_slice())
            .ok()
            .and_then(|m| m.meter);
        return match meter.map(|m| meter_from_proto(&m)) {
            Some(Ok(meter)) => Decoded::MeterDefined {
                meter,
                tenant: env.tenant,
            },
            Some(Err(e)) => invalid(InvalidReason::InvalidField, e.0),
            None => invalid(
                InvalidReason::MalformedProtobuf,
                "MeterDefined without a meter".into(),
            ),
        };
    }
    if let Some(billing) = super::billing::decode(subject, event) {
        return billing;
    }
    // Quotas and thresholds: read by the gateways' books and `quotas::QuotasProjector`.
    if super::quotas::is_quota_subject(subject) {
        return Decoded::Quota;
    }
    invalid(
        InvalidReason::InvalidField,
        format!("no metering fact is published on {subject}"),
    )
}

pub fn aggregation_from_proto(a: i32) -> Option<metering::Aggregation> {
    use metering::Aggregation as A;
    Some(match pb::Aggregation::try_from(a).ok()? {
        pb::Aggregation::Sum => A::Sum,
        pb::Aggregation::Count => A::Count,
        pb::Aggregation::UniqueCount => A::UniqueCount,
        pb::Aggregation::Avg => A::Avg,
        pb::Aggregation::Min => A::Min,
        pb::Aggregation::Max => A::Max,
        pb::Aggregation::Latest => A::Latest,
        pb::Aggregation::Unspecified => return None,
    })
}

pub fn aggregation_to_proto(a: metering::Aggregation) -> pb::Aggregation {
    use metering::Aggregation as A;
    match a {
        A::Sum => pb::Aggregation::Sum,
        A::Count => pb::Aggregation::Count,
        A::UniqueCount => pb::Aggregation::UniqueCount,
        A::Avg => pb::Aggregation::Avg,
        A::Min => pb::Aggregation::Min,
        A::Max => pb::Aggregation::Max,
        A::Latest => pb::Aggregation::Latest,
    }
}

pub fn meter_from_proto(m: &pb::Meter) -> Result<Meter, metering::MeterError> {
    let aggregation = aggregation_from_proto(m.aggregation).ok_or_else(|| {
        metering::MeterError(
            "aggregation must be one of SUM, COUNT, UNIQUE_COUNT, AVG, MIN, MAX, LATEST".into(),
        )
    })?;
    Meter::new(
        &m.slug,
        &m.event_type,
        aggregation,
        &m.value_property,
        m.group_by.clone(),
        &m.description,
    )
}

pub fn meter_to_proto(m: &Meter) -> pb::Meter {
    pb::Meter {
        slug: m.slug.clone(),
        event_type: m.event_type.clone(),
        aggregation: aggregation_to_proto(m.aggregation) as i32,
        value_property: m.value_property(),
        group_by: m.group_by.clone(),
        description: m.description.clone(),
    }
}
