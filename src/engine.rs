//! The simplest way to run a model: one request at a time, prefill then decode, on any
//! backend. The runtime (actors, batching, speculation) builds on the same pieces.

mod tree;

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::backend::{Backend, BackendError, BatchMeta};
use crate::core::block_pool::BlockPool;
use crate::core::draft_sync::{resync, Ahead};
use crate::core::finish::{FinishRules, TextOutput};
use crate::core::kv_manager::KvManager;
use crate::core::lengths::{window_held, Lengths, SeqLimits, WINDOWED_CONTEXT};
use crate::core::sampling::Sampler;
use crate::core::spec::AcceptanceTracker;
use crate::core::step_cost::StepCost;
use crate::model::{hidden_to_host, ForwardStep, HiddenKind, KvCache, Llama, Tokenizer};
use crate::prompt::{tokenize_prompt, BLOCK_SIZE};
use crate::request::{FinishReason, GenerateRequest, RequestError, RequestId, Usage};
use crate::spec::{ids_suffice, verify, verify_ids, Draft, Proposer, SeqId, SpecError, SpecStats, MAX_DRAFT_LEN};
use crate::spec::{TreeShape, MAX_TREE_NODES};
use crate::tensor::KvOptions;

/// Tokens per forward while prefilling: bounds the activations' memory.
const PREFILL_CHUNK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Spec(#[from] SpecError),
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

pub struct Engine<B: Backend> {
    pub backend: B,
    /// Shared with an early-exit proposer, which drafts with the first layers.
    pub model: Arc<Llama<B>>,
    pub tokenizer: Option<Tokenizer>,
    /// How each request's KV cache is stored and read (dtype, attention window).
    pub kv: KvOptions,
}

impl<B: Backend> Engine<B> {
    /// An engine whose caches keep the backend's precision, with the model's own
    /// `sliding_window` if it has one.
    pub fn new(backend: B, model: Llama<B>, tokenizer: Option<Tokenizer>) -> Self {
        let kv = KvOptions { window: model.config.default_window(), ..KvOptions::default() };
        Engine { backend, model: Arc::new(model), tokenizer, kv }
    }

    /// The same engine with its KV caches stored and read as `kv` says (no window: the
    /// model's own, if it has one).
    pub fn with_kv(self, kv: KvOptions) -> Self {
        let window = kv.window.or_else(|| self.model.config.default_window());
        Engine { kv: KvOptions { window, ..kv }, ..self }
    }

    /// The longest sequence: the model's context, or with an attention window
    /// `WINDOWED_CONTEXT` (positions keep counting).
    pub fn context_len(&self) -> usize {
        match self.kv.window {
            Some(_) => WINDOWED_CONTEXT,
            None => self.model.config.max_position_embeddings,
        }
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
        if let Some(s) = spec.as_ref().filter(|s| s.tree.is_some()) {
            tree::check_tree(s)?;
        }
        let config = &self.model.config;
        // The engine sizes its own cache for the request: only the context limits it.
        let lengths = Lengths { context: self.context_len(), kv_tokens: usize::MAX, held: None };
        let prompt = tokenize_prompt(self.tokenizer.as_ref(), &req.prompt, config.vocab_size, &lengths)?;
        let limits = lengths.admit(prompt.len(), req.max_tokens)?;
        let mut seq = self.sequence(prompt.clone(), limits)?;
        let eos = self.tokenizer.as_ref().map(|t| t.eos_ids.clone()).unwrap_or_default();
        let mut out =
            Output::new(req, self.tokenizer.as_ref(), FinishRules { eos: &eos, ignore_eos: req.ignore_eos, limits });
        let mut sampler = Sampler::new(req.sampling.clone());
        let mut state = Speculating::default();
        state.stats.synthetic = spec.as_ref().is_some_and(|s| s.synthetic_acceptance.is_some());
        state.stats.random_heads = spec.as_ref().is_some_and(|s| s.proposer.random_weights());

        let start = Instant::now();
        let observer = spec.as_mut().map(|s| &mut *s.proposer).filter(|p| p.wants_hidden());
        let first = self.prefill_seq(&mut seq, observer, &mut sampler)?;
        let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
        let decode_start = Instant::now();
        let mut new_tokens = vec![first];
        let finish = loop {
            if let Some(finish) = out.push(&new_tokens, &mut seq.history, &mut on_delta) {
                break finish;
            }
            let tree = spec.as_ref().and_then(|s| s.tree);
            new_tokens = match (spec.as_mut(), tree) {
                (Some(s), Some(shape)) => self.tree_step(&mut seq, s, shape, &mut state, &mut sampler)?,
                (s, _) => self.decode_step(&mut seq, s, &mut state, &mut sampler, req)?,
            };
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
            speculative: spec.is_some().then_some(state.stats),
        })
    }

    /// One decoding step: the last token (not in the cache yet) and up to `k` drafts in one
    /// forward; returns the drafts the target accepts and its own next token.
    fn decode_step(
        &self,
        seq: &mut Sequence<B>,
        mut spec: Option<&mut SpecOptions>,
        state: &mut Speculating,
        sampler: &mut Sampler,
        req: &GenerateRequest,
    ) -> Result<Vec<u32>, EngineError> {
        let history = &seq.history;
        let draft = match spec.as_deref_mut() {
            Some(s) => {
                // Drafts up to the end of the sequence (the finish rules drop what lies past it).
                let room = seq.limits.max_len.saturating_sub(history.len());
                state.steps += 1;
                let k = state.acceptance.draft_len(s.max_draft, 1, &state.cost, state.steps).min(room);
                let start = Instant::now();
                let draft = s.proposer.propose(SEQ, history, k, &req.sampling)?;
                state.cost.record_draft(draft.tokens.len(), start.elapsed().as_secs_f64());
                draft
            }
            None => Draft::default(),
        };
        let mut row = vec![*history.last().expect("history holds the prompt")];
        row.extend(&draft.tokens);
        let mut meta = BatchMeta::new(BLOCK_SIZE as u32);
        let table = reserve(&mut seq.blocks, history.len() - 1, row.len())?;
        meta.push_row(&row, (history.len() - 1) as u32, &table, row.len());
        let step_start = Instant::now();
        let (out, hidden) = self.forward(&mut seq.kv, &meta, spec.as_ref().and_then(|s| wanted(&*s.proposer)))?;
        let synthetic = spec.as_ref().and_then(|s| s.synthetic_acceptance);
        let vocab = self.model.config.vocab_size;
        let new_tokens = if ids_suffice(sampler) {
            // Only the ids cross to the host (a GPU computes them where the logits are).
            let ids = self.backend.argmax_rows(&out, vocab)?;
            verify_ids(&draft, &ids, sampler, synthetic)
        } else if draft.tokens.is_empty() {
            vec![self.next_token(&out, history, sampler)?]
        } else {
            // Rejection sampling against the draft's probabilities needs the target's
            // distributions: the logits come to the host.
            let logits = self.backend.to_host(&out)?;
            verify(&draft, &logits, vocab, history, sampler, synthetic)
        };
        state.cost.record_step(row.len(), step_start.elapsed().as_secs_f64());
        if let Some(s) = spec {
            let accepted = new_tokens.len() - 1;
            if let Some(hidden) = hidden {
                // The positions verified: the last token and the accepted drafts.
                let width = hidden.len() / row.len();
                s.proposer.observe(SEQ, history.len() - 1, &hidden[..(accepted + 1) * width]);
            }
            state.stats.record(draft.tokens.len(), accepted);
            state.acceptance.record(draft.tokens.len(), accepted);
            // The proposer holds the history and its draft; the target kept `accepted` of
            // the draft and added a token of its own. Nothing is drafted ahead here.
            let now = resync(history, &draft.tokens, history.len() + accepted, &new_tokens[accepted..]);
            let keep = match now.ahead {
                Ahead::Kept { .. } => now.history.len(),
                Ahead::Dropped { rollback_to } => rollback_to,
            };
            s.proposer.rollback(SEQ, keep);
        }
        Ok(new_tokens)
    }

    /// The request's own cache: blocks for its whole length, or under an attention window
    /// for the blocks the window keeps (each step gives back what slid out of it).
    fn sequence(&self, prompt: Vec<u32>, limits: SeqLimits) -> Result<Sequence<B>, EngineError> {
        let step = PREFILL_CHUNK.max(1 + MAX_DRAFT_LEN).max(1 + MAX_TREE_NODES);
        // A tree's nodes lie past the positions it may fill: room for them at the end.
        let whole = (limits.max_len + MAX_TREE_NODES).div_ceil(BLOCK_SIZE);
        let num_blocks = self.kv.window.map_or(whole, |w| whole.min(window_held(w, BLOCK_SIZE, step) / BLOCK_SIZE));
        let kv = KvCache::with_options(&self.backend, &self.model.config, num_blocks, BLOCK_SIZE, self.kv)?;
        let blocks = KvManager::with_window(BlockPool::new(num_blocks, BLOCK_SIZE), self.kv.window);
        Ok(Sequence { kv, blocks, history: prompt, limits })
    }

    /// The token `sampler` picks from `logits` (one row) after `history`, chosen where the
    /// logits are: only the id crosses to the host.
    fn next_token(&self, logits: &B::Tensor, history: &[u32], sampler: &mut Sampler) -> Result<u32, BackendError> {
        let vocab = self.model.config.vocab_size;
        let ids = match ids_suffice(sampler) {
            true => self.backend.argmax_rows(logits, vocab)?,
            false => self.backend.sample_rows(logits, vocab, &[sampler.row(history)])?,
        };
        ids.first().copied().ok_or_else(|| BackendError::Invalid("no logits to sample".into()))
    }

    /// Runs the sequence's prompt through the model in chunks, handing its hidden states to
    /// `observer` (a proposer that reads them); returns the first token `sampler` picks.
    fn prefill_seq<'p>(
        &self,
        seq: &mut Sequence<B>,
        mut observer: Option<&mut (dyn Proposer + 'p)>,
        sampler: &mut Sampler,
    ) -> Result<u32, EngineError> {
        let mut logits = None;
        for (i, chunk) in seq.history.clone().chunks(PREFILL_CHUNK).enumerate() {
            let mut meta = BatchMeta::new(BLOCK_SIZE as u32);
            let table = reserve(&mut seq.blocks, i * PREFILL_CHUNK, chunk.len())?;
            meta.push_row(chunk, (i * PREFILL_CHUNK) as u32, &table, 1);
            let (out, hidden) = self.forward(&mut seq.kv, &meta, observer.as_deref().and_then(wanted))?;
            if let (Some(p), Some(hidden)) = (observer.as_deref_mut(), hidden) {
                p.observe(SEQ, i * PREFILL_CHUNK, &hidden);
            }
            logits = Some(out);
        }
        let logits = logits.ok_or_else(|| BackendError::Invalid("prefill of an empty prompt".into()))?;
        Ok(self.next_token(&logits, &seq.history, sampler)?)
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

    /// The target's forward over `meta` (replayable), or with `hidden` the forward that also
    /// keeps those hidden states of every token (`[tokens, parts * hidden]`, on the host).
    fn forward(
        &self,
        kv: &mut KvCache<B>,
        meta: &BatchMeta,
        hidden: Option<HiddenKind>,
    ) -> Result<(B::Tensor, Option<Vec<f32>>), BackendError> {
        let Some(kind) = hidden else {
            return Ok((self.backend.forward_step(&self.model, kv, meta, self.model.num_layers())?, None));
        };
        let (logits, h) = self.backend.forward_step_hidden(&self.model, kv, meta, kind)?;
        Ok((logits, Some(hidden_to_host(&self.backend, &h, self.model.config.hidden_size)?)))
    }
}

/// The hidden states `p` reads of the target, if any.
fn wanted(p: &(dyn Proposer + '_)) -> Option<HiddenKind> {
    p.wants_hidden().then(|| p.hidden_kind())
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
    /// Draft a tree of this shape each step instead of a chain (greedy requests, a
    /// proposer that drafts trees); `max_draft` is then unused.
    pub tree: Option<TreeShape>,
}

/// The request's sequence in the engine's own cache.
struct Sequence<B: Backend> {
    kv: KvCache<B>,
    /// The cache's blocks, all the sequence's (`SEQ_BLOCKS`).
    blocks: KvManager,
    /// The prompt and the tokens generated so far.
    history: Vec<u32>,
    limits: SeqLimits,
}

/// The engine's one sequence, as its `KvManager` knows it.
const SEQ_BLOCKS: RequestId = RequestId(0);

/// The sequence's block table for `n` tokens at positions `computed..`, after giving back
/// the blocks that slid out of the window.
fn reserve(blocks: &mut KvManager, computed: usize, n: usize) -> Result<Vec<u32>, EngineError> {
    blocks.slide(SEQ_BLOCKS, computed);
    let table = blocks.grow(SEQ_BLOCKS, computed + n);
    let no_room = || BackendError::Invalid(format!("the engine's KV cache has no room for {n} tokens at {computed}"));
    Ok(table.map_err(|_| no_room())?.to_vec())
}

/// What speculation learns over a request's steps.
#[derive(Default)]
struct Speculating {
    stats: SpecStats,
    acceptance: AcceptanceTracker,
    cost: StepCost,
    /// Decoding steps so far (this one included).
    steps: u64,
}

/// The completion being built: the finish rules (`core::finish`) applied to each step's
/// tokens, and the text streamed.
struct Output<'a> {
    tokenizer: Option<&'a Tokenizer>,
    rules: FinishRules<'a>,
    ids: Vec<u32>,
    text: TextOutput,
    emitted: String,
}

impl<'a> Output<'a> {
    fn new(req: &GenerateRequest, tokenizer: Option<&'a Tokenizer>, rules: FinishRules<'a>) -> Self {
        Output { tokenizer, rules, ids: vec![], text: TextOutput::new(req.stop.clone()), emitted: String::new() }
    }

    /// Appends a step's tokens (to `history` too); returns why generation ends, if it does.
    fn push(
        &mut self,
        tokens: &[u32],
        history: &mut Vec<u32>,
        on_delta: &mut impl FnMut(&[u32], &str),
    ) -> Option<FinishReason> {
        let taken = self.rules.take(history.len(), tokens);
        let decode = self.tokenizer.map(|tok| move |ids: &[u32]| tok.decode(ids));
        for &t in &tokens[..taken.kept] {
            history.push(t);
            self.ids.push(t);
            let delta = self.text.push(t, decode);
            self.emitted.push_str(&delta.text);
            on_delta(&[t], &delta.text);
            if delta.stopped {
                return Some(FinishReason::Stop);
            }
        }
        taken.finish
    }

    /// Releases text held back for a possible stop string, unless the output stopped.
    fn finish(&mut self, finish: FinishReason, on_delta: &mut impl FnMut(&[u32], &str)) -> String {
        if finish != FinishReason::Stop {
            let rest = self.text.finish(finish);
            self.emitted.push_str(&rest);
            on_delta(&[], &rest);
        }
        std::mem::take(&mut self.emitted)
    }
}
