//! The actor runtime on the real default model (CPU): batched output equals each request
//! run alone, in-flight batching, queueing and preemption with a small KV pool,
//! cancellation, typed refusals and shutdown.

mod common;

use std::time::Duration;

use common::runtime::{assert_all_blocks_free, shared, Shared};
use futures::executor::block_on;
use futures::StreamExt;
use specula::actors::{collect, Event, Runtime, RuntimeBuilder, RuntimeHandle};
use specula::backend::cpu::CpuBackend;
use specula::core::sampling::SamplingParams;
use specula::request::{FinishReason, GenerateRequest, Prompt, RequestError};

type Configure = fn(RuntimeBuilder) -> RuntimeBuilder;

fn runtime(s: &Shared, configure: Configure) -> RuntimeHandle {
    configure(Runtime::builder()).build(CpuBackend::new(), s.model.clone(), Some(s.tokenizer.clone())).unwrap()
}

/// Greedy ids of `req` run alone in the single-request engine (an independent code path).
fn alone(s: &Shared, req: &GenerateRequest) -> Vec<u32> {
    s.engine.generate(req, |_, _| {}).expect("engine generates").token_ids
}

fn text_req(prompt: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { max_tokens, ..GenerateRequest::new(Prompt::Text(prompt.into())) }
}

const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "List three colors:",
    "Water boils at",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "Hi",
];

/// Request `i` of a varied set: different prompts, lengths and output lengths.
fn varied(i: usize) -> GenerateRequest {
    let prompt = format!("{} {}", PROMPTS[i % PROMPTS.len()], "and then ".repeat(i / PROMPTS.len()));
    text_req(prompt.trim_end(), 8 + i % 9)
}

#[test]
fn thirty_two_concurrent_requests_match_their_solo_greedy_ids() {
    let Some(s) = shared() else { return };
    let h = runtime(s, |b| b.max_batch(32));
    let reqs: Vec<GenerateRequest> = (0..32).map(varied).collect();
    let streams: Vec<_> = reqs.iter().map(|r| h.generate(r.clone())).collect();
    let got: Vec<_> = block_on(futures::future::join_all(streams.into_iter().map(collect)));
    for (i, (req, got)) in reqs.iter().zip(got).enumerate() {
        let got = got.unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(got.token_ids, alone(s, req), "request {i} differs from its solo run");
        let want_text = s.tokenizer.decode(&got.token_ids);
        assert!(want_text.starts_with(&got.text) || got.finish_reason == FinishReason::Stop, "request {i} text");
    }
    let st = block_on(h.stats()).unwrap();
    assert!(st.steps < 32 * 16, "requests were not batched: {} steps", st.steps);
    assert_all_blocks_free(&h);
}

/// Sampled rows (sampled by the backend, `Backend::sample_rows`) in a batch: each seeded
/// request gives the ids the engine gives it alone, greedy rows with a penalty included.
#[test]
fn seeded_sampling_in_a_batch_matches_each_request_alone() {
    let Some(s) = shared() else { return };
    let h = runtime(s, |b| b.max_batch(8));
    let settings = [
        SamplingParams { temperature: 0.8, top_k: 40, seed: Some(1), ..Default::default() },
        SamplingParams { temperature: 1.0, top_p: 0.9, min_p: 0.05, seed: Some(2), ..Default::default() },
        SamplingParams { temperature: 0.7, repetition_penalty: 1.3, seed: Some(3), ..Default::default() },
        SamplingParams { repetition_penalty: 1.5, ..Default::default() },
        SamplingParams::greedy(),
    ];
    let reqs: Vec<GenerateRequest> =
        settings.iter().enumerate().map(|(i, p)| GenerateRequest { sampling: p.clone(), ..varied(i) }).collect();
    let streams: Vec<_> = reqs.iter().map(|r| h.generate(r.clone())).collect();
    let got: Vec<_> = block_on(futures::future::join_all(streams.into_iter().map(collect)));
    for (i, (req, got)) in reqs.iter().zip(got).enumerate() {
        let got = got.unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(got.token_ids, alone(s, req), "request {i} ({:?}) differs from its solo run", req.sampling);
    }
    assert_all_blocks_free(&h);
}

#[test]
fn a_late_request_joins_the_running_batch_and_finishes_first() {
    let Some(s) = shared() else { return };
    let h = runtime(s, |b| b);
    let long = GenerateRequest { ignore_eos: true, ..text_req(PROMPTS[1], 48) };
    let short = text_req(PROMPTS[0], 3);
    block_on(async {
        let mut long_events = h.generate(long.clone());
        // Wait until the long request is decoding.
        let mut long_ids = vec![];
        while let Some(Event::Token { ids, .. }) = long_events.next().await {
            long_ids.extend(ids);
            if !long_ids.is_empty() {
                break;
            }
        }
        let short_done = collect(h.generate(short.clone())).await.unwrap();
        assert_eq!(short_done.token_ids, alone(s, &short));
        // The short one is done while the long one still has tokens to come: it joined the
        // running batch rather than waiting for the long one to finish.
        let rest = collect(long_events).await.unwrap();
        assert!(rest.token_ids.len() > 10, "the long request was nearly done: {} tokens left", rest.token_ids.len());
        long_ids.extend(rest.token_ids);
        assert_eq!(long_ids, alone(s, &long));
    });
    assert_all_blocks_free(&h);
}

#[test]
fn a_small_kv_pool_queues_and_preempts_and_frees_everything() {
    let Some(s) = shared() else { return };
    // 12 blocks of 16 tokens: each request needs 2–4 blocks, 12 requests need ~36.
    let h = runtime(s, |b| b.kv_blocks(12).max_batch(8));
    let reqs: Vec<GenerateRequest> = (0..12)
        .map(|i| GenerateRequest { ignore_eos: true, ..varied(i) })
        .map(|r| GenerateRequest { max_tokens: 24, ..r })
        .collect();
    let got: Vec<_> = block_on(futures::future::join_all(reqs.iter().map(|r| collect(h.generate(r.clone())))));
    for (i, (req, got)) in reqs.iter().zip(got).enumerate() {
        assert_eq!(got.unwrap().token_ids, alone(s, req), "request {i}");
    }
    let st = block_on(h.stats()).unwrap();
    assert!(st.preemptions > 0, "expected preemptions with a pool this small: {st:?}");
    assert_all_blocks_free(&h);
}

#[test]
fn random_cancellations_leave_the_others_intact_and_free_every_block() {
    let Some(s) = shared() else { return };
    let h = runtime(s, |b| b.kv_blocks(16).max_batch(8));
    let reqs: Vec<GenerateRequest> =
        (0..10).map(|i| GenerateRequest { ignore_eos: true, max_tokens: 16, ..varied(i + 3) }).collect();
    // Requests 1, 4, 7 are dropped after 0, 2 and 5 tokens.
    let cancel_after = |i: usize| [(1usize, 0usize), (4, 2), (7, 5)].iter().find(|c| c.0 == i).map(|c| c.1);
    let outcomes = block_on(futures::future::join_all(reqs.iter().enumerate().map(|(i, r)| {
        let mut events = h.generate(r.clone());
        async move {
            match cancel_after(i) {
                None => Some(collect(events).await.unwrap().token_ids),
                Some(n) => {
                    let mut seen = 0;
                    while seen < n {
                        match events.next().await {
                            Some(Event::Token { ids, .. }) => seen += ids.len(),
                            other => panic!("request {i}: unexpected {other:?}"),
                        }
                    }
                    drop(events);
                    None
                }
            }
        }
    })));
    for (i, out) in outcomes.into_iter().enumerate() {
        if let Some(ids) = out {
            assert_eq!(ids, alone(s, &reqs[i]), "request {i}");
        }
    }
    assert_all_blocks_free(&h);
}

fn first_event(h: &RuntimeHandle, req: GenerateRequest) -> Event {
    block_on(h.generate(req).next()).unwrap()
}

#[test]
fn bad_input_is_refused_with_a_typed_error_while_others_go_on() {
    let Some(s) = shared() else { return };
    let h = runtime(s, |b| b);
    let good = text_req(PROMPTS[2], 12);
    let running = h.generate(good.clone());
    let context = h.model_info().context;
    type Check = fn(&RequestError) -> bool;
    let cases: Vec<(GenerateRequest, Check)> = vec![
        (GenerateRequest::new(Prompt::Tokens(vec![])), |e| matches!(e, RequestError::EmptyPrompt)),
        (GenerateRequest::new(Prompt::Text(String::new())), |e| matches!(e, RequestError::EmptyPrompt)),
        (GenerateRequest::new(Prompt::Tokens(vec![1; context + 5])), |e| {
            matches!(e, RequestError::PromptTooLong { .. })
        }),
        (GenerateRequest::new(Prompt::Tokens(vec![1_000_000])), |e| matches!(e, RequestError::BadTokenId(_))),
        (
            GenerateRequest {
                sampling: SamplingParams { temperature: -1.0, ..Default::default() },
                ..text_req("x", 4)
            },
            |e| matches!(e, RequestError::InvalidSampling(_)),
        ),
        (
            GenerateRequest { sampling: SamplingParams { top_p: f32::NAN, ..Default::default() }, ..text_req("x", 4) },
            |e| matches!(e, RequestError::InvalidSampling(_)),
        ),
        (text_req("x", 0), |e| matches!(e, RequestError::ZeroMaxTokens)),
    ];
    for (req, want) in cases {
        match first_event(&h, req.clone()) {
            Event::Error(e) => assert!(want(&e), "{req:?} gave {e:?}"),
            other => panic!("{req:?} was not refused: {other:?}"),
        }
    }
    assert_eq!(block_on(collect(running)).unwrap().token_ids, alone(s, &good));
    assert_all_blocks_free(&h);
}

#[test]
fn a_full_queue_is_refused_as_overloaded() {
    let Some(s) = shared() else { return };
    let h = runtime(s, |b| b.max_batch(1).max_waiting(2));
    let reqs: Vec<_> = (0..12).map(|i| text_req(PROMPTS[i % PROMPTS.len()], 4)).collect();
    let results = block_on(futures::future::join_all(reqs.iter().map(|r| collect(h.generate(r.clone())))));
    let overloaded = results.iter().filter(|r| matches!(r, Err(RequestError::Overloaded(_)))).count();
    assert!(overloaded > 0, "nothing was refused: {results:?}");
    for (req, r) in reqs.iter().zip(&results) {
        match r {
            Ok(c) => assert_eq!(c.token_ids, alone(s, req)),
            Err(e) => assert!(matches!(e, RequestError::Overloaded(_)), "{e:?}"),
        }
    }
    assert_all_blocks_free(&h);
}

#[test]
fn a_stop_string_ends_the_request_and_frees_it() {
    let Some(s) = shared() else { return };
    let h = runtime(s, |b| b);
    let base = GenerateRequest { ignore_eos: true, ..text_req(PROMPTS[0], 16) };
    let full = block_on(collect(h.generate(base.clone()))).unwrap();
    // Stop at a piece of text from the middle of the full output.
    let cut = full.text.char_indices().nth(full.text.chars().count() / 2).map(|(i, _)| i).unwrap();
    let stop: String = full.text[cut..].chars().take(3).collect();
    let req = GenerateRequest { stop: vec![stop.clone()], ..base };
    let got = block_on(collect(h.generate(req.clone()))).unwrap();
    let want = s.engine.generate(&req, |_, _| {}).unwrap();
    assert_eq!((got.text.as_str(), got.finish_reason), (want.text.as_str(), FinishReason::Stop));
    assert_eq!(got.token_ids, want.token_ids);
    assert!(!got.text.contains(&stop));
    assert_all_blocks_free(&h);
}

#[test]
fn shutdown_finishes_or_fails_in_flight_requests_and_never_hangs() {
    let Some(s) = shared() else { return };
    let h = runtime(s, |b| b);
    // The long request cannot finish within the drain time; the short one can.
    let long = GenerateRequest { ignore_eos: true, ..text_req(PROMPTS[1], 4000) };
    let short = text_req(PROMPTS[0], 2);
    let (a, b) = (h.generate(long), h.generate(short.clone()));
    let waiter = std::thread::spawn(move || block_on(futures::future::join(collect(a), collect(b))));
    h.shutdown_blocking(Duration::from_secs(4));
    let (a, b) = waiter.join().unwrap();
    assert!(matches!(a, Err(RequestError::ShuttingDown)), "{a:?}");
    assert_eq!(b.unwrap().token_ids, alone(s, &short));
    match first_event(&h, short) {
        Event::Error(RequestError::ShuttingDown) => {}
        other => panic!("accepted after shutdown: {other:?}"),
    }
}
