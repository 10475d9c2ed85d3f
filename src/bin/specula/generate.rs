//! `specula generate`: one prompt in, its completion out (streamed, or as JSON).

use std::io::Write;

use clap::Args;
use serde_json::json;

use specula::backend::cpu::CpuBackend;
use specula::core::sampling::SamplingParams;
use specula::engine::{Completion, Engine};
use specula::model::chat::ChatMessage;
use specula::model::{load_model, ModelSource};
use specula::request::{GenerateRequest, Prompt};

#[derive(Args)]
pub struct GenerateArgs {
    /// `default` (SmolLM2-135M-Instruct, fetched on first use), a .gguf file, a Hugging Face
    /// folder, or `dummy:<shape>` (random weights: llama-3.2-1b, llama-3.1-8b, ...).
    #[arg(long, default_value = "default", env = "SPECULA_MODEL")]
    model: ModelSource,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 is off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long)]
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
}

pub fn run(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let backend = CpuBackend::new();
    let loaded = load_model(&args.model, &backend)?;
    let engine = Engine::new(backend, loaded.model, loaded.tokenizer);
    let prompt = if args.chat {
        Prompt::Chat(vec![ChatMessage::user(args.prompt.clone())])
    } else {
        Prompt::Text(args.prompt.clone())
    };
    let request = GenerateRequest {
        prompt,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
    };
    let stdout = std::io::stdout();
    let completion = engine.generate(&request, |_, text| {
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
    }
    Ok(())
}

fn completion_json(c: &Completion) -> serde_json::Value {
    json!({
        "text": c.text,
        "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "usage": c.usage,
        "timings": c.timings,
    })
}
