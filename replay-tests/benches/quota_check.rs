//! The quota check in process: `QuotaBook::check` with a million distinct subscriptions loaded
//! (the goal: p99 under 2 µs), no gRPC, no I/O.
//!
//! 1. load: BENCH_SUBSCRIPTIONS (1,000,000) subscriptions, each with a monthly metered quota on
//!    `llm.tokens`; every 4th also one on `agent.execution`, every 16th a grant. Timed as
//!    `apply` of the prepared events, then one usage event per quota through `apply_usage`.
//! 2. the clock: back-to-back `Instant::now()` pairs, the overhead inside every figure below.
//! 3. BENCH_CHECKS (5,000,000) checks on keys drawn uniformly at random (so nearly every one
//!    misses the CPU caches, as with live traffic over a million subscriptions), each timed
//!    alone with `Instant`: p50/p99/p99.9/max, clock overhead included. Next to them, in the
//!    same run and on the same keys, the raw lookups the book is built on: a foldhash
//!    `HashMap<Box<str>, u64>` and std's SipHash one.
//! 4. the same checks timed in batches of 1,000 (clock overhead amortized): the mean per
//!    check of each batch, p50/p99, and the throughput of one core.
//!
//! The instants are fixed (mid-June 2026), so no period rolls over while it runs.
//!
//! On a VM most of a check's time is TLB misses (page walks), not the cache misses themselves:
//! run with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc 2.35+, transparent huge pages in
//! `madvise` mode) to back the heap with huge pages, as a production gateway would; the bench
//! prints how much of its heap they back.
//! `cargo bench -p creto-replay-tests --bench quota_check`
use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use creto_domain::metering::quota::{
    GrantAdded, Period, PeriodKind, Quantity, QuotaBook, QuotaEvent, QuotaSet,
};

const METERS: [&str; 2] = ["llm.tokens", "agent.execution"];
const BATCH: usize = 1_000;
const GOAL: Duration = Duration::from_micros(2);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace(['_', ','], "").parse().ok())
        .unwrap_or(default)
}

fn instant(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// SplitMix64: a tiny deterministic generator, so every run checks the same keys.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Subscription ids shaped like real ones: a prefix and 16 hex digits, no shared ordering.
fn subscription_ids(n: usize) -> Vec<String> {
    let mut rng = SplitMix(1);
    (0..n).map(|_| format!("sub_{:016x}", rng.next())).collect()
}

/// Whether subscription `i` has a quota on `METERS[m]`.
fn has(i: usize, m: usize) -> bool {
    m == 0 || i.is_multiple_of(4)
}

fn events(ids: &[String], loaded_at: DateTime<Utc>) -> Vec<QuotaEvent> {
    let period = Period::new(
        PeriodKind::CalendarMonth,
        instant("2026-01-01T00:00:00Z"),
        "Europe/Paris".parse::<Tz>().unwrap(),
    );
    let mut out = Vec::with_capacity(ids.len() * 3 / 2);
    for (i, id) in ids.iter().enumerate() {
        for (m, meter) in METERS.iter().enumerate().filter(|(m, _)| has(i, *m)) {
            out.push(QuotaEvent::QuotaSet(QuotaSet {
                subscription_id: id.clone(),
                meter: meter.to_string(),
                limit: Quantity::units(1_000 + (i % 1_000) as i64),
                period,
                hard: i.is_multiple_of(2),
                thresholds_pct: vec![80, 100],
            }));
            if m == 0 && i.is_multiple_of(16) {
                out.push(QuotaEvent::GrantAdded(GrantAdded {
                    subscription_id: id.clone(),
                    meter: meter.to_string(),
                    grant_id: format!("grant-{i}"),
                    amount: Quantity::units(500),
                    priority: 1,
                    effective_from: loaded_at - chrono::Duration::days(1),
                    expires_at: Some(loaded_at + chrono::Duration::days(30)),
                }));
            }
        }
    }
    out
}

/// The key of each check: (subscription index, meter index), uniformly over all quotas.
fn keys(ids: usize, n: usize) -> Vec<(u32, u8)> {
    let mut rng = SplitMix(42);
    (0..n)
        .map(|_| {
            let i = rng.below(ids);
            let m = if has(i, 1) { rng.below(2) } else { 0 };
            (i as u32, m as u8)
        })
        .collect()
}

/// Quantiles of nanosecond samples: p50, p99, p99.9, max.
fn quantiles(mut ns: Vec<u32>) -> [u32; 4] {
    ns.sort_unstable();
    let q = |p: f64| ns[((ns.len() as f64 * p).ceil() as usize).clamp(1, ns.len()) - 1];
    [q(0.50), q(0.99), q(0.999), *ns.last().unwrap()]
}

fn summary(ns: Vec<u32>) -> String {
    let [p50, p99, p999, max] = quantiles(ns);
    format!("p50 {p50:>5} ns  p99 {p99:>5} ns  p99.9 {p999:>6} ns  max {max:>8} ns")
}

/// Times `f` once per key, each call alone; the clock's overhead is inside every sample. The
/// subscription id is first copied into a buffer, untimed: a request's id is in the cache
/// after decoding, whereas `ids[i]` would add two misses of the bench's own to every sample.
fn timed_each(ids: &[String], keys: &[(u32, u8)], mut f: impl FnMut(&str, u8)) -> Vec<u32> {
    let mut key = String::with_capacity(64);
    let mut samples = Vec::with_capacity(keys.len());
    for &(i, m) in keys {
        key.clear();
        key.push_str(&ids[i as usize]);
        let started = Instant::now();
        f(&key, m);
        samples.push(started.elapsed().as_nanos() as u32);
    }
    samples
}

/// Times `f` over batches of keys, staged as in `timed_each`: the mean per call of each batch,
/// and the time of all batches.
fn timed_batches(
    ids: &[String],
    keys: &[(u32, u8)],
    mut f: impl FnMut(&str, u8),
) -> (Vec<u32>, Duration) {
    let mut staged: Vec<(String, u8)> =
        (0..BATCH).map(|_| (String::with_capacity(64), 0)).collect();
    let mut total = Duration::ZERO;
    let means = keys
        .chunks(BATCH)
        .map(|chunk| {
            for (slot, &(i, m)) in staged.iter_mut().zip(chunk) {
                slot.0.clear();
                slot.0.push_str(&ids[i as usize]);
                slot.1 = m;
            }
            let started = Instant::now();
            for (key, m) in &staged[..chunk.len()] {
                f(key, *m);
            }
            let took = started.elapsed();
            total += took;
            (took.as_nanos() / chunk.len() as u128) as u32
        })
        .collect();
    (means, total)
}

/// A `kB` figure of a /proc file of this process, in MB.
fn proc_mb(file: &str, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/self/{file}")).ok()?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn resident_mb() -> Option<f64> {
    proc_mb("status", "VmRSS:")
}

fn main() {
    let n = env_usize("BENCH_SUBSCRIPTIONS", 1_000_000);
    let n_checks = env_usize("BENCH_CHECKS", 5_000_000);
    let now = instant("2026-06-15T12:00:00Z");
    let ids = subscription_ids(n);
    let events = events(&ids, now);
    let n_events = events.len();
    let rss_before = resident_mb();

    // 1. Load.
    let mut book = QuotaBook::with_capacity(n);
    let started = Instant::now();
    for e in &events {
        book.apply(e, now);
    }
    let loaded = started.elapsed();
    assert_eq!(book.len(), n);
    let mut rng = SplitMix(7);
    let mut usage_events = 0;
    let started = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        for (_, meter) in METERS.iter().enumerate().filter(|(m, _)| has(i, *m)) {
            let quantity = Quantity::units(rng.below(1_200) as i64);
            black_box(book.apply_usage(id, meter, quantity, now));
            usage_events += 1;
        }
    }
    let usage_applied = started.elapsed();
    let rss_after = resident_mb();
    drop(events);

    let keys = keys(n, n_checks);
    let at = now + chrono::Duration::seconds(1);
    let quantity = Quantity::units(10);
    let check = |id: &str, m: u8| {
        black_box(book.check(id, METERS[m as usize], quantity, at));
    };
    // Warm-up: page in the book and let the CPU settle.
    for &(i, m) in keys.iter().take(200_000) {
        check(&ids[i as usize], m);
    }

    // 2. The clock.
    let clock: Vec<u32> = (0..1_000_000)
        .map(|_| {
            let started = Instant::now();
            black_box(started.elapsed().as_nanos() as u32)
        })
        .collect();

    // 3. Each check timed alone, next to the raw maps.
    let raw_fold: HashMap<Box<str>, u64, foldhash::fast::RandomState> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str().into(), i as u64))
        .collect();
    let raw_std: HashMap<Box<str>, u64> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str().into(), i as u64))
        .collect();
    let raw_fold_ns = timed_each(&ids, &keys, |id, _| {
        black_box(raw_fold.get(id));
    });
    let raw_std_ns = timed_each(&ids, &keys, |id, _| {
        black_box(raw_std.get(id));
    });
    let check_ns = timed_each(&ids, &keys, check);
    let p99 = quantiles(check_ns.clone())[1];
    let allowed = keys
        .iter()
        .take(100_000)
        .filter(|&&(i, m)| {
            book.check(&ids[i as usize], METERS[m as usize], quantity, at)
                .unwrap()
                .allowed
        })
        .count();

    // 4. Batches.
    let (batch_ns, all_batches) = timed_batches(&ids, &keys, check);

    println!(
        "quota check in process: {n} subscriptions, {} quotas ({} grants), {} checks on random keys ({:.1}% allowed)",
        usage_events,
        n.div_ceil(16),
        keys.len(),
        allowed as f64 / 1_000.0
    );
    println!(
        "load    {} events applied in {:.2} s: {:>9.0} events/s ({:.0} subscriptions/s) | usage {} events in {:.2} s: {:>9.0} events/s",
        n_events,
        loaded.as_secs_f64(),
        n_events as f64 / loaded.as_secs_f64(),
        n as f64 / loaded.as_secs_f64(),
        usage_events,
        usage_applied.as_secs_f64(),
        usage_events as f64 / usage_applied.as_secs_f64()
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        println!(
            "memory  the book holds {:.0} MB resident ({:.0} bytes per subscription); huge pages back {:.0} MB of the process",
            after - before,
            (after - before) * 1024.0 * 1024.0 / n as f64,
            proc_mb("smaps_rollup", "AnonHugePages:").unwrap_or(0.0)
        );
    }
    println!(
        "clock   Instant::now() pair                 {}",
        summary(clock)
    );
    println!(
        "raw     foldhash HashMap<Box<str>,u64>::get {}",
        summary(raw_fold_ns)
    );
    println!(
        "raw     std (SipHash) HashMap::get          {}",
        summary(raw_std_ns)
    );
    println!(
        "check   QuotaBook::check, each timed        {}",
        summary(check_ns)
    );
    let [b50, b99, _, bmax] = quantiles(batch_ns);
    println!(
        "check   in batches of {BATCH}, mean per check  p50 {b50:>5} ns  p99 {b99:>5} ns  max {bmax:>6} ns | {:.1} M checks/s on one core",
        keys.len() as f64 / all_batches.as_secs_f64() / 1e6
    );
    println!(
        "goal    p99 < {} ns for the check itself: {} (p99 {p99} ns, clock overhead included)",
        GOAL.as_nanos(),
        if u128::from(p99) < GOAL.as_nanos() {
            "met"
        } else {
            "MISSED"
        }
    );
}
