//! The `specula` command line: generate text, (later) serve and benchmark.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod generate;
mod kernels;
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
    Kernels(kernels::KernelsArgs),
    /// GPU speed at real shapes (dummy weights) against the memory-bandwidth ceiling.
    Bench(bench::BenchArgs),
    /// Serve the model: WebSocket (/v1/ws), OpenAI-compatible HTTP, /health, /metrics.
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Kernels(args) => kernels::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
