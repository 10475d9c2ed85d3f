//! What speculation costs, learned while running. A forward step over `n` query tokens takes
//! `step(n)` seconds, measured per step size (exponential moving averages), so whatever the
//! hardware does at each size (a kernel switching tiles at 17 tokens, a draft model sharing
//! the GPU during long verifications) is what the policy sees. Sizes not yet measured are
//! estimated from a least-squares line through all steps (`fixed + per_token · n`), and
//! drafting costs `draft` seconds per token. The draft length is then the one with the most
//! expected tokens per second, not merely the longest that is likely to be accepted: on a
//! GPU verifying 9 tokens costs far more than one decode step, on a CPU nearly 9 times more.

/// Weight of the past at each new measurement of the line (a memory of about 50 steps).
const FORGET: f64 = 0.98;
/// Weight of the past for one step size's average.
const SIZE_FORGET: f64 = 0.8;
/// Steps measured before the fit is trusted.
const MIN_STEPS: f64 = 16.0;
/// Step sizes measured one by one; larger steps share power-of-two buckets.
const EXACT_SIZES: usize = 64;
const BUCKETS: usize = EXACT_SIZES + 8;

/// Step sizes whose first step has been seen (bit n for n tokens, the last bit for all
/// larger ones).
type SeenSizes = u128;

/// A decayed average of one step size's seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct SizeCost {
    weight: f64,
    seconds: f64,
}

/// Where steps of `tokens` query tokens are averaged.
fn bucket(tokens: usize) -> usize {
    if tokens <= EXACT_SIZES {
        tokens
    } else {
        (EXACT_SIZES + 1 + tokens.ilog2() as usize - EXACT_SIZES.ilog2() as usize).min(BUCKETS - 1)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepCost {
    /// Whether the first step of each size is a warm-up (a GPU captures its graph, buffers
    /// are allocated): then never a measurement.
    warm_ups: bool,
    seen: SeenSizes,
    /// Per step-size bucket (index 0 unused).
    sizes: [SizeCost; BUCKETS],
    // Decayed sums for the least-squares line through (tokens, seconds).
    weight: f64,
    sum_n: f64,
    sum_t: f64,
    sum_nn: f64,
    sum_nt: f64,
    // Decayed totals of drafted tokens and the seconds spent drafting them.
    draft_tokens: f64,
    draft_seconds: f64,
}

impl Default for StepCost {
    fn default() -> Self {
        StepCost::new(true)
    }
}

impl StepCost {
    /// A model knowing nothing yet; `warm_ups`: whether the first step of each size is a
    /// warm-up, left out (a GPU's), or measures like any other (the CPU's).
    pub fn new(warm_ups: bool) -> Self {
        StepCost {
            warm_ups,
            seen: 0,
            sizes: [SizeCost::default(); BUCKETS],
            weight: 0.0,
            sum_n: 0.0,
            sum_t: 0.0,
            sum_nn: 0.0,
            sum_nt: 0.0,
            draft_tokens: 0.0,
            draft_seconds: 0.0,
        }
    }

    /// A forward step over `tokens` query tokens took `seconds`. A warm-up (the first step
    /// of its size, where there are warm-ups) and a step far slower than predicted (a
    /// stall) are left out; returns whether this one counted.
    pub fn record_step(&mut self, tokens: usize, seconds: f64) -> bool {
        let bit = 1 << tokens.min(SeenSizes::BITS as usize - 1);
        if self.warm_ups && self.seen & bit == 0 {
            self.seen |= bit;
            return false;
        }
        let (n, t) = (tokens as f64, seconds);
        if self.step_seconds(tokens).is_some_and(|predicted| t > 4.0 * predicted + 1e-3) {
            return false;
        }
        let size = &mut self.sizes[bucket(tokens)];
        size.weight = SIZE_FORGET * size.weight + 1.0;
        size.seconds = SIZE_FORGET * size.seconds + t;
        self.weight = FORGET * self.weight + 1.0;
        self.sum_n = FORGET * self.sum_n + n;
        self.sum_t = FORGET * self.sum_t + t;
        self.sum_nn = FORGET * self.sum_nn + n * n;
        self.sum_nt = FORGET * self.sum_nt + n * t;
        true
    }

    /// Drafting `tokens` tokens took `seconds` (of time the target waited for).
    pub fn record_draft(&mut self, tokens: usize, seconds: f64) {
        if tokens > 0 {
            self.draft_tokens = FORGET * self.draft_tokens + tokens as f64;
            self.draft_seconds = FORGET * self.draft_seconds + seconds;
        }
    }

    /// `(fixed, per_token)` seconds, once steps of different sizes have been seen.
    pub fn fit(&self) -> Option<(f64, f64)> {
        let spread = self.weight * self.sum_nn - self.sum_n * self.sum_n;
        // A few early steps (new shapes, warm-up) are no basis for turning speculation off.
        if self.weight < MIN_STEPS || spread <= 1e-9 * self.weight * self.sum_nn.max(1.0) {
            return None;
        }
        let per_token = ((self.weight * self.sum_nt - self.sum_n * self.sum_t) / spread).max(0.0);
        let fixed = ((self.sum_t - per_token * self.sum_n) / self.weight).max(0.0);
        Some((fixed, per_token))
    }

    /// The seconds of a step over `tokens` query tokens, once the line is known: measured at
    /// that size if it has been; else between the nearest measured sizes; below them all,
    /// in proportion to the smallest (optimistic, so that a smaller step, plain decoding
    /// above all, gets tried and measured rather than judged by a line drawn through
    /// verifications); above them all, on the line but no cheaper than the largest.
    pub fn step_seconds(&self, tokens: usize) -> Option<f64> {
        let (fixed, per_token) = self.fit()?;
        let at = bucket(tokens);
        if let Some((_, t)) = self.measured(at) {
            return Some(t);
        }
        let n = tokens as f64;
        let below = (1..at).rev().find_map(|i| self.measured(i));
        let above = (at + 1..BUCKETS).find_map(|i| self.measured(i));
        Some(match (below, above) {
            (Some((m0, t0)), Some((m1, t1))) => t0 + (t1 - t0) * (n - m0 as f64) / (m1 - m0) as f64,
            (None, Some((m1, t1))) => t1 * n / m1 as f64,
            (Some((_, t0)), None) => (fixed + per_token * n).max(t0),
            (None, None) => fixed + per_token * n,
        })
    }

    /// Bucket `i`'s step size (above `EXACT_SIZES`, the upper end of its power-of-two range)
    /// and mean seconds, if measured.
    fn measured(&self, i: usize) -> Option<(usize, f64)> {
        let s = self.sizes[i];
        let tokens = if i <= EXACT_SIZES { i } else { EXACT_SIZES << (i - EXACT_SIZES) };
        (s.weight > 0.0).then(|| (tokens, s.seconds / s.weight))
    }

    fn draft_per_token(&self) -> f64 {
        if self.draft_tokens > 0.0 {
            self.draft_seconds / self.draft_tokens
        } else {
            0.0
        }
    }

    /// The draft length in `0..=max` giving a row among `batch` the most expected tokens
    /// per second when each draft is accepted with probability `acceptance` (0: plain
    /// decoding pays better); None until the costs are known.
    pub fn best_draft_len(&self, acceptance: f64, max: usize, batch: usize) -> Option<usize> {
        self.fit()?;
        let a = acceptance.clamp(0.0, 0.999);
        let rate = |k: usize| {
            // 1 + a + ... + a^k tokens: the accepted drafts and the target's own token.
            let expected = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a);
            let step = self.step_seconds(batch.max(1) * (k + 1)).unwrap_or(f64::MAX);
            expected / (step + self.draft_per_token() * (batch.max(1) * k) as f64).max(1e-12)
        };
        (0..=max).max_by(|&x, &y| rate(x).total_cmp(&rate(y)))
    }

    /// Whether a tree of `nodes` drafts, `depth` deep, gives a row among `batch` more
    /// expected tokens per second than plain decoding when its path goes one depth further
    /// with probability `acceptance` (a chain's rate, measured on trees' depths and paths):
    /// the tree costs all its nodes, drafted and verified. None until the costs are known.
    pub fn tree_pays(&self, acceptance: f64, depth: usize, nodes: usize, batch: usize) -> Option<bool> {
        self.fit()?;
        let (a, rows) = (acceptance.clamp(0.0, 0.999), batch.max(1));
        let expected = (1.0 - a.powi(depth as i32 + 1)) / (1.0 - a);
        let tree = self.step_seconds(rows * (nodes + 1))? + self.draft_per_token() * (rows * nodes) as f64;
        let plain = self.step_seconds(rows)?;
        Some(expected / tree.max(1e-12) > 1.0 / plain.max(1e-12))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(fixed: f64, per_token: f64, draft: f64) -> StepCost {
        let mut c = StepCost::default();
        for n in [1, 5, 9, 2, 17, 3] {
            c.record_step(n, 1.0); // warm-ups, whatever they cost
        }
        for n in [1, 5, 9, 2, 17, 3, 1, 9].repeat(3) {
            c.record_step(n, fixed + per_token * n as f64);
        }
        c.record_draft(10, 10.0 * draft);
        c
    }

    #[test]
    fn a_tree_pays_only_where_its_nodes_cost_less_than_its_path_gives() {
        // A step of n tokens costs 6.4 ms + 1.2 ms each, a drafted node 0.1 ms.
        let c = measured(6.4e-3, 1.2e-3, 1e-4);
        // Alone, 17 tokens cost 27 ms against 7.6 ms: a path of 0.9 per depth (4.1 tokens of
        // 4 deep) pays, one of 0.3 (1.4 tokens) does not.
        assert_eq!(c.tree_pays(0.9, 4, 16, 1), Some(true));
        assert_eq!(c.tree_pays(0.3, 4, 16, 1), Some(false));
        // Batched, the nodes cost 8 times over: no longer.
        assert_eq!(c.tree_pays(0.9, 4, 16, 8), Some(false));
        assert_eq!(StepCost::default().tree_pays(0.9, 4, 16, 1), None);
    }

    #[test]
    fn the_fit_recovers_a_line() {
        let (fixed, per_token) = measured(6.4e-3, 1.2e-3, 0.0).fit().unwrap();
        assert!((fixed - 6.4e-3).abs() < 1e-9 && (per_token - 1.2e-3).abs() < 1e-9);
        let mut with_outlier = measured(6.4e-3, 1.2e-3, 0.0);
        with_outlier.record_step(9, 0.2);
        assert_eq!(with_outlier.fit(), measured(6.4e-3, 1.2e-3, 0.0).fit(), "a 200 ms step is an outlier");
        let mut warming = measured(6.4e-3, 1.2e-3, 0.0);
        warming.record_step(11, 0.5);
        assert_eq!(warming.fit(), measured(6.4e-3, 1.2e-3, 0.0).fit(), "the first 11-token step is a warm-up");
        let mut same_size = StepCost::default();
        for _ in 0..10 {
            same_size.record_step(1, 0.01);
        }
        assert_eq!(same_size.fit(), None, "one step size cannot separate the two costs");
    }

    #[test]
    fn cheap_verification_drafts_long_and_dear_verification_short() {
        // GPU-like: 9 tokens cost ~2.7 decode steps.
        let gpu = measured(6.4e-3, 1.2e-3, 0.3e-3);
        assert!(gpu.best_draft_len(0.8, 8, 1).unwrap() >= 3);
        assert_eq!(gpu.best_draft_len(0.1, 8, 1), Some(0));
        // Every token costs nearly as much as the step: a draft pays only when it is
        // almost always accepted, and then one token.
        let proportional = measured(2e-3, 25e-3, 0.0);
        assert_eq!(proportional.best_draft_len(0.97, 8, 1), Some(1));
        assert_eq!(proportional.best_draft_len(0.8, 8, 1), Some(0));
        // Free verification (no per-token cost): draft as far as allowed.
        assert_eq!(measured(5e-3, 0.0, 0.0).best_draft_len(0.5, 8, 1), Some(8));
    }
}
