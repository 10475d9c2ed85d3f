//! A failure inside a step (an error, or a panic caught at the Verifier's or the Drafter's
//! thread boundary) fails that step's requests with `StepFailed` and nothing else: the next
//! request is served. An executor that cannot go on takes the runtime down: requests are
//! refused as `Unavailable`, `/health` answers 503 with the reason, `/metrics` counts it.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use actix_web::{test, web, App};
use common::runtime::assert_all_blocks_free;
use futures::executor::block_on;
use specula::actors::{collect, Executor, ModelInfo, NoopExecutor, Runtime, RuntimeHandle};
use specula::backend::{BackendError, BatchMeta};
use specula::core::sampling::SamplingParams;
use specula::request::{FinishReason, GenerateRequest, Prompt, RequestError};
use specula::server::{self, AppState};
use specula::spec::{Draft, NgramProposer, Proposer, SeqId, Speculation};

const VOCAB: usize = 50;

/// Metrics are process-wide: the tests of this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, Debug)]
enum How {
    Error,
    Panic,
}

/// The no-op executor, failing on the listed steps (counted from 1), or on every step.
struct Failing {
    on: Vec<usize>,
    always: bool,
    how: How,
    /// What `recover` answers after a failure.
    recovers: bool,
    steps: usize,
}

impl Failing {
    fn on(steps: &[usize], how: How) -> Self {
        Failing { on: steps.to_vec(), always: false, how, recovers: true, steps: 0 }
    }
}

impl Executor for Failing {
    fn vocab_size(&self) -> usize {
        VOCAB
    }
    fn recover(&mut self) -> Result<(), String> {
        if self.recovers {
            Ok(())
        } else {
            Err("the device is lost (injected)".into())
        }
    }
    fn forward(&mut self, meta: &BatchMeta) -> Result<Vec<f32>, String> {
        self.steps += 1;
        if self.always || self.on.contains(&self.steps) {
            match self.how {
                How::Error => return Err(format!("injected failure at step {}", self.steps)),
                How::Panic => panic!("injected panic at step {}", self.steps),
            }
        }
        NoopExecutor { vocab: VOCAB }.forward(meta)
    }
}

fn runtime(exec: Failing, max_batch: usize) -> RuntimeHandle {
    let info = ModelInfo { vocab: VOCAB, context: 4096, eos: vec![] };
    Runtime::builder().kv_blocks(64).max_batch(max_batch).build_with(exec, info, None).unwrap()
}

fn req(prompt: &[u32], max_tokens: usize) -> GenerateRequest {
    GenerateRequest { max_tokens, ..GenerateRequest::new(Prompt::Tokens(prompt.to_vec())) }
}

/// The no-op executor's continuation: each token is the previous one plus one.
fn expected(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    (1..=max_tokens as u32).map(|i| (prompt.last().unwrap() + i) % VOCAB as u32).collect()
}

fn assert_served(h: &RuntimeHandle, prompt: &[u32], max_tokens: usize) {
    let done = block_on(collect(h.generate(req(prompt, max_tokens)))).expect("served");
    assert_eq!((done.token_ids, done.finish_reason), (expected(prompt, max_tokens), FinishReason::Length));
}

#[test]
fn a_failed_step_fails_only_its_requests_and_the_next_is_served() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for how in [How::Error, How::Panic] {
        // One request at a time: the first runs steps 1 to 3 and fails at 3; the second
        // waits meanwhile, and is served after.
        let h = runtime(Failing::on(&[3], how), 1);
        let (first, second) = (h.generate(req(&[1, 2, 3], 10)), h.generate(req(&[5, 6], 5)));
        let (first, second) = block_on(futures::future::join(collect(first), collect(second)));
        match first {
            Err(RequestError::StepFailed(msg)) => assert!(msg.contains("injected"), "{how:?}: {msg}"),
            other => panic!("{how:?}: the failed step's request got {other:?}"),
        }
        let second = second.unwrap_or_else(|e| panic!("{how:?}: the waiting request failed: {e}"));
        assert_eq!(second.token_ids, expected(&[5, 6], 5), "{how:?}");
        assert_served(&h, &[7, 8, 9], 4);
        assert_eq!(h.health(), Ok(()), "{how:?}");
        assert_all_blocks_free(&h);
        h.shutdown_blocking(Duration::from_secs(1));
    }
}

#[test]
fn an_executor_that_keeps_failing_takes_the_runtime_down() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let metrics = server::metrics::install();
    let h = runtime(Failing { always: true, ..Failing::on(&[], How::Error) }, 8);
    // Each request fails with its step, until the third failure in a row.
    for i in 0..3 {
        let r = block_on(collect(h.generate(req(&[1, 2], 4))));
        assert!(matches!(r, Err(RequestError::StepFailed(_))), "request {i}: {r:?}");
    }
    let reason = h.health().expect_err("down after three failed steps in a row");
    assert!(reason.contains("3 steps failed in a row") && reason.contains("injected"), "{reason}");
    let r = block_on(collect(h.generate(req(&[1, 2], 4))));
    assert!(matches!(&r, Err(RequestError::Unavailable(why)) if *why == reason), "{r:?}");

    actix_rt::System::new().block_on(async {
        let state = AppState {
            handle: h.clone(),
            model_name: "m".into(),
            api_key: None,
            metrics,
            started: 0,
            limits: Default::default(),
            stopping: Default::default(),
        };
        let app = test::init_service(App::new().app_data(web::Data::new(state)).configure(server::configure)).await;
        let resp = test::call_service(&app, test::TestRequest::get().uri("/health").to_request()).await;
        assert_eq!(resp.status(), 503);
        let body: serde_json::Value = test::read_body_json(resp).await;
        assert_eq!((body["status"].as_str(), body["reason"].as_str()), (Some("unavailable"), Some(reason.as_str())));
        let resp = test::call_service(&app, test::TestRequest::get().uri("/metrics").to_request()).await;
        let text = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
        assert!(text.contains("specula_runtime_healthy 0"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("specula_step_failures_total{kind=\"error\"}")), "{text}");
    });
    h.shutdown_blocking(Duration::from_secs(1));
}

#[test]
fn an_executor_that_cannot_recover_takes_the_runtime_down_at_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let h = runtime(Failing { recovers: false, ..Failing::on(&[2], How::Panic) }, 8);
    let r = block_on(collect(h.generate(req(&[1, 2], 4))));
    assert!(matches!(r, Err(RequestError::StepFailed(_))), "{r:?}");
    assert_eq!(h.health(), Err("the device is lost (injected)".into()));
    let r = block_on(collect(h.generate(req(&[1, 2], 4))));
    assert!(matches!(r, Err(RequestError::Unavailable(_))), "{r:?}");
    h.shutdown_blocking(Duration::from_secs(1));
}

/// n-gram drafting that panics on its third call.
struct PanickingProposer {
    inner: NgramProposer,
    calls: usize,
}

impl Proposer for PanickingProposer {
    fn propose(&mut self, seq: SeqId, history: &[u32], k: usize, s: &SamplingParams) -> Result<Draft, BackendError> {
        self.calls += 1;
        assert!(self.calls != 3, "injected drafting panic");
        self.inner.propose(seq, history, k, s)
    }
}

#[test]
fn a_drafter_that_panics_leaves_requests_to_run_without_drafts() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let info = ModelInfo { vocab: VOCAB, context: 4096, eos: vec![] };
    let proposer = Box::new(PanickingProposer { inner: NgramProposer::default(), calls: 0 });
    let spec =
        Speculation { proposer, max_draft: 4, synthetic_acceptance: None, lengths: Default::default(), tree: None };
    let h = Runtime::builder()
        .kv_blocks(64)
        .speculation(spec)
        .build_with(NoopExecutor { vocab: VOCAB }, info, None)
        .unwrap();
    // A prompt that repeats itself, so that n-gram lookup drafts.
    let prompt: Vec<u32> = (0..40).map(|i| i % 10 + 1).collect();
    for _ in 0..3 {
        assert_served(&h, &prompt, 30);
    }
    assert_eq!(h.health(), Ok(()));
    assert_all_blocks_free(&h);
    h.shutdown_blocking(Duration::from_secs(1));
}
