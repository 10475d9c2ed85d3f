//! The KV cache options: FP8 storage and the attention window with sink tokens.
//!
//! - The attention op over an FP8 cache, a windowed cache and both, against an f64
//!   reference written here: its own E4M3 rounding (by search, `common::fp8`), its own
//!   scale rule (the smallest power of two that brings a head under 448) and its own mask.
//! - Greedy speculation (n-gram, early exit) in the runtime equals plain greedy decoding in
//!   the engine with FP8 KV and with a window, through preemption, prefix reuse, and past
//!   the model's context and the pool's size.
//! - On the default model: 3× a 256-token window with 4 sinks runs in a pool that could not
//!   hold the sequence, its blocks in use bounded by the window, and its output equals full
//!   attention's until the window first leaves a position out.
//! - Bad windows are refused when configured.

mod common;

use std::sync::Arc;

use futures::executor::block_on;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::fp8::{nearest, value};
use common::random_llama::tiny;
use common::runtime::{assert_all_blocks_free, shared};
use specula::actors::{collect, ConfigError, Runtime, RuntimeError};
use specula::backend::cpu::CpuBackend;
use specula::backend::{AttnShape, Backend, BatchMeta};
use specula::engine::Engine;
use specula::model::Tokenizer;
use specula::request::{FinishReason, GenerateRequest, Prompt};
use specula::spec::{ModelProposer, NgramProposer, Proposer, Speculation};
use specula::tensor::{AttnWindow, KvDtype, KvLayout, KvOptions, KvStorage, WindowError, NO_BLOCK};

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = 16;
const KV_DIM: usize = KV_HEADS * HD;
const BLOCK: u32 = 4;

/// One row's keys and values as the reference keeps them: f64, already through the
/// storage's rounding, by position.
#[derive(Default)]
struct RefRow {
    k: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
}

/// The value E4M3 storage gives back for one head: the scale is 2^e for the smallest e
/// (from -127 up) with amax ≤ 448 · 2^e, each value the code nearest value / 2^e.
fn fp8_head(x: &[f32]) -> Vec<f64> {
    let amax = x.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let mut e = -127;
    while amax > 448.0 * 2f64.powi(e) {
        e += 1;
    }
    x.iter().map(|&v| value(nearest(v as f64 / 2f64.powi(e))) * 2f64.powi(e)).collect()
}

fn stored(x: &[f32], storage: KvStorage) -> Vec<f64> {
    match storage {
        KvStorage::F32 => x.iter().map(|&v| v as f64).collect(),
        KvStorage::Fp8 => x.chunks(HD).flat_map(fp8_head).collect(),
        KvStorage::Bf16 => unreachable!("not checked here"),
    }
}

/// softmax(q·kᵀ/√d)·v over the positions `0..=pos` the window keeps, in f64.
fn reference(q: &[f32], row: &RefRow, pos: usize, window: Option<AttnWindow>) -> Vec<f64> {
    let keep = |j: usize| window.is_none_or(|w| j < w.sinks() || pos - j < w.size());
    let group = HEADS / KV_HEADS;
    let mut out = vec![0f64; HEADS * HD];
    for h in 0..HEADS {
        let off = (h / group) * HD;
        let qh = &q[h * HD..(h + 1) * HD];
        let js: Vec<usize> = (0..=pos).filter(|&j| keep(j)).collect();
        let scores: Vec<f64> = js
            .iter()
            .map(|&j| {
                qh.iter().zip(&row.k[j][off..off + HD]).map(|(&a, b)| a as f64 * b).sum::<f64>() / (HD as f64).sqrt()
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        for (s, &j) in scores.iter().zip(&js) {
            let p = (s - max).exp() / sum;
            for d in 0..HD {
                out[h * HD + d] += p * row.v[j][off + d];
            }
        }
    }
    out
}

/// Random values, each head of its own magnitude (so that FP8 scales differ by head).
fn values(rng: &mut StdRng, tokens: usize, width: usize, scales: &[f32]) -> Vec<f32> {
    (0..tokens * width).map(|i| rng.random_range(-1.0f32..1.0) * scales[(i % width) / HD % scales.len()]).collect()
}

/// One attention call: writes each row's new keys and values, compares every query
/// token's output with the reference. `rows`: (row index, cached, new tokens, table).
fn check_step(
    b: &CpuBackend,
    caches: &mut (<CpuBackend as Backend>::Tensor, <CpuBackend as Backend>::Tensor),
    refs: &mut [RefRow],
    rows: &[(usize, usize, usize, Vec<u32>)],
    (storage, window): (KvStorage, Option<AttnWindow>),
    rng: &mut StdRng,
) -> f64 {
    let mut meta = BatchMeta::new(BLOCK);
    for (_, cached, n, table) in rows {
        meta.push_row(&vec![0; *n], *cached as u32, table, *n);
    }
    let t = meta.num_tokens();
    let q = values(rng, t, HEADS * HD, &[1.0]);
    let k = values(rng, t, KV_DIM, &[0.05, 6.0]);
    let v = values(rng, t, KV_DIM, &[2.0, 0.05]);
    let host = |d: &Vec<f32>, w| b.upload(&specula::tensor::HostTensor::new(vec![t, w], d.clone())).unwrap();
    let shape = AttnShape { num_heads: HEADS, num_kv_heads: KV_HEADS, head_dim: HD, window };
    let batch = b.prepare(&meta).unwrap();
    let (kc, vc) = (&mut caches.0, &mut caches.1);
    let out = b.attention(&host(&q, HEADS * HD), &host(&k, KV_DIM), &host(&v, KV_DIM), kc, vc, &batch, shape);
    let out = b.to_host(&out.expect("attention reads only what the window keeps")).unwrap();
    let mut worst = 0f64;
    let mut tok = 0;
    for (r, _, n, _) in rows {
        for _ in 0..*n {
            refs[*r].k.push(stored(&k[tok * KV_DIM..(tok + 1) * KV_DIM], storage));
            refs[*r].v.push(stored(&v[tok * KV_DIM..(tok + 1) * KV_DIM], storage));
            tok += 1;
        }
    }
    for (t, &pos) in meta.positions.iter().enumerate() {
        let r = rows[meta.rows.iter().position(|m| (m.start..m.start + m.len).contains(&(t as u32))).unwrap()].0;
        let want = reference(&q[t * HEADS * HD..(t + 1) * HEADS * HD], &refs[r], pos as usize, window);
        for (g, w) in out[t * HEADS * HD..(t + 1) * HEADS * HD].iter().zip(&want) {
            let err = (*g as f64 - w).abs() / w.abs().max(1.0);
            assert!(err <= 1e-5, "{storage:?} {window:?}: token {t} at {pos}: {g} vs {w}");
            worst = worst.max(err);
        }
    }
    worst
}

/// A prefill of two rows (21 and 9 tokens), then a verification-sized step (3 tokens and 1
/// token); with a window, the second step's table has the blocks that slid out missing.
fn check_attention(dtype: KvDtype, window: Option<AttnWindow>) -> f64 {
    let b = CpuBackend::new();
    let storage = b.kv_storage(dtype).unwrap();
    let layout = KvLayout { num_kv_heads: KV_HEADS, head_dim: HD, storage, window };
    let mut caches = (b.kv_cache(64, &layout).unwrap(), b.kv_cache(64, &layout).unwrap());
    let mut refs = [RefRow::default(), RefRow::default()];
    let mut rng = StdRng::seed_from_u64(7);
    let (a, c): (Vec<u32>, Vec<u32>) = ((0..6).collect(), (8..11).collect());
    let prefill = [(0, 0, 21, a.clone()), (1, 0, 9, c.clone())];
    let mut worst = check_step(&b, &mut caches, &mut refs, &prefill, (storage, window), &mut rng);
    let mut a2 = a.clone();
    if let Some(w) = window {
        // Position 21 reads the sinks and 21 - size + 1.. only: whole blocks before that go.
        let first = w.first_recent(21);
        (0..a2.len()).filter(|&i| i * 4 >= w.sinks() && (i + 1) * 4 <= first).for_each(|i| a2[i] = NO_BLOCK);
        assert!(a2.contains(&NO_BLOCK), "the test window leaves a block out");
    }
    let verify = [(0, 21, 3, a2), (1, 9, 1, c)];
    worst = worst.max(check_step(&b, &mut caches, &mut refs, &verify, (storage, window), &mut rng));
    worst
}

#[test]
fn fp8_kv_attention_matches_an_f64_reference_of_the_same_quantization() {
    let worst = check_attention(KvDtype::Fp8, None);
    eprintln!("fp8 KV attention: largest relative error {worst:.2e}");
}

#[test]
fn windowed_attention_with_sinks_matches_an_f64_reference_masking_the_same_positions() {
    for (size, sinks) in [(6, 2), (5, 0), (8, 4)] {
        let w = AttnWindow::new(size, sinks).unwrap();
        let f32_err = check_attention(KvDtype::Auto, Some(w));
        let fp8_err = check_attention(KvDtype::Fp8, Some(w));
        eprintln!("window {size} sinks {sinks}: largest relative error f32 {f32_err:.2e}, fp8 {fp8_err:.2e}");
    }
}

#[test]
fn bad_windows_are_refused_when_configured() {
    assert_eq!(AttnWindow::new(0, 0), Err(WindowError::Zero));
    assert_eq!(AttnWindow::new(3, 4), Err(WindowError::SmallerThanSinks { size: 3, sinks: 4 }));
    // A pool that cannot hold one sequence's window (its sinks, the window and a step).
    let kv = KvOptions { dtype: KvDtype::Auto, window: Some(AttnWindow::new(64, 4).unwrap()) };
    let err = Runtime::builder()
        .kv_cache(kv)
        .kv_blocks(4)
        .build(CpuBackend::new(), Arc::new(tiny(64, 1, 0.5)), None::<Tokenizer>)
        .err()
        .expect("refused");
    assert!(matches!(err, RuntimeError::Config(ConfigError::PoolSmallerThanWindow { .. })), "{err}");
}

#[test]
fn fp8_storage_takes_its_real_bytes_in_the_pool() {
    let model = Arc::new(tiny(64, 1, 0.5));
    let bytes = 1 << 20;
    let stats = |dtype| {
        let kv = KvOptions { dtype, window: None };
        let h = Runtime::builder().kv_cache(kv).kv_bytes(bytes).max_batch(64).build(
            CpuBackend::new(),
            model.clone(),
            None::<Tokenizer>,
        );
        block_on(h.unwrap().stats()).unwrap().kv_cache
    };
    let (f32s, fp8) = (stats(KvDtype::Auto), stats(KvDtype::Fp8));
    // 2 layers × (k, v) × 2 KV heads × 16 values: 4 bytes each, or 1 each and a scale byte.
    assert_eq!((f32s.bytes_per_token, fp8.bytes_per_token), (2 * 2 * 2 * 16 * 4, 2 * 2 * 2 * 17));
    assert_eq!((f32s.storage, fp8.storage), (Some(KvStorage::F32), Some(KvStorage::Fp8)));
    assert!(fp8.tokens > 3 * f32s.tokens, "fp8 {} tokens, f32 {}", fp8.tokens, f32s.tokens);
    eprintln!("1 MiB holds {} tokens in f32, {} in fp8", f32s.tokens, fp8.tokens);
}

/// Greedy ids of `reqs` through the runtime with speculation and `kv`, against the engine
/// with the same cache, on a tiny random model (context 256).
fn check_lossless(kv: KvOptions, step_tokens: usize, kv_blocks: usize, max_tokens: usize) -> (u64, u64) {
    let target = Arc::new(tiny(64, 1, 0.5));
    let engine = Engine::new(CpuBackend::new(), tiny(64, 1, 0.5), None).with_kv(kv);
    let prefix: Vec<u32> = (0..40u32).map(|j| (j * 11 + 3) % 64).collect();
    let reqs: Vec<GenerateRequest> = (0..6u32)
        .map(|i| {
            let mut p = if i % 2 == 0 { prefix.clone() } else { vec![] };
            p.extend((0..3 + 2 * i).map(|j| (i * 7 + j * 5) % 64));
            GenerateRequest {
                max_tokens: max_tokens + 4 * i as usize,
                ignore_eos: true,
                ..GenerateRequest::new(Prompt::Tokens(p))
            }
        })
        .collect();
    let want = common::runtime::plain_greedy(&engine, &reqs);
    let (mut preemptions, mut hits) = (0, 0);
    for name in ["ngram", "early-exit"] {
        let proposer: Box<dyn Proposer> = match name {
            "ngram" => Box::new(NgramProposer::default()),
            _ => Box::new(ModelProposer::new(CpuBackend::new(), target.clone(), 1, 256, 16).unwrap()),
        };
        let spec =
            Speculation { proposer, max_draft: 4, synthetic_acceptance: None, lengths: Default::default(), tree: None };
        let h = Runtime::builder()
            .speculation(spec)
            .kv_cache(kv)
            .step_tokens(step_tokens)
            .kv_blocks(kv_blocks)
            .max_batch(6)
            .build(CpuBackend::new(), target.clone(), None::<Tokenizer>)
            .unwrap();
        let outs = block_on(futures::future::join_all(reqs.iter().map(|r| collect(h.generate(r.clone())))));
        for (i, out) in outs.into_iter().enumerate() {
            assert_eq!(out.unwrap().token_ids, want[i], "{kv:?} {name}, request {i}");
        }
        // Alone, after the batch: its prefix is found in the cache.
        let again = block_on(collect(h.generate(reqs[2].clone()))).unwrap();
        assert_eq!(again.token_ids, want[2], "{kv:?} {name}, again");
        let st = block_on(h.stats()).unwrap();
        preemptions += st.preemptions;
        hits += st.kv.target.prefix.hits;
        assert_all_blocks_free(&h);
    }
    (preemptions, hits)
}

#[test]
fn greedy_speculation_with_fp8_kv_equals_plain_greedy() {
    let kv = KvOptions { dtype: KvDtype::Fp8, window: None };
    let (preemptions, hits) = check_lossless(kv, 512, 16, 24);
    assert!(preemptions > 0 && hits > 0, "preemptions {preemptions}, prefix hits {hits}");
}

#[test]
fn greedy_speculation_with_a_window_equals_plain_greedy_past_the_context_and_the_pool() {
    // Context 256, pool 160 tokens; each request runs 300+ tokens past its prompt.
    for dtype in [KvDtype::Auto, KvDtype::Fp8] {
        let kv = KvOptions { dtype, window: Some(AttnWindow::new(24, 4).unwrap()) };
        let (preemptions, hits) = check_lossless(kv, 32, 10, 300);
        // Prefix hits depend on what the small pool evicted meanwhile: reported, not required.
        eprintln!("{dtype:?}: preemptions {preemptions}, prefix hits {hits} tokens");
        assert!(preemptions > 0, "{dtype:?}: the small pool should preempt");
    }
}

#[test]
fn three_windows_on_the_default_model_run_in_a_pool_smaller_than_the_sequence() {
    let Some(s) = shared() else { return };
    let (size, sinks) = (256, 4);
    let kv = KvOptions { dtype: KvDtype::Auto, window: Some(AttnWindow::new(size, sinks).unwrap()) };
    let req = |max_tokens| GenerateRequest {
        max_tokens,
        ignore_eos: true,
        ..GenerateRequest::new(Prompt::Text("Write a long story about a lighthouse keeper.".into()))
    };
    // 40 blocks (640 tokens) could not hold the 768 generated tokens without the window.
    let h = Runtime::builder()
        .kv_cache(kv)
        .step_tokens(64)
        .kv_blocks(40)
        .build(CpuBackend::new(), s.model.clone(), Some(s.tokenizer.clone()))
        .unwrap();
    let out = block_on(collect(h.generate(req(3 * size)))).unwrap();
    assert_eq!((out.token_ids.len(), out.finish_reason), (3 * size, FinishReason::Length));
    let st = block_on(h.stats()).unwrap();
    let bs = specula::actors::BLOCK_SIZE;
    // The sink block, the window's blocks and one partly filled at each end.
    let bound = sinks.div_ceil(bs) + size / bs + 2;
    eprintln!(
        "peak blocks in use {} (bound {bound}), recycled {}",
        st.kv.target.peak_used, st.kv.target.window_recycled
    );
    assert!(st.kv.target.peak_used <= bound, "peak {} blocks in use, bound {bound}", st.kv.target.peak_used);
    assert!(st.kv.target.window_recycled as usize >= (3 * size - 40 * bs).div_ceil(bs));
    assert_eq!(st.kv_cache.window, kv.window);
    assert_all_blocks_free(&h);
    // Until a query at position size + sinks, the window reads every position: full attention.
    let prompt_len = out.usage.prompt_tokens;
    let same = size + sinks - prompt_len + 1;
    let full = s.engine.generate(&req(same), |_, _| {}).unwrap();
    assert_eq!(&out.token_ids[..same], &full.token_ids[..], "the first {same} tokens");
    let next = out.token_ids[same..same + 8].to_vec();
    eprintln!("identical to full attention for {same} tokens; then {next:?}");
}
