//! Property tests of the pricing engine against a deliberately simple reference.
//!
//! The reference below prices the way one would on paper: graduated unit by unit (each unit
//! looks up its tier by a linear scan), volume by scanning for the tier of the total, packages
//! by counting them out in a loop, per unit by adding the price once per unit. It only handles
//! whole quantities and whole tier bounds, which is what the generators produce; the engine
//! itself works on any decimal. Billing cycles are counted out on the calendar.
use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, TimeDelta, TimeZone, Timelike, Utc};
use creto_domain::metering::invoice::{compute_invoice, InvoiceDraft};
use creto_domain::metering::pricing::{
    price_charge, segments, BillingInterval, Charge, ChargeModel, Currency, Period, Plan,
    PlanAssignment, PlanRef, PricingError, SegmentUsage, Tier,
};
use proptest::prelude::*;
use rust_decimal::Decimal;

// ---------------------------------------------------------------------------------------------
// The reference.

/// The tier a quantity falls in: the first whose bound is at least the quantity.
fn tier_of(tiers: &[Tier], x: Decimal) -> usize {
    let mut i = 0;
    while let Some(up_to) = tiers[i].up_to {
        if x <= up_to {
            break;
        }
        i += 1;
    }
    i
}

fn ref_graduated(tiers: &[Tier], units: u64) -> Decimal {
    let mut total = Decimal::ZERO;
    let mut reached = BTreeSet::new();
    // Unit k occupies (k-1, k]; with whole bounds it lies inside the tier of k.
    for k in 1..=units {
        let i = tier_of(tiers, Decimal::from(k));
        total += tiers[i].unit_price;
        reached.insert(i);
    }
    for i in reached {
        total += tiers[i].flat_fee.unwrap_or_default();
    }
    total
}

fn ref_volume(tiers: &[Tier], units: u64) -> Decimal {
    if units == 0 {
        return Decimal::ZERO;
    }
    let tier = &tiers[tier_of(tiers, Decimal::from(units))];
    let mut total = tier.flat_fee.unwrap_or_default();
    for _ in 0..units {
        total += tier.unit_price;
    }
    total
}

fn ref_package(size: u64, price: Decimal, units: u64) -> Decimal {
    let (mut packages, mut covered) = (0u64, 0u64);
    while covered < units {
        packages += 1;
        covered += size;
    }
    Decimal::from(packages) * price
}

fn ref_per_unit(price: Decimal, units: u64) -> Decimal {
    (0..units).map(|_| price).sum()
}

/// One period's worth of a charge for a whole quantity.
fn ref_charge(model: &ChargeModel, units: u64) -> Decimal {
    match model {
        ChargeModel::Flat { amount } => *amount,
        ChargeModel::PerUnit { unit_price } => ref_per_unit(*unit_price, units),
        ChargeModel::Graduated { tiers } => ref_graduated(tiers, units),
        ChargeModel::Volume { tiers } => ref_volume(tiers, units),
        ChargeModel::Package {
            package_size,
            package_price,
        } => ref_package(
            u64::try_from(*package_size).expect("whole package size"),
            *package_price,
            units,
        ),
    }
}

/// Half-up to the minor unit, written out: shift, add a half, truncate, shift back.
fn ref_round(amount: Decimal, minor_units: u32) -> Decimal {
    let scale = Decimal::from(10u64.pow(minor_units));
    ((amount * scale) + Decimal::new(5, 1)).floor() / scale
}

/// The total of a whole period on one plan: each line rounded and raised to its charge's
/// minimum, then the sum raised to the plan's minimum.
fn ref_total(plan: &Plan, usage: &BTreeMap<String, u64>) -> Decimal {
    let minor = plan.currency.minor_units();
    let mut total = Decimal::ZERO;
    for charge in &plan.charges {
        let units = usage_of(charge, usage);
        let line = ref_round(ref_charge(&charge.model, units), minor);
        let minimum = ref_round(charge.minimum.unwrap_or_default(), minor);
        total += line.max(minimum);
    }
    total.max(ref_round(plan.minimum.unwrap_or_default(), minor))
}

/// The billing cycle holding `t`, on paper: the hour, the day from midnight, the week from
/// Monday, the month from the 1st, the year from January 1, all in UTC, counted out on the
/// calendar.
fn ref_cycle(interval: BillingInterval, t: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let at = |y: i32, m: u32, d: u32, h: u32| Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap();
    let midnight = at(t.year(), t.month(), t.day(), 0);
    let next_month = |y: i32, m: u32| if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    match interval {
        BillingInterval::Hour => {
            let start = at(t.year(), t.month(), t.day(), t.hour());
            (start, start + TimeDelta::seconds(3_600))
        }
        BillingInterval::Day => (midnight, midnight + TimeDelta::seconds(86_400)),
        BillingInterval::Week => {
            let mut monday = midnight;
            while monday.weekday() != chrono::Weekday::Mon {
                monday -= TimeDelta::seconds(86_400);
            }
            (monday, monday + TimeDelta::seconds(7 * 86_400))
        }
        BillingInterval::Month => {
            let (y, m) = next_month(t.year(), t.month());
            (at(t.year(), t.month(), 1, 0), at(y, m, 1, 0))
        }
        BillingInterval::Year => (at(t.year(), 1, 1, 0), at(t.year() + 1, 1, 1, 0)),
        BillingInterval::PerInvoice => unreachable!("per-invoice plans have no cycle"),
    }
}

fn usage_of(charge: &Charge, usage: &BTreeMap<String, u64>) -> u64 {
    match (&charge.model, &charge.meter) {
        (ChargeModel::Flat { .. }, _) | (_, None) => 0,
        (_, Some(meter)) => usage.get(meter).copied().unwrap_or(0),
    }
}

// ---------------------------------------------------------------------------------------------
// Generators.

/// A price with up to four decimals, 0 to 10,000.
fn money() -> impl Strategy<Value = Decimal> {
    (0i64..=100_000_000, 0u32..=4)
        .prop_map(|(m, scale)| Decimal::new(m % 10i64.pow(4 + scale), scale))
}

/// 1 to 5 tiers with whole, strictly increasing bounds, the last unbounded.
fn tiers() -> impl Strategy<Value = Vec<Tier>> {
    let bounded = prop::collection::vec((1u64..=60, money(), prop::option::of(money())), 0..=4);
    (bounded, money(), prop::option::of(money())).prop_map(|(bounded, last_price, last_fee)| {
        let mut up_to = 0u64;
        let mut tiers: Vec<Tier> = bounded
            .into_iter()
            .map(|(gap, unit_price, flat_fee)| {
                up_to += gap;
                Tier {
                    up_to: Some(Decimal::from(up_to)),
                    unit_price,
                    flat_fee,
                }
            })
            .collect();
        tiers.push(Tier {
            up_to: None,
            unit_price: last_price,
            flat_fee: last_fee,
        });
        tiers
    })
}

fn model() -> impl Strategy<Value = ChargeModel> {
    prop_oneof![
        money().prop_map(|amount| ChargeModel::Flat { amount }),
        money().prop_map(|unit_price| ChargeModel::PerUnit { unit_price }),
        tiers().prop_map(|tiers| ChargeModel::Graduated { tiers }),
        tiers().prop_map(|tiers| ChargeModel::Volume { tiers }),
        (1u64..=50, money()).prop_map(|(size, package_price)| ChargeModel::Package {
            package_size: Decimal::from(size),
            package_price,
        }),
    ]
}

fn currency() -> impl Strategy<Value = Currency> {
    prop_oneof!["USD", "EUR", "JPY", "KWD", "CHF"].prop_map(|c| Currency::parse(&c).unwrap())
}

const METERS: [&str; 3] = ["tokens", "calls", "storage"];

fn interval() -> impl Strategy<Value = BillingInterval> {
    prop::sample::select(vec![
        BillingInterval::Hour,
        BillingInterval::Day,
        BillingInterval::Week,
        BillingInterval::Month,
        BillingInterval::Year,
        BillingInterval::PerInvoice,
    ])
}

/// 1 to 5 charges on three meters (so some charges share one), with optional minimums.
fn plan() -> impl Strategy<Value = Plan> {
    let charge = (model(), prop::option::of(money()), 0usize..3);
    (
        currency(),
        prop::collection::vec(charge, 1..=5),
        prop::option::of(money()),
        interval(),
    )
        .prop_map(|(currency, charges, minimum, billing_interval)| Plan {
            id: "plan".into(),
            version: 1,
            currency,
            billing_interval,
            charges: charges
                .into_iter()
                .enumerate()
                .map(|(i, (model, minimum, meter))| Charge {
                    id: format!("c{i}"),
                    meter: Some(METERS[meter].into()),
                    model,
                    minimum,
                })
                .collect(),
            minimum: minimum.map(|m| m * Decimal::from(10)),
        })
}

fn usage() -> impl Strategy<Value = BTreeMap<String, u64>> {
    prop::collection::btree_map(prop::sample::select(METERS.to_vec()), 0u64..=400, 0..=3)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// A period of 1 second to 92 days starting somewhere in 2026.
fn period() -> impl Strategy<Value = Period> {
    (0i64..365 * 86_400, 1i64..=92 * 86_400).prop_map(|(offset, length)| {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + TimeDelta::seconds(offset);
        Period::new(start, start + TimeDelta::seconds(length)).unwrap()
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn decimal_usage(usage: &BTreeMap<String, u64>) -> BTreeMap<String, Decimal> {
    usage
        .iter()
        .map(|(k, v)| (k.clone(), Decimal::from(*v)))
        .collect()
}

fn assigned(plan: &Plan, from: DateTime<Utc>) -> PlanAssignment {
    PlanAssignment {
        plan: plan.plan_ref(),
        effective_from: from,
    }
}

/// The billing cycle of `interval` holding `period`'s start (per invoice: `period` itself).
fn one_cycle(interval: BillingInterval, period: Period) -> Period {
    match interval {
        BillingInterval::PerInvoice => period,
        _ => {
            let (start, end) = ref_cycle(interval, period.start);
            Period::new(start, end).unwrap()
        }
    }
}

/// One whole billing cycle of `plan` holding `period`'s start, on that plan alone.
fn whole_period_invoice(
    plan: &Plan,
    period: Period,
    usage: &BTreeMap<String, u64>,
) -> InvoiceDraft {
    let period = one_cycle(plan.billing_interval, period);
    let usage = [SegmentUsage {
        period,
        usage: decimal_usage(usage),
    }];
    let from = period.start - TimeDelta::days(1);
    compute_invoice(
        std::slice::from_ref(plan),
        &[assigned(plan, from)],
        period,
        &usage,
    )
    .unwrap()
}

/// "p" v1: one flat fee, `minimum` both on the charge and on the plan.
fn flat_fee_plan(
    currency: Currency,
    billing_interval: BillingInterval,
    flat: Decimal,
    minimum: Option<Decimal>,
) -> Plan {
    Plan {
        id: "p".into(),
        version: 1,
        currency,
        billing_interval,
        charges: vec![Charge {
            id: "base".into(),
            meter: None,
            model: ChargeModel::Flat { amount: flat },
            minimum,
        }],
        minimum,
    }
}

fn amount(model: &ChargeModel, units: u64) -> Decimal {
    price_charge(model, Decimal::from(units)).unwrap().amount
}

// ---------------------------------------------------------------------------------------------
// Properties.

proptest! {
    #[test]
    fn every_model_agrees_with_the_reference(model in model(), units in 0u64..=400) {
        prop_assert_eq!(amount(&model, units), ref_charge(&model, units));
    }

    #[test]
    fn a_whole_invoice_agrees_with_the_reference(
        plan in plan(), period in period(), usage in usage()
    ) {
        let draft = whole_period_invoice(&plan, period, &usage);
        prop_assert_eq!(draft.total, ref_total(&plan, &usage));
        for (line, charge) in draft.lines.iter().zip(&plan.charges) {
            let expected = ref_round(ref_charge(&charge.model, usage_of(charge, &usage)),
                                     plan.currency.minor_units());
            prop_assert_eq!(line.amount, expected, "{}", line.description);
        }
    }

    #[test]
    fn amounts_are_non_negative_rounded_and_add_up(
        plan in plan(), period in period(), usage in usage()
    ) {
        let draft = whole_period_invoice(&plan, period, &usage);
        let minor = plan.currency.minor_units();
        let lines: Decimal = draft.lines.iter().map(|l| l.amount).sum();
        let adjustments: Decimal = draft.minimum_adjustments.iter().map(|a| a.amount).sum();
        prop_assert_eq!(draft.subtotal, lines);
        prop_assert_eq!(draft.total, lines + adjustments);
        for a in draft.lines.iter().map(|l| l.amount)
            .chain(draft.minimum_adjustments.iter().map(|a| a.amount))
            .chain([draft.subtotal, draft.total])
        {
            prop_assert!(a >= Decimal::ZERO);
            prop_assert_eq!(a.scale(), minor, "{} not at {} decimals", a, minor);
        }
        prop_assert!(draft.minimum_adjustments.iter().all(|a| a.amount > Decimal::ZERO));
    }

    #[test]
    fn graduated_is_bounded_by_its_dearest_tier_and_never_decreases(
        tiers in tiers(), units in 0u64..=400
    ) {
        let graduated = ChargeModel::Graduated { tiers: tiers.clone() };
        let max_price = tiers.iter().map(|t| t.unit_price).max().unwrap();
        let min_price = tiers.iter().map(|t| t.unit_price).min().unwrap();
        let fees: Decimal = tiers.iter().map(|t| t.flat_fee.unwrap_or_default()).sum();
        let price = amount(&graduated, units);
        let units_d = Decimal::from(units);
        prop_assert!(price <= max_price * units_d + fees);
        prop_assert!(price >= min_price * units_d);
        prop_assert!(amount(&graduated, units + 1) >= price);
    }

    #[test]
    fn one_tier_makes_graduated_volume_and_per_unit_agree(
        unit_price in money(), fee in prop::option::of(money()), units in 0u64..=10_000
    ) {
        let tiers = vec![Tier { up_to: None, unit_price, flat_fee: fee }];
        let graduated = amount(&ChargeModel::Graduated { tiers: tiers.clone() }, units);
        let volume = amount(&ChargeModel::Volume { tiers }, units);
        let per_unit = amount(&ChargeModel::PerUnit { unit_price }, units);
        let fee = if units > 0 { fee.unwrap_or_default() } else { Decimal::ZERO };
        prop_assert_eq!(graduated, volume);
        prop_assert_eq!(graduated, per_unit + fee);
    }

    #[test]
    fn fractional_quantities_sit_between_their_whole_neighbours(
        model in model(), units in 0u64..400, tenths in 1u32..10
    ) {
        // Every model here is non-decreasing in the quantity except volume, whose price per
        // unit may drop at a bound; for volume, compare with the tier of the quantity instead.
        let q = Decimal::from(units) + Decimal::new(tenths.into(), 1);
        let priced = price_charge(&model, q).unwrap().amount;
        match &model {
            ChargeModel::Volume { tiers } => {
                let tier = &tiers[tier_of(tiers, q)];
                prop_assert_eq!(priced, q * tier.unit_price + tier.flat_fee.unwrap_or_default());
            }
            _ => {
                prop_assert!(amount(&model, units) <= priced);
                prop_assert!(priced <= amount(&model, units + 1));
            }
        }
    }

    #[test]
    fn a_whole_period_is_not_prorated(
        flat in money(), currency in currency(), period in period(), before in 0i64..=86_400 * 400,
        interval in interval(),
    ) {
        let period = one_cycle(interval, period);
        let plan = flat_fee_plan(currency, interval, flat, Some(flat));
        // Assigned exactly at the start of the period or any time before.
        let from = period.start - TimeDelta::seconds(before);
        let usage = [SegmentUsage { period, usage: BTreeMap::new() }];
        let draft = compute_invoice(std::slice::from_ref(&plan), &[assigned(&plan, from)], period, &usage)
            .unwrap();
        prop_assert_eq!(draft.lines.len(), 1);
        prop_assert_eq!(draft.lines[0].proration, None);
        prop_assert_eq!(draft.lines[0].amount, ref_round(flat, currency.minor_units()));
        // The minimums equal the fee, so nothing is topped up.
        prop_assert!(draft.minimum_adjustments.is_empty());
        prop_assert_eq!(draft.total, ref_round(flat, currency.minor_units()));
    }

    #[test]
    fn splitting_a_period_between_equal_versions_keeps_per_unit_charges(
        prices in prop::collection::vec((0i64..=100_000, 0usize..3), 1..=4),
        flat in money(),
        period in period(),
        cut in 0.0f64..1.0,
        usage in usage(),
        share_before in prop::collection::vec(0.0f64..=1.0, 3),
        interval in interval(),
    ) {
        let period = one_cycle(interval, period);
        // Versions 1 and 2 list the same prices, in cents so that no line needs rounding.
        let charges: Vec<Charge> = prices.iter().enumerate().map(|(i, (cents, meter))| Charge {
            id: format!("c{i}"),
            meter: Some(METERS[*meter].into()),
            model: ChargeModel::PerUnit { unit_price: Decimal::new(*cents, 2) },
            minimum: None,
        }).chain([Charge { id: "base".into(), meter: None,
                           model: ChargeModel::Flat { amount: flat }, minimum: None }])
          .collect();
        let v1 = Plan { id: "p".into(), version: 1, currency: Currency::parse("USD").unwrap(),
                        billing_interval: interval, charges, minimum: None };
        let v2 = Plan { version: 2, ..v1.clone() };
        let length = (period.end - period.start).num_seconds();
        prop_assume!(length >= 2);
        let at = period.start + TimeDelta::seconds(1 + ((length - 2) as f64 * cut) as i64);
        let history = [assigned(&v1, period.start), assigned(&v2, at)];
        let segs = segments(&history, period).unwrap();
        prop_assert_eq!(segs.len(), 2);
        prop_assert_eq!((segs[0].period.end, segs[1].period.start), (at, at));

        // Each meter's usage split somewhere between the two segments.
        let mut first = BTreeMap::new();
        let mut second = BTreeMap::new();
        for (i, meter) in METERS.iter().enumerate() {
            let total = usage.get(*meter).copied().unwrap_or(0);
            let before = (total as f64 * share_before[i]) as u64;
            first.insert(meter.to_string(), Decimal::from(before));
            second.insert(meter.to_string(), Decimal::from(total - before));
        }
        let split = compute_invoice(&[v1.clone(), v2], &history, period, &[
            SegmentUsage { period: segs[0].period, usage: first },
            SegmentUsage { period: segs[1].period, usage: second },
        ]).unwrap();
        let whole = whole_period_invoice(&v1, period, &usage);

        let per_charge = |draft: &InvoiceDraft, id: &str| -> Decimal {
            draft.lines.iter().filter(|l| l.charge_id == id).map(|l| l.amount).sum()
        };
        for charge in v1.charges.iter().filter(|c| c.id != "base") {
            prop_assert_eq!(per_charge(&split, &charge.id), per_charge(&whole, &charge.id));
        }
        // The flat fee is prorated into two rounded halves: within a cent of the whole.
        let halves = per_charge(&split, "base");
        prop_assert!((halves - per_charge(&whole, "base")).abs() <= Decimal::new(1, 2),
                     "{} vs {}", halves, per_charge(&whole, "base"));
        let shares: Decimal = split.lines.iter().filter_map(|l| l.proration).sum();
        prop_assert!((shares - Decimal::ONE).abs() < Decimal::new(1, 20));
    }

    #[test]
    fn a_part_of_a_cycle_pays_its_share_and_one_crossing_cycles_is_refused(
        interval in interval().prop_filter("has cycles", |i| *i != BillingInterval::PerInvoice),
        flat in money(), currency in currency(), period in period(),
        from in 0.0f64..1.0, part in 0.0f64..=1.0,
    ) {
        let plan = flat_fee_plan(currency, interval, flat, None);
        let (cycle_start, cycle_end) = ref_cycle(interval, period.start);
        let whole = (cycle_end - cycle_start).num_seconds();
        let start = cycle_start + TimeDelta::seconds(((whole - 1) as f64 * from) as i64);
        let room = (cycle_end - start).num_seconds();
        let seconds = 1 + ((room - 1) as f64 * part) as i64;
        let price = |seconds: i64| {
            let period = Period::new(start, start + TimeDelta::seconds(seconds)).unwrap();
            let usage = [SegmentUsage { period, usage: BTreeMap::new() }];
            compute_invoice(std::slice::from_ref(&plan), &[assigned(&plan, start)], period, &usage)
        };
        let draft = price(seconds).unwrap();
        let share = Decimal::from(seconds) / Decimal::from(whole);
        prop_assert_eq!(draft.total,
                        ref_round(flat * Decimal::from(seconds) / Decimal::from(whole),
                                  currency.minor_units()));
        prop_assert_eq!(draft.lines[0].proration, (seconds != whole).then_some(share));
        let refused = matches!(price(room + 1),
                               Err(PricingError::CrossesBillingCycle { boundary, .. })
                                   if boundary == cycle_end);
        prop_assert!(refused, "a period one second into the next cycle was priced");
    }

    #[test]
    fn segments_tile_the_covered_part_of_the_period(
        period in period(),
        changes in prop::collection::vec((-30i64 * 86_400..120 * 86_400, 1u32..=3), 1..=6),
    ) {
        let history: Vec<PlanAssignment> = changes.iter().map(|(offset, version)| PlanAssignment {
            plan: PlanRef { id: "p".into(), version: *version },
            effective_from: period.start + TimeDelta::seconds(*offset),
        }).collect();
        let first = history.iter().map(|a| a.effective_from).min().unwrap();
        let distinct: BTreeSet<_> = history.iter().map(|a| a.effective_from).collect();
        match segments(&history, period) {
            Ok(segs) => {
                prop_assert_eq!(segs[0].period.start, first.max(period.start));
                prop_assert_eq!(segs.last().unwrap().period.end, period.end);
                for pair in segs.windows(2) {
                    prop_assert_eq!(pair[0].period.end, pair[1].period.start);
                    prop_assert!(pair[0].plan != pair[1].plan, "equal neighbours merge");
                }
                prop_assert!(segs.iter().all(|s| s.period.start < s.period.end));
            }
            Err(e) => prop_assert!(
                first >= period.end || distinct.len() < history.len(),
                "unexpected {e}"
            ),
        }
    }

    #[test]
    fn drafts_are_deterministic_and_round_trip_through_json(
        plan in plan(), period in period(), usage in usage()
    ) {
        let a = whole_period_invoice(&plan, period, &usage);
        let b = whole_period_invoice(&plan, period, &usage);
        prop_assert_eq!(&a, &b);
        let json = serde_json::to_string(&a).unwrap();
        let back: InvoiceDraft = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &a);
        prop_assert_eq!(serde_json::to_string(&back).unwrap(), json);
        let plan_json = serde_json::to_string(&plan).unwrap();
        prop_assert_eq!(serde_json::from_str::<Plan>(&plan_json).unwrap(), plan);
    }
}

#[test]
fn the_reference_itself_on_a_hand_example() {
    // Tiers up to 2 at 1.00 (fee 0.50), up to 5 at 0.50, then 0.10: 7 units cost
    // 2 × 1.00 + 0.50 + 3 × 0.50 + 2 × 0.10 = 4.20 graduated, and 7 × 0.10 = 0.70 volume.
    let tiers = vec![
        Tier {
            up_to: Some(Decimal::from(2)),
            unit_price: Decimal::ONE,
            flat_fee: Some(Decimal::new(5, 1)),
        },
        Tier {
            up_to: Some(Decimal::from(5)),
            unit_price: Decimal::new(5, 1),
            flat_fee: None,
        },
        Tier {
            up_to: None,
            unit_price: Decimal::new(1, 1),
            flat_fee: None,
        },
    ];
    assert_eq!(ref_graduated(&tiers, 7), Decimal::new(420, 2));
    assert_eq!(ref_volume(&tiers, 7), Decimal::new(70, 2));
    assert_eq!(ref_package(3, Decimal::ONE, 7), Decimal::from(3));
    assert_eq!(ref_round(Decimal::new(125, 3), 2), Decimal::new(13, 2));
    assert_eq!(
        amount(
            &ChargeModel::Graduated {
                tiers: tiers.clone()
            },
            7
        ),
        Decimal::new(420, 2)
    );
}
