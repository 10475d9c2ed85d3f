//! A model on the GPU with its KV cache and the sequence decoded so far: greedy steps,
//! timed on the host clock.

use std::time::Instant;

use super::run::median;
use super::{dtype_label, Variant};
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BatchMeta};
use crate::harness::tp::{greedy_ids, load_with_cache};
use crate::harness::Result;
use crate::model::{KvCache, Llama, ModelConfig, WeightDtype};
use crate::prompt::BLOCK_SIZE;

/// `count` greedy steps, each `step` from the previous id (the first from `next`): tok/s
/// on the host clock, which includes the id's trip to the host at every step (what a
/// server pays), and the last id.
pub fn timed_decode(mut next: u32, count: usize, mut step: impl FnMut(u32) -> Result<u32>) -> Result<(f64, u32)> {
    let start = Instant::now();
    for _ in 0..count {
        next = step(next)?;
    }
    Ok((count as f64 / start.elapsed().as_secs_f64(), next))
}

/// Bytes of weights one decode step reads: bf16, or with `fp8` one byte for each projection
/// (and untied head) value; the embedding table and norms stay bf16.
pub fn weight_bytes(c: &ModelConfig, dtype: WeightDtype) -> f64 {
    let all = c.parameter_count() as f64;
    match dtype {
        WeightDtype::Auto => all * 2.0,
        WeightDtype::Fp8 => {
            let kept = (c.vocab_size * c.hidden_size + (2 * c.num_layers + 1) * c.hidden_size) as f64;
            (all - kept) + kept * 2.0
        }
    }
}

impl Variant {
    pub fn apply(&self, gpu: &CudaBackend) {
        gpu.set_pdl(self.pdl);
    }
}

/// A model with its KV cache and the sequence decoded so far.
pub struct Run<'a> {
    pub gpu: &'a CudaBackend,
    pub model: Llama<CudaBackend>,
    pub kv: KvCache<CudaBackend>,
    pub table: Vec<u32>,
    pub tokens: Vec<u32>,
    dtype: WeightDtype,
}

impl<'a> Run<'a> {
    pub fn load(gpu: &'a CudaBackend, name: &str, dtype: WeightDtype, capacity: usize) -> Result<Self> {
        let (model, kv) = load_with_cache(gpu, name, dtype, capacity)?;
        gpu.synchronize()?;
        let table = (0..capacity.div_ceil(BLOCK_SIZE) as u32).collect();
        Ok(Run { gpu, model, kv, table, tokens: vec![], dtype })
    }

    /// Bytes of weights one decode step reads (`weight_bytes`).
    pub fn weight_bytes(&self) -> f64 {
        weight_bytes(&self.model.config, self.dtype)
    }

    pub fn dtype_label(&self) -> &'static str {
        dtype_label(self.dtype)
    }

    /// One step over `new` tokens after the sequence; returns the greedy ids (one per
    /// logits row).
    fn step(&mut self, new: &[u32], want: usize, graphed: bool) -> Result<Vec<u32>> {
        let mut meta = BatchMeta::new(BLOCK_SIZE as u32);
        let cached = self.tokens.len() as u32;
        meta.push_row(new, cached, &self.table, want);
        if graphed {
            return greedy_ids(self.gpu, &self.model, &mut self.kv, &meta);
        }
        let logits = self.model.forward(self.gpu, &mut self.kv, &meta)?;
        Ok(self.gpu.argmax_rows(&logits, self.model.config.vocab_size)?)
    }

    pub fn prefill(&mut self, len: usize) -> Result<u32> {
        let vocab = self.model.config.vocab_size as u32;
        let prompt: Vec<u32> = (0..len as u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let ids = self.step(&prompt, 1, false)?;
        self.tokens = prompt;
        Ok(ids[0])
    }

    /// Greedy decode of `count` tokens (`timed_decode`).
    pub fn decode(&mut self, next: u32, count: usize, graphed: bool) -> Result<(f64, u32)> {
        timed_decode(next, count, |token| {
            let id = self.step(&[token], 1, graphed)?[0];
            self.tokens.push(token);
            Ok(id)
        })
    }

    /// Median host time of one step over `tokens` tokens at the current position (not
    /// committed, so every repetition writes the same KV slots).
    pub fn time_step(&mut self, tokens: usize, reps: usize) -> Result<f64> {
        let new: Vec<u32> = (0..tokens as u32).map(|i| i + 100).collect();
        self.step(&new, tokens, true)?; // capture
        let mut times = vec![];
        for _ in 0..reps {
            let start = Instant::now();
            self.step(&new, tokens, true)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(times))
    }
}
