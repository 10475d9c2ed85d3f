//! Speculation that never loses. Whatever the cost model predicts, the runtime compares what
//! steps actually deliver, in tokens per second of wall time (the drafting waited for
//! included), with drafts and without, per batch-size bucket. Where drafting delivers less
//! than plain decoding, steps run plain, and now and then a step drafts again to see whether
//! that still holds: after `FIRST_RECHECK` steps, then twice as long each time drafting still
//! loses (up to `LAST_RECHECK`), because a recheck costs most where drafting loses most (a
//! batch of 8 verifying 5 tokens each on a compute-bound CPU pays nearly 5 steps). At worst
//! a few percent below plain decoding, at best the gain the draft-length policy finds.
//!
//! Learning is what costs: every drafting step taken while drafting loses is paid in full
//! (on a compute-bound CPU a batch of 8 verifying 5 tokens a row takes 3–4 plain steps).
//! So a gap wider than `WIDE_GAP` is trusted once each side has seen 8 rows (one step at
//! batch 8), and a batch size not yet measured follows the nearest smaller one measured:
//! drafting pays less as the batch grows (verifying drafts adds work the batch already keeps
//! the hardware busy with), so where it loses at a smaller batch it starts held off, and its
//! first recheck decides. Only decoding steps are measured; a step that carries a prompt
//! chunk drafts only where drafting is known to pay.

/// Batch-size buckets: 1, 2, 3–4, 5–8, …, 65 and more.
const BUCKETS: usize = 8;
/// Weight of the past at each new step of a bucket.
const FORGET: f64 = 0.9;
/// Steps measured (decayed) before a rate is trusted.
const MIN_WEIGHT: f64 = 3.0;
/// A ratio of delivered rates this far from 1 is trusted early: once each side has seen
/// `WIDE_GAP_ROWS` rows (one step of 8 rows; 8 steps of one, whose drafts are all accepted
/// or all rejected at once, so one step alone says little).
const WIDE_GAP: f64 = 1.5;
const WIDE_GAP_ROWS: f64 = 8.0;
/// While drafting loses at a batch size, the steps held plain before it is tried again: the
/// first time, and at most.
const FIRST_RECHECK: u32 = 32;
const LAST_RECHECK: u32 = 1024;

/// Decayed totals of tokens delivered, the seconds they took, steps and rows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Delivery {
    tokens: f64,
    seconds: f64,
    weight: f64,
    rows: f64,
}

impl Delivery {
    fn record(&mut self, rows: usize, tokens: f64, seconds: f64) {
        self.tokens = FORGET * self.tokens + tokens;
        self.seconds = FORGET * self.seconds + seconds;
        self.weight = FORGET * self.weight + 1.0;
        self.rows = FORGET * self.rows + rows as f64;
    }

    fn per_second(&self) -> Option<f64> {
        (self.weight > 0.0 && self.seconds > 0.0).then(|| self.tokens / self.seconds)
    }

    fn trusted(&self) -> bool {
        self.weight >= MIN_WEIGHT
    }
}

/// Whether drafting loses against plain decoding by these measurements: None until both
/// sides are trusted, or enough rows of each show a gap wider than `WIDE_GAP`.
fn verdict(drafting: &Delivery, plain: &Delivery) -> Option<bool> {
    let (d, p) = (drafting.per_second()?, plain.per_second()?);
    if drafting.trusted() && plain.trusted() {
        return Some(d < p);
    }
    let seen = drafting.rows.min(plain.rows) >= WIDE_GAP_ROWS;
    (seen && (d * WIDE_GAP < p || d > p * WIDE_GAP)).then_some(d < p)
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
        side.record(rows, tokens as f64, seconds);
    }

    /// Whether a step of `rows` rows may carry drafts. A decoding step: yes unless drafting
    /// loses at this batch size, and then only to recheck now and then. A step with a prompt
    /// chunk is never measured (the chunk's time would be taken for the drafts'), so it
    /// drafts only where drafting is known to pay: otherwise what it cost would never show.
    pub fn allows(&mut self, rows: usize, step: StepKind) -> bool {
        let b = bucket(rows);
        let losing = self.losing(b);
        if losing == Some(false) || (losing.is_none() && step == StepKind::Decode) {
            (self.held[b], self.next_recheck[b]) = (0, 0);
            return true;
        }
        if losing.is_none() {
            return false;
        }
        let wait = self.next_recheck[b].max(FIRST_RECHECK);
        self.held[b] = self.held[b].saturating_add(1);
        // A recheck waits for a step that measures it.
        if self.held[b] < wait || step == StepKind::Mixed {
            return false;
        }
        (self.held[b], self.next_recheck[b]) = (0, (2 * wait).min(LAST_RECHECK));
        true
    }

    /// Whether drafting loses in bucket `b` by its own measurements; until it has them, yes
    /// where it lost at the nearest smaller bucket measured, else unknown.
    fn losing(&self, b: usize) -> Option<bool> {
        let own = |i: usize| verdict(&self.drafting[i], &self.plain[i]);
        own(b).or_else(|| (0..b).rev().find_map(own).filter(|&lost| lost))
    }
}

/// What a step carries, for the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Decoding rows only: the guard measures it.
    Decode,
    /// A prompt chunk too.
    Mixed,
}

#[cfg(test)]
mod tests {
    use super::*;

    impl SpecGuard {
        fn allows_decode(&mut self, rows: usize) -> bool {
            self.allows(rows, StepKind::Decode)
        }
    }

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
        let rechecks: Vec<u32> = (1..=20 * FIRST_RECHECK).filter(|_| g.allows_decode(8)).collect();
        let first = FIRST_RECHECK;
        // Each recheck that still loses doubles the wait for the next.
        assert_eq!(rechecks, [first, 3 * first, 7 * first, 15 * first]);
        // Other batch sizes keep their own record.
        assert!((0..5).all(|_| g.allows_decode(1)));
    }

    #[test]
    fn drafting_that_delivers_more_or_is_unmeasured_runs() {
        let mut g = measured(1, 143.0, 193.0);
        assert!((0..100).all(|_| g.allows_decode(1)));
        let mut fresh = SpecGuard::default();
        fresh.record(4, false, 4, 0.01);
        assert!((0..100).all(|_| fresh.allows_decode(4)), "no drafting measured yet");
    }

    #[test]
    fn a_wide_gap_is_trusted_from_one_step_on_each_side() {
        // A CPU at batch 8: a plain step 70 ms for 8 tokens; a drafting step (4 drafts a row)
        // 370 ms for 12 tokens: 3.5 times less.
        let mut g = SpecGuard::default();
        g.record(8, false, 8, 0.070);
        g.record(8, true, 12, 0.370);
        assert!(!g.allows_decode(8));
        // A narrow gap needs more steps before drafting is held off.
        let mut close = SpecGuard::default();
        close.record(8, false, 8, 0.070);
        close.record(8, true, 12, 0.120);
        assert!(close.allows_decode(8), "one step each, 114 against 100 tok/s");
        // One row's step says little: its drafts were all rejected, or all accepted.
        let mut unlucky = SpecGuard::default();
        unlucky.record(1, false, 1, 0.0075);
        unlucky.record(1, true, 1, 0.021);
        assert!(unlucky.allows_decode(1), "one step of one row");
    }

    #[test]
    fn a_batch_size_not_yet_measured_follows_the_nearest_smaller_one() {
        let mut g = measured(8, 850.0, 540.0);
        // 9–16 and 17–32 rows: nothing measured there, drafting lost at 8: held off at once,
        // tried again after FIRST_RECHECK steps.
        let rechecks: Vec<u32> = (1..=FIRST_RECHECK).filter(|_| g.allows_decode(16)).collect();
        assert_eq!(rechecks, [FIRST_RECHECK]);
        assert!(!g.allows_decode(32));
        // Smaller batches are not judged by larger ones.
        assert!(g.allows_decode(4));
        // Once measured, a bucket's own record decides: at 16 rows one step of each shows
        // drafting far ahead, then more steps confirm it.
        g.record(16, false, 16, 16.0 / 900.0);
        g.record(16, true, 40, 40.0 / 1400.0);
        assert!(g.allows_decode(16));
        for _ in 0..10 {
            g.record(16, false, 16, 16.0 / 900.0);
            g.record(16, true, 40, 40.0 / 1200.0);
        }
        assert!((0..50).all(|_| g.allows_decode(16)));
        // And the nearest measured bucket below is the one followed: 17–32 follows 9–16 now.
        assert!(g.allows_decode(32));
    }

    #[test]
    fn a_step_with_a_prompt_chunk_drafts_only_where_drafting_is_known_to_pay() {
        let mut g = SpecGuard::default();
        // Unknown: decoding steps draft to learn, steps with a prompt chunk do not.
        assert!(!g.allows(8, StepKind::Mixed) && g.allows_decode(8));
        // Known to pay: both draft.
        let mut wins = measured(8, 850.0, 1200.0);
        assert!(wins.allows(8, StepKind::Mixed));
        // Known to lose: a recheck comes only on a decoding step.
        let mut loses = measured(8, 850.0, 540.0);
        assert!((0..2 * FIRST_RECHECK).all(|_| !loses.allows(8, StepKind::Mixed)));
        assert!(loses.allows_decode(8), "the recheck, overdue");
        assert!(!loses.allows_decode(8));
    }

    #[test]
    fn a_recheck_that_now_wins_lets_drafting_back() {
        let mut g = measured(8, 850.0, 540.0);
        assert!(!g.allows_decode(8));
        for _ in 0..30 {
            g.record(8, true, 24, 24.0 / 1200.0);
        }
        assert!((0..10).all(|_| g.allows_decode(8)));
    }
}
