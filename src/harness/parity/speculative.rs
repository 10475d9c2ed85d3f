//! Greedy speculative decoding on the GPU against plain greedy decoding on the GPU,
//! both through the engine's own loop: the verification forward over k + 1 tokens gives
//! the bits of k + 1 decode steps, so the tokens must be equal, every one. With the KV
//! cache in FP8 too: a rejected draft only moves positions back, nothing to undo.
//!
//! EAGLE chains too, with the default head where the model is the head's; and tree
//! speculation (lookahead, and EAGLE): every node of the tree reads exactly what a decode
//! of it would read, and the accepted path's entries move onto consecutive positions
//! (`copy_kv`), so the tokens must be equal as well.

use std::path::Path;

use super::SpeculativeRow;
use crate::backend::cuda::CudaBackend;
use crate::engine::{Engine, EngineError, SpecOptions};
use crate::harness::{model_source, Result};
use crate::model::load_model;
use crate::prompt::BLOCK_SIZE;
use crate::request::GenerateRequest;
use crate::spec::eagle::DEFAULT_HEAD;
use crate::spec::{EagleProposer, LookaheadConfig, LookaheadProposer, ModelProposer, NgramProposer, Proposer};
use crate::spec::{SpecError, TreeShape};
use crate::tensor::KvDtype;

/// Layers of the target that draft in the early-exit rows: deep enough that some drafts
/// are accepted (SmolLM2's shallow layers predict almost nothing).
const EARLY_EXIT_LAYERS: usize = 24;

/// The EAGLE tree: up to 24 drafts, 4 candidates per depth, 5 deep.
const EAGLE_TREE: TreeShape = TreeShape { nodes: 24, top_k: 4, depth: 5 };

/// One speculative configuration: its label, proposer, longest draft and tree shape.
type Run<'a> = (String, &'a mut dyn Proposer, usize, Option<TreeShape>);

pub fn compare(gpu: &CudaBackend, model: &str, tokens: usize) -> Result<Vec<SpeculativeRow>> {
    let source = model_source(model)?;
    let backend = gpu.sibling()?;
    let loaded = load_model(&source, &backend)?;
    let mut engine = Engine::new(backend, loaded.model, loaded.tokenizer);
    let exit_layers = EARLY_EXIT_LAYERS.min(engine.model.num_layers());
    let blocks = 8192 / BLOCK_SIZE;
    let (mut eagle, mut eagle_chain) = (eagle_head(gpu, &engine, blocks)?, eagle_head(gpu, &engine, blocks)?);
    let look = LookaheadConfig::default();
    let look_label = format!("lookahead {}/{}/{} tree", look.window, look.ngram, look.guesses);
    let mut out = vec![];
    for (name, prompt) in super::forward::prompts() {
        let req = GenerateRequest { max_tokens: tokens, ignore_eos: true, ..GenerateRequest::new(prompt) };
        let plain = engine.generate(&req, |_, _| {})?.token_ids;
        let mut ngram = NgramProposer::default();
        let mut early = ModelProposer::new(gpu.sibling()?, engine.model.clone(), exit_layers, blocks, BLOCK_SIZE)?;
        let mut lookahead = LookaheadProposer::new(look);
        let mut runs: Vec<Run> = vec![
            ("ngram k<=8".into(), &mut ngram, 8, None),
            (format!("early-exit {exit_layers}L k<=4"), &mut early, 4, None),
            (look_label.clone(), &mut lookahead, 4, Some(look.tree_shape())),
        ];
        if let (Some(tree), Some(chain)) = (eagle.as_mut(), eagle_chain.as_mut()) {
            runs.push(("eagle tree 24/4 depth 5".into(), tree, 5, Some(EAGLE_TREE)));
            runs.push(("eagle chain k<=5".into(), chain, 5, None));
        }
        for run in runs {
            out.push(spec_row(&engine, &req, name, &plain, run)?);
        }
        engine.kv.dtype = KvDtype::Fp8;
        let plain = engine.generate(&req, |_, _| {})?.token_ids;
        let (mut ngram, mut lookahead) = (NgramProposer::default(), LookaheadProposer::new(look));
        let runs: [Run; 2] = [
            ("ngram k<=8, fp8 KV".into(), &mut ngram, 8, None),
            ("lookahead tree, fp8 KV".into(), &mut lookahead, 4, Some(look.tree_shape())),
        ];
        for run in runs {
            out.push(spec_row(&engine, &req, name, &plain, run)?);
        }
        engine.kv.dtype = KvDtype::Auto;
    }
    Ok(out)
}

/// The default EAGLE head on the GPU, where it ships and fits the model (SmolLM2's sizes);
/// None otherwise.
fn eagle_head(
    gpu: &CudaBackend,
    engine: &Engine<CudaBackend>,
    blocks: usize,
) -> Result<Option<EagleProposer<CudaBackend>>> {
    let dir = Path::new(DEFAULT_HEAD);
    if !dir.join("config.json").is_file() {
        return Ok(None);
    }
    match EagleProposer::load(gpu.sibling()?, engine.model.clone(), dir, blocks, BLOCK_SIZE) {
        Ok(head) => Ok(Some(head)),
        Err(SpecError::HeadMismatch { .. }) => Ok(None),
        Err(e) => Err(EngineError::from(e).into()),
    }
}

/// Speculative greedy decoding with the engine as configured, against `plain`.
fn spec_row(
    engine: &Engine<CudaBackend>,
    req: &GenerateRequest,
    prompt: &'static str,
    plain: &[u32],
    (label, proposer, max_draft, tree): Run,
) -> Result<SpeculativeRow> {
    let options = SpecOptions { proposer, max_draft, synthetic_acceptance: None, tree };
    let done = engine.generate_speculative(req, Some(options), |_, _| {})?;
    let stats = done.speculative.unwrap_or_default();
    Ok(outcome(prompt, label, plain, &done.token_ids, stats.drafted, stats.accepted))
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
