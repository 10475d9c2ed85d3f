//! An interactive terminal chat on the in-process API: `cargo run --release --example chat`.
//!
//! Runs the default model (SmolLM2-135M-Instruct) unless told otherwise, streams each answer
//! as it is generated, keeps the conversation in the model's chat template, and prints the
//! speed after each answer. `/reset` starts a new conversation, `/quit` (or Ctrl-D) leaves.
//! With `--spec ngram|early-exit|draft|eagle` it decodes speculatively and shows how many drafts
//! were accepted.

use std::io::{BufRead, Write};
use std::time::Instant;

use clap::Parser;
use futures::StreamExt;

use specula::actors::{Event, Runtime, RuntimeHandle};
use specula::cli::{start_runtime, ModelArgs, SpecArgs};
use specula::core::sampling::SamplingParams;
use specula::model::chat::ChatMessage;
use specula::request::{GenerateRequest, Prompt, RequestError};
use specula::spec::SpecStats;

#[derive(Parser)]
#[command(about = "Chat with a model in the terminal")]
struct Args {
    /// The model (one with a chat template), its precision and device.
    #[command(flatten)]
    load: ModelArgs,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Above 1 discourages repeating what was said; small models loop without it.
    #[arg(long, default_value_t = 1.1, allow_negative_numbers = true)]
    repetition_penalty: f32,
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<u64>,
    /// Speculative decoding, as `specula generate` and `serve` take it.
    #[command(flatten)]
    spec: SpecArgs,
}

/// How one answer went.
struct Answer {
    text: String,
    tokens: usize,
    /// From the request to its end, and to its first token.
    seconds: f64,
    first_token_seconds: f64,
    speculative: Option<SpecStats>,
}

impl Answer {
    /// The stats line: length, time, time to the first token and the decoding speed after it.
    fn stats(&self) -> String {
        let decode = self.seconds - self.first_token_seconds;
        let rate = if decode > 0.0 { self.tokens.saturating_sub(1) as f64 / decode } else { 0.0 };
        let spec = match &self.speculative {
            Some(s) if s.drafted == 0 => "; nothing drafted".to_string(),
            Some(s) => format!(
                "; {:.0}% of {} drafts accepted, {:.2} tokens per step",
                100.0 * s.acceptance_rate(),
                s.drafted,
                s.mean_accepted_length
            ),
            None => String::new(),
        };
        format!(
            "[{} tokens in {:.2} s: first after {:.2} s, then {:.1} tok/s{spec}]",
            self.tokens, self.seconds, self.first_token_seconds, rate
        )
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    specula::cli::install_tracing();
    eprintln!("Running on the {}.", args.load.backend.resolve());
    let started = start_runtime(&args.load, &args.spec, Runtime::builder())?;
    if !started.chat_template {
        return Err(format!("{} has no chat template; chat needs an instruction-tuned model", started.name).into());
    }
    let (name, handle) = (started.name, started.handle);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        ..SamplingParams::default()
    };
    sampling.validate()?;

    println!("Chatting with {name}. /reset starts over, /quit leaves.");
    let mut history: Vec<ChatMessage> = vec![];
    let mut lines = std::io::stdin().lock().lines();
    loop {
        print!("\nyou> ");
        std::io::stdout().flush()?;
        let Some(line) = lines.next().transpose()? else { break };
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history.clear();
                println!("(new conversation)");
                continue;
            }
            text => history.push(ChatMessage::user(text)),
        }
        let request = GenerateRequest {
            prompt: Prompt::Chat(history.clone()),
            sampling: sampling.clone(),
            max_tokens: args.max_tokens,
            stop: vec![],
            ignore_eos: false,
        };
        print!("bot> ");
        std::io::stdout().flush()?;
        match rt.block_on(answer(&handle, request)) {
            Ok(a) => {
                println!("\n{}", a.stats());
                history.push(ChatMessage::assistant(a.text));
            }
            Err(e) => {
                history.pop(); // the question was not answered; leave it out
                let hint = match e {
                    RequestError::PromptTooLong { .. } | RequestError::ExceedsKvCapacity { .. } => " (try /reset)",
                    _ => "",
                };
                println!("\n[error: {e}{hint}]");
            }
        }
    }
    println!("bye");
    Ok(())
}

/// Streams one answer to the terminal as its tokens arrive.
async fn answer(handle: &RuntimeHandle, request: GenerateRequest) -> Result<Answer, RequestError> {
    let start = Instant::now();
    let mut events = handle.generate(request);
    let mut text = String::new();
    let mut first = None;
    let mut out = std::io::stdout();
    while let Some(event) = events.next().await {
        match event {
            Event::Token { text: piece, ids } => {
                if first.is_none() && !ids.is_empty() {
                    first = Some(start.elapsed().as_secs_f64());
                }
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
                text.push_str(&piece);
            }
            Event::Done { usage, speculative, .. } => {
                let seconds = start.elapsed().as_secs_f64();
                let first_token_seconds = first.unwrap_or(seconds);
                let text = text.trim().to_string();
                return Ok(Answer { text, tokens: usage.completion_tokens, seconds, first_token_seconds, speculative });
            }
            Event::Error(e) => return Err(e),
        }
    }
    Err(RequestError::ShuttingDown)
}
