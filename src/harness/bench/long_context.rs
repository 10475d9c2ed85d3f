//! `specula bench --context N,...`: batch-1 decode at long contexts, per KV cache storage,
//! against (weight bytes + KV bytes read per step) / copy bandwidth; and the requests the
//! runtime's KV pool would hold on this device.
//!
//! The cache is filled directly: its first N positions count as written and hold what the
//! allocation left (zeros). Attention reads every position's bytes whatever they hold, so
//! a step costs what it costs after a real prefill, without the minutes a 128k prefill
//! would take.

use super::decode::{timed_decode, weight_bytes};
use super::long_report::{ContextRow, LongContextReport, PoolFit, PrefillRow};
use super::run::copy_bandwidth;
use super::{dtype_label, BenchOptions};
use crate::actors::config::{kv_budget, RuntimeConfig};
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BatchMeta};
use crate::core::block_pool::BlockPool;
use crate::harness::tp::greedy_ids;
use crate::harness::{model_source, Result};
use crate::model::{load_model_with, KvCache, Llama, LoadOptions};
use crate::prompt::BLOCK_SIZE;
use crate::tensor::{KvDtype, KvOptions};
use std::io::Write;
use std::time::Instant;

/// Steps run before timing (the first captures the step's graph).
const WARM_UP: usize = 4;

pub fn run(opts: &BenchOptions, out: &mut dyn Write) -> Result<LongContextReport> {
    let gpu = CudaBackend::new(0)?;
    writeln!(out, "long-context bench on {}", gpu.name())?;
    let name = opts.models.first().map_or("dummy:llama-3.1-8b", String::as_str);
    let model = load_model_with(&model_source(name)?, &LoadOptions::dtype(opts.dtype), &gpu)?.model;
    let weights = weight_bytes(&model.config, opts.dtype);
    writeln!(out, "{name}: {:.2} GB of {} weights", weights / 1e9, dtype_label(opts.dtype))?;
    // Before the copy test's buffers and our caches exist (freed memory stays in the
    // stream's pool): the memory the runtime would see once the model is loaded.
    let fits =
        opts.kv_cache_dtypes.iter().map(|&d| pool_fit(&gpu, &model, d, opts.request_tokens)).collect::<Result<_>>()?;
    let bandwidth = copy_bandwidth(&gpu, out)?;
    let (mut rows, mut prefill) = (vec![], vec![]);
    let setup = Setup { gpu: &gpu, model: &model, weights, bandwidth };
    for &dtype in &opts.kv_cache_dtypes {
        rows.extend(decode_rows(&setup, dtype, opts, out)?);
        if let Some(tokens) = opts.prefill {
            prefill.push(prefill_row(&setup, dtype, tokens, opts.prefill_chunk.max(1), out)?);
        }
    }
    Ok(LongContextReport {
        copy_bandwidth_bytes_per_s: bandwidth,
        device: gpu.name(),
        fits,
        model: name.to_string(),
        request_tokens: opts.request_tokens,
        rows,
        prefill,
        weight_dtype: dtype_label(opts.dtype),
    })
}

/// The loaded model on the GPU, its weight bytes and the copy bandwidth.
struct Setup<'a> {
    gpu: &'a CudaBackend,
    model: &'a Llama<CudaBackend>,
    weights: f64,
    bandwidth: f64,
}

/// The prefill of a `tokens`-long prompt from position 0 in chunks of `chunk` (rows longer
/// than `MATMUL_MAX_TOKENS` take the prefill attention kernel), over a fresh cache of
/// `dtype`; each chunk asks for its last token's next id, so the host waits for every step.
fn prefill_row(s: &Setup, dtype: KvDtype, tokens: usize, chunk: usize, out: &mut dyn Write) -> Result<PrefillRow> {
    let blocks = tokens.div_ceil(BLOCK_SIZE);
    let options = KvOptions { dtype, window: None };
    let mut kv = KvCache::with_options(s.gpu, &s.model.config, blocks, BLOCK_SIZE, options)?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let prompt: Vec<u32> = (0..tokens as u32).map(|i| 1 + i * 7919 % 1000).collect();
    let mut run = |upto: usize| -> Result<f64> {
        let start = Instant::now();
        for (i, ids) in prompt[..upto].chunks(chunk).enumerate() {
            let mut meta = BatchMeta::new(BLOCK_SIZE as u32);
            meta.push_row(ids, (i * chunk) as u32, &table, 1);
            greedy_ids(s.gpu, s.model, &mut kv, &meta)?;
        }
        Ok(start.elapsed().as_secs_f64())
    };
    run(chunk.min(tokens))?; // warm-up: kernels loaded, cuBLAS set up
    let seconds = run(tokens)?;
    let row = PrefillRow { chunk, kv_dtype: kv.storage.name(), seconds, tokens };
    writeln!(
        out,
        "{} KV, prefill of {tokens} tokens by {chunk}: {seconds:.2} s, {:.0} tok/s",
        row.kv_dtype,
        row.tok_s()
    )?;
    Ok(row)
}

/// Decode at each `--context` over one cache of `dtype`, long enough for the longest.
fn decode_rows(s: &Setup, dtype: KvDtype, opts: &BenchOptions, out: &mut dyn Write) -> Result<Vec<ContextRow>> {
    let most = opts.context.iter().max().copied().unwrap_or(0) + WARM_UP + opts.decode_tokens + 1;
    let options = KvOptions { dtype, window: None };
    let mut kv = KvCache::with_options(s.gpu, &s.model.config, most.div_ceil(BLOCK_SIZE), BLOCK_SIZE, options)?;
    let per_token = KvCache::<CudaBackend>::bytes_per_token(&s.model.config, kv.storage) as f64;
    let mut rows = vec![];
    for &context in &opts.context {
        let tok_s = decode_at(s.gpu, s.model, &mut kv, context, opts.decode_tokens)?;
        // The timed steps attend to context + WARM_UP .. + decode_tokens positions.
        let kv_bytes = per_token * (context + WARM_UP + opts.decode_tokens / 2) as f64;
        let ceiling_tok_s = s.bandwidth / (s.weights + kv_bytes);
        let kv_dtype = kv.storage.name();
        let row = ContextRow { ceiling_tok_s, context, kv_bytes, kv_dtype, tok_s, weight_bytes: s.weights };
        let percent = 100.0 * row.fraction();
        writeln!(out, "{kv_dtype} KV, context {context}: {tok_s:.1} tok/s, {percent:.1}% of the ceiling")?;
        rows.push(row);
    }
    Ok(rows)
}

/// The pool `Runtime::builder().build` would size for this model with `dtype` (default
/// configuration), and the requests of `request_tokens` it holds.
fn pool_fit(gpu: &CudaBackend, model: &Llama<CudaBackend>, dtype: KvDtype, request_tokens: usize) -> Result<PoolFit> {
    let storage = gpu.kv_storage(dtype)?;
    let bytes_per_token = KvCache::<CudaBackend>::bytes_per_token(&model.config, storage);
    let budget = kv_budget(&RuntimeConfig::default(), gpu)?;
    let blocks = BlockPool::blocks_for_budget(budget, bytes_per_token, BLOCK_SIZE);
    Ok(PoolFit {
        bytes_per_token,
        kv_dtype: storage.name(),
        pool_bytes: blocks * BLOCK_SIZE * bytes_per_token,
        pool_tokens: blocks * BLOCK_SIZE,
        requests: blocks / request_tokens.div_ceil(BLOCK_SIZE).max(1),
    })
}

/// Greedy batch-1 decode tok/s from position `context` on (graphs on), on the host clock
/// with the id's trip to the host at every step, as the decode benchmark measures it.
fn decode_at(
    gpu: &CudaBackend,
    model: &Llama<CudaBackend>,
    kv: &mut KvCache<CudaBackend>,
    context: usize,
    steps: usize,
) -> Result<f64> {
    // The blocks a row reaching the last timed position holds: one graph for all the steps.
    let table: Vec<u32> = (0..(context + WARM_UP + steps).div_ceil(BLOCK_SIZE) as u32).collect();
    let mut pos = context;
    let mut step = |token: u32| -> Result<u32> {
        let mut meta = BatchMeta::new(BLOCK_SIZE as u32);
        meta.push_row(&[token], pos as u32, &table, 1);
        pos += 1;
        Ok(greedy_ids(gpu, model, kv, &meta)?[0])
    };
    let (_, next) = timed_decode(1, WARM_UP, &mut step)?;
    Ok(timed_decode(next, steps, &mut step)?.0)
}
