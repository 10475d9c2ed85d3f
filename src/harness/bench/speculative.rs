//! End-to-end speculation in the engine's own loop (`Engine::generate_speculative`): the
//! first model as target, the second drafting on a stream of its own, against plain
//! decoding.

use std::sync::Arc;

use super::{BenchOptions, SpecReport, SpecRow};
use crate::backend::cuda::CudaBackend;
use crate::backend::Backend;
use crate::core::sampling::SamplingParams;
use crate::engine::{Completion, Engine, SpecOptions};
use crate::harness::{model_source, Result};
use crate::model::{load_model_with, LoadOptions};
use crate::prompt::BLOCK_SIZE;
use crate::request::{GenerateRequest, Prompt};
use crate::spec::ModelProposer;

/// The target's engine and the draft's proposer, each on a stream of its own.
struct Pair {
    engine: Engine<CudaBackend>,
    proposer: ModelProposer<CudaBackend>,
    request: GenerateRequest,
}

impl Pair {
    fn load(gpu: &CudaBackend, opts: &BenchOptions) -> Result<Self> {
        let tb = gpu.sibling()?;
        let db = match opts.draft_device {
            Some(k) => gpu.on_device(k)?,
            None => gpu.sibling()?,
        };
        let options = LoadOptions::dtype(opts.dtype);
        let target = load_model_with(&model_source(&opts.models[0])?, &options, &tb)?;
        let draft = load_model_with(&model_source(&opts.models[1])?, &options, &db)?;
        tb.synchronize()?;
        db.synchronize()?;
        let vocab = target.model.config.vocab_size as u32;
        let prompt: Vec<u32> = (0..opts.prompt_tokens as u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let engine = Engine::new(tb, target.model, None);
        // A fixed seed: the synthetic acceptance draws (hence tokens per step) are the same
        // in every run, so runs compare; with 256 tokens their spread alone moved the
        // speedup by ~8%.
        let sampling = SamplingParams { seed: Some(7), ..SamplingParams::greedy() };
        let request = GenerateRequest {
            max_tokens: opts.spec_tokens,
            ignore_eos: true,
            sampling,
            ..GenerateRequest::new(Prompt::Tokens(prompt))
        };
        let layers = draft.model.num_layers();
        let blocks = (opts.prompt_tokens + opts.spec_tokens + 2 * opts.draft_len + 32).div_ceil(BLOCK_SIZE) + 4;
        let proposer = ModelProposer::new(db, Arc::new(draft.model), layers, blocks, BLOCK_SIZE)?;
        Ok(Pair { engine, proposer, request })
    }

    fn run(&mut self, tokens: usize, max_draft: usize, synthetic: Option<f64>) -> Result<Completion> {
        let options =
            SpecOptions { proposer: &mut self.proposer, max_draft, synthetic_acceptance: synthetic, tree: None };
        let request = GenerateRequest { max_tokens: tokens, ..self.request.clone() };
        Ok(self.engine.generate_speculative(&request, Some(options), |_, _| {})?)
    }
}

/// Plain decoding, then speculation with synthetic acceptance at the longest draft (and at
/// 4 when that is longer), then speculation with the draft's own acceptance, which must
/// give plain decoding's tokens.
pub fn speculative(gpu: &CudaBackend, opts: &BenchOptions) -> Result<SpecReport> {
    let mut pair = Pair::load(gpu, opts)?;
    let request = pair.request.clone();
    pair.engine.generate(&GenerateRequest { max_tokens: 16, ..request.clone() }, |_, _| {})?; // warm-up
    let plain = pair.engine.generate(&request, |_, _| {})?;
    let synthetic = Some(opts.synthetic_acceptance);
    let mut rows = vec![];
    let mut draft_lens = vec![opts.draft_len];
    if opts.draft_len > 4 {
        draft_lens.push(4); // a shorter draft: verification costs less per step
    }
    for max_draft in draft_lens {
        pair.run(16, max_draft, synthetic)?; // warm-up (graph captures)
        let done = pair.run(opts.spec_tokens, max_draft, synthetic)?;
        let stats = done.speculative.unwrap_or_default();
        let steps = stats.steps.max(1);
        rows.push(SpecRow {
            acceptance: stats.acceptance_rate(),
            max_draft,
            steps: stats.steps,
            tok_s: done.timings.decode_tok_per_s,
            tokens_per_step: (stats.accepted + steps) as f64 / steps as f64,
        });
    }
    // The model's own acceptance: the output must be plain decoding's, token for token.
    let greedy = pair.run(opts.spec_tokens, opts.draft_len, None)?;
    let greedy_stats = greedy.speculative.unwrap_or_default();
    let equal = plain.token_ids.iter().zip(&greedy.token_ids).take_while(|(a, b)| a == b).count();
    Ok(SpecReport {
        greedy_accepted_drafted: (greedy_stats.accepted, greedy_stats.drafted),
        greedy_equal: (equal, plain.token_ids.len().max(greedy.token_ids.len())),
        plain_tok_s: plain.timings.decode_tok_per_s,
        rows,
        synthetic_acceptance: opts.synthetic_acceptance,
        tokens: opts.spec_tokens,
        target: opts.models[0].clone(),
        draft: opts.models[1].clone(),
    })
}
