//! Speculative decoding inside the actor runtime (Drafter → Verifier): greedy output equals
//! plain greedy output token for token with every proposer, at batch sizes 1 and 8, with
//! rows ending mid-draft and stop strings inside drafts; both KV pools end fully free after
//! accepted and rejected drafts, preemption and cancellations; prefix reuse is unchanged;
//! and the timeline shows drafting overlapping verification.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::random_llama::tiny;
use common::runtime::{assert_all_blocks_free, shared, Shared};
use futures::executor::block_on;
use futures::StreamExt;
use specula::actors::{collect, Event, Executor, ModelInfo, NoopExecutor, Runtime, RuntimeBuilder, RuntimeHandle};
use specula::actors::{Timeline, Work};
use specula::backend::cpu::CpuBackend;
use specula::backend::{BackendError, BatchMeta};
use specula::core::sampling::SamplingParams;
use specula::engine::{Completion, Engine};
use specula::model::chat::ChatMessage;
use specula::model::{Llama, Tokenizer};
use specula::request::{FinishReason, GenerateRequest, Prompt};
use specula::spec::{Draft, DraftLengths, ModelProposer, NgramProposer, Proposer, SeqId, Speculation};

#[derive(Clone, Copy, Debug)]
enum Method {
    Ngram,
    EarlyExit,
}

fn speculation(model: &Arc<Llama<CpuBackend>>, method: Method, max_draft: usize, draft_blocks: usize) -> Speculation {
    let proposer: Box<dyn Proposer> = match method {
        Method::Ngram => Box::new(NgramProposer::default()),
        Method::EarlyExit => {
            Box::new(ModelProposer::new(CpuBackend::new(), model.clone(), 6, draft_blocks, 16).unwrap())
        }
    };
    // Fixed lengths: these tests check the output with drafts in it, and on a CPU at batch 8
    // the delivery guard would hold drafting off after a step or two.
    Speculation { proposer, max_draft, synthetic_acceptance: None, lengths: DraftLengths::Fixed, tree: None }
}

fn runtime(s: &Shared, spec: Speculation, configure: fn(RuntimeBuilder) -> RuntimeBuilder) -> RuntimeHandle {
    configure(Runtime::builder().speculation(spec))
        .build(CpuBackend::new(), s.model.clone(), Some(s.tokenizer.clone()))
        .unwrap()
}

fn alone(s: &Shared, req: &GenerateRequest) -> Completion {
    s.engine.generate(req, |_, _| {}).expect("engine generates")
}

fn text_req(prompt: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { max_tokens, ..GenerateRequest::new(Prompt::Text(prompt.into())) }
}

const PROMPTS: [&str; 8] = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "The capital of France is",
    "List three colors:",
    "Rewrite this sentence in capitals: the cat sat on the mat. Answer:",
    "1, 2, 3, 4, 5, 6, 7,",
    "Once upon a time",
    "Hi",
];

/// Runs `reqs` all at once and checks each against its plain solo run.
fn check_batch(s: &Shared, h: &RuntimeHandle, reqs: &[GenerateRequest], what: &str) -> (u64, u64) {
    let outs = block_on(futures::future::join_all(reqs.iter().map(|r| collect(h.generate(r.clone())))));
    let (mut drafted, mut accepted) = (0, 0);
    for (i, (req, out)) in reqs.iter().zip(outs).enumerate() {
        let out = out.unwrap_or_else(|e| panic!("{what}, request {i}: {e}"));
        let want = alone(s, req);
        assert_eq!(out.token_ids, want.token_ids, "{what}, request {i}: ids differ from plain decoding");
        assert_eq!(out.text, want.text, "{what}, request {i}: text");
        assert_eq!(out.finish_reason, want.finish_reason, "{what}, request {i}: finish");
        let stats = out.speculative.unwrap_or_else(|| panic!("{what}, request {i}: no speculative stats"));
        assert!(!stats.synthetic);
        drafted += stats.drafted;
        accepted += stats.accepted;
    }
    (drafted, accepted)
}

#[test]
fn greedy_speculation_in_the_runtime_equals_plain_greedy() {
    let Some(s) = shared() else { return };
    let reqs: Vec<GenerateRequest> = PROMPTS.iter().map(|p| text_req(p, 20)).collect();
    for (method, k) in [(Method::Ngram, 8), (Method::EarlyExit, 3)] {
        let h = runtime(s, speculation(&s.model, method, k, 256), |b| b.max_batch(8));
        let what = format!("{method:?} k={k}");
        let (drafted, accepted) = check_batch(s, &h, &reqs, &format!("{what}, batch 8"));
        assert!(drafted > 0 && accepted > 0, "{what}: nothing drafted ({drafted}) or accepted ({accepted})");
        for req in &reqs[..2] {
            check_batch(s, &h, std::slice::from_ref(req), &format!("{what}, batch 1"));
        }
        assert_all_blocks_free(&h);
    }
}

#[test]
fn stop_strings_and_output_limits_inside_drafts_end_the_output_where_plain_decoding_does() {
    let Some(s) = shared() else { return };
    let plain = alone(s, &text_req(PROMPTS[0], 24));
    let words: Vec<&str> = plain.text.split_whitespace().collect();
    assert!(words.len() > 6, "the reference output is long enough: {:?}", plain.text);
    let mut reqs = vec![];
    for w in [words[2], words[5]] {
        reqs.push(GenerateRequest { stop: vec![w.to_string()], ..text_req(PROMPTS[0], 24) });
    }
    // Output limits that fall inside a full-length draft.
    for max_tokens in [1, 2, 5, 11] {
        reqs.push(GenerateRequest { ignore_eos: true, ..text_req(PROMPTS[0], max_tokens) });
    }
    // The end-of-sequence token among accepted drafts: the answer repeats the prompt.
    let text = "The committee met on Tuesday to review the budget. After a long discussion, the \
                committee approved the budget with minor changes, and the chair thanked everyone.";
    let repeat = format!("Repeat this paragraph word for word: {text}");
    let chat = |max_tokens| GenerateRequest {
        max_tokens,
        ..GenerateRequest::new(Prompt::Chat(vec![ChatMessage::user(repeat.clone())]))
    };
    let plain = alone(s, &chat(96));
    assert!(plain.finish_reason == FinishReason::Stop && plain.token_ids.len() < 90, "{plain:?}");
    reqs.extend([chat(96), chat(plain.token_ids.len()), chat(plain.token_ids.len() + 1)]);
    let h = runtime(s, speculation(&s.model, Method::Ngram, 8, 0), |b| b.max_batch(8));
    let (_, accepted) = check_batch(s, &h, &reqs, "ngram");
    assert!(accepted > 0, "the repeating prompt should have drafts accepted");
    assert_all_blocks_free(&h);
}

#[test]
fn both_pools_end_free_after_rejections_preemption_and_cancellations() {
    let Some(s) = shared() else { return };
    // 12 target blocks cannot hold 8 running requests of 2–4 blocks: preemption; the draft
    // pool is as small, so drafting sometimes fails for lack of room and rows go on without.
    let h = runtime(s, speculation(&s.model, Method::EarlyExit, 4, 12), |b| b.kv_blocks(12).max_batch(8));
    let reqs: Vec<GenerateRequest> =
        (0..10).map(|i| GenerateRequest { ignore_eos: true, ..text_req(PROMPTS[i % PROMPTS.len()], 24 + i) }).collect();
    let cancel_after = |i: usize| [(1usize, 0usize), (4, 3), (7, 6)].iter().find(|c| c.0 == i).map(|c| c.1);
    let outcomes = block_on(futures::future::join_all(reqs.iter().enumerate().map(|(i, r)| {
        let mut events = h.generate(r.clone());
        async move {
            let Some(n) = cancel_after(i) else { return Some(collect(events).await.unwrap()) };
            let mut seen = 0;
            while seen < n {
                match events.next().await {
                    Some(Event::Token { ids, .. }) => seen += ids.len(),
                    other => panic!("request {i}: unexpected {other:?}"),
                }
            }
            None
        }
    })));
    for (i, out) in outcomes.into_iter().enumerate() {
        if let Some(out) = out {
            assert_eq!(out.token_ids, alone(s, &reqs[i]).token_ids, "request {i}");
        }
    }
    let st = block_on(h.stats()).unwrap();
    assert!(st.preemptions > 0, "the small pool should preempt");
    assert!(st.kv.draft.is_some(), "the early-exit proposer reports its pool");
    assert_all_blocks_free(&h);
}

#[test]
fn prefix_reuse_with_speculation_leaves_the_output_unchanged() {
    let Some(s) = shared() else { return };
    let prefix = "Here is a list of fruits: apple, banana, cherry, date, elderberry, fig, grape. ".repeat(8);
    let reqs = [format!("{prefix}The third fruit is"), format!("{prefix}The last fruit is")];
    let h = runtime(s, speculation(&s.model, Method::EarlyExit, 4, 256), |b| b);
    for (i, p) in reqs.iter().enumerate() {
        let req = text_req(p, 12);
        let out = block_on(collect(h.generate(req.clone()))).unwrap();
        assert_eq!(out.token_ids, alone(s, &req).token_ids, "request {i}");
    }
    let st = block_on(h.stats()).unwrap();
    assert!(st.kv.target.prefix.hits >= 160, "the shared prefix was not reused: {:?}", st.kv.target.prefix);
    assert_all_blocks_free(&h);
}

#[test]
fn greedy_speculation_on_tiny_random_models_equals_plain_greedy() {
    let target = Arc::new(tiny(64, 1, 0.5));
    let draft = Arc::new(tiny(64, 2, 0.5));
    let engine = Engine::new(CpuBackend::new(), tiny(64, 1, 0.5), None);
    let prompts: Vec<Vec<u32>> = (0..6u32).map(|i| (0..3 + 2 * i).map(|j| (i * 7 + j * 5) % 64).collect()).collect();
    let reqs: Vec<GenerateRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerateRequest {
            max_tokens: 9 + 4 * i,
            ignore_eos: true,
            ..GenerateRequest::new(Prompt::Tokens(p.clone()))
        })
        .collect();
    let want = common::runtime::plain_greedy(&engine, &reqs);
    type Make = fn(&Arc<Llama<CpuBackend>>, &Arc<Llama<CpuBackend>>) -> Box<dyn Proposer>;
    let proposers: [(&str, Make); 3] = [
        ("ngram", |_, _| Box::new(NgramProposer::default())),
        ("early-exit", |t, _| Box::new(ModelProposer::new(CpuBackend::new(), t.clone(), 1, 64, 16).unwrap())),
        ("draft model", |_, d| Box::new(ModelProposer::new(CpuBackend::new(), d.clone(), 2, 64, 16).unwrap())),
    ];
    for (name, make) in proposers {
        for k in [1, 3, 8] {
            let spec = Speculation {
                proposer: make(&target, &draft),
                max_draft: k,
                synthetic_acceptance: None,
                lengths: Default::default(),
                tree: None,
            };
            let h = Runtime::builder()
                .speculation(spec)
                .max_batch(6)
                .build(CpuBackend::new(), target.clone(), None::<Tokenizer>)
                .unwrap();
            let outs = block_on(futures::future::join_all(reqs.iter().map(|r| collect(h.generate(r.clone())))));
            for (i, out) in outs.into_iter().enumerate() {
                assert_eq!(out.unwrap().token_ids, want[i], "{name} k={k}, request {i}");
            }
            let alone = block_on(collect(h.generate(reqs[3].clone()))).unwrap();
            assert_eq!(alone.token_ids, want[3], "{name} k={k}, batch 1");
            assert_all_blocks_free(&h);
        }
    }
}

// The timeline, on the no-op executor: the target's next token is always `last + 1`.

const VOCAB: usize = 1000;

/// The no-op forward, taking a while.
struct SlowNoop;

impl Executor for SlowNoop {
    fn vocab_size(&self) -> usize {
        VOCAB
    }
    fn forward(&mut self, meta: &BatchMeta) -> Result<Vec<f32>, String> {
        std::thread::sleep(Duration::from_millis(4));
        NoopExecutor { vocab: VOCAB }.forward(meta)
    }
}

/// Proposes `last + 1, last + 2, ...` (what the no-op target says), except that every
/// `wrong_every`-th proposal is off by one; each call takes a while.
struct Counting {
    wrong_every: usize,
}

impl Proposer for Counting {
    fn propose(&mut self, _: SeqId, history: &[u32], k: usize, _: &SamplingParams) -> Result<Draft, BackendError> {
        std::thread::sleep(Duration::from_millis(2));
        let last = *history.last().unwrap();
        // Wrong at every `wrong_every`-th sequence position, however the drafting is split
        // into calls.
        let token = |i: usize| {
            let right = (last as usize + i) % VOCAB;
            let wrong = (history.len() + i - 1).is_multiple_of(self.wrong_every);
            (if wrong { right + 1 } else { right } % VOCAB) as u32
        };
        Ok(Draft { tokens: (1..=k).map(token).collect(), probs: None })
    }
}

#[test]
fn drafting_overlaps_verification_and_rejections_change_nothing() {
    let info = ModelInfo { vocab: VOCAB, context: 4096, eos: vec![] };
    for wrong_every in [1_000_000, 3] {
        let timeline = Arc::new(Timeline::default());
        let spec = Speculation {
            proposer: Box::new(Counting { wrong_every }),
            max_draft: 4,
            synthetic_acceptance: None,
            lengths: Default::default(),
            tree: None,
        };
        let h = Runtime::builder()
            .speculation(spec)
            .timeline(timeline.clone())
            .kv_blocks(64)
            .build_with(SlowNoop, info.clone(), None)
            .unwrap();
        let req = GenerateRequest {
            max_tokens: 40,
            ignore_eos: true,
            ..GenerateRequest::new(Prompt::Tokens(vec![10, 11, 12]))
        };
        let out = block_on(collect(h.generate(req))).unwrap();
        assert_eq!(out.token_ids, (13..53).collect::<Vec<u32>>(), "wrong_every {wrong_every}");
        let stats = out.speculative.unwrap();
        let o = timeline.summary();
        assert!(stats.accepted > 0 && o.verify_ms > 0.0, "{stats:?} {o:?}");
        if wrong_every > 1000 {
            assert_eq!(stats.accepted, stats.drafted, "a perfect proposer is always accepted");
            // Steps after the first find their draft ready, made during the previous
            // verification.
            assert!(o.overlapped_ms > 0.0, "no overlap: {o:?}");
            let spans = timeline.spans();
            let pre = spans.iter().filter(|s| s.work == Work::PreDraft).count();
            assert!(pre >= stats.steps as usize - 1, "{pre} pre-drafts for {} steps", stats.steps);
        } else {
            assert!(stats.accepted < stats.drafted, "some drafts were wrong");
        }
        h.shutdown_blocking(Duration::from_secs(1));
    }
}
