//! The actor runtime: many requests at once, in-flight batching, paged KV with prefix reuse.
//!
//! ```text
//!  caller ──Submit──▶ Intake ──Apply──▶ KvAllocator     (actix actors, on the
//!    ▲  │              │  ▲ ◀──Fit─────┘                `specula-actors` thread)
//!    │  └─Cancel(drop)─┘  │StepDone
//!    │                 StepPlan (crossbeam; ─▶ Drafter thread, with speculation)
//!    │                    ▼  │
//!    │                  Verifier (own OS thread: model + KV cache + samplers)
//!    │                    │ StepTokens
//!    └────Event────── Streamer ──Ended──▶ Intake
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
pub mod config;
pub mod drafter;
pub mod error;
pub mod executor;
pub mod handle;
pub mod intake;
pub mod kv;
pub mod mailbox;
pub mod messages;
pub mod metrics;
pub mod streamer;
pub mod tensor_parallel;
pub mod timeline;
pub mod verifier;

use std::sync::atomic::AtomicU64;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use actix::{Actor, Addr, AsyncContext, Context, Supervisor};

pub use config::{KvCacheInfo, RuntimeConfig, BLOCK_SIZE};
pub use error::{ConfigError, ConfigField, DownReason, ExecutorError, RuntimeError, StepError};
pub use executor::{Executor, ModelExecutor, NoopExecutor};
pub use handle::{collect, EventStream, Health, RuntimeHandle};
pub use messages::{Event, KvPoolStats, RuntimeStats};
pub use tensor_parallel::{TpExecutor, TpRank};
pub use timeline::{Overlap, Span, Timeline, Work};

use crate::backend::Backend;
use crate::core::block_pool::BlockPool;
use crate::core::kv_manager::KvManager;
use crate::core::lengths::{Lengths, WINDOWED_CONTEXT};
use crate::core::scheduler::{Scheduler, SchedulerConfig};
use crate::core::spec::DraftLengths;
use crate::model::{KvCache, Llama, ModelConfig, Tokenizer};
use crate::spec::{check_settings, SpecError, SpecStats, Speculation, MAX_DRAFT_LEN, MAX_TREE_NODES, MAX_TREE_TOP_K};
use crate::tensor::KvOptions;
use handle::Inner;
use intake::Intake;
use kv::KvAllocator;
use messages::{HandlesGone, VerifyMsg};
use streamer::Streamer;

/// What Intake and the Verifier need to know about the model besides its forward.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub vocab: usize,
    pub context: usize,
    pub eos: Vec<u32>,
}

/// Held by each actix actor: the actors' thread ends once all of them are dropped.
#[derive(Clone)]
pub struct Running(#[allow(dead_code)] tokio::sync::mpsc::Sender<()>);

/// Builds a runtime: `Runtime::builder().max_batch(8).build(backend, model, tokenizer)`.
pub struct Runtime;

impl Runtime {
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder { config: RuntimeConfig::default(), speculation: None, timeline: None, kv_info: None }
    }
}

pub struct RuntimeBuilder {
    config: RuntimeConfig,
    speculation: Option<Speculation>,
    timeline: Option<Arc<Timeline>>,
    /// The storage of the model's KV cache and its bytes per token, once `build` knows them.
    kv_info: Option<(crate::tensor::KvStorage, usize)>,
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
    /// The KV cache's element type and attention window.
    pub fn kv_cache(mut self, kv: KvOptions) -> Self {
        self.config.kv = kv;
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
        let builder = self.sized(&backend, &model.config, 1)?;
        let c = &builder.config;
        let num_blocks = c.checked_blocks()?;
        let kv = KvCache::with_options(&backend, &model.config, num_blocks, c.block_size, c.kv)?;
        let info = builder.model_info(&model.config, tokenizer.as_deref());
        builder.build_with(ModelExecutor::new(backend, model, kv), info, tokenizer)
    }

    /// The pool's size (`kv_blocks`, unless given) for `model` (one rank's configuration) on
    /// `backend`, with `ranks` such ranks: the attention window resolved, and the KV storage
    /// and bytes per token (all ranks together) kept for the runtime's stats. On a device with
    /// memory of its own each rank's pool fills its own device; on the CPU the ranks share
    /// one budget.
    fn sized<B: Backend>(self, backend: &B, model: &ModelConfig, ranks: usize) -> Result<Self, RuntimeError> {
        let window = self.config.kv.window.or_else(|| model.default_window());
        let mut c = RuntimeConfig { kv: KvOptions { window, ..self.config.kv }, ..self.config.clone() };
        let storage = backend.kv_storage(c.kv.dtype)?;
        let per_rank = KvCache::<B>::bytes_per_token(model, storage);
        let sharing = if backend.memory()?.is_some() { 1 } else { ranks };
        if c.kv_blocks.is_none() {
            // Never more than every row at the full context (or its window) needs.
            let held = c.held_tokens().unwrap_or(model.max_position_embeddings);
            let most = c.max_batch * held.div_ceil(c.block_size);
            let budget = config::kv_budget(&c, backend)?;
            c.kv_blocks = Some(BlockPool::blocks_for_budget(budget, per_rank * sharing, c.block_size).min(most));
        }
        Ok(RuntimeBuilder { config: c, kv_info: Some((storage, per_rank * ranks)), ..self })
    }

    /// What Intake and the Verifier know of `model` (its window resolved by `sized`).
    fn model_info(&self, model: &ModelConfig, tokenizer: Option<&Tokenizer>) -> ModelInfo {
        let eos = tokenizer.map(|t| t.eos_ids.clone()).unwrap_or_default();
        let windowed = self.config.kv.window.is_some();
        let context = if windowed { WINDOWED_CONTEXT } else { model.max_position_embeddings };
        ModelInfo { vocab: model.vocab_size, context, eos }
    }

    /// Starts the runtime around any executor (the no-op one for benchmarks); `kv_blocks`
    /// must be set to what the executor's cache holds. `E` is how its forward fails.
    pub fn build_with<X, E>(
        self,
        exec: X,
        info: ModelInfo,
        tokenizer: Option<Arc<Tokenizer>>,
    ) -> Result<RuntimeHandle, RuntimeError>
    where
        X: Executor<E>,
        E: Into<ExecutorError> + 'static,
    {
        let c = self.config;
        let num_blocks = c.checked_blocks()?;
        c.check_window_fits(num_blocks)?;
        if let Some(s) = &self.speculation {
            check_settings(s.max_draft, s.synthetic_acceptance)?;
            check_tree(s, &exec)?;
        }
        let kv_cache = KvCacheInfo {
            storage: self.kv_info.map(|(s, _)| s),
            bytes_per_token: self.kv_info.map_or(0, |(_, b)| b),
            tokens: num_blocks * c.block_size,
            window: c.kv.window,
        };
        metrics::record_kv_cache(&kv_cache);
        // One plan in flight: room for two on each hop to the GPU threads.
        let (plan_tx, plan_rx) = mailbox::bounded(2);
        let health = Arc::new(Health::default());
        ::metrics::gauge!(metrics::HEALTHY).set(1.0);
        let actors = ActorSetup {
            sched: scheduler(&c, self.speculation.as_ref(), exec.warms_up()),
            limits: intake::Limits {
                vocab: info.vocab,
                lengths: Lengths { context: info.context, kv_tokens: num_blocks * c.block_size, held: c.held_tokens() },
                kv_cache,
            },
            kv: KvManager::with_window(BlockPool::new(num_blocks, c.block_size), c.kv.window),
            tokenizer,
            plans: plan_tx,
            health: health.clone(),
            spec_stats: self.speculation.as_ref().map(|s| {
                let mut stats = SpecStats::new(s.synthetic_acceptance.is_some());
                stats.random_heads = s.proposer.random_weights();
                stats
            }),
            intake_mailbox: c.max_waiting + c.mailbox,
            mailbox: c.mailbox,
        };
        let (actors_thread, intake) = actors.spawn()?;
        let started = start_workers(exec, &info, &c, self.speculation, self.timeline, plan_rx, intake.clone());
        let workers = started.inspect_err(|_| intake.do_send(HandlesGone))?;
        let config = RuntimeConfig { kv_blocks: Some(num_blocks), ..c.clone() };
        let threads = Mutex::new(std::iter::once(actors_thread).chain(workers).collect());
        let inner = Inner { intake, next_id: AtomicU64::new(0), config, info, health, threads };
        Ok(RuntimeHandle { inner: Arc::new(inner) })
    }
}

/// The scheduler for `c`, drafting as `spec` says: a tree reserves its nodes, as deep as
/// its depth (within the longest draft the length policy knows).
fn scheduler(c: &RuntimeConfig, spec: Option<&Speculation>, warm_ups: bool) -> Scheduler {
    let (max_draft, lengths, tree_nodes) = match spec {
        None => (0, DraftLengths::default(), None),
        Some(s) => match s.tree {
            Some(t) => (t.depth.clamp(1, MAX_DRAFT_LEN), s.lengths, Some(t.nodes)),
            None => (s.max_draft, s.lengths, None),
        },
    };
    Scheduler::new(SchedulerConfig {
        max_batch: c.max_batch,
        step_tokens: c.step_tokens,
        max_waiting: c.max_waiting,
        block_size: c.block_size,
        max_draft,
        lengths,
        warm_ups,
        tree_nodes,
    })
}

/// Refuses tree speculation that cannot run: a proposer without trees, synthetic
/// acceptance, a shape out of range, an executor that cannot move KV entries.
fn check_tree<X: Executor<E>, E: Into<ExecutorError>>(s: &Speculation, exec: &X) -> Result<(), SpecError> {
    let Some(t) = s.tree else { return Ok(()) };
    if !s.proposer.drafts_trees() {
        return Err(SpecError::TreeProposer);
    }
    if s.synthetic_acceptance.is_some() {
        return Err(SpecError::TreeSynthetic);
    }
    if !(1..=MAX_TREE_NODES).contains(&t.nodes) || !(1..=MAX_TREE_TOP_K).contains(&t.top_k) {
        return Err(SpecError::TreeShape { nodes: t.nodes, top_k: t.top_k });
    }
    match exec.copies_slots() {
        true => Ok(()),
        false => Err(SpecError::TreeExecutor),
    }
}

/// What the actix actors are built from.
struct ActorSetup {
    sched: Scheduler,
    limits: intake::Limits,
    kv: KvManager,
    tokenizer: Option<Arc<Tokenizer>>,
    plans: mailbox::MailboxSender<VerifyMsg>,
    health: Arc<Health>,
    spec_stats: Option<SpecStats>,
    /// Intake's mailbox: submissions (`max_waiting`) and room for the other messages.
    intake_mailbox: usize,
    mailbox: usize,
}

impl ActorSetup {
    /// Starts Intake, the KvAllocator (supervised) and the Streamer on an actix `System` of
    /// their own thread, which ends once all three have stopped; returns it and Intake's
    /// address (the handles and the GPU threads send there).
    fn spawn(self) -> Result<(JoinHandle<()>, Addr<Intake>), RuntimeError> {
        let (addrs_tx, addrs_rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new().name("specula-actors".into()).spawn(move || {
            let rt = || tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime");
            actix::System::with_tokio_rt(rt).block_on(async move {
                let (running, mut stopped) = tokio::sync::mpsc::channel(1);
                let addrs = self.start(Running(running));
                let _ = addrs_tx.send(addrs);
                // Every actor holds a `Running`: this returns once all of them are gone.
                let _ = stopped.recv().await;
            });
        })?;
        let intake = addrs_rx.recv().map_err(|_| std::io::Error::other("the actors' thread died"))?;
        Ok((thread, intake))
    }

    fn start(self, running: Running) -> Addr<Intake> {
        // Intake's context first: the Streamer needs its address, and it needs theirs.
        let mut intake_ctx = Context::<Intake>::new();
        intake_ctx.set_mailbox_capacity(self.intake_mailbox);
        let intake = intake_ctx.address();
        let (mailbox, kv_running, kv) = (self.mailbox, running.clone(), self.kv);
        let kv = Supervisor::start(move |ctx: &mut Context<KvAllocator>| {
            ctx.set_mailbox_capacity(mailbox);
            KvAllocator::new(kv, kv_running)
        });
        let streamer = Streamer::create({
            let (tokenizer, intake, running) = (self.tokenizer.clone(), intake.clone(), running.clone());
            move |ctx| {
                ctx.set_mailbox_capacity(mailbox);
                Streamer::new(tokenizer, intake, self.spec_stats, running)
            }
        });
        let peers = intake::Peers { kv, streamer, plans: self.plans };
        let actor = Intake::new(self.sched, self.tokenizer, self.limits, peers, self.health, running);
        intake_ctx.run(actor);
        intake
    }
}

/// Steps' hidden states on their way to the Drafter: it takes each before the next plan,
/// so one is ever waiting; a few more leave room.
const HIDDEN_STATES_CHANNEL: usize = 4;
/// Steps' tree verdicts on their way to the Drafter, likewise.
const TREE_VERDICTS_CHANNEL: usize = 4;

/// Starts the GPU workers' OS threads: the Verifier, and with speculation the Drafter in
/// front of it.
fn start_workers<X, E>(
    mut exec: X,
    info: &ModelInfo,
    c: &RuntimeConfig,
    speculation: Option<Speculation>,
    timeline: Option<Arc<Timeline>>,
    plans: mailbox::Mailbox<VerifyMsg>,
    intake: Addr<Intake>,
) -> Result<Vec<JoinHandle<()>>, RuntimeError>
where
    X: Executor<E>,
    E: Into<ExecutorError> + 'static,
{
    // A proposer that reads the target's hidden states gets them from the Verifier directly.
    let wants = speculation.as_ref().filter(|s| s.proposer.wants_hidden()).map(|s| s.proposer.hidden_kind());
    let wants_hidden = wants.is_some_and(|kind| exec.keep_hidden(kind));
    let (hidden_tx, hidden_rx) = match wants_hidden {
        true => {
            let (tx, rx) = crossbeam_channel::bounded(HIDDEN_STATES_CHANNEL);
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let mut verifier = verifier::Verifier::new(exec, c.block_size, info.eos.clone(), intake.clone());
    verifier.synthetic_acceptance = speculation.as_ref().and_then(|s| s.synthetic_acceptance);
    verifier.timeline = timeline.clone();
    verifier.hidden = hidden_tx;
    let (trees_tx, trees_rx) = match speculation.as_ref().is_some_and(|s| s.tree.is_some()) {
        true => {
            let (tx, rx) = crossbeam_channel::bounded(TREE_VERDICTS_CHANNEL);
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    verifier.trees = trees_tx;
    let mut threads = vec![];
    let verify_rx = match speculation {
        Some(spec) => {
            let (verify_tx, verify_rx) = mailbox::bounded(2);
            let mut drafter = drafter::Drafter::new(spec.proposer, verify_tx, intake, timeline);
            drafter.hidden = hidden_rx;
            (drafter.tree, drafter.verdicts) = (spec.tree, trees_rx);
            let t = std::thread::Builder::new().name("specula-drafter".into());
            threads.push(t.spawn(move || drafter.run(plans))?);
            verify_rx
        }
        None => plans,
    };
    let t = std::thread::Builder::new().name("specula-verifier".into());
    threads.push(t.spawn(move || verifier.run(verify_rx))?);
    Ok(threads)
}
