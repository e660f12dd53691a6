//! Time windows in a time zone.
use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone,
    Timelike, Utc,
};
use chrono_tz::Tz;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Minute,
    Hour,
    Day,
    Month,
}

impl Window {
    /// The Postgres `date_trunc` field.
    pub fn as_sql(&self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
        }
    }

    /// Start of the window containing `t`, in `tz`, as Postgres's `date_trunc(field, t, tz)`
    /// gives it: a minute or an hour keeps the offset in force at `t` (an hour the clocks
    /// repeat is two windows), a day or a month is the local midnight resolved as [`resolve`]
    /// says.
    pub fn start(&self, t: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        let local = t.with_timezone(&tz).naive_local();
        match self {
            Window::Minute | Window::Hour => {
                let offset =
                    Duration::seconds(t.with_timezone(&tz).offset().fix().local_minus_utc() as i64);
                let truncated = match self {
                    Window::Minute => local.with_second(0).and_then(|l| l.with_nanosecond(0)),
                    _ => local.date().and_hms_opt(local.hour(), 0, 0),
                }
                .expect("truncation is always a valid wall time");
                (truncated - offset).and_utc()
            }
            Window::Day | Window::Month => {
                let day = match self {
                    Window::Day => local.date(),
                    _ => NaiveDate::from_ymd_opt(local.year(), local.month(), 1)
                        .expect("the first of a month"),
                };
                resolve(day.and_hms_opt(0, 0, 0).expect("midnight"), tz)
            }
        }
    }

    /// End (exclusive) of the window that starts at `start`: the next window's start.
    pub fn end(&self, start: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        match self {
            Window::Minute => start + Duration::minutes(1),
            Window::Hour => start + Duration::hours(1),
            Window::Day | Window::Month => {
                let local = start.with_timezone(&tz).naive_local().date();
                let next = match self {
                    Window::Day => local + Duration::days(1),
                    _ => {
                        let (y, m) = if local.month() == 12 {
                            (local.year() + 1, 1)
                        } else {
                            (local.year(), local.month() + 1)
                        };
                        NaiveDate::from_ymd_opt(y, m, 1).expect("valid month")
                    }
                };
                resolve(next.and_hms_opt(0, 0, 0).expect("midnight"), tz)
            }
        }
    }
}

/// A wall time to an instant the way Postgres resolves one (`timestamp AT TIME ZONE`, and
/// `date_trunc` to a day or more): in a gap (clocks going forward) with the offset in force
/// before it, in an overlap (clocks going back) the later instant.
fn resolve(local: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(a, b) => a.max(b).with_timezone(&Utc),
        LocalResult::None => {
            // The offset of the last wall time before the gap that exists.
            let before = (1..=48)
                .find_map(|h| {
                    tz.from_local_datetime(&(local - Duration::hours(h)))
                        .latest()
                        .map(|t| t.offset().fix().local_minus_utc())
                })
                .expect("a gap in a time zone lasts less than two days");
            (local - Duration::seconds(before as i64)).and_utc()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    /// Each figure is what PostgreSQL 15 answers for `date_trunc(field, t, zone)` (and
    /// `timestamp AT TIME ZONE zone`); `replay-tests/tests/metering_query_props.rs` compares
    /// the two around many transitions.
    #[test]
    fn windows_across_clock_changes_are_postgres_s() {
        let ny: Tz = "America/New_York".parse().unwrap();
        // 01:00-02:00 happens twice on 2024-11-03: two hour windows.
        assert_eq!(
            Window::Hour.start(at("2024-11-03T05:30:00Z"), ny),
            at("2024-11-03T05:00:00Z")
        );
        assert_eq!(
            Window::Hour.start(at("2024-11-03T06:30:00Z"), ny),
            at("2024-11-03T06:00:00Z")
        );
        assert_eq!(
            Window::Hour.end(at("2024-11-03T05:00:00Z"), ny),
            at("2024-11-03T06:00:00Z")
        );
        assert_eq!(
            Window::Minute.start(at("2024-11-03T06:30:20Z"), ny),
            at("2024-11-03T06:30:00Z")
        );
        assert_eq!(
            Window::Minute.end(at("2024-11-03T06:30:00Z"), ny),
            at("2024-11-03T06:31:00Z")
        );
        // 2024-03-10 02:30 does not exist: read with the offset before the gap.
        let gap = NaiveDate::from_ymd_opt(2024, 3, 10)
            .unwrap()
            .and_hms_opt(2, 30, 0)
            .unwrap();
        assert_eq!(resolve(gap, ny), at("2024-03-10T07:30:00Z"));
        // 2024-11-03 01:30 exists twice: the later.
        let twice = NaiveDate::from_ymd_opt(2024, 11, 3)
            .unwrap()
            .and_hms_opt(1, 30, 0)
            .unwrap();
        assert_eq!(resolve(twice, ny), at("2024-11-03T06:30:00Z"));
        // Santiago skips 2024-09-08 00:00-01:00: the day starts as midnight would have.
        let santiago: Tz = "America/Santiago".parse().unwrap();
        let day = Window::Day.start(at("2024-09-08T05:00:00Z"), santiago);
        assert_eq!(day, at("2024-09-08T04:00:00Z"));
        assert_eq!(Window::Day.end(day, santiago), at("2024-09-09T03:00:00Z"));
        // Havana repeats 2024-11-03 00:00-01:00: the day starts at the later midnight.
        let havana: Tz = "America/Havana".parse().unwrap();
        assert_eq!(
            Window::Day.start(at("2024-11-03T04:30:00Z"), havana),
            at("2024-11-03T05:00:00Z")
        );
    }
}
