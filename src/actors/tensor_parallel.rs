//! The Verifier's executor for a tensor-parallel target: one OS thread per rank, each
//! holding its part of the model (`Shard`) and its own KV cache (its KV heads). A step is
//! sent to every rank; all run the same forward in lockstep, meeting in the all-reduce that
//! follows each row-parallel projection (`Backend::all_reduce`); rank 0's logits (the head
//! is replicated, so every rank has the same ones) are the step's result.
//!
//! The executor knows ranks only through `Backend` and `RankGroup`: a backend whose
//! `all_reduce` talks to other devices (NCCL) runs here unchanged.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::executor::Executor;
use super::{RuntimeBuilder, RuntimeError, RuntimeHandle};
use crate::backend::{Backend, BackendError, BatchMeta};
use crate::core::sampling::{RowSampling, SamplingParams};
use crate::model::{ForwardStep, KvCache, Llama, Tokenizer};
use crate::tensor::RankGroup;

/// One rank: its backend (which knows its group), its part of the model, its KV cache.
pub struct TpRank<B: Backend> {
    pub backend: B,
    pub model: Arc<Llama<B>>,
    pub kv: KvCache<B>,
}

#[derive(Clone)]
enum Want {
    Logits,
    Ids,
    /// Ids sampled as these rows say (`Executor::forward_sampled`).
    Sampled(Arc<Vec<OwnedRow>>),
}

/// A `RowSampling` that can cross to the rank threads.
struct OwnedRow {
    params: SamplingParams,
    /// Only where a repetition penalty reads it.
    history: Vec<u32>,
    uniform: f64,
}

impl OwnedRow {
    fn new(r: &RowSampling) -> Self {
        OwnedRow { params: r.params.clone(), history: r.read_history().to_vec(), uniform: r.uniform }
    }

    fn row(&self) -> RowSampling<'_> {
        RowSampling { params: &self.params, history: &self.history, uniform: self.uniform }
    }
}

/// What a step gives back: rank 0's logits or greedy ids; nothing from the others.
enum Output {
    Logits(Vec<f32>),
    Ids(Vec<u32>),
    Nothing,
}

type RankResult = (usize, Result<Output, BackendError>);

/// The ranks' threads, and the group that stops them all when one fails.
pub struct TpExecutor {
    vocab: usize,
    group: Arc<dyn RankGroup>,
    jobs: Vec<Sender<(Arc<BatchMeta>, Want)>>,
    results: Receiver<RankResult>,
    threads: Vec<JoinHandle<()>>,
}

impl TpExecutor {
    /// Starts one thread per rank (`ranks` in rank order, all of `group`).
    pub fn spawn<B: Backend>(group: Arc<dyn RankGroup>, ranks: Vec<TpRank<B>>) -> std::io::Result<Self> {
        let vocab = ranks.first().map_or(0, |r| r.model.config.vocab_size);
        let (results_tx, results) = bounded(ranks.len());
        let (mut jobs, mut threads) = (vec![], vec![]);
        for (index, rank) in ranks.into_iter().enumerate() {
            let (tx, rx) = bounded(1);
            let (results_tx, group) = (results_tx.clone(), group.clone());
            let t = std::thread::Builder::new().name(format!("specula-tp-rank-{index}"));
            threads.push(t.spawn(move || rank.run(index, &rx, &results_tx, &*group))?);
            jobs.push(tx);
        }
        Ok(TpExecutor { vocab, group, jobs, results, threads })
    }

    /// Runs one step on every rank; rank 0's output, or the first error any rank met.
    fn step(&mut self, meta: &BatchMeta, want: Want) -> Result<Output, BackendError> {
        let meta = Arc::new(meta.clone());
        let stopped = |rank: usize| BackendError::Device(format!("tensor-parallel rank {rank} has stopped"));
        for (rank, jobs) in self.jobs.iter().enumerate() {
            if jobs.send((meta.clone(), want.clone())).is_err() {
                // The ranks already sent this step must not wait for this one.
                self.group.abort();
                self.drain(rank);
                self.group.reset();
                return Err(stopped(rank));
            }
        }
        let (mut first, mut error) = (None, None);
        for _ in 0..self.jobs.len() {
            match self.results.recv() {
                Ok((0, Ok(out))) => first = Some(out),
                Ok((_, Ok(_))) => {}
                // The first error sent is the one that made the others' all-reduce fail.
                Ok((_, Err(e))) => error = error.or(Some(e)),
                Err(_) => return Err(stopped(0)),
            }
        }
        if let Some(e) = error {
            self.group.reset();
            return Err(e);
        }
        first.ok_or_else(|| stopped(0))
    }

    /// Waits for the `sent` ranks that got the step to finish it.
    fn drain(&self, sent: usize) {
        for _ in 0..sent {
            let _ = self.results.recv();
        }
    }
}

impl<B: Backend> TpRank<B> {
    /// The rank's thread: steps until the executor is dropped. A failing (or panicking)
    /// step reports first, then aborts the group so that no other rank waits for it.
    fn run(
        mut self,
        index: usize,
        jobs: &Receiver<(Arc<BatchMeta>, Want)>,
        out: &Sender<RankResult>,
        group: &dyn RankGroup,
    ) {
        while let Ok((meta, want)) = jobs.recv() {
            let result = catch_unwind(AssertUnwindSafe(|| self.step(index, &meta, want)))
                .unwrap_or_else(|_| Err(BackendError::Device(format!("tensor-parallel rank {index} panicked"))));
            let failed = result.is_err();
            if out.send((index, result)).is_err() {
                return;
            }
            if failed {
                group.abort();
            }
        }
    }

    fn step(&mut self, index: usize, meta: &BatchMeta, want: Want) -> Result<Output, BackendError> {
        let layers = self.model.num_layers();
        let logits = self.backend.forward_step(&self.model, &mut self.kv, meta, layers)?;
        let vocab = self.model.config.vocab_size;
        Ok(match (index, want) {
            (0, Want::Logits) => Output::Logits(self.backend.to_host(&logits)?),
            (0, Want::Ids) => Output::Ids(self.backend.argmax_rows(&logits, vocab)?),
            (0, Want::Sampled(rows)) => {
                let rows: Vec<RowSampling> = rows.iter().map(OwnedRow::row).collect();
                Output::Ids(self.backend.sample_rows(&logits, vocab, &rows)?)
            }
            _ => Output::Nothing,
        })
    }
}

impl RuntimeBuilder {
    /// Starts the runtime around a tensor-parallel target: `ranks`, in rank order, each a
    /// backend of `group` and its part of the model (`Llama::load_shard`). Each rank's KV
    /// cache holds its KV heads for every block of the pool.
    pub fn build_tensor_parallel<B: Backend>(
        self,
        group: Arc<dyn RankGroup>,
        ranks: Vec<(B, Arc<Llama<B>>)>,
        tokenizer: Option<impl Into<Arc<Tokenizer>>>,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let tokenizer = tokenizer.map(Into::into);
        let Some((backend, model)) = ranks.first() else {
            return Err(BackendError::Invalid("tensor parallelism needs at least one rank".into()).into());
        };
        let builder = self.sized(backend, &model.config, ranks.len())?;
        let info = builder.model_info(&model.config, tokenizer.as_deref());
        let (c, mut parts) = (&builder.config, Vec::with_capacity(ranks.len()));
        let num_blocks = c.checked_blocks()?;
        for (backend, model) in ranks {
            let kv = KvCache::with_options(&backend, &model.config, num_blocks, c.block_size, c.kv)?;
            parts.push(TpRank { backend, model, kv });
        }
        let exec = TpExecutor::spawn(group, parts)?;
        builder.build_with(exec, info, tokenizer)
    }
}

impl Executor<BackendError> for TpExecutor {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn forward(&mut self, meta: &BatchMeta) -> Result<Vec<f32>, BackendError> {
        match self.step(meta, Want::Logits)? {
            Output::Logits(l) => Ok(l),
            _ => Err(BackendError::Invalid("tensor-parallel rank 0 returned no logits".into())),
        }
    }

    fn forward_ids(&mut self, meta: &BatchMeta) -> Result<Vec<u32>, BackendError> {
        self.forward_ids_as(meta, Want::Ids)
    }

    fn forward_sampled(&mut self, meta: &BatchMeta, rows: &[RowSampling]) -> Result<Vec<u32>, BackendError> {
        self.forward_ids_as(meta, Want::Sampled(Arc::new(rows.iter().map(OwnedRow::new).collect())))
    }
}

impl TpExecutor {
    /// A step whose rank 0 returns ids (`want` is `Ids` or `Sampled`).
    fn forward_ids_as(&mut self, meta: &BatchMeta, want: Want) -> Result<Vec<u32>, BackendError> {
        match self.step(meta, want)? {
            Output::Ids(ids) => Ok(ids),
            _ => Err(BackendError::Invalid("tensor-parallel rank 0 returned no ids".into())),
        }
    }
}

impl Drop for TpExecutor {
    fn drop(&mut self) {
        self.jobs.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
