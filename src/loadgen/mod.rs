//! `specula bench serve`: a load generator for a running server, Specula or any
//! OpenAI-compatible one, in the manner of vLLM's `bench serve` and trtllm-bench.
//!
//! ```text
//!  args ──> dataset ──> WorkItems (prompt, ~input tokens, max_tokens)
//!                          │
//!  server::probe (/v1/models: is anyone there?) ── warm-up requests (the first must work)
//!                          │
//!  for each load of the sweep:  load::run ── Door::send ──> /v1/completions (SSE) or /v1/ws
//!                          │                 (one Completed or Failure per request)
//!                          └──> RunReport (TTFT, TPOT, ITL, E2E, throughput, failures,
//!                               speculation) ──> stdout table, --json, --plot
//! ```
//!
//! Everything runs on one thread's event loop (actix-rt, as awc wants): a client spends its
//! time waiting on sockets, and one thread keeps hundreds of streams going.

mod args;
mod client;
mod dataset;
mod load;
mod plot;
mod report;
mod server;

use std::io::Write;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use self::args::{Api, DatasetSource, Load, PlotLatency, Rate, ServeBenchArgs};
pub use self::client::Failure;
use self::client::{Door, RequestShape};
use self::dataset::WorkItem;
pub use self::report::{BenchConfig, FailureCount, RunReport, ServeBenchReport, SpecSource, SpecSummary, Summary};
use self::server::Endpoint;

/// Why the benchmark stopped. A request that fails during a run is not one of these: it is
/// counted in the run's report.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bad --url `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("no server answers at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url} answered HTTP {status}: {message}")]
    Http { url: String, status: u16, message: String },
    #[error("the warm-up request failed, so nothing was measured: {0}")]
    WarmupFailed(Failure),
    #[error("dataset {path}: {reason}")]
    Dataset { path: PathBuf, reason: String },
    #[error("{0}")]
    Option(String),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a `specula bench serve --json` report: {source}")]
    NotAReport { path: PathBuf, source: serde_json::Error },
    #[error("cannot draw {path}: {reason}")]
    Plot { path: PathBuf, reason: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Runs the sweep: a report block per run to `out` as each ends, then the sweep's table;
/// the JSON and the plot when asked for. Starts its own event loop: call it from a plain
/// thread, not from inside an async runtime.
pub fn run(args: &ServeBenchArgs, out: &mut dyn Write) -> Result<ServeBenchReport, BenchError> {
    let endpoint = Endpoint::parse(&args.url)?;
    check_options(args)?;
    if let Some(path) = &args.plot {
        plot::PlotFormat::of(path)?;
    }
    let compared = args.compare.iter().map(report::read_report).collect::<Result<Vec<_>, _>>()?;
    let items = dataset::load(args)?;
    let report = actix_rt::System::new().block_on(sweep(args, &endpoint, &items, out))?;
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?;
        std::fs::write(path, json + "\n").map_err(|source| BenchError::Write { path: path.clone(), source })?;
    }
    if let Some(path) = &args.plot {
        let reports: Vec<_> = std::iter::once(report.clone()).chain(compared).collect();
        plot::draw(path, &reports, args.plot_latency)?;
    }
    Ok(report)
}

/// Options that parse alone but not together.
fn check_options(args: &ServeBenchArgs) -> Result<(), BenchError> {
    if args.dataset == DatasetSource::RandomIds && args.api == Api::Ws {
        return Err(BenchError::Option(
            "--dataset random-ids sends token ids, which the WebSocket's `generate` frame does not take \
             (its `prompt` is text): use --api openai"
                .into(),
        ));
    }
    Ok(())
}

async fn sweep(
    args: &ServeBenchArgs,
    endpoint: &Endpoint,
    items: &[WorkItem],
    out: &mut dyn Write,
) -> Result<ServeBenchReport, BenchError> {
    let http = client::http_client(args.api_key.as_deref());
    let served = server::probe(&http, endpoint).await?;
    let model = args.model.clone().or(served);
    let config = config(args, endpoint, model.clone());
    let shape = RequestShape {
        model,
        temperature: args.temperature,
        ignore_eos: config.ignore_eos,
        api_key: args.api_key.clone(),
        timeout: args.timeout,
    };
    let door = Door::new(args.api, endpoint, shape);
    warm_up(&door, items, args.warmup).await?;
    let label = args.label.clone().unwrap_or_else(|| default_label(&config));
    let per_run = match args.requests_per_client {
        Some(k) => format!("{k} requests a client (at least {})", args.num_requests),
        None => format!("{} requests", items.len()),
    };
    writeln!(out, "{label}: {per_run} a run against {} over {}", endpoint.base(), args.api)?;
    let mut runs = Vec::new();
    for load in args.loads() {
        let items = &items[..args.requests_for(load).min(items.len())];
        let progress = progress_bar(items.len(), &format!("{label}, {load}"));
        let before = server::spec_counters(&http, endpoint).await;
        let outcome = load::run(&door, items, load, args.max_concurrency, args.seed, &progress).await;
        let after = server::spec_counters(&http, endpoint).await;
        progress.finish_and_clear();
        let run = RunReport::new(load, outcome, server::counters_delta(before, after));
        write!(out, "\n== {label}, {load} ==\n{run}")?;
        runs.push(run);
    }
    let report = ServeBenchReport { label, config, runs };
    write!(out, "\n{report}")?;
    Ok(report)
}

/// Requests before the sweep, not measured: the first failure stops the benchmark, since
/// every request would fail alike (a wrong route, key or model).
async fn warm_up(door: &Door, items: &[WorkItem], count: usize) -> Result<(), BenchError> {
    for item in items.iter().cycle().take(count) {
        door.send(item).await.map_err(BenchError::WarmupFailed)?;
    }
    Ok(())
}

fn config(args: &ServeBenchArgs, endpoint: &Endpoint, model: Option<String>) -> BenchConfig {
    BenchConfig {
        url: endpoint.base().to_string(),
        api: args.api,
        model,
        dataset: args.dataset.clone(),
        vocab: (args.dataset == DatasetSource::RandomIds).then_some(args.vocab),
        input_len: args.input_len,
        input_std: args.input_std,
        output_len: args.output_len,
        output_std: args.output_std,
        num_requests: args.num_requests,
        requests_per_client: args.requests_per_client,
        seed: args.seed,
        temperature: args.temperature,
        ignore_eos: !args.no_ignore_eos,
        max_concurrency: args.max_concurrency,
        warmup: args.warmup,
        timeout_s: args.timeout.as_secs_f64(),
    }
}

/// `MODEL API`, or the API alone when the server named no model.
fn default_label(config: &BenchConfig) -> String {
    match &config.model {
        Some(model) => format!("{model} {}", config.api),
        None => config.api.to_string(),
    }
}

/// A bar on stderr (drawn only when it is a terminal), ticked as requests end.
fn progress_bar(requests: usize, message: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(requests as u64), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} requests, {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(message.to_string());
    bar
}
