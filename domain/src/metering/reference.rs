//! A deliberately straightforward recomputation of usage from raw events. Property tests
//! compare the read models and queries against it; it favours obviousness over speed.
use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::Value;

use super::event::UsageRecord;
use super::meter::{Aggregation, Meter, MeterValue};
use super::window::Window;

/// Keeps the first occurrence of every (subscription, id), in log order.
pub fn dedupe(events: &[UsageRecord]) -> Vec<&UsageRecord> {
    let mut seen = HashSet::new();
    events
        .iter()
        .filter(|e| seen.insert((e.subscription_id.clone(), e.id.clone())))
        .collect()
}

/// Text of a dimension for grouping and filtering (absent or null: empty).
pub fn dimension_text(record: &UsageRecord, key: &str) -> String {
    if key == "subscription_id" {
        return record.subscription_id.clone();
    }
    match record.dimensions.get(key) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Whether a SUM meter adds this value: one a `quantity` could be, 0 to
/// [`MAX_QUANTITY`](super::event::MAX_QUANTITY). A meter reads any property of `data`, which
/// ingestion does not check: a negative value would lower a bill (a producer is often the
/// customer), a huge one make the period's invoice impossible to compute (out of range); neither
/// adds. Usage is lowered by corrections (`AmendEvent`, `VoidEvent`), which are audited.
pub fn summable(n: f64) -> bool {
    (0.0..=super::event::MAX_QUANTITY).contains(&n)
}

/// The sum of the values as decimals (each the shortest decimal that is its f64, as PostgreSQL
/// keeps it), rounded once to f64 at the end. Summed as f64, ten thousand 0.1 make
/// 1000.0000000001588, which a graduated or package price bills as past 1000; and the result
/// would depend on the order of the additions. Past what a decimal holds (≈ 7.9e28), the f64
/// sum: it is within its precision there anyway.
pub fn exact_sum(numbers: &[f64]) -> f64 {
    use std::str::FromStr;
    let exact = numbers
        .iter()
        .try_fold(rust_decimal::Decimal::ZERO, |sum, n| {
            let d = rust_decimal::Decimal::from_str(&n.to_string()).ok()?;
            sum.checked_add(d)
        });
    match exact {
        // Parsing the decimal's text rounds correctly; Decimal's own to_f64 need not.
        Some(d) => d.to_string().parse().unwrap_or(f64::NAN),
        None => numbers.iter().sum(),
    }
}

/// One event in a bucket: its time, its position in log order, and the meter's value.
type Item<'a> = (DateTime<Utc>, usize, Option<MeterValue<'a>>);

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub window_start: DateTime<Utc>,
    pub group: Vec<(String, String)>,
    pub value: f64,
}

/// Usage of `meter` over `[from, to)` by window, grouped and filtered. `events` in log order.
#[allow(clippy::too_many_arguments)]
pub fn usage(
    events: &[UsageRecord],
    meter: &Meter,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    window: Window,
    tz: Tz,
    group_by: &[String],
    filters: &[(String, String)],
) -> Vec<Row> {
    // (window start, group values) → (values in log order with their times)
    let mut buckets: BTreeMap<(DateTime<Utc>, Vec<String>), Vec<Item<'_>>> = BTreeMap::new();
    for (pos, e) in dedupe(events).into_iter().enumerate() {
        if e.event_type != meter.event_type || e.time < from || e.time >= to {
            continue;
        }
        if filters.iter().any(|(k, v)| dimension_text(e, k) != *v) {
            continue;
        }
        let key = (
            window.start(e.time, tz),
            group_by.iter().map(|g| dimension_text(e, g)).collect(),
        );
        let value = if meter.aggregation == Aggregation::Count {
            None
        } else {
            meter.value(e)
        };
        buckets.entry(key).or_default().push((e.time, pos, value));
    }
    let mut rows = Vec::new();
    for ((start, group), items) in buckets {
        let numbers: Vec<f64> = items
            .iter()
            .filter_map(|(_, _, v)| match v {
                Some(MeterValue::Number(n)) => Some(*n),
                _ => None,
            })
            .collect();
        let value = match meter.aggregation {
            Aggregation::Count => Some(items.len() as f64),
            Aggregation::Sum => {
                let summed: Vec<f64> = numbers.iter().copied().filter(|n| summable(*n)).collect();
                (!summed.is_empty()).then(|| exact_sum(&summed))
            }
            Aggregation::Avg => {
                (!numbers.is_empty()).then(|| numbers.iter().sum::<f64>() / numbers.len() as f64)
            }
            Aggregation::Min => numbers.iter().copied().reduce(f64::min),
            Aggregation::Max => numbers.iter().copied().reduce(f64::max),
            Aggregation::UniqueCount => {
                let distinct: HashSet<String> = items
                    .iter()
                    .filter_map(|(_, _, v)| match v {
                        Some(MeterValue::Number(n)) => Some(n.to_string()),
                        Some(MeterValue::Text(s)) => Some(s.to_string()),
                        None => None,
                    })
                    .collect();
                Some(distinct.len() as f64)
            }
            Aggregation::Latest => items
                .iter()
                .filter_map(|(t, pos, v)| match v {
                    Some(MeterValue::Number(n)) => Some((*t, *pos, *n)),
                    _ => None,
                })
                .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
                .map(|(_, _, n)| n),
        };
        if let Some(value) = value {
            rows.push(Row {
                window_start: start,
                group: group_by.iter().cloned().zip(group).collect(),
                value,
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::exact_sum;

    #[test]
    fn sums_are_exact_decimals() {
        assert_eq!(exact_sum(&vec![0.1; 10_000]), 1000.0);
        assert_eq!(exact_sum(&[0.1, 0.2]), 0.3);
        assert_eq!(
            exact_sum(&[1e300, 1e300]),
            2e300,
            "past a decimal: the f64 sum"
        );
        assert_eq!(exact_sum(&[-2.5, 1.25]), -1.25);
    }
}
