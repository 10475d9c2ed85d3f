//! Speculation that never loses. Whatever the cost model predicts, the runtime compares what
//! steps actually deliver, in tokens per second of wall time (the drafting waited for
//! included), with drafts and without, per batch-size bucket. Where drafting delivers less
//! than plain decoding, steps run plain, and now and then a step drafts again to see whether
//! that still holds: after `FIRST_RECHECK` steps, then twice as long each time drafting still
//! loses (up to `LAST_RECHECK`), because a recheck costs most where drafting loses most (a
//! batch of 8 verifying 5 tokens each on a compute-bound CPU pays nearly 5 steps). At worst
//! a few percent below plain decoding, at best the gain the draft-length policy finds.

/// Batch-size buckets: 1, 2, 3–4, 5–8, …, 65 and more.
const BUCKETS: usize = 8;
/// Weight of the past at each new step of a bucket.
const FORGET: f64 = 0.9;
/// Steps measured (decayed) before a rate is trusted.
const MIN_WEIGHT: f64 = 3.0;
/// While drafting loses at a batch size, the steps held plain before it is tried again: the
/// first time, and at most.
const FIRST_RECHECK: u32 = 32;
const LAST_RECHECK: u32 = 1024;

/// Decayed totals of tokens delivered and the seconds they took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Delivery {
    tokens: f64,
    seconds: f64,
    weight: f64,
}

impl Delivery {
    fn record(&mut self, tokens: f64, seconds: f64) {
        self.tokens = FORGET * self.tokens + tokens;
        self.seconds = FORGET * self.seconds + seconds;
        self.weight = FORGET * self.weight + 1.0;
    }

    fn per_second(&self) -> Option<f64> {
        (self.weight >= MIN_WEIGHT && self.seconds > 0.0).then(|| self.tokens / self.seconds)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecGuard {
    plain: [Delivery; BUCKETS],
    drafting: [Delivery; BUCKETS],
    /// Steps held plain since drafting last ran, per bucket.
    held: [u32; BUCKETS],
    /// The steps to hold plain before the next recheck, per bucket (0: `FIRST_RECHECK`).
    next_recheck: [u32; BUCKETS],
}

fn bucket(rows: usize) -> usize {
    (rows.max(1).next_power_of_two().ilog2() as usize).min(BUCKETS - 1)
}

impl SpecGuard {
    /// A decoding step of `rows` rows, with drafts or without, delivered `tokens` tokens in
    /// `seconds` (its forward and the drafting it waited for).
    pub fn record(&mut self, rows: usize, drafted: bool, tokens: usize, seconds: f64) {
        let b = bucket(rows);
        let side = if drafted { &mut self.drafting[b] } else { &mut self.plain[b] };
        side.record(tokens as f64, seconds);
    }

    /// Whether a step of `rows` rows may carry drafts: yes unless drafting has delivered
    /// fewer tokens per second than plain steps at this batch size, and then only to recheck.
    pub fn allows(&mut self, rows: usize) -> bool {
        let b = bucket(rows);
        let losing = matches!(
            (self.drafting[b].per_second(), self.plain[b].per_second()),
            (Some(drafting), Some(plain)) if drafting < plain
        );
        if !losing {
            (self.held[b], self.next_recheck[b]) = (0, 0);
            return true;
        }
        let wait = self.next_recheck[b].max(FIRST_RECHECK);
        self.held[b] += 1;
        if self.held[b] < wait {
            return false;
        }
        (self.held[b], self.next_recheck[b]) = (0, (2 * wait).min(LAST_RECHECK));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(rows: usize, plain_rate: f64, drafting_rate: f64) -> SpecGuard {
        let mut g = SpecGuard::default();
        for _ in 0..10 {
            g.record(rows, false, rows, rows as f64 / plain_rate);
            g.record(rows, true, 3 * rows, 3.0 * rows as f64 / drafting_rate);
        }
        g
    }

    #[test]
    fn drafting_that_delivers_less_runs_only_to_recheck() {
        let mut g = measured(8, 850.0, 540.0);
        let rechecks: Vec<u32> = (1..=20 * FIRST_RECHECK).filter(|_| g.allows(8)).collect();
        let first = FIRST_RECHECK;
        // Each recheck that still loses doubles the wait for the next.
        assert_eq!(rechecks, [first, 3 * first, 7 * first, 15 * first]);
        // Other batch sizes keep their own record.
        assert!((0..5).all(|_| g.allows(1)));
    }

    #[test]
    fn drafting_that_delivers_more_or_is_unmeasured_runs() {
        let mut g = measured(1, 143.0, 193.0);
        assert!((0..100).all(|_| g.allows(1)));
        let mut fresh = SpecGuard::default();
        fresh.record(4, false, 4, 0.01);
        assert!((0..100).all(|_| fresh.allows(4)), "no drafting measured yet");
    }

    #[test]
    fn a_recheck_that_now_wins_lets_drafting_back() {
        let mut g = measured(8, 850.0, 540.0);
        assert!(!g.allows(8));
        for _ in 0..30 {
            g.record(8, true, 24, 24.0 / 1200.0);
        }
        assert!((0..10).all(|_| g.allows(8)));
    }
}
