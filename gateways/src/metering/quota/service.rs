//! The quota calls of `MeteringService` (see the module docs of `super`).
use std::str::FromStr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use creto_domain::metering::event::{is_event_type, is_token};
use creto_domain::metering::quota::{
    ConfigSet, Entitlement, FeatureSet, GrantAdded, GrantVoided, MeteredQuota, Period, PeriodKind,
    Quantity, QuotaError, QuotaEvent, QuotaRemoved, QuotaSet,
};
use creto_projections::metering::decode::struct_to_json;
use creto_projections::metering::quotas::{quotas_subject, seal_quota_event};
use creto_schemas::metering::v1 as pb;
use creto_streams::envelope;
use creto_streams::{LogError, METERING};
use serde_json::Value;
use tonic::{Request, Response, Status};

use super::{QuotaView, QUOTA_CHECK_SECONDS, QUOTA_EXCEEDED};
use crate::log_status::log_status;
use crate::telemetry;

/// How long CheckQuota waits for `min_sequence`.
const MIN_SEQUENCE_WAIT: Duration = Duration::from_secs(5);
/// Attempts at appending a command when other replicas change the same subscription.
const ATTEMPTS: usize = 16;

fn tenant<T>(request: &Request<T>) -> Result<String, Status> {
    Ok(crate::auth::layer::caller(request)?.tenant.clone())
}

fn quota_status(e: QuotaError) -> Status {
    let text = e.to_string();
    match e {
        QuotaError::Invalid { .. } => Status::invalid_argument(text),
        QuotaError::NoQuota { .. } | QuotaError::AlreadyVoided { .. } => {
            Status::failed_precondition(text)
        }
        QuotaError::NotFound { .. } | QuotaError::UnknownGrant { .. } => Status::not_found(text),
        QuotaError::DuplicateGrant { .. } => Status::already_exists(text),
    }
}

fn check_key(subscription_id: &str, event_type: &str, field: &str) -> Result<(), Status> {
    if !is_token(subscription_id) {
        return Err(Status::invalid_argument(format!(
            "`subscription_id` must be 1-128 letters, digits, _ or -, got {subscription_id:?}"
        )));
    }
    if !is_event_type(event_type) {
        return Err(Status::invalid_argument(format!(
            "`{field}` must be an event type (1-128 letters, digits and . _ - / :), got {event_type:?}"
        )));
    }
    Ok(())
}

fn quantity(field: &str, s: &str) -> Result<Quantity, Status> {
    if s.trim().is_empty() {
        return Err(Status::invalid_argument(format!(
            "`{field}` is required: a decimal string such as \"1000\" or \"2.5\""
        )));
    }
    Quantity::from_str(s).map_err(|e| {
        Status::invalid_argument(format!(
            "`{field}` {e}: use a decimal string such as \"1000\" or \"2.5\""
        ))
    })
}

fn time(t: &Option<prost_types::Timestamp>, field: &str) -> Result<Option<DateTime<Utc>>, Status> {
    match t {
        None => Ok(None),
        Some(t) => envelope::from_timestamp(t)
            .map(Some)
            .ok_or_else(|| Status::invalid_argument(format!("`{field}` is out of range"))),
    }
}

fn period_from_proto(p: Option<&pb::QuotaPeriod>) -> Result<Period, Status> {
    let p = p.ok_or_else(|| {
        Status::invalid_argument(
            "`period` is required: {kind: PERIOD_HOUR | PERIOD_DAY | PERIOD_MONTH | PERIOD_CALENDAR_MONTH, anchor, time_zone}",
        )
    })?;
    let kind = match pb::QuotaPeriodKind::try_from(p.kind)
        .unwrap_or(pb::QuotaPeriodKind::Unspecified)
    {
        pb::QuotaPeriodKind::PeriodHour => PeriodKind::Hour,
        pb::QuotaPeriodKind::PeriodDay => PeriodKind::Day,
        pb::QuotaPeriodKind::PeriodMonth => PeriodKind::Month,
        pb::QuotaPeriodKind::PeriodCalendarMonth => PeriodKind::CalendarMonth,
        pb::QuotaPeriodKind::Unspecified => return Err(Status::invalid_argument(
            "`period.kind` must be PERIOD_HOUR, PERIOD_DAY, PERIOD_MONTH or PERIOD_CALENDAR_MONTH",
        )),
    };
    let tz: Tz = if p.time_zone.is_empty() {
        Tz::UTC
    } else {
        p.time_zone.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "`period.time_zone` {:?} is not an IANA time zone; use e.g. Europe/Paris",
                p.time_zone
            ))
        })?
    };
    // Default: local midnight on a 1st in the quota's zone. (The Unix epoch was the default:
    // west of UTC it is the evening of 31 December, so days reset in the evening and calendar
    // months began on the 31st.)
    let local_first = || {
        let midnight = chrono::NaiveDate::from_ymd_opt(2000, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("a valid date");
        // Where that midnight does not exist (a zone that skipped it), the period module's
        // own rule places it, as it places every boundary.
        creto_domain::metering::quota::resolve(midnight, tz)
    };
    let anchor = time(&p.anchor, "period.anchor")?.unwrap_or_else(local_first);
    Ok(Period::new(kind, anchor, tz))
}

fn period_to_proto(p: &Period) -> pb::QuotaPeriod {
    pb::QuotaPeriod {
        kind: match p.kind {
            PeriodKind::Hour => pb::QuotaPeriodKind::PeriodHour,
            PeriodKind::Day => pb::QuotaPeriodKind::PeriodDay,
            PeriodKind::Month => pb::QuotaPeriodKind::PeriodMonth,
            PeriodKind::CalendarMonth => pb::QuotaPeriodKind::PeriodCalendarMonth,
        } as i32,
        anchor: Some(envelope::timestamp(p.anchor)),
        time_zone: p.tz.name().to_string(),
    }
}

fn json_to_value(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

fn value_to_json(v: &prost_types::Value) -> Result<Value, Status> {
    // Through a one-field Struct, with the same conversion usage events get.
    let s = prost_types::Struct {
        fields: [("v".to_string(), v.clone())].into_iter().collect(),
    };
    if let Some(prost_types::value::Kind::NumberValue(n)) = &v.kind {
        if !n.is_finite() {
            return Err(Status::invalid_argument("`config` must be finite"));
        }
    }
    Ok(struct_to_json(&s).remove("v").unwrap_or(Value::Null))
}

fn metered_to_proto(q: &MeteredQuota, now: DateTime<Utc>) -> pb::Quota {
    let c = q.check(Quantity::ZERO, now);
    let grants = q
        .grants()
        .iter()
        .map(|g| {
            let balance = q
                .grant_balances(now)
                .into_iter()
                .find(|(b, _)| b.id == g.id)
                .map(|(_, left)| left);
            pb::QuotaGrant {
                grant_id: g.id.clone(),
                amount: g.amount.to_string(),
                priority: u32::from(g.priority),
                effective_from: Some(envelope::timestamp(g.effective_from)),
                expires_at: g.expires_at.map(envelope::timestamp),
                voided_at: g.voided_at.map(envelope::timestamp),
                live: balance.is_some(),
                balance: balance.unwrap_or(Quantity::ZERO).to_string(),
            }
        })
        .collect();
    pb::Quota {
        kind: "metered".into(),
        limit: q.limit().to_string(),
        period: Some(period_to_proto(q.period())),
        hard: q.hard(),
        thresholds_pct: q.thresholds().iter().map(u32::from).collect(),
        used: c.used.to_string(),
        granted: c.granted.to_string(),
        remaining: c.remaining.to_string(),
        period_start: Some(envelope::timestamp(c.period_start)),
        period_end: Some(envelope::timestamp(c.period_end)),
        grants,
        ..Default::default()
    }
}

fn entitlement_to_proto(subscription_id: &str, key: &str, e: &Entitlement) -> pb::Quota {
    let mut q = match e {
        Entitlement::Metered(m) => metered_to_proto(m, Utc::now()),
        Entitlement::Boolean(b) => pb::Quota {
            kind: "boolean".into(),
            enabled: *b,
            ..Default::default()
        },
        Entitlement::Static(v) => pb::Quota {
            kind: "static".into(),
            config: Some(json_to_value(v)),
            ..Default::default()
        },
    };
    q.subscription_id = subscription_id.to_string();
    q.event_type = key.to_string();
    q
}

/// Admits the command against a book caught up with the subscription's subject, appends it
/// with that subject's expected last sequence (retrying when another replica wrote first) and
/// waits until this replica's book has applied it. Returns its sequence and the entitlement.
async fn command(
    view: &QuotaView,
    tenant: &str,
    event: QuotaEvent,
) -> Result<(u64, Option<pb::Quota>), Status> {
    event.validate().map_err(quota_status)?;
    let (subscription_id, key) = event.key();
    let stream = view.catalog().stream(METERING);
    let subject = view
        .catalog()
        .subject(&quotas_subject(tenant, subscription_id));
    let id = format!("quota:{tenant}:{}", uuid::Uuid::now_v7());
    for _ in 0..ATTEMPTS {
        let expected = view
            .log()
            .last_subject_sequence(&stream, &subject)
            .await
            .map_err(log_status)?;
        view.catch_up_to(expected).await.map_err(log_status)?;
        view.admit(tenant, &event).map_err(quota_status)?;
        let mut append = seal_quota_event(view.catalog(), tenant, &event, id.clone());
        append.expected_subject_sequence = Some(expected);
        match telemetry::append(&**view.log(), "metering.quotas", append).await {
            Ok(a) => {
                view.catch_up_to(a.sequence()).await.map_err(log_status)?;
                let quota = view
                    .entitlement(tenant, subscription_id, key)
                    .map(|e| entitlement_to_proto(subscription_id, key, &e));
                return Ok((a.sequence(), quota));
            }
            Err(LogError::Conflict { .. }) => continue,
            Err(e) => return Err(log_status(e)),
        }
    }
    Err(Status::aborted(
        "the subscription's quotas kept changing under this command; retry",
    ))
}

pub async fn set_quota(
    view: &QuotaView,
    request: Request<pb::SetQuotaRequest>,
) -> Result<Response<pb::SetQuotaResponse>, Status> {
    let tenant = tenant(&request)?;
    let r = request.into_inner();
    check_key(&r.subscription_id, &r.event_type, "event_type")?;
    let limit = quantity("limit", &r.limit)?;
    let period = period_from_proto(r.period.as_ref())?;
    let thresholds_pct = r
        .thresholds_pct
        .iter()
        .map(|p| {
            u8::try_from(*p).map_err(|_| {
                Status::invalid_argument(format!(
                    "`thresholds_pct` must be percentages from 1 to 100, got {p}"
                ))
            })
        })
        .collect::<Result<Vec<u8>, Status>>()?;
    let event = QuotaEvent::QuotaSet(QuotaSet {
        subscription_id: r.subscription_id,
        meter: r.event_type,
        limit,
        period,
        hard: r.hard,
        thresholds_pct,
    });
    let (sequence, quota) = command(view, &tenant, event).await?;
    Ok(Response::new(pb::SetQuotaResponse { sequence, quota }))
}

pub async fn remove_quota(
    view: &QuotaView,
    request: Request<pb::RemoveQuotaRequest>,
) -> Result<Response<pb::RemoveQuotaResponse>, Status> {
    let tenant = tenant(&request)?;
    let r = request.into_inner();
    check_key(&r.subscription_id, &r.event_type, "event_type")?;
    let event = QuotaEvent::QuotaRemoved(QuotaRemoved {
        subscription_id: r.subscription_id,
        meter: r.event_type,
    });
    let (sequence, _) = command(view, &tenant, event).await?;
    Ok(Response::new(pb::RemoveQuotaResponse { sequence }))
}

pub async fn add_grant(
    view: &QuotaView,
    request: Request<pb::AddGrantRequest>,
) -> Result<Response<pb::AddGrantResponse>, Status> {
    let tenant = tenant(&request)?;
    let r = request.into_inner();
    check_key(&r.subscription_id, &r.event_type, "event_type")?;
    let amount = quantity("amount", &r.amount)?;
    let priority = u8::try_from(r.priority).map_err(|_| {
        Status::invalid_argument(format!("`priority` must be 0 to 255, got {}", r.priority))
    })?;
    let event = QuotaEvent::GrantAdded(GrantAdded {
        subscription_id: r.subscription_id,
        meter: r.event_type,
        grant_id: r.grant_id,
        amount,
        priority,
        effective_from: time(&r.effective_from, "effective_from")?.unwrap_or_else(Utc::now),
        expires_at: time(&r.expires_at, "expires_at")?,
    });
    let (sequence, quota) = command(view, &tenant, event).await?;
    Ok(Response::new(pb::AddGrantResponse { sequence, quota }))
}

pub async fn void_grant(
    view: &QuotaView,
    request: Request<pb::VoidGrantRequest>,
) -> Result<Response<pb::VoidGrantResponse>, Status> {
    let tenant = tenant(&request)?;
    let r = request.into_inner();
    check_key(&r.subscription_id, &r.event_type, "event_type")?;
    let event = QuotaEvent::GrantVoided(GrantVoided {
        subscription_id: r.subscription_id,
        meter: r.event_type,
        grant_id: r.grant_id,
    });
    let (sequence, quota) = command(view, &tenant, event).await?;
    Ok(Response::new(pb::VoidGrantResponse { sequence, quota }))
}

pub async fn set_entitlement(
    view: &QuotaView,
    request: Request<pb::SetEntitlementRequest>,
) -> Result<Response<pb::SetEntitlementResponse>, Status> {
    let tenant = tenant(&request)?;
    let r = request.into_inner();
    check_key(&r.subscription_id, &r.feature, "feature")?;
    let event = match r.value {
        Some(pb::set_entitlement_request::Value::Enabled(enabled)) => {
            QuotaEvent::FeatureSet(FeatureSet {
                subscription_id: r.subscription_id,
                feature: r.feature,
                enabled,
            })
        }
        Some(pb::set_entitlement_request::Value::Config(v)) => {
            let value = value_to_json(&v)?;
            creto_domain::text::check_json("config", &value).map_err(Status::invalid_argument)?;
            QuotaEvent::ConfigSet(ConfigSet {
                subscription_id: r.subscription_id,
                feature: r.feature,
                value,
            })
        }
        None => {
            return Err(Status::invalid_argument(
                "set `enabled` (a boolean entitlement) or `config` (a static one)",
            ))
        }
    };
    let (sequence, quota) = command(view, &tenant, event).await?;
    Ok(Response::new(pb::SetEntitlementResponse {
        sequence,
        quota,
    }))
}

fn not_warm(view: &QuotaView) -> Status {
    let (applied, target) = view.warming();
    Status::unavailable(format!(
        "this replica's quota book is warming (applied sequence {applied} of {target}); retry shortly"
    ))
}

pub async fn get_quota(
    view: &QuotaView,
    request: Request<pb::GetQuotaRequest>,
) -> Result<Response<pb::GetQuotaResponse>, Status> {
    let tenant = tenant(&request)?;
    let r = request.into_inner();
    check_key(&r.subscription_id, &r.event_type, "event_type")?;
    if !view.is_warm() {
        return Err(not_warm(view));
    }
    let e = view
        .entitlement(&tenant, &r.subscription_id, &r.event_type)
        .ok_or_else(|| {
            Status::not_found(format!(
                "subscription {:?} has no quota or entitlement on {:?}; set one with SetQuota or SetEntitlement",
                r.subscription_id, r.event_type
            ))
        })?;
    Ok(Response::new(pb::GetQuotaResponse {
        quota: Some(entitlement_to_proto(&r.subscription_id, &r.event_type, &e)),
    }))
}

pub async fn check_quota(
    view: &QuotaView,
    request: Request<pb::CheckQuotaRequest>,
) -> Result<Response<pb::CheckQuotaResponse>, Status> {
    let tenant = &crate::auth::layer::caller(&request)?.tenant;
    let r = request.get_ref();
    check_key(&r.subscription_id, &r.event_type, "event_type")?;
    let wanted = r.quantity.unwrap_or(1.0);
    if !wanted.is_finite() || wanted < 0.0 {
        return Err(Status::invalid_argument(format!(
            "`quantity` must be a finite number >= 0, got {wanted}"
        )));
    }
    let wanted = Quantity::from_f64(wanted)
        .map_err(|e| Status::invalid_argument(format!("`quantity` {e}")))?;
    if r.min_sequence > view.applied() {
        match tokio::time::timeout(MIN_SEQUENCE_WAIT, view.catch_up_to(r.min_sequence)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(log_status(e)),
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "this replica has applied sequence {}, not yet {}; retry",
                    view.applied(),
                    r.min_sequence
                )))
            }
        }
    }
    if !view.is_warm() {
        return Err(not_warm(view));
    }
    let now = Utc::now();
    let started = Instant::now();
    let checked = view.check(tenant, &r.subscription_id, &r.event_type, wanted, now);
    let elapsed = started.elapsed();
    let Some((c, hard)) = checked else {
        return Err(
            match view.entitlement(tenant, &r.subscription_id, &r.event_type) {
                Some(_) => Status::failed_precondition(format!(
                    "{:?} is a boolean or static entitlement of subscription {:?}, not a metered quota: read it with GetQuota",
                    r.event_type, r.subscription_id
                )),
                None => Status::not_found(format!(
                    "subscription {:?} has no quota on {:?}: nothing is enforced (set one with SetQuota)",
                    r.subscription_id, r.event_type
                )),
            },
        );
    };
    let action = match (c.allowed, c.soft) {
        (true, false) => "allow",
        (true, true) => "soft",
        (false, _) => "deny",
    };
    QUOTA_CHECK_SECONDS
        .with_label_values(&[action])
        .observe(elapsed.as_secs_f64());
    if action != "allow" {
        QUOTA_EXCEEDED
            .with_label_values(&[&view.subscription_label(&r.subscription_id), &r.event_type])
            .inc();
    }
    Ok(Response::new(pb::CheckQuotaResponse {
        allowed: c.allowed,
        limit: c.limit.to_string(),
        used: c.used.to_string(),
        remaining: c.remaining.to_string(),
        period_end: Some(envelope::timestamp(c.period_end)),
        soft: c.soft,
        granted: c.granted.to_string(),
        period_start: Some(envelope::timestamp(c.period_start)),
        hard,
    }))
}
