//! Speculative decoding is lossless: greedy output equals the target's plain greedy output
//! token for token with every proposer, and sampled output follows the target's distribution.

mod common;

use std::sync::Arc;

use common::random_llama::tiny;
use common::sampling::{assert_follows, nth_token_distribution, second_token_distribution};
use specula::backend::cpu::CpuBackend;
use specula::core::sampling::SamplingParams;
use specula::engine::{Engine, SpecOptions};
use specula::model::{load_model, Llama, ModelSource};
use specula::request::{GenerateRequest, Prompt};
use specula::spec::{ModelProposer, NgramProposer, ProposeRequest, Proposer};

fn request(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> GenerateRequest {
    GenerateRequest { max_tokens, ignore_eos: true, sampling, ..GenerateRequest::new(Prompt::Tokens(prompt)) }
}

fn spec_ids(engine: &Engine<CpuBackend>, req: &GenerateRequest, proposer: &mut dyn Proposer, k: usize) -> Vec<u32> {
    let spec = SpecOptions { proposer, max_draft: k, synthetic_acceptance: None, tree: None };
    let out = engine.generate_speculative(req, Some(spec), |_, _| {}).unwrap();
    assert!(out.speculative.is_some(), "speculative stats");
    out.token_ids
}

#[test]
fn greedy_speculation_on_tiny_models_equals_plain_greedy() {
    let engine = Engine::new(CpuBackend::new(), tiny(300, 1, 0.5), None);
    // A draft model with other weights: most drafts are rejected.
    let draft = Arc::new(tiny(300, 2, 0.5));
    let prompts: [Vec<u32>; 3] =
        [vec![5, 6, 7], vec![1, 2, 3, 1, 2, 3, 1, 2], (0..40).map(|i| (i * 7) % 300).collect()];
    for prompt in prompts {
        for max_tokens in [1, 5, 23] {
            let req = request(prompt.clone(), max_tokens, SamplingParams::greedy());
            let plain = engine.generate(&req, |_, _| {}).unwrap().token_ids;
            let mut proposers: Vec<(&str, Box<dyn Proposer>)> = vec![
                ("ngram", Box::new(NgramProposer::default())),
                ("draft", Box::new(ModelProposer::new(CpuBackend::new(), draft.clone(), 2, 64, 4).unwrap())),
                (
                    "early-exit",
                    Box::new(ModelProposer::new(CpuBackend::new(), engine.model.clone(), 1, 64, 4).unwrap()),
                ),
                ("self", Box::new(ModelProposer::new(CpuBackend::new(), engine.model.clone(), 2, 64, 4).unwrap())),
            ];
            for (name, proposer) in proposers.iter_mut() {
                for k in [1, 3, 8] {
                    assert_eq!(
                        spec_ids(&engine, &req, proposer.as_mut(), k),
                        plain,
                        "{name}, k = {k}, max_tokens {max_tokens}"
                    );
                }
            }
        }
    }
}

/// While a row's drafting is held off the draft model is not fed: the Drafter asks it for
/// nothing, and its cache stays where the row last drafted. When drafting resumes, the
/// tokens verified meanwhile go in as one multi-token row (a prefill chunk), and the drafts
/// equal those of a draft model fed every step (the CPU is batch-invariant).
#[test]
fn a_draft_model_caught_up_in_one_forward_drafts_as_one_fed_every_step() {
    let draft = Arc::new(tiny(300, 2, 0.5));
    let greedy = SamplingParams::greedy();
    let history: Vec<u32> = (0..60).map(|i| (i * 37 + 11) % 300).collect();
    let propose = |p: &mut ModelProposer<CpuBackend>, seq, n: usize| {
        let req = ProposeRequest { seq, history: &history[..n], k: 3, sampling: &greedy };
        let d = p.propose_many(&[req]).pop().unwrap().unwrap();
        // The drafts were not what the target went on with: forget them.
        p.rollback(seq, n);
        (d.tokens, p.kv_stats().unwrap().used)
    };
    let mut every_step = ModelProposer::new(CpuBackend::new(), draft.clone(), 2, 64, 4).unwrap();
    let mut held_off = ModelProposer::new(CpuBackend::new(), draft, 2, 64, 4).unwrap();
    let (_, used_before) = propose(&mut held_off, 1, 10);
    let mut fed = vec![];
    for n in 10..=60 {
        fed.push(propose(&mut every_step, 1, n).0);
    }
    // 50 tokens verified while held off, caught up at once. The cache holds the history
    // and the drafts fed back (all but the last): 4-token blocks for n + 2 tokens.
    let (caught_up, used_after) = propose(&mut held_off, 1, 60);
    assert_eq!(&caught_up, fed.last().unwrap());
    assert_eq!((used_before, used_after), (12usize.div_ceil(4), 62usize.div_ceil(4)));
}

#[test]
fn greedy_speculation_on_the_default_model_equals_plain_greedy() {
    let backend = CpuBackend::new();
    let loaded = load_model(&ModelSource::Path(specula::cli::default_model_path().unwrap()), &backend).unwrap();
    let engine = Engine::new(backend, loaded.model, loaded.tokenizer);
    let texts = [
        "Rewrite this sentence: the quick brown fox jumps over the lazy dog. The quick brown fox",
        "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    ];
    for text in texts {
        let req = GenerateRequest { max_tokens: 24, ..GenerateRequest::new(Prompt::Text(text.into())) };
        let plain = engine.generate(&req, |_, _| {}).unwrap();
        let mut ngram = NgramProposer::default();
        let mut early = ModelProposer::new(CpuBackend::new(), engine.model.clone(), 6, 64, 16).unwrap();
        for (name, proposer) in [("ngram", &mut ngram as &mut dyn Proposer), ("early-exit", &mut early)] {
            let spec = SpecOptions { proposer, max_draft: 6, synthetic_acceptance: None, tree: None };
            let out = engine.generate_speculative(&req, Some(spec), |_, _| {}).unwrap();
            assert_eq!(out.token_ids, plain.token_ids, "{name}");
            assert_eq!(out.text, plain.text, "{name}");
        }
        // A stop string that falls inside a draft ends the output at the same place.
        let words: Vec<&str> = plain.text.split_whitespace().collect();
        if words.len() > 4 {
            let stopped = GenerateRequest { stop: vec![words[3].to_string()], ..req.clone() };
            let plain_stop = engine.generate(&stopped, |_, _| {}).unwrap();
            let spec = SpecOptions { proposer: &mut ngram, max_draft: 8, synthetic_acceptance: None, tree: None };
            let spec_stop = engine.generate_speculative(&stopped, Some(spec), |_, _| {}).unwrap();
            assert_eq!((spec_stop.text, spec_stop.token_ids), (plain_stop.text, plain_stop.token_ids));
        }
    }
}

#[test]
fn sampled_speculation_follows_the_target_distribution() {
    let vocab = 48;
    let engine = Engine::new(CpuBackend::new(), tiny(vocab, 11, 0.7), None);
    // The same weights at a smaller scale: a flatter but related distribution, so that
    // drafts are accepted often and rejected often.
    let draft = Arc::new(tiny(vocab, 11, 0.5));
    let prompt = vec![3u32, 9, 27];
    let samples = 20_000;
    for (temperature, top_p) in [(1.0, 1.0), (1.0, 0.9)] {
        let params = SamplingParams { temperature, top_p, seed: Some(99), ..Default::default() };
        let expected = second_token_distribution(&engine.model, &prompt, &params);
        let mut proposer = ModelProposer::new(CpuBackend::new(), draft.clone(), 2, 64, 4).unwrap();
        let mut counts = vec![0usize; vocab];
        let (mut drafted, mut accepted) = (0, 0);
        for i in 0..samples {
            let sampling = SamplingParams { seed: Some(i as u64), ..params.clone() };
            let req = request(prompt.clone(), 2, sampling);
            let spec = SpecOptions { proposer: &mut proposer, max_draft: 3, synthetic_acceptance: None, tree: None };
            let out = engine.generate_speculative(&req, Some(spec), |_, _| {}).unwrap();
            counts[out.token_ids[1] as usize] += 1;
            let stats = out.speculative.unwrap();
            (drafted, accepted) = (drafted + stats.drafted, accepted + stats.accepted);
        }
        assert_follows(&format!("T={temperature} top_p={top_p}"), &counts, &expected, (drafted, accepted));
    }
}

/// Runs 20,000 seeded requests of `max_tokens` tokens through a runtime where `draft`
/// drafts up to `max_draft` tokens for `target`, 16 requests per step (below the batch
/// size where speculation turns off); counts the token at `position` and sums the drafts.
fn runtime_samples(
    target: Llama<CpuBackend>,
    draft: Llama<CpuBackend>,
    prompt: &[u32],
    params: &SamplingParams,
    (max_draft, max_tokens, position): (usize, usize, usize),
) -> (Vec<usize>, (u64, u64)) {
    use specula::actors::{collect, Runtime};
    use specula::spec::{DraftLengths, Speculation};
    let vocab = target.config.vocab_size;
    let proposer = Box::new(ModelProposer::new(CpuBackend::new(), Arc::new(draft), 2, 1024, 4).unwrap());
    let h = Runtime::builder()
        // Fixed lengths: this checks distributions, and on a CPU drafting may not pay.
        .speculation(Speculation {
            proposer,
            max_draft,
            synthetic_acceptance: None,
            lengths: DraftLengths::Fixed,
            tree: None,
        })
        .max_batch(16)
        .build(CpuBackend::new(), target, None::<specula::model::Tokenizer>)
        .unwrap();
    let (mut counts, mut drafted, mut accepted) = (vec![0usize; vocab], 0, 0);
    for chunk in (0..20_000u64).collect::<Vec<_>>().chunks(512) {
        let outs = futures::executor::block_on(futures::future::join_all(chunk.iter().map(|&i| {
            let sampling = SamplingParams { seed: Some(i), ..params.clone() };
            collect(h.generate(request(prompt.to_vec(), max_tokens, sampling)))
        })));
        for out in outs {
            let out = out.unwrap();
            counts[out.token_ids[position] as usize] += 1;
            let stats = out.speculative.unwrap();
            (drafted, accepted) = (drafted + stats.drafted, accepted + stats.accepted);
        }
    }
    (counts, (drafted, accepted))
}

/// The same through the runtime: the Drafter's draft probabilities travel with the plan,
/// many requests share each verification step, and the second token (the first one drafted
/// and verified; three tokens leave the second step room for one draft) still follows the
/// target's distribution.
#[test]
fn sampled_speculation_in_the_runtime_follows_the_target_distribution() {
    let (target, draft) = (tiny(48, 11, 0.7), tiny(48, 11, 0.5));
    let prompt = [3u32, 9, 27];
    let params = SamplingParams { temperature: 1.0, top_p: 0.9, ..Default::default() };
    let expected = second_token_distribution(&target, &prompt, &params);
    let (counts, drafts) = runtime_samples(target, draft, &prompt, &params, (3, 3, 1));
    assert_follows("runtime", &counts, &expected, drafts);
}

/// The fourth token of five through the runtime: it is drafted from the tokens the Drafter
/// proposed ahead while the previous step was verified (when that step accepted its draft
/// and the target's token matched the guess), with their recorded probabilities.
#[test]
fn sampled_tokens_drafted_ahead_follow_the_target_distribution() {
    let (target, draft) = (tiny(16, 5, 0.9), tiny(16, 5, 0.7));
    let prompt = [1u32, 4, 9];
    let params = SamplingParams { temperature: 1.0, ..Default::default() };
    let expected = nth_token_distribution(&target, &prompt, &params, 4);
    let (counts, drafts) = runtime_samples(target, draft, &prompt, &params, (1, 5, 3));
    assert_follows("drafted ahead", &counts, &expected, drafts);
}
