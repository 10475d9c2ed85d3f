//! The `specula` command line: generate text, (later) serve and benchmark.

use std::io::{stderr, stdout};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use specula::harness::{bench, check, parity, KernelsCommand};

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
    /// GPU speed at real shapes (dummy weights) against the memory-bandwidth ceiling.
    Bench(bench::BenchOptions),
    /// Serve the model: WebSocket (/v1/ws), OpenAI-compatible HTTP, /health, /metrics.
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
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
        Command::Bench(opts) => Ok(bench::run(&opts, &mut stdout()).map(drop)?),
        Command::Serve(args) => serve::run(args),
    }
}
