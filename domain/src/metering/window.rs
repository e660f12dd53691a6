//! Time windows in a time zone.
use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc,
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

    /// Start of the window containing `t`, in `tz`.
    pub fn start(&self, t: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        let local = t.with_timezone(&tz).naive_local();
        let truncated = match self {
            Window::Minute => local.with_second(0).and_then(|l| l.with_nanosecond(0)),
            Window::Hour => local.date().and_hms_opt(local.hour(), 0, 0),
            Window::Day => local.date().and_hms_opt(0, 0, 0),
            Window::Month => NaiveDate::from_ymd_opt(local.year(), local.month(), 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0)),
        }
        .expect("truncation is always a valid local time");
        resolve(truncated, tz)
    }

    /// End (exclusive) of the window that starts at `start`.
    pub fn end(&self, start: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        let local = start.with_timezone(&tz).naive_local();
        let next = match self {
            Window::Minute => local + Duration::minutes(1),
            Window::Hour => local + Duration::hours(1),
            Window::Day => local + Duration::days(1),
            Window::Month => {
                let (y, m) = if local.month() == 12 {
                    (local.year() + 1, 1)
                } else {
                    (local.year(), local.month() + 1)
                };
                NaiveDate::from_ymd_opt(y, m, 1)
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .expect("valid month")
            }
        };
        resolve(next, tz)
    }
}

/// Local wall time to an instant the way Postgres does `timestamp AT TIME ZONE`: in a gap the
/// later offset applies, in an overlap the earlier instant wins.
fn resolve(local: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(a, b) => a.min(b).with_timezone(&Utc),
        LocalResult::None => resolve(local + Duration::hours(1), tz) - Duration::hours(1),
    }
}
