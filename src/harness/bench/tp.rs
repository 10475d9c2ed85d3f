//! `specula bench tp`: a model split over GPUs 0..N-1 through NCCL (N = 1 included):
//! batch-1 greedy decode tok/s against the ceiling N × copy bandwidth / weight bytes (each
//! rank streams its share of the weights at the same time), and the all-reduces of one
//! decode step (two per layer, `[1, hidden]` f32 each) timed alone, replayed from a CUDA
//! graph as a decode step's are, and eagerly.

use std::fmt;
use std::io::Write;

use serde::Serialize;

use crate::harness::Result;
use crate::model::WeightDtype;

#[derive(clap::Args)]
pub struct TpBenchOptions {
    /// The model (`dummy:<shape>` or a path).
    #[arg(long, default_value = "dummy:llama-3.1-8b")]
    pub model: String,
    /// Ranks, one per GPU (0..N-1).
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: WeightDtype,
    /// Prompt tokens before decoding (token ids spread over the vocabulary).
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Tokens decoded per timed run.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Also decode with the whole model on GPU 0 (the plain path): its tok/s, and whether
    /// the split model's greedy ids are its ids.
    #[arg(long)]
    pub plain: bool,
    /// Write the results as JSON here too.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TpBenchReport {
    pub device: String,
    pub model: String,
    pub ranks: usize,
    pub weight_dtype: &'static str,
    /// The whole model's weight bytes one decode step reads (over all ranks).
    pub weight_bytes: f64,
    /// GPU 0's device-to-device copy, bytes read + written per second.
    pub copy_bandwidth_bytes_per_s: f64,
    pub tok_s: f64,
    /// ranks × copy bandwidth / weight bytes.
    pub ceiling_tok_s: f64,
    /// One step's all-reduces, replayed from a graph: milliseconds.
    pub allreduce_graph_ms: f64,
    /// The same, launched one by one.
    pub allreduce_eager_ms: f64,
    /// The whole model on GPU 0 (`--plain`): its tok/s, and whether the ids are equal.
    pub plain_tok_s: Option<f64>,
    pub ids_equal_plain: Option<bool>,
}

impl fmt::Display for TpBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let step_ms = 1e3 / self.tok_s.max(1e-9);
        writeln!(f, "\n== tensor parallelism: {} over {} GPU(s), {} ==", self.model, self.ranks, self.weight_dtype)?;
        writeln!(
            f,
            "weights {:.2} GB; copy bandwidth {:.2} TB/s",
            self.weight_bytes / 1e9,
            self.copy_bandwidth_bytes_per_s / 1e12
        )?;
        writeln!(
            f,
            "decode {:.1} tok/s ({step_ms:.2} ms/step); ceiling {:.1} tok/s; {:.0}% of it",
            self.tok_s,
            self.ceiling_tok_s,
            100.0 * self.tok_s / self.ceiling_tok_s.max(1e-9)
        )?;
        let share = 100.0 * self.allreduce_graph_ms / step_ms.max(1e-9);
        writeln!(
            f,
            "all-reduces per step: {:.3} ms from a graph ({share:.0}% of a step), {:.3} ms eager",
            self.allreduce_graph_ms, self.allreduce_eager_ms
        )?;
        if let (Some(tok_s), Some(equal)) = (self.plain_tok_s, self.ids_equal_plain) {
            let ids = if equal { "equal" } else { "DIFFER" };
            writeln!(f, "plain path (whole model, GPU 0): {tok_s:.1} tok/s; greedy ids {ids}")?;
        }
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
pub fn run(_: &TpBenchOptions, _out: &mut dyn Write) -> Result<TpBenchReport> {
    Err(crate::harness::HarnessError::NoCuda)
}

/// Loads, decodes, times; prints the report and writes its JSON when asked.
#[cfg(feature = "cuda")]
pub fn run(opts: &TpBenchOptions, out: &mut dyn Write) -> Result<TpBenchReport> {
    let report = measure::run(opts, out)?;
    write!(out, "{report}")?;
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

#[cfg(feature = "cuda")]
mod measure {
    use std::io::Write;

    use super::{TpBenchOptions, TpBenchReport};
    use crate::backend::cuda::CudaBackend;
    use crate::backend::{Backend, BatchMeta, StepKey};
    use crate::harness::bench::decode::weight_bytes;
    use crate::harness::bench::dtype_label;
    use crate::harness::bench::run::{copy_bandwidth, median};
    use crate::harness::tp::{greedy, load_ranks, prompt_ids, whole_config, Greedy, Split, Stepper, Whole};
    use crate::harness::HarnessError;
    use crate::harness::Result;
    use crate::tensor::HostTensor;

    pub fn run(opts: &TpBenchOptions, out: &mut dyn Write) -> Result<TpBenchReport> {
        let gpu = CudaBackend::new(0)?;
        writeln!(out, "bench tp on {} (GPU 0), {} rank(s)", gpu.name(), opts.ranks)?;
        let bandwidth = copy_bandwidth(&gpu, out)?;
        let (group, backends) = gpu.tensor_parallel(opts.ranks)?;
        let positions = opts.prompt_tokens + opts.decode_tokens + 1;
        let parts = load_ranks(backends, &opts.model, opts.dtype, positions)?;
        let config = whole_config(&parts)?;
        let (layers, hidden) = (config.num_layers, config.hidden_size);
        // Every rank at once, as NCCL needs; rank 0's times.
        let times = std::thread::scope(|s| {
            let handles: Vec<_> =
                parts.iter().map(|p| s.spawn(|| time_all_reduces(&p.backend, 2 * layers, hidden))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(Err(HarnessError::RankPanicked))).collect::<Vec<_>>()
        });
        let (graph_ms, eager_ms) = times.into_iter().collect::<Result<Vec<_>>>()?[0];
        let mut split = Split::spawn(group, parts)?;
        writeln!(out, "all-reduces of one step ({} x [1, {hidden}] f32): {graph_ms:.3} ms", 2 * layers)?;
        let run = decode(&mut split, opts)?;
        let bytes = weight_bytes(&split.config, opts.dtype);
        drop(split); // room for the whole model
        let plain = if opts.plain {
            Some(decode(&mut Whole::load(gpu.sibling()?, &opts.model, opts.dtype, positions)?, opts)?)
        } else {
            None
        };
        Ok(TpBenchReport {
            device: gpu.name(),
            model: opts.model.clone(),
            ranks: opts.ranks,
            weight_dtype: dtype_label(opts.dtype),
            weight_bytes: bytes,
            copy_bandwidth_bytes_per_s: bandwidth,
            tok_s: run.tok_s(),
            ceiling_tok_s: opts.ranks as f64 * bandwidth / bytes,
            allreduce_graph_ms: graph_ms,
            allreduce_eager_ms: eager_ms,
            plain_tok_s: plain.as_ref().map(Greedy::tok_s),
            ids_equal_plain: plain.as_ref().map(|p| p.ids == run.ids),
        })
    }

    /// A warm-up run (which captures the graphs), then the timed one.
    fn decode(model: &mut dyn Stepper, opts: &TpBenchOptions) -> Result<Greedy> {
        let prompt = prompt_ids(opts.prompt_tokens, model.vocab());
        greedy(model, &prompt, opts.decode_tokens.min(16) + 1, false)?;
        greedy(model, &prompt, opts.decode_tokens + 1, false)
    }

    /// Graph computation id of the all-reduce timing (no model step has it).
    const ALL_REDUCES: u64 = 0xA11_0ED0CE;
    const REPS: usize = 50;

    /// Milliseconds of `calls` all-reduces of `[1, width]` f32 on this rank: replayed from
    /// one graph (median of `REPS`), and launched one by one. Every rank runs this at once.
    fn time_all_reduces(b: &CudaBackend, calls: usize, width: usize) -> Result<(f64, f64)> {
        let mut x = b.upload_f32(&HostTensor::new(vec![1, width], vec![0.0; width]))?;
        let mut meta = BatchMeta::new(16);
        meta.push_row(&[0], 0, &[0], 1);
        let key = StepKey { computation: ALL_REDUCES, kv_cache: u64::MAX };
        // The zeroing keeps the graph from being empty: with one rank, NCCL queues nothing.
        let step = |x: &mut crate::backend::cuda::CudaTensor| -> crate::backend::Result<_> {
            b.device().memset_zero(x.ptr(), x.bytes())?;
            (0..calls).try_for_each(|_| b.all_reduce(x))?;
            Ok(vec![x.clone()])
        };
        let mut graph = vec![];
        for _ in 0..REPS + 1 {
            let start = b.record()?;
            b.replayable_step(key, &meta, || step(&mut x))?;
            graph.push(elapsed_ms(b, &start)?);
        }
        let start = b.record()?;
        step(&mut x)?;
        let eager = elapsed_ms(b, &start)?;
        Ok((median(graph[1..].to_vec()), eager)) // the first captured the graph
    }

    fn elapsed_ms(b: &CudaBackend, start: &cudarc::driver::CudaEvent) -> Result<f64> {
        let end = b.record()?;
        end.synchronize()?;
        Ok(start.elapsed_ms(&end)? as f64)
    }
}
