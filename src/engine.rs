//! The simplest way to run a model: one request at a time, prefill then decode, on any
//! backend. The runtime (actors, batching, speculation) builds on the same pieces.

use std::time::Instant;

use serde::Serialize;

use crate::backend::{Backend, BackendError, BatchMeta};
use crate::core::detokenizer::{Detokenizer, StopCheck, StopMatcher};
use crate::core::sampling::Sampler;
use crate::model::{KvCache, Llama, Tokenizer};
use crate::request::{FinishReason, GenerateRequest, Prompt, RequestError, Usage};

/// Tokens per forward while prefilling: bounds the activations' memory.
const PREFILL_CHUNK: usize = 512;
pub const BLOCK_SIZE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Generated tokens per second of decoding (after the first token).
    pub decode_tok_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
}

/// Tokenizes and checks a prompt against the model; shared by every entry point.
pub fn tokenize_prompt(
    tokenizer: Option<&Tokenizer>,
    prompt: &Prompt,
    vocab: usize,
    context: usize,
) -> Result<Vec<u32>, RequestError> {
    let ids = match prompt {
        Prompt::Tokens(ids) => ids.clone(),
        Prompt::Text(text) => tokenizer.ok_or(RequestError::NoTokenizer)?.encode(text, true),
        Prompt::Chat(messages) => {
            let tok = tokenizer.ok_or(RequestError::NoTokenizer)?;
            let template = tok
                .chat_template
                .as_ref()
                .ok_or_else(|| RequestError::ChatTemplate("the model has no chat template".into()))?;
            let text = template.render(messages, true).map_err(RequestError::ChatTemplate)?;
            tok.encode(&text, false)
        }
    };
    if ids.is_empty() {
        return Err(RequestError::EmptyPrompt);
    }
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(RequestError::BadTokenId(bad));
    }
    if ids.len() >= context {
        return Err(RequestError::PromptTooLong { tokens: ids.len(), context });
    }
    Ok(ids)
}

pub struct Engine<B: Backend> {
    pub backend: B,
    pub model: Llama<B>,
    pub tokenizer: Option<Tokenizer>,
}

impl<B: Backend> Engine<B> {
    pub fn new(backend: B, model: Llama<B>, tokenizer: Option<Tokenizer>) -> Self {
        Engine { backend, model, tokenizer }
    }

    pub fn context_len(&self) -> usize {
        self.model.config.max_position_embeddings
    }

    /// Generates a completion, calling `on_delta(new_ids, new_text)` as tokens arrive.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        mut on_delta: impl FnMut(&[u32], &str),
    ) -> Result<Completion, EngineError> {
        req.sampling.validate().map_err(RequestError::InvalidSampling)?;
        if req.max_tokens == 0 {
            return Err(RequestError::ZeroMaxTokens.into());
        }
        let config = &self.model.config;
        let prompt = tokenize_prompt(self.tokenizer.as_ref(), &req.prompt, config.vocab_size, self.context_len())?;
        let budget = (prompt.len() + req.max_tokens).min(self.context_len());
        let num_blocks = budget.div_ceil(BLOCK_SIZE);
        let mut kv = KvCache::new(&self.backend, config, num_blocks, BLOCK_SIZE)?;
        let table: Vec<u32> = (0..num_blocks as u32).collect();

        let mut sampler = Sampler::new(req.sampling.clone());
        let mut history = prompt.clone();
        let mut out: Vec<u32> = vec![];
        let (mut detok, mut stops) = (Detokenizer::new(), StopMatcher::new(req.stop.clone()));
        let mut text = String::new();

        let start = Instant::now();
        let mut logits = self.prefill(&mut kv, &prompt, &table)?;
        let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
        let decode_start = Instant::now();
        let finish = loop {
            let next = sampler.sample(&logits, &history);
            history.push(next);
            let is_eos = !req.ignore_eos && self.tokenizer.as_ref().is_some_and(|t| t.is_eos(next));
            if is_eos {
                break FinishReason::Stop;
            }
            out.push(next);
            let delta = match &self.tokenizer {
                Some(tok) => detok.push(&[next], |ids| tok.decode(ids)),
                None => String::new(),
            };
            match stops.push(&delta) {
                StopCheck::Stop(last) => {
                    text.push_str(&last);
                    on_delta(&[next], &last);
                    break FinishReason::Stop;
                }
                StopCheck::Continue(emit) => {
                    text.push_str(&emit);
                    on_delta(&[next], &emit);
                }
            }
            if out.len() >= req.max_tokens || history.len() >= budget {
                break FinishReason::Length;
            }
            let mut meta = BatchMeta::new(BLOCK_SIZE as u32);
            meta.push_row(&[next], (history.len() - 1) as u32, &table, 1);
            logits = self.backend.to_host(&self.model.forward(&self.backend, &mut kv, &meta)?)?;
        };
        if finish != FinishReason::Stop {
            let rest = stops.flush();
            text.push_str(&rest);
            on_delta(&[], &rest);
        }
        let decode_ms = decode_start.elapsed().as_secs_f64() * 1e3;
        let decoded = out.len().saturating_sub(1);
        Ok(Completion {
            text,
            usage: Usage { prompt_tokens: prompt.len(), completion_tokens: out.len() },
            token_ids: out,
            finish_reason: finish,
            timings: Timings {
                prefill_ms,
                decode_ms,
                decode_tok_per_s: if decode_ms > 0.0 { decoded as f64 / (decode_ms / 1e3) } else { 0.0 },
            },
        })
    }

    /// Runs the prompt through the model in chunks; returns the last position's logits.
    pub fn prefill(&self, kv: &mut KvCache<B>, prompt: &[u32], table: &[u32]) -> Result<Vec<f32>, EngineError> {
        let mut logits = vec![];
        for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
            let mut meta = BatchMeta::new(BLOCK_SIZE as u32);
            meta.push_row(chunk, (i * PREFILL_CHUNK) as u32, table, 1);
            logits = self.backend.to_host(&self.model.forward(&self.backend, kv, &meta)?)?;
        }
        Ok(logits)
    }
}
