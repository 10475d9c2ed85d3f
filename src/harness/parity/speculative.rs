//! Greedy speculative decoding on the GPU against plain greedy decoding on the GPU,
//! both through the engine's own loop: the verification forward over k + 1 tokens gives
//! the bits of k + 1 decode steps, so the tokens must be equal, every one. With the KV
//! cache in FP8 too: a rejected draft only moves positions back, nothing to undo.

use super::SpeculativeRow;
use crate::backend::cuda::CudaBackend;
use crate::engine::{Engine, SpecOptions};
use crate::harness::{model_source, Result};
use crate::model::load_model;
use crate::prompt::BLOCK_SIZE;
use crate::request::GenerateRequest;
use crate::spec::{ModelProposer, NgramProposer, Proposer};
use crate::tensor::KvDtype;

/// Layers of the target that draft in the early-exit rows: deep enough that some drafts
/// are accepted (SmolLM2's shallow layers predict almost nothing).
const EARLY_EXIT_LAYERS: usize = 24;

pub fn compare(gpu: &CudaBackend, model: &str, tokens: usize) -> Result<Vec<SpeculativeRow>> {
    let source = model_source(model)?;
    let backend = gpu.sibling()?;
    let loaded = load_model(&source, &backend)?;
    let mut engine = Engine::new(backend, loaded.model, loaded.tokenizer);
    let exit_layers = EARLY_EXIT_LAYERS.min(engine.model.num_layers());
    let blocks = 8192 / BLOCK_SIZE;
    let mut out = vec![];
    for (name, prompt) in super::forward::prompts() {
        let req = GenerateRequest { max_tokens: tokens, ignore_eos: true, ..GenerateRequest::new(prompt) };
        let plain = engine.generate(&req, |_, _| {})?.token_ids;
        let mut ngram = NgramProposer::default();
        let mut early = ModelProposer::new(gpu.sibling()?, engine.model.clone(), exit_layers, blocks, BLOCK_SIZE)?;
        let proposers: [(String, &mut dyn Proposer, usize); 2] =
            [("ngram k<=8".into(), &mut ngram, 8), (format!("early-exit {exit_layers}L k<=4"), &mut early, 4)];
        for (label, proposer, max_draft) in proposers {
            let options = SpecOptions { proposer, max_draft, synthetic_acceptance: None, tree: None };
            let done = engine.generate_speculative(&req, Some(options), |_, _| {})?;
            let stats = done.speculative.unwrap_or_default();
            out.push(outcome(name, label, &plain, &done.token_ids, stats.drafted, stats.accepted));
        }
        engine.kv.dtype = KvDtype::Fp8;
        out.push(ngram_row(&engine, &req, name, "ngram k<=8, fp8 KV")?);
        engine.kv.dtype = KvDtype::Auto;
    }
    Ok(out)
}

/// Plain and n-gram speculative greedy decoding with the engine as configured.
fn ngram_row(
    engine: &Engine<CudaBackend>,
    req: &GenerateRequest,
    prompt: &'static str,
    label: &str,
) -> Result<SpeculativeRow> {
    let plain = engine.generate(req, |_, _| {})?.token_ids;
    let mut ngram = NgramProposer::default();
    let options = SpecOptions { proposer: &mut ngram, max_draft: 8, synthetic_acceptance: None, tree: None };
    let done = engine.generate_speculative(req, Some(options), |_, _| {})?;
    let stats = done.speculative.unwrap_or_default();
    Ok(outcome(prompt, label.into(), &plain, &done.token_ids, stats.drafted, stats.accepted))
}

/// Token-for-token comparison of a speculative output with the plain one.
fn outcome(
    prompt: &'static str,
    proposer: String,
    plain: &[u32],
    spec: &[u32],
    drafted: u64,
    accepted: u64,
) -> SpeculativeRow {
    let equal = plain.iter().zip(spec).take_while(|(a, b)| a == b).count();
    let first_diff = (equal < plain.len().max(spec.len())).then_some(equal);
    SpeculativeRow { prompt, proposer, equal, total: plain.len(), first_diff, drafted, accepted }
}
