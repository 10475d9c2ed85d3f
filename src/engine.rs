//! The simplest way to run a model: one request at a time, prefill then decode, on any
//! backend. The runtime (actors, batching, speculation) builds on the same pieces.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::backend::{Backend, BackendError, BatchMeta};
use crate::core::detokenizer::{Detokenizer, StopCheck, StopMatcher};
use crate::core::lengths::Lengths;
use crate::core::sampling::Sampler;
use crate::core::spec::AcceptanceTracker;
use crate::core::step_cost::StepCost;
use crate::model::{KvCache, Llama, Tokenizer};
use crate::request::{FinishReason, GenerateRequest, Prompt, RequestError, Usage};
use crate::spec::{ids_suffice, verify, verify_ids, Draft, Proposer, SeqId, SpecStats};

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
    /// Present when the completion was generated speculatively.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speculative: Option<SpecStats>,
}

/// Tokenizes a prompt (chat template applied) and checks its ids against the vocabulary;
/// shared by every entry point. A text the context could never hold is refused by its size
/// first, before any work on it; the token count is checked by `Lengths::admit`.
pub fn tokenize_prompt(
    tokenizer: Option<&Tokenizer>,
    prompt: &Prompt,
    vocab: usize,
    lengths: &Lengths,
) -> Result<Vec<u32>, RequestError> {
    let ids = match prompt {
        Prompt::Tokens(ids) => {
            lengths.check_prompt(ids.len())?;
            ids.clone()
        }
        Prompt::Text(text) => {
            let tok = tokenizer.ok_or(RequestError::NoTokenizer)?;
            lengths.check_prompt_bytes(text.len(), tok.max_bytes_per_token())?;
            tok.encode(text, true)
        }
        Prompt::Chat(messages) => {
            let tok = tokenizer.ok_or(RequestError::NoTokenizer)?;
            let bytes = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
            lengths.check_prompt_bytes(bytes, tok.max_bytes_per_token())?;
            let template = tok
                .chat_template
                .as_ref()
                .ok_or_else(|| RequestError::ChatTemplate("the model has no chat template".into()))?;
            let text = template.render(messages, true).map_err(RequestError::ChatTemplate)?;
            lengths.check_prompt_bytes(text.len(), tok.max_bytes_per_token())?;
            tok.encode(&text, false)
        }
    };
    if ids.is_empty() {
        return Err(RequestError::EmptyPrompt);
    }
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(RequestError::BadTokenId(bad));
    }
    Ok(ids)
}

pub struct Engine<B: Backend> {
    pub backend: B,
    /// Shared with an early-exit proposer, which drafts with the first layers.
    pub model: Arc<Llama<B>>,
    pub tokenizer: Option<Tokenizer>,
}

impl<B: Backend> Engine<B> {
    pub fn new(backend: B, model: Llama<B>, tokenizer: Option<Tokenizer>) -> Self {
        Engine { backend, model: Arc::new(model), tokenizer }
    }

    pub fn context_len(&self) -> usize {
        self.model.config.max_position_embeddings
    }

    /// Generates a completion, calling `on_delta(new_ids, new_text)` as tokens arrive.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_delta: impl FnMut(&[u32], &str),
    ) -> Result<Completion, EngineError> {
        self.generate_speculative(req, None, on_delta)
    }

    /// Generates with a proposer drafting up to `spec.max_draft` tokens per step, verified
    /// by the target in one forward; with `spec` None, plain decoding.
    pub fn generate_speculative(
        &self,
        req: &GenerateRequest,
        mut spec: Option<SpecOptions>,
        mut on_delta: impl FnMut(&[u32], &str),
    ) -> Result<Completion, EngineError> {
        req.sampling.validate().map_err(RequestError::InvalidSampling)?;
        let config = &self.model.config;
        // The engine sizes its own cache for the request: only the context limits it.
        let lengths = Lengths { context: self.context_len(), kv_tokens: usize::MAX };
        let prompt = tokenize_prompt(self.tokenizer.as_ref(), &req.prompt, config.vocab_size, &lengths)?;
        let budget = lengths.admit(prompt.len(), req.max_tokens)?.max_len;
        let num_blocks = budget.div_ceil(BLOCK_SIZE);
        let mut kv = KvCache::new(&self.backend, config, num_blocks, BLOCK_SIZE)?;
        let table: Vec<u32> = (0..num_blocks as u32).collect();

        let mut sampler = Sampler::new(req.sampling.clone());
        let mut out = Output::new(req, self.tokenizer.as_ref());
        let mut history = prompt.clone();
        let mut stats = SpecStats::default();
        let mut acceptance = AcceptanceTracker::default();
        let mut cost = StepCost::default();
        stats.synthetic = spec.as_ref().is_some_and(|s| s.synthetic_acceptance.is_some());

        let start = Instant::now();
        let logits = self.prefill(&mut kv, &prompt, &table)?;
        let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
        let decode_start = Instant::now();
        let mut new_tokens = vec![sampler.sample(&logits, &history)];
        let finish = loop {
            if let Some(finish) = out.push(&new_tokens, &mut history, &mut on_delta) {
                break finish;
            }
            if history.len() >= budget {
                break FinishReason::Length;
            }
            // The last token is not in the target's cache yet: it leads this step's row.
            let room = budget - history.len();
            let draft = match spec.as_mut() {
                Some(s) => {
                    let k = acceptance.draft_len(s.max_draft, 1, &cost).min(room);
                    let start = Instant::now();
                    let draft = s.proposer.propose(SEQ, &history, k, &req.sampling)?;
                    cost.record_draft(draft.tokens.len(), start.elapsed().as_secs_f64());
                    draft
                }
                None => Draft::default(),
            };
            let mut row = vec![*history.last().expect("history holds the prompt")];
            row.extend(&draft.tokens);
            let mut meta = BatchMeta::new(BLOCK_SIZE as u32);
            meta.push_row(&row, (history.len() - 1) as u32, &table, row.len());
            let step_start = Instant::now();
            let out = self.backend.forward_step(&self.model, &mut kv, &meta, self.model.num_layers())?;
            let synthetic = spec.as_ref().and_then(|s| s.synthetic_acceptance);
            new_tokens = if ids_suffice(&sampler) {
                // Only the ids cross to the host (a GPU computes them where the logits are).
                let ids = self.backend.argmax_rows(&out, config.vocab_size)?;
                verify_ids(&draft, &ids, &mut sampler, synthetic)
            } else {
                let logits = self.backend.to_host(&out)?;
                verify(&draft, &logits, config.vocab_size, &history, &mut sampler, synthetic)
            };
            cost.record_step(row.len(), step_start.elapsed().as_secs_f64());
            if let Some(s) = spec.as_mut() {
                let accepted = new_tokens.len() - 1;
                stats.record(draft.tokens.len(), accepted);
                acceptance.record(draft.tokens.len(), accepted);
                s.proposer.rollback(SEQ, history.len() + accepted);
            }
        };
        if let Some(s) = spec.as_mut() {
            s.proposer.release(SEQ);
        }
        let text = out.finish(finish, &mut on_delta);
        let decode_ms = decode_start.elapsed().as_secs_f64() * 1e3;
        let decoded = out.ids.len().saturating_sub(1);
        Ok(Completion {
            text,
            usage: Usage { prompt_tokens: prompt.len(), completion_tokens: out.ids.len() },
            token_ids: out.ids,
            finish_reason: finish,
            timings: Timings {
                prefill_ms,
                decode_ms,
                decode_tok_per_s: if decode_ms > 0.0 { decoded as f64 / (decode_ms / 1e3) } else { 0.0 },
            },
            speculative: spec.is_some().then_some(stats),
        })
    }

    /// Runs the prompt through the model in chunks; returns the last position's logits.
    pub fn prefill(&self, kv: &mut KvCache<B>, prompt: &[u32], table: &[u32]) -> Result<Vec<f32>, EngineError> {
        let mut logits = vec![];
        for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
            let mut meta = BatchMeta::new(BLOCK_SIZE as u32);
            meta.push_row(chunk, (i * PREFILL_CHUNK) as u32, table, 1);
            logits =
                self.backend.to_host(&self.backend.forward_step(&self.model, kv, &meta, self.model.num_layers())?)?;
        }
        Ok(logits)
    }
}

/// The one sequence the engine runs at a time, as proposers know it.
const SEQ: SeqId = 0;

/// Speculation settings for `Engine::generate_speculative`.
pub struct SpecOptions<'a> {
    pub proposer: &'a mut dyn Proposer,
    pub max_draft: usize,
    /// Benchmarks only: accept each draft token with this probability whatever its value.
    /// The output is then not the model's; it is labelled `synthetic` in the statistics.
    pub synthetic_acceptance: Option<f64>,
}

/// The completion being built: applies end-of-sequence, stop strings and max tokens to
/// each new token and streams the text.
struct Output<'a> {
    tokenizer: Option<&'a Tokenizer>,
    ids: Vec<u32>,
    text: String,
    detok: Detokenizer,
    stops: StopMatcher,
    max_tokens: usize,
    ignore_eos: bool,
}

impl<'a> Output<'a> {
    fn new(req: &GenerateRequest, tokenizer: Option<&'a Tokenizer>) -> Self {
        Output {
            tokenizer,
            ids: vec![],
            text: String::new(),
            detok: Detokenizer::new(),
            stops: StopMatcher::new(req.stop.clone()),
            max_tokens: req.max_tokens,
            ignore_eos: req.ignore_eos,
        }
    }

    /// Appends tokens one by one (to `history` too); returns why generation ends, if it does.
    fn push(
        &mut self,
        tokens: &[u32],
        history: &mut Vec<u32>,
        on_delta: &mut impl FnMut(&[u32], &str),
    ) -> Option<FinishReason> {
        for &t in tokens {
            history.push(t);
            if !self.ignore_eos && self.tokenizer.is_some_and(|tok| tok.is_eos(t)) {
                return Some(FinishReason::Stop);
            }
            self.ids.push(t);
            let delta = match self.tokenizer {
                Some(tok) => self.detok.push(&[t], |ids| tok.decode(ids)),
                None => String::new(),
            };
            let (emit, stop) = match self.stops.push(&delta) {
                StopCheck::Stop(text) => (text, true),
                StopCheck::Continue(text) => (text, false),
            };
            self.text.push_str(&emit);
            on_delta(&[t], &emit);
            if stop {
                return Some(FinishReason::Stop);
            }
            if self.ids.len() >= self.max_tokens {
                return Some(FinishReason::Length);
            }
        }
        None
    }

    /// Releases text held back for a possible stop string, unless a stop ended the output.
    fn finish(&mut self, finish: FinishReason, on_delta: &mut impl FnMut(&[u32], &str)) -> String {
        if finish != FinishReason::Stop {
            let rest = self.stops.flush();
            self.text.push_str(&rest);
            on_delta(&[], &rest);
        }
        std::mem::take(&mut self.text)
    }
}
