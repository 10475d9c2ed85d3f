//! One layer's matmuls alone, at the 8B and 70B shapes, and the same with the kernels built
//! with other settings (`--tune`).

use std::io::Write;
use std::time::Instant;

use super::run::median;
use super::{KernelRow, KernelTable};
use crate::backend::cuda::{CudaBackend, CudaTensor, MatmulTuning};
use crate::backend::Backend;
use crate::harness::Result;
use crate::tensor::HostTensor;

/// The matmul kernels built with each of a few settings, compiled in parallel first.
pub fn tune(gpu: &CudaBackend, bandwidth: f64, out: &mut dyn Write) -> Result<()> {
    let base = MatmulTuning::default();
    let variants = [
        ("default", base),
        ("4 warps x 4 blocks", MatmulTuning { warps: 4, ..base }),
        ("activations a k-block ahead", MatmulTuning { x_ahead: true, ..base }),
        ("unroll 6", MatmulTuning { unroll: 6, ..base }),
        ("1 unit", MatmulTuning { small_units: 1, ..base }),
        ("1 block/SM", MatmulTuning { warps_per_sm: 8, ..base }),
        ("3 blocks/SM, unroll 2", MatmulTuning { warps_per_sm: 24, unroll: 2, ..base }),
    ];
    let start = Instant::now();
    let defines: Vec<Vec<String>> = variants.iter().map(|(_, t)| t.defines()).collect();
    crate::backend::cuda::kernels::compile_all(gpu.arch(), &defines)?;
    writeln!(
        out,
        "\n== matmul settings ({} variants compiled in {:.1} s) ==",
        variants.len(),
        start.elapsed().as_secs_f64()
    )?;
    for (label, tuning) in variants {
        writeln!(out, "-- {label}: {tuning:?}")?;
        let rows = kernel_times(&gpu.tuned(tuning)?, &[1, 11, 17])?;
        write!(out, "{}", KernelTable { rows: &rows, bandwidth })?;
    }
    Ok(())
}

/// The projections of one layer at the 8B and 70B shapes, bf16 and FP8,
/// alone: microseconds per call for 1 to 64 tokens and the weight bytes each reads.
pub fn kernel_times(gpu: &CudaBackend, ns: &[usize]) -> Result<Vec<KernelRow>> {
    // Ten calls back to back between two events, as in a step: the host queues ahead,
    // so launch latency does not count, and each kernel starts as the last drains (PDL).
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let mut v = vec![];
        for _ in 0..5 {
            let a = gpu.record()?;
            for _ in 0..10 {
                f()?;
            }
            let b = gpu.record()?;
            b.synchronize()?;
            v.push(a.elapsed_ms(&b)? as f64 * 1e3 / 10.0);
        }
        Ok(median(v))
    };
    // Activations as the forward hands them to a matmul: bf16.
    let act = |n: usize, d: usize| -> Result<CudaTensor> {
        let data: Vec<f32> = (0..n * d).map(|i| ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0).collect();
        Ok(gpu.upload(&HostTensor::new(vec![n, d], data))?)
    };
    let mut rows = vec![];
    for (model, h, kv, inter) in [("8B", 4096, 1024, 14336), ("70B", 8192, 1024, 28672)] {
        for fp8 in [false, true] {
            let (kind, bytes_per) = if fp8 { ("fp8", 1) } else { ("bf16", 2) };
            let w = |m: usize, k: usize, seed: u64| -> Result<CudaTensor> {
                Ok(if fp8 { gpu.random_fp8_matrix([m, k], 0.02, seed)? } else { gpu.random(&[m, k], 0.02, seed)? })
            };
            let (wq, wk, wv, wo) = (w(h, h, 1)?, w(kv, h, 2)?, w(kv, h, 3)?, w(h, h, 4)?);
            let (wg, wu, wd) = (w(inter, h, 5)?, w(inter, h, 6)?, w(h, inter, 7)?);
            for &n in ns {
                let (x, xi) = (act(n, h)?, act(n, inter)?);
                let mut row = |op: &'static str, us: f64, weights: usize| {
                    rows.push(KernelRow { model, kind, op, n, us, bytes: (weights * bytes_per) as f64 })
                };
                row("q+k+v", time(&mut || Ok(gpu.matmul_many(&x, &[&wq, &wk, &wv]).map(drop)?))?, (h + 2 * kv) * h);
                row("o", time(&mut || Ok(gpu.matmul(&x, &wo).map(drop)?))?, h * h);
                row("gate+up", time(&mut || Ok(gpu.swiglu(&x, &wg, &wu).map(drop)?))?, 2 * inter * h);
                row("down", time(&mut || Ok(gpu.matmul(&xi, &wd).map(drop)?))?, h * inter);
            }
        }
    }
    Ok(rows)
}
