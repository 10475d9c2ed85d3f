//! Intake: an actix actor owning admission control and the pure `Scheduler`. Receives
//! submissions (validated, tokenized and chat-templated on the admission pool), cancels and
//! step outcomes; plans each step with the KvAllocator (its `Fit` awaited with `ctx.wait`,
//! so no other message sees the scheduler half-updated) and sends it on a crossbeam channel:
//! to the Drafter when speculating, else straight to the Verifier. One step is in flight at
//! a time.

use std::collections::VecDeque;
use std::sync::Arc;

use actix::{Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, ContextFutureSpawner, WrapFuture};
use metrics::{counter, gauge};
use tokio::sync::oneshot;

use super::admission::{Admission, Pool};
use super::error::{DownReason, KvError};
use super::kv::KvAllocator;
use super::mailbox::{MailboxSender, TrySendError};
use super::messages::{Apply, End, EndReason, Event, Register, StepDone, StepTokens, Submit, VerifyMsg};
use super::metrics as m;
use super::streamer::Streamer;
use super::{Health, Running};
use crate::core::kv_manager::KvStats;
use crate::core::lengths::Lengths;
use crate::core::scheduler::{Fit, QueueFull, RowOutcome, Scheduler, StepTiming};
use crate::model::Tokenizer;
use crate::request::{RequestError, RequestId};

mod handlers;

/// What Intake checks requests against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub vocab: usize,
    /// The context and the KV pool (`core::lengths` holds every length rule).
    pub lengths: Lengths,
    /// What the KV pool is, for `RuntimeStats`.
    pub kv_cache: super::KvCacheInfo,
}

/// The actors and the thread Intake sends to.
pub struct Peers {
    pub kv: Addr<KvAllocator>,
    pub streamer: Addr<Streamer>,
    /// Where plans go: the Drafter's thread, or the Verifier's.
    pub plans: MailboxSender<VerifyMsg>,
}

pub struct Intake {
    sched: Scheduler,
    /// Validation and tokenization, off this thread.
    admission: Pool,
    /// Submissions waiting for a place on the admission pool (at most `max_waiting`).
    held: VecDeque<Submit>,
    peers: Peers,
    /// The draft model's KV pool as the Drafter last reported it.
    draft_pool: Option<KvStats>,
    kv_cache: super::KvCacheInfo,
    /// Set when the model side cannot serve any more.
    health: Arc<Health>,
    in_flight: Option<Vec<RequestId>>,
    /// The last step's tokens and finishes, passed to the Streamer once the next step is
    /// on its way (the GPU computes while the events go out).
    to_stream: Vec<RowOutcome>,
    steps: u64,
    /// Set by `Shutdown`: whom to tell once stopped.
    closing: Option<Vec<oneshot::Sender<()>>>,
    /// Every `RuntimeHandle` is gone: no request can come any more.
    handles_gone: bool,
    _running: Running,
}

impl Intake {
    pub fn new(
        sched: Scheduler,
        tokenizer: Option<Arc<Tokenizer>>,
        limits: Limits,
        peers: Peers,
        health: Arc<Health>,
        running: Running,
    ) -> Self {
        // As many admissions under way as requests may wait: the queue's own bound.
        let kv_cache = limits.kv_cache;
        let admission = Pool::new(tokenizer, limits, sched.config().max_waiting);
        Intake {
            kv_cache,
            sched,
            admission,
            held: VecDeque::new(),
            peers,
            draft_pool: None,
            health,
            in_flight: None,
            to_stream: vec![],
            steps: 0,
            closing: None,
            handles_gone: false,
            _running: running,
        }
    }

    /// A new request: refused at once, or admitted (token ids at once; text and chat on the
    /// admission pool, whose `Admitted` comes back as a message).
    fn submit(&mut self, s: Submit, ctx: &mut Context<Self>) {
        if self.closing.is_some() || self.handles_gone {
            return refuse(&s, RequestError::ShuttingDown);
        }
        if let Some(reason) = self.health.down() {
            return refuse(&s, RequestError::Unavailable(reason));
        }
        if !self.admission.has_room() {
            let max_waiting = self.sched.config().max_waiting;
            if self.held.len() >= max_waiting {
                return refuse(&s, RequestError::Overloaded(max_waiting));
            }
            return self.held.push_back(s);
        }
        if let Some((s, result)) = self.admission.start(s, ctx.address()) {
            self.admitted(s, result);
        }
    }

    /// An admission finished: a held submission takes its place on the pool.
    fn admission_finished(&mut self, ctx: &mut Context<Self>) {
        self.admission.finished();
        while self.admission.has_room() {
            let Some(s) = self.held.pop_front() else { break };
            self.submit(s, ctx);
        }
    }

    /// A request whose prompt is tokenized: it joins the waiting queue, or is refused.
    fn admitted(&mut self, s: Submit, result: Admission) {
        let (prompt, params) = match result {
            Ok(x) => x,
            Err(e) => return refuse(&s, e),
        };
        if let Some(reason) = self.health.down() {
            return refuse(&s, RequestError::Unavailable(reason));
        }
        let max_waiting = self.sched.config().max_waiting;
        if self.sched.num_waiting() >= max_waiting {
            return refuse(&s, RequestError::Overloaded(max_waiting));
        }
        tracing::debug!(parent: &s.span, prompt_tokens = prompt.len(), "admitted");
        self.peers.streamer.do_send(Register {
            id: s.id,
            events: s.events,
            prompt_tokens: prompt.len(),
            stop: s.req.stop,
            arrived: s.arrived,
            span: s.span,
        });
        if let Err(QueueFull(n)) = self.sched.add(s.id, prompt, params) {
            self.peers.streamer.do_send(End { id: s.id, why: EndReason::Failed(RequestError::Overloaded(n)) });
        }
    }

    /// Ends a request the model side did not finish (cancelled, failed).
    fn end(&mut self, id: RequestId, why: EndReason) {
        if self.sched.abort(id) {
            self.peers.streamer.do_send(End { id, why });
        }
    }

    fn abort(&mut self, id: RequestId) {
        self.sched.abort(id);
    }

    /// Fails every request still known (the model side died, or the drain time is over).
    fn fail_all(&mut self, e: RequestError) {
        for id in self.sched.ids() {
            self.end(id, EndReason::Failed(e.clone()));
        }
    }

    /// Marks the runtime down (the first reason stays); its text, for the requests.
    fn mark_down(&self, reason: DownReason) -> String {
        if self.health.set_down(reason) {
            tracing::error!(reason = %self.health.down().unwrap_or_default(), "the runtime cannot serve any more");
            gauge!(m::HEALTHY).set(0.0);
        }
        self.health.down().unwrap_or_default()
    }

    /// The model side cannot serve any more: every request fails, later ones are refused,
    /// and the handles' `health()` (the server's `/health`) says why.
    fn go_down(&mut self, reason: DownReason) {
        let text = self.mark_down(reason);
        self.in_flight = None;
        self.fail_all(RequestError::Unavailable(text));
    }

    fn set_draft_pool(&mut self, usage: Option<KvStats>) {
        self.draft_pool = usage;
    }

    fn close(&mut self, done: Option<oneshot::Sender<()>>) {
        self.closing.get_or_insert_with(Vec::new).extend(done);
    }

    fn handles_gone(&mut self) {
        self.handles_gone = true;
    }

    /// The Verifier's thread ended: a step in flight will never come back.
    fn executor_stopped(&mut self) {
        if self.in_flight.is_some() || !self.sched.is_idle() {
            self.go_down(DownReason::ExecutorStopped);
        }
    }

    fn step_done(&mut self, done: StepDone) {
        let rows = self.in_flight.take().unwrap_or_default();
        match done.result {
            Ok(outcomes) => {
                if done.decode_only {
                    self.sched.record_step(StepTiming {
                        tokens: done.tokens,
                        seconds: done.seconds,
                        drafted: done.drafted,
                        draft_seconds: done.draft_seconds,
                        rows: outcomes.len(),
                        delivered: outcomes.iter().map(|o| o.new_tokens.len()).sum(),
                    });
                }
                self.sched.update(&outcomes);
                let said = outcomes.into_iter().filter(|o| !o.new_tokens.is_empty() || o.finish.is_some());
                self.to_stream.extend(said);
            }
            Err(failure) => {
                let kind = if failure.panicked() { "panic" } else { "error" };
                counter!(m::STEP_FAILURES, m::KIND_LABEL => kind).increment(1);
                // Down before the step's requests hear of it: their callers see it at once.
                let down = failure.fatal.map(|reason| self.mark_down(reason));
                // Only this step's requests fail; their blocks are released at the next step.
                let message = failure.error.to_string();
                tracing::warn!(step = done.step, error = %message, "a step failed");
                for id in rows {
                    self.end(id, EndReason::Failed(RequestError::StepFailed(message.clone())));
                }
                if let Some(text) = down {
                    self.fail_all(RequestError::Unavailable(text));
                }
            }
        }
    }

    /// Plans and sends the next step when none is in flight: the KvAllocator's answer is
    /// awaited with `ctx.wait`, so no other message is handled in between.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight.is_some() || (self.sched.is_idle() && !self.sched.has_kv_work()) {
            self.stream();
            return self.stop_if_done(ctx);
        }
        let proposal = self.sched.propose();
        self.peers
            .kv
            .send(Apply(proposal))
            .into_actor(self)
            .map(|answer, act, ctx| {
                match answer {
                    Ok(Ok(fit)) => act.send_plan(fit),
                    Ok(Err(KvError::Restarted(why))) => {
                        // Every block table is gone: so is every request.
                        let e = RequestError::Internal(format!("the KV allocator failed: {why}"));
                        act.fail_all(e);
                        act.pump(ctx);
                    }
                    Err(_) => act.go_down(DownReason::KvAllocatorStopped),
                }
                act.stream();
                act.stop_if_done(ctx);
            })
            .wait(ctx);
    }

    /// Turns the KV side's answer into the step to run and sends it.
    fn send_plan(&mut self, fit: Fit) {
        let plan = self.sched.plan(fit);
        gauge!(m::REQUESTS_RUNNING).set(self.sched.num_running() as f64);
        gauge!(m::REQUESTS_WAITING).set(self.sched.num_waiting() as f64);
        // Down, the blocks of the failed requests came back above and nothing runs any more.
        if (plan.rows.is_empty() && plan.finished.is_empty()) || self.health.down().is_some() {
            return;
        }
        self.steps += 1;
        self.in_flight = Some(plan.rows.iter().map(|r| r.id).collect());
        // One plan in flight: the channel (of two) never fills.
        match self.peers.plans.try_send(plan) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.go_down(DownReason::ExecutorStopped),
        }
    }

    /// Passes the last step's tokens to the Streamer (one message per step, like `StepDone`).
    fn stream(&mut self) {
        if !self.to_stream.is_empty() {
            self.peers.streamer.do_send(StepTokens(std::mem::take(&mut self.to_stream)));
        }
    }

    /// Stops once shut down (or every handle gone) and nothing is left to do.
    fn stop_if_done(&mut self, ctx: &mut Context<Self>) {
        let quiet =
            self.in_flight.is_none() && self.sched.is_idle() && self.admission.under_way() == 0 && self.held.is_empty();
        if quiet && (self.closing.is_some() || self.handles_gone) {
            ctx.stop();
        }
    }

    fn stats(&self) -> super::RuntimeStats {
        super::RuntimeStats {
            running: self.sched.num_running(),
            waiting: self.sched.num_waiting(),
            preemptions: self.sched.num_preemptions(),
            step_cost: self.sched.step_cost(),
            steps: self.steps,
            kv: super::KvPoolStats { target: KvStats::default(), draft: self.draft_pool },
            kv_cache: self.kv_cache,
        }
    }

    fn kv(&self) -> Addr<KvAllocator> {
        self.peers.kv.clone()
    }

    /// After `drain`, requests still running fail.
    fn drain_for(&mut self, drain: std::time::Duration, ctx: &mut Context<Self>) {
        ctx.run_later(drain, |act, ctx| {
            act.fail_all(RequestError::ShuttingDown);
            act.pump(ctx);
        });
    }
}

impl Actor for Intake {
    type Context = Context<Self>;

    /// Refuses what is still held, and says the runtime is stopped.
    fn stopped(&mut self, _: &mut Context<Self>) {
        for s in self.held.drain(..) {
            refuse(&s, RequestError::ShuttingDown);
        }
        for done in self.closing.take().unwrap_or_default() {
            let _ = done.send(());
        }
    }
}

pub(super) fn refuse(s: &Submit, e: RequestError) {
    tracing::debug!(parent: &s.span, error = %e, "refused");
    counter!(m::REQUESTS_FAILED, m::REASON_LABEL => e.code()).increment(1);
    let _ = s.events.try_send(Event::Error(e));
}
