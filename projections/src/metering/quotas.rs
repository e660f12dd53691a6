//! Quotas (entitlements) on the METERING stream: the subjects, how a [`QuotaEvent`] and a
//! [`QuotaThresholdReached`] travel in the log, and the PostgreSQL read model `quotas`
//! (with `quota_thresholds_reached`) kept by [`QuotasProjector`].
//!
//! Subjects (each fact in an envelope whose payload is the fact's JSON):
//! - `metering.quotas.<tenant>.<subscription>`: every [`QuotaEvent`] of the subscription
//!   (`creto.metering.v1.QuotaEvent`), appended by `MeteringService/SetQuota` and friends with
//!   the subject's expected last sequence, so two replicas cannot admit conflicting commands.
//! - `metering.thresholds.<tenant>.<subscription>.<hash>`: one `QuotaThresholdReached` per
//!   (tenant, subscription, event type, period start, percentage); `<hash>` is the first 16 hex
//!   digits of SHA-256 of [`threshold_dedupe_id`]. It is appended with expected subject
//!   sequence 0: whoever appends first raises it, everyone else (another replica, a replay, a
//!   restart) gets a conflict and knows it was raised already.
//!
//! The metering projector ignores both subjects (the gateway's in-memory book and this
//! projector read them).
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use creto_domain::metering::quota::{QuotaEvent, QuotaThresholdReached};
use creto_streams::envelope::{self, EventMeta};
use std::sync::Arc;

use creto_streams::{AppendEvent, Catalog, EventLog, StoredEvent, METERING};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Transaction};

use super::billing::seal_json;
use crate::runner::{ApplyReport, ProjectionError, Projector};
use crate::whole;

pub const QUOTA_EVENT: &str = "creto.metering.v1.QuotaEvent";
pub const THRESHOLD_REACHED: &str = "creto.metering.v1.QuotaThresholdReached";
pub const QUOTAS_PREFIX: &str = "metering.quotas.";
pub const THRESHOLDS_PREFIX: &str = "metering.thresholds.";

pub fn quotas_subject(tenant: &str, subscription_id: &str) -> String {
    format!("{QUOTAS_PREFIX}{tenant}.{subscription_id}")
}

/// The threshold crossing as appended: the domain's event plus its tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThresholdFact {
    pub tenant: String,
    #[serde(flatten)]
    pub reached: QuotaThresholdReached,
}

/// The message id of a crossing, tenant first: `<tenant>:quota-threshold:<sub>:<meter>:<t>:<pct>`.
pub fn threshold_dedupe_id(tenant: &str, reached: &QuotaThresholdReached) -> String {
    format!("{tenant}:{}", reached.dedupe_id())
}

pub fn thresholds_subject(tenant: &str, reached: &QuotaThresholdReached) -> String {
    let hash = Sha256::digest(threshold_dedupe_id(tenant, reached).as_bytes());
    format!(
        "{THRESHOLDS_PREFIX}{tenant}.{}.{}",
        reached.subscription_id,
        hex::encode(&hash[..8])
    )
}

/// Whether a subject (without namespace) is one of this module's.
pub fn is_quota_subject(subject: &str) -> bool {
    subject.starts_with(QUOTAS_PREFIX) || subject.starts_with(THRESHOLDS_PREFIX)
}

/// A quota command's event, ready to append (the caller sets the expected sequence).
pub fn seal_quota_event(
    catalog: &Catalog,
    tenant: &str,
    event: &QuotaEvent,
    id: String,
) -> AppendEvent {
    let (subscription_id, _) = event.key();
    seal_json(
        catalog.subject(&quotas_subject(tenant, subscription_id)),
        EventMeta {
            id,
            event_type: QUOTA_EVENT.into(),
            schema_version: 1,
            tenant: tenant.to_string(),
            ..Default::default()
        },
        serde_json::to_vec(event).expect("quota events serialize"),
    )
}

/// A crossing, ready to append once: expected subject sequence 0.
pub fn seal_threshold(catalog: &Catalog, fact: &ThresholdFact) -> AppendEvent {
    let mut append = seal_json(
        catalog.subject(&thresholds_subject(&fact.tenant, &fact.reached)),
        EventMeta {
            id: threshold_dedupe_id(&fact.tenant, &fact.reached),
            event_type: THRESHOLD_REACHED.into(),
            schema_version: 1,
            tenant: fact.tenant.clone(),
            ..Default::default()
        },
        serde_json::to_vec(fact).expect("thresholds serialize"),
    );
    append.expected_subject_sequence = Some(0);
    append
}

/// A quota fact read from the log.
#[derive(Debug, Clone, PartialEq)]
pub enum QuotaFact {
    Quota { tenant: String, event: QuotaEvent },
    Threshold(ThresholdFact),
}

/// Decodes a message on this module's subjects; `None` for other subjects, `Some(Err)` for
/// one that cannot be read (with why).
pub fn decode_quota(catalog: &Catalog, event: &StoredEvent) -> Option<Result<QuotaFact, String>> {
    let subject = catalog.strip(&event.subject);
    if !is_quota_subject(subject) {
        return None;
    }
    let env = match envelope::open(&event.payload) {
        Ok(env) => env,
        Err(e) => return Some(Err(format!("not an envelope: {e}"))),
    };
    Some(match env.r#type.as_str() {
        QUOTA_EVENT if subject.starts_with(QUOTAS_PREFIX) => {
            serde_json::from_slice::<QuotaEvent>(&env.payload)
                .map(|event| QuotaFact::Quota {
                    tenant: env.tenant.clone(),
                    event,
                })
                .map_err(|e| format!("{QUOTA_EVENT}: {e}"))
        }
        THRESHOLD_REACHED => serde_json::from_slice::<ThresholdFact>(&env.payload)
            .map(QuotaFact::Threshold)
            .map_err(|e| format!("{THRESHOLD_REACHED}: {e}")),
        other => Err(format!("unexpected event type {other} on {subject}")),
    })
}

pub const PRODUCT: &str = "metering-quotas";

/// Projects quota facts into `quotas` (one row per tenant, subscription and event type or
/// feature: the definition and its grants) and `quota_thresholds_reached`. Usage is not in
/// it: current-period usage lives in the gateways' books and the cache counters. Rebuilt by
/// [`rebuild`].
pub struct QuotasProjector {
    pool: PgPool,
    catalog: Catalog,
    stream: String,
    /// The live projector's log, where it parks the events the database refuses.
    log: Option<Arc<dyn EventLog>>,
}

impl QuotasProjector {
    pub fn new(pool: PgPool, catalog: Catalog) -> Self {
        QuotasProjector {
            stream: catalog.stream(METERING),
            pool,
            catalog,
            log: None,
        }
    }

    /// The live projector: events the database refuses are parked in `log`'s dead letters.
    pub fn parking_in(mut self, log: Arc<dyn EventLog>) -> Self {
        self.log = Some(log);
        self
    }
}

fn grant_json(g: &creto_domain::metering::quota::GrantAdded) -> Value {
    json!({
        "grant_id": g.grant_id,
        "amount": g.amount.to_string(),
        "priority": g.priority,
        "effective_from": g.effective_from,
        "expires_at": g.expires_at,
        "voided_at": Value::Null,
    })
}

async fn apply_quota(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    event: &QuotaEvent,
    at: DateTime<Utc>,
    sequence: u64,
) -> Result<(), sqlx::Error> {
    let (subscription_id, key) = event.key();
    let row: Option<(String, Value)> = sqlx::query_as(
        "SELECT kind, grants FROM quotas
          WHERE tenant = $1 AND subscription_id = $2 AND event_type = $3 FOR UPDATE",
    )
    .bind(tenant)
    .bind(subscription_id)
    .bind(key)
    .fetch_optional(&mut **tx)
    .await?;
    let upsert = "INSERT INTO quotas (tenant, subscription_id, event_type, kind, quota_limit,
            period_kind, period_anchor, time_zone, hard, thresholds_pct, enabled, config, grants,
            updated_at, stream_sequence)
        VALUES ($1, $2, $3, $4, $5::numeric, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
        ON CONFLICT (tenant, subscription_id, event_type) DO UPDATE SET
            kind = EXCLUDED.kind, quota_limit = EXCLUDED.quota_limit,
            period_kind = EXCLUDED.period_kind, period_anchor = EXCLUDED.period_anchor,
            time_zone = EXCLUDED.time_zone, hard = EXCLUDED.hard,
            thresholds_pct = EXCLUDED.thresholds_pct, enabled = EXCLUDED.enabled,
            config = EXCLUDED.config, grants = EXCLUDED.grants,
            updated_at = EXCLUDED.updated_at, stream_sequence = EXCLUDED.stream_sequence";
    let base = |kind: &'static str| {
        sqlx::query(upsert)
            .bind(tenant)
            .bind(subscription_id)
            .bind(key)
            .bind(kind)
    };
    match event {
        QuotaEvent::QuotaSet(e) => {
            // Changing a metered quota keeps its grants; replacing another kind starts empty.
            let grants = match &row {
                Some((kind, grants)) if kind == "metered" => grants.clone(),
                _ => json!([]),
            };
            let pcts: Vec<i16> = e.thresholds_pct.iter().map(|p| i16::from(*p)).collect();
            base("metered")
                .bind(Some(e.limit.to_string()))
                .bind(Some(
                    serde_json::to_value(e.period.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                ))
                .bind(Some(e.period.anchor))
                .bind(Some(e.period.tz.name().to_string()))
                .bind(Some(e.hard))
                .bind(Some(pcts))
                .bind(None::<bool>)
                .bind(None::<Value>)
                .bind(grants)
                .bind(at)
                .bind(sequence as i64)
                .execute(&mut **tx)
                .await?;
        }
        QuotaEvent::FeatureSet(e) => {
            base("boolean")
                .bind(None::<String>)
                .bind(None::<String>)
                .bind(None::<DateTime<Utc>>)
                .bind(None::<String>)
                .bind(None::<bool>)
                .bind(None::<Vec<i16>>)
                .bind(Some(e.enabled))
                .bind(None::<Value>)
                .bind(json!([]))
                .bind(at)
                .bind(sequence as i64)
                .execute(&mut **tx)
                .await?;
        }
        QuotaEvent::ConfigSet(e) => {
            base("static")
                .bind(None::<String>)
                .bind(None::<String>)
                .bind(None::<DateTime<Utc>>)
                .bind(None::<String>)
                .bind(None::<bool>)
                .bind(None::<Vec<i16>>)
                .bind(None::<bool>)
                .bind(Some(e.value.clone()))
                .bind(json!([]))
                .bind(at)
                .bind(sequence as i64)
                .execute(&mut **tx)
                .await?;
        }
        QuotaEvent::QuotaRemoved(_) => {
            sqlx::query(
                "DELETE FROM quotas WHERE tenant = $1 AND subscription_id = $2 AND event_type = $3",
            )
            .bind(tenant)
            .bind(subscription_id)
            .bind(key)
            .execute(&mut **tx)
            .await?;
        }
        QuotaEvent::GrantAdded(e) => {
            let Some((kind, Value::Array(mut grants))) = row else {
                return Ok(());
            };
            if kind != "metered" || grants.iter().any(|g| g["grant_id"] == e.grant_id.as_str()) {
                return Ok(());
            }
            grants.push(grant_json(e));
            update_grants(tx, tenant, subscription_id, key, grants, at, sequence).await?;
        }
        QuotaEvent::GrantVoided(e) => {
            let Some((_, Value::Array(mut grants))) = row else {
                return Ok(());
            };
            let mut changed = false;
            for g in grants.iter_mut() {
                if g["grant_id"] == e.grant_id.as_str() && g["voided_at"].is_null() {
                    g["voided_at"] = json!(at);
                    changed = true;
                }
            }
            if changed {
                update_grants(tx, tenant, subscription_id, key, grants, at, sequence).await?;
            }
        }
    }
    Ok(())
}

async fn update_grants(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    subscription_id: &str,
    key: &str,
    grants: Vec<Value>,
    at: DateTime<Utc>,
    sequence: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE quotas SET grants = $4, updated_at = $5, stream_sequence = $6
          WHERE tenant = $1 AND subscription_id = $2 AND event_type = $3",
    )
    .bind(tenant)
    .bind(subscription_id)
    .bind(key)
    .bind(Value::Array(grants))
    .bind(at)
    .bind(sequence as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Projector for QuotasProjector {
    fn product(&self) -> &'static str {
        PRODUCT
    }

    fn stream(&self) -> &str {
        &self.stream
    }

    async fn checkpoint(&self) -> Result<u64, ProjectionError> {
        whole::checkpoint::<Self>(&self.pool).await
    }

    async fn apply(&self, events: &[StoredEvent]) -> Result<ApplyReport, ProjectionError> {
        whole::apply(&self.pool, self, events, true).await
    }

    async fn set_aside(&self, event: &StoredEvent, detail: &str) -> Result<bool, ProjectionError> {
        whole::set_aside(&self.pool, self, event, detail).await
    }
}

#[async_trait]
impl whole::InTransaction for QuotasProjector {
    const PRODUCT: &'static str = PRODUCT;
    const LOCK: &'static str =
        "SELECT pg_advisory_xact_lock(hashtext('creto.projection.metering-quotas'))";

    fn stream_name(&self) -> &str {
        &self.stream
    }

    fn parking(&self) -> Option<(&dyn EventLog, String)> {
        self.log
            .as_ref()
            .map(|log| (&**log, self.catalog.deadletter_subject(METERING)))
    }

    /// Unreadable facts are logged and skipped (the metering projector, which reads the same
    /// stream, is the one that parks what it cannot read).
    async fn project(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[&StoredEvent],
        _park: bool,
    ) -> Result<(ApplyReport, Vec<&'static str>), ProjectionError> {
        let mut report = ApplyReport::default();
        for &event in events {
            match decode_quota(&self.catalog, event) {
                None => {}
                Some(Err(detail)) => {
                    tracing::warn!(sequence = event.sequence, %detail, "unreadable quota fact skipped");
                }
                Some(Ok(QuotaFact::Quota { tenant, event: q })) => {
                    apply_quota(tx, &tenant, &q, event.recorded_at, event.sequence).await?;
                    report.applied += 1;
                }
                Some(Ok(QuotaFact::Threshold(t))) => {
                    let r = &t.reached;
                    sqlx::query(
                        "INSERT INTO quota_thresholds_reached (tenant, subscription_id,
                            event_type, period_start, pct, used, allowance, recorded_at,
                            stream_sequence)
                         VALUES ($1, $2, $3, $4, $5, $6::numeric, $7::numeric, $8, $9)
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(&t.tenant)
                    .bind(&r.subscription_id)
                    .bind(&r.meter)
                    .bind(r.period_start)
                    .bind(i16::from(r.pct))
                    .bind(r.used.to_string())
                    .bind(r.allowance.to_string())
                    .bind(event.recorded_at)
                    .bind(event.sequence as i64)
                    .execute(&mut **tx)
                    .await?;
                    report.applied += 1;
                }
            }
        }
        Ok((report, Vec::new()))
    }
}

/// The quota tables, emptied by a rebuild.
pub const TABLES: &[&str] = &["quotas", "quota_thresholds_reached"];

/// Rebuilds `quotas` and `quota_thresholds_reached` from the whole METERING stream in one
/// transaction (`enablement replay metering --rebuild` does it after the usage tables).
pub async fn rebuild(
    pool: &PgPool,
    log: Arc<dyn EventLog>,
    catalog: Catalog,
) -> Result<u64, ProjectionError> {
    let projector = QuotasProjector::new(pool.clone(), catalog);
    let (checkpoint, _) = whole::rebuild(pool, log, TABLES, &projector).await?;
    Ok(checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use creto_domain::metering::quota::{Period, PeriodKind, Quantity, QuotaSet};

    fn stored(append: AppendEvent) -> StoredEvent {
        StoredEvent {
            stream: "T1_METERING".into(),
            sequence: 7,
            subject: append.subject,
            headers: append.headers,
            payload: append.payload,
            recorded_at: Utc::now(),
        }
    }

    #[test]
    fn quota_events_and_crossings_round_trip_through_the_log() {
        let catalog = Catalog::namespaced("t1");
        let event = QuotaEvent::QuotaSet(QuotaSet {
            subscription_id: "sub_1".into(),
            meter: "api.call".into(),
            limit: Quantity::units(10),
            period: Period::new(PeriodKind::Hour, DateTime::UNIX_EPOCH, chrono_tz::Tz::UTC),
            hard: true,
            thresholds_pct: vec![80, 100],
        });
        let append = seal_quota_event(&catalog, "acme", &event, "id-1".into());
        assert_eq!(append.subject, "t1.metering.quotas.acme.sub_1");
        match decode_quota(&catalog, &stored(append)) {
            Some(Ok(QuotaFact::Quota { tenant, event: e })) => {
                assert_eq!((tenant.as_str(), e), ("acme", event));
            }
            other => panic!("{other:?}"),
        }

        let fact = ThresholdFact {
            tenant: "acme".into(),
            reached: QuotaThresholdReached {
                subscription_id: "sub_1".into(),
                meter: "api.call".into(),
                period_start: DateTime::UNIX_EPOCH,
                pct: 80,
                used: Quantity::units(8),
                allowance: Quantity::units(10),
            },
        };
        let append = seal_threshold(&catalog, &fact);
        assert_eq!(append.expected_subject_sequence, Some(0));
        assert_eq!(append.id, "acme:quota-threshold:sub_1:api.call:0:80");
        // One subject per crossing, the same on every replica; another tenant gets another.
        assert_eq!(append.subject, seal_threshold(&catalog, &fact).subject);
        let other = ThresholdFact {
            tenant: "beta".into(),
            ..fact.clone()
        };
        assert_ne!(append.subject, seal_threshold(&catalog, &other).subject);
        assert!(append
            .subject
            .starts_with("t1.metering.thresholds.acme.sub_1."));
        match decode_quota(&catalog, &stored(append)) {
            Some(Ok(QuotaFact::Threshold(t))) => assert_eq!(t, fact),
            other => panic!("{other:?}"),
        }
        assert!(is_quota_subject("metering.thresholds.a.b.c"));
        assert!(!is_quota_subject("metering.events.sub_1"));
    }
}
