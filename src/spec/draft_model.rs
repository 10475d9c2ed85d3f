//! Drafting with a model: a separate small model, or the target's own first layers
//! (early exit), each with its own KV cache.

use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{Draft, Proposer, SeqId};
use crate::backend::{Backend, BackendError, BatchMeta};
use crate::core::block_pool::BlockPool;
use crate::core::kv_manager::KvStats;
use crate::core::sampling::{distribution, sample_from, SamplingParams};
use crate::model::{KvCache, Llama, ModelConfig};

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

    /// Runs `tokens` at positions `cached..` of `seq`, growing its block table as needed;
    /// returns the last position's logits (on the device: read them before the next call).
    fn forward(&mut self, seq: SeqId, tokens: &[u32]) -> Result<B::Tensor, BackendError> {
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
        let mut meta = BatchMeta::new(bs as u32);
        meta.push_row(tokens, state.cached as u32, &state.blocks, 1);
        state.cached += tokens.len();
        self.backend.forward_step(&self.model, &mut self.kv, &meta, self.layers)
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
        let cached = self.seqs.get(&seq).map_or(0, |s| s.cached.min(history.len() - 1));
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.cached = cached;
        }
        let mut logits = self.forward(seq, &history[cached..])?;
        let mut context = history.to_vec();
        let mut draft = Draft { tokens: Vec::with_capacity(k), probs: (!sampling.is_greedy()).then(Vec::new) };
        for i in 0..k {
            let token = match draft.probs.as_mut() {
                // Greedy: only the id crosses to the host.
                None => self.backend.argmax_rows(&logits, self.model.config.vocab_size)?[0],
                Some(probs) => {
                    // Drafts follow the request's own temperature and top-p, so q is close to p.
                    let q = distribution(&self.backend.to_host(&logits)?, &context, sampling);
                    let t = sample_from(&q, &mut self.rng);
                    probs.push(q);
                    t
                }
            };
            draft.tokens.push(token);
            context.push(token);
            if i + 1 < k {
                logits = self.forward(seq, &[token])?;
            }
        }
        Ok(draft)
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
        Some(KvStats {
            num_blocks: self.pool.num_blocks(),
            used: self.pool.num_used(),
            cached: self.pool.num_cached(),
            ..Default::default()
        })
    }
}
