//! Commands are validated by `domain`, appended to the log and answered with their stream
//! sequence; queries read the Postgres read model, optionally after waiting for a sequence.
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use creto_domain::metering::{self, event::DEFAULT_TENANT, IngestLimits, Window};
use creto_projections::metering::decode::{
    meter_from_proto, meter_to_proto, raw_from_proto, METER_DEFINED,
};
use creto_projections::metering::query::{self, UsageQuery};
use creto_projections::metering::read_model::{self, MeteringReadModel};
use creto_projections::metrics;
use creto_schemas::metering::v1 as pb;
use creto_schemas::metering::v1::metering_service_server::MeteringService;
use creto_streams::deadletter::{self, DeadLetter};
use creto_streams::envelope::{self, EventMeta};
use creto_streams::headers::{content_types, names};
use creto_streams::{AppendEvent, Catalog, EventLog, Headers, LogError, StoredEvent};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::auth::PLATFORM_OPERATOR;

/// The "stream" a dead letter of an event `IngestEvents` refused names as its origin: the
/// event never reached the log. Its letter re-drives to metering's subject like any other.
pub const GRPC_ORIGIN: &str = "grpc";
use crate::log_status::log_status;
use crate::metering::{db_status, ingest};
use crate::telemetry;

pub const MAX_BATCH: usize = 1_000;
/// Upper bound on windows in one answer, so a MINUTE query over a year is refused up front.
pub const MAX_WINDOWS: i64 = 50_000;
/// Filters of one QueryUsage (dimension = value pairs, all required).
pub const MAX_FILTERS: usize = 16;

pub struct MeteringGateway {
    pub log: Arc<dyn EventLog>,
    pub read_model: Arc<dyn MeteringReadModel>,
    pub catalog: Catalog,
    pub limits: IngestLimits,
    /// This replica's quota books (`crate::metering::quota`).
    pub quotas: Arc<crate::metering::quota::QuotaView>,
}

/// The caller's tenant: every read and write below is scoped to it.
fn tenant<T>(request: &Request<T>) -> Result<String, Status> {
    Ok(crate::auth::layer::caller(request)?.tenant.clone())
}

/// A usage value beyond a 64-bit float's range: only a meter over a property whose values
/// producers send near f64::MAX gets there (quantities are capped per event).
fn out_of_range(q: &UsageQuery) -> Status {
    let what = if q.meter.slug.is_empty() {
        format!("event type {:?}", q.meter.event_type)
    } else {
        format!("meter {:?}", q.meter.slug)
    };
    Status::out_of_range(format!(
        "{what}: a window's value is beyond a 64-bit float's range (about 1.8e308); the events' {:?} values are too large to aggregate",
        q.meter.value_path.join(".")
    ))
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    envelope::timestamp(t)
}

impl MeteringGateway {
    fn deadletter_rejected(
        &self,
        tenant: &str,
        event: &pb::UsageEvent,
        invalid: &metering::Invalid,
    ) -> AppendEvent {
        // Rejected gRPC events never reach the metering stream; they are parked as they came.
        let encoded = event.encode_to_vec();
        // The letter's id is the refusal's, whole: the same event refused again for the same
        // reason is parked once, and two different events (two without an id, or reusing
        // one) are parked both. Named by subject, id and reason, the second was dropped as
        // a duplicate of the first within the log's duplicate window.
        let id = {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            for part in [
                tenant.as_bytes(),
                invalid.reason.as_str().as_bytes(),
                &encoded,
            ] {
                h.update((part.len() as u64).to_be_bytes());
                h.update(part);
            }
            format!("dl:grpc:{}", &hex::encode(h.finalize())[..32])
        };
        let original = StoredEvent {
            stream: GRPC_ORIGIN.into(),
            sequence: 0,
            subject: self
                .catalog
                .subject(&format!("metering.events.{}", event.subject)),
            headers: Headers::new()
                .with(names::CONTENT_TYPE, content_types::PROTOBUF)
                .with(names::TENANT, tenant),
            payload: encoded.into(),
            recorded_at: Utc::now(),
        };
        let mut letter = deadletter::letter(
            &original,
            &self.catalog.deadletter_subject(creto_streams::METERING),
            invalid.reason.as_str(),
            &invalid.detail,
            0,
        );
        letter.id = id;
        letter
    }
}

#[tonic::async_trait]
impl MeteringService for MeteringGateway {
    async fn ingest_events(
        &self,
        request: Request<pb::IngestEventsRequest>,
    ) -> Result<Response<pb::IngestEventsResponse>, Status> {
        let tenant = tenant(&request)?;
        let events = request.into_inner().events;
        if events.is_empty() {
            return Err(Status::invalid_argument(
                "events is empty: send 1 to 1000 events",
            ));
        }
        if events.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} events in one call; send at most {MAX_BATCH} per IngestEvents",
                events.len()
            )));
        }
        let now = Utc::now();
        let mut rejections = Vec::new();
        let mut items = Vec::with_capacity(events.len());
        for e in &events {
            let checked = ingest::validate(
                raw_from_proto(e, Some(&tenant)),
                now,
                e.encoded_len(),
                &self.limits,
            );
            items.push(checked.map(|record| {
                ingest::Candidate {
                    append: AppendEvent {
                        subject: self
                            .catalog
                            .subject(&format!("metering.events.{}", record.subscription_id)),
                        id: format!("{tenant}:{}:{}", record.subscription_id, record.id),
                        expected_subject_sequence: None,
                        headers: Headers::new()
                            .with(names::CONTENT_TYPE, content_types::PROTOBUF)
                            .with(names::TENANT, &tenant)
                            .with(names::EVENT_TYPE, &record.event_type),
                        payload: e.encode_to_vec().into(),
                    },
                    record,
                }
            }));
        }
        let outcomes = ingest::submit(
            &*self.log,
            &*self.read_model,
            items,
            &mut ingest::Seen::new(),
            false,
        )
        .await
        .map_err(|e| match e {
            ingest::SubmitError::ReadModel(e) => db_status(e),
            e @ ingest::SubmitError::Log(_) => Status::unavailable(e.to_string()),
        })?;
        let mut results: Vec<pb::IngestResult> = Vec::with_capacity(events.len());
        for (e, outcome) in events.iter().zip(outcomes) {
            let mut result = pb::IngestResult {
                id: e.id.clone(),
                ..Default::default()
            };
            match outcome {
                ingest::Outcome::Accepted { sequence } => {
                    result.status = pb::IngestStatus::Accepted as i32;
                    result.sequence = sequence;
                }
                ingest::Outcome::Duplicate { sequence, of } => {
                    result.status = pb::IngestStatus::Duplicate as i32;
                    result.sequence = sequence;
                    if of != ingest::DuplicateOf::Log {
                        result.reason = of.sentence().into();
                    }
                }
                ingest::Outcome::Rejected(invalid) => {
                    result.status = pb::IngestStatus::Rejected as i32;
                    result.reason = invalid.to_string();
                    metrics::METERING_INVALID
                        .with_label_values(&[invalid.reason.as_str()])
                        .inc();
                    rejections.push(self.deadletter_rejected(&tenant, e, &invalid));
                }
            }
            results.push(result);
        }
        // Counted like the projector's dead letters, so DeadLettersGrowing sees these too.
        let reasons: Vec<String> = rejections
            .iter()
            .map(|l| l.headers.get(names::DL_REASON).unwrap_or("").to_string())
            .collect();
        let stream = self.catalog.stream(creto_streams::METERING);
        let parked = self.log.append_batch(rejections).await;
        for (r, reason) in parked.into_iter().zip(&reasons) {
            match r {
                Ok(a) if !a.is_duplicate() => metrics::DEADLETTERS
                    .with_label_values(&[stream.as_str(), reason.as_str()])
                    .inc(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not park a rejected event in the dead letters")
                }
            }
        }
        let count =
            |s: pb::IngestStatus| results.iter().filter(|r| r.status == s as i32).count() as u32;
        Ok(Response::new(pb::IngestEventsResponse {
            sequence: results.iter().map(|r| r.sequence).max().unwrap_or(0),
            accepted: count(pb::IngestStatus::Accepted),
            duplicates: count(pb::IngestStatus::Duplicate),
            rejected: count(pb::IngestStatus::Rejected),
            results,
        }))
    }

    async fn query_usage(
        &self,
        request: Request<pb::QueryUsageRequest>,
    ) -> Result<Response<pb::QueryUsageResponse>, Status> {
        let tenant = tenant(&request)?;
        let r = request.into_inner();
        let started = std::time::Instant::now();

        if r.filters.len() > MAX_FILTERS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_FILTERS} filters, not {}",
                r.filters.len()
            )));
        }
        let mut filters: Vec<(String, String)> = r.filters.into_iter().collect();
        filters.sort();
        // The subscription narrows the query as a filter (checked with the others below).
        if !r.subscription_id.is_empty() && (!r.meter.is_empty() || !r.event_type.is_empty()) {
            filters.push(("subscription_id".into(), r.subscription_id.clone()));
        } else if r.meter.is_empty() {
            return Err(Status::invalid_argument(
                "set `meter`, or `subscription_id` and `event_type`",
            ));
        }
        let from = r
            .from
            .as_ref()
            .and_then(envelope::from_timestamp)
            .ok_or_else(|| Status::invalid_argument("`from` is required"))?;
        let to =
            r.to.as_ref()
                .and_then(envelope::from_timestamp)
                .ok_or_else(|| Status::invalid_argument("`to` is required"))?;
        if from >= to {
            return Err(Status::invalid_argument("`from` must be before `to`"));
        }
        let window = match pb::Window::try_from(r.window).unwrap_or(pb::Window::Unspecified) {
            pb::Window::Minute => Window::Minute,
            pb::Window::Hour => Window::Hour,
            pb::Window::Day => Window::Day,
            pb::Window::Month => Window::Month,
            pb::Window::Unspecified => {
                return Err(Status::invalid_argument(
                    "`window` must be MINUTE, HOUR, DAY or MONTH",
                ))
            }
        };
        let minutes = (to - from).num_minutes();
        let windows = match window {
            Window::Minute => minutes,
            Window::Hour => minutes / 60,
            Window::Day => minutes / 1440,
            Window::Month => minutes / 43_200,
        };
        if windows > MAX_WINDOWS {
            return Err(Status::invalid_argument(format!(
                "{windows} windows requested; at most {MAX_WINDOWS}: use a larger window or a shorter range"
            )));
        }
        let tz: Tz = if r.time_zone.is_empty() {
            Tz::UTC
        } else {
            r.time_zone.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "unknown time zone {:?}; use an IANA name such as Europe/Paris",
                    r.time_zone
                ))
            })?
        };
        // Each grouping is a column of every row read (and, embedded, a value kept per event), each
        // filter a condition: a query naming a million of them would take the replica's memory.
        let distinct: std::collections::BTreeSet<&String> = r.group_by.iter().collect();
        if distinct.len() != r.group_by.len() || r.group_by.len() > metering::meter::MAX_GROUP_BY {
            return Err(Status::invalid_argument(format!(
                "group_by names at most {} distinct dimensions, each once",
                metering::meter::MAX_GROUP_BY
            )));
        }
        if let Some(g) = r
            .group_by
            .iter()
            .find(|g| !metering::meter::is_dimension(g))
        {
            return Err(Status::invalid_argument(format!(
                "group_by {g:?} is not a dimension name"
            )));
        }
        if let Some((k, _)) = filters
            .iter()
            .find(|(k, _)| !metering::meter::is_dimension(k))
        {
            return Err(Status::invalid_argument(format!(
                "filter key {k:?} is not a dimension name"
            )));
        }
        // Both adapters refuse what PostgreSQL could not look up (the embedded one could).
        for (k, v) in &filters {
            creto_domain::text::check(&format!("filters.{k}"), v)
                .map_err(Status::invalid_argument)?;
        }
        // Everything the request alone decides is checked before waiting on the projection.
        let applied_sequence = if r.min_sequence > 0 {
            let wait = Duration::from_millis(if r.wait_ms == 0 {
                5_000
            } else {
                u64::from(r.wait_ms).min(30_000)
            });
            let at = read_model::wait_for(&*self.read_model, r.min_sequence, wait)
                .await
                .map_err(db_status)?;
            if at < r.min_sequence {
                return Err(Status::deadline_exceeded(format!(
                    "the projection has applied sequence {at}, not yet {}; retry or raise wait_ms",
                    r.min_sequence
                )));
            }
            at
        } else {
            self.read_model.checkpoint().await.map_err(db_status)?
        };

        // The meter is looked up once the projection has reached `min_sequence`: one created
        // just before is read back.
        let meter = if !r.meter.is_empty() {
            self.read_model
                .meter(&tenant, &r.meter)
                .await
                .map_err(db_status)?
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "no meter {:?}; create it with CreateMeter or list them with ListMeters",
                        r.meter
                    ))
                })?
        } else {
            query::quantity_meter(&r.event_type)
        };
        if let Some(g) = r.group_by.iter().find(|g| {
            *g != "subscription_id" && !meter.group_by.contains(g) && !meter.slug.is_empty()
        }) {
            return Err(Status::invalid_argument(format!(
                "meter {} cannot be grouped by {g:?}; its dimensions are {:?} (and subscription_id)",
                meter.slug, meter.group_by
            )));
        }
        let q = UsageQuery {
            tenant,
            meter,
            from,
            to,
            window,
            tz,
            group_by: r.group_by.clone(),
            filters,
        };
        let rows = self.read_model.usage(&q).await;
        metrics::METERING_POSTGRES_QUERIES
            .with_label_values(&["query_usage", metrics::status(rows.is_ok())])
            .inc();
        let rows = rows.map_err(|e| match super::db_code(&e).as_deref() {
            // PostgreSQL refuses a float8 sum past f64::MAX (values of a meter's property are
            // the producers'); the embedded adapter's sum becomes infinite: the same answer.
            Some("22003") => out_of_range(&q),
            // The query's statement timeout, or one of PostgreSQL's limits (an array past
            // 1 GB): the same query fails the same way, however often it is retried.
            Some("57014") => Status::deadline_exceeded(format!(
                "the read model gave up on this query after {} s; narrow it (a shorter range, a subscription, fewer groups)",
                creto_projections::metering::query::USAGE_QUERY_TIMEOUT_SECONDS
            )),
            Some(c) if c.starts_with("54") => Status::resource_exhausted(format!(
                "the read model cannot answer a query this large: {e}; narrow it (a shorter range, fewer groups)"
            )),
            _ => db_status(e),
        })?;
        if rows.iter().any(|r| !r.value.is_finite()) {
            return Err(out_of_range(&q));
        }
        metrics::METERING_AGGREGATION_SECONDS
            .with_label_values(&[q.meter.aggregation.as_str()])
            .observe(started.elapsed().as_secs_f64());
        Ok(Response::new(pb::QueryUsageResponse {
            applied_sequence,
            rows: rows
                .into_iter()
                .map(|row| pb::UsageRow {
                    window_start: Some(timestamp(row.window_start)),
                    window_end: Some(timestamp(row.window_end)),
                    value: row.value,
                    subscription_id: row
                        .group
                        .iter()
                        .find(|(k, _)| k == "subscription_id")
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default(),
                    group: row.group.into_iter().collect(),
                })
                .collect(),
        }))
    }

    async fn create_meter(
        &self,
        request: Request<pb::CreateMeterRequest>,
    ) -> Result<Response<pb::CreateMeterResponse>, Status> {
        let tenant = tenant(&request)?;
        let proto = request
            .into_inner()
            .meter
            .ok_or_else(|| Status::invalid_argument("`meter` is required"))?;
        let meter = meter_from_proto(&proto).map_err(|e| Status::invalid_argument(e.0))?;
        let canonical = meter_to_proto(&meter);
        let mut append = envelope::seal(
            self.catalog
                .subject(&format!("metering.meters.{tenant}.{}", meter.slug)),
            EventMeta {
                id: format!("meter:{tenant}:{}", meter.slug),
                event_type: METER_DEFINED.into(),
                schema_version: 1,
                tenant,
                ..Default::default()
            },
            &pb::MeterDefined {
                meter: Some(canonical.clone()),
            },
        );
        // A slug is defined once: the subject must still be empty.
        append.expected_subject_sequence = Some(0);
        match telemetry::append(&*self.log, "metering.meters", append).await {
            Ok(a) if !a.is_duplicate() => Ok(Response::new(pb::CreateMeterResponse {
                meter: Some(canonical),
                sequence: a.sequence(),
            })),
            Ok(_) | Err(LogError::Conflict { .. }) => Err(Status::already_exists(format!(
                "meter {:?} already exists; meters are immutable, create one with a new slug",
                meter.slug
            ))),
            Err(e) => Err(log_status(e)),
        }
    }

    async fn list_meters(
        &self,
        request: Request<pb::ListMetersRequest>,
    ) -> Result<Response<pb::ListMetersResponse>, Status> {
        let tenant = tenant(&request)?;
        let meters = self.read_model.meters(&tenant).await.map_err(db_status)?;
        Ok(Response::new(pb::ListMetersResponse {
            meters: meters.iter().map(meter_to_proto).collect(),
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let who = crate::auth::layer::caller(&request)?.clone();
        // The platform's operators see every tenant's dead letters; anyone else, a tenant's
        // `operator` too (the runbook's on-call tokens), only their own.
        let every_tenant = who.has_role(PLATFORM_OPERATOR);
        let r = request.into_inner();
        let limit = if r.limit == 0 {
            100
        } else {
            r.limit.min(1_000)
        } as usize;
        let only = (!every_tenant).then_some(who.tenant.as_str());
        let (letters, reached) =
            dead_letters_page(&*self.log, &self.catalog, r.after_sequence, limit, only)
                .await
                .map_err(log_status)?;
        Ok(Response::new(pb::ListDeadLettersResponse {
            next_after_sequence: reached,
            dead_letters: letters
                .into_iter()
                .map(|l| pb::DeadLetter {
                    sequence: l.sequence,
                    reason: l.reason,
                    detail: l.detail,
                    original_subject: l.original_subject,
                    original_sequence: l.original_sequence,
                    payload: l.event.payload.to_vec(),
                })
                .collect(),
        }))
    }

    async fn void_event(
        &self,
        request: Request<pb::VoidEventRequest>,
    ) -> Result<Response<pb::VoidEventResponse>, Status> {
        crate::metering::billing::void_event(self, request).await
    }

    async fn amend_event(
        &self,
        request: Request<pb::AmendEventRequest>,
    ) -> Result<Response<pb::AmendEventResponse>, Status> {
        crate::metering::billing::amend_event(self, request).await
    }

    async fn put_plan(
        &self,
        request: Request<pb::PutPlanRequest>,
    ) -> Result<Response<pb::PutPlanResponse>, Status> {
        crate::metering::billing::put_plan(self, request).await
    }

    async fn attach_plan(
        &self,
        request: Request<pb::AttachPlanRequest>,
    ) -> Result<Response<pb::AttachPlanResponse>, Status> {
        crate::metering::billing::attach_plan(self, request).await
    }

    async fn generate_invoice(
        &self,
        request: Request<pb::GenerateInvoiceRequest>,
    ) -> Result<Response<pb::GenerateInvoiceResponse>, Status> {
        crate::metering::billing::generate_invoice(self, request).await
    }

    async fn get_invoice(
        &self,
        request: Request<pb::GetInvoiceRequest>,
    ) -> Result<Response<pb::GetInvoiceResponse>, Status> {
        crate::metering::billing::get_invoice(self, request).await
    }

    async fn list_invoices(
        &self,
        request: Request<pb::ListInvoicesRequest>,
    ) -> Result<Response<pb::ListInvoicesResponse>, Status> {
        crate::metering::billing::list_invoices(self, request).await
    }

    async fn set_quota(
        &self,
        request: Request<pb::SetQuotaRequest>,
    ) -> Result<Response<pb::SetQuotaResponse>, Status> {
        crate::metering::quota::service::set_quota(&self.quotas, request).await
    }

    async fn remove_quota(
        &self,
        request: Request<pb::RemoveQuotaRequest>,
    ) -> Result<Response<pb::RemoveQuotaResponse>, Status> {
        crate::metering::quota::service::remove_quota(&self.quotas, request).await
    }

    async fn add_grant(
        &self,
        request: Request<pb::AddGrantRequest>,
    ) -> Result<Response<pb::AddGrantResponse>, Status> {
        crate::metering::quota::service::add_grant(&self.quotas, request).await
    }

    async fn void_grant(
        &self,
        request: Request<pb::VoidGrantRequest>,
    ) -> Result<Response<pb::VoidGrantResponse>, Status> {
        crate::metering::quota::service::void_grant(&self.quotas, request).await
    }

    async fn set_entitlement(
        &self,
        request: Request<pb::SetEntitlementRequest>,
    ) -> Result<Response<pb::SetEntitlementResponse>, Status> {
        crate::metering::quota::service::set_entitlement(&self.quotas, request).await
    }

    async fn get_quota(
        &self,
        request: Request<pb::GetQuotaRequest>,
    ) -> Result<Response<pb::GetQuotaResponse>, Status> {
        crate::metering::quota::service::get_quota(&self.quotas, request).await
    }

    async fn check_quota(
        &self,
        request: Request<pb::CheckQuotaRequest>,
    ) -> Result<Response<pb::CheckQuotaResponse>, Status> {
        crate::metering::quota::service::check_quota(&self.quotas, request).await
    }
}

/// The tenant a dead letter belongs to: the tenant header the gateway wrote, else the
/// CloudEvent's `tenant` attribute, else the default tenant (an unreadable event).
fn letter_tenant(l: &DeadLetter) -> String {
    if let Some(t) = l.event.headers.get(names::TENANT) {
        return t.to_string();
    }
    serde_json::from_slice::<serde_json::Value>(&l.event.payload)
        .ok()
        .and_then(|v| v.get("tenant")?.as_str().map(str::to_string))
        .unwrap_or_else(|| DEFAULT_TENANT.to_string())
}

/// Dead letters of every tenant one ListDeadLetters call reads at most: a tenant with none
/// among millions of others' would otherwise have each call read them all.
pub const DEAD_LETTERS_READ_PER_CALL: usize = 10_000;

/// Metering's dead letters after `after`, oldest first (only `tenant`'s when given), read
/// within [`DEAD_LETTERS_READ_PER_CALL`], and where the next page starts.
pub async fn dead_letters_page(
    log: &dyn EventLog,
    catalog: &Catalog,
    after: u64,
    limit: usize,
    tenant: Option<&str>,
) -> Result<(Vec<DeadLetter>, u64), LogError> {
    let subject = catalog.deadletter_subject(creto_streams::METERING);
    creto_streams::deadletter::page(
        log,
        catalog,
        Some(&subject),
        after,
        limit,
        DEAD_LETTERS_READ_PER_CALL,
        |l| tenant.is_none_or(|t| letter_tenant(l) == t),
    )
    .await
}
