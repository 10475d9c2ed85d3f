//! The tokens top-k, top-p and min-p keep, found without sorting the vocabulary, and the
//! draw among them: the host twin of `kernels/sample.cu`, step for step, tested here against
//! `sampling::distribution` (which sorts).
//!
//! `distribution` keeps the first K tokens of the order "probability down, index up", K
//! being the least of top-k, the tokens at or above `min_p * top` and the shortest prefix
//! whose running sum reaches `top_p`. Every such prefix is "the tokens above a value `v`,
//! and the first few (by index) equal to it" (a [`Cut`]); `v` is found by a binary search
//! over the probability's bits (non-negative floats order as their bits), each probe one
//! pass that counts or sums the tokens at or above it.
//!
//! Masses are summed in fixed point (2^-60 units): integer sums are exact in any order, so
//! the kernel's block reductions give the bits this sequential code gives, and the same
//! uniform picks the same token. The CPU's top-p test sums in f32 in sorted order: the two
//! can disagree only when that running sum and the exact one fall on either side of
//! `top_p` (a difference of the order of 1e-7).

use super::sampling::SamplingParams;

/// One in the fixed-point unit of probability mass.
const FIXED_ONE: f64 = (1u64 << 60) as f64;
/// `Cut::ties` that keeps every token equal to the threshold.
pub const ALL_TIES: u32 = u32::MAX;

/// A probability in fixed point (rounded down: exact above 2^-36).
pub fn fixed(p: f32) -> u64 {
    (p as f64 * FIXED_ONE) as u64
}

/// The kept tokens: those above `threshold`, then the first `ties` (by index) equal to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    pub threshold: f32,
    pub ties: u32,
}

impl Cut {
    /// Keeps every token (probabilities are never negative).
    pub const ALL: Cut = Cut { threshold: -1.0, ties: 0 };

    /// Whether each token is kept.
    pub fn kept(&self, probs: &[f32]) -> Vec<bool> {
        let mut rank = 0u32;
        probs.iter().map(|&x| self.keeps(x, &mut rank)).collect()
    }

    /// Whether a token of probability `x` is kept; `rank` counts the ties met so far.
    fn keeps(&self, x: f32, rank: &mut u32) -> bool {
        if x != self.threshold {
            return x > self.threshold;
        }
        *rank += 1;
        self.ties == ALL_TIES || *rank <= self.ties
    }
}

/// The cut of `probs` (a softmax: `sampling::softmax`) that `p`'s top-k, top-p and min-p make.
pub fn cut(probs: &[f32], p: &SamplingParams) -> Cut {
    let n = probs.len();
    if n == 0 || (p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0) {
        return Cut::ALL;
    }
    // The kernel takes the top probability from the softmax's sum (e^0 / sum): the same value.
    let top = probs.iter().fold(0f32, |m, &x| m.max(x));
    let k = if p.top_k > 0 { p.top_k.min(n) } else { n };
    let floor = p.min_p * top;
    let n_min = if p.min_p > 0.0 { count_at_least(probs, floor) } else { n };
    let (n_top, top_cut) = if p.top_p < 1.0 { top_p_cut(probs, p.top_p, top) } else { (n, Cut::ALL) };
    let keep = k.min(n_min).min(n_top).max(1);
    if p.top_p < 1.0 && n_top == keep {
        return top_cut;
    }
    if p.min_p > 0.0 && n_min == keep {
        return Cut { threshold: floor, ties: ALL_TIES };
    }
    if keep < n {
        return kth_cut(probs, keep, top);
    }
    Cut::ALL
}

fn count_at_least(probs: &[f32], t: f32) -> usize {
    probs.iter().filter(|&&x| x >= t).count()
}

fn mass_at_least(probs: &[f32], t: f32) -> u64 {
    probs.iter().filter(|&&x| x >= t).map(|&x| fixed(x)).sum()
}

/// The largest value in `[0, hi]` where `pred` holds, `pred(0)` holding and `pred` falling
/// as the value rises: a binary search over the bits (at most 31 probes).
pub fn largest_where(hi: f32, pred: impl Fn(f32) -> bool) -> f32 {
    let (mut lo, mut hi) = (0u32, hi.to_bits());
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if pred(f32::from_bits(mid)) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    f32::from_bits(lo)
}

/// Tokens above `v` (count and mass) and equal to it (count).
fn split_at(probs: &[f32], v: f32) -> (usize, u64, usize) {
    let above = probs.iter().filter(|&&x| x > v);
    (above.clone().count(), above.map(|&x| fixed(x)).sum(), probs.iter().filter(|&&x| x == v).count())
}

/// The shortest prefix of the sorted order whose mass reaches `top_p`: its length and cut
/// (the whole row when the row's mass falls short of it, as rounding may make it).
fn top_p_cut(probs: &[f32], top_p: f32, top: f32) -> (usize, Cut) {
    let target = fixed(top_p);
    if mass_at_least(probs, 0.0) < target {
        return (probs.len(), Cut::ALL);
    }
    // The largest value whose tokens and those above reach the target: a value present in
    // the row (the mass only changes at one), where the prefix ends.
    let v = largest_where(top, |t| mass_at_least(probs, t) >= target);
    let (above, mass_above, at) = split_at(probs, v);
    let step = fixed(v);
    let ties = match step {
        0 => at,
        _ => (target.saturating_sub(mass_above).div_ceil(step) as usize).clamp(1, at.max(1)),
    };
    (above + ties, Cut { threshold: v, ties: ties as u32 })
}

/// The first `keep` tokens of the sorted order: above the `keep`-th largest value, and as
/// many of its ties as fill the count.
fn kth_cut(probs: &[f32], keep: usize, top: f32) -> Cut {
    let v = largest_where(top, |t| count_at_least(probs, t) >= keep);
    let (above, _, _) = split_at(probs, v);
    Cut { threshold: v, ties: (keep - above) as u32 }
}

/// The token `u` (in [0, 1)) picks among the kept ones: the first, in index order, whose
/// running mass passes `u` times the kept mass.
pub fn draw(probs: &[f32], cut: Cut, u: f64) -> u32 {
    let kept = cut.kept(probs);
    let mass = |i: usize| if kept[i] { fixed(probs[i]) } else { 0 };
    let total: u64 = (0..probs.len()).map(mass).sum();
    if total == 0 {
        return 0;
    }
    let target = ((total as f64 * u) as u64).min(total - 1);
    let mut acc = 0;
    for i in 0..probs.len() {
        acc += mass(i);
        if acc > target {
            return i as u32;
        }
    }
    unreachable!("the running mass reaches the total")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::sampling::{distribution, sample_uniform, softmax};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn sampling(top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams { temperature: 1.0, top_k, top_p, min_p, ..Default::default() }
    }

    fn kept_indices(probs: &[f32], c: Cut) -> Vec<usize> {
        c.kept(probs).iter().enumerate().filter(|(_, &k)| k).map(|(i, _)| i).collect()
    }

    #[test]
    fn ties_at_the_edge_are_kept_by_index() {
        let probs = [0.1, 0.2, 0.3, 0.2, 0.2];
        assert_eq!(kept_indices(&probs, cut(&probs, &sampling(2, 1.0, 0.0))), [1, 2]);
        assert_eq!(kept_indices(&probs, cut(&probs, &sampling(3, 1.0, 0.0))), [1, 2, 3]);
        // Running sums 0.3, 0.5, 0.7: top-p 0.6 stops at the third token of the order.
        assert_eq!(kept_indices(&probs, cut(&probs, &sampling(0, 0.6, 0.0))), [1, 2, 3]);
        // min-p keeps every tie.
        assert_eq!(kept_indices(&probs, cut(&probs, &sampling(0, 1.0, 0.5))), [1, 2, 3, 4]);
    }

    #[test]
    fn the_search_finds_the_largest_value_that_holds() {
        let values = [0.0f32, 1e-30, 0.25, 0.5, 0.75];
        for (i, &v) in values.iter().enumerate() {
            assert_eq!(largest_where(1.0, |t| t <= v), v, "case {i}");
        }
        assert_eq!(largest_where(0.0, |_| true), 0.0);
    }

    /// Logits drawn from a handful of values when `ties`, so that cuts fall inside ties.
    fn logits(rng: &mut StdRng, n: usize, ties: bool) -> Vec<f32> {
        let spread = rng.random_range(0.5f32..6.0);
        (0..n)
            .map(|_| match ties {
                true => rng.random_range(0..8) as f32 * spread / 8.0,
                false => rng.random_range(-1.0f32..1.0) * spread,
            })
            .collect()
    }

    fn random_params(rng: &mut StdRng, n: usize) -> SamplingParams {
        SamplingParams {
            temperature: rng.random_range(0.3f32..2.0),
            top_k: if rng.random_bool(0.5) { rng.random_range(1..n + 3) } else { 0 },
            top_p: if rng.random_bool(0.5) { rng.random_range(0.05f32..0.99) } else { 1.0 },
            min_p: if rng.random_bool(0.4) { rng.random_range(0.0f32..0.9) } else { 0.0 },
            repetition_penalty: rng.random_range(0.8f32..1.5),
            seed: None,
        }
    }

    /// The cut keeps exactly the tokens the sorting sampler keeps, and the same uniform
    /// draws the same token (but for a draw that lands within rounding of a boundary).
    #[test]
    fn the_cut_and_the_draw_agree_with_the_sorting_sampler() {
        let mut rng = StdRng::seed_from_u64(7);
        let (mut draws, mut differ) = (0, 0);
        for case in 0..3000 {
            let n = rng.random_range(1..300);
            let logits = logits(&mut rng, n, case % 2 == 0);
            let history: Vec<u32> = (0..rng.random_range(0..20)).map(|_| rng.random_range(0..n as u32 + 2)).collect();
            let mut p = random_params(&mut rng, n);
            if p.is_greedy() {
                p.top_k = 0;
            }
            let probs = softmax(&logits, &history, &p);
            let want = distribution(&logits, &history, &p);
            let c = cut(&probs, &p);
            let want_kept: Vec<usize> = (0..n).filter(|&i| want[i] > 0.0).collect();
            assert_eq!(kept_indices(&probs, c), want_kept, "case {case}: {p:?} {c:?}");
            for _ in 0..10 {
                let u = rng.random::<f64>();
                draws += 1;
                differ += usize::from(draw(&probs, c, u) != sample_uniform(&want, u));
            }
        }
        assert!(differ * 10_000 <= draws, "{differ} of {draws} draws differ");
    }

    #[test]
    fn every_kept_token_can_be_drawn_and_no_other() {
        let probs = [0.5, 0.0, 0.25, 0.125, 0.125];
        let c = cut(&probs, &sampling(3, 1.0, 0.0));
        assert_eq!(kept_indices(&probs, c), [0, 2, 3]);
        // The kept mass 7/8: token 0 below 4/7, token 2 below 6/7, then token 3.
        assert_eq!([0.0, 0.57, 0.58, 0.85, 0.86, 0.999_999].map(|u| draw(&probs, c, u)), [0, 0, 2, 2, 3, 3]);
    }
}
