//! Speculation statistics, per request and summed server-wide.

use serde::Serialize;

/// Up to this many draft positions are tracked individually.
pub const MAX_DRAFT_POSITIONS: usize = 16;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SpecStats {
    /// Verification steps that carried at least one draft token.
    pub steps: u64,
    pub drafted: u64,
    pub accepted: u64,
    /// Tokens produced per verification step (accepted drafts + the target's own token).
    pub mean_accepted_length: f64,
    /// Fraction of drafts accepted at each draft position (1st, 2nd, ...); with a tree,
    /// the fraction of steps whose accepted path reached each depth, of those whose tree did.
    pub acceptance_per_position: Vec<f64>,
    #[serde(skip)]
    per_position: Vec<(u64, u64)>,
    /// Set when acceptance was forced (benchmark mode): the output is not the model's.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub synthetic: bool,
    /// Set when the drafts came from random weights (Medusa heads made up to measure cost).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub random_heads: bool,
}

impl SpecStats {
    /// Empty statistics; `synthetic` marks acceptance forced by the benchmark mode.
    pub fn new(synthetic: bool) -> Self {
        SpecStats { synthetic, ..Default::default() }
    }

    /// Records one verification of `drafted` tokens of which the first `accepted` held.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        self.record_tree(drafted, drafted, accepted);
    }

    /// Records one verification of a tree of `nodes` drafts, `depth` deep, whose accepted
    /// path is `accepted` long: the acceptance per position is then per depth (a chain is a
    /// tree as deep as it is long).
    pub fn record_tree(&mut self, nodes: usize, depth: usize, accepted: usize) {
        if nodes == 0 {
            return;
        }
        self.steps += 1;
        self.drafted += nodes as u64;
        self.accepted += accepted as u64;
        if self.per_position.len() < depth.min(MAX_DRAFT_POSITIONS) {
            self.per_position.resize(depth.min(MAX_DRAFT_POSITIONS), (0, 0));
        }
        for (i, slot) in self.per_position.iter_mut().enumerate().take(depth) {
            slot.0 += 1;
            slot.1 += (i < accepted) as u64;
        }
        self.refresh();
    }

    /// Adds another request's statistics (server-wide or batch totals).
    pub fn merge(&mut self, other: &SpecStats) {
        self.synthetic |= other.synthetic;
        self.random_heads |= other.random_heads;
        if other.steps == 0 {
            return;
        }
        self.steps += other.steps;
        self.drafted += other.drafted;
        self.accepted += other.accepted;
        if self.per_position.len() < other.per_position.len() {
            self.per_position.resize(other.per_position.len(), (0, 0));
        }
        for (mine, theirs) in self.per_position.iter_mut().zip(&other.per_position) {
            mine.0 += theirs.0;
            mine.1 += theirs.1;
        }
        self.refresh();
    }

    fn refresh(&mut self) {
        self.mean_accepted_length = (self.accepted + self.steps) as f64 / self.steps as f64;
        self.acceptance_per_position = self.per_position.iter().map(|&(d, a)| a as f64 / d as f64).collect();
    }

    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_position_and_mean_length() {
        let mut s = SpecStats::default();
        s.record(4, 2);
        s.record(4, 4);
        s.record(0, 0);
        assert_eq!((s.steps, s.drafted, s.accepted), (2, 8, 6));
        assert_eq!(s.mean_accepted_length, 4.0);
        assert_eq!(s.acceptance_per_position, vec![1.0, 1.0, 0.5, 0.5]);
        let mut total = SpecStats::default();
        total.merge(&s);
        total.merge(&SpecStats::default());
        let mut other = SpecStats::default();
        other.record(2, 0);
        total.merge(&other);
        assert_eq!((total.steps, total.drafted, total.accepted), (3, 10, 6));
        assert_eq!(total.acceptance_per_position, vec![2.0 / 3.0, 2.0 / 3.0, 0.5, 0.5]);
    }

    #[test]
    fn trees_count_nodes_drafted_and_depths_reached() {
        let mut s = SpecStats::default();
        s.record_tree(16, 4, 3);
        s.record_tree(16, 2, 1);
        assert_eq!((s.steps, s.drafted, s.accepted), (2, 32, 4));
        assert_eq!(s.mean_accepted_length, 3.0);
        assert_eq!(s.acceptance_per_position, vec![1.0, 0.5, 1.0, 0.0]);
    }
}
