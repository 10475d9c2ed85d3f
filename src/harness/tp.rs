//! Models for the tensor-parallel checks and benchmarks: the whole model on GPU 0, or its
//! ranks on GPUs 0..N-1 (N = 1 included: the NCCL path with one rank) stepped by the
//! runtime's own rank threads (`TpExecutor`). Both run decode-sized steps through CUDA
//! graphs, as the runtime does.

use std::sync::Arc;

use super::{model_source, Result};
use crate::actors::{Executor, TpExecutor, TpRank};
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BackendError, BatchMeta};
use crate::model::WeightDtype;
use crate::model::{load_model_shard, load_model_with, ForwardStep, KvCache, Llama, LoadOptions, ModelConfig, Shard};
use crate::prompt::BLOCK_SIZE;
use crate::tensor::RankGroup;

/// A model that runs forward steps: whole or split.
pub trait Stepper {
    /// The logits of the step's rows, on the host.
    fn logits(&mut self, meta: &BatchMeta) -> Result<Vec<f32>>;
    /// The greedy id of each row (only ids cross to the host).
    fn ids(&mut self, meta: &BatchMeta) -> Result<Vec<u32>>;
    fn vocab(&self) -> usize;
}

/// The whole model on one backend.
pub struct Whole {
    backend: CudaBackend,
    model: Llama<CudaBackend>,
    kv: KvCache<CudaBackend>,
}

impl Whole {
    /// `model` (a name as the command line takes it) on `backend`, with room for
    /// `positions` tokens.
    pub fn load(backend: CudaBackend, model: &str, dtype: WeightDtype, positions: usize) -> Result<Self> {
        let (model, kv) = load_with_cache(&backend, model, dtype, positions)?;
        Ok(Whole { backend, model, kv })
    }
}

impl Stepper for Whole {
    fn logits(&mut self, meta: &BatchMeta) -> Result<Vec<f32>> {
        let n = self.model.num_layers();
        let out = self.backend.forward_step(&self.model, &mut self.kv, meta, n)?;
        Ok(self.backend.to_host(&out)?)
    }

    fn ids(&mut self, meta: &BatchMeta) -> Result<Vec<u32>> {
        greedy_ids(&self.backend, &self.model, &mut self.kv, meta)
    }

    fn vocab(&self) -> usize {
        self.model.config.vocab_size
    }
}

/// `name`'s model (as the command line names it) on `gpu`, with a KV cache of room for
/// `positions` tokens.
pub fn load_with_cache(
    gpu: &CudaBackend,
    name: &str,
    dtype: WeightDtype,
    positions: usize,
) -> Result<(Llama<CudaBackend>, KvCache<CudaBackend>)> {
    let loaded = load_model_with(&model_source(name)?, &LoadOptions::dtype(dtype), gpu)?;
    let kv = KvCache::new(gpu, &loaded.model.config, positions.div_ceil(BLOCK_SIZE), BLOCK_SIZE)?;
    Ok((loaded.model, kv))
}

/// One step of every layer over `meta` through the step's CUDA graph: each logits row's
/// greedy id (only ids cross to the host).
pub fn greedy_ids(
    gpu: &CudaBackend,
    model: &Llama<CudaBackend>,
    kv: &mut KvCache<CudaBackend>,
    meta: &BatchMeta,
) -> Result<Vec<u32>> {
    let logits = gpu.forward_step(model, kv, meta, model.num_layers())?;
    Ok(gpu.argmax_rows(&logits, model.config.vocab_size)?)
}

/// The model split over `ranks` GPUs, one thread per rank.
pub struct Split {
    exec: TpExecutor,
    vocab: usize,
    /// The whole model's configuration (not a rank's).
    pub config: ModelConfig,
}

impl Split {
    /// Rank i of `model` on GPU i (rank 0 beside `gpu`), with room for `positions` tokens.
    pub fn load(gpu: &CudaBackend, model: &str, dtype: WeightDtype, ranks: usize, positions: usize) -> Result<Self> {
        let (group, backends) = gpu.tensor_parallel(ranks)?;
        Self::on(group, backends, model, dtype, positions)
    }

    /// `model` split over the ranks of `group` (`backends`, in rank order).
    pub fn on(
        group: Arc<dyn RankGroup>,
        backends: Vec<CudaBackend>,
        model: &str,
        dtype: WeightDtype,
        positions: usize,
    ) -> Result<Self> {
        Self::spawn(group, load_ranks(backends, model, dtype, positions)?)
    }

    /// The ranks' threads over their loaded parts.
    pub fn spawn(group: Arc<dyn RankGroup>, parts: Vec<TpRank<CudaBackend>>) -> Result<Self> {
        let config = whole_config(&parts)?;
        Ok(Split { exec: TpExecutor::spawn(group, parts)?, vocab: config.vocab_size, config })
    }
}

/// Rank i's part of `model` on `backends[i]`, with room for `positions` tokens.
pub fn load_ranks(
    backends: Vec<CudaBackend>,
    model: &str,
    dtype: WeightDtype,
    positions: usize,
) -> Result<Vec<TpRank<CudaBackend>>> {
    let (source, ranks) = (model_source(model)?, backends.len());
    let mut parts = Vec::with_capacity(ranks);
    for (rank, backend) in backends.into_iter().enumerate() {
        let loaded = load_model_shard(&source, &LoadOptions::dtype(dtype), Shard { rank, ranks }, &backend)?;
        let kv = KvCache::new(&backend, &loaded.model.config, positions.div_ceil(BLOCK_SIZE), BLOCK_SIZE)?;
        parts.push(TpRank { backend, model: Arc::new(loaded.model), kv });
    }
    Ok(parts)
}

/// The whole model's configuration, from rank 0's part.
pub fn whole_config(parts: &[TpRank<CudaBackend>]) -> Result<ModelConfig> {
    let Some(first) = parts.first() else {
        return Err(BackendError::Invalid("tensor parallelism needs at least one rank".into()).into());
    };
    Ok(Shard { rank: 0, ranks: parts.len() }.whole_config(&first.model.config))
}

impl Stepper for Split {
    fn logits(&mut self, meta: &BatchMeta) -> Result<Vec<f32>> {
        Ok(self.exec.forward(meta)?)
    }

    fn ids(&mut self, meta: &BatchMeta) -> Result<Vec<u32>> {
        Ok(self.exec.forward_ids(meta)?)
    }

    fn vocab(&self) -> usize {
        self.vocab
    }
}

/// A greedy run: the ids after the prompt, each step's logits when kept, and the seconds
/// the steps after the first (the prefill) took.
pub struct Greedy {
    pub ids: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
    pub decode_s: f64,
}

impl Greedy {
    /// Decode steps per second after the prefill.
    pub fn tok_s(&self) -> f64 {
        self.ids.len().saturating_sub(1) as f64 / self.decode_s.max(1e-9)
    }
}

/// `steps` greedy tokens after `prompt`, one decode step each (blocks in order from 0).
pub fn greedy(model: &mut dyn Stepper, prompt: &[u32], steps: usize, keep_logits: bool) -> Result<Greedy> {
    let table: Vec<u32> = (0..(prompt.len() + steps + 1).div_ceil(BLOCK_SIZE) as u32).collect();
    let mut out = Greedy { ids: vec![], logits: vec![], decode_s: 0.0 };
    let (mut tokens, mut pos) = (prompt.to_vec(), 0);
    let mut decode_start = std::time::Instant::now();
    for step in 0..steps {
        if step == 1 {
            decode_start = std::time::Instant::now();
        }
        let mut meta = BatchMeta::new(BLOCK_SIZE as u32);
        meta.push_row(&tokens, pos as u32, &table, 1);
        let next = if keep_logits {
            let logits = model.logits(&meta)?;
            let id = crate::core::sampling::argmax(&logits[..model.vocab().min(logits.len())]);
            out.logits.push(logits);
            id
        } else {
            model.ids(&meta)?.first().copied().unwrap_or(0)
        };
        out.ids.push(next);
        pos += tokens.len();
        tokens = vec![next];
    }
    out.decode_s = decode_start.elapsed().as_secs_f64();
    Ok(out)
}

/// A prompt of `n` token ids spread over the vocabulary (dummy models have no tokenizer).
pub fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab.max(1)) as u32).collect()
}
