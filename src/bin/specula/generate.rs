//! `specula generate`: one prompt in, its completion out (streamed, or as JSON).

use std::io::Write;

use clap::Args;
use serde_json::json;

use specula::backend::{Backend, BackendError};
use specula::core::sampling::SamplingParams;
use specula::device::{Device, OnDevice};
use specula::engine::{Completion, Engine, SpecOptions};
use specula::model::chat::ChatMessage;
use specula::model::load_model_with;
use specula::request::{GenerateRequest, Prompt, RequestError};

use specula::cli::{ModelArgs, SpecArgs};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    load: ModelArgs,
    /// The prompt text.
    #[arg(long, required_unless_present = "prompts_file")]
    prompt: Option<String>,
    /// Submit every line of FILE as its own request, all at once, through the batching
    /// runtime; prints one result per line in input order (JSON objects with --json).
    #[arg(long, value_name = "FILE", conflicts_with = "prompt")]
    prompts_file: Option<std::path::PathBuf>,
    /// With --prompts-file: the most requests in flight at once (default: all of them).
    #[arg(long, requires = "prompts_file", allow_negative_numbers = true)]
    concurrency: Option<usize>,
    /// With --prompts-file and --spec: write when the drafter and the verifier worked (JSON
    /// spans) to FILE, and print how long they overlapped.
    #[arg(long, value_name = "FILE", requires = "prompts_file")]
    timeline: Option<std::path::PathBuf>,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    // Numeric flags take negative numbers as values (`--temperature -1`), so that they are
    // refused by the same validation as a request over the network, not by the parser.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// 0 is off.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object (text, token_ids, usage, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    spec: SpecArgs,
}

#[path = "batch.rs"]
mod batch;

pub fn run(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    // Refused before the model loads, by the check every request meets.
    args.request("").sampling.validate().map_err(RequestError::InvalidSampling)?;
    if args.load.backend == Device::Auto {
        eprintln!("specula: running on the {}", args.load.backend.resolve());
    }
    args.load.backend.run(OnBackend(&args))?
}

/// `run_on` as code generic over the backend the device picks.
struct OnBackend<'a>(&'a GenerateArgs);

impl OnDevice for OnBackend<'_> {
    type Output = Result<(), Box<dyn std::error::Error>>;
    fn run<B: Backend>(self, new_backend: &dyn Fn() -> Result<B, BackendError>) -> Self::Output {
        run_on(self.0, new_backend)
    }
}

/// One prompt through the engine, or a prompts file through the runtime, on the backends
/// `new_backend` makes (the first runs the target).
fn run_on<B: Backend>(
    args: &GenerateArgs,
    new_backend: &dyn Fn() -> Result<B, BackendError>,
) -> Result<(), Box<dyn std::error::Error>> {
    match &args.prompts_file {
        Some(file) => batch::run(args, file, new_backend),
        // The single-request engine runs a whole model: a split one goes through the runtime.
        None if args.load.tensor_parallel.is_some() => {
            let prompt = [args.prompt.as_deref().unwrap_or_default()];
            batch::run_prompts(args, &prompt, std::path::Path::new("--prompt"), new_backend)
        }
        None => generate(args, new_backend),
    }
}

/// One prompt on the backends `new_backend` makes (the first runs the target).
fn generate<B: Backend>(
    args: &GenerateArgs,
    new_backend: &dyn Fn() -> Result<B, BackendError>,
) -> Result<(), Box<dyn std::error::Error>> {
    let kv = args.load.kv_options()?;
    let backend = new_backend()?;
    let loaded = load_model_with(&args.load.source()?, &args.load.load_options(), &backend)?;
    let engine = Engine::new(backend, loaded.model, loaded.tokenizer).with_kv(kv);
    let request = args.request(args.prompt.as_deref().unwrap_or_default());
    let tree = args.spec.tree_shape()?;
    let mut proposer = args.spec.proposer(&engine.model, engine.tokenizer.as_ref(), new_backend)?;
    let spec = proposer.as_deref_mut().map(|proposer| SpecOptions {
        proposer,
        max_draft: args.spec.draft_len,
        synthetic_acceptance: args.spec.synthetic_acceptance,
        tree,
    });
    args.spec.warn_if_synthetic();
    let stdout = std::io::stdout();
    let completion = engine.generate_speculative(&request, spec, |_, text| {
        if !args.json {
            let mut out = stdout.lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    })?;
    if args.json {
        println!("{}", completion_json(&completion));
    } else {
        println!();
        eprintln!(
            "[{} prompt + {} generated tokens, prefill {:.0} ms, decode {:.1} tok/s, finish: {:?}]",
            completion.usage.prompt_tokens,
            completion.usage.completion_tokens,
            completion.timings.prefill_ms,
            completion.timings.decode_tok_per_s,
            completion.finish_reason
        );
        if let Some(s) = &completion.speculative {
            eprintln!(
                "[speculative: {} drafted, {} accepted ({:.0}%), {:.2} tokens per step{}{}]",
                s.drafted,
                s.accepted,
                100.0 * s.acceptance_rate(),
                s.mean_accepted_length,
                if s.synthetic { ", SYNTHETIC acceptance" } else { "" },
                if s.random_heads { ", RANDOM heads" } else { "" }
            );
        }
    }
    Ok(())
}

impl GenerateArgs {
    /// The request these options describe, for one prompt.
    fn request(&self, text: &str) -> GenerateRequest {
        let prompt = if self.chat {
            Prompt::Chat(vec![ChatMessage::user(text.to_string())])
        } else {
            Prompt::Text(text.to_string())
        };
        GenerateRequest {
            prompt,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
        }
    }
}

fn completion_json(c: &Completion) -> serde_json::Value {
    json!({
        "text": c.text,
        "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "usage": c.usage,
        "timings": c.timings,
        "speculative": c.speculative,
    })
}
