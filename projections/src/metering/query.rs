//! Usage queries over the read model: windows in a time zone, group-by dimensions, filters.
//! The reference in `creto_domain::metering::reference` defines the expected answers.
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use creto_domain::metering::{Aggregation, Meter, Window};
use sqlx::{PgPool, Postgres, QueryBuilder, Row as _};

use super::read_model::{Key, MonthTotal};

#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub tenant: String,
    pub meter: Meter,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub window: Window,
    pub tz: Tz,
    pub group_by: Vec<String>,
    pub filters: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub group: Vec<(String, String)>,
    pub value: f64,
}

/// The implicit meter of "subscription_id + event_type": the sum of `quantity`.
pub fn quantity_meter(event_type: &str) -> Meter {
    Meter {
        slug: String::new(),
        event_type: event_type.to_string(),
        aggregation: Aggregation::Sum,
        value_path: vec!["quantity".into()],
        group_by: vec![],
        description: String::new(),
    }
}

fn dimension(q: &mut QueryBuilder<'_, Postgres>, key: &str) {
    if key == "subscription_id" {
        q.push("subscription_id");
    } else {
        q.push("COALESCE(data ->> ")
            .push_bind(key.to_string())
            .push(", '')");
    }
}

fn value(q: &mut QueryBuilder<'_, Postgres>, meter: &Meter) {
    value_as(q, meter, "float8");
}

/// The meter's value of an event as `sql_type` (`numeric` where sums must be exact).
fn value_as(q: &mut QueryBuilder<'_, Postgres>, meter: &Meter, sql_type: &str) {
    if meter.value_path == ["quantity"] {
        q.push("quantity::").push(sql_type);
    } else {
        q.push("(CASE WHEN jsonb_typeof(data #> ")
            .push_bind(meter.value_path.clone())
            .push(") = 'number' THEN (data #>> ")
            .push_bind(meter.value_path.clone())
            .push(")::")
            .push(sql_type)
            .push(" END)");
    }
}

/// The zone as PostgreSQL must be given it. PostgreSQL reads a name that is also a time zone
/// abbreviation (of its `timezone_abbreviations` set: CET, EET, MET, WET, and under other sets
/// EST and more) as that abbreviation's fixed offset, while the tz database, and so chrono-tz
/// (the embedded adapter and every window's end), has these names as links to zones with
/// summer time: CET days began at 23:00 UTC all summer. The link's target is the same zone
/// under a name no abbreviation takes.
pub fn postgres_zone(tz: Tz) -> &'static str {
    match tz.name() {
        "CET" | "MET" => "Europe/Brussels",
        "EET" => "Europe/Athens",
        "WET" => "Europe/Lisbon",
        "EST" => "America/Panama",
        "MST" => "America/Phoenix",
        "HST" => "Pacific/Honolulu",
        "UTC" | "UCT" => "Etc/UTC",
        "GMT" => "Etc/GMT",
        name => name,
    }
}

/// How long PostgreSQL may work on one usage query (SQLSTATE 57014 past it).
pub const USAGE_QUERY_TIMEOUT_SECONDS: u64 = 30;

pub async fn usage(pool: &PgPool, query: &UsageQuery) -> Result<Vec<UsageRow>, sqlx::Error> {
    let meter = &query.meter;
    let mut q = QueryBuilder::<Postgres>::new("SELECT date_trunc(");
    q.push_bind(query.window.as_sql())
        .push(", occurred_at, ")
        .push_bind(postgres_zone(query.tz))
        .push(") AS ws");
    for g in &query.group_by {
        q.push(", ");
        dimension(&mut q, g);
    }
    q.push(", ");
    match meter.aggregation {
        Aggregation::Count => {
            q.push("count(*)::float8");
        }
        Aggregation::UniqueCount => {
            if meter.value_path == ["quantity"] {
                q.push("count(DISTINCT quantity)::float8");
            } else {
                q.push("(count(DISTINCT data #>> ")
                    .push_bind(meter.value_path.clone())
                    .push(") FILTER (WHERE jsonb_typeof(data #> ")
                    .push_bind(meter.value_path.clone())
                    .push(") IN ('number', 'string')))::float8");
            }
        }
        Aggregation::Latest => {
            // The greatest (time, sequence, value) triple: one row kept per group, where an
            // array_agg kept every value of the window (past 1 GB it fails). Float8 keeps
            // `value` exact and orders times to the microsecond and sequences below 2^53.
            q.push("(max(ARRAY[extract(epoch FROM occurred_at)::float8, stream_sequence::float8, ");
            value(&mut q, meter);
            q.push("]) FILTER (WHERE ");
            value(&mut q, meter);
            q.push(" IS NOT NULL))[3]");
        }
        Aggregation::Sum => {
            // Summed as decimals, rounded once: what invoices price (see `exact_sum`). A
            // property adds only within a quantity's range (see `summable`); `quantity` itself
            // was checked at ingestion.
            q.push("(sum(");
            value_as(&mut q, meter, "numeric");
            q.push(")");
            if meter.value_path != ["quantity"] {
                q.push(" FILTER (WHERE ");
                value_as(&mut q, meter, "numeric");
                q.push(" BETWEEN 0 AND ")
                    .push(creto_domain::metering::event::MAX_QUANTITY);
                q.push(")");
            }
            q.push(")::float8");
        }
        agg => {
            q.push(match agg {
                Aggregation::Avg => "avg(",
                Aggregation::Min => "min(",
                _ => "max(",
            });
            value(&mut q, meter);
            q.push(")::float8");
        }
    }
    // The events as corrected (voids and amends), under the table's name.
    q.push(" AS v FROM ")
        .push(super::billing::pg::effective_events(None))
        .push(" AS metering_events WHERE tenant = ")
        .push_bind(query.tenant.clone())
        .push(" AND event_type = ")
        .push_bind(meter.event_type.clone())
        .push(" AND occurred_at >= ")
        .push_bind(query.from)
        .push(" AND occurred_at < ")
        .push_bind(query.to);
    for (k, v) in &query.filters {
        q.push(" AND ");
        dimension(&mut q, k);
        q.push(" = ").push_bind(v.clone());
    }
    // Group and order by the window and every group-by column, by position.
    let columns = (1..=query.group_by.len() + 1)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    q.push(" GROUP BY ")
        .push(&columns)
        .push(" ORDER BY ")
        .push(&columns);
    // A usage query reads the raw events of its range: bounded in time, so that one over
    // months of a busy tenant is cancelled (the caller is told to narrow it) instead of
    // holding a connection the ingestion path needs for as long as it runs.
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "SET LOCAL statement_timeout = '{USAGE_QUERY_TIMEOUT_SECONDS}s'"
    ))
    .execute(&mut *tx)
    .await?;
    let rows = q.build().fetch_all(&mut *tx).await?;
    tx.commit().await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let value: Option<f64> = row.try_get("v")?;
        let Some(value) = value else { continue };
        let window_start: DateTime<Utc> = row.try_get("ws")?;
        let mut group = Vec::with_capacity(query.group_by.len());
        for (i, g) in query.group_by.iter().enumerate() {
            group.push((g.clone(), row.try_get::<String, _>(i + 1)?));
        }
        out.push(UsageRow {
            window_start,
            window_end: query.window.end(window_start, query.tz),
            group,
            value,
        });
    }
    Ok(out)
}

/// Loads a meter of `tenant` by slug.
pub async fn meter(pool: &PgPool, tenant: &str, slug: &str) -> Result<Option<Meter>, sqlx::Error> {
    let row: Option<(String, String, String, Vec<String>, String)> = sqlx::query_as(
        "SELECT event_type, aggregation, value_property, group_by, description FROM meters WHERE slug = $1 AND tenant = $2",
    )
    .bind(slug)
    .bind(tenant)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(
        |(event_type, aggregation, value_property, group_by, description)| {
            Meter::new(
                slug,
                &event_type,
                Aggregation::parse(&aggregation)?,
                &value_property,
                group_by,
                &description,
            )
            .ok()
        },
    ))
}

pub async fn meters(pool: &PgPool, tenant: &str) -> Result<Vec<Meter>, sqlx::Error> {
    let rows: Vec<(String, String, String, String, Vec<String>, String)> = sqlx::query_as(
        "SELECT slug, event_type, aggregation, value_property, group_by, description FROM meters WHERE tenant = $1 ORDER BY slug",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(
            |(slug, event_type, aggregation, value_property, group_by, description)| {
                Meter::new(
                    &slug,
                    &event_type,
                    Aggregation::parse(&aggregation)?,
                    &value_property,
                    group_by,
                    &description,
                )
                .ok()
            },
        )
        .collect())
}

/// Which (subscription, id) pairs of `tenant` were already applied: lets the gateway answer
/// "duplicate" for an id seen long after JetStream's duplicate window.
pub async fn existing_ids(
    pool: &PgPool,
    tenant: &str,
    keys: &[(String, String)],
) -> Result<Vec<(String, String)>, sqlx::Error> {
    let (subs, ids): (Vec<String>, Vec<String>) = keys.iter().cloned().unzip();
    sqlx::query_as(
        "SELECT e.subscription_id, e.event_id FROM metering_events e
         JOIN UNNEST($2::text[], $3::text[]) AS k(subscription_id, event_id)
           ON e.subscription_id = k.subscription_id AND e.event_id = k.event_id
         WHERE e.tenant = $1",
    )
    .bind(tenant)
    .bind(&subs)
    .bind(&ids)
    .fetch_all(pool)
    .await
}

/// One lookup per key in `usage_monthly` (migration 0010 says why it is not summed from
/// `usage_hourly`). `>=`: an event up to five minutes ahead, at the turn of a month, counts in
/// the month being closed, as it always has. Every key asked for is answered, zero when its
/// month holds nothing: a key whose events were all voided must read zero, not keep its total.
const MONTH_TOTALS: &str = "SELECT k.tenant, k.subscription_id, k.event_type, t.n, t.q
     FROM (SELECT DISTINCT * FROM UNNEST($1::text[], $2::text[], $3::text[])) AS k(tenant, subscription_id, event_type)
     CROSS JOIN LATERAL (
        SELECT coalesce(sum(m.event_count), 0)::int8 AS n, coalesce(sum(m.quantity_sum), 0)::text AS q
        FROM usage_monthly m
        WHERE (m.tenant, m.subscription_id, m.event_type) = (k.tenant, k.subscription_id, k.event_type)
          AND m.month >= date_trunc('month', now(), 'UTC')
     ) AS t";

const ALL_MONTH_TOTALS: &str =
    "SELECT tenant, subscription_id, event_type, sum(event_count)::int8, sum(quantity_sum)::text
     FROM usage_monthly WHERE month >= date_trunc('month', now(), 'UTC') GROUP BY 1, 2, 3";

/// Month-to-date totals from `usage_monthly`, of `keys` or of every key.
pub async fn month_totals(
    pool: &PgPool,
    keys: Option<&[Key]>,
) -> Result<Vec<MonthTotal>, sqlx::Error> {
    let rows: Vec<(String, String, String, i64, String)> = match keys {
        None => sqlx::query_as(ALL_MONTH_TOTALS).fetch_all(pool).await?,
        Some(keys) => {
            let mut t = Vec::with_capacity(keys.len());
            let mut s = Vec::with_capacity(keys.len());
            let mut e = Vec::with_capacity(keys.len());
            for k in keys {
                t.push(k.0.as_str());
                s.push(k.1.as_str());
                e.push(k.2.as_str());
            }
            sqlx::query_as(MONTH_TOTALS)
                .bind(&t)
                .bind(&s)
                .bind(&e)
                .fetch_all(pool)
                .await?
        }
    };
    Ok(rows
        .into_iter()
        .map(
            |(tenant, subscription, event_type, count, quantity)| MonthTotal {
                key: (tenant, subscription, event_type),
                count,
                quantity,
            },
        )
        .collect())
}
