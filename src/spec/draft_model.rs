//! Drafting with a model: a separate small model, or the target's own first layers
//! (early exit), each with its own KV cache.

use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{pick_draft_token, propose_one, Draft, ProposeRequest, Proposer, SeqId};
use crate::backend::{Backend, BackendError, BatchMeta};
use crate::core::block_pool::BlockPool;
use crate::core::kv_manager::KvStats;
use crate::core::sampling::SamplingParams;
use crate::model::{ForwardStep, KvCache, Llama, ModelConfig};

/// Per-sequence state: how many leading tokens of the history are in the draft cache.
struct DraftSeq {
    cached: usize,
    blocks: Vec<u32>,
}

pub struct ModelProposer<B: Backend> {
    backend: B,
    model: Arc<Llama<B>>,
    /// Layers run: all of them for a separate draft model, the first N for early exit.
    layers: usize,
    kv: KvCache<B>,
    pool: BlockPool,
    seqs: HashMap<SeqId, DraftSeq>,
    rng: StdRng,
}

impl<B: Backend> ModelProposer<B> {
    /// A proposer running `layers` layers of `model` (all of them: a draft model; fewer: an
    /// early-exit self-draft sharing the target's weights), with a KV cache of
    /// `num_blocks` blocks of `block_size` tokens.
    pub fn new(
        backend: B,
        model: Arc<Llama<B>>,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, BackendError> {
        assert!(layers >= 1 && layers <= model.num_layers(), "draft layers out of range");
        // An early exit needs the cache of its own layers only.
        let config = ModelConfig { num_layers: layers, ..model.config.clone() };
        let kv = KvCache::new(&backend, &config, num_blocks, block_size)?;
        Ok(ModelProposer {
            backend,
            model,
            layers,
            kv,
            pool: BlockPool::new(num_blocks, block_size),
            seqs: HashMap::new(),
            rng: StdRng::seed_from_u64(0x5eed),
        })
    }

    /// Adds `tokens` at positions `cached..` of `seq` to `meta`, growing its block table.
    fn push_row(&mut self, meta: &mut BatchMeta, seq: SeqId, tokens: &[u32]) -> Result<(), BackendError> {
        let bs = self.kv.block_size;
        let state = self.seqs.entry(seq).or_insert(DraftSeq { cached: 0, blocks: vec![] });
        let need = (state.cached + tokens.len()).div_ceil(bs);
        if need > state.blocks.len() {
            let more = self
                .pool
                .allocate_n(need - state.blocks.len())
                .ok_or_else(|| BackendError::Invalid("the draft model's KV cache is full".into()))?;
            state.blocks.extend(more);
        }
        meta.push_row(tokens, state.cached as u32, &state.blocks, 1);
        state.cached += tokens.len();
        Ok(())
    }

    /// One forward over `rows` (request index, tokens to feed); returns each row's next
    /// token, sampled from its logits with the request's parameters (the distribution is
    /// appended to the draft's probabilities when it samples).
    fn step(
        &mut self,
        reqs: &[ProposeRequest],
        rows: &[(usize, Vec<u32>)],
        drafts: &mut [Draft],
        contexts: &[Vec<u32>],
    ) -> Result<Vec<u32>, BackendError> {
        let mut meta = BatchMeta::new(self.kv.block_size as u32);
        for (i, tokens) in rows {
            self.push_row(&mut meta, reqs[*i].seq, tokens)?;
        }
        let logits = self.backend.forward_step(&self.model, &mut self.kv, &meta, self.layers)?;
        let vocab = self.model.config.vocab_size;
        if rows.iter().all(|(i, _)| reqs[*i].sampling.is_greedy()) {
            // Only the ids cross to the host.
            return self.backend.argmax_rows(&logits, vocab);
        }
        let host = self.backend.to_host(&logits)?;
        let mut picked = Vec::with_capacity(rows.len());
        for ((i, _), row) in rows.iter().zip(host.chunks(vocab)) {
            picked.push(pick_draft_token(&mut drafts[*i], row, &contexts[*i], reqs[*i].sampling, &mut self.rng));
        }
        Ok(picked)
    }
}

impl<B: Backend> Proposer for ModelProposer<B> {
    fn propose(
        &mut self,
        seq: SeqId,
        history: &[u32],
        k: usize,
        sampling: &SamplingParams,
    ) -> Result<Draft, BackendError> {
        propose_one(self, ProposeRequest { seq, history, k, sampling })
    }

    /// All sequences advance together, one forward per draft position: first each catches
    /// up on the history its cache lacks, then each feeds its last drafted token.
    fn propose_many(&mut self, reqs: &[ProposeRequest]) -> Vec<Result<Draft, BackendError>> {
        let mut drafts: Vec<Draft> = reqs.iter().map(ProposeRequest::empty_draft).collect();
        // Only sampling rows need the context (for penalties); greedy rows skip the copy.
        let mut contexts: Vec<Vec<u32>> =
            reqs.iter().map(|r| if r.sampling.is_greedy() { vec![] } else { r.history.to_vec() }).collect();
        let mut rows = vec![];
        let mut start = vec![0; reqs.len()];
        for (i, r) in reqs.iter().enumerate().filter(|(_, r)| r.k > 0 && !r.history.is_empty()) {
            let cached = self.seqs.get(&r.seq).map_or(0, |s| s.cached.min(r.history.len() - 1));
            if let Some(s) = self.seqs.get_mut(&r.seq) {
                s.cached = cached;
            }
            start[i] = cached;
            rows.push((i, r.history[cached..].to_vec()));
        }
        while !rows.is_empty() {
            match self.step(reqs, &rows, &mut drafts, &contexts) {
                Ok(picked) => {
                    let mut next = vec![];
                    for ((i, _), token) in rows.iter().zip(picked) {
                        drafts[*i].tokens.push(token);
                        contexts[*i].push(token);
                        if drafts[*i].tokens.len() < reqs[*i].k {
                            next.push((*i, vec![token]));
                        }
                    }
                    rows = next;
                }
                Err(e) => {
                    // The cache is unreliable past where these rows started: forget it.
                    let message = e.to_string();
                    let failed: Vec<usize> = rows.iter().map(|(i, _)| *i).collect();
                    for &i in &failed {
                        self.rollback(reqs[i].seq, start[i]);
                    }
                    let mut out: Vec<Result<Draft, BackendError>> = drafts.into_iter().map(Ok).collect();
                    for i in failed {
                        out[i] = Err(BackendError::Invalid(message.clone()));
                    }
                    return out;
                }
            }
        }
        drafts.into_iter().map(Ok).collect()
    }

    fn rollback(&mut self, seq: SeqId, valid: usize) {
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.cached = s.cached.min(valid);
        }
    }

    fn release(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.pool.free_all(&s.blocks);
        }
    }

    fn kv_stats(&self) -> Option<KvStats> {
        Some(KvStats::of_pool(&self.pool))
    }
}
