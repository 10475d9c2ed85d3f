//! What the Verifier runs a step's forward on: the model (any backend), or for benchmarks
//! of the runtime itself nothing at all.

use std::sync::Arc;

use super::error::ExecutorError;
use crate::backend::{Backend, BackendError, BatchMeta};
use crate::core::sampling::argmax;
use crate::model::{ForwardStep, KvCache, Llama};

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
}

/// The target model with its paged KV cache (block ids are the KvAllocator's).
pub struct ModelExecutor<B: Backend> {
    pub backend: B,
    pub model: Arc<Llama<B>>,
    pub kv: KvCache<B>,
}

impl<B: Backend> Executor<BackendError> for ModelExecutor<B> {
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn recover(&mut self) -> Result<(), BackendError> {
        self.backend.healthy()
    }

    fn forward(&mut self, meta: &BatchMeta) -> Result<Vec<f32>, BackendError> {
        // `forward_step`: a GPU replays the graph it captured for a step of this shape.
        let layers = self.model.num_layers();
        let logits = self.backend.forward_step(&self.model, &mut self.kv, meta, layers)?;
        self.backend.to_host(&logits)
    }

    fn forward_ids(&mut self, meta: &BatchMeta) -> Result<Vec<u32>, BackendError> {
        let layers = self.model.num_layers();
        let logits = self.backend.forward_step(&self.model, &mut self.kv, meta, layers)?;
        self.backend.argmax_rows(&logits, self.model.config.vocab_size)
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
}
