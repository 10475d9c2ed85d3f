//! Pearson's chi-square test of counts drawn against the distribution they should follow:
//! the parity suite's check of sampling on the GPU.

/// The upper-tail probability at which a test fails.
pub const ALPHA: f64 = 1e-4;
/// The standard normal's 1 - ALPHA quantile.
const Z_ALPHA: f64 = 3.719;
/// The least expected count of a bin (the usual rule for the test to hold).
const MIN_EXPECTED: f64 = 5.0;

#[derive(Debug, Clone, Copy)]
pub struct ChiSquare {
    pub statistic: f64,
    /// Degrees of freedom: bins - 1.
    pub dof: usize,
    /// The statistic's 1 - ALPHA quantile.
    pub critical: f64,
    /// Draws of tokens the distribution gives no probability: fails whatever the statistic.
    pub impossible: u64,
}

impl ChiSquare {
    pub fn pass(&self) -> bool {
        self.impossible == 0 && self.statistic <= self.critical
    }
}

/// `counts[i]` draws of token i against probabilities `probs`. Each token expecting at
/// least 5 draws is a bin of its own; the others are pooled into one bin, itself merged
/// into the smallest bin when it still expects fewer than 5.
pub fn test(counts: &[u64], probs: &[f64]) -> ChiSquare {
    let n = counts.iter().sum::<u64>() as f64;
    let (mut bins, mut pool, mut impossible) = (Vec::<(f64, u64)>::new(), (0.0, 0), 0);
    for (&c, &p) in counts.iter().zip(probs) {
        let expected = p * n;
        if p <= 0.0 {
            impossible += c;
        } else if expected >= MIN_EXPECTED {
            bins.push((expected, c));
        } else {
            pool = (pool.0 + expected, pool.1 + c);
        }
    }
    match bins.iter_mut().min_by(|a, b| a.0.total_cmp(&b.0)) {
        Some(smallest) if pool.0 < MIN_EXPECTED => *smallest = (smallest.0 + pool.0, smallest.1 + pool.1),
        _ if pool.0 > 0.0 => bins.push(pool),
        _ => {}
    }
    let statistic = bins.iter().map(|&(e, o)| (o as f64 - e).powi(2) / e).sum();
    let dof = bins.len().saturating_sub(1).max(1);
    ChiSquare { statistic, dof, critical: critical(dof), impossible }
}

/// The chi-square distribution's 1 - ALPHA quantile (Wilson–Hilferty: within 7% at one
/// degree of freedom, erring high, and closer above).
pub fn critical(dof: usize) -> f64 {
    let k = dof as f64;
    let a = 2.0 / (9.0 * k);
    k * (1.0 - a + Z_ALPHA * a.sqrt()).powi(3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn quantiles_match_the_tables() {
        // The exact 1 - 1e-4 quantiles.
        for (dof, exact) in [(1, 15.137), (2, 18.421), (5, 25.745), (10, 35.564), (30, 67.633), (300, 399.756)] {
            let c = critical(dof);
            assert!(c >= exact && c <= exact * 1.075, "{dof}: {c} vs {exact}");
        }
    }

    fn draw(probs: &[f64], n: usize, rng: &mut StdRng) -> Vec<u64> {
        let mut counts = vec![0; probs.len()];
        for _ in 0..n {
            let mut u = rng.random::<f64>();
            let i = probs.iter().position(|&p| {
                u -= p;
                u < 0.0
            });
            counts[i.unwrap_or(probs.len() - 1)] += 1;
        }
        counts
    }

    #[test]
    fn draws_from_the_distribution_pass_and_others_fail() {
        let mut rng = StdRng::seed_from_u64(3);
        // A long tail that must be pooled.
        let probs: Vec<f64> = (0..200).map(|i| 0.8f64.powi(i) * 0.2).collect();
        let fair = test(&draw(&probs, 20_000, &mut rng), &probs);
        assert!(fair.pass(), "{fair:?}");
        assert!(fair.dof > 10 && fair.dof < 40, "{fair:?}");
        let mut skewed = probs.clone();
        skewed.swap(3, 4);
        let off = test(&draw(&skewed, 20_000, &mut rng), &probs);
        assert!(!off.pass(), "{off:?}");
        let mut excluded = probs.clone();
        excluded[150] = 0.0;
        let mut counts = draw(&probs, 20_000, &mut rng);
        counts[150] += 1;
        assert_eq!(test(&counts, &excluded).impossible, 1);
    }
}
