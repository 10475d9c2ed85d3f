//! What the Verifier runs a step's forward on: the model (any backend), or for benchmarks
//! of the runtime itself nothing at all.

use std::sync::Arc;

use super::error::ExecutorError;
use crate::backend::{Backend, BackendError, BatchMeta};
use crate::core::sampling::{argmax, sample_row, RowSampling};
use crate::model::{hidden_to_host, ForwardStep, HiddenKind, KvCache, Llama};

/// Runs forwards for the Verifier. `Error` is how a forward fails: `BackendError` for the
/// model; text (the default) for executors written for tests and benchmarks.
pub trait Executor<Error = String>: Send + 'static
where
    Error: Into<ExecutorError>,
{
    fn vocab_size(&self) -> usize;
    /// After a failed step (an error, or a panic caught at the Verifier's boundary): whether
    /// this executor can run further steps. The failed step's rows are dropped and their KV
    /// blocks released, so nothing the step wrote is read again; what is left to check is
    /// the executor itself (a GPU with a sticky error cannot go on). Kept by default.
    fn recover(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// Logits `[meta.logits_for.len(), vocab]`, row-major.
    fn forward(&mut self, meta: &BatchMeta) -> Result<Vec<f32>, Error>;
    /// The greedy id of each of those rows instead (from a GPU, only ids cross to the host).
    fn forward_ids(&mut self, meta: &BatchMeta) -> Result<Vec<u32>, Error> {
        let vocab = self.vocab_size();
        Ok(self.forward(meta)?.chunks(vocab).map(argmax).collect())
    }
    /// One token per logits row, each sampled as its `RowSampling` says (a row that only
    /// needs ids: `RowSampling::greedy`). From a GPU, only the ids cross to the host.
    fn forward_sampled(&mut self, meta: &BatchMeta, rows: &[RowSampling]) -> Result<Vec<u32>, Error> {
        let vocab = self.vocab_size();
        Ok(self.forward(meta)?.chunks(vocab).zip(rows).map(|(l, r)| sample_row(l, r)).collect())
    }
    /// Whether the first step of each size is a warm-up, slower than the ones after it
    /// (`Backend::warms_up`): the step-cost model and the delivery guard leave it out.
    fn warms_up(&self) -> bool {
        true
    }
    /// From now on, keep the hidden states `kind` names that every forward computes (for a
    /// proposer that reads them); false when this executor has none to keep.
    fn keep_hidden(&mut self, _kind: HiddenKind) -> bool {
        false
    }
    /// The last forward's hidden states, `[tokens, parts * hidden]` row-major in the
    /// batch's token order, when kept.
    fn take_hidden(&mut self) -> Option<Vec<f32>> {
        None
    }
    /// Whether `copy_slots` moves this executor's KV entries: tree speculation needs it
    /// (an accepted path's entries move onto consecutive positions).
    fn copies_slots(&self) -> bool {
        false
    }
    /// Copies each `(from, to)` KV slot's keys and values, in order, in every layer.
    fn copy_slots(&mut self, _moves: &[(u32, u32)]) -> Result<(), Error> {
        Ok(())
    }
}

/// The target model with its paged KV cache (block ids are the KvAllocator's).
pub struct ModelExecutor<B: Backend> {
    pub backend: B,
    pub model: Arc<Llama<B>>,
    pub kv: KvCache<B>,
    /// The last forward's hidden states, when asked to keep them (`Some` from then on).
    hidden: Option<Vec<f32>>,
    /// Which hidden states to keep.
    hidden_kind: HiddenKind,
}

impl<B: Backend> ModelExecutor<B> {
    pub fn new(backend: B, model: Arc<Llama<B>>, kv: KvCache<B>) -> Self {
        ModelExecutor { backend, model, kv, hidden: None, hidden_kind: HiddenKind::Last }
    }

    /// The logits of `meta`, keeping the hidden states when asked to. A GPU replays the
    /// graph it captured for a step of this shape (`forward_step`, `forward_step_hidden`).
    fn logits(&mut self, meta: &BatchMeta) -> Result<B::Tensor, BackendError> {
        if self.hidden.is_none() {
            let layers = self.model.num_layers();
            return self.backend.forward_step(&self.model, &mut self.kv, meta, layers);
        }
        let kind = self.hidden_kind;
        let (logits, hidden) = self.backend.forward_step_hidden(&self.model, &mut self.kv, meta, kind)?;
        self.hidden = Some(hidden_to_host(&self.backend, &hidden, self.model.config.hidden_size)?);
        Ok(logits)
    }
}

impl<B: Backend> Executor<BackendError> for ModelExecutor<B> {
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn recover(&mut self) -> Result<(), BackendError> {
        self.backend.healthy()
    }

    fn warms_up(&self) -> bool {
        self.backend.warms_up()
    }

    fn forward(&mut self, meta: &BatchMeta) -> Result<Vec<f32>, BackendError> {
        let logits = self.logits(meta)?;
        self.backend.to_host(&logits)
    }

    fn forward_ids(&mut self, meta: &BatchMeta) -> Result<Vec<u32>, BackendError> {
        let logits = self.logits(meta)?;
        self.backend.argmax_rows(&logits, self.model.config.vocab_size)
    }

    fn forward_sampled(&mut self, meta: &BatchMeta, rows: &[RowSampling]) -> Result<Vec<u32>, BackendError> {
        let logits = self.logits(meta)?;
        self.backend.sample_rows(&logits, self.model.config.vocab_size, rows)
    }

    fn keep_hidden(&mut self, kind: HiddenKind) -> bool {
        self.hidden_kind = kind;
        self.hidden.get_or_insert_with(Vec::new);
        true
    }

    fn take_hidden(&mut self) -> Option<Vec<f32>> {
        self.hidden.as_mut().map(std::mem::take)
    }

    fn copies_slots(&self) -> bool {
        true
    }

    fn copy_slots(&mut self, moves: &[(u32, u32)]) -> Result<(), BackendError> {
        match moves.is_empty() {
            true => Ok(()),
            false => self.kv.copy_slots(&self.backend, moves),
        }
    }
}

/// No model: logits that make token `(last input + 1) % vocab` the greedy choice. Measures
/// what the runtime costs per step (scheduling, messages, sampling a tiny vocabulary).
pub struct NoopExecutor {
    pub vocab: usize,
}

impl Executor for NoopExecutor {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn forward(&mut self, meta: &BatchMeta) -> Result<Vec<f32>, String> {
        let mut out = vec![0f32; meta.logits_for.len() * self.vocab];
        for (row, &t) in meta.logits_for.iter().enumerate() {
            let next = (meta.tokens[t as usize] as usize + 1) % self.vocab;
            out[row * self.vocab + next] = 1.0;
        }
        Ok(out)
    }

    /// No KV entries to move: trees run (their targets come from the tokens alone).
    fn copies_slots(&self) -> bool {
        true
    }
}
