//! Speculative decoding's acceptance rules, as pure functions over probabilities and an
//! explicit RNG: the output follows the target model exactly (greedy) or in distribution
//! (sampling), whatever the draft proposed.

use rand::Rng;

use super::sampling::sample_from;
use super::step_cost::StepCost;

/// Greedy verification. `target` holds the target's argmax after each of the k+1 verified
/// positions (the last accepted token, then each draft). Drafts are accepted while they
/// equal the target's choice; the target's own token follows (a correction, or a bonus
/// token after k acceptances). Returns the tokens to append: accepted drafts + one.
pub fn accept_greedy(drafts: &[u32], target: &[u32]) -> Vec<u32> {
    assert_eq!(target.len(), drafts.len() + 1, "k drafts need k + 1 target predictions");
    let accepted = drafts.iter().zip(target).take_while(|(d, t)| d == t).count();
    target[..=accepted].to_vec()
}

/// Lossless rejection sampling (Leviathan et al. 2023; Chen et al. 2023).
///
/// `q[i]` is the draft's distribution that `drafts[i]` was sampled from, `p[i]` the
/// target's distribution at the same position (k + 1 of them). Draft i is accepted with
/// probability min(1, p(x)/q(x)); at the first rejection a token is drawn from
/// norm(max(0, p − q)); after k acceptances a bonus token is drawn from p[k].
pub fn accept_sampled(drafts: &[u32], q: &[Vec<f32>], p: &[Vec<f32>], rng: &mut impl Rng) -> Vec<u32> {
    assert_eq!(q.len(), drafts.len());
    assert_eq!(p.len(), drafts.len() + 1, "k drafts need k + 1 target distributions");
    let mut out = Vec::with_capacity(drafts.len() + 1);
    for (i, &x) in drafts.iter().enumerate() {
        let (px, qx) = (p[i][x as usize], q[i][x as usize]);
        if qx > 0.0 && rng.random::<f32>() * qx < px {
            out.push(x);
            continue;
        }
        out.push(sample_residual(&p[i], &q[i], rng));
        return out;
    }
    out.push(sample_from(&p[drafts.len()], rng));
    out
}

/// Draws from norm(max(0, p − q)); falls back to p where the residual is all zero
/// (p == q, when rejection cannot happen anyway except through rounding).
fn sample_residual(p: &[f32], q: &[f32], rng: &mut impl Rng) -> u32 {
    let residual: Vec<f32> = p.iter().zip(q).map(|(&a, &b)| (a - b).max(0.0)).collect();
    let sum: f64 = residual.iter().map(|&r| r as f64).sum();
    if sum <= 0.0 {
        return sample_from(p, rng);
    }
    let normalized: Vec<f32> = residual.iter().map(|&r| (r as f64 / sum) as f32).collect();
    sample_from(&normalized, rng)
}

/// Proposed tokens, with the draft's distribution for each when the request samples
/// (rejection sampling needs q(x)); `None` for greedy requests and model-free proposers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    pub tokens: Vec<u32>,
    pub probs: Option<Vec<Vec<f32>>>,
}

impl Draft {
    /// The draft's distribution at position `i`: the recorded one, or a point mass on the
    /// proposed token for deterministic proposers.
    pub fn q(&self, i: usize, vocab: usize) -> Vec<f32> {
        match &self.probs {
            Some(p) => p[i].clone(),
            None => {
                let mut q = vec![0.0; vocab];
                q[self.tokens[i] as usize] = 1.0;
                q
            }
        }
    }
}

/// How a row's draft length is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DraftLengths {
    /// Per row and step, from the acceptance and the measured step costs, and none where
    /// drafting measurably delivers less than plain decoding (`core::spec_guard`).
    #[default]
    Adaptive,
    /// Always the most allowed (room permitting): for tests and experiments.
    Fixed,
}

/// Batch size from which speculation is off: a full batch already keeps the hardware busy,
/// and verifying drafts would only add work.
pub const SPECULATION_OFF_AT_BATCH: usize = 32;

/// A request's recent acceptance rate, which sets how far it is worth drafting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AcceptanceTracker {
    /// Decayed counts of accepted drafts and of trials (accepted drafts plus the one
    /// rejection, if any, of each step).
    accepted: f64,
    trials: f64,
    /// Steps in a row without drafts because they would not pay.
    idle: u32,
    /// Draft-length choices since the last exploration.
    since_explored: u32,
    /// Flips at every exploration: one step longer, then one shorter than the best.
    flip: bool,
}

/// Without drafts for this many steps, a row drafts one token to measure its acceptance
/// again.
const PROBE_EVERY: u32 = 16;
/// Every this many choices, a row drafts one token more or less than the best known length,
/// so that the step sizes around the best stay measured.
const EXPLORE_EVERY: u32 = 8;
/// Weight of the past at each step's acceptance (a memory of about 20 steps).
const ACCEPTANCE_FORGET: f64 = 0.95;

impl Default for AcceptanceTracker {
    /// Optimistic at first (0.7, worth two trials), so that a new request drafts and learns.
    fn default() -> Self {
        AcceptanceTracker { accepted: 1.4, trials: 2.0, idle: 0, since_explored: 0, flip: false }
    }
}

impl AcceptanceTracker {
    /// The per-token acceptance. Acceptance stops at the first rejection, so accepted ÷
    /// drafted would understate the rate of long drafts; accepted ÷ (accepted + the
    /// rejections) is its maximum-likelihood estimate, pooled over recent steps so that one
    /// short draft weighs less than a long one.
    pub fn rate(&self) -> f64 {
        self.accepted / self.trials
    }

    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted > 0 {
            let trials = accepted + usize::from(accepted < drafted);
            self.accepted = ACCEPTANCE_FORGET * self.accepted + accepted as f64;
            self.trials = ACCEPTANCE_FORGET * self.trials + trials as f64;
        }
    }

    /// Draft length for the next step, at most `max`, shrinking linearly as the batch fills
    /// and 0 from `SPECULATION_OFF_AT_BATCH` rows. Within that, the length with the most
    /// expected tokens per second once `cost` knows what steps cost (0 when drafting does
    /// not pay, but one token every `PROBE_EVERY` steps to keep measuring, and a neighbour
    /// of the best every `EXPLORE_EVERY` choices); before that, draft position i is
    /// accepted with probability about rateⁱ, so drafting stops where that falls below 10%,
    /// and every even `step` (the batch's step number) is a plain one.
    pub fn draft_len(&mut self, max: usize, batch: usize, cost: &StepCost, step: u64) -> usize {
        let room = SPECULATION_OFF_AT_BATCH.saturating_sub(batch.max(1));
        let cap = (max * room).div_ceil(SPECULATION_OFF_AT_BATCH - 1).min(max);
        if cap == 0 {
            return 0;
        }
        match cost.best_draft_len(self.rate(), cap, batch) {
            Some(k) => self.known_cost_len(k, cap),
            None => self.unknown_cost_len(max, cap, step),
        }
    }

    /// For a tree of `nodes` drafts up to `depth` deep, as `draft_len` decides for a chain
    /// but costing every node: its depth, or 0 to run plain (the same probes and
    /// exploration, so plain steps and trees both keep being measured).
    pub fn tree_depth(&mut self, depth: usize, nodes: usize, batch: usize, cost: &StepCost, step: u64) -> usize {
        let room = SPECULATION_OFF_AT_BATCH.saturating_sub(batch.max(1));
        if room == 0 || depth == 0 {
            return 0;
        }
        match cost.tree_pays(self.rate(), depth, nodes, batch) {
            Some(pays) => self.known_cost_len(if pays { depth } else { 0 }, depth),
            None => self.unknown_cost_len(depth, depth, step),
        }
    }

    fn known_cost_len(&mut self, best: usize, cap: usize) -> usize {
        self.idle = if best == 0 { self.idle + 1 } else { 0 };
        if self.idle >= PROBE_EVERY {
            self.idle = 0;
            return 1;
        }
        self.since_explored += 1;
        if best == 0 || self.since_explored < EXPLORE_EVERY {
            return best;
        }
        self.since_explored = 0;
        self.flip = !self.flip;
        if self.flip {
            (best + 1).min(cap)
        } else {
            best - 1
        }
    }

    /// Costs unknown: draft as far as acceptance suggests on odd steps and not at all on
    /// even ones, the same for every row of a batch (rows that joined at different times
    /// would otherwise take turns, and no step of the whole batch would ever run plain), so
    /// that both plain steps and verifications get measured. Odd, because the first step
    /// after a prefill is often odd (the prefill of a request that found the runtime idle is
    /// step 0), and that step is where a prompt's own text is most often repeated.
    fn unknown_cost_len(&self, max: usize, cap: usize, step: u64) -> usize {
        if step.is_multiple_of(2) {
            return 0;
        }
        let rate = self.rate();
        let by_acceptance = if rate >= 0.99 { max } else { (0.1f64.ln() / rate.max(0.01).ln()).ceil() as usize };
        by_acceptance.clamp(1, cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn greedy_accepts_the_matching_prefix_then_corrects() {
        assert_eq!(accept_greedy(&[5, 6, 7], &[5, 6, 9, 1]), vec![5, 6, 9]);
        assert_eq!(accept_greedy(&[5, 6, 7], &[5, 6, 7, 1]), vec![5, 6, 7, 1]);
        assert_eq!(accept_greedy(&[5, 6, 7], &[4, 6, 7, 1]), vec![4]);
        assert_eq!(accept_greedy(&[], &[3]), vec![3]);
    }

    /// Pearson's chi-square statistic of observed counts against expected probabilities.
    fn chi_square(counts: &[usize], probs: &[f32]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .filter(|(_, &p)| p > 0.0)
            .map(|(&c, &p)| {
                let e = n as f64 * p as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    #[test]
    fn sampled_output_follows_the_target_distribution() {
        // Draft and target disagree strongly; the first emitted token must follow p[0]
        // and, given the first draft was accepted, the second must follow p[1].
        let q = vec![vec![0.1, 0.6, 0.2, 0.1], vec![0.25, 0.25, 0.25, 0.25]];
        let p = vec![vec![0.4, 0.2, 0.3, 0.1], vec![0.1, 0.1, 0.1, 0.7], vec![0.5, 0.2, 0.2, 0.1]];
        let mut rng = StdRng::seed_from_u64(7);
        let (mut first, mut second) = (vec![0usize; 4], vec![0usize; 4]);
        for _ in 0..40_000 {
            let drafts = [sample_from(&q[0], &mut rng), sample_from(&q[1], &mut rng)];
            let out = accept_sampled(&drafts, &q, &p, &mut rng);
            first[out[0] as usize] += 1;
            if out.len() >= 2 {
                second[out[1] as usize] += 1;
            }
        }
        // 3 degrees of freedom: chi-square above 11.34 has probability 0.01.
        assert!(chi_square(&first, &p[0]) < 11.34, "first {first:?}");
        assert!(chi_square(&second, &p[1]) < 11.34, "second {second:?}");
    }

    #[test]
    fn draft_length_follows_acceptance_and_batch() {
        // Costs unknown: by acceptance, every other step plain (to measure costs).
        let unknown = StepCost::default();
        let two =
            |t: &mut AcceptanceTracker, batch| [t.draft_len(8, batch, &unknown, 1), t.draft_len(8, batch, &unknown, 2)];
        let mut t = AcceptanceTracker::default();
        assert_eq!(two(&mut t, 1), [7, 0]); // 0.7⁷ ≈ 0.08
        for _ in 0..20 {
            t.record(8, 8);
        }
        assert_eq!(two(&mut t, 1), [8, 0]);
        assert_eq!(two(&mut t, 16), [5, 0]);
        assert_eq!(two(&mut t, SPECULATION_OFF_AT_BATCH), [0, 0]);
        // The 20 long drafts' evidence fades over about 20 steps of first-token rejections.
        for _ in 0..100 {
            t.record(8, 0);
        }
        assert_eq!(two(&mut t, 1), [1, 0]); // still probes with one token

        // Known costs, each token as dear as a step: drafts that are rarely accepted do not
        // pay; one token every PROBE_EVERY steps keeps measuring.
        let mut dear = StepCost::default();
        for n in [1, 2, 5, 9, 1, 3].repeat(5) {
            dear.record_step(n, 0.01 * n as f64);
        }
        let lens: Vec<usize> = (0..2 * PROBE_EVERY).map(|_| t.draft_len(8, 1, &dear, 1)).collect();
        assert_eq!(lens.iter().filter(|&&k| k == 1).count(), 2, "{lens:?}");
        assert_eq!(lens.iter().filter(|&&k| k == 0).count(), 2 * PROBE_EVERY as usize - 2);
    }

    #[test]
    fn known_costs_explore_the_neighbours_of_the_best_length() {
        // Steps cost 10 ms + 1 ms per token; at acceptance 0.8 the best length is 6.
        let mut cost = StepCost::default();
        for n in [1, 2, 5, 9, 7, 3].repeat(5) {
            cost.record_step(n, 0.010 + 0.001 * n as f64);
        }
        let best = cost.best_draft_len(0.8, 10, 1).unwrap();
        let mut t = AcceptanceTracker { accepted: 8.0, trials: 10.0, ..AcceptanceTracker::default() };
        let lens: Vec<usize> = (0..2 * EXPLORE_EVERY).map(|_| t.draft_len(10, 1, &cost, 1)).collect();
        let count = |k| lens.iter().filter(|&&l| l == k).count();
        assert_eq!((count(best), count(best + 1), count(best - 1)), (lens.len() - 2, 1, 1), "{lens:?}");
    }

    #[test]
    fn measured_step_sizes_override_the_line() {
        // The line says 11 tokens cost 21 ms; measured, they cost 60 ms: drafting 10 no
        // longer pays, and the best length moves below 10.
        let mut cost = StepCost::default();
        for n in [1, 2, 5, 9, 7, 3].repeat(5) {
            cost.record_step(n, 0.010 + 0.001 * n as f64);
        }
        assert_eq!(cost.best_draft_len(0.95, 10, 1), Some(10));
        for _ in 0..4 {
            cost.record_step(11, 0.060);
        }
        assert!(cost.step_seconds(11).unwrap() > 0.059);
        assert!(cost.best_draft_len(0.95, 10, 1).unwrap() < 10);
    }

    #[test]
    fn a_plain_step_never_measured_is_tried() {
        // Eight rows have only ever verified drafts (16 to 72 tokens, 10 ms + 0.5 ms per
        // token); the line would put a plain 8-token step at 14 ms, but steps cost no less
        // in proportion than the smallest one measured: 9 ms, and at acceptance 0.6 plain
        // decoding wins.
        let mut cost = StepCost::default();
        for n in [16, 24, 40, 72, 32, 56].repeat(5) {
            cost.record_step(n, 0.010 + 0.0005 * n as f64);
        }
        assert!((cost.step_seconds(8).unwrap() - 0.009).abs() < 1e-9);
        assert_eq!(cost.best_draft_len(0.6, 8, 8), Some(0));
        cost.record_step(8, 0.016); // a warm-up
        cost.record_step(8, 0.016);
        assert!(cost.best_draft_len(0.6, 8, 8).unwrap() > 0, "dear plain steps: drafting pays");
    }

    #[test]
    fn identical_draft_and_target_accept_everything() {
        let d = vec![0.3, 0.7];
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let out = accept_sampled(&[1, 0], &[d.clone(), d.clone()], &[d.clone(), d.clone(), d.clone()], &mut rng);
            assert_eq!(out.len(), 3);
        }
    }
}
