//! `specula kernels parity`: on a GPU, each kernel against the CPU op it replaces (and the
//! EAGLE head's step replayed from its graph against a fresh capture), sampling
//! against the CPU sampler's distribution, then the
//! whole forward of a real model against the CPU backend, then the model with an FP8 KV
//! cache against the bf16 cache on the GPU, then speculative decoding against plain
//! decoding on the GPU, then tensor parallelism (NCCL) against the plain path.

// Only the CUDA sampling rows run the test; its unit tests run everywhere.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod chi_square;
#[cfg(feature = "cuda")]
mod forward;
#[cfg(feature = "cuda")]
mod head;
#[cfg(feature = "cuda")]
mod kv;
#[cfg(feature = "cuda")]
mod ops;
mod report;
#[cfg(feature = "cuda")]
mod sampling;
#[cfg(feature = "cuda")]
mod speculative;
#[cfg(feature = "cuda")]
mod tensor_parallel;
// The CUDA attention rows use it; its unit tests run everywhere.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod ulps;

use std::io::Write;

pub use self::report::{
    ForwardRow, KvRow, OpRow, ParityFailures, ParityReport, SamplingRow, SamplingTiming, SpeculativeRow, TpRow,
};
use super::Result;

/// Largest error an op may show: max |gpu - cpu| / max |cpu|.
pub const TOLERANCE: f64 = 1e-2;

#[derive(clap::Args)]
pub struct ParityOptions {
    /// The model for the whole-forward comparison (`default`, a .gguf file, a folder, or
    /// `none` to compare the ops only).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Greedy tokens compared per prompt.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Seed of the random inputs (default: from the clock, so each run draws fresh ones).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Leave out the op and sampling rows: the model's comparisons only (to repeat them
    /// under other kernel settings, e.g. `SPECULA_ATTENTION=mma`).
    #[arg(long)]
    pub skip_ops: bool,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_: &ParityOptions, _out: &mut dyn Write) -> Result<ParityReport> {
    Err(super::HarnessError::NoCuda)
}

/// Runs every comparison; first writes to `out` which backends and which seed. A comparison
/// that does not hold is in the report ([`ParityReport::check`]), not an error.
#[cfg(feature = "cuda")]
pub fn run(opts: &ParityOptions, out: &mut dyn Write) -> Result<ParityReport> {
    use crate::backend::cpu::CpuBackend;
    use crate::backend::cuda::CudaBackend;
    use crate::backend::Backend;
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let gpu = CudaBackend::new(0)?;
    let cpu = CpuBackend::new();
    writeln!(out, "parity: {} against {}, seed {seed}", gpu.name(), cpu.name())?;
    let (mut ops, sampling, sampling_timing) = match opts.skip_ops {
        true => (vec![], vec![], None),
        false => (ops::all(&cpu, &gpu, seed)?, sampling::compare(&gpu, seed)?, Some(sampling::timing(&gpu, seed)?)),
    };
    let with_model = opts.model != "none";
    if with_model {
        ops.extend(head::replay(&gpu, &opts.model)?);
    }
    let forward = if with_model { forward::compare(&cpu, &gpu, &opts.model, opts.tokens)? } else { vec![] };
    let kv_fp8 = if with_model { kv::compare(&gpu, &opts.model, opts.tokens)? } else { vec![] };
    let speculative = if with_model { speculative::compare(&gpu, &opts.model, opts.tokens)? } else { vec![] };
    writeln!(
        out,
        "tensor parallelism: {} (and the model), NCCL with one rank against the plain path",
        tensor_parallel::DUMMY
    )?;
    let tensor_parallel = tensor_parallel::compare(&gpu, &opts.model, opts.tokens)?;
    let (model, tokens) = (opts.model.clone(), opts.tokens);
    Ok(ParityReport {
        seed,
        model,
        tokens,
        ops,
        sampling,
        sampling_timing,
        forward,
        kv_fp8,
        speculative,
        tensor_parallel,
    })
}
