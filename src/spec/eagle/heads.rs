//! The heads an `EagleProposer` drafts with, behind one face: EAGLE-1 (the target's final
//! hidden state, the target's LM head) and EAGLE-3 (three of the target's layers fused, a
//! draft vocabulary of its own mapped onto the target's).

use std::path::Path;
use std::sync::Arc;

use super::eagle3::{is_eagle3, Eagle3Head};
use super::head::{check_sizes, EagleHead};
use crate::model::{HiddenKind, KvCache, Llama, ModelConfig};
use crate::spec::SpecError;
use crate::tensor::{Backend, BatchMeta, Result};

/// A drafting head of either generation.
pub enum Head<B: Backend> {
    One(EagleHead<B>),
    Three(Eagle3Head<B>),
}

impl<B: Backend> From<EagleHead<B>> for Head<B> {
    fn from(h: EagleHead<B>) -> Self {
        Head::One(h)
    }
}

impl<B: Backend> From<Eagle3Head<B>> for Head<B> {
    fn from(h: Eagle3Head<B>) -> Self {
        Head::Three(h)
    }
}

/// A head forward's logits over the head's vocabulary, with the map onto the target's.
pub struct HeadLogits<B: Backend> {
    pub tensor: B::Tensor,
    /// Draft id → target id; `None`: the head's vocabulary is the target's.
    map: Option<Arc<[u32]>>,
    /// The target's vocabulary size.
    vocab: usize,
}

impl<B: Backend> HeadLogits<B> {
    /// Each row's likeliest token, as a target id (on a GPU only the ids cross).
    pub fn argmax(&self, b: &B) -> Result<Vec<u32>> {
        let ids = b.argmax_rows(&self.tensor, self.map.as_ref().map_or(self.vocab, |m| m.len()))?;
        Ok(match &self.map {
            Some(map) => ids.into_iter().map(|i| map[i as usize]).collect(),
            None => ids,
        })
    }

    /// Each row's `k` likeliest tokens (target ids) with their log-probabilities, ranked
    /// over the head's own vocabulary: the same as over the target's with the rest at −∞.
    pub fn top_log_probs(&self, b: &B, k: usize) -> Result<Vec<Vec<(u32, f64)>>> {
        let width = self.map.as_ref().map_or(self.vocab, |m| m.len()).max(1);
        let map = |t: u32| self.map.as_ref().map_or(t, |m| m[t as usize]);
        let tops = b.top_log_probs_rows(&self.tensor, width, k)?;
        Ok(tops.into_iter().map(|row| row.into_iter().map(|(t, l)| (map(t), l)).collect()).collect())
    }

    /// The rows on the host over the target's vocabulary, `[rows, vocab]`: a token outside
    /// the head's vocabulary has logit −∞ (draft probability 0).
    pub fn host_rows(&self, b: &B) -> Result<Vec<f32>> {
        let host = b.to_host(&self.tensor)?;
        let Some(map) = &self.map else { return Ok(host) };
        let rows = host.len() / map.len().max(1);
        let mut out = vec![f32::NEG_INFINITY; rows * self.vocab];
        for (row, src) in out.chunks_mut(self.vocab).zip(host.chunks(map.len().max(1))) {
            for (&t, &l) in map.iter().zip(src) {
                row[t as usize] = l;
            }
        }
        Ok(out)
    }
}

impl<B: Backend> Head<B> {
    /// The head in `dir` for `target`, EAGLE-3 when its files say so (`is_eagle3`).
    pub fn load(dir: &Path, target: &ModelConfig, b: &B) -> std::result::Result<Self, SpecError> {
        match is_eagle3(dir) {
            true => Ok(Head::Three(Eagle3Head::load(dir, target, b)?)),
            false => Ok(Head::One(EagleHead::load(dir, target, b)?)),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Head::One(h) => &h.config,
            Head::Three(h) => &h.config,
        }
    }

    /// Refuses a head for another target (EAGLE-3 heads were checked as they loaded).
    pub fn check(&self, target: &ModelConfig) -> std::result::Result<(), SpecError> {
        match self {
            Head::One(h) => check_sizes(&h.config, target),
            Head::Three(h) => check_sizes(&h.config, target),
        }
    }

    pub fn kv_cache(&self, b: &B, num_blocks: usize, block_size: usize) -> Result<KvCache<B>> {
        match self {
            Head::One(h) => h.kv_cache(b, num_blocks, block_size),
            Head::Three(h) => h.kv_cache(b, num_blocks, block_size),
        }
    }

    /// The target's hidden states the head reads.
    pub fn hidden_kind(&self) -> HiddenKind {
        match self {
            Head::One(_) => HiddenKind::Last,
            Head::Three(h) => h.hidden_kind(),
        }
    }

    /// Values per position of the target's features (`hidden_kind`'s parts × hidden).
    pub fn feature_width(&self) -> usize {
        self.hidden_kind().parts() * self.config().hidden_size
    }

    /// One head forward (`EagleHead::step`, `Eagle3Head::step`): the predicted features of
    /// the rows that want logits, and their logits.
    pub fn step(
        &self,
        b: &B,
        target: &Llama<B>,
        kv: &mut KvCache<B>,
        meta: &BatchMeta,
        features: &[f32],
    ) -> Result<(Vec<f32>, HeadLogits<B>)> {
        let vocab = target.config.vocab_size;
        let (out, tensor, map) = match self {
            Head::One(h) => {
                let (out, tensor) = h.step(b, target, kv, meta, features)?;
                (out, tensor, None)
            }
            Head::Three(h) => {
                let (out, tensor) = h.step(b, target, kv, meta, features)?;
                (out, tensor, h.draft_map())
            }
        };
        Ok((out, HeadLogits { tensor, map, vocab }))
    }
}
