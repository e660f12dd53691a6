//! QueryUsage equals a straightforward recomputation from the raw events, on random event sets
//! with duplicates and out-of-order arrival, for every aggregation, window and a few zones.
use chrono::{DateTime, Duration as Ch, TimeZone, Utc};
use creto_domain::metering::{reference, Aggregation, Meter, UsageRecord, Window};
use creto_replay_tests::Env;
use creto_schemas::metering::v1 as pb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[derive(Debug, Clone)]
struct Ev {
    id: u8,
    minutes_ago: u32,
    quantity_quarters: u32,
    model: Option<u8>,
    region: u8,
    tokens: Option<i32>,
    event_type: u8,
}

fn ev() -> impl Strategy<Value = Ev> {
    (
        0u8..30,
        0u32..4 * 24 * 60,
        0u32..4000,
        proptest::option::of(0u8..3),
        0u8..2,
        proptest::option::weighted(0.8, -50i32..500),
        0u8..4,
    )
        .prop_map(
            |(id, minutes_ago, quantity_quarters, model, region, tokens, t)| Ev {
                id,
                minutes_ago,
                quantity_quarters,
                model,
                region,
                tokens,
                event_type: if t == 0 { 1 } else { 0 },
            },
        )
}

#[derive(Debug, Clone)]
struct Case {
    events: Vec<Ev>,
    batch_sizes: Vec<usize>,
    aggregation: usize,
    window: usize,
    zone: usize,
    group_model: bool,
    group_region: bool,
    filter_region: Option<u8>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec(ev(), 1..60),
        proptest::collection::vec(1usize..25, 1..8),
        0usize..8,
        0usize..3,
        0usize..4,
        any::<bool>(),
        any::<bool>(),
        proptest::option::weighted(0.3, 0u8..2),
    )
        .prop_map(
            |(
                events,
                batch_sizes,
                aggregation,
                window,
                zone,
                group_model,
                group_region,
                filter_region,
            )| Case {
                events,
                batch_sizes,
                aggregation,
                window,
                zone,
                group_model,
                group_region,
                filter_region,
            },
        )
}

const AGGREGATIONS: [(&str, Aggregation, &str); 8] = [
    ("m_sum", Aggregation::Sum, "$.tokens"),
    ("m_count", Aggregation::Count, ""),
    ("m_unique", Aggregation::UniqueCount, "$.tokens"),
    ("m_avg", Aggregation::Avg, "$.tokens"),
    ("m_min", Aggregation::Min, "$.tokens"),
    ("m_max", Aggregation::Max, "$.tokens"),
    ("m_latest", Aggregation::Latest, "$.tokens"),
    ("", Aggregation::Sum, "$.quantity"),
];
const ZONES: [&str; 4] = ["UTC", "Europe/Paris", "Asia/Kolkata", "America/New_York"];
const WINDOWS: [(pb::Window, Window); 3] = [
    (pb::Window::Hour, Window::Hour),
    (pb::Window::Day, Window::Day),
    (pb::Window::Month, Window::Month),
];

fn to_event(e: &Ev, sub: &str, now: DateTime<Utc>) -> (pb::UsageEvent, UsageRecord) {
    use prost_types::value::Kind;
    let time = now - Ch::minutes(e.minutes_ago as i64);
    let mut data = serde_json::Map::new();
    let mut fields = std::collections::BTreeMap::new();
    let q = e.quantity_quarters as f64 / 4.0;
    fields.insert(
        "quantity".to_string(),
        prost_types::Value {
            kind: Some(Kind::NumberValue(q)),
        },
    );
    if let Some(m) = e.model {
        let v = format!("model-{m}");
        data.insert("model".into(), serde_json::Value::String(v.clone()));
        fields.insert(
            "model".into(),
            prost_types::Value {
                kind: Some(Kind::StringValue(v)),
            },
        );
    }
    let region = ["eu", "us"][e.region as usize].to_string();
    data.insert("region".into(), serde_json::Value::String(region.clone()));
    fields.insert(
        "region".into(),
        prost_types::Value {
            kind: Some(Kind::StringValue(region)),
        },
    );
    if let Some(t) = e.tokens {
        data.insert("tokens".into(), serde_json::json!(t));
        fields.insert(
            "tokens".into(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(t as f64)),
            },
        );
    }
    let event_type = ["llm.call", "other.thing"][e.event_type as usize].to_string();
    let id = format!("id-{}", e.id);
    let proto = pb::UsageEvent {
        id: id.clone(),
        source: "prop".into(),
        r#type: event_type.clone(),
        subject: sub.to_string(),
        time: Some(creto_streams::envelope::timestamp(time)),
        data: Some(prost_types::Struct {
            fields: fields.into_iter().collect(),
        }),
    };
    let record = UsageRecord {
        id,
        source: "prop".into(),
        event_type,
        subscription_id: sub.to_string(),
        tenant: "default".into(),
        time,
        quantity: q,
        dimensions: data,
    };
    (proto, record)
}

/// A row of the gRPC answer: window start, sorted group, value.
type GotRow = (DateTime<Utc>, Vec<(String, String)>, f64);

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// The read-model port's conformance: the same properties on both adapters.
#[test]
fn query_usage_matches_a_recomputation_on_postgres() {
    check_query_usage(|rt| rt.block_on(Env::new()));
}

#[test]
fn query_usage_matches_a_recomputation_on_embedded() {
    check_query_usage(|rt| rt.block_on(Env::embedded()));
}

fn check_query_usage(make: impl FnOnce(&tokio::runtime::Runtime) -> Env) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let env = make(&rt);
    let (running, mut client) = rt.block_on(env.start_metering(true));
    // One meter per aggregation, grouped by both dimensions.
    let mut meters = Vec::new();
    for (slug, aggregation, path) in AGGREGATIONS {
        let meter = if slug.is_empty() {
            creto_projections::metering::query::quantity_meter("llm.call")
        } else {
            Meter::new(
                slug,
                "llm.call",
                aggregation,
                path,
                vec!["model".into(), "region".into()],
                "",
            )
            .unwrap()
        };
        if !slug.is_empty() {
            let seq = rt
                .block_on(client.create_meter(pb::CreateMeterRequest {
                    meter: Some(creto_projections::metering::decode::meter_to_proto(&meter)),
                }))
                .unwrap()
                .into_inner()
                .sequence;
            rt.block_on(env.wait_applied(seq));
        }
        meters.push(meter);
    }
    let now = Utc::now();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let n = std::sync::atomic::AtomicU32::new(0);
    runner
        .run(&case(), |c| {
            let n = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let mut client = client.clone();
            let sub = format!("sub_case{n}");
            let pairs: Vec<(pb::UsageEvent, UsageRecord)> =
                c.events.iter().map(|e| to_event(e, &sub, now)).collect();
            // Send in random batch sizes; log order is send order, so the first copy of an id wins.
            let mut last = 0;
            let mut rest: &[(pb::UsageEvent, UsageRecord)] = &pairs;
            let mut sizes = c.batch_sizes.iter().cycle();
            while !rest.is_empty() {
                let k = (*sizes.next().unwrap()).min(rest.len());
                let (batch, tail) = rest.split_at(k);
                rest = tail;
                let r = rt
                    .block_on(client.ingest_events(pb::IngestEventsRequest {
                        events: batch.iter().map(|p| p.0.clone()).collect(),
                    }))
                    .unwrap()
                    .into_inner();
                prop_assert_eq!(r.rejected, 0);
                last = last.max(r.sequence);
            }
            let records: Vec<UsageRecord> = pairs.into_iter().map(|p| p.1).collect();
            let (slug, _, _) = AGGREGATIONS[c.aggregation];
            let meter = &meters[c.aggregation];
            let (pb_window, window) = WINDOWS[c.window];
            let zone = ZONES[c.zone];
            let tz: chrono_tz::Tz = zone.parse().unwrap();
            let mut group_by = Vec::new();
            if c.group_model && !slug.is_empty() {
                group_by.push("model".to_string());
            }
            if c.group_region && !slug.is_empty() {
                group_by.push("region".to_string());
            }
            let mut filters = vec![("subscription_id".to_string(), sub.clone())];
            if let Some(r) = c.filter_region {
                filters.push(("region".into(), ["eu", "us"][r as usize].into()));
            }
            let from = Utc
                .with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
                .unwrap()
                .max(now - Ch::days(40));
            let to = now + Ch::hours(1);
            let request = pb::QueryUsageRequest {
                meter: slug.to_string(),
                subscription_id: sub.clone(),
                event_type: if slug.is_empty() {
                    "llm.call".into()
                } else {
                    String::new()
                },
                from: Some(creto_streams::envelope::timestamp(from)),
                to: Some(creto_streams::envelope::timestamp(to)),
                window: pb_window as i32,
                time_zone: zone.into(),
                group_by: group_by.clone(),
                filters: filters
                    .iter()
                    .filter(|(k, _)| k != "subscription_id")
                    .cloned()
                    .collect(),
                min_sequence: last,
                wait_ms: 10_000,
            };
            let got = rt
                .block_on(client.query_usage(request))
                .unwrap()
                .into_inner()
                .rows;
            let mut want =
                reference::usage(&records, meter, from, to, window, tz, &group_by, &filters);
            want.sort_by(|a, b| (a.window_start, &a.group).cmp(&(b.window_start, &b.group)));
            let mut got: Vec<GotRow> = got
                .into_iter()
                .map(|r| {
                    let start =
                        creto_streams::envelope::from_timestamp(&r.window_start.unwrap()).unwrap();
                    let mut g: Vec<(String, String)> = group_by
                        .iter()
                        .map(|k| (k.clone(), r.group.get(k).cloned().unwrap_or_default()))
                        .collect();
                    g.sort();
                    (start, g, r.value)
                })
                .collect();
            got.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            prop_assert_eq!(
                got.len(),
                want.len(),
                "rows differ: got {:?} want {:?}",
                got,
                want
            );
            for (g, w) in got.iter().zip(&want) {
                let mut wg = w.group.clone();
                wg.sort();
                prop_assert_eq!(g.0, w.window_start);
                prop_assert_eq!(&g.1, &wg);
                prop_assert!(
                    close(g.2, w.value),
                    "value {} != {} in {:?}",
                    g.2,
                    w.value,
                    g
                );
            }
            Ok(())
        })
        .unwrap();
    rt.block_on(running.stop());
    rt.block_on(env.drop());
}

/// Window starts equal PostgreSQL's `date_trunc(field, t, zone)` around clock changes, and each
/// window ends where the next begins: the embedded adapter computes windows in Rust, PostgreSQL
/// in SQL, and the two answered differently for hours the clocks repeat, days whose midnight
/// is skipped or repeated, and gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_equal_postgres_date_trunc_around_clock_changes() {
    let env = Env::new().await;
    // Spring and autumn changes of 2024 in zones with whole-hour, half-hour and 45-minute
    // offsets, changes at midnight (Santiago, Havana) and half-hour changes (Lord Howe).
    let zones = [
        "America/New_York",
        "America/Santiago",
        "America/Havana",
        "Australia/Lord_Howe",
        "Europe/London",
        "Asia/Kolkata",
        "Pacific/Chatham",
        // Names PostgreSQL also knows as abbreviations of fixed offsets.
        "CET",
        "EET",
        "MET",
        "WET",
        "EST",
        "HST",
    ];
    let mut instants: Vec<DateTime<Utc>> = Vec::new();
    for from in [
        "2024-03-08T00:00:00Z",
        "2024-03-29T00:00:00Z",
        "2024-04-05T00:00:00Z",
        "2024-09-05T00:00:00Z",
        "2024-09-27T00:00:00Z",
        "2024-10-04T00:00:00Z",
        "2024-10-25T00:00:00Z",
        "2024-11-01T00:00:00Z",
    ] {
        let from: DateTime<Utc> = from.parse().unwrap();
        instants.extend((0..4 * 24 * 6).map(|i| from + Ch::minutes(10 * i)));
    }
    for zone in zones {
        let tz: chrono_tz::Tz = zone.parse().unwrap();
        for window in [Window::Minute, Window::Hour, Window::Day, Window::Month] {
            let rows: Vec<(DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
                "SELECT t, date_trunc($1, t, $2) FROM unnest($3::timestamptz[]) AS t ORDER BY t",
            )
            .bind(window.as_sql())
            .bind(creto_projections::metering::query::postgres_zone(tz))
            .bind(&instants)
            .fetch_all(env.pool())
            .await
            .unwrap();
            // (instant, its window's start) of the row before.
            let mut previous: Option<(DateTime<Utc>, DateTime<Utc>)> = None;
            for (t, postgres) in rows {
                assert_eq!(window.start(t, tz), postgres, "{window:?} of {t} in {zone}");
                // Ten minutes apart, two instants in different day or month windows are in
                // adjacent ones. (Hours are an hour long; where the clocks move by half an
                // hour, PostgreSQL's hour windows overlap or leave a gap.)
                if let Some((before, start)) = previous {
                    if t - before == Ch::minutes(10)
                        && start != postgres
                        && matches!(window, Window::Day | Window::Month)
                    {
                        assert_eq!(
                            window.end(start, tz),
                            postgres,
                            "{window:?} after {start} in {zone}"
                        );
                    }
                }
                previous = Some((t, postgres));
            }
        }
    }
    env.drop().await;
}
