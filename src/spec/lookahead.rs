//! Lookahead decoding as a proposer: no draft model; each request keeps a Jacobi window
//! and an n-gram pool (`core::lookahead`), drafts them as one tree and learns from the
//! target's tokens over that tree (`Proposer::tree_verified`). Trees only: the one-request
//! engine and the runtime (with its tree shape) run it.

use std::collections::HashMap;

use super::{Draft, Proposer, SeqId, TreeDraft, TreeShape};
use crate::backend::BackendError;
use crate::core::lookahead::{Lookahead, LookaheadConfig};
use crate::core::sampling::SamplingParams;

pub struct LookaheadProposer {
    config: LookaheadConfig,
    seqs: HashMap<SeqId, Lookahead>,
    /// Accepted tokens that came from the pools' n-grams, over released sequences.
    pool_accepted: u64,
}

impl LookaheadProposer {
    pub fn new(config: LookaheadConfig) -> Self {
        LookaheadProposer { config, seqs: HashMap::new(), pool_accepted: 0 }
    }

    pub fn config(&self) -> LookaheadConfig {
        self.config
    }

    /// Accepted tokens that came from n-gram pools (rather than the lookahead branch's
    /// own guesses), over every sequence so far.
    pub fn pool_accepted(&self) -> u64 {
        self.pool_accepted + self.seqs.values().map(|s| s.pool_accepted).sum::<u64>()
    }
}

impl Proposer for LookaheadProposer {
    /// Lookahead drafts trees only: a chain request gets no drafts.
    fn propose(&mut self, _: SeqId, _: &[u32], _: usize, _: &SamplingParams) -> Result<Draft, BackendError> {
        Ok(Draft::default())
    }

    fn release(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.pool_accepted += s.pool_accepted;
        }
    }

    fn drafts_trees(&self) -> bool {
        true
    }

    fn propose_tree(&mut self, seq: SeqId, history: &[u32], shape: TreeShape) -> Result<TreeDraft, BackendError> {
        let Some(&last) = history.last() else { return Ok(TreeDraft::default()) };
        let config = self.config;
        let state = self.seqs.entry(seq).or_insert_with(|| Lookahead::new(config, history));
        Ok(state.draft(last, shape.depth))
    }

    fn tree_verified(&mut self, seq: SeqId, draft: &TreeDraft, targets: &[u32]) {
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.update(draft, targets);
        }
    }
}
