//! Speculative decoding: proposers draft tokens, the target verifies them in one forward,
//! and `core::spec` decides what is accepted. The output is the target's own.

mod draft_model;
mod stats;

pub use draft_model::ModelProposer;
pub use stats::SpecStats;

use crate::backend::BackendError;
use crate::core::ngram;
use crate::core::sampling::SamplingParams;

/// Identifies a sequence to a proposer that keeps per-sequence state (a draft KV cache).
pub type SeqId = u64;

/// Proposed tokens, with the draft's distribution for each when the request samples
/// (rejection sampling needs q(x)); `None` for greedy requests and model-free proposers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    pub tokens: Vec<u32>,
    pub probs: Option<Vec<Vec<f32>>>,
}

/// Something that guesses the next tokens of a sequence.
pub trait Proposer: Send {
    /// Up to `k` tokens continuing `history` (prompt and accepted output so far).
    fn propose(&mut self, seq: SeqId, history: &[u32], k: usize, sampling: &SamplingParams)
        -> Result<Draft, BackendError>;
    /// Only the first `valid` tokens of what this proposer has seen of `seq` still stand
    /// (the rest were rejected drafts): forget the others.
    fn rollback(&mut self, _seq: SeqId, _valid: usize) {}
    /// The sequence is finished: free its state.
    fn release(&mut self, _seq: SeqId) {}
}

/// Which proposer, as chosen on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SpecMethod {
    None,
    Ngram,
    Draft,
    EarlyExit,
}

/// Prompt lookup: no model, no state.
#[derive(Debug, Clone)]
pub struct NgramProposer {
    pub min_n: usize,
    pub max_n: usize,
}

impl Default for NgramProposer {
    fn default() -> Self {
        NgramProposer { min_n: 1, max_n: 4 }
    }
}

impl Proposer for NgramProposer {
    fn propose(&mut self, _: SeqId, history: &[u32], k: usize, _: &SamplingParams) -> Result<Draft, BackendError> {
        Ok(Draft { tokens: ngram::propose(history, k, self.min_n, self.max_n), probs: None })
    }
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
