//! The actor runtime: many requests at once, in-flight batching, paged KV with prefix reuse.
//!
//! ```text
//!  caller ──Submit──▶ Intake ──KvMsg──▶ KvAllocator
//!    ▲  │              │  ▲ ◀──Fit──────┘
//!    │  └─Cancel(drop)─┘  │StepDone
//!    │                 StepPlan (─▶ Drafter, with speculation)
//!    │                    ▼  │
//!    │                  Verifier (own OS thread: model + KV cache + samplers)
//!    │                    │ StreamMsg::Step
//!    └────Event────── Streamer ──Stopped/Cancel──▶ Intake
//! ```
//! See `actors.md` at the repository root for what each actor owns, receives and sends.
//!
//! ```no_run
//! # use specula::actors::{Runtime, Event};
//! # use specula::request::{GenerateRequest, Prompt};
//! # use futures::StreamExt;
//! # fn demo(handle: specula::actors::RuntimeHandle) {
//! futures::executor::block_on(async {
//!     let mut events = handle.generate(GenerateRequest::new(Prompt::Text("Hello".into())));
//!     while let Some(ev) = events.next().await {
//!         match ev {
//!             Event::Token { text, .. } => print!("{text}"),
//!             Event::Done { finish, usage, .. } => println!("\n{finish:?} {usage:?}"),
//!             Event::Error(e) => eprintln!("{e}"),
//!         }
//!     }
//! });
//! # }
//! ```

pub mod admission;
pub mod drafter;
pub mod intake;
pub mod kv;
pub mod messages;
pub mod metrics;
pub mod streamer;
pub mod timeline;
pub mod verifier;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};

pub use messages::{Event, KvPoolStats, RuntimeStats};
pub use timeline::{Overlap, Span, Timeline, Work};
pub use verifier::{Executor, ModelExecutor, NoopExecutor};

use self::metrics as m;
use crate::backend::Backend;
use crate::core::block_pool::BlockPool;
use crate::core::kv_manager::KvManager;
use crate::core::lengths::Lengths;
use crate::core::scheduler::{Scheduler, SchedulerConfig};
use crate::engine::{Completion, Timings};
use crate::model::{KvCache, Llama, Tokenizer};
use crate::request::{FinishReason, GenerateRequest, RequestError, RequestId, Usage};
use crate::spec::{check_settings, SpecError, SpecStats, Speculation};
use messages::{Control, Submit};

/// Tokens per KV block.
pub const BLOCK_SIZE: usize = 16;

/// How the runtime is sized. Defaults suit the CPU backend and the default model.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// Most requests in one step.
    pub max_batch: usize,
    /// Most query tokens in one step (longer prompts are prefilled in chunks).
    pub step_tokens: usize,
    /// Most requests waiting for admission before new ones are refused as overloaded.
    pub max_waiting: usize,
    pub block_size: usize,
    /// The KV pool: an exact block count (wins if set); else on a GPU what
    /// `gpu_memory_fraction` of its memory leaves free once the model is loaded, counted in
    /// the backend's bytes per value; else (CPU) a budget of `kv_bytes`.
    pub kv_bytes: usize,
    pub kv_blocks: Option<usize>,
    pub gpu_memory_fraction: f64,
    /// Capacity of every actor mailbox.
    pub mailbox: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_batch: 32,
            step_tokens: 512,
            max_waiting: 1024,
            block_size: BLOCK_SIZE,
            kv_bytes: 512 << 20,
            kv_blocks: None,
            gpu_memory_fraction: 0.90,
            mailbox: 64,
        }
    }
}

/// Device memory kept out of the KV pool for what steps allocate later: activations and the
/// CUDA graphs captured per step shape (each with an arena of its own).
const STEP_MEMORY_RESERVE: usize = 6 << 30;

/// Bytes for the KV pool: on a device with memory of its own, what `gpu_memory_fraction` of
/// it leaves after everything already there (weights, a draft model and its pool,
/// workspaces) and a reserve for the steps; elsewhere `kv_bytes`.
fn kv_budget<B: Backend>(c: &RuntimeConfig, backend: &B) -> Result<usize, RuntimeError> {
    let Some(mem) = backend.memory()? else { return Ok(c.kv_bytes) };
    if !(c.gpu_memory_fraction > 0.0 && c.gpu_memory_fraction <= 1.0) {
        return Err(RuntimeError::Config(format!("gpu memory fraction {} is not in (0, 1]", c.gpu_memory_fraction)));
    }
    let allowed = (c.gpu_memory_fraction * mem.total as f64) as usize;
    let used = mem.total - mem.free + STEP_MEMORY_RESERVE;
    allowed.checked_sub(used).filter(|&b| b > 0).ok_or_else(|| {
        RuntimeError::Config(format!(
            "no device memory left for the KV cache: {:.1} GiB of {:.1} GiB already in use, the memory fraction is {}",
            used as f64 / (1u64 << 30) as f64,
            mem.total as f64 / (1u64 << 30) as f64,
            c.gpu_memory_fraction
        ))
    })
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid runtime configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("could not start the runtime: {0}")]
    Start(#[from] std::io::Error),
}

/// Whether the runtime can serve: set by Intake when its model executor failed beyond
/// recovery (see `verifier::MAX_FAILED_STEPS_IN_A_ROW`), read by every handle (`/health`).
#[derive(Debug, Default)]
pub struct Health {
    down: std::sync::Mutex<Option<String>>,
}

impl Health {
    /// Why the runtime cannot serve, if it cannot.
    pub fn down(&self) -> Option<String> {
        self.down.lock().map(|d| d.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Marks the runtime down (the first reason stays); whether it was up until now.
    fn set_down(&self, reason: String) -> bool {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let was_up = down.is_none();
        down.get_or_insert(reason);
        was_up
    }
}

/// What Intake and the Verifier need to know about the model besides its forward.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub vocab: usize,
    pub context: usize,
    pub eos: Vec<u32>,
}

/// Builds a runtime: `Runtime::builder().max_batch(8).build(backend, model, tokenizer)`.
pub struct Runtime;

impl Runtime {
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder { config: RuntimeConfig::default(), speculation: None, timeline: None }
    }
}

pub struct RuntimeBuilder {
    config: RuntimeConfig,
    speculation: Option<Speculation>,
    timeline: Option<Arc<Timeline>>,
}

impl RuntimeBuilder {
    pub fn config(mut self, config: RuntimeConfig) -> Self {
        self.config = config;
        self
    }
    pub fn max_batch(mut self, n: usize) -> Self {
        self.config.max_batch = n;
        self
    }
    pub fn step_tokens(mut self, n: usize) -> Self {
        self.config.step_tokens = n;
        self
    }
    pub fn max_waiting(mut self, n: usize) -> Self {
        self.config.max_waiting = n;
        self
    }
    pub fn kv_bytes(mut self, bytes: usize) -> Self {
        self.config.kv_bytes = bytes;
        self
    }
    pub fn kv_blocks(mut self, n: usize) -> Self {
        self.config.kv_blocks = Some(n);
        self
    }
    /// The share of a GPU's memory the runtime may fill (weights, KV pools, workspaces).
    pub fn gpu_memory_fraction(mut self, fraction: f64) -> Self {
        self.config.gpu_memory_fraction = fraction;
        self
    }
    /// Speculative decoding: a Drafter actor drafts for every decoding row.
    pub fn speculation(mut self, spec: Speculation) -> Self {
        self.speculation = Some(spec);
        self
    }
    /// Records when the Drafter and the Verifier work (see `Timeline::summary`).
    pub fn timeline(mut self, timeline: Arc<Timeline>) -> Self {
        self.timeline = Some(timeline);
        self
    }

    /// Starts the runtime around a loaded model (shareable between runtimes: weights are
    /// read-only); its KV cache is sized from the pool.
    pub fn build<B: Backend>(
        self,
        backend: B,
        model: impl Into<Arc<Llama<B>>>,
        tokenizer: Option<impl Into<Arc<Tokenizer>>>,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let (model, tokenizer) = (model.into(), tokenizer.map(Into::into));
        let c = &self.config;
        let num_blocks = match c.kv_blocks {
            Some(n) => n,
            None => {
                let per_token = KvCache::<B>::bytes_per_token(&model.config, backend.kv_bytes_per_value());
                // Never more than every row at the full context needs.
                let most = c.max_batch * model.config.max_position_embeddings.div_ceil(c.block_size);
                BlockPool::blocks_for_budget(kv_budget(c, &backend)?, per_token, c.block_size).min(most)
            }
        };
        let kv = KvCache::new(&backend, &model.config, num_blocks, c.block_size)?;
        let eos = tokenizer.as_ref().map(|t| t.eos_ids.clone()).unwrap_or_default();
        let info = ModelInfo { vocab: model.config.vocab_size, context: model.config.max_position_embeddings, eos };
        let builder = RuntimeBuilder { config: RuntimeConfig { kv_blocks: Some(num_blocks), ..self.config }, ..self };
        builder.build_with(ModelExecutor { backend, model, kv }, info, tokenizer)
    }

    /// Starts the runtime around any executor (the no-op one for benchmarks); `kv_blocks`
    /// must be set to what the executor's cache holds.
    pub fn build_with<E: Executor>(
        self,
        exec: E,
        info: ModelInfo,
        tokenizer: Option<Arc<Tokenizer>>,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let (c, speculation, timeline) = (self.config, self.speculation, self.timeline);
        let num_blocks = c.kv_blocks.ok_or_else(|| RuntimeError::Config("kv_blocks must be set".into()))?;
        if c.max_batch == 0 || c.step_tokens == 0 || c.mailbox == 0 || num_blocks == 0 {
            return Err(RuntimeError::Config(format!(
                "max_batch, step_tokens, mailbox and the KV pool must be positive: {c:?}, {num_blocks} blocks"
            )));
        }
        if let Some(s) = &speculation {
            check_settings(s.max_draft, s.synthetic_acceptance)?;
        }
        // Submissions wait in the mailbox until Intake has validated them: as many as the
        // admission queue holds, so that a burst is refused only when the queue would be.
        let (submit_tx, submit_rx) = mpsc::channel(c.max_waiting.max(1));
        // The control lane must never fill: one cancel from the caller and one note from the
        // Streamer per request at most, and requests are bounded by admission control.
        let control_cap = 2 * (c.max_waiting + c.max_batch) + c.mailbox;
        let (control_tx, control_rx) = mpsc::channel(control_cap);
        let (kv_tx, kv_rx) = mpsc::channel(c.mailbox);
        let (plan_tx, plan_rx) = mpsc::channel(2);
        let (done_tx, done_rx) = mpsc::channel(2);
        let (stream_tx, stream_rx) = mpsc::channel(c.mailbox);

        let sched = Scheduler::new(SchedulerConfig {
            max_batch: c.max_batch,
            step_tokens: c.step_tokens,
            max_waiting: c.max_waiting,
            block_size: c.block_size,
            max_draft: speculation.as_ref().map_or(0, |s| s.max_draft),
        });
        let lengths = Lengths { context: info.context, kv_tokens: num_blocks * c.block_size };
        let limits = intake::Limits { vocab: info.vocab, lengths };
        let draft_pool = Arc::new(std::sync::Mutex::new(None));
        let health = Arc::new(Health::default());
        ::metrics::gauge!(metrics::HEALTHY).set(1.0);
        let (intake, admitted) = intake::Intake::new(
            sched,
            tokenizer.clone(),
            limits,
            intake::Peers { kv: kv_tx, plans: plan_tx, streamer: stream_tx.clone() },
            draft_pool.clone(),
            health.clone(),
        );
        let kv = kv::KvAllocator::new(KvManager::new(BlockPool::new(num_blocks, c.block_size)));
        let spec_stats = speculation.as_ref().map(|s| SpecStats::new(s.synthetic_acceptance.is_some()));
        let streamer = streamer::Streamer::new(tokenizer, control_tx.clone(), spec_stats);
        let mut verifier = verifier::Verifier::new(exec, c.block_size, info.eos.clone(), stream_tx, done_tx);
        verifier.synthetic_acceptance = speculation.as_ref().and_then(|s| s.synthetic_acceptance);
        verifier.timeline = timeline.clone();

        // With speculation the Drafter sits between Intake and the Verifier.
        let mut model_threads = vec![];
        let verify_rx = match speculation {
            Some(spec) => {
                let (verify_tx, verify_rx) = mpsc::channel(2);
                let drafter = drafter::Drafter::new(spec.proposer, verify_tx, draft_pool, timeline);
                let t = std::thread::Builder::new().name("specula-drafter".into());
                model_threads.push(t.spawn(move || drafter.run(plan_rx))?);
                verify_rx
            }
            None => plan_rx,
        };
        let t = std::thread::Builder::new().name("specula-verifier".into());
        model_threads.push(t.spawn(move || verifier.run(verify_rx))?);
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
        let actors = std::thread::Builder::new().name("specula-actors".into()).spawn(move || {
            rt.block_on(async move {
                let kv = tokio::spawn(kv.run(kv_rx));
                let streamer = tokio::spawn(streamer.run(stream_rx));
                intake.run(submit_rx, admitted, control_rx, done_rx).await;
                // Intake is gone: the Drafter's and Verifier's mailboxes close, they end,
                // and with them the last senders of the Streamer and the KvAllocator.
                let _ = streamer.await;
                let _ = kv.await;
            });
            for t in model_threads {
                let _ = t.join();
            }
        })?;
        Ok(RuntimeHandle {
            inner: Arc::new(Inner {
                submit: submit_tx,
                control: control_tx,
                next_id: AtomicU64::new(0),
                config: RuntimeConfig { kv_blocks: Some(num_blocks), ..c },
                info,
                health,
                actors: std::sync::Mutex::new(Some(actors)),
            }),
        })
    }
}

struct Inner {
    submit: mpsc::Sender<Submit>,
    control: mpsc::Sender<Control>,
    next_id: AtomicU64,
    config: RuntimeConfig,
    info: ModelInfo,
    health: Arc<Health>,
    actors: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A cloneable handle to a running runtime. When the last handle is dropped the runtime
/// finishes the requests in flight and stops.
#[derive(Clone)]
pub struct RuntimeHandle {
    inner: Arc<Inner>,
}

impl RuntimeHandle {
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    pub fn model_info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// `Err(reason)` once the runtime cannot serve (its model executor failed beyond
    /// recovery): every request is then refused with `Unavailable`.
    pub fn health(&self) -> Result<(), String> {
        self.inner.health.down().map_or(Ok(()), Err)
    }

    /// Submits a request; its events arrive on the returned stream, which ends after `Done`
    /// or `Error`. Dropping the stream cancels the request and frees its blocks.
    pub fn generate(&self, req: GenerateRequest) -> EventStream {
        let id = RequestId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        // Room for every event the request can produce: one per token, plus the end.
        let (tx, rx) = mpsc::channel(req.max_tokens.min(self.inner.info.context).max(1) + 4);
        let submit = Submit { id, req, events: tx.clone(), arrived: Instant::now() };
        let refused = match self.inner.submit.try_send(submit) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => Some(RequestError::Overloaded(self.inner.config.max_waiting)),
            Err(mpsc::error::TrySendError::Closed(_)) => Some(RequestError::ShuttingDown),
        };
        if let Some(e) = refused {
            ::metrics::counter!(m::REQUESTS_FAILED, m::REASON_LABEL => e.code()).increment(1);
            let _ = tx.try_send(Event::Error(e));
        }
        EventStream { id, rx, control: self.inner.control.clone(), ended: false }
    }

    /// A snapshot of the queues and KV pools.
    pub async fn stats(&self) -> Result<RuntimeStats, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.inner.control.send(Control::Stats(tx)).await.map_err(|_| RequestError::ShuttingDown)?;
        rx.await.map_err(|_| RequestError::ShuttingDown)
    }

    /// Stops taking requests, lets those in flight finish for up to `drain`, fails the rest
    /// with `ShuttingDown`, and returns once every actor has stopped.
    pub async fn shutdown(&self, drain: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.inner.control.send(Control::Shutdown { drain, done: tx }).await.is_ok() {
            let _ = rx.await;
        }
        let actors = self.inner.actors.lock().map(|mut a| a.take()).unwrap_or(None);
        if let Some(t) = actors {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// `shutdown` for callers outside any async runtime.
    pub fn shutdown_blocking(&self, drain: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.inner.control.try_send(Control::Shutdown { drain, done: tx }).is_ok() {
            let _ = rx.blocking_recv();
        }
        let actors = self.inner.actors.lock().map(|mut a| a.take()).unwrap_or(None);
        if let Some(t) = actors {
            let _ = t.join();
        }
    }
}

/// A request's events. Ends after `Done` or `Error`; a runtime that goes away mid-request
/// yields `Error(ShuttingDown)` rather than silence.
pub struct EventStream {
    id: RequestId,
    rx: mpsc::Receiver<Event>,
    control: mpsc::Sender<Control>,
    ended: bool,
}

impl EventStream {
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Cancels the request but keeps the stream, which then ends with
    /// `Done { finish: Cancelled, usage }` (the usage so far) unless its end was already on
    /// its way. Dropping the stream cancels too, without that last event.
    pub fn cancel(&mut self) {
        if !self.ended {
            let _ = self.control.try_send(Control::Cancel(self.id));
        }
    }
}

impl Stream for EventStream {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(ev)) => {
                if matches!(ev, Event::Done { .. } | Event::Error(_)) {
                    self.ended = true;
                }
                Poll::Ready(Some(ev))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(Event::Error(RequestError::ShuttingDown)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if !self.ended {
            // If the control lane were full, the Streamer still notices the closed stream at
            // the request's next token.
            let _ = self.control.try_send(Control::Cancel(self.id));
        }
    }
}

/// Reads a stream to its end and assembles the completion as the single-request engine
/// reports it: text, ids, finish reason, usage, and timings (prefill = time to the first
/// token, decode = the rest).
pub async fn collect(mut events: EventStream) -> Result<Completion, RequestError> {
    use futures::StreamExt;
    let start = Instant::now();
    let (mut text, mut ids, mut first) = (String::new(), vec![], None);
    while let Some(ev) = events.next().await {
        match ev {
            Event::Token { ids: new, text: t } => {
                if !new.is_empty() && first.is_none() {
                    first = Some(Instant::now());
                }
                ids.extend(new);
                text.push_str(&t);
            }
            Event::Done { finish, usage, speculative } => {
                let mut c = completion(text, ids, finish, usage, start, first);
                c.speculative = speculative;
                return Ok(c);
            }
            Event::Error(e) => return Err(e),
        }
    }
    Err(RequestError::ShuttingDown)
}

fn completion(
    text: String,
    token_ids: Vec<u32>,
    finish_reason: FinishReason,
    usage: Usage,
    start: Instant,
    first: Option<Instant>,
) -> Completion {
    let end = Instant::now();
    let first = first.unwrap_or(end);
    let prefill_ms = (first - start).as_secs_f64() * 1e3;
    let decode_ms = (end - first).as_secs_f64() * 1e3;
    let decoded = token_ids.len().saturating_sub(1);
    Completion {
        text,
        token_ids,
        finish_reason,
        usage,
        timings: Timings {
            prefill_ms,
            decode_ms,
            decode_tok_per_s: if decode_ms > 0.0 { decoded as f64 / (decode_ms / 1e3) } else { 0.0 },
        },
        speculative: None,
    }
}
