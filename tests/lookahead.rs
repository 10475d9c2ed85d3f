//! Lookahead decoding: greedy output with `--spec lookahead` equals plain greedy output token
//! for token, for several (W, N, G), on a tiny random model and on the default model; on a
//! repetitive prompt the n-gram pool's candidates are accepted and steps yield more than
//! one token; shapes that cannot fit one verification row are refused.

mod common;

use std::sync::Arc;

use common::random_llama::tiny;
use common::runtime::{assert_runtime_equals, shared};
use specula::backend::cpu::CpuBackend;
use specula::engine::{Engine, SpecOptions};
use specula::request::{GenerateRequest, Prompt};
use specula::spec::{
    DraftLengths, LookaheadConfig, LookaheadProposer, ProposerChoice, SpecError, SpecMethod, SpecStats, Speculation,
    TreeShape,
};

fn config(window: usize, ngram: usize, guesses: usize) -> LookaheadConfig {
    LookaheadConfig { window, ngram, guesses }
}

/// The tree shape the command line gives lookahead.
fn shape(c: LookaheadConfig) -> Option<TreeShape> {
    Some(c.tree_shape())
}

/// Generates `req` with lookahead `c`; returns the ids, the statistics and the tokens
/// accepted from the pool.
fn lookahead(engine: &Engine<CpuBackend>, req: &GenerateRequest, c: LookaheadConfig) -> (Vec<u32>, SpecStats, u64) {
    let mut p = LookaheadProposer::new(c);
    let spec = SpecOptions { proposer: &mut p, max_draft: 4, synthetic_acceptance: None, tree: shape(c) };
    let out = engine.generate_speculative(req, Some(spec), |_, _| {}).unwrap();
    (out.token_ids, out.speculative.unwrap(), p.pool_accepted())
}

#[test]
fn greedy_lookahead_on_a_tiny_random_model_equals_plain_greedy() {
    let engine = Engine::new(CpuBackend::new(), tiny(64, 1, 0.5), None);
    let reqs = common::token_requests(64, 6, 3, |i| 9 + 5 * i as usize);
    for c in [config(1, 2, 0), config(3, 3, 2), config(5, 4, 5), config(7, 3, 10), config(2, 5, 1)] {
        let mut total = SpecStats::default();
        for (i, req) in reqs.iter().enumerate() {
            let want = engine.generate(req, |_, _| {}).unwrap().token_ids;
            let (got, stats, _) = lookahead(&engine, req, c);
            assert_eq!(got, want, "{c:?}, request {i}");
            total.merge(&stats);
        }
        assert!(total.steps > 0 && total.drafted > 0, "{c:?}: {total:?}");
    }
}

#[test]
fn greedy_lookahead_through_the_runtime_equals_plain_greedy() {
    let target = Arc::new(tiny(64, 1, 0.5));
    let engine = Engine::new(CpuBackend::new(), tiny(64, 1, 0.5), None);
    let reqs = common::token_requests(64, 8, 3, |i| 9 + 5 * i as usize);
    let want = common::runtime::plain_greedy(&engine, &reqs);
    for c in [config(3, 3, 2), config(5, 4, 5), config(2, 5, 1)] {
        let proposer = Box::new(LookaheadProposer::new(c));
        let (lengths, tree) = (DraftLengths::Fixed, shape(c));
        let spec = Speculation { proposer, max_draft: 4, synthetic_acceptance: None, lengths, tree };
        assert_runtime_equals(&target, None, spec, &reqs, &want, 5);
    }
}

#[test]
fn on_a_repetitive_sequence_the_pool_gives_accepted_tokens() {
    let engine = Engine::new(CpuBackend::new(), tiny(64, 3, 0.5), None);
    // A long cycle of tokens. The random model does not copy it, but n-grams it produced
    // (and the prompt's) come back often enough for the pool to be right now and then; the
    // default model's test below is the one where repetition really pays.
    let cycle: Vec<u32> = (0..40).map(|i| [5, 9, 13, 21, 2, 40][i % 6]).collect();
    let req = GenerateRequest { max_tokens: 60, ignore_eos: true, ..GenerateRequest::new(Prompt::Tokens(cycle)) };
    let want = engine.generate(&req, |_, _| {}).unwrap().token_ids;
    let (got, stats, pool) = lookahead(&engine, &req, config(5, 4, 5));
    assert_eq!(got, want);
    eprintln!("tiny model, repetitive prompt: {want:?}\n{stats:?}, {pool} tokens from the pool");
    assert!(stats.mean_accepted_length > 1.0, "{stats:?}");
    assert!(pool > 0, "the pool's n-grams were accepted: {stats:?}");
}

#[test]
fn shapes_that_do_not_fit_a_row_are_refused() {
    let target = Arc::new(tiny(64, 1, 0.5));
    for bad in [config(0, 4, 5), config(5, 1, 5), config(15, 5, 15)] {
        let choice = ProposerChoice {
            method: SpecMethod::Lookahead,
            draft_model: None,
            draft_layers: 1,
            draft_kv_blocks: 16,
            draft_dtype: Default::default(),
            lookahead: bad,
            draft_device: None,
        };
        let err = choice.build(&target, None, &|| Ok(CpuBackend::new())).err().expect("refused");
        assert!(matches!(err, SpecError::LookaheadShape(c) if c == bad), "{err}");
    }
}

fn chat(text: &str, max_tokens: usize) -> GenerateRequest {
    use specula::model::chat::ChatMessage;
    GenerateRequest { max_tokens, ..GenerateRequest::new(Prompt::Chat(vec![ChatMessage::user(text.to_string())])) }
}

#[test]
fn greedy_lookahead_on_the_default_model_equals_plain_greedy_and_repeats_pay() {
    let Some(s) = shared() else { return };
    let req = chat("Write a short poem about the sea.", 20);
    let want = s.engine.generate(&req, |_, _| {}).unwrap().token_ids;
    let (got, _, _) = lookahead(&s.engine, &req, config(4, 3, 4));
    assert_eq!(got, want, "chat prompt");
    // Counting repeats itself: the pool and the window find what comes next.
    let count =
        GenerateRequest { max_tokens: 40, ..GenerateRequest::new(Prompt::Text("Count from 1 to 30: 1, 2, 3,".into())) };
    let want = s.engine.generate(&count, |_, _| {}).unwrap().token_ids;
    let (got, stats, pool) = lookahead(&s.engine, &count, LookaheadConfig::default());
    assert_eq!(got, want, "counting");
    eprintln!("default model, counting: {stats:?}, {pool} tokens from the pool");
    assert!(stats.mean_accepted_length > 1.5 && pool > 0, "{stats:?}, pool {pool}");
}
