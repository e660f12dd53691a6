//! `VoidEvent`, `AmendEvent`, `PutPlan`, `AttachPlan`, `GenerateInvoice`, `GetInvoice`,
//! `ListInvoices`: commands become facts on the METERING stream (see
//! `creto_projections::metering::billing` for the subjects and how the read models keep
//! them); invoices are priced by `creto_domain::metering::pricing` from the read model's usage.
//!
//! Every call first waits (up to [`CATCH_UP`]) until the read model has applied the log as it
//! was when the call came in, so it answers from usage, corrections and plans that agree with
//! everything already acknowledged.
//!
//! Usage of a charge in a segment of the billing period is the meter's hourly usage summed
//! over the segment, so billing periods and plan attachments are on hour boundaries (anything
//! else is refused with INVALID_ARGUMENT), and only additive meters (SUM, COUNT, or an event
//! type's summed quantity) can be billed.
use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use creto_domain::metering::event::{is_event_type, is_token};
use creto_domain::metering::invoice::{
    compute_invoice, invoice_state, InvoiceDraft, InvoiceStatus,
};
use creto_domain::metering::pricing::{
    segments, BillingInterval, Charge, ChargeModel, Currency, Period, Plan, PlanAssignment,
    PlanRef, PricingError, SegmentUsage, Tier,
};
use creto_domain::metering::{Aggregation, UsageRecord, Window};
use creto_projections::metering::billing::{
    self, attachments_subject, corrections_subject, invoice_number, invoices_subject, open_json,
    plan_subject, seal_json, CorrectionFact, CorrectionKind, InvoiceDocument, PlanAttached,
};
use creto_projections::metering::decode::{decode, struct_to_json, Decoded};
use creto_projections::metering::query::{quantity_meter, UsageQuery};
use creto_projections::metering::read_model;
use creto_projections::metrics;
use creto_schemas::metering::v1 as pb;
use creto_streams::envelope::{self, EventMeta};
use creto_streams::{Appended, LogError, ReplayFrom, METERING};
use futures::TryStreamExt;
use rust_decimal::Decimal;
use tonic::{Request, Response, Status};

use super::{db_status, MeteringGateway};
use crate::log_status::log_status;
use crate::telemetry;

/// How long a call waits for the read model to catch up with the log.
pub const CATCH_UP: Duration = Duration::from_secs(10);
/// Attempts at taking the next invoice number before giving up (each lost race retries).
const ISSUE_ATTEMPTS: usize = 64;

fn tenant<T>(request: &Request<T>) -> Result<String, Status> {
    Ok(crate::auth::layer::caller(request)?.tenant.clone())
}

fn check_subscription(s: &str) -> Result<(), Status> {
    if !is_token(s) {
        return Err(Status::invalid_argument(format!(
            "subscription_id {s:?} must be 1-128 letters, digits, _ or -"
        )));
    }
    Ok(())
}

fn hour_aligned(field: &str, t: DateTime<Utc>) -> Result<(), Status> {
    if t.timestamp().rem_euclid(3600) != 0 || t.timestamp_subsec_nanos() != 0 {
        return Err(Status::invalid_argument(format!(
            "{field} {} is not on an hour boundary: usage is billed by the hour, use e.g. {}",
            t.to_rfc3339(),
            DateTime::from_timestamp(t.timestamp() - t.timestamp().rem_euclid(3600), 0)
                .unwrap_or(t)
                .to_rfc3339()
        )));
    }
    Ok(())
}

fn time(field: &str, t: &Option<prost_types::Timestamp>) -> Result<DateTime<Utc>, Status> {
    t.as_ref()
        .and_then(envelope::from_timestamp)
        .ok_or_else(|| Status::invalid_argument(format!("`{field}` is required")))
}

impl MeteringGateway {
    fn stream(&self) -> String {
        self.catalog.stream(METERING)
    }

    /// Waits until the read model has applied everything the log held when called.
    async fn catch_up(&self) -> Result<(), Status> {
        let last = self
            .log
            .last_sequence(&self.stream())
            .await
            .map_err(log_status)?;
        let at = read_model::wait_for(&*self.read_model, last, CATCH_UP)
            .await
            .map_err(db_status)?;
        if at < last {
            return Err(Status::unavailable(format!(
                "the metering projection has applied sequence {at}, the log is at {last}; retry shortly"
            )));
        }
        Ok(())
    }

    /// The usage event as accepted (from the log, by the sequence the read model knows).
    async fn accepted_event(
        &self,
        tenant: &str,
        subscription_id: &str,
        event_id: &str,
    ) -> Result<(u64, UsageRecord), Status> {
        let not_found = || {
            Status::not_found(format!(
                "no accepted usage event {event_id:?} for subscription {subscription_id:?}"
            ))
        };
        let sequence = self
            .read_model
            .billing()
            .event_sequence(tenant, subscription_id, event_id)
            .await
            .map_err(db_status)?
            .ok_or_else(not_found)?;
        let stored = self
            .log
            .get(&self.stream(), sequence)
            .await
            .map_err(log_status)?
            .ok_or_else(not_found)?;
        match decode(&stored, &self.catalog, &self.limits) {
            Decoded::Usage(r) => Ok((sequence, r)),
            _ => Err(not_found()),
        }
    }

    async fn append_correction(&self, fact: &CorrectionFact) -> Result<Appended, Status> {
        let event_type = match fact.kind {
            CorrectionKind::Void => billing::EVENT_VOIDED,
            CorrectionKind::Amend => billing::EVENT_AMENDED,
        };
        let append = seal_json(
            self.catalog
                .subject(&corrections_subject(&fact.tenant, &fact.subscription_id)),
            EventMeta {
                id: fact.correction_id.clone(),
                event_type: event_type.into(),
                schema_version: 1,
                tenant: fact.tenant.clone(),
                ..Default::default()
            },
            serde_json::to_vec(fact).map_err(|e| Status::internal(e.to_string()))?,
        );
        telemetry::append(&*self.log, "metering.corrections", append)
            .await
            .map_err(log_status)
    }
}

fn reason(r: &str) -> Result<String, Status> {
    let r = r.trim();
    if r.is_empty() {
        return Err(Status::invalid_argument(
            "`reason` is required: say why, it is kept in the audit trail",
        ));
    }
    if r.len() > 1024 {
        return Err(Status::invalid_argument(
            "`reason` is longer than 1024 bytes",
        ));
    }
    creto_domain::text::check("reason", r).map_err(Status::invalid_argument)?;
    Ok(r.to_string())
}

pub async fn void_event(
    gw: &MeteringGateway,
    request: Request<pb::VoidEventRequest>,
) -> Result<Response<pb::VoidEventResponse>, Status> {
    let tenant = tenant(&request)?;
    let r = request.into_inner();
    check_subscription(&r.subscription_id)?;
    if r.event_id.is_empty() {
        return Err(Status::invalid_argument("`event_id` is required"));
    }
    let why = reason(&r.reason)?;
    gw.catch_up().await?;
    let (event_sequence, record) = gw
        .accepted_event(&tenant, &r.subscription_id, &r.event_id)
        .await?;
    let billed = issued_invoice_holding(gw, &tenant, &r.subscription_id, record.time).await?;
    let billing = gw.read_model.billing();
    let state = billing
        .correction_state(&tenant, &r.subscription_id, &r.event_id)
        .await
        .map_err(db_status)?;
    if state.is_some_and(|s| s.voided) {
        let earlier = billing
            .corrections(&tenant, &r.subscription_id)
            .await
            .map_err(db_status)?
            .into_iter()
            .find(|c| c.event_id == r.event_id && c.kind == CorrectionKind::Void && c.applied)
            .map_or(0, |c| c.sequence);
        return Ok(Response::new(pb::VoidEventResponse {
            voided: false,
            sequence: earlier,
            issued_invoice: billed,
        }));
    }
    let fact = CorrectionFact {
        correction_id: format!("void:{tenant}:{}:{}", r.subscription_id, r.event_id),
        kind: CorrectionKind::Void,
        tenant,
        subscription_id: r.subscription_id,
        event_id: r.event_id,
        event_type: record.event_type,
        occurred_at: record.time,
        event_sequence,
        quantity: None,
        data: None,
        reason: why,
        at: Utc::now(),
    };
    let appended = gw.append_correction(&fact).await?;
    Ok(Response::new(pb::VoidEventResponse {
        voided: !appended.is_duplicate(),
        sequence: appended.sequence(),
        issued_invoice: billed,
    }))
}

/// The number of the issued invoice whose period holds an event at `time` ("" when none). A
/// correction still applies to usage, but that invoice stays as issued: the caller must hear
/// that the bill did not change.
async fn issued_invoice_holding(
    gw: &MeteringGateway,
    tenant: &str,
    subscription_id: &str,
    time: DateTime<Utc>,
) -> Result<String, Status> {
    Ok(issued_of(gw, tenant, subscription_id)
        .await?
        .into_iter()
        .find(|(d, _)| d.invoice.period.start <= time && time < d.invoice.period.end)
        .and_then(|(d, _)| d.number)
        .unwrap_or_default())
}

pub async fn amend_event(
    gw: &MeteringGateway,
    request: Request<pb::AmendEventRequest>,
) -> Result<Response<pb::AmendEventResponse>, Status> {
    let tenant = tenant(&request)?;
    let r = request.into_inner();
    check_subscription(&r.subscription_id)?;
    if r.event_id.is_empty() {
        return Err(Status::invalid_argument("`event_id` is required"));
    }
    let why = reason(&r.reason)?;
    if let Some(q) = r.quantity {
        if !q.is_finite() || q < 0.0 {
            return Err(Status::invalid_argument(format!(
                "`quantity` must be a finite number >= 0, got {q}; to remove the event use VoidEvent"
            )));
        }
        if q > creto_domain::metering::event::MAX_QUANTITY {
            return Err(Status::invalid_argument(format!(
                "`quantity` is {q:e}; at most {:e} per event",
                creto_domain::metering::event::MAX_QUANTITY
            )));
        }
    }
    let data = r.data.as_ref().map(struct_to_json);
    if let Some(d) = &data {
        if d.contains_key("quantity") {
            return Err(Status::invalid_argument(
                "`data` holds the dimensions only: put the new quantity in `quantity`",
            ));
        }
        if let Some(bad) = d
            .keys()
            .find(|k| !creto_domain::metering::meter::is_dimension(k))
        {
            return Err(Status::invalid_argument(format!(
                "dimension {bad:?} must be 1-64 letters, digits, _ or -"
            )));
        }
        creto_domain::text::check_object("data", d).map_err(Status::invalid_argument)?;
    }
    if r.quantity.is_none() && data.is_none() {
        return Err(Status::invalid_argument(
            "nothing to amend: set `quantity`, `data` or both",
        ));
    }
    gw.catch_up().await?;
    let (event_sequence, record) = gw
        .accepted_event(&tenant, &r.subscription_id, &r.event_id)
        .await?;
    let state = gw
        .read_model
        .billing()
        .correction_state(&tenant, &r.subscription_id, &r.event_id)
        .await
        .map_err(db_status)?;
    if state.is_some_and(|s| s.voided) {
        return Err(Status::failed_precondition(format!(
            "event {:?} of {:?} was voided; a voided event cannot be amended (send a new event instead)",
            r.event_id, r.subscription_id
        )));
    }
    let fact = CorrectionFact {
        correction_id: format!(
            "amend:{tenant}:{}:{}:{}",
            r.subscription_id,
            r.event_id,
            uuid::Uuid::now_v7().simple()
        ),
        kind: CorrectionKind::Amend,
        tenant,
        subscription_id: r.subscription_id,
        event_id: r.event_id,
        event_type: record.event_type,
        occurred_at: record.time,
        event_sequence,
        quantity: r.quantity,
        data,
        reason: why,
        at: Utc::now(),
    };
    let billed =
        issued_invoice_holding(gw, &fact.tenant, &fact.subscription_id, fact.occurred_at).await?;
    let appended = gw.append_correction(&fact).await?;
    Ok(Response::new(pb::AmendEventResponse {
        sequence: appended.sequence(),
        issued_invoice: billed,
    }))
}

// ---------------------------------------------------------------------------------------------
// Plans.

fn dec(field: &str, s: &str) -> Result<Decimal, Status> {
    let d = Decimal::from_str(s.trim()).map_err(|_| {
        Status::invalid_argument(format!(
            "{field}: {s:?} is not a decimal number; write it as a string such as \"0.002\""
        ))
    })?;
    // "-0" is zero: kept as parsed, the sign stayed and invoices printed "-0.00".
    Ok(if d.is_zero() { d.abs() } else { d })
}

fn opt_dec(field: &str, s: &str) -> Result<Option<Decimal>, Status> {
    if s.trim().is_empty() {
        Ok(None)
    } else {
        dec(field, s).map(Some)
    }
}

fn tiers_from_proto(field: &str, m: &pb::TieredModel) -> Result<Vec<Tier>, Status> {
    m.tiers
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Ok(Tier {
                up_to: opt_dec(&format!("{field}.tiers[{i}].up_to"), &t.up_to)?,
                unit_price: dec(&format!("{field}.tiers[{i}].unit_price"), &t.unit_price)?,
                flat_fee: opt_dec(&format!("{field}.tiers[{i}].flat_fee"), &t.flat_fee)?,
            })
        })
        .collect()
}

pub fn plan_from_proto(p: &pb::Plan) -> Result<Plan, Status> {
    use pb::charge::Model;
    if !is_token(&p.plan_id) || p.plan_id.len() > 64 {
        return Err(Status::invalid_argument(format!(
            "plan_id {:?} must be 1-64 letters, digits, _ or -",
            p.plan_id
        )));
    }
    let currency =
        Currency::parse(&p.currency).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut charges = Vec::with_capacity(p.charges.len());
    for (i, c) in p.charges.iter().enumerate() {
        let at = format!("charges[{i}]");
        let model = match &c.model {
            None => {
                return Err(Status::invalid_argument(format!(
                    "{at} has no model: set one of flat, per_unit, graduated, volume, package"
                )))
            }
            Some(Model::Flat(m)) => ChargeModel::Flat {
                amount: dec(&format!("{at}.flat.amount"), &m.amount)?,
            },
            Some(Model::PerUnit(m)) => ChargeModel::PerUnit {
                unit_price: dec(&format!("{at}.per_unit.unit_price"), &m.unit_price)?,
            },
            Some(Model::Graduated(m)) => ChargeModel::Graduated {
                tiers: tiers_from_proto(&format!("{at}.graduated"), m)?,
            },
            Some(Model::Volume(m)) => ChargeModel::Volume {
                tiers: tiers_from_proto(&format!("{at}.volume"), m)?,
            },
            Some(Model::Package(m)) => ChargeModel::Package {
                package_size: dec(&format!("{at}.package.package_size"), &m.package_size)?,
                package_price: dec(&format!("{at}.package.package_price"), &m.package_price)?,
            },
        };
        if !c.meter.is_empty() && !is_event_type(&c.meter) {
            return Err(Status::invalid_argument(format!(
                "{at}.meter {:?} must be a meter slug or an event type",
                c.meter
            )));
        }
        if c.id.len() > 200 {
            return Err(Status::invalid_argument(format!(
                "{at}.id is longer than 200 bytes"
            )));
        }
        creto_domain::text::check(&format!("{at}.id"), &c.id).map_err(Status::invalid_argument)?;
        charges.push(Charge {
            id: c.id.clone(),
            meter: (!c.meter.is_empty()).then(|| c.meter.clone()),
            model,
            minimum: opt_dec(&format!("{at}.minimum"), &c.minimum)?,
        });
    }
    let plan = Plan {
        id: p.plan_id.clone(),
        version: p.version,
        currency,
        charges,
        minimum: opt_dec("minimum", &p.minimum)?,
        billing_interval: interval_from_proto(p.billing_interval)?,
    };
    plan.validate()
        .map_err(|e| Status::invalid_argument(format!("{e}; fix the plan and send it again")))?;
    Ok(plan)
}

const INTERVALS: &str =
    "BILLING_HOURLY, BILLING_DAILY, BILLING_WEEKLY, BILLING_MONTHLY (the default) or BILLING_YEARLY";

fn interval_from_proto(value: i32) -> Result<BillingInterval, Status> {
    use pb::BillingInterval as P;
    match P::try_from(value) {
        Ok(P::Unspecified | P::BillingMonthly) => Ok(BillingInterval::Month),
        Ok(P::BillingHourly) => Ok(BillingInterval::Hour),
        Ok(P::BillingDaily) => Ok(BillingInterval::Day),
        Ok(P::BillingWeekly) => Ok(BillingInterval::Week),
        Ok(P::BillingYearly) => Ok(BillingInterval::Year),
        Ok(P::BillingPerInvoice) => Err(Status::invalid_argument(format!(
            "billing_interval BILLING_PER_INVOICE is kept only for plan versions defined before \
             billing intervals; choose {INTERVALS}"
        ))),
        Err(_) => Err(Status::invalid_argument(format!(
            "billing_interval {value} is not a BillingInterval: use {INTERVALS}"
        ))),
    }
}

fn interval_to_proto(interval: BillingInterval) -> pb::BillingInterval {
    use pb::BillingInterval as P;
    match interval {
        BillingInterval::Hour => P::BillingHourly,
        BillingInterval::Day => P::BillingDaily,
        BillingInterval::Week => P::BillingWeekly,
        BillingInterval::Month => P::BillingMonthly,
        BillingInterval::Year => P::BillingYearly,
        BillingInterval::PerInvoice => P::BillingPerInvoice,
    }
}

fn opt_text(d: Option<Decimal>) -> String {
    d.map_or_else(String::new, |d| d.to_string())
}

fn tiers_to_proto(tiers: &[Tier]) -> pb::TieredModel {
    pb::TieredModel {
        tiers: tiers
            .iter()
            .map(|t| pb::Tier {
                up_to: opt_text(t.up_to),
                unit_price: t.unit_price.to_string(),
                flat_fee: opt_text(t.flat_fee),
            })
            .collect(),
    }
}

pub fn plan_to_proto(p: &Plan) -> pb::Plan {
    use pb::charge::Model;
    pb::Plan {
        plan_id: p.id.clone(),
        version: p.version,
        currency: p.currency.code().to_string(),
        minimum: opt_text(p.minimum),
        billing_interval: interval_to_proto(p.billing_interval) as i32,
        charges: p
            .charges
            .iter()
            .map(|c| pb::Charge {
                id: c.id.clone(),
                meter: c.meter.clone().unwrap_or_default(),
                minimum: opt_text(c.minimum),
                model: Some(match &c.model {
                    ChargeModel::Flat { amount } => Model::Flat(pb::FlatModel {
                        amount: amount.to_string(),
                    }),
                    ChargeModel::PerUnit { unit_price } => Model::PerUnit(pb::PerUnitModel {
                        unit_price: unit_price.to_string(),
                    }),
                    ChargeModel::Graduated { tiers } => Model::Graduated(tiers_to_proto(tiers)),
                    ChargeModel::Volume { tiers } => Model::Volume(tiers_to_proto(tiers)),
                    ChargeModel::Package {
                        package_size,
                        package_price,
                    } => Model::Package(pb::PackageModel {
                        package_size: package_size.to_string(),
                        package_price: package_price.to_string(),
                    }),
                }),
            })
            .collect(),
    }
}

/// The plan version defined on `subject` (from the log), and its sequence.
async fn defined_plan(gw: &MeteringGateway, subject: &str) -> Result<Option<(Plan, u64)>, Status> {
    let stream = gw.stream();
    let last = gw
        .log
        .last_subject_sequence(&stream, subject)
        .await
        .map_err(log_status)?;
    if last == 0 {
        return Ok(None);
    }
    let stored = gw
        .log
        .get(&stream, last)
        .await
        .map_err(log_status)?
        .ok_or_else(|| Status::internal(format!("plan at sequence {last} is missing")))?;
    let (_, json) = open_json(&stored)
        .ok_or_else(|| Status::internal(format!("plan at sequence {last} is unreadable")))?;
    let plan = serde_json::from_slice::<Plan>(&json)
        .map_err(|e| Status::internal(format!("plan at sequence {last}: {e}")))?;
    Ok(Some((plan, last)))
}

pub async fn put_plan(
    gw: &MeteringGateway,
    request: Request<pb::PutPlanRequest>,
) -> Result<Response<pb::PutPlanResponse>, Status> {
    let tenant = tenant(&request)?;
    let proto = request
        .into_inner()
        .plan
        .ok_or_else(|| Status::invalid_argument("`plan` is required"))?;
    let plan = plan_from_proto(&proto)?;
    let subject = gw
        .catalog
        .subject(&plan_subject(&tenant, &plan.id, plan.version));
    let mut append = seal_json(
        subject.clone(),
        EventMeta {
            id: format!("plan:{tenant}:{}:{}", plan.id, plan.version),
            event_type: billing::PLAN_DEFINED.into(),
            schema_version: 1,
            tenant,
            ..Default::default()
        },
        serde_json::to_vec(&plan).map_err(|e| Status::internal(e.to_string()))?,
    );
    // A version is defined once: the subject must still be empty.
    append.expected_subject_sequence = Some(0);
    match telemetry::append(&*gw.log, "metering.plans", append).await {
        Ok(Appended::New { sequence }) => {
            return Ok(Response::new(pb::PutPlanResponse {
                plan: Some(plan_to_proto(&plan)),
                sequence,
                created: true,
            }))
        }
        Ok(Appended::Duplicate { .. }) | Err(LogError::Conflict { .. }) => {}
        Err(e) => return Err(log_status(e)),
    }
    // A version defined before billing intervals, sent again as it was then (no interval):
    // the same content, as the caller sees it.
    let as_sent_before = |existing: &Plan| {
        proto.billing_interval == pb::BillingInterval::Unspecified as i32
            && *existing
                == Plan {
                    billing_interval: BillingInterval::PerInvoice,
                    ..plan.clone()
                }
    };
    match defined_plan(gw, &subject).await? {
        Some((existing, sequence)) if existing == plan || as_sent_before(&existing) => {
            Ok(Response::new(pb::PutPlanResponse {
                plan: Some(plan_to_proto(&existing)),
                sequence,
                created: false,
            }))
        }
        Some((existing, _)) if existing.billing_interval == BillingInterval::PerInvoice => {
            Err(Status::already_exists(format!(
                "plan {} v{} was defined before billing intervals and bills its fees per invoice; a version is immutable: publish this content as {}",
                plan.id,
                plan.version,
                next_version(&plan)
            )))
        }
        _ => Err(Status::already_exists(format!(
            "plan {} v{} is already defined with other content; a version is immutable: publish it as {}",
            plan.id,
            plan.version,
            next_version(&plan)
        ))),
    }
}

/// Where a changed plan goes: its next version, or a new id after the last one.
fn next_version(plan: &Plan) -> String {
    plan.version
        .checked_add(1)
        .map_or("a new plan id".to_string(), |v| format!("version {v}"))
}

pub async fn attach_plan(
    gw: &MeteringGateway,
    request: Request<pb::AttachPlanRequest>,
) -> Result<Response<pb::AttachPlanResponse>, Status> {
    let tenant = tenant(&request)?;
    let r = request.into_inner();
    check_subscription(&r.subscription_id)?;
    let effective_from = time("effective_from", &r.effective_from)?;
    hour_aligned("effective_from", effective_from)?;
    if !is_token(&r.plan_id) || r.version == 0 {
        return Err(Status::invalid_argument(
            "set `plan_id` and `version` (1 or more) of a plan defined with PutPlan",
        ));
    }
    let plan_ref = PlanRef {
        id: r.plan_id.clone(),
        version: r.version,
    };
    let subject = gw
        .catalog
        .subject(&plan_subject(&tenant, &r.plan_id, r.version));
    if defined_plan(gw, &subject).await?.is_none() {
        return Err(Status::invalid_argument(format!(
            "unknown plan {} v{}: define it with PutPlan first",
            r.plan_id, r.version
        )));
    }
    let attached = PlanAttached {
        subscription_id: r.subscription_id.clone(),
        plan: plan_ref,
        effective_from,
    };
    let subject = gw
        .catalog
        .subject(&attachments_subject(&tenant, &r.subscription_id));
    // The id dedupes a retried call, so it names the attachment it follows: v1, v2, then v1
    // again at the same time is a revert, not a retry of the first (the log dropped it as a
    // duplicate within its window and answered OK while v2 stayed in force). A call that
    // asks for what the last attachment already says is answered with it; the append expects
    // that last attachment, so a concurrent one makes this call look again.
    for _ in 0..5 {
        let after = gw
            .log
            .last_subject_sequence(&gw.stream(), &subject)
            .await
            .map_err(log_status)?;
        if after > 0 {
            let last = gw.log.get(&gw.stream(), after).await.map_err(log_status)?;
            let same = last
                .as_ref()
                .and_then(open_json)
                .and_then(|(_, json)| serde_json::from_slice::<PlanAttached>(&json).ok())
                .is_some_and(|a| a == attached);
            if same {
                return Ok(Response::new(pb::AttachPlanResponse { sequence: after }));
            }
        }
        let mut append = seal_json(
            subject.clone(),
            EventMeta {
                id: format!(
                    "attach:{tenant}:{}:{}:{}:{}:{after}",
                    r.subscription_id,
                    effective_from.timestamp(),
                    r.plan_id,
                    r.version
                ),
                event_type: billing::PLAN_ATTACHED.into(),
                schema_version: 1,
                tenant: tenant.clone(),
                ..Default::default()
            },
            serde_json::to_vec(&attached).map_err(|e| Status::internal(e.to_string()))?,
        );
        append.expected_subject_sequence = Some(after);
        match telemetry::append(&*gw.log, "metering.subscriptions", append).await {
            Ok(appended) => {
                return Ok(Response::new(pb::AttachPlanResponse {
                    sequence: appended.sequence(),
                }))
            }
            Err(LogError::Conflict { .. }) => continue,
            Err(e) => return Err(log_status(e)),
        }
    }
    Err(Status::aborted(
        "the subscription's plan kept changing under this call; retry",
    ))
}

// ---------------------------------------------------------------------------------------------
// Invoices.

fn pricing_status(e: PricingError) -> Status {
    match e {
        PricingError::EmptyPeriod { .. } | PricingError::CrossesBillingCycle { .. } => {
            Status::invalid_argument(e.to_string())
        }
        PricingError::NoPlanInPeriod { .. } => Status::failed_precondition(format!(
            "{e}: attach a plan with AttachPlan from the period's start or earlier"
        )),
        PricingError::DuplicateEffectiveFrom(_) | PricingError::CurrencyMismatch { .. } => {
            Status::failed_precondition(format!("{e}; fix the subscription's plan attachments"))
        }
        other => Status::failed_precondition(other.to_string()),
    }
}

fn to_decimal(v: f64) -> Result<Decimal, Status> {
    Decimal::from_str(&v.to_string())
        .or_else(|_| Decimal::from_scientific(&format!("{v:e}")))
        .map_err(|_| Status::out_of_range(format!("usage {v} does not fit an exact decimal")))
}

/// Usage of `meter` (a meter slug, else an event type's summed quantity) over `period`.
async fn segment_usage(
    gw: &MeteringGateway,
    tenant: &str,
    subscription_id: &str,
    meter: &str,
    period: Period,
) -> Result<Decimal, Status> {
    let m = match gw
        .read_model
        .meter(tenant, meter)
        .await
        .map_err(db_status)?
    {
        Some(m) if matches!(m.aggregation, Aggregation::Sum | Aggregation::Count) => m,
        Some(m) => {
            return Err(Status::failed_precondition(format!(
            "meter {meter:?} aggregates with {}: only SUM and COUNT meters can be billed by period",
            m.aggregation.as_str()
        )))
        }
        None => quantity_meter(meter),
    };
    let q = UsageQuery {
        tenant: tenant.to_string(),
        meter: m,
        from: period.start,
        to: period.end,
        window: Window::Hour,
        tz: Tz::UTC,
        group_by: Vec::new(),
        filters: vec![("subscription_id".into(), subscription_id.to_string())],
    };
    let rows = gw.read_model.usage(&q).await.map_err(db_status)?;
    let mut total = Decimal::ZERO;
    for row in rows {
        total = total
            .checked_add(to_decimal(row.value)?)
            .ok_or_else(|| Status::out_of_range("usage overflows an exact decimal"))?;
    }
    Ok(total)
}

/// The subscription's plan history; none is `FAILED_PRECONDITION`.
async fn assignments(
    gw: &MeteringGateway,
    tenant: &str,
    subscription_id: &str,
) -> Result<Vec<PlanAssignment>, Status> {
    let assignments = gw
        .read_model
        .billing()
        .assignments(tenant, subscription_id)
        .await
        .map_err(db_status)?;
    if assignments.is_empty() {
        return Err(Status::failed_precondition(format!(
            "subscription {subscription_id:?} has no plan: attach one with AttachPlan"
        )));
    }
    Ok(assignments)
}

/// Prices the period on `assignments` from the read model as it is now.
async fn compute(
    gw: &MeteringGateway,
    tenant: &str,
    subscription_id: &str,
    period: Period,
    assignments: &[PlanAssignment],
) -> Result<InvoiceDraft, Status> {
    let billing = gw.read_model.billing();
    let segs = segments(assignments, period).map_err(pricing_status)?;
    let mut plans: Vec<Plan> = Vec::new();
    let refs: BTreeSet<&PlanRef> = segs.iter().map(|s| &s.plan).collect();
    for r in refs {
        let plan = billing
            .plan(tenant, &r.id, r.version)
            .await
            .map_err(db_status)?
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "plan {} v{} is attached but not defined",
                    r.id, r.version
                ))
            })?;
        plans.push(plan);
    }
    let mut usage = Vec::with_capacity(segs.len());
    for seg in &segs {
        let plan = plans
            .iter()
            .find(|p| p.id == seg.plan.id && p.version == seg.plan.version)
            .expect("loaded above");
        let meters: BTreeSet<&str> = plan
            .charges
            .iter()
            .filter(|c| c.model.is_usage_based())
            .filter_map(|c| c.meter.as_deref())
            .collect();
        let mut per_meter = BTreeMap::new();
        for meter in meters {
            let q = segment_usage(gw, tenant, subscription_id, meter, seg.period).await?;
            per_meter.insert(meter.to_string(), q);
        }
        usage.push(SegmentUsage {
            period: seg.period,
            usage: per_meter,
        });
    }
    compute_invoice(&plans, assignments, period, &usage).map_err(pricing_status)
}

/// The subscription's issued invoices (document and its stored text): the read model's, and
/// those appended since its checkpoint up to `subject_last`, which another replica may have
/// issued a moment ago.
async fn issued_invoices(
    gw: &MeteringGateway,
    tenant: &str,
    subscription_id: &str,
    subject: &str,
    subject_last: u64,
) -> Result<Vec<(InvoiceDocument, String)>, Status> {
    // The checkpoint first: whatever it covers is in the read model read after it.
    let checkpoint = gw.read_model.checkpoint().await.map_err(db_status)?;
    let mut issued: Vec<(InvoiceDocument, String)> = gw
        .read_model
        .billing()
        .invoices(tenant, Some(subscription_id))
        .await
        .map_err(db_status)?
        .into_iter()
        .filter_map(|json| Some((serde_json::from_str(&json).ok()?, json)))
        .collect();
    if subject_last <= checkpoint {
        return Ok(issued);
    }
    let mut tail = gw
        .log
        .replay(
            &gw.stream(),
            ReplayFrom::Sequence(checkpoint + 1),
            Some(subject_last),
            Some(subject),
        )
        .await
        .map_err(log_status)?;
    while let Some(e) = tail.try_next().await.map_err(log_status)? {
        let Some((_, json)) = open_json(&e) else {
            continue;
        };
        if let Ok(doc) = serde_json::from_slice::<InvoiceDocument>(&json) {
            if doc.subscription_id == subscription_id {
                issued.push((doc, String::from_utf8_lossy(&json).into_owned()));
            }
        }
    }
    Ok(issued)
}

/// The subscription's issued invoices, as far as the log holds them now.
async fn issued_of(
    gw: &MeteringGateway,
    tenant: &str,
    subscription_id: &str,
) -> Result<Vec<(InvoiceDocument, String)>, Status> {
    let subject = gw.catalog.subject(&invoices_subject(tenant));
    let last = gw
        .log
        .last_subject_sequence(&gw.stream(), &subject)
        .await
        .map_err(log_status)?;
    issued_invoices(gw, tenant, subscription_id, &subject, last).await
}

/// An issued invoice of the subscription whose period overlaps `period` (and is not it) would
/// bill the same usage twice.
fn refuse_overlap(issued: &[(InvoiceDocument, String)], period: Period) -> Result<(), Status> {
    for (doc, _) in issued {
        let other = doc.invoice.period;
        if other != period && other.start < period.end && period.start < other.end {
            return Err(Status::failed_precondition(format!(
                "the period overlaps issued invoice {} ({} to {}): usage is billed once; choose a period that starts at or after {} or ends at or before {}",
                doc.number.clone().unwrap_or_default(),
                other.start.to_rfc3339(),
                other.end.to_rfc3339(),
                other.end.to_rfc3339(),
                other.start.to_rfc3339()
            )));
        }
    }
    Ok(())
}

/// Issued invoices of a subscription follow each other: one that started after the latest
/// issued before it ended would leave the time between, when a plan was in force, on no invoice.
fn refuse_gap(
    issued: &[(InvoiceDocument, String)],
    assignments: &[PlanAssignment],
    period: Period,
) -> Result<(), Status> {
    let Some(previous) = issued
        .iter()
        .filter(|(doc, _)| doc.invoice.period.end <= period.start)
        .max_by_key(|(doc, _)| doc.invoice.period.end)
        .map(|(doc, _)| doc)
    else {
        return Ok(());
    };
    let Ok(gap) = Period::new(previous.invoice.period.end, period.start) else {
        return Ok(());
    };
    match segments(assignments, gap) {
        Ok(in_force) => Err(Status::failed_precondition(format!(
            "issued invoice {} ends at {}, so the time until {}, when plan {} v{} was in force, would be billed by no invoice: generate the period from {} first",
            previous.number.clone().unwrap_or_default(),
            gap.start.to_rfc3339(),
            gap.end.to_rfc3339(),
            in_force[0].plan.id,
            in_force[0].plan.version,
            gap.start.to_rfc3339()
        ))),
        // No plan in force in between: nothing to bill there.
        Err(_) => Ok(()),
    }
}

/// Issues the invoice: the next number of the tenant, taken by appending with the invoice
/// subject's last sequence expected, so a concurrent issuance makes this one retry.
async fn issue(
    gw: &MeteringGateway,
    tenant: &str,
    subscription_id: &str,
    period: Period,
    grace_ends_at: DateTime<Utc>,
) -> Result<String, Status> {
    let stream = gw.stream();
    let subject = gw.catalog.subject(&invoices_subject(tenant));
    // Read once: the gap check and the pricing of every attempt use them.
    let assignments = assignments(gw, tenant, subscription_id).await?;
    let mut draft: Option<InvoiceDraft> = None;
    for attempt in 0..ISSUE_ATTEMPTS {
        let last = gw
            .log
            .last_subject_sequence(&stream, &subject)
            .await
            .map_err(log_status)?;
        // Checked at every attempt, against the log as far as `last`: an overlapping
        // invoice issued by a concurrent call is what made the previous attempt conflict.
        let issued = issued_invoices(gw, tenant, subscription_id, &subject, last).await?;
        if let Some((_, json)) = issued.iter().find(|(d, _)| d.invoice.period == period) {
            return Ok(json.clone());
        }
        refuse_overlap(&issued, period)?;
        refuse_gap(&issued, &assignments, period)?;
        let previous = if last == 0 {
            0
        } else {
            let stored = gw
                .log
                .get(&stream, last)
                .await
                .map_err(log_status)?
                .ok_or_else(|| Status::internal(format!("invoice at {last} is missing")))?;
            open_json(&stored)
                .and_then(|(_, json)| serde_json::from_slice::<InvoiceDocument>(&json).ok())
                .and_then(|d| d.number_seq)
                .ok_or_else(|| Status::internal(format!("invoice at {last} is unreadable")))?
        };
        let invoice = match &draft {
            Some(d) => d.clone(),
            None => draft
                .insert(compute(gw, tenant, subscription_id, period, &assignments).await?)
                .clone(),
        };
        let number_seq = previous + 1;
        let doc = InvoiceDocument {
            number: Some(invoice_number(tenant, number_seq)),
            number_seq: Some(number_seq),
            tenant: tenant.to_string(),
            subscription_id: subscription_id.to_string(),
            status: InvoiceStatus::Issued,
            issued_at: Some(Utc::now()),
            grace_ends_at,
            invoice,
        };
        let json = serde_json::to_vec(&doc).map_err(|e| Status::internal(e.to_string()))?;
        let mut append = seal_json(
            subject.clone(),
            EventMeta {
                id: format!(
                    "invoice:{tenant}:{subscription_id}:{}:{}",
                    period.start.timestamp(),
                    period.end.timestamp()
                ),
                event_type: billing::INVOICE_ISSUED.into(),
                schema_version: 1,
                tenant: tenant.to_string(),
                ..Default::default()
            },
            json.clone(),
        );
        append.expected_subject_sequence = Some(last);
        match telemetry::append(&*gw.log, "metering.invoices", append).await {
            Ok(Appended::New { .. }) => return Ok(String::from_utf8_lossy(&json).into_owned()),
            Ok(Appended::Duplicate { sequence }) => {
                let stored = gw.log.get(&stream, sequence).await.map_err(log_status)?;
                if let Some((_, json)) = stored.as_ref().and_then(open_json) {
                    return Ok(String::from_utf8_lossy(&json).into_owned());
                }
            }
            Err(LogError::Conflict { .. }) => {
                // Another issuance took the number: back off a little and take the next.
                let jitter = (attempt as u64 % 7) * 3 + 1;
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            Err(e) => return Err(log_status(e)),
        }
    }
    Err(Status::aborted(
        "too many concurrent invoice issuances for this tenant; retry",
    ))
}

fn decimal_text(d: Decimal) -> String {
    d.to_string()
}

pub fn invoice_to_proto(doc: &InvoiceDocument, json: String) -> pb::Invoice {
    let ts = |t: DateTime<Utc>| Some(envelope::timestamp(t));
    let inv = &doc.invoice;
    pb::Invoice {
        number: doc.number.clone().unwrap_or_default(),
        subscription_id: doc.subscription_id.clone(),
        status: match doc.status {
            InvoiceStatus::Draft => pb::InvoiceStatus::Draft,
            InvoiceStatus::Issued => pb::InvoiceStatus::Issued,
        } as i32,
        currency: inv.currency.code().to_string(),
        period_start: ts(inv.period.start),
        period_end: ts(inv.period.end),
        lines: inv
            .lines
            .iter()
            .map(|l| pb::InvoiceLine {
                charge_id: l.charge_id.clone(),
                meter: l.meter.clone().unwrap_or_default(),
                plan_id: l.plan_id.clone(),
                plan_version: l.plan_version,
                segment_start: ts(l.segment.start),
                segment_end: ts(l.segment.end),
                quantity: decimal_text(l.quantity),
                proration: opt_text(l.proration),
                tiers: l
                    .tier_breakdown
                    .iter()
                    .map(|t| pb::TierLine {
                        tier: t.tier as u32,
                        from: decimal_text(t.from),
                        to: opt_text(t.to),
                        units: decimal_text(t.units),
                        unit_price: decimal_text(t.unit_price),
                        flat_fee: decimal_text(t.flat_fee),
                        amount: decimal_text(t.amount),
                    })
                    .collect(),
                amount: decimal_text(l.amount),
                description: l.description.clone(),
            })
            .collect(),
        subtotal: decimal_text(inv.subtotal),
        minimum_adjustments: inv
            .minimum_adjustments
            .iter()
            .map(|a| pb::MinimumAdjustment {
                plan_id: a.plan_id.clone(),
                plan_version: a.plan_version,
                charge_id: a.charge_id.clone().unwrap_or_default(),
                minimum: decimal_text(a.minimum),
                charged: decimal_text(a.charged),
                amount: decimal_text(a.amount),
                description: a.description.clone(),
            })
            .collect(),
        total: decimal_text(inv.total),
        issued_at: doc.issued_at.and_then(ts),
        grace_ends_at: ts(doc.grace_ends_at),
        document: json,
    }
}

fn stored_to_proto(json: String) -> Result<pb::Invoice, Status> {
    let doc = serde_json::from_str::<InvoiceDocument>(&json)
        .map_err(|e| Status::internal(format!("stored invoice is unreadable: {e}")))?;
    Ok(invoice_to_proto(&doc, json))
}

fn count(status: &str) {
    metrics::METERING_INVOICE_GENERATION
        .with_label_values(&[status])
        .inc();
}

pub async fn generate_invoice(
    gw: &MeteringGateway,
    request: Request<pb::GenerateInvoiceRequest>,
) -> Result<Response<pb::GenerateInvoiceResponse>, Status> {
    let tenant = tenant(&request)?;
    let r = request.into_inner();
    let result = generate(gw, &tenant, r).await;
    match &result {
        Ok(i) if i.status == pb::InvoiceStatus::Issued as i32 => count("issued"),
        Ok(_) => count("draft"),
        Err(_) => count("failed"),
    }
    result.map(|invoice| {
        Response::new(pb::GenerateInvoiceResponse {
            invoice: Some(invoice),
        })
    })
}

async fn generate(
    gw: &MeteringGateway,
    tenant: &str,
    r: pb::GenerateInvoiceRequest,
) -> Result<pb::Invoice, Status> {
    check_subscription(&r.subscription_id)?;
    let start = time("period_start", &r.period_start)?;
    let end = time("period_end", &r.period_end)?;
    if end <= start {
        return Err(Status::invalid_argument(format!(
            "period_end {} must be after period_start {}: the period is [period_start, period_end)",
            end.to_rfc3339(),
            start.to_rfc3339()
        )));
    }
    hour_aligned("period_start", start)?;
    hour_aligned("period_end", end)?;
    let period = Period::new(start, end).map_err(pricing_status)?;
    let grace = gw.limits.late_window;
    let grace_ends_at = end
        .checked_add_signed(grace.max(TimeDelta::zero()))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    // Decided before the catch-up: every event the projector still accepts for the period
    // (recorded before the grace period ends) is then in the log the catch-up waits for.
    // Decided after it, an event accepted meanwhile was left out of an issued invoice.
    let state = invoice_state(end, grace, Utc::now());
    gw.catch_up().await?;
    match state {
        InvoiceStatus::Issued => {
            let json = issue(gw, tenant, &r.subscription_id, period, grace_ends_at).await?;
            stored_to_proto(json)
        }
        InvoiceStatus::Draft => {
            // Once issued, a period answers with its invoice, even if the late window has
            // since been made longer; a draft overlapping an issued one could never be issued.
            let issued = issued_of(gw, tenant, &r.subscription_id).await?;
            if let Some((_, json)) = issued.iter().find(|(d, _)| d.invoice.period == period) {
                return stored_to_proto(json.clone());
            }
            refuse_overlap(&issued, period)?;
            let assignments = assignments(gw, tenant, &r.subscription_id).await?;
            let invoice = compute(gw, tenant, &r.subscription_id, period, &assignments).await?;
            let doc = InvoiceDocument {
                number: None,
                number_seq: None,
                tenant: tenant.to_string(),
                subscription_id: r.subscription_id.clone(),
                status: InvoiceStatus::Draft,
                issued_at: None,
                grace_ends_at,
                invoice,
            };
            let json = serde_json::to_string(&doc).map_err(|e| Status::internal(e.to_string()))?;
            Ok(invoice_to_proto(&doc, json))
        }
    }
}

pub async fn get_invoice(
    gw: &MeteringGateway,
    request: Request<pb::GetInvoiceRequest>,
) -> Result<Response<pb::GetInvoiceResponse>, Status> {
    let tenant = tenant(&request)?;
    let number = request.into_inner().number;
    if number.is_empty() {
        return Err(Status::invalid_argument(
            "`number` is required (INV-<tenant>-000001); drafts have none: call GenerateInvoice",
        ));
    }
    let billing = gw.read_model.billing();
    let mut found = billing.invoice(&tenant, &number).await.map_err(db_status)?;
    if found.is_none() {
        gw.catch_up().await?;
        found = billing.invoice(&tenant, &number).await.map_err(db_status)?;
    }
    let json = found.ok_or_else(|| Status::not_found(format!("no issued invoice {number:?}")))?;
    Ok(Response::new(pb::GetInvoiceResponse {
        invoice: Some(stored_to_proto(json)?),
    }))
}

pub async fn list_invoices(
    gw: &MeteringGateway,
    request: Request<pb::ListInvoicesRequest>,
) -> Result<Response<pb::ListInvoicesResponse>, Status> {
    let tenant = tenant(&request)?;
    let sub = request.into_inner().subscription_id;
    if !sub.is_empty() {
        check_subscription(&sub)?;
    }
    gw.catch_up().await?;
    let docs = gw
        .read_model
        .billing()
        .invoices(&tenant, (!sub.is_empty()).then_some(sub.as_str()))
        .await
        .map_err(db_status)?;
    Ok(Response::new(pb::ListInvoicesResponse {
        invoices: docs
            .into_iter()
            .map(stored_to_proto)
            .collect::<Result<_, _>>()?,
    }))
}
