//! What the actor runtime costs, and what it delivers on the CPU.
//!
//! `cargo bench --bench runtime -- noop`: a no-op executor (no model; logits of a 64-token
//! vocabulary), so the time per step is the runtime's own: scheduling, the KV reservation,
//! the hops Intake → KvAllocator → Intake → Verifier → Intake → Streamer, sampling, events.
//! At batch 1 and 32, the median of 7 runs (a busy machine makes single runs noisy).
//! `cargo bench --bench runtime -- model`: output tok/s of the default model on the CPU
//! backend at concurrency 1, 8 and 32 (greedy, 32 tokens per request, prefill included).
//! No argument runs both.

use std::time::{Duration, Instant};

use futures::executor::block_on;
use futures::StreamExt;
use specula::actors::{collect, ModelInfo, NoopExecutor, Runtime};
use specula::backend::cpu::CpuBackend;
use specula::model::{load_model, ModelSource};
use specula::request::{GenerateRequest, Prompt};

fn noop(batch: usize, steps: usize, runs: usize) {
    let vocab = 64;
    let blocks_per_seq = (16 + steps).div_ceil(16) + 1;
    let h = Runtime::builder()
        .max_batch(batch)
        .kv_blocks(batch * blocks_per_seq)
        .build_with(NoopExecutor { vocab }, ModelInfo { vocab, context: 1 << 20, eos: vec![] }, None)
        .unwrap();
    let req = |i: usize| GenerateRequest {
        max_tokens: steps,
        ignore_eos: true,
        ..GenerateRequest::new(Prompt::Tokens((0..16).map(|t| ((t + i) % vocab) as u32).collect()))
    };
    // Warm up, then measure: (µs per step, µs per token) of each run.
    block_on(collect(h.generate(req(0)))).unwrap();
    let mut results: Vec<(f64, f64)> = (0..runs)
        .map(|_| {
            let before = block_on(h.stats()).unwrap().steps;
            let start = Instant::now();
            let done = block_on(futures::future::join_all((0..batch).map(|i| collect(h.generate(req(i))))));
            let us = start.elapsed().as_secs_f64() * 1e6;
            let steps_run = block_on(h.stats()).unwrap().steps - before;
            let tokens: usize = done.iter().map(|c| c.as_ref().unwrap().usage.completion_tokens).sum();
            (us / steps_run as f64, us / tokens as f64)
        })
        .collect();
    results.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (step, token) = results[runs / 2];
    println!(
        "noop  batch {batch:>2}: {step:.1} µs/step, {token:.2} µs/token (median of {runs} runs of {steps} steps; best {:.1} µs/step)",
        results[0].0
    );
    h.shutdown_blocking(Duration::from_secs(1));
}

const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "List three colors:",
    "Water boils at",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "Explain photosynthesis in one sentence.",
];

fn model(concurrency: &[usize], max_tokens: usize) {
    let path = specula::cli::default_model_path().expect("default model");
    let loaded = load_model(&ModelSource::Path(path), &CpuBackend::new()).unwrap();
    let model = std::sync::Arc::new(loaded.model);
    let tokenizer = std::sync::Arc::new(loaded.tokenizer.unwrap());
    println!("cpu backend, {} rayon threads", rayon::current_num_threads());
    for &c in concurrency {
        let h =
            Runtime::builder().max_batch(c).build(CpuBackend::new(), model.clone(), Some(tokenizer.clone())).unwrap();
        let n = c.max(4);
        let reqs: Vec<GenerateRequest> = (0..n)
            .map(|i| GenerateRequest {
                max_tokens,
                ignore_eos: true,
                ..GenerateRequest::new(Prompt::Text(PROMPTS[i % PROMPTS.len()].into()))
            })
            .collect();
        let start = Instant::now();
        let done: Vec<_> = block_on(
            futures::stream::iter(reqs.into_iter().map(|r| collect(h.generate(r)))).buffered(c).collect::<Vec<_>>(),
        );
        let elapsed = start.elapsed().as_secs_f64();
        let tokens: usize = done.iter().map(|c| c.as_ref().unwrap().usage.completion_tokens).sum();
        let ttft: f64 = done.iter().map(|c| c.as_ref().unwrap().timings.prefill_ms).sum::<f64>() / n as f64;
        println!(
            "model concurrency {c:>2}: {n} requests, {tokens} tokens in {elapsed:.2} s = {:.1} output tok/s (mean TTFT {ttft:.0} ms)",
            tokens as f64 / elapsed
        );
        h.shutdown_blocking(Duration::from_secs(1));
    }
}

/// The bare forward of a decode step at each batch size (no runtime): what the CPU backend
/// itself delivers, to read the runtime's figures against.
fn forward(batches: &[usize]) {
    use specula::backend::{Backend, BatchMeta};
    use specula::model::KvCache;
    let path = specula::cli::default_model_path().expect("default model");
    let b = CpuBackend::new();
    let loaded = load_model(&ModelSource::Path(path), &b).unwrap();
    let (ctx, bs) = (32usize, 16usize);
    for &n in batches {
        let mut kv = KvCache::new(&b, &loaded.model.config, n * 3, bs).unwrap();
        let tables: Vec<Vec<u32>> = (0..n as u32).map(|i| vec![3 * i, 3 * i + 1, 3 * i + 2]).collect();
        let mut meta = BatchMeta::new(bs as u32);
        for t in &tables {
            meta.push_row(&[1; 32], 0, t, 1);
        }
        loaded.model.forward(&b, &mut kv, &meta).unwrap();
        let reps = 5;
        let start = Instant::now();
        for _ in 0..reps {
            let mut meta = BatchMeta::new(bs as u32);
            for t in &tables {
                meta.push_row(&[2], ctx as u32, t, 1);
            }
            let logits = loaded.model.forward(&b, &mut kv, &meta).unwrap();
            b.to_host(&logits).unwrap();
        }
        let per = start.elapsed().as_secs_f64() / reps as f64;
        println!("forward batch {n:>2}: {:.1} ms/step = {:.1} tok/s", per * 1e3, n as f64 / per);
    }
}

fn main() {
    // `cargo test --all-targets` runs this binary without `--bench`: a quick smoke run only.
    if !std::env::args().any(|a| a == "--bench") {
        noop(4, 50, 1);
        return;
    }
    let what: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let run = |name: &str| what.is_empty() || what.iter().any(|w| w == name);
    if run("noop") {
        for batch in [1, 32] {
            noop(batch, 2000, 7);
        }
    }
    if run("forward") {
        forward(&[1, 8, 32]);
    }
    if run("model") {
        model(&[1, 8, 32], 32);
    }
}
