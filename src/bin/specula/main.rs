//! The `specula` command line: generate text, (later) serve and benchmark.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod generate;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
