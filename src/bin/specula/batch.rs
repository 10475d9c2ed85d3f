//! `specula generate --prompts-file FILE [--concurrency N]`: every line of FILE is its own
//! request, all submitted at once to the actor runtime (in-flight batching, paged KV with
//! prefix reuse); results are printed in input order.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use serde_json::json;

use specula::actors::{collect, Runtime, RuntimeHandle, Timeline};
use specula::backend::{Backend, BackendError};
use specula::cli::load_target;
use specula::engine::Completion;
use specula::request::{GenerateRequest, Prompt, RequestError};
use specula::spec::SpecStats;

use super::{completion_json, GenerateArgs};

type Error = Box<dyn std::error::Error>;

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

pub fn run<B: Backend>(
    args: &GenerateArgs,
    file: &Path,
    new_backend: &dyn Fn() -> Result<B, BackendError>,
) -> Result<(), Error> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    run_prompts(args, &text.lines().collect::<Vec<_>>(), file, new_backend)
}

/// `prompts` (the lines of `file`) through the runtime, printed in order.
pub fn run_prompts<B: Backend>(
    args: &GenerateArgs,
    prompts: &[&str],
    file: &Path,
    new_backend: &dyn Fn() -> Result<B, BackendError>,
) -> Result<(), Error> {
    if prompts.is_empty() {
        return Err(format!("{}: no prompts", file.display()).into());
    }
    let concurrency = args.concurrency.unwrap_or(prompts.len()).max(1);
    let batch = start(args, prompts.len(), concurrency, new_backend)?;
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| match batch.ids_only {
            false => Ok(args.request(p)),
            true => token_ids(p)
                .map(|ids| GenerateRequest { prompt: Prompt::Tokens(ids), ..args.request("") })
                .map_err(|e| format!("{}, line {}: {e}", file.display(), i + 1)),
        })
        .collect::<Result<Vec<_>, _>>()?;

    let start = Instant::now();
    let results: Vec<_> = futures::executor::block_on(
        futures::stream::iter(requests.into_iter().map(|r| collect(batch.handle.generate(r))))
            .buffered(concurrency)
            .collect(),
    );
    let elapsed = start.elapsed().as_secs_f64();
    let (generated, spec) = print_results(args, &results);
    eprintln!(
        "[{} requests, concurrency {concurrency}: {generated} tokens generated in {elapsed:.2} s, {:.1} output tok/s]",
        results.len(),
        generated as f64 / elapsed
    );
    batch.finish(args, &spec)?;
    // Every line has its result printed above; a run where any failed is not a success.
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        return Err(format!("{failed} of {} requests failed", results.len()).into());
    }
    Ok(())
}

/// The runtime the lines go through, and what it records.
struct Batch {
    handle: RuntimeHandle,
    timeline: Arc<Timeline>,
    /// A model without a tokenizer (dummy weights) takes each line as token ids.
    ids_only: bool,
}

/// Loads the model and starts a runtime sized for `lines` requests, `concurrency` at once.
fn start<B: Backend>(
    args: &GenerateArgs,
    lines: usize,
    concurrency: usize,
    new_backend: &dyn Fn() -> Result<B, BackendError>,
) -> Result<Batch, Error> {
    let kv = args.load.kv_options()?;
    let loaded = load_target(&args.load, new_backend)?;
    let mut builder = Runtime::builder()
        .kv_cache(kv)
        .max_batch(concurrency.min(lines))
        .max_waiting(lines.max(1024))
        .gpu_memory_fraction(args.load.gpu_memory_fraction);
    let timeline = Arc::new(Timeline::default());
    if let Some(spec) = args.spec.speculation(&loaded.target, loaded.tokenizer.as_ref(), new_backend)? {
        args.spec.warn_if_synthetic();
        builder = builder.speculation(spec).timeline(timeline.clone());
    } else if args.timeline.is_some() {
        builder = builder.timeline(timeline.clone());
    }
    let ids_only = loaded.tokenizer.is_none();
    if let Some(m) = loaded.target.backend().memory()? {
        eprintln!("device memory before the KV pool: {:.1} of {:.1} GiB free", gib(m.free), gib(m.total));
    }
    let handle = loaded.target.build(builder, loaded.tokenizer)?;
    if let Ok(stats) = futures::executor::block_on(handle.stats()) {
        let kv = stats.kv_cache;
        let storage = kv.storage.map_or("?", |s| s.name());
        eprintln!(
            "KV pool: {} blocks of {} tokens ({} tokens, {storage}, {} bytes per token)",
            stats.kv.target.num_blocks,
            specula::actors::BLOCK_SIZE,
            kv.tokens,
            kv.bytes_per_token
        );
    }
    Ok(Batch { handle, timeline, ids_only })
}

/// Prints one result per line, in input order; returns the tokens generated and the
/// speculation statistics of them all.
fn print_results(args: &GenerateArgs, results: &[Result<Completion, RequestError>]) -> (usize, SpecStats) {
    let (mut generated, mut spec) = (0, SpecStats::default());
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(c) => {
                generated += c.usage.completion_tokens;
                if let Some(s) = &c.speculative {
                    spec.merge(s);
                }
                if args.json {
                    println!("{}", completion_json(c));
                } else {
                    println!("[{i}] {}", c.text);
                }
            }
            Err(e) if args.json => println!("{}", json!({ "error": e.to_string() })),
            Err(e) => println!("[{i}] error: {e}"),
        }
    }
    (generated, spec)
}

impl Batch {
    /// Says how speculation went (step cost, acceptance, overlap), writes the timeline if
    /// asked, and shuts the runtime down.
    fn finish(self, args: &GenerateArgs, spec: &SpecStats) -> Result<(), Error> {
        if spec.steps > 0 {
            let stats = futures::executor::block_on(self.handle.stats()).ok();
            if let Some((fixed, per_token)) = stats.and_then(|s| s.step_cost) {
                eprintln!("[decode step cost: {:.2} ms + {:.3} ms per token]", fixed * 1e3, per_token * 1e3);
            }
            let o = self.timeline.summary();
            eprintln!(
                "[speculative: {} drafted, {} accepted ({:.0}%), {:.2} tokens per step, acceptance per position {}{}; drafting {:.0} ms + pre-drafting {:.0} ms, verifying {:.0} ms, overlapped {:.0} ms]",
                spec.drafted,
                spec.accepted,
                100.0 * spec.acceptance_rate(),
                spec.mean_accepted_length,
                spec.acceptance_per_position.iter().map(|a| format!("{a:.2}")).collect::<Vec<_>>().join(" "),
                if spec.synthetic { ", SYNTHETIC acceptance" } else { "" },
                o.draft_ms,
                o.pre_draft_ms,
                o.verify_ms,
                o.overlapped_ms
            );
        }
        if let Some(path) = &args.timeline {
            let spans = json!({ "spans": self.timeline.spans(), "summary": self.timeline.summary() });
            std::fs::write(path, serde_json::to_string(&spans)?).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        self.handle.shutdown_blocking(std::time::Duration::from_secs(1));
        Ok(())
    }
}

/// A line of whitespace-separated token ids.
fn token_ids(line: &str) -> Result<Vec<u32>, String> {
    line.split_whitespace()
        .map(|t| t.parse().map_err(|_| format!("{t:?} is not a token id (this model has no tokenizer)")))
        .collect()
}
