//! Meters: what to aggregate, over which events, grouped by which dimensions.
use serde_json::Value;

use super::event::{is_event_type, UsageRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregation {
    Sum,
    Count,
    UniqueCount,
    Avg,
    Min,
    Max,
    Latest,
}

impl Aggregation {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Sum => "SUM",
            Self::Count => "COUNT",
            Self::UniqueCount => "UNIQUE_COUNT",
            Self::Avg => "AVG",
            Self::Min => "MIN",
            Self::Max => "MAX",
            Self::Latest => "LATEST",
        }
    }

    pub fn parse(s: &str) -> Option<Aggregation> {
        Some(match s {
            "SUM" => Self::Sum,
            "COUNT" => Self::Count,
            "UNIQUE_COUNT" => Self::UniqueCount,
            "AVG" => Self::Avg,
            "MIN" => Self::Min,
            "MAX" => Self::Max,
            "LATEST" => Self::Latest,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    pub slug: String,
    pub event_type: String,
    pub aggregation: Aggregation,
    /// Path into `data`, as keys: `$.usage.tokens` → `["usage", "tokens"]`. Empty for COUNT.
    pub value_path: Vec<String>,
    pub group_by: Vec<String>,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MeterError(pub String);

pub const MAX_GROUP_BY: usize = 16;

/// Dimension names: top-level keys of `data`.
pub fn is_dimension(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Parses `$.a.b`, `a.b` or `a` into keys.
pub fn parse_path(path: &str) -> Result<Vec<String>, MeterError> {
    let p = path.strip_prefix("$.").unwrap_or(path);
    let keys: Vec<String> = p.split('.').map(str::to_string).collect();
    if p.is_empty() || keys.iter().any(|k| !is_dimension(k)) || keys.len() > 8 {
        return Err(MeterError(format!(
            "value_property {path:?} must be a JSON path like $.tokens or $.usage.input_tokens"
        )));
    }
    Ok(keys)
}

impl Meter {
    pub fn new(
        slug: &str,
        event_type: &str,
        aggregation: Aggregation,
        value_property: &str,
        group_by: Vec<String>,
        description: &str,
    ) -> Result<Meter, MeterError> {
        let slug_ok = !slug.is_empty()
            && slug.len() <= 64
            && slug
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !slug_ok {
            return Err(MeterError(format!(
                "slug {slug:?} must be 1-64 characters of a-z, 0-9, _ and -"
            )));
        }
        if !is_event_type(event_type) {
            return Err(MeterError(format!(
                "event_type {event_type:?} is not a valid event type"
            )));
        }
        let value_path = match (aggregation, value_property.is_empty()) {
            (Aggregation::Count, true) => Vec::new(),
            (Aggregation::Count, false) => {
                return Err(MeterError("a COUNT meter takes no value_property".into()))
            }
            (_, true) => {
                return Err(MeterError(format!(
                    "a {} meter needs a value_property, e.g. $.tokens",
                    aggregation.as_str()
                )))
            }
            (_, false) => parse_path(value_property)?,
        };
        if group_by.len() > MAX_GROUP_BY {
            return Err(MeterError(format!(
                "at most {MAX_GROUP_BY} group_by dimensions"
            )));
        }
        if let Some(bad) = group_by.iter().find(|g| !is_dimension(g)) {
            return Err(MeterError(format!(
                "group_by dimension {bad:?} must be a top-level key of data"
            )));
        }
        if description.len() > 1024 {
            return Err(MeterError("description is longer than 1024 bytes".into()));
        }
        crate::text::check("description", description).map_err(MeterError)?;
        Ok(Meter {
            slug: slug.to_string(),
            event_type: event_type.to_string(),
            aggregation,
            value_path,
            group_by,
            description: description.to_string(),
        })
    }

    pub fn value_property(&self) -> String {
        if self.value_path.is_empty() {
            String::new()
        } else {
            format!("$.{}", self.value_path.join("."))
        }
    }

    /// The value this meter reads from an event; `quantity` is addressable as `$.quantity`.
    pub fn value<'a>(&self, record: &'a UsageRecord) -> Option<MeterValue<'a>> {
        if self.value_path == ["quantity"] {
            return Some(MeterValue::Number(record.quantity));
        }
        let (first, rest) = self.value_path.split_first()?;
        let mut v = record.dimensions.get(first)?;
        for k in rest {
            v = v.get(k)?;
        }
        match v {
            Value::Number(n) => n.as_f64().map(MeterValue::Number),
            Value::String(s) => Some(MeterValue::Text(s)),
            _ => None,
        }
    }
}

/// A meter's value from one event: numbers aggregate, text only counts as distinct.
#[derive(Debug, Clone, PartialEq)]
pub enum MeterValue<'a> {
    Number(f64),
    Text(&'a str),
}
