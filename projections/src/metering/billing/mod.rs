//! Corrections, plans, plan attachments and issued invoices: facts of the METERING stream
//! written by the gateway (`MeteringService/VoidEvent`, `AmendEvent`, `PutPlan`, `AttachPlan`,
//! `GenerateInvoice`), and how both read models (PostgreSQL in [`pg`], sled in [`embedded`])
//! keep them.
//!
//! Subjects (each fact in an envelope whose payload is the fact's JSON):
//! - `metering.corrections.<tenant>.<subscription>`: `EventVoided` / `EventAmended`. The
//!   original usage event stays in the log and in `metering_events`; the read models keep the
//!   current correction of each event beside it, and usage (queries, `usage_hourly`) reads the
//!   events through it: a voided event counts for nothing, an amended one with its new
//!   quantity and dimensions. Every correction is kept in the audit trail
//!   (`metering_corrections`), applied or not.
//! - `metering.plans.<tenant>.<plan>.<version>`: `PlanDefined`, appended once per version
//!   (the subject must be empty), so a version never changes.
//! - `metering.subscriptions.<tenant>.<subscription>`: `PlanAttached` (a plan version from an
//!   instant on; a later attachment at the same instant replaces it).
//! - `metering.invoices.<tenant>`: `InvoiceIssued`, one subject per tenant so that an invoice
//!   number is taken by appending with the subject's expected last sequence: two replicas
//!   cannot issue the same number, and numbers have no gaps.
//!
//! Replays are idempotent: a correction is applied once by its id, a plan version and an
//! invoice are first-wins, an attachment is last-wins by stream sequence.
pub mod embedded;
pub mod pg;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use creto_domain::metering::invoice::{InvoiceDraft, InvoiceStatus};
use creto_domain::metering::pricing::{Plan, PlanAssignment, PlanRef};
use creto_domain::metering::{Invalid, InvalidReason, UsageRecord};
use creto_streams::envelope::{self, EventMeta};
use creto_streams::headers::{content_types, names};
use creto_streams::{AppendEvent, Headers, StoredEvent};
use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::decode::Decoded;
use crate::runner::ProjectionError;

pub const EVENT_VOIDED: &str = "creto.metering.v1.EventVoided";
pub const EVENT_AMENDED: &str = "creto.metering.v1.EventAmended";
pub const PLAN_DEFINED: &str = "creto.metering.v1.PlanDefined";
pub const PLAN_ATTACHED: &str = "creto.metering.v1.PlanAttached";
pub const INVOICE_ISSUED: &str = "creto.metering.v1.InvoiceIssued";

pub fn corrections_subject(tenant: &str, subscription_id: &str) -> String {
    format!("metering.corrections.{tenant}.{subscription_id}")
}

pub fn plan_subject(tenant: &str, plan_id: &str, version: u32) -> String {
    format!("metering.plans.{tenant}.{plan_id}.{version}")
}

pub fn attachments_subject(tenant: &str, subscription_id: &str) -> String {
    format!("metering.subscriptions.{tenant}.{subscription_id}")
}

pub fn invoices_subject(tenant: &str) -> String {
    format!("metering.invoices.{tenant}")
}

/// `INV-<tenant>-000042`.
pub fn invoice_number(tenant: &str, seq: u64) -> String {
    format!("INV-{tenant}-{seq:06}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorrectionKind {
    Void,
    Amend,
}

impl CorrectionKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            CorrectionKind::Void => "void",
            CorrectionKind::Amend => "amend",
        }
    }
}

/// A void or an amend, as appended (the JSON payload of its envelope). The gateway fills the
/// corrected event's type, time and sequence from the log, so the projectors find its hour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorrectionFact {
    pub correction_id: String,
    pub kind: CorrectionKind,
    pub tenant: String,
    pub subscription_id: String,
    pub event_id: String,
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    pub event_sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Map<String, Value>>,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// The current correction of one event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CorrectionState {
    pub voided: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Map<String, Value>>,
}

impl CorrectionState {
    /// Applies a correction in log order; false when it changes nothing it may change (a
    /// second void, an amend of a voided event), which the audit trail records as not applied.
    pub fn apply(&mut self, fact: &CorrectionFact) -> bool {
        if self.voided {
            return false;
        }
        match fact.kind {
            CorrectionKind::Void => self.voided = true,
            CorrectionKind::Amend => {
                if let Some(q) = fact.quantity {
                    self.quantity = Some(q);
                }
                if let Some(d) = &fact.data {
                    self.data = Some(d.clone());
                }
            }
        }
        true
    }

    /// The event as usage sees it now; `None` when voided.
    pub fn effective(&self, mut record: UsageRecord) -> Option<UsageRecord> {
        if self.voided {
            return None;
        }
        if let Some(q) = self.quantity {
            record.quantity = q;
        }
        if let Some(d) = &self.data {
            record.dimensions = d.clone();
        }
        Some(record)
    }
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorrectionRecord {
    pub correction_id: String,
    pub kind: CorrectionKind,
    pub subscription_id: String,
    pub event_id: String,
    pub quantity: Option<f64>,
    pub data: Option<Map<String, Value>>,
    pub reason: String,
    pub applied: bool,
    pub recorded_at: DateTime<Utc>,
    pub sequence: u64,
}

/// `PlanAttached`'s payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanAttached {
    pub subscription_id: String,
    pub plan: PlanRef,
    pub effective_from: DateTime<Utc>,
}

/// An invoice as stored and served: a draft computed on demand, or the issued invoice whose
/// JSON is the `InvoiceIssued` payload, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceDocument {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number_seq: Option<u64>,
    pub tenant: String,
    pub subscription_id: String,
    pub status: InvoiceStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<DateTime<Utc>>,
    pub grace_ends_at: DateTime<Utc>,
    pub invoice: InvoiceDraft,
}

/// A fact of this module, decoded from the log.
#[derive(Debug, Clone, PartialEq)]
pub enum BillingFact {
    Correction(CorrectionFact),
    PlanDefined {
        tenant: String,
        plan: Plan,
    },
    PlanAttached {
        tenant: String,
        attached: PlanAttached,
    },
    InvoiceIssued {
        tenant: String,
        /// The payload as stored: the read models keep these bytes.
        document: String,
        invoice: Box<InvoiceDocument>,
    },
}

impl BillingFact {
    /// The usage key whose counters a correction changes.
    pub fn usage_key(&self) -> Option<(String, String, String)> {
        match self {
            BillingFact::Correction(c) => Some((
                c.tenant.clone(),
                c.subscription_id.clone(),
                c.event_type.clone(),
            )),
            _ => None,
        }
    }
}

const PREFIXES: [&str; 4] = [
    "metering.corrections.",
    "metering.plans.",
    "metering.subscriptions.",
    "metering.invoices.",
];

/// Decodes a message on one of this module's subjects (`subject` without namespace); `None`
/// for any other subject.
pub fn decode(subject: &str, event: &StoredEvent) -> Option<Decoded> {
    if !PREFIXES.iter().any(|p| subject.starts_with(p)) {
        return None;
    }
    let invalid = |reason, detail: String| Some(Decoded::Invalid(Invalid { reason, detail }));
    let env = match envelope::open(&event.payload) {
        Ok(env) => env,
        Err(e) => {
            return invalid(
                InvalidReason::MalformedProtobuf,
                format!("not an envelope: {e}"),
            )
        }
    };
    let bad = |e: serde_json::Error| {
        Some(Decoded::Invalid(Invalid {
            reason: InvalidReason::InvalidField,
            detail: format!("{}: {e}", env.r#type),
        }))
    };
    let fact = match env.r#type.as_str() {
        EVENT_VOIDED | EVENT_AMENDED => match serde_json::from_slice(&env.payload) {
            Ok(c) => BillingFact::Correction(c),
            Err(e) => return bad(e),
        },
        PLAN_DEFINED => match serde_json::from_slice::<Plan>(&env.payload) {
            Ok(plan) => BillingFact::PlanDefined {
                tenant: env.tenant.clone(),
                plan,
            },
            Err(e) => return bad(e),
        },
        PLAN_ATTACHED => match serde_json::from_slice(&env.payload) {
            Ok(attached) => BillingFact::PlanAttached {
                tenant: env.tenant.clone(),
                attached,
            },
            Err(e) => return bad(e),
        },
        INVOICE_ISSUED => match serde_json::from_slice::<InvoiceDocument>(&env.payload) {
            Ok(invoice) => BillingFact::InvoiceIssued {
                tenant: env.tenant.clone(),
                document: String::from_utf8_lossy(&env.payload).into_owned(),
                invoice: Box::new(invoice),
            },
            Err(e) => return bad(e),
        },
        other => {
            return invalid(
                InvalidReason::InvalidField,
                format!("unexpected event type {other} on {subject}"),
            )
        }
    };
    Some(Decoded::Billing(fact))
}

/// Wraps a JSON payload in an envelope ready to append to `subject` (the same envelope and
/// headers as [`envelope::seal`], with the fact's JSON as the payload).
pub fn seal_json(subject: String, meta: EventMeta, json: Vec<u8>) -> AppendEvent {
    let now = Utc::now();
    let env = creto_schemas::events::v1::EventEnvelope {
        id: meta.id.clone(),
        r#type: meta.event_type.clone(),
        schema_version: meta.schema_version.max(1),
        tenant: meta.tenant.clone(),
        occurred_at: Some(envelope::timestamp(meta.occurred_at.unwrap_or(now))),
        recorded_at: Some(envelope::timestamp(now)),
        correlation_id: meta.correlation_id,
        causation_id: meta.causation_id,
        payload: json,
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
        payload: env.encode_to_vec().into(),
    }
}

/// The JSON payload of an envelope read back from the log.
pub fn open_json(event: &StoredEvent) -> Option<(String, Vec<u8>)> {
    envelope::open(&event.payload)
        .ok()
        .map(|env| (env.r#type, env.payload))
}

/// What the gateway reads about corrections, plans and invoices. Both read models implement
/// it (`MeteringReadModel::billing`).
#[async_trait]
pub trait BillingReadModel: Send + Sync {
    /// Stream sequence of an accepted usage event.
    async fn event_sequence(
        &self,
        tenant: &str,
        subscription_id: &str,
        event_id: &str,
    ) -> Result<Option<u64>, ProjectionError>;
    async fn correction_state(
        &self,
        tenant: &str,
        subscription_id: &str,
        event_id: &str,
    ) -> Result<Option<CorrectionState>, ProjectionError>;
    /// The audit trail of a subscription, in log order.
    async fn corrections(
        &self,
        tenant: &str,
        subscription_id: &str,
    ) -> Result<Vec<CorrectionRecord>, ProjectionError>;
    async fn plan(
        &self,
        tenant: &str,
        plan_id: &str,
        version: u32,
    ) -> Result<Option<Plan>, ProjectionError>;
    async fn assignments(
        &self,
        tenant: &str,
        subscription_id: &str,
    ) -> Result<Vec<PlanAssignment>, ProjectionError>;
    /// An issued invoice's stored JSON, by number.
    async fn invoice(&self, tenant: &str, number: &str) -> Result<Option<String>, ProjectionError>;
    /// Issued invoices in number order, of one subscription or of the whole tenant.
    async fn invoices(
        &self,
        tenant: &str,
        subscription_id: Option<&str>,
    ) -> Result<Vec<String>, ProjectionError>;
}

/// A fact's name, for `replay --dry-run` counts.
pub fn fact_name(fact: &BillingFact) -> &'static str {
    match fact {
        BillingFact::Correction(c) if c.kind == CorrectionKind::Void => "event_voided",
        BillingFact::Correction(_) => "event_amended",
        BillingFact::PlanDefined { .. } => "plan_defined",
        BillingFact::PlanAttached { .. } => "plan_attached",
        BillingFact::InvoiceIssued { .. } => "invoice_issued",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn fact(kind: CorrectionKind, quantity: Option<f64>, model: Option<&str>) -> CorrectionFact {
        let at = Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap();
        CorrectionFact {
            correction_id: "c".into(),
            kind,
            tenant: "t".into(),
            subscription_id: "s".into(),
            event_id: "e".into(),
            event_type: "x".into(),
            occurred_at: at,
            event_sequence: 1,
            quantity,
            data: model.map(|m| {
                let mut d = Map::new();
                d.insert("model".into(), Value::String(m.into()));
                d
            }),
            reason: "r".into(),
            at,
        }
    }

    fn record() -> UsageRecord {
        UsageRecord {
            id: "e".into(),
            source: "src".into(),
            event_type: "x".into(),
            subscription_id: "s".into(),
            tenant: "t".into(),
            time: Utc::now(),
            quantity: 5.0,
            dimensions: Map::new(),
        }
    }

    #[test]
    fn amends_replace_values_a_void_is_final_and_a_second_one_changes_nothing() {
        let mut s = CorrectionState::default();
        assert!(s.apply(&fact(CorrectionKind::Amend, Some(2.0), None)));
        assert!(s.apply(&fact(CorrectionKind::Amend, None, Some("m2"))));
        let r = s.effective(record()).unwrap();
        assert_eq!(
            (r.quantity, r.dimensions["model"].as_str()),
            (2.0, Some("m2"))
        );
        assert!(s.apply(&fact(CorrectionKind::Void, None, None)));
        assert!(s.effective(record()).is_none());
        assert!(!s.apply(&fact(CorrectionKind::Void, None, None)));
        assert!(!s.apply(&fact(CorrectionKind::Amend, Some(9.0), None)));
        assert!(s.voided);
    }

    #[test]
    fn a_sealed_fact_decodes_back() {
        let c = fact(CorrectionKind::Void, None, None);
        let append = seal_json(
            corrections_subject("t", "s"),
            EventMeta {
                id: c.correction_id.clone(),
                event_type: EVENT_VOIDED.into(),
                tenant: "t".into(),
                ..Default::default()
            },
            serde_json::to_vec(&c).unwrap(),
        );
        let stored = StoredEvent {
            stream: "METERING".into(),
            sequence: 7,
            subject: append.subject.clone(),
            headers: append.headers.clone(),
            payload: append.payload.clone(),
            recorded_at: Utc::now(),
        };
        assert_eq!(
            decode(&stored.subject, &stored),
            Some(Decoded::Billing(BillingFact::Correction(c)))
        );
        assert_eq!(decode("metering.events.s", &stored), None);
        assert_eq!(invoice_number("acme", 42), "INV-acme-000042");
    }
}
