//! `specula generate`: one prompt in, its completion out (streamed, or as JSON).

use std::io::Write;
use std::sync::Arc;

use clap::Args;
use serde_json::json;

use specula::backend::cpu::CpuBackend;
use specula::core::sampling::SamplingParams;
use specula::engine::{Completion, Engine, SpecOptions};
use specula::model::chat::ChatMessage;
use specula::model::{load_model, ModelSource};
use specula::request::{GenerateRequest, Prompt};
use specula::spec::{
    check_draft_compatible, ModelProposer, NgramProposer, Proposer, SpecError, SpecMethod, MAX_DRAFT_LEN,
};

#[derive(Args)]
pub struct GenerateArgs {
    /// `default` (SmolLM2-135M-Instruct, fetched on first use), a .gguf file, a Hugging Face
    /// folder, or `dummy:<shape>` (random weights: llama-3.2-1b, llama-3.1-8b, ...).
    #[arg(long, default_value = "default", env = "SPECULA_MODEL")]
    model: ModelSource,
    /// The prompt text.
    #[arg(long, required_unless_present = "prompts_file")]
    prompt: Option<String>,
    /// Submit every line of FILE as its own request, all at once, through the batching
    /// runtime; prints one result per line in input order (JSON objects with --json).
    #[arg(long, value_name = "FILE", conflicts_with = "prompt")]
    prompts_file: Option<std::path::PathBuf>,
    /// With --prompts-file: the most requests in flight at once (default: all of them).
    #[arg(long, requires = "prompts_file")]
    concurrency: Option<usize>,
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
    #[command(flatten)]
    spec: SpecArgs,
}

/// Speculative decoding options.
#[derive(Args)]
pub struct SpecArgs {
    /// How to draft tokens for the target to verify.
    #[arg(long, value_enum, default_value = "none")]
    spec: SpecMethod,
    /// The draft model for `--spec draft` (same tokenizer as the target).
    #[arg(long)]
    draft_model: Option<ModelSource>,
    /// Layers of the target that draft for `--spec early-exit`.
    #[arg(long, default_value_t = 6)]
    draft_layers: usize,
    /// The most tokens drafted per step.
    #[arg(long, default_value_t = 4)]
    draft_len: usize,
    /// Benchmarks only: accept each draft token with this probability whatever its value.
    /// The output is then not the model's, and is labelled `synthetic` wherever it appears.
    #[arg(long)]
    synthetic_acceptance: Option<f64>,
}

/// KV blocks of the draft model's cache: enough for one long sequence.
const DRAFT_CACHE_BLOCKS: usize = 1024;

impl SpecArgs {
    /// The proposer the options ask for, or None for plain decoding.
    fn proposer(&self, engine: &Engine<CpuBackend>) -> Result<Option<Box<dyn Proposer>>, Box<dyn std::error::Error>> {
        if !(1..=MAX_DRAFT_LEN).contains(&self.draft_len) {
            return Err(SpecError::DraftLen(self.draft_len).into());
        }
        if let Some(rate) = self.synthetic_acceptance.filter(|r| !(0.0..=1.0).contains(r)) {
            return Err(SpecError::SyntheticRate(rate).into());
        }
        let block = specula::engine::BLOCK_SIZE;
        Ok(match self.spec {
            SpecMethod::None => None,
            SpecMethod::Ngram => Some(Box::new(NgramProposer::default())),
            SpecMethod::EarlyExit => {
                let max = engine.model.num_layers();
                if !(1..=max).contains(&self.draft_layers) {
                    return Err(SpecError::DraftLayers { got: self.draft_layers, max }.into());
                }
                let p = ModelProposer::new(
                    CpuBackend::new(),
                    engine.model.clone(),
                    self.draft_layers,
                    DRAFT_CACHE_BLOCKS,
                    block,
                )?;
                Some(Box::new(p))
            }
            SpecMethod::Draft => {
                let source = self.draft_model.as_ref().ok_or(SpecError::MissingDraftModel)?;
                let draft = load_model(source, &CpuBackend::new())?;
                check_draft_compatible(
                    engine.tokenizer.as_ref(),
                    draft.tokenizer.as_ref(),
                    engine.model.config.vocab_size,
                    draft.model.config.vocab_size,
                )?;
                let layers = draft.model.num_layers();
                Some(Box::new(ModelProposer::new(
                    CpuBackend::new(),
                    Arc::new(draft.model),
                    layers,
                    DRAFT_CACHE_BLOCKS,
                    block,
                )?))
            }
        })
    }
}

#[path = "batch.rs"]
mod batch;

pub fn run(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(file) = &args.prompts_file {
        return batch::run(&args, file);
    }
    let backend = CpuBackend::new();
    let loaded = load_model(&args.model, &backend)?;
    let engine = Engine::new(backend, loaded.model, loaded.tokenizer);
    let request = args.request(args.prompt.as_deref().unwrap_or_default());
    let mut proposer = args.spec.proposer(&engine)?;
    let spec = proposer.as_deref_mut().map(|proposer| SpecOptions {
        proposer,
        max_draft: args.spec.draft_len,
        synthetic_acceptance: args.spec.synthetic_acceptance,
    });
    if args.spec.synthetic_acceptance.is_some() {
        eprintln!("warning: synthetic acceptance is on: the output is not the model's (benchmark mode)");
    }
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
                "[speculative: {} drafted, {} accepted ({:.0}%), {:.2} tokens per step{}]",
                s.drafted,
                s.accepted,
                100.0 * s.acceptance_rate(),
                s.mean_accepted_length,
                if s.synthetic { ", SYNTHETIC acceptance" } else { "" }
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
