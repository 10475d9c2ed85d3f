//! `Backend::sample_rows` on the GPU against the CPU sampler: many rows of the same logits,
//! each with its own uniform, sampled in one call. The histogram is tested against the
//! CPU's exact distribution (`core::sampling::distribution`) by a chi-square test, and each
//! draw against the CPU's draw with the same uniform (equal but where f32 rounding moves a
//! boundary).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::chi_square;
use super::{SamplingRow, SamplingTiming};
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, Result};
use crate::core::sampling::{distribution, sample_row, sample_uniform, RowSampling, SamplingParams};
use crate::tensor::HostTensor;

/// Draws per setting: enough for a chi-square over a few dozen bins.
const DRAWS: usize = 20_000;
const VOCAB: usize = 2048;
/// A Llama 3 vocabulary, fewer draws (each row is a copy of the logits).
const LARGE_VOCAB: usize = 128_256;
const LARGE_DRAWS: usize = 1000;

fn settings() -> Vec<(&'static str, SamplingParams)> {
    let t = |temperature: f32| SamplingParams { temperature, ..Default::default() };
    vec![
        ("temperature 0.7", t(0.7)),
        ("top-k 20", SamplingParams { top_k: 20, ..t(1.0) }),
        ("top-p 0.8", SamplingParams { top_p: 0.8, ..t(1.0) }),
        ("min-p 0.1", SamplingParams { min_p: 0.1, ..t(1.0) }),
        ("repetition penalty 1.3", SamplingParams { repetition_penalty: 1.3, ..t(1.0) }),
        (
            "T 0.8 k 50 p 0.9 min-p 0.05 pen 1.1",
            SamplingParams { top_k: 50, top_p: 0.9, min_p: 0.05, repetition_penalty: 1.1, ..t(0.8) },
        ),
    ]
}

/// Logits spread smoothly, or (`ties`) on a dozen levels, the top ones rare, so that the
/// cuts fall inside runs of equal probabilities.
fn logits(rng: &mut StdRng, vocab: usize, ties: bool) -> Vec<f32> {
    (0..vocab)
        .map(|_| match ties {
            true => (12.0 * rng.random::<f32>().powi(3)).floor() * 0.75,
            false => (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5) * 4.0,
        })
        .collect()
}

/// The sequence so far: the likeliest tokens (so that the penalty matters), some twice,
/// and a few others.
fn history(rng: &mut StdRng, logits: &[f32]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    let mut h: Vec<u32> = order.iter().take(24).chain(order.iter().take(8)).copied().collect();
    h.extend((0..16).map(|_| rng.random_range(0..logits.len() as u32)));
    h
}

pub fn compare(gpu: &CudaBackend, seed: u64) -> Result<Vec<SamplingRow>> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5a3f1e);
    let mut rows = vec![];
    for ties in [false, true] {
        let logits = logits(&mut rng, VOCAB, ties);
        let history = history(&mut rng, &logits);
        for (name, params) in settings() {
            rows.push(one(gpu, &mut rng, (name, &params), &logits, &history, DRAWS, ties)?);
        }
    }
    let logits = logits(&mut rng, LARGE_VOCAB, false);
    let history = history(&mut rng, &logits);
    let (name, params) = settings().pop().expect("settings");
    rows.push(one(gpu, &mut rng, (name, &params), &logits, &history, LARGE_DRAWS, false)?);
    let greedy = SamplingParams { repetition_penalty: 1.5, ..Default::default() };
    rows.push(one(gpu, &mut rng, ("greedy, penalty 1.5", &greedy), &logits, &history, 16, false)?);
    Ok(rows)
}

/// One step's sampling of a batch of 64 rows of a Llama 3 vocabulary with every setting on
/// (the last of `settings`): on the GPU, and by the host path it replaces (the logits copied
/// to the host, each row sampled by the CPU sampler).
pub fn timing(gpu: &CudaBackend, seed: u64) -> Result<SamplingTiming> {
    const ROWS: usize = 64;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x71e);
    let logits: Vec<f32> = (0..ROWS).flat_map(|_| self::logits(&mut rng, LARGE_VOCAB, false)).collect();
    let history = history(&mut rng, &logits[..LARGE_VOCAB]);
    let (_, params) = settings().pop().expect("settings");
    let rows: Vec<RowSampling> =
        (0..ROWS).map(|_| RowSampling { params: &params, history: &history, uniform: rng.random() }).collect();
    let t = gpu.upload_f32(&HostTensor::new(vec![ROWS, LARGE_VOCAB], logits))?;
    gpu.sample_rows(&t, LARGE_VOCAB, &rows)?; // warm-up
    let mut gpu_ms = f64::INFINITY;
    for _ in 0..5 {
        let start = std::time::Instant::now();
        gpu.sample_rows(&t, LARGE_VOCAB, &rows)?;
        gpu_ms = gpu_ms.min(start.elapsed().as_secs_f64() * 1e3);
    }
    let start = std::time::Instant::now();
    let host = gpu.to_host(&t)?;
    let ids: Vec<u32> = host.chunks(LARGE_VOCAB).zip(&rows).map(|(l, r)| sample_row(l, r)).collect();
    std::hint::black_box(ids);
    let host_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(SamplingTiming { rows: ROWS, vocab: LARGE_VOCAB, gpu_ms, host_ms })
}

/// `draws` rows of `logits` sampled as `params` on the GPU, each with its own uniform.
fn one(
    gpu: &CudaBackend,
    rng: &mut StdRng,
    (name, params): (&str, &SamplingParams),
    logits: &[f32],
    history: &[u32],
    draws: usize,
    ties: bool,
) -> Result<SamplingRow> {
    let vocab = logits.len();
    let rows: Vec<RowSampling> =
        (0..draws).map(|_| RowSampling { params, history, uniform: rng.random::<f64>() }).collect();
    let batch = HostTensor::new(vec![draws, vocab], logits.repeat(draws));
    let got = gpu.sample_rows(&gpu.upload_f32(&batch)?, vocab, &rows)?;
    // `sample_row` with the distribution computed once.
    let dist = distribution(logits, history, params);
    let cpu =
        |r: &RowSampling| if params.is_greedy() { sample_row(logits, r) } else { sample_uniform(&dist, r.uniform) };
    let same = got.iter().zip(&rows).filter(|(&g, r)| g == cpu(r)).count();
    let mut counts = vec![0u64; vocab];
    got.iter().for_each(|&t| counts[(t as usize).min(vocab - 1)] += 1);
    let probs: Vec<f64> = dist.into_iter().map(f64::from).collect();
    let chi = (!params.is_greedy()).then(|| chi_square::test(&counts, &probs));
    let logits = if ties { "ties" } else { "spread" };
    Ok(SamplingRow { setting: name.into(), logits, vocab, draws, same, chi })
}
