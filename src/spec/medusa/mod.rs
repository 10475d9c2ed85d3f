//! Medusa drafting: the heads read the target's hidden state at the newest verified
//! position and each guesses one token further ahead; no draft KV cache, no draft forward.
//!
//! ```text
//!  sequence:  x_0 ... x_{n-2} x_{n-1} | d_1  d_2  ...  d_K      (x_{n-1}: the target's newest
//!  hidden:    h_0 ... h_{n-2}         |                          token, not run yet)
//!  LM head(h_{n-2}) gave x_{n-1};  head i (h_{n-2}) guesses d_{i+1}
//! ```
//! A chain takes each head's likeliest token (or samples it with the request's own
//! parameters); a tree combines each head's top-k into a candidate tree (`draft_tree`).

mod head;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::SeedableRng;

pub use head::{MedusaConfig, MedusaHeads, MAX_MEDUSA_HEADS};

use super::{pick_draft_token, Draft, Proposer, SeqId, SpecError, TreeDraft, TreeShape};
use crate::backend::{Backend, BackendError};
use crate::core::sampling::SamplingParams;
use crate::core::tree::{best, expand, select_tree};
use crate::model::Llama;

pub struct MedusaProposer<B: Backend> {
    backend: B,
    target: Arc<Llama<B>>,
    heads: MedusaHeads<B>,
    /// Per sequence: the newest verified position's hidden state, and that position.
    last: HashMap<SeqId, (usize, Vec<f32>)>,
    rng: StdRng,
}

impl<B: Backend> MedusaProposer<B> {
    pub fn new(backend: B, target: Arc<Llama<B>>, heads: MedusaHeads<B>) -> Self {
        MedusaProposer { backend, target, heads, last: HashMap::new(), rng: StdRng::seed_from_u64(0x3ed05a) }
    }

    /// Loads the heads in `dir` (config.json, medusa_lm_head.safetensors) for `target`.
    pub fn load(backend: B, target: Arc<Llama<B>>, dir: &Path) -> Result<Self, SpecError> {
        let heads = MedusaHeads::load(dir, &target.config, &backend)?;
        Ok(Self::new(backend, target, heads))
    }

    /// Random heads (labelled `random_heads` in the statistics): what drafting costs.
    pub fn random(backend: B, target: Arc<Llama<B>>, num_heads: usize) -> Result<Self, SpecError> {
        let heads = MedusaHeads::random(&target.config, num_heads, 0x3ed05a, &backend)?;
        Ok(Self::new(backend, target, heads))
    }

    pub fn heads(&self) -> &MedusaHeads<B> {
        &self.heads
    }

    /// The first `n` heads' logits after `history` (on the device), or None when the
    /// hidden state of the position before its newest token is not known (nothing to
    /// draft from).
    fn head_logits(&self, seq: SeqId, history: &[u32], n: usize) -> Result<Option<Vec<B::Tensor>>, BackendError> {
        let n = n.min(self.heads.config.num_heads);
        match self.last.get(&seq) {
            Some((pos, h)) if n > 0 && *pos + 2 == history.len() => {
                Ok(Some(self.heads.logit_rows(&self.backend, &self.target, h, n)?))
            }
            _ => Ok(None),
        }
    }

    /// A tree of each head's `top_k` likeliest tokens: depth d holds head d-1's guesses
    /// under the `top_k` depth-(d-1) candidates of highest cumulative probability; the
    /// `nodes` best candidates are kept (Medusa's top-k product, capped).
    fn draft_tree(&mut self, seq: SeqId, history: &[u32], shape: TreeShape) -> Result<TreeDraft, BackendError> {
        let Some(logits) = self.head_logits(seq, history, shape.depth)? else { return Ok(TreeDraft::default()) };
        let vocab = self.target.config.vocab_size;
        let mut tops = Vec::with_capacity(logits.len());
        for l in &logits {
            tops.extend(self.backend.top_log_probs_rows(l, vocab, shape.top_k)?);
        }
        let mut cands = vec![];
        let mut level = vec![None];
        for top in &tops {
            let next: Vec<usize> = level.iter().flat_map(|&parent| expand(&mut cands, parent, top)).collect();
            level = best(&cands, next, shape.top_k).into_iter().map(Some).collect();
        }
        Ok(select_tree(&cands, shape.nodes))
    }
}

impl<B: Backend> Proposer for MedusaProposer<B> {
    fn propose(
        &mut self,
        seq: SeqId,
        history: &[u32],
        k: usize,
        sampling: &SamplingParams,
    ) -> Result<Draft, BackendError> {
        let mut draft = Draft { tokens: vec![], probs: (!sampling.is_greedy()).then(Vec::new) };
        let Some(logits) = self.head_logits(seq, history, k)? else { return Ok(draft) };
        for row in &logits {
            let row = self.backend.to_host(row)?;
            let context = [history, &draft.tokens].concat();
            let token = pick_draft_token(&mut draft, &row, &context, sampling, &mut self.rng);
            draft.tokens.push(token);
        }
        Ok(draft)
    }

    fn rollback(&mut self, seq: SeqId, valid: usize) {
        // Position p's hidden state stands while token p does.
        if self.last.get(&seq).is_some_and(|(pos, _)| *pos >= valid) {
            self.last.remove(&seq);
        }
    }

    fn release(&mut self, seq: SeqId) {
        self.last.remove(&seq);
    }

    fn wants_hidden(&self) -> bool {
        true
    }

    fn observe(&mut self, seq: SeqId, start: usize, hidden: &[f32]) {
        let h = self.heads.hidden;
        let rows = hidden.len() / h;
        if rows > 0 {
            self.last.insert(seq, (start + rows - 1, hidden[(rows - 1) * h..rows * h].to_vec()));
        }
    }

    fn drafts_trees(&self) -> bool {
        true
    }

    fn propose_tree(&mut self, seq: SeqId, history: &[u32], shape: TreeShape) -> Result<TreeDraft, BackendError> {
        self.draft_tree(seq, history, shape)
    }

    fn random_weights(&self) -> bool {
        self.heads.random
    }
}
