//! The actor runtime around executors that need no model: many requests, a tiny KV pool
//! and random cancellations through the whole actor topology; a dying executor.

mod common;

use std::time::Duration;

use common::runtime::assert_all_blocks_free;

use futures::executor::block_on;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use specula::actors::{collect, Event, Executor, ModelInfo, NoopExecutor, Runtime};
use specula::backend::BatchMeta;
use specula::request::{FinishReason, GenerateRequest, Prompt, RequestError};

const VOCAB: usize = 50;

fn info() -> ModelInfo {
    ModelInfo { vocab: VOCAB, context: 4096, eos: vec![0] }
}

/// The no-op executor's greedy continuation: each token is the previous one plus one; 0 is
/// the end-of-sequence token here.
fn expected(prompt: &[u32], max_tokens: usize) -> (Vec<u32>, FinishReason) {
    let mut last = *prompt.last().unwrap();
    let mut out = vec![];
    while out.len() < max_tokens {
        last = (last + 1) % VOCAB as u32;
        if last == 0 {
            return (out, FinishReason::Stop);
        }
        out.push(last);
    }
    (out, FinishReason::Length)
}

#[test]
fn many_requests_through_a_tiny_pool_with_random_cancellations() {
    // 24 blocks of 16 tokens; requests need up to 5 blocks each and 200 arrive at once.
    let h = Runtime::builder()
        .kv_blocks(24)
        .max_batch(8)
        .step_tokens(64)
        .build_with(NoopExecutor { vocab: VOCAB }, info(), None)
        .unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let reqs: Vec<(GenerateRequest, Option<usize>)> = (0..200)
        .map(|_| {
            let len = rng.random_range(1..40);
            let prompt: Vec<u32> = (0..len).map(|_| rng.random_range(1..VOCAB as u32)).collect();
            let max_tokens = rng.random_range(1..40);
            let cancel = rng.random_bool(0.2).then(|| rng.random_range(0..4));
            (GenerateRequest { max_tokens, ..GenerateRequest::new(Prompt::Tokens(prompt)) }, cancel)
        })
        .collect();
    let results = block_on(futures::future::join_all(reqs.iter().map(|(r, cancel)| {
        let mut events = h.generate(r.clone());
        async move {
            let Some(n) = cancel else { return Some(collect(events).await) };
            let mut seen = 0;
            while seen < *n {
                match events.next().await {
                    Some(Event::Token { ids, .. }) => seen += ids.len(),
                    _ => return None, // finished before the cancellation point
                }
            }
            None // dropped here: cancelled
        }
    })));
    for ((req, _), got) in reqs.iter().zip(results) {
        let Some(got) = got else { continue };
        let got = got.unwrap();
        let Prompt::Tokens(prompt) = &req.prompt else { unreachable!() };
        let (ids, finish) = expected(prompt, req.max_tokens);
        assert_eq!((got.token_ids, got.finish_reason), (ids, finish), "prompt {prompt:?}");
        assert_eq!(got.usage.prompt_tokens, prompt.len());
    }
    assert_all_blocks_free(&h);
    let st = block_on(h.stats()).unwrap();
    assert!(st.preemptions > 0, "a pool this small should preempt: {st:?}");
    h.shutdown_blocking(Duration::from_secs(1));
}

#[test]
fn a_request_larger_than_the_pool_is_refused() {
    let h = Runtime::builder().kv_blocks(2).build_with(NoopExecutor { vocab: VOCAB }, info(), None).unwrap();
    let req = GenerateRequest { max_tokens: 40, ..GenerateRequest::new(Prompt::Tokens(vec![1; 10])) };
    match block_on(collect(h.generate(req))) {
        Err(RequestError::ExceedsKvCapacity { tokens: 50, capacity: 32 }) => {}
        other => panic!("{other:?}"),
    }
}

/// An executor that dies on its third step.
struct Dies(usize);

impl Executor for Dies {
    fn vocab_size(&self) -> usize {
        VOCAB
    }
    fn forward(&mut self, meta: &BatchMeta) -> Result<Vec<f32>, String> {
        self.0 += 1;
        if self.0 == 3 {
            panic!("the executor dies (on purpose, in a test)");
        }
        NoopExecutor { vocab: VOCAB }.forward(meta)
    }
}

#[test]
fn a_panicking_executor_fails_its_step_instead_of_hanging_it_and_serves_on() {
    let h = Runtime::builder().kv_blocks(64).build_with(Dies(0), info(), None).unwrap();
    let req = GenerateRequest { max_tokens: 20, ..GenerateRequest::new(Prompt::Tokens(vec![1, 2, 3])) };
    let results = block_on(futures::future::join_all((0..3).map(|_| collect(h.generate(req.clone())))));
    for r in results {
        assert!(matches!(r, Err(RequestError::StepFailed(_))), "{r:?}");
    }
    // The panic was caught at the Verifier's boundary: the next request is served.
    let done = block_on(collect(h.generate(req))).unwrap();
    assert_eq!(done.token_ids, expected(&[1, 2, 3], 20).0);
    assert_all_blocks_free(&h);
}
