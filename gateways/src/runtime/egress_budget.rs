//! How many of a sandbox's egress decisions become events of their own. Code in a sandbox
//! can try connections as fast as it likes (a `connect()` loop, a port scan); one event per
//! attempt would let one sandbox flood the RUNTIME stream, and with it every tenant's runtime
//! projection and the disk. Each sandbox gets a burst, then a steady rate; past it, attempts
//! are counted and one summary per second and outcome records how many there were, so the
//! audit still accounts for every attempt (as does `runtime_egress_checks_total`).
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Decisions a sandbox may have recorded one by one at once.
pub const BURST: f64 = 100.0;
/// ... and per second after that.
pub const PER_SECOND: f64 = 20.0;
/// How often held attempts are summarized.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(1);

struct Budget {
    tokens: f64,
    refilled_at: Instant,
    /// Attempts held for the next summary: denied, allowed.
    held: [u64; 2],
}

impl Budget {
    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * PER_SECOND).min(BURST);
        self.refilled_at = now;
    }
}

#[derive(Default)]
pub struct Budgets {
    sandboxes: HashMap<String, Budget>,
}

/// A summary to record: the sandbox, the outcome, how many attempts.
pub type Summary = (String, bool, u64);

impl Budgets {
    /// Whether this attempt is recorded as an event of its own; if not, it is held for the
    /// next summary.
    pub fn admit(&mut self, sandbox: &str, allowed: bool, now: Instant) -> bool {
        let budget = self.sandboxes.entry(sandbox.to_string()).or_insert(Budget {
            tokens: BURST,
            refilled_at: now,
            held: [0, 0],
        });
        budget.refill(now);
        if budget.tokens >= 1.0 {
            budget.tokens -= 1.0;
            true
        } else {
            budget.held[usize::from(allowed)] += 1;
            false
        }
    }

    /// Holds `attempts` more of `sandbox`'s decisions for its next summary (ones admitted, or
    /// summarized, that could not be queued for recording).
    pub fn hold(&mut self, sandbox: &str, allowed: bool, attempts: u64) {
        // A sandbox forgotten with its budget whole gets it whole again.
        let budget = self.sandboxes.entry(sandbox.to_string()).or_insert(Budget {
            tokens: BURST,
            refilled_at: Instant::now(),
            held: [0, 0],
        });
        budget.held[usize::from(allowed)] += attempts;
    }

    /// The summaries of every attempt held so far (emptied), and forgets the sandboxes whose
    /// budget is whole again.
    pub fn summaries(&mut self, now: Instant) -> Vec<Summary> {
        let mut out = Vec::new();
        self.sandboxes.retain(|sandbox, budget| {
            for (outcome, held) in budget.held.iter_mut().enumerate() {
                if *held > 0 {
                    out.push((sandbox.clone(), outcome == 1, std::mem::take(held)));
                }
            }
            budget.refill(now);
            budget.tokens < BURST
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_a_rate_then_summaries_that_count_everything() {
        let mut b = Budgets::default();
        let t0 = Instant::now();
        let admitted = (0..1_000).filter(|_| b.admit("sb1", false, t0)).count();
        assert_eq!(admitted, BURST as usize);
        // Another sandbox has its own budget.
        assert!(b.admit("sb2", true, t0));
        let summaries = b.summaries(t0);
        assert_eq!(summaries, vec![("sb1".to_string(), false, 900)]);
        // Held attempts are summarized once.
        assert!(b.summaries(t0).is_empty());
        // A second later, 20 more are recorded one by one.
        let t1 = t0 + Duration::from_secs(1);
        let admitted = (0..50).filter(|_| b.admit("sb1", true, t1)).count();
        assert_eq!(admitted, PER_SECOND as usize);
        assert_eq!(b.summaries(t1), vec![("sb1".to_string(), true, 30)]);
        // Idle long enough to be whole again: forgotten.
        b.summaries(t1 + Duration::from_secs(60));
        assert!(b.sandboxes.is_empty());
    }
}
