//! Driving the engine's CPU forward over the paged KV cache, and checking it against the
//! f64 reference.

use indicatif::ProgressBar;
use specula::backend::cpu::CpuBackend;
use specula::backend::{Backend, BatchMeta};
use specula::model::llama::{KvCache, Llama, Weights};
use specula::model::{ModelConfig, WeightSource};

use super::reference;
use super::relative_error;
use super::tiny::TinyModel;

pub const BLOCK_SIZE: u32 = 4;
/// A deliberately scrambled block table: 24 positions over blocks of 4.
pub const BLOCK_TABLE: [u32; 6] = [3, 0, 7, 2, 5, 1];
const NUM_BLOCKS: usize = 16;

/// A 20-token sequence touching specials, bytes and merged tokens.
pub const TOKENS: [u32; 20] = [1, 45, 300, 87, 259, 2, 17, 319, 0, 150, 99, 260, 33, 33, 8, 271, 64, 200, 311, 5];

pub fn load(config: ModelConfig, src: &dyn WeightSource) -> Llama<CpuBackend> {
    Llama::load(config, Weights::Source(src), &CpuBackend::new(), &ProgressBar::hidden()).expect("model loads")
}

pub fn new_cache(model: &Llama<CpuBackend>) -> KvCache<CpuBackend> {
    KvCache::new(&CpuBackend::new(), &model.config, NUM_BLOCKS, BLOCK_SIZE as usize).unwrap()
}

/// Logits of a forward step over `rows` = (tokens, already cached, block table, logits wanted).
pub fn step(
    model: &Llama<CpuBackend>,
    kv: &mut KvCache<CpuBackend>,
    rows: &[(&[u32], u32, &[u32], usize)],
) -> Vec<f32> {
    let mut meta = BatchMeta::new(BLOCK_SIZE);
    for &(tokens, cached, table, want) in rows {
        meta.push_row(tokens, cached, table, want);
    }
    let b = CpuBackend::new();
    let logits = model.forward(&b, kv, &meta).expect("forward");
    b.to_host(&logits).unwrap()
}

/// All logits of `tokens` computed three ways: one prefill, token-by-token decode, and a
/// prefill chunk of 7 followed by chunks of 5 and decode steps.
pub fn three_ways(model: &Llama<CpuBackend>, tokens: &[u32], table: &[u32]) -> [Vec<f32>; 3] {
    let n = tokens.len();
    let prefill = step(model, &mut new_cache(model), &[(tokens, 0, table, n)]);

    let mut kv = new_cache(model);
    let decode: Vec<f32> = (0..n).flat_map(|i| step(model, &mut kv, &[(&tokens[i..=i], i as u32, table, 1)])).collect();

    let mut kv = new_cache(model);
    let mut chunked = Vec::new();
    let mut done = 0;
    for len in [7, 5, 1, 5].into_iter().chain(std::iter::repeat(1)) {
        if done == n {
            break;
        }
        let len = len.min(n - done);
        chunked.extend(step(model, &mut kv, &[(&tokens[done..done + len], done as u32, table, len)]));
        done += len;
    }
    [prefill, decode, chunked]
}

/// Checks every way of running `tokens` through `engine` against the f64 reference forward of
/// `stored` (the weights exactly as the file holds them), to `tol` relative to the largest logit.
pub fn assert_matches_reference(engine: &Llama<CpuBackend>, stored: &TinyModel, tokens: &[u32], tol: f64, what: &str) {
    assert_matches(engine, &reference::forward(stored, tokens), tokens, tol, what);
}

/// Checks every way of running `tokens` through `engine` against the logits `want`.
pub fn assert_matches(engine: &Llama<CpuBackend>, want: &[Vec<f64>], tokens: &[u32], tol: f64, what: &str) {
    let want = want.concat();
    for (way, got) in ["prefill", "decode", "chunked prefill"].iter().zip(three_ways(engine, tokens, &BLOCK_TABLE)) {
        let err = relative_error(&got, &want);
        assert!(err <= tol, "{what}, {way}: relative error {err:e} > {tol:e}");
    }
}
