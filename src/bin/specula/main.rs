//! The `specula` command line: generate text, (later) serve and benchmark.

use std::io::{stderr, stdout};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use specula::harness::{bench, check, parity, KernelsCommand};
use specula::loadgen;

mod generate;
mod serve;

#[derive(Parser)]
#[command(name = "specula", version, about = "LLM inference for Llama-family models, with speculative decoding")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for a prompt.
    Generate(generate::GenerateArgs),
    /// Compile the CUDA kernels (`check`), or compare them with the CPU ops on a GPU (`parity`).
    #[command(subcommand)]
    Kernels(KernelsCommand),
    /// GPU speed at real shapes (dummy weights) against the memory-bandwidth ceiling; `bench
    /// serve`: latency and throughput of a running server under load.
    Bench(BenchArgs),
    /// Serve the model: WebSocket (/v1/ws), OpenAI-compatible HTTP, /health, /metrics.
    Serve(serve::ServeArgs),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct BenchArgs {
    #[command(subcommand)]
    serve: Option<BenchServe>,
    #[command(flatten)]
    gpu: bench::BenchOptions,
}

#[derive(Subcommand)]
enum BenchServe {
    /// Load a running server (Specula or any OpenAI-compatible one) and report TTFT, TPOT,
    /// inter-token and end-to-end latency and throughput, per load of a sweep.
    Serve(Box<loadgen::ServeBenchArgs>),
    /// A model split over GPUs 0..N-1 through NCCL: decode tok/s against the ceiling, and
    /// the all-reduces of one step timed alone.
    Tp(bench::TpBenchOptions),
}

fn main() -> ExitCode {
    specula::cli::install_tracing();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Generate(args) => generate::run(args),
        Command::Kernels(KernelsCommand::Check(opts)) => Ok(check::run(&opts, &mut stdout(), &mut stderr())?),
        Command::Kernels(KernelsCommand::Parity(opts)) => {
            let report = parity::run(&opts, &mut stdout())?;
            print!("{report}");
            report.check()?;
            if let Some(note) = report.note() {
                eprintln!("{note}");
            }
            Ok(())
        }
        Command::Bench(BenchArgs { serve: Some(BenchServe::Serve(args)), .. }) => {
            Ok(loadgen::run(&args, &mut stdout()).map(drop)?)
        }
        Command::Bench(BenchArgs { serve: Some(BenchServe::Tp(opts)), .. }) => {
            Ok(bench::tp::run(&opts, &mut stdout()).map(drop)?)
        }
        Command::Bench(BenchArgs { gpu, .. }) => Ok(bench::run(&gpu, &mut stdout())?),
        Command::Serve(args) => serve::run(args),
    }
}
