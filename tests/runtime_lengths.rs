//! Every prompt length from 1 past the context, under any step budget, alone or beside
//! other requests, with or without speculation: a request either runs to exactly the
//! length the rules give (its greedy ids those of the single-request engine) or is refused
//! with `PromptTooLong` (`context_length_exceeded`). Never a panic, never an internal error.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::random_llama::{tiny_config, tiny_with};
use common::runtime::assert_all_blocks_free;
use futures::executor::block_on;
use proptest::prelude::*;
use specula::actors::{collect, Runtime};
use specula::backend::cpu::CpuBackend;
use specula::engine::Engine;
use specula::model::{Llama, ModelConfig, Tokenizer};
use specula::request::{FinishReason, GenerateRequest, Prompt, RequestError};
use specula::spec::{ModelProposer, NgramProposer, Proposer, Speculation};

const VOCAB: usize = 64;
const BLOCK: usize = 16;

#[derive(Debug, Clone, Copy)]
enum Spec {
    None,
    Ngram,
    EarlyExit,
    DraftModel,
}

#[derive(Debug, Clone)]
struct Req {
    prompt: Vec<u32>,
    max_tokens: usize,
}

#[derive(Debug, Clone)]
struct Case {
    context: usize,
    step_tokens: usize,
    max_batch: usize,
    extra_blocks: usize,
    spec: Spec,
    max_draft: usize,
    /// The request under test, then the ones running beside it.
    reqs: Vec<Req>,
}

fn model(context: usize, seed: u64) -> Llama<CpuBackend> {
    tiny_with(ModelConfig { max_position_embeddings: context, ..tiny_config(VOCAB) }, seed, 0.5)
}

/// Prompts that repeat themselves, so that n-gram drafts are sometimes accepted.
fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i % (3 + seed % 5) + seed) % VOCAB as u32).collect()
}

/// `max_tokens` across its whole range: small, past the context, and near `usize::MAX`.
fn max_tokens(context: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 1..=context + 4,
        1 => Just(usize::MAX),
        1 => (0usize..4).prop_map(|d| usize::MAX - d),
    ]
}

fn req(context: usize, longest: usize) -> impl Strategy<Value = Req> {
    (1..=longest, any::<u32>(), max_tokens(context))
        .prop_map(|(len, seed, max_tokens)| Req { prompt: prompt(len, seed % 16), max_tokens })
}

fn case() -> impl Strategy<Value = Case> {
    (8usize..=72).prop_flat_map(|context| {
        let spec = prop_oneof![Just(Spec::None), Just(Spec::Ngram), Just(Spec::EarlyExit), Just(Spec::DraftModel)];
        // The request under test spans the whole range, past the context included.
        let under_test = req(context, context + 2);
        let others = proptest::collection::vec(req(context, context - 1), 0..=3);
        (Just(context), 1usize..=40, 1usize..=4, 0usize..=6, spec, 1usize..=4, under_test, others).prop_map(
            |(context, step_tokens, max_batch, extra_blocks, spec, max_draft, first, others)| Case {
                context,
                step_tokens,
                max_batch,
                extra_blocks,
                spec,
                max_draft,
                reqs: std::iter::once(first).chain(others).collect(),
            },
        )
    })
}

fn speculation(spec: Spec, target: &Arc<Llama<CpuBackend>>, context: usize, max_draft: usize) -> Option<Speculation> {
    let proposer: Box<dyn Proposer> = match spec {
        Spec::None => return None,
        Spec::Ngram => Box::new(NgramProposer::default()),
        Spec::EarlyExit => Box::new(ModelProposer::new(CpuBackend::new(), target.clone(), 1, 64, BLOCK).unwrap()),
        Spec::DraftModel => {
            let draft = Arc::new(model(context, 2));
            Box::new(ModelProposer::new(CpuBackend::new(), draft, 2, 64, BLOCK).unwrap())
        }
    };
    Some(Speculation { proposer, max_draft, synthetic_acceptance: None, lengths: Default::default(), tree: None })
}

fn run(case: &Case) -> Result<(), TestCaseError> {
    let target = Arc::new(model(case.context, 1));
    let reference =
        Engine { backend: CpuBackend::new(), model: target.clone(), tokenizer: None, kv: Default::default() };
    // The pool holds at least one whole context: no request is too large for it.
    let blocks = case.context.div_ceil(BLOCK) + case.extra_blocks;
    let mut builder = Runtime::builder().kv_blocks(blocks).step_tokens(case.step_tokens).max_batch(case.max_batch);
    if let Some(spec) = speculation(case.spec, &target, case.context, case.max_draft) {
        builder = builder.speculation(spec);
    }
    let h = builder.build(CpuBackend::new(), target.clone(), None::<Arc<Tokenizer>>).unwrap();
    let requests: Vec<GenerateRequest> = case
        .reqs
        .iter()
        .map(|r| GenerateRequest {
            max_tokens: r.max_tokens,
            ignore_eos: true,
            ..GenerateRequest::new(Prompt::Tokens(r.prompt.clone()))
        })
        .collect();
    let results = block_on(futures::future::join_all(requests.iter().map(|r| collect(h.generate(r.clone())))));
    for (i, (req, got)) in case.reqs.iter().zip(results).enumerate() {
        let len = req.prompt.len();
        if len >= case.context {
            let refused = matches!(got, Err(RequestError::PromptTooLong { tokens, context }) if tokens == len && context == case.context);
            prop_assert!(refused, "request {}: {} tokens in a context of {}: {:?}", i, len, case.context, got);
            continue;
        }
        let got = got.map_err(|e| TestCaseError::fail(format!("request {i} ({len} tokens): {e}")))?;
        let want = req.max_tokens.min(case.context - len);
        prop_assert_eq!(got.usage.completion_tokens, want, "request {} ({} tokens)", i, len);
        prop_assert_eq!(got.finish_reason, FinishReason::Length);
        let alone = reference.generate(&requests[i], |_, _| {}).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&got.token_ids, &alone.token_ids, "request {}: differs from the engine alone", i);
    }
    assert_all_blocks_free(&h);
    h.shutdown_blocking(Duration::from_secs(1));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_request_runs_or_is_refused_as_too_long(case in case()) {
        run(&case)?;
    }
}

/// The case that took the server down: a prompt longer than the step budget, alone.
#[test]
fn a_prompt_longer_than_the_step_budget_alone() {
    let case = Case {
        context: 64,
        step_tokens: 16,
        max_batch: 8,
        extra_blocks: 0,
        spec: Spec::None,
        max_draft: 1,
        reqs: vec![Req { prompt: prompt(40, 3), max_tokens: 4 }],
    };
    run(&case).unwrap();
}
