//! Usage periods: the recurring intervals a quota's counter resets on.
//!
//! Every boundary is computed from the anchor directly (the k-th one, never by stepping from the
//! previous one), so a month anchored on the 31st ends on the 28th or 29th of February and on
//! the 31st of March again, and no error accumulates. Day and month boundaries are wall-clock
//! times in the period's time zone, so a day is 23 or 25 hours across a DST change.
use std::str::FromStr;

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, Offset,
    TimeZone, Utc,
};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// How a usage period recurs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeriodKind {
    /// Consecutive hours from the anchor instant (the time zone plays no part).
    Hour,
    /// Consecutive days starting at the anchor's wall-clock time of day.
    Day,
    /// Consecutive months starting on the anchor's day of month and time of day (OpenMeter's
    /// usage period). A day the month lacks becomes its last day.
    Month,
    /// Calendar months starting at local midnight on the anchor's day of month (the billing
    /// day); a day the month lacks becomes its last day.
    CalendarMonth,
}

/// A usage period: its kind, the instant it is anchored on, and the time zone of its wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Period {
    pub kind: PeriodKind,
    pub anchor: DateTime<Utc>,
    /// An IANA name such as "Europe/Paris"; UTC when absent.
    #[serde(with = "tz_name", default = "utc")]
    pub tz: Tz,
}

fn utc() -> Tz {
    Tz::UTC
}

impl Period {
    pub fn new(kind: PeriodKind, anchor: DateTime<Utc>, tz: Tz) -> Period {
        Period { kind, anchor, tz }
    }

    /// The period containing `at`: `start <= at < end`.
    pub fn bounds(&self, at: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        period_bounds(self.kind, self.anchor, self.tz, at)
    }
}

/// The period of `kind`, anchored on `anchor` in `tz`, that contains `at`: `(start, end)` with
/// `start <= at < end`, and the `end` of one period is the `start` of the next.
pub fn period_bounds(
    kind: PeriodKind,
    anchor: DateTime<Utc>,
    tz: Tz,
    at: DateTime<Utc>,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let boundaries = Boundaries::new(kind, anchor, tz);
    // Estimate the index on the wall clock, then correct it: DST shifts and clamped month
    // days move a boundary by at most a day, so the loops run once or twice.
    let mut k = boundaries.estimate(at);
    while boundaries.nth(k) > at {
        k -= 1;
    }
    while boundaries.nth(k + 1) <= at {
        k += 1;
    }
    (boundaries.nth(k), boundaries.nth(k + 1))
}

/// The k-th boundary of a period, k = 0 being the one at (or, for calendar months, on the day
/// of) the anchor.
struct Boundaries {
    kind: PeriodKind,
    anchor: DateTime<Utc>,
    /// The anchor on the wall clock of `tz`.
    local: NaiveDateTime,
    tz: Tz,
}

impl Boundaries {
    fn new(kind: PeriodKind, anchor: DateTime<Utc>, tz: Tz) -> Boundaries {
        let local = anchor.with_timezone(&tz).naive_local();
        Boundaries {
            kind,
            anchor,
            local,
            tz,
        }
    }

    fn nth(&self, k: i64) -> DateTime<Utc> {
        match self.kind {
            PeriodKind::Hour => self.anchor + Duration::hours(k),
            PeriodKind::Day => resolve(self.local + Duration::days(k), self.tz),
            PeriodKind::Month => resolve(
                add_months(self.local.date(), k).and_time(self.local.time()),
                self.tz,
            ),
            PeriodKind::CalendarMonth => resolve(
                add_months(self.local.date(), k).and_time(NaiveTime::MIN),
                self.tz,
            ),
        }
    }

    fn estimate(&self, at: DateTime<Utc>) -> i64 {
        let local = at.with_timezone(&self.tz).naive_local();
        match self.kind {
            PeriodKind::Hour => (at - self.anchor).num_seconds().div_euclid(3600),
            PeriodKind::Day => (local.date() - self.local.date()).num_days(),
            PeriodKind::Month | PeriodKind::CalendarMonth => {
                month_index(local.date()) - month_index(self.local.date())
            }
        }
    }
}

fn month_index(d: NaiveDate) -> i64 {
    i64::from(d.year()) * 12 + i64::from(d.month0())
}

/// `k` months after `date`, on the same day of month or the month's last day if it is shorter.
fn add_months(date: NaiveDate, k: i64) -> NaiveDate {
    let index = month_index(date) + k;
    let year = i32::try_from(index.div_euclid(12)).expect("a year chrono can represent");
    let month = index.rem_euclid(12) as u32 + 1;
    let day = date.day().min(days_in_month(year, month));
    NaiveDate::from_ymd_opt(year, month, day).expect("a clamped day is a valid date")
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let first = NaiveDate::from_ymd_opt(year, month, 1).expect("valid month");
    let next = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)
    }
    .expect("valid month");
    (next - first).num_days() as u32
}

/// A wall-clock time to the instant a period boundary means by it. Twice (clocks set back):
/// the first occurrence, so the earlier period does not swallow the repeated hour. Never (in a
/// spring-forward gap): the wall time read with the offset in force before the gap, which
/// lands as far past the gap's end as the time was past its start (java.time's rule); a
/// boundary on the gap's start is then exactly its end. Monotonic in `local`, so boundaries
/// stay in order.
pub fn resolve(local: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(a, b) => a.min(b).with_timezone(&Utc),
        LocalResult::None => {
            // 48 hours back is before any gap (none lasts a day and a half) and after the
            // transition preceding it (they are months apart).
            let before = tz
                .offset_from_utc_datetime(&(local - Duration::hours(48)))
                .fix();
            Utc.from_utc_datetime(&(local - Duration::seconds(i64::from(before.local_minus_utc()))))
        }
    }
}

/// `Tz` as its IANA name; chrono-tz's own serde support is a feature this crate leaves off.
mod tz_name {
    use super::*;
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(tz: &Tz, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(tz.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Tz, D::Error> {
        let name = String::deserialize(d)?;
        Tz::from_str(&name).map_err(|_| {
            de::Error::custom(format!(
                "unknown time zone {name:?}: expected an IANA name such as \"Europe/Paris\""
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn bounds(kind: PeriodKind, anchor: &str, tz: Tz, at: &str) -> (String, String) {
        let (s, e) = period_bounds(kind, utc(anchor), tz, utc(at));
        (s.to_rfc3339(), e.to_rfc3339())
    }

    #[test]
    fn a_month_anchored_on_the_31st_ends_on_the_last_day_of_shorter_months() {
        let anchor = "2026-01-31T10:00:00+00:00";
        let b = |at| bounds(PeriodKind::Month, anchor, Tz::UTC, at);
        assert_eq!(
            b("2026-02-15T00:00:00Z"),
            (
                "2026-01-31T10:00:00+00:00".into(),
                "2026-02-28T10:00:00+00:00".into()
            )
        );
        assert_eq!(
            b("2026-03-01T00:00:00Z"),
            (
                "2026-02-28T10:00:00+00:00".into(),
                "2026-03-31T10:00:00+00:00".into()
            )
        );
        assert_eq!(
            b("2028-02-29T12:00:00Z"),
            (
                "2028-02-29T10:00:00+00:00".into(),
                "2028-03-31T10:00:00+00:00".into()
            )
        );
        // Before the anchor too.
        assert_eq!(
            b("2025-12-01T00:00:00Z"),
            (
                "2025-11-30T10:00:00+00:00".into(),
                "2025-12-31T10:00:00+00:00".into()
            )
        );
    }

    #[test]
    fn calendar_months_start_at_local_midnight() {
        let paris: Tz = "Europe/Paris".parse().unwrap();
        // Anchor day 1; March 2026 in Paris: CET (+1) until the 29th, then CEST (+2).
        let (s, e) = bounds(
            PeriodKind::CalendarMonth,
            "2026-01-01T12:00:00Z",
            paris,
            "2026-03-15T00:00:00Z",
        );
        assert_eq!(s, "2026-02-28T23:00:00+00:00");
        assert_eq!(e, "2026-03-31T22:00:00+00:00");
    }

    #[test]
    fn days_follow_the_wall_clock_across_dst() {
        let paris: Tz = "Europe/Paris".parse().unwrap();
        let anchor = "2026-01-01T23:00:00Z"; // midnight in Paris
        let (s, e) = bounds(PeriodKind::Day, anchor, paris, "2026-03-29T12:00:00Z");
        assert_eq!(utc(&e) - utc(&s), Duration::hours(23));
        let (s, e) = bounds(PeriodKind::Day, anchor, paris, "2026-10-25T12:00:00Z");
        assert_eq!(utc(&e) - utc(&s), Duration::hours(25));
    }

    #[test]
    fn a_boundary_in_a_gap_is_the_gaps_end() {
        // Santiago springs forward at local midnight: 2026-09-06 00:00 does not exist.
        let santiago: Tz = "America/Santiago".parse().unwrap();
        let local = NaiveDate::from_ymd_opt(2026, 9, 6)
            .unwrap()
            .and_time(NaiveTime::MIN);
        assert!(santiago.from_local_datetime(&local).single().is_none());
        let t = resolve(local, santiago);
        assert_eq!(
            t.with_timezone(&santiago).to_rfc3339(),
            "2026-09-06T01:00:00-03:00"
        );
    }

    #[test]
    fn the_time_zone_name_is_validated_when_read() {
        let err = serde_json::from_str::<Period>(
            r#"{"kind":"day","anchor":"2026-01-01T00:00:00Z","tz":"Mars/Olympus"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown time zone"), "{err}");
    }
}
