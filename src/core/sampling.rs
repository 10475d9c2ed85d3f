//! Turning logits into the next token: greedy, temperature, top-k, top-p, min-p and
//! repetition penalty, with an explicit seeded RNG. Pure functions, no model needed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: usize,
    /// 1 means off.
    pub top_p: f32,
    /// 0 means off.
    pub min_p: f32,
    /// 1 means off; above 1 discourages tokens already in the prompt or output.
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
}

/// Greedy, nothing rewriting the logits: the defaults.
pub const GREEDY: SamplingParams =
    SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: None };

impl Default for SamplingParams {
    fn default() -> Self {
        GREEDY
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Explains the first invalid value, if any.
    pub fn validate(&self) -> Result<(), String> {
        let t = self.temperature;
        if !(t.is_finite() && (0.0..=100.0).contains(&t)) {
            return Err(format!("temperature must be between 0 and 100, got {t}"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        let rp = self.repetition_penalty;
        if !(rp.is_finite() && rp > 0.0) {
            return Err(format!("repetition_penalty must be positive, got {rp}"));
        }
        Ok(())
    }
}

/// Samples tokens for one request; owns its RNG so that a seed reproduces the output.
pub struct Sampler {
    pub params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    /// Picks the next token from raw logits; `history` is the prompt plus output so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        sample_row(logits, &self.row(history))
    }

    /// This step's row for `Backend::sample_rows`: the one uniform draw `sample` makes (none
    /// for greedy), taken from the request's RNG, so that a seed reproduces the output
    /// wherever the row is sampled.
    pub fn row<'a>(&'a mut self, history: &'a [u32]) -> RowSampling<'a> {
        let uniform = self.next_uniform();
        RowSampling { params: &self.params, history, uniform }
    }

    /// The uniform of `row` alone, for callers that lend several requests' rows at once.
    pub fn next_uniform(&mut self) -> f64 {
        if self.params.is_greedy() {
            0.0
        } else {
            self.rng.random::<f64>()
        }
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }
}

/// One row of `Backend::sample_rows`: how to sample it, the sequence so far (for the
/// repetition penalty) and the uniform draw in [0, 1) that picks the token (greedy rows
/// ignore it).
#[derive(Debug, Clone, Copy)]
pub struct RowSampling<'a> {
    pub params: &'a SamplingParams,
    pub history: &'a [u32],
    pub uniform: f64,
}

impl<'a> RowSampling<'a> {
    /// A greedy row without penalties (its logits' first maximum).
    pub fn greedy() -> RowSampling<'static> {
        RowSampling { params: &GREEDY, history: &[], uniform: 0.0 }
    }

    /// The previous tokens sampling reads: only a repetition penalty reads any.
    pub fn read_history(&self) -> &'a [u32] {
        if self.params.repetition_penalty != 1.0 {
            self.history
        } else {
            &[]
        }
    }
}

/// The token `row` picks from raw `logits`: what `Sampler::sample` does with the row's draw.
pub fn sample_row(logits: &[f32], row: &RowSampling) -> u32 {
    if row.params.is_greedy() {
        return argmax(&penalized(logits, row.history, row.params.repetition_penalty));
    }
    sample_uniform(&distribution(logits, row.history, row.params), row.uniform)
}

/// Index of the largest value; the first one on ties.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The probability of every token after penalty, temperature, top-k, top-p and min-p:
/// what sampling draws from, and what speculative verification compares.
pub fn distribution(logits: &[f32], history: &[u32], p: &SamplingParams) -> Vec<f32> {
    if p.is_greedy() {
        let mut probs = penalized(logits, history, p.repetition_penalty);
        let best = argmax(&probs) as usize;
        probs.iter_mut().enumerate().for_each(|(i, x)| *x = if i == best { 1.0 } else { 0.0 });
        return probs;
    }
    let mut probs = softmax(logits, history, p);
    truncate(&mut probs, p);
    probs
}

/// The penalized logits' softmax at the temperature (a sampling request's), before top-k,
/// top-p and min-p: exp in f32, the sum in f64, each probability rounded to f32 once.
pub fn softmax(logits: &[f32], history: &[u32], p: &SamplingParams) -> Vec<f32> {
    let mut probs = penalized(logits, history, p.repetition_penalty);
    let max = probs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f64;
    for x in probs.iter_mut() {
        *x = ((*x - max) / p.temperature).exp();
        sum += *x as f64;
    }
    probs.iter_mut().for_each(|x| *x = (*x as f64 / sum) as f32);
    probs
}

/// Zeroes the tokens that top-k, top-p and min-p exclude, then renormalises.
fn truncate(probs: &mut [f32], p: &SamplingParams) {
    if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
        return;
    }
    let mut order: Vec<u32> = (0..probs.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]).then(a.cmp(&b)));
    let top = probs[order[0] as usize];
    let mut keep = if p.top_k > 0 { p.top_k.min(order.len()) } else { order.len() };
    let mut cumulative = 0f32;
    for (i, &t) in order[..keep].iter().enumerate() {
        let pr = probs[t as usize];
        if pr < p.min_p * top {
            keep = i;
            break;
        }
        cumulative += pr;
        // top-p 1 is off: an f32 running sum can reach 1 before the tail's last tokens.
        if p.top_p < 1.0 && cumulative >= p.top_p {
            keep = i + 1;
            break;
        }
    }
    for &t in &order[keep.max(1)..] {
        probs[t as usize] = 0.0;
    }
    let sum: f64 = probs.iter().map(|&x| x as f64).sum();
    probs.iter_mut().for_each(|x| *x = (*x as f64 / sum) as f32);
}

/// The CTRL repetition penalty: positive logits divided, negative multiplied.
fn penalized(logits: &[f32], history: &[u32], penalty: f32) -> Vec<f32> {
    let mut out = logits.to_vec();
    if penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        let vocab = out.len();
        for &t in seen.iter().filter(|&&t| (t as usize) < vocab) {
            let x = &mut out[t as usize];
            *x = if *x > 0.0 { *x / penalty } else { *x * penalty };
        }
    }
    out
}

/// Draws an index with the given probabilities (which sum to 1).
pub fn sample_from(probs: &[f32], rng: &mut impl Rng) -> u32 {
    sample_uniform(probs, rng.random::<f64>())
}

/// The index where the running sum of `probs` (in index order) passes `u`, in [0, 1).
pub fn sample_uniform(probs: &[f32], mut u: f64) -> u32 {
    let mut last_nonzero = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            last_nonzero = i;
            u -= p as f64;
            if u < 0.0 {
                return i as u32;
            }
        }
    }
    last_nonzero as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: Some(1), ..Default::default() }
    }

    #[test]
    fn greedy_picks_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.0, 1.0, 0.5], &[]), 1);
    }

    #[test]
    fn temperature_softmax_matches_closed_form() {
        let d = distribution(&[1.0, 2.0, 3.0], &[], &params(2.0));
        let e: Vec<f64> = [0.5f64, 1.0, 1.5].iter().map(|x| x.exp()).collect();
        let z: f64 = e.iter().sum();
        for (p, e) in d.iter().zip(&e) {
            assert!((*p as f64 - e / z).abs() < 1e-6);
        }
    }

    #[test]
    fn top_k_top_p_and_min_p_cut_the_tail() {
        let logits = [4.0, 3.0, 2.0, 1.0, 0.0];
        let k = distribution(&logits, &[], &SamplingParams { top_k: 2, ..params(1.0) });
        assert!(k[2] == 0.0 && k[0] > 0.0 && k[1] > 0.0);
        // Probabilities ≈ .64 .24 .09 .03 .01: top-p 0.7 keeps two tokens.
        let p = distribution(&logits, &[], &SamplingParams { top_p: 0.7, ..params(1.0) });
        assert!(p[1] > 0.0 && p[2] == 0.0);
        let m = distribution(&logits, &[], &SamplingParams { min_p: 0.2, ..params(1.0) });
        assert!(m[1] > 0.0 && m[2] == 0.0);
        assert!((m.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 3.0, ..Default::default() });
        assert_eq!(s.sample(&[2.0, 1.0], &[0]), 1);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut s = Sampler::new(params(1.0));
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let ones = (0..20_000).filter(|_| s.sample(&logits, &[]) == 1).count();
        assert!((ones as f64 / 20_000.0 - 0.75).abs() < 0.015);
    }

    #[test]
    fn invalid_values_are_explained() {
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { temperature: f32::NAN, ..Default::default() }.validate().is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
