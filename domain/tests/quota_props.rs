//! Quotas: the book against a naive recomputation from the full event list, period bounds,
//! threshold crossings, and the boundary cases the issue names.
use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use creto_domain::metering::quota::{
    period_bounds, Applied, CheckResult, ConfigSet, Entitlement, FeatureSet, GrantAdded,
    GrantVoided, Period, PeriodKind, Quantity, QuotaBook, QuotaError, QuotaEvent, QuotaRemoved,
    QuotaSet, QuotaThresholdReached, Thresholds,
};
use proptest::prelude::*;
use proptest::sample::Index;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn units(n: i64) -> Quantity {
    Quantity::units(n)
}

fn quota_set(limit: i64, hard: bool, period: Period, thresholds: &[u8]) -> QuotaEvent {
    QuotaEvent::QuotaSet(QuotaSet {
        subscription_id: "sub_1".into(),
        meter: "llm.tokens".into(),
        limit: units(limit),
        period,
        hard,
        thresholds_pct: thresholds.to_vec(),
    })
}

fn monthly() -> Period {
    Period::new(PeriodKind::Month, utc("2026-01-01T00:00:00Z"), Tz::UTC)
}

fn grant(id: &str, amount: i64, priority: u8, from: &str, expires: Option<&str>) -> QuotaEvent {
    QuotaEvent::GrantAdded(GrantAdded {
        subscription_id: "sub_1".into(),
        meter: "llm.tokens".into(),
        grant_id: id.into(),
        amount: units(amount),
        priority,
        effective_from: utc(from),
        expires_at: expires.map(utc),
    })
}

/// A book with one monthly quota on sub_1/llm.tokens set at `at`.
fn book_with(limit: i64, hard: bool, thresholds: &[u8], at: &str) -> QuotaBook {
    let mut book = QuotaBook::new();
    let set = quota_set(limit, hard, monthly(), thresholds);
    book.admit(&set).unwrap();
    book.apply(&set, utc(at));
    book
}

fn check(book: &QuotaBook, quantity: Quantity, at: &str) -> CheckResult {
    book.check("sub_1", "llm.tokens", quantity, utc(at))
        .unwrap()
}

fn use_(book: &mut QuotaBook, quantity: Quantity, at: &str) -> Applied {
    book.apply_usage("sub_1", "llm.tokens", quantity, utc(at))
}

// ---------------------------------------------------------------------------------------------
// The boundary cases.

#[test]
fn a_hard_limit_denies_exactly_past_the_boundary() {
    let mut book = book_with(100, true, &[], "2026-03-01T00:00:00Z");
    use_(&mut book, units(60), "2026-03-02T00:00:00Z");
    let at = "2026-03-02T00:00:01Z";
    let exact = check(&book, units(40), at);
    assert!(exact.allowed && !exact.soft, "{exact:?}");
    assert_eq!(exact.remaining, units(40));
    assert_eq!(exact.used, units(60));
    assert_eq!(exact.period_start, utc("2026-03-01T00:00:00Z"));
    assert_eq!(exact.period_end, utc("2026-04-01T00:00:00Z"));
    let one_micro_more = check(&book, units(40) + Quantity::from_micros(1), at);
    assert!(!one_micro_more.allowed && !one_micro_more.soft);

    use_(&mut book, units(40), "2026-03-02T00:00:02Z");
    let full = check(&book, Quantity::ZERO, "2026-03-02T00:00:03Z");
    assert!(full.allowed, "nothing more fits, and nothing more is asked");
    assert_eq!(full.remaining, Quantity::ZERO);
    assert!(!check(&book, Quantity::from_micros(1), "2026-03-02T00:00:03Z").allowed);
}

#[test]
fn a_soft_limit_allows_and_flags() {
    let mut book = book_with(100, false, &[], "2026-03-01T00:00:00Z");
    use_(&mut book, units(90), "2026-03-02T00:00:00Z");
    let within = check(&book, units(10), "2026-03-02T00:00:01Z");
    assert!(within.allowed && !within.soft);
    let over = check(&book, units(11), "2026-03-02T00:00:01Z");
    assert!(over.allowed && over.soft, "{over:?}");
    use_(&mut book, units(30), "2026-03-02T00:00:02Z");
    let after = check(&book, Quantity::ZERO, "2026-03-02T00:00:03Z");
    assert_eq!(after.used, units(120));
    assert_eq!(after.remaining, Quantity::ZERO, "never below zero");
}

#[test]
fn grants_raise_the_allowance_while_live_and_stop_at_expiry_or_void() {
    let mut book = book_with(100, true, &[], "2026-03-01T00:00:00Z");
    for g in [
        grant(
            "promo",
            50,
            1,
            "2026-03-05T00:00:00Z",
            Some("2026-03-20T00:00:00Z"),
        ),
        grant("support", 30, 0, "2026-03-01T00:00:00Z", None),
    ] {
        book.admit(&g).unwrap();
        book.apply(&g, utc("2026-03-01T00:00:00Z"));
    }
    use_(&mut book, units(120), "2026-03-02T00:00:00Z");

    // Before promo is effective: 100 + 30 − 120.
    let early = check(&book, Quantity::ZERO, "2026-03-04T23:59:59Z");
    assert_eq!((early.granted, early.remaining), (units(30), units(10)));
    // Both live: 100 + 80 − 120.
    let both = check(&book, units(60), "2026-03-10T00:00:00Z");
    assert_eq!((both.granted, both.remaining), (units(80), units(60)));
    assert!(both.allowed);
    // Usage burns the base limit, then support (priority 0) before promo (priority 1).
    let quota = book.metered("sub_1", "llm.tokens").unwrap();
    let balances: Vec<(&str, Quantity)> = quota
        .grant_balances(utc("2026-03-10T00:00:00Z"))
        .into_iter()
        .map(|(g, left)| (g.id.as_str(), left))
        .collect();
    assert_eq!(balances, vec![("support", units(10)), ("promo", units(50))]);
    // Promo expired: what it covered is not kept, so 100 + 30 − 120 again.
    let expired = check(&book, Quantity::ZERO, "2026-03-20T00:00:00Z");
    assert_eq!((expired.granted, expired.remaining), (units(30), units(10)));

    let void = QuotaEvent::GrantVoided(GrantVoided {
        subscription_id: "sub_1".into(),
        meter: "llm.tokens".into(),
        grant_id: "support".into(),
    });
    book.admit(&void).unwrap();
    book.apply(&void, utc("2026-03-21T00:00:00Z"));
    let before_void = check(&book, Quantity::ZERO, "2026-03-20T23:59:59Z");
    assert_eq!(before_void.remaining, units(10));
    let voided = check(&book, Quantity::ZERO, "2026-03-21T00:00:00Z");
    assert_eq!(
        (voided.granted, voided.remaining),
        (Quantity::ZERO, Quantity::ZERO)
    );
    assert!(!check(&book, Quantity::from_micros(1), "2026-03-21T00:00:00Z").allowed);
    assert_eq!(
        book.admit(&void),
        Err(QuotaError::AlreadyVoided {
            grant_id: "support".into()
        })
    );

    // A grant without expiry counts in the next period as well, afresh.
    let next = check(&book, Quantity::ZERO, "2026-04-02T00:00:00Z");
    assert_eq!((next.used, next.granted), (Quantity::ZERO, Quantity::ZERO));
}

#[test]
fn thresholds_are_crossed_once_per_period_with_a_dedupe_id() {
    let mut book = book_with(100, false, &[80, 100], "2026-03-01T00:00:00Z");
    let reached = |applied: Applied| -> Vec<QuotaThresholdReached> {
        applied.thresholds_reached("sub_1", "llm.tokens")
    };
    assert!(reached(use_(&mut book, units(70), "2026-03-02T00:00:00Z")).is_empty());
    let at_85 = reached(use_(&mut book, units(15), "2026-03-03T00:00:00Z"));
    assert_eq!(at_85.len(), 1);
    assert_eq!(at_85[0].pct, 80);
    assert_eq!(at_85[0].used, units(85));
    assert_eq!(
        at_85[0].dedupe_id(),
        format!(
            "quota-threshold:sub_1:llm.tokens:{}:80",
            utc("2026-03-01T00:00:00Z").timestamp()
        )
    );
    assert!(reached(use_(&mut book, units(10), "2026-03-04T00:00:00Z")).is_empty());
    let at_150 = reached(use_(&mut book, units(55), "2026-03-05T00:00:00Z"));
    assert_eq!(at_150.iter().map(|r| r.pct).collect::<Vec<_>>(), vec![100]);
    // A new period crosses them again, under another id.
    let april = reached(use_(&mut book, units(90), "2026-04-01T00:00:00Z"));
    assert_eq!(april.len(), 1);
    assert_ne!(april[0].dedupe_id(), at_85[0].dedupe_id());
    assert_eq!(april[0].period_start, utc("2026-04-01T00:00:00Z"));
}

#[test]
fn late_usage_of_a_closed_period_does_not_count_against_the_current_one() {
    let mut book = book_with(100, true, &[], "2026-03-01T00:00:00Z");
    use_(&mut book, units(10), "2026-03-31T23:00:00Z");
    use_(&mut book, units(5), "2026-04-01T00:10:00Z");
    assert_eq!(
        use_(&mut book, units(50), "2026-03-31T23:30:00Z"),
        Applied::ClosedPeriod
    );
    let now = check(&book, Quantity::ZERO, "2026-04-01T00:20:00Z");
    assert_eq!(now.used, units(5));
    assert_eq!(now.period_start, utc("2026-04-01T00:00:00Z"));
}

#[test]
fn a_change_of_period_that_starts_earlier_still_sees_the_grants_live_then() {
    let hourly = Period::new(PeriodKind::Hour, utc("2026-01-01T00:17:00Z"), Tz::UTC);
    let mut book = QuotaBook::new();
    book.apply(
        &quota_set(10, true, hourly, &[]),
        utc("2026-03-20T00:00:00Z"),
    );
    let early = grant(
        "early",
        1,
        0,
        "2026-03-18T22:00:00Z",
        Some("2026-03-20T05:00:00Z"),
    );
    book.apply(&early, utc("2026-03-20T04:00:00Z"));
    use_(&mut book, units(1), "2026-03-20T05:30:00Z"); // the hour of 05:17, after `early`
    let late = grant("late", 1, 0, "2026-03-20T05:30:00Z", None);
    book.apply(&late, utc("2026-03-20T05:30:00Z"));
    let paris_days = Period::new(
        PeriodKind::Day,
        utc("2026-01-01T23:00:00Z"),
        "Europe/Paris".parse().unwrap(),
    );
    book.apply(
        &quota_set(10, true, paris_days, &[]),
        utc("2026-03-20T05:31:00Z"),
    );
    // A late event from 04:00 falls in the new day, when `early` was live.
    let Applied::Counted { allowance, .. } = use_(&mut book, units(1), "2026-03-20T04:00:00Z")
    else {
        panic!("counted in the new period")
    };
    assert_eq!(allowance, units(11));
}

#[test]
fn changing_the_limit_keeps_usage_and_changing_the_period_restarts_it() {
    let mut book = book_with(100, true, &[], "2026-03-01T00:00:00Z");
    use_(&mut book, units(60), "2026-03-10T00:00:00Z");
    book.apply(
        &quota_set(50, true, monthly(), &[]),
        utc("2026-03-11T00:00:00Z"),
    );
    let lowered = check(&book, Quantity::ZERO, "2026-03-11T00:00:01Z");
    assert_eq!(
        (lowered.used, lowered.remaining),
        (units(60), Quantity::ZERO)
    );
    assert!(!check(&book, units(1), "2026-03-11T00:00:01Z").allowed);

    let daily = Period::new(PeriodKind::Day, utc("2026-01-01T00:00:00Z"), Tz::UTC);
    book.apply(
        &quota_set(50, true, daily, &[]),
        utc("2026-03-11T12:00:00Z"),
    );
    let fresh = check(&book, units(50), "2026-03-11T12:00:01Z");
    assert_eq!(fresh.used, Quantity::ZERO);
    assert!(fresh.allowed);
    assert_eq!(fresh.period_end, utc("2026-03-12T00:00:00Z"));
}

#[test]
fn boolean_and_static_entitlements_share_the_key_space() {
    let mut book = book_with(100, true, &[], "2026-03-01T00:00:00Z");
    let on = QuotaEvent::FeatureSet(FeatureSet {
        subscription_id: "sub_1".into(),
        feature: "sso".into(),
        enabled: true,
    });
    let config = QuotaEvent::ConfigSet(ConfigSet {
        subscription_id: "sub_1".into(),
        feature: "llm.tokens".into(),
        value: serde_json::json!({"models": ["m1", "m2"]}),
    });
    book.apply(&on, utc("2026-03-01T00:00:00Z"));
    book.apply(&config, utc("2026-03-01T00:00:00Z"));
    assert_eq!(
        book.entitlement("sub_1", "sso"),
        Some(&Entitlement::Boolean(true))
    );
    assert!(matches!(
        book.entitlement("sub_1", "llm.tokens"),
        Some(Entitlement::Static(v)) if v["models"][1] == "m2"
    ));
    assert!(
        book.check("sub_1", "llm.tokens", units(1), utc("2026-03-02T00:00:00Z"))
            .is_none(),
        "the static value replaced the metered quota"
    );
    let remove = |meter: &str| {
        QuotaEvent::QuotaRemoved(QuotaRemoved {
            subscription_id: "sub_1".into(),
            meter: meter.into(),
        })
    };
    book.apply(&remove("sso"), utc("2026-03-02T00:00:00Z"));
    book.apply(&remove("llm.tokens"), utc("2026-03-02T00:00:00Z"));
    assert!(book.is_empty());
    assert!(matches!(
        book.admit(&remove("sso")),
        Err(QuotaError::NotFound { .. })
    ));
}

#[test]
fn commands_are_refused_with_a_reason() {
    let book = book_with(100, true, &[], "2026-03-01T00:00:00Z");
    let refused = |event: QuotaEvent| book.admit(&event).unwrap_err().to_string();
    let with = |f: &dyn Fn(&mut QuotaSet)| {
        let QuotaEvent::QuotaSet(mut q) = quota_set(100, true, monthly(), &[80]) else {
            unreachable!()
        };
        f(&mut q);
        QuotaEvent::QuotaSet(q)
    };
    assert_eq!(
        refused(with(&|q| q.limit = -units(1))),
        "`limit` must be >= 0, got -1"
    );
    assert_eq!(
        refused(with(&|q| q.thresholds_pct = vec![80, 50])),
        "`thresholds_pct` must be ascending without repeats, got [80, 50]"
    );
    assert_eq!(
        refused(with(&|q| q.thresholds_pct = vec![0, 50])),
        "`thresholds_pct` must be percentages from 1 to 100, got 0"
    );
    assert!(refused(with(&|q| q.thresholds_pct = vec![50, 101])).contains("got 101"));
    assert!(refused(with(&|q| q.subscription_id = "sub.1".into())).starts_with("`subscription_id`"));
    assert!(refused(with(&|q| q.meter = "llm tokens".into())).starts_with("`meter`"));
    assert!(
        refused(with(&|q| q.period.anchor = utc("1900-01-01T00:00:00Z")))
            .starts_with("`period.anchor` must be between the years")
    );

    assert_eq!(
        refused(grant("g", 0, 0, "2026-03-01T00:00:00Z", None)),
        "`amount` must be > 0, got 0"
    );
    assert!(refused(grant(
        "g",
        5,
        0,
        "2026-03-01T00:00:00Z",
        Some("2026-03-01T00:00:00Z")
    ))
    .starts_with("`expires_at` must be after effective_from"));
    let mut elsewhere = grant("g", 5, 0, "2026-03-01T00:00:00Z", None);
    if let QuotaEvent::GrantAdded(g) = &mut elsewhere {
        g.meter = "agent.execution".into();
    }
    assert!(refused(elsewhere).contains("has no metered quota on \"agent.execution\""));

    let mut book = book;
    let g = grant("g", 5, 0, "2026-03-01T00:00:00Z", None);
    book.apply(&g, utc("2026-03-01T00:00:00Z"));
    assert_eq!(
        book.admit(&g),
        Err(QuotaError::DuplicateGrant {
            grant_id: "g".into()
        })
    );
}

#[test]
fn events_read_and_write_as_tagged_json() {
    let json = r#"{"type":"QuotaSet","subscription_id":"sub_1","meter":"llm.tokens",
        "limit":"1000.5","period":{"kind":"calendar_month","anchor":"2026-01-15T00:00:00Z",
        "tz":"Europe/Paris"},"hard":true,"thresholds_pct":[80,100]}"#;
    let event: QuotaEvent = serde_json::from_str(json).unwrap();
    let QuotaEvent::QuotaSet(q) = &event else {
        panic!("{event:?}")
    };
    assert_eq!(q.limit, Quantity::from_micros(1_000_500_000));
    assert_eq!(q.period.tz, "Europe/Paris".parse::<Tz>().unwrap());
    event.validate().unwrap();
    let again: QuotaEvent = serde_json::from_str(&serde_json::to_string(&event).unwrap()).unwrap();
    assert_eq!(again, event);
    assert!(serde_json::to_string(&event)
        .unwrap()
        .contains(r#""limit":"1000.5""#));

    let nan = json.replace(r#""1000.5""#, r#""NaN""#);
    let err = serde_json::from_str::<QuotaEvent>(&nan).unwrap_err();
    assert!(err.to_string().contains("not a decimal number"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Period bounds.

const ZONES: [&str; 8] = [
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "America/Santiago",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "America/St_Johns",
    "Pacific/Apia",
];

fn kind() -> impl Strategy<Value = PeriodKind> {
    prop_oneof![
        Just(PeriodKind::Hour),
        Just(PeriodKind::Day),
        Just(PeriodKind::Month),
        Just(PeriodKind::CalendarMonth),
    ]
}

/// An instant between 2000 and 2040, to the second.
fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    (946_684_800i64..2_208_988_800).prop_map(|s| Utc.timestamp_opt(s, 0).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn period_bounds_contain_the_instant_and_are_contiguous(
        kind in kind(),
        anchor in instant(),
        zone in 0..ZONES.len(),
        at in instant(),
    ) {
        let tz: Tz = ZONES[zone].parse().unwrap();
        let (start, end) = period_bounds(kind, anchor, tz, at);
        prop_assert!(start <= at && at < end, "{start} <= {at} < {end}");
        prop_assert_eq!(period_bounds(kind, anchor, tz, start), (start, end));
        prop_assert_eq!(period_bounds(kind, anchor, tz, end).0, end, "contiguous after");
        let (before, before_end) = period_bounds(kind, anchor, tz, start - Duration::nanoseconds(1));
        prop_assert_eq!(before_end, start, "contiguous before (from {})", before);
        let hours = (end - start).num_minutes() as f64 / 60.0;
        let expected = match kind {
            PeriodKind::Hour => 1.0..=1.0,
            // 23 or 25 hours across DST; Apia skipped a whole day in 2011.
            PeriodKind::Day => 22.0..=48.0,
            PeriodKind::Month | PeriodKind::CalendarMonth => 27.0 * 24.0..=32.0 * 24.0,
        };
        prop_assert!(expected.contains(&hours), "{kind:?} of {hours} h: {start} .. {end}");
    }

    #[test]
    fn months_start_on_the_anchor_day_or_the_last_day_of_shorter_months(
        calendar in any::<bool>(),
        anchor in instant(),
        zone in 0..ZONES.len() - 1, // not Apia, whose 30 December 2011 never happened
        at in instant(),
    ) {
        let tz: Tz = ZONES[zone].parse().unwrap();
        let kind = if calendar { PeriodKind::CalendarMonth } else { PeriodKind::Month };
        let (start, _) = period_bounds(kind, anchor, tz, at);
        let local = start.with_timezone(&tz);
        let anchor_day = anchor.with_timezone(&tz).day();
        let last = days_in_month(local.year(), local.month());
        prop_assert_eq!(local.day(), anchor_day.min(last), "{} in {}", local, ZONES[zone]);
        if calendar {
            // Midnight, or the end of a gap that swallowed it (Santiago springs forward at 0:00).
            prop_assert!(local.hour() <= 1 && local.minute() == 0, "{}", local);
        }
    }
}

fn days_in_month(year: i32, month: u32) -> u32 {
    (28..=31)
        .rev()
        .find(|d| chrono::NaiveDate::from_ymd_opt(year, month, *d).is_some())
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Threshold crossings.

proptest! {
    #[test]
    fn each_threshold_is_crossed_at_most_once_and_all_that_were_reached_are(
        pcts in proptest::sample::subsequence(vec![1u8, 25, 50, 80, 90, 99, 100], 0..=7),
        allowance in 0i128..2_000,
        steps in prop::collection::vec(0i128..300, 0..30),
    ) {
        let thresholds = Thresholds::from_pcts(&pcts);
        let allowance = Quantity::from_micros(allowance);
        let mut used = Quantity::ZERO;
        let mut seen: Vec<u8> = Vec::new();
        for step in steps {
            let after = used + Quantity::from_micros(step);
            for pct in thresholds.crossed(allowance, used, after).iter() {
                prop_assert!(!seen.contains(&pct), "{} crossed twice", pct);
                seen.push(pct);
            }
            used = after;
        }
        seen.sort();
        let reached: Vec<u8> = pcts
            .iter()
            .copied()
            .filter(|p| {
                used > Quantity::ZERO && used.micros() * 100 >= i128::from(*p) * allowance.micros()
            })
            .collect();
        prop_assert_eq!(seen, reached);
    }
}

// ---------------------------------------------------------------------------------------------
// The book against a naive recomputation from the full event list.

const SUBS: [&str; 2] = ["sub_a", "sub_b"];
const METERS: [&str; 2] = ["llm.tokens", "agent.execution"];

fn periods() -> [Period; 5] {
    let tz = |name: &str| name.parse::<Tz>().unwrap();
    [
        Period::new(PeriodKind::Hour, utc("2026-01-01T00:17:00Z"), Tz::UTC),
        // Midnight in Paris: the log crosses the 29 March DST change.
        Period::new(
            PeriodKind::Day,
            utc("2026-01-01T23:00:00Z"),
            tz("Europe/Paris"),
        ),
        Period::new(PeriodKind::Month, utc("2026-01-31T10:00:00Z"), Tz::UTC),
        Period::new(
            PeriodKind::CalendarMonth,
            utc("2026-01-20T12:00:00Z"),
            tz("America/New_York"),
        ),
        Period::new(
            PeriodKind::Day,
            utc("2026-01-01T00:00:00Z"),
            tz("Asia/Kolkata"),
        ),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Set {
        key: (usize, usize),
        limit: i64,
        period: usize,
        hard: bool,
        thresholds: Vec<u8>,
    },
    Remove {
        key: (usize, usize),
    },
    Feature {
        key: (usize, usize),
    },
    Grant {
        key: (usize, usize),
        amount: i64,
        priority: u8,
        from_hours: i64,
        for_hours: Option<i64>,
    },
    Void {
        pick: Index,
    },
    Usage {
        key: (usize, usize),
        micros: i128,
        late_minutes: i64,
    },
    /// Voids an earlier usage event: its quantity, negated, at its time.
    Correct {
        pick: Index,
    },
    Check {
        key: (usize, usize),
        micros: i128,
        offset_minutes: i64,
    },
    Advance {
        minutes: i64,
    },
}

fn key() -> impl Strategy<Value = (usize, usize)> {
    (0..SUBS.len(), 0..METERS.len())
}

/// Mostly whole units, so usage lands exactly on limits; sometimes any micro-amount.
fn micros() -> impl Strategy<Value = i128> {
    prop_oneof![
        3 => (0i128..=15).prop_map(|u| u * 1_000_000),
        1 => 0i128..=15_000_000,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (
            key(),
            0i64..=40,
            0..periods().len(),
            any::<bool>(),
            proptest::sample::subsequence(vec![25u8, 50, 80, 100], 0..=4),
        )
            .prop_map(|(key, limit, period, hard, thresholds)| Op::Set {
                key,
                limit,
                period,
                hard,
                thresholds
            }),
        1 => key().prop_map(|key| Op::Remove { key }),
        1 => key().prop_map(|key| Op::Feature { key }),
        2 => (key(), 1i64..=30, 0u8..3, -48i64..48, prop::option::of(1i64..200)).prop_map(
            |(key, amount, priority, from_hours, for_hours)| Op::Grant {
                key,
                amount,
                priority,
                from_hours,
                for_hours
            }
        ),
        1 => any::<Index>().prop_map(|pick| Op::Void { pick }),
        8 => (
            key(),
            micros(),
            // Mostly on time, sometimes days late, sometimes minutes early (producer clocks).
            prop_oneof![4 => 0i64..=10, 2 => 0i64..=4320, 1 => -5i64..0],
        )
            .prop_map(|(key, micros, late_minutes)| Op::Usage {
                key,
                micros,
                late_minutes
            }),
        1 => any::<Index>().prop_map(|pick| Op::Correct { pick }),
        6 => (key(), micros(), prop_oneof![4 => -10i64..=180, 1 => -4320i64..=4320]).prop_map(
            |(key, micros, offset_minutes)| Op::Check {
                key,
                micros,
                offset_minutes
            }
        ),
        // Now and then weeks at once, past the month after which dead grants are forgotten.
        4 => prop_oneof![8 => 0i64..=3000, 1 => 0i64..=60_000]
            .prop_map(|minutes| Op::Advance { minutes }),
    ]
}

/// One entry of the log, with the time the log recorded it.
#[derive(Debug, Clone)]
enum Entry {
    Event {
        at: DateTime<Utc>,
        event: QuotaEvent,
    },
    Usage {
        subscription_id: &'static str,
        meter: &'static str,
        quantity: Quantity,
        time: DateTime<Utc>,
    },
}

/// The metered quota under a key as the log leaves it: its latest setting, where its metered
/// life began, and where its counter last started (its creation or a change of period).
struct Epoch<'a> {
    quota: &'a QuotaSet,
    created: usize,
    counter_from: usize,
    counter_at: DateTime<Utc>,
}

fn epoch<'a>(log: &'a [Entry], sub: &str, meter: &str) -> Option<Epoch<'a>> {
    let mut epoch: Option<Epoch> = None;
    for (i, entry) in log.iter().enumerate() {
        let Entry::Event { at, event } = entry else {
            continue;
        };
        if event.key() != (sub, meter) {
            continue;
        }
        match event {
            QuotaEvent::QuotaSet(q) => match &mut epoch {
                Some(e) => {
                    if e.quota.period != q.period {
                        e.counter_from = i;
                        e.counter_at = *at;
                    }
                    e.quota = q;
                }
                None => {
                    epoch = Some(Epoch {
                        quota: q,
                        created: i,
                        counter_from: i,
                        counter_at: *at,
                    })
                }
            },
            QuotaEvent::QuotaRemoved(_) | QuotaEvent::FeatureSet(_) | QuotaEvent::ConfigSet(_) => {
                epoch = None
            }
            QuotaEvent::GrantAdded(_) | QuotaEvent::GrantVoided(_) => {}
        }
    }
    epoch
}

/// The usage that counted since the counter started, as (time, quantity), and the latest time
/// the quota has seen. An event counts unless its time is before the period that latest
/// time was in when it arrived.
fn counted(
    log: &[Entry],
    sub: &str,
    meter: &str,
    e: &Epoch,
) -> (Vec<(DateTime<Utc>, Quantity)>, DateTime<Utc>) {
    let mut latest = e.counter_at;
    let mut out = Vec::new();
    for entry in &log[e.counter_from..] {
        if let Entry::Usage {
            subscription_id,
            meter: m,
            quantity,
            time,
        } = entry
        {
            if (*subscription_id, *m) == (sub, meter) && *time >= e.quota.period.bounds(latest).0 {
                out.push((*time, *quantity));
                latest = latest.max(*time);
            }
        }
    }
    (out, latest)
}

fn sum_in(
    usage: &[(DateTime<Utc>, Quantity)],
    (start, end): (DateTime<Utc>, DateTime<Utc>),
) -> Quantity {
    usage
        .iter()
        .filter(|(t, _)| start <= *t && *t < end)
        .map(|(_, q)| *q)
        .sum()
}

/// The grants added since the quota was created, each with the time of its first void.
fn granted_at(log: &[Entry], sub: &str, meter: &str, e: &Epoch, t: DateTime<Utc>) -> Quantity {
    let mut grants: Vec<(&GrantAdded, Option<DateTime<Utc>>)> = Vec::new();
    for entry in &log[e.created..] {
        match entry {
            Entry::Event {
                event: QuotaEvent::GrantAdded(g),
                ..
            } if (g.subscription_id.as_str(), g.meter.as_str()) == (sub, meter) => {
                grants.push((g, None))
            }
            Entry::Event {
                at,
                event: QuotaEvent::GrantVoided(v),
            } if (v.subscription_id.as_str(), v.meter.as_str()) == (sub, meter) => {
                for (g, voided) in &mut grants {
                    if g.grant_id == v.grant_id && voided.is_none() {
                        *voided = Some(*at);
                    }
                }
            }
            _ => {}
        }
    }
    grants
        .iter()
        .filter(|(g, voided)| {
            g.effective_from <= t
                && g.expires_at.is_none_or(|x| t < x)
                && voided.is_none_or(|v| t < v)
        })
        .map(|(g, _)| g.amount)
        .sum()
}

fn expected_check(
    log: &[Entry],
    sub: &str,
    meter: &str,
    quantity: Quantity,
    at: DateTime<Utc>,
) -> Option<CheckResult> {
    let e = epoch(log, sub, meter)?;
    let (usage, latest) = counted(log, sub, meter, &e);
    let current = e.quota.period.bounds(latest);
    let (start, end) = if at < current.1 {
        current
    } else {
        e.quota.period.bounds(at)
    };
    let used = sum_in(&usage, (start, end));
    let granted = granted_at(log, sub, meter, &e, at.max(start));
    let allowance = e.quota.limit + granted;
    let over = used + quantity > allowance;
    Some(CheckResult {
        allowed: !(over && e.quota.hard),
        soft: over && !e.quota.hard,
        limit: e.quota.limit,
        granted,
        used,
        remaining: if allowance > used {
            allowance - used
        } else {
            Quantity::ZERO
        },
        period_start: start,
        period_end: end,
    })
}

/// What applying a usage event after `log` should report.
fn expected_applied(
    log: &[Entry],
    sub: &str,
    meter: &str,
    quantity: Quantity,
    time: DateTime<Utc>,
) -> Applied {
    let Some(e) = epoch(log, sub, meter) else {
        return Applied::NoQuota;
    };
    let (usage, latest) = counted(log, sub, meter, &e);
    if time < e.quota.period.bounds(latest).0 {
        return Applied::ClosedPeriod;
    }
    let (start, end) = e.quota.period.bounds(latest.max(time));
    let before = sum_in(&usage, (start, end));
    let used = before + quantity;
    let allowance = e.quota.limit + granted_at(log, sub, meter, &e, time);
    let reached = |q: Quantity, pct: u8| {
        q > Quantity::ZERO && q.micros() * 100 >= i128::from(pct) * allowance.micros()
    };
    let crossed: Vec<u8> = e
        .quota
        .thresholds_pct
        .iter()
        .copied()
        .filter(|p| reached(used, *p) && !reached(before, *p))
        .collect();
    Applied::Counted {
        period_start: start,
        period_end: end,
        used,
        allowance,
        crossed: Thresholds::from_pcts(&crossed),
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let periods = periods();
    let mut book = QuotaBook::new();
    let mut log: Vec<Entry> = Vec::new();
    let mut clock = utc("2026-03-20T00:00:00Z");
    let mut grants: Vec<((usize, usize), String)> = Vec::new();
    let mut usages: Vec<((usize, usize), Quantity, DateTime<Utc>)> = Vec::new();
    for (n, op) in ops.into_iter().enumerate() {
        let event = match op {
            Op::Advance { minutes } => {
                clock += Duration::minutes(minutes);
                None
            }
            Op::Check {
                key: (s, m),
                micros,
                offset_minutes,
            } => {
                let at = clock + Duration::minutes(offset_minutes);
                let quantity = Quantity::from_micros(micros);
                prop_assert_eq!(
                    book.check(SUBS[s], METERS[m], quantity, at),
                    expected_check(&log, SUBS[s], METERS[m], quantity, at),
                    "check {}/{} of {} at {}",
                    SUBS[s],
                    METERS[m],
                    quantity,
                    at
                );
                None
            }
            Op::Usage { .. } | Op::Correct { .. } => {
                let usage = match op {
                    Op::Usage {
                        key,
                        micros,
                        late_minutes,
                    } => (
                        key,
                        Quantity::from_micros(micros),
                        clock - Duration::minutes(late_minutes),
                    ),
                    Op::Correct { pick } if !usages.is_empty() => {
                        let (key, quantity, time) = *pick.get(&usages);
                        (key, -quantity, time)
                    }
                    _ => continue,
                };
                let ((s, m), quantity, time) = usage;
                let expected = expected_applied(&log, SUBS[s], METERS[m], quantity, time);
                prop_assert_eq!(
                    book.apply_usage(SUBS[s], METERS[m], quantity, time),
                    expected,
                    "usage {}/{} of {} at {}",
                    SUBS[s],
                    METERS[m],
                    quantity,
                    time
                );
                log.push(Entry::Usage {
                    subscription_id: SUBS[s],
                    meter: METERS[m],
                    quantity,
                    time,
                });
                usages.push(usage);
                None
            }
            Op::Set {
                key: (s, m),
                limit,
                period,
                hard,
                thresholds,
            } => Some(QuotaEvent::QuotaSet(QuotaSet {
                subscription_id: SUBS[s].into(),
                meter: METERS[m].into(),
                limit: units(limit),
                period: periods[period],
                hard,
                thresholds_pct: thresholds,
            })),
            Op::Remove { key: (s, m) } => Some(QuotaEvent::QuotaRemoved(QuotaRemoved {
                subscription_id: SUBS[s].into(),
                meter: METERS[m].into(),
            })),
            Op::Feature { key: (s, m) } => Some(QuotaEvent::FeatureSet(FeatureSet {
                subscription_id: SUBS[s].into(),
                feature: METERS[m].into(),
                enabled: true,
            })),
            Op::Grant {
                key,
                amount,
                priority,
                from_hours,
                for_hours,
            } => {
                let grant_id = format!("grant-{n}");
                grants.push((key, grant_id.clone()));
                let effective_from = clock + Duration::hours(from_hours);
                Some(QuotaEvent::GrantAdded(GrantAdded {
                    subscription_id: SUBS[key.0].into(),
                    meter: METERS[key.1].into(),
                    grant_id,
                    amount: units(amount),
                    priority,
                    effective_from,
                    expires_at: for_hours.map(|h| effective_from + Duration::hours(h)),
                }))
            }
            Op::Void { pick } if !grants.is_empty() => {
                let ((s, m), grant_id) = pick.get(&grants).clone();
                Some(QuotaEvent::GrantVoided(GrantVoided {
                    subscription_id: SUBS[s].into(),
                    meter: METERS[m].into(),
                    grant_id,
                }))
            }
            Op::Void { .. } => None,
        };
        if let Some(event) = event {
            prop_assert!(event.validate().is_ok(), "{:?}", event);
            // Applied whether or not a command would have been admitted: the book must
            // shrug off events that do not fit, as the recomputation does.
            book.apply(&event, clock);
            log.push(Entry::Event { at: clock, event });
        }
        for (s, m) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            prop_assert_eq!(
                book.check(SUBS[s], METERS[m], Quantity::ZERO, clock),
                expected_check(&log, SUBS[s], METERS[m], Quantity::ZERO, clock),
                "{}/{} after op {}",
                SUBS[s],
                METERS[m],
                n
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn the_book_agrees_with_a_recomputation_from_the_log(
        ops in prop::collection::vec(op(), 1..120),
    ) {
        run(ops)?;
    }
}
