//! The benchmark's steps, in order.

use std::io::Write;
use std::time::Instant;

use super::decode::Run;
use super::kernels::{kernel_times, tune};
use super::overlap::overlap;
use super::speculative::speculative;
use super::{dtype_label, BenchOptions, BenchReport, DecodeRow, VariantRate, VerifyRow, VARIANTS};
use crate::backend::cuda::CudaBackend;
use crate::backend::Backend;
use crate::harness::Result;

/// The middle value (of an even count, the upper of the two in the middle).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(opts: &BenchOptions, out: &mut dyn Write) -> Result<BenchReport> {
    let gpu = CudaBackend::new(0)?;
    writeln!(out, "bench on {}", gpu.name())?;
    let bandwidth = copy_bandwidth(&gpu, out)?;
    if opts.tune {
        tune(&gpu, bandwidth, out)?;
    }
    let kernels = kernel_times(&gpu, &[1, 2, 5, 9, 11, 17, 33, 64])?;
    let sibling = gpu.sibling()?;
    let (decode, verify, mut runs) = decode_models(&gpu, &sibling, opts, bandwidth, out)?;
    let overlap = if runs.len() >= 2 && opts.overlap_draft_steps > 0 {
        let (a, b) = runs.split_at_mut(1);
        Some(overlap(&mut a[0], &mut b[0], opts.overlap_draft_steps)?)
    } else {
        None
    };
    let mut report = BenchReport {
        copy_bandwidth_bytes_per_s: bandwidth,
        decode,
        device: gpu.name(),
        kernels,
        overlap,
        speculative: None,
        verify,
        weight_dtype: dtype_label(opts.dtype),
    };
    write!(out, "{}", report.measured())?;
    drop(runs);
    if opts.spec_tokens > 0 && opts.models.len() >= 2 {
        report.speculative = Some(speculative(&gpu, opts)?);
    }
    write!(out, "{}", report.speculation())?;
    Ok(report)
}

/// Device-to-device copy of 1 GiB, median of 20: bytes read + written per second.
pub(super) fn copy_bandwidth(gpu: &CudaBackend, out: &mut dyn Write) -> Result<f64> {
    let copy = gpu.time_copy(1 << 30, 20)?;
    let copy_ms = median(copy.into_iter().map(|t| t as f64).collect());
    let bandwidth = 2.0 * (1u64 << 30) as f64 / (copy_ms / 1e3); // read + write
    writeln!(out, "device-to-device copy: 1 GiB in {copy_ms:.3} ms = {:.2} TB/s (read + write)", bandwidth / 1e12)?;
    Ok(bandwidth)
}

/// Loads each model and times its decoding in every variant; on the first model, the
/// verification steps too. The models stay loaded for the overlap test.
fn decode_models<'a>(
    gpu: &'a CudaBackend,
    sibling: &'a CudaBackend,
    opts: &BenchOptions,
    bandwidth: f64,
    out: &mut dyn Write,
) -> Result<(Vec<DecodeRow>, Vec<VerifyRow>, Vec<Run<'a>>)> {
    let capacity = opts.prompt_tokens
        + 2 * VARIANTS.len() * (opts.decode_tokens / 2 + 4)
        + 64
        + opts.verify.iter().max().unwrap_or(&0);
    let (mut decode_rows, mut verify_rows, mut runs) = (vec![], vec![], vec![]);
    for (i, name) in opts.models.iter().enumerate() {
        // The second model lives on its own stream: it plays the draft in the overlap test.
        let backend = if i == 0 { gpu } else { sibling };
        let load = Instant::now();
        let mut run = Run::load(backend, name, opts.dtype, capacity)?;
        let load_s = load.elapsed().as_secs_f64();
        let best = best_of_variants(&mut run, backend, opts)?;
        let ceiling = bandwidth / run.weight_bytes();
        writeln!(
            out,
            "{name}: loaded in {load_s:.1} s, {:.2} GB of {} weights; decode {:.1} tok/s; ceiling {ceiling:.1} tok/s",
            run.weight_bytes() / 1e9,
            run.dtype_label(),
            best[0]
        )?;
        decode_rows.push(DecodeRow {
            ceiling_tok_s: ceiling,
            model: name.clone(),
            tok_s: VARIANTS.iter().zip(best).map(|(v, tok_s)| VariantRate { tok_s, variant: v.label }).collect(),
            weight_bytes: run.weight_bytes(),
            weight_dtype: run.dtype_label(),
        });
        if i == 0 {
            let decode_ms = run.time_step(1, 30)?;
            for &k in &opts.verify {
                let ms = run.time_step(k + 1, 30)?;
                verify_rows.push(VerifyRow { decode_ms, k, ms, ratio: ms / decode_ms, variant: VARIANTS[0].label });
            }
        }
        runs.push(run);
    }
    Ok((decode_rows, verify_rows, runs))
}

/// Batch-1 decode tok/s in each variant, after a prefill and a warm-up: every variant
/// twice, interleaved, keeping the better, so that drifts hit all alike.
fn best_of_variants(run: &mut Run, backend: &CudaBackend, opts: &BenchOptions) -> Result<Vec<f64>> {
    let mut next = run.prefill(opts.prompt_tokens)?;
    (_, next) = run.decode(next, 8, false)?; // warm-up
    let mut best = vec![0f64; VARIANTS.len()];
    for _ in 0..2 {
        for (v, variant) in VARIANTS.iter().enumerate() {
            variant.apply(backend);
            (_, next) = run.decode(next, 4, variant.graphs)?; // capture
            let tok_s;
            (tok_s, next) = run.decode(next, opts.decode_tokens / 2, variant.graphs)?;
            best[v] = best[v].max(tok_s);
        }
    }
    VARIANTS[0].apply(backend);
    Ok(best)
}
