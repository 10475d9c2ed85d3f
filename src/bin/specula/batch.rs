//! `specula generate --prompts-file FILE [--concurrency N]`: every line of FILE is its own
//! request, all submitted at once to the actor runtime (in-flight batching, paged KV with
//! prefix reuse); results are printed in input order.

use std::path::Path;
use std::time::Instant;

use futures::StreamExt;
use serde_json::json;

use specula::actors::{collect, Runtime};
use specula::backend::cpu::CpuBackend;
use specula::model::load_model;
use specula::spec::SpecMethod;

use super::{completion_json, GenerateArgs};

pub fn run(args: &GenerateArgs, file: &Path) -> Result<(), Box<dyn std::error::Error>> {
    if !matches!(args.spec.spec, SpecMethod::None) {
        return Err("--prompts-file runs through the batching runtime, which does not speculate yet".into());
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let prompts: Vec<&str> = text.lines().collect();
    if prompts.is_empty() {
        return Err(format!("{}: no prompts", file.display()).into());
    }
    let concurrency = args.concurrency.unwrap_or(prompts.len()).max(1);
    let backend = CpuBackend::new();
    let loaded = load_model(&args.model, &backend)?;
    let handle = Runtime::builder()
        .max_batch(concurrency.min(prompts.len()))
        .max_waiting(prompts.len().max(1024))
        .build(backend, loaded.model, loaded.tokenizer)?;

    let start = Instant::now();
    let results: Vec<_> = futures::executor::block_on(
        futures::stream::iter(prompts.iter().map(|p| collect(handle.generate(args.request(p)))))
            .buffered(concurrency)
            .collect(),
    );
    let elapsed = start.elapsed().as_secs_f64();
    let mut generated = 0;
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(c) => {
                generated += c.usage.completion_tokens;
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
    eprintln!(
        "[{} requests, concurrency {concurrency}: {generated} tokens generated in {elapsed:.2} s, {:.1} output tok/s]",
        results.len(),
        generated as f64 / elapsed
    );
    handle.shutdown_blocking(std::time::Duration::from_secs(1));
    Ok(())
}
