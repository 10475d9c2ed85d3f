//! Intake: owns admission control and the pure `Scheduler`. Receives submissions (validates,
//! tokenizes, applies the chat template), control messages and step outcomes; plans each
//! step with the KvAllocator and sends it on: to the Drafter when speculating, else straight
//! to the Verifier. One step is in flight at a time.

use std::sync::{Arc, Mutex};

use metrics::{counter, gauge};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::messages::{
    Control, EndReason, Event, KvMsg, KvPoolStats, RuntimeStats, StepDone, StreamMsg, Submit, VerifyMsg,
};
use super::metrics as m;
use crate::core::kv_manager::KvStats;
use crate::core::lengths::Lengths;
use crate::core::scheduler::{QueueFull, Scheduler, SeqParams};
use crate::engine::tokenize_prompt;
use crate::model::Tokenizer;
use crate::request::{RequestError, RequestId};

/// What Intake checks requests against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub vocab: usize,
    /// The context and the KV pool (`core::lengths` holds every length rule).
    pub lengths: Lengths,
}

pub struct Intake {
    pub sched: Scheduler,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub limits: Limits,
    pub kv: mpsc::Sender<KvMsg>,
    /// Where plans go: the Drafter, or the Verifier.
    pub plans: mpsc::Sender<VerifyMsg>,
    pub streamer: mpsc::Sender<StreamMsg>,
    /// The draft model's KV pool as the Drafter last saw it.
    pub draft_pool: Arc<Mutex<Option<KvStats>>>,
    in_flight: Option<Vec<RequestId>>,
    steps: u64,
    /// Set by `Shutdown`: the drain deadline (cleared once it has passed) and whom to tell.
    closing: Option<(Option<Instant>, oneshot::Sender<()>)>,
}

impl Intake {
    pub fn new(
        sched: Scheduler,
        tokenizer: Option<Arc<Tokenizer>>,
        limits: Limits,
        kv: mpsc::Sender<KvMsg>,
        plans: mpsc::Sender<VerifyMsg>,
        streamer: mpsc::Sender<StreamMsg>,
        draft_pool: Arc<Mutex<Option<KvStats>>>,
    ) -> Self {
        Intake { sched, tokenizer, limits, kv, plans, streamer, draft_pool, in_flight: None, steps: 0, closing: None }
    }

    /// Validates and tokenizes; every refusal is a typed error.
    fn admit(&self, s: &Submit) -> Result<(Vec<u32>, Arc<SeqParams>), RequestError> {
        let req = &s.req;
        req.sampling.validate().map_err(RequestError::InvalidSampling)?;
        let l = &self.limits;
        let prompt = tokenize_prompt(self.tokenizer.as_deref(), &req.prompt, l.vocab)?;
        let limits = l.lengths.admit(prompt.len(), req.max_tokens)?;
        let params = SeqParams { sampling: req.sampling.clone(), limits, ignore_eos: req.ignore_eos };
        Ok((prompt, Arc::new(params)))
    }

    async fn submit(&mut self, s: Submit) {
        let refuse = |e: RequestError| {
            counter!(m::REQUESTS_FAILED, m::REASON_LABEL => e.code()).increment(1);
            let _ = s.events.try_send(Event::Error(e));
        };
        if self.closing.is_some() {
            return refuse(RequestError::ShuttingDown);
        }
        let (prompt, params) = match self.admit(&s) {
            Ok(x) => x,
            Err(e) => return refuse(e),
        };
        let max_waiting = self.sched.config().max_waiting;
        if self.sched.num_waiting() >= max_waiting {
            return refuse(RequestError::Overloaded(max_waiting));
        }
        let reg = StreamMsg::Register {
            id: s.id,
            events: s.events.clone(),
            prompt_tokens: prompt.len(),
            stop: s.req.stop.clone(),
            arrived: s.arrived,
        };
        if self.streamer.send(reg).await.is_err() {
            return refuse(RequestError::Internal("the streamer is gone".into()));
        }
        if let Err(QueueFull(n)) = self.sched.add(s.id, prompt, params) {
            let _ = self
                .streamer
                .send(StreamMsg::End { id: s.id, why: EndReason::Failed(RequestError::Overloaded(n)) })
                .await;
        }
    }

    async fn end(&mut self, id: RequestId, why: EndReason) {
        if self.sched.abort(id) {
            let _ = self.streamer.send(StreamMsg::End { id, why }).await;
        }
    }

    /// Fails every request still known (the model side died, or the drain time is over).
    async fn fail_all(&mut self, e: RequestError) {
        for id in self.sched.ids() {
            self.end(id, EndReason::Failed(e.clone())).await;
        }
    }

    async fn control(&mut self, c: Control, submits: &mut mpsc::Receiver<Submit>) {
        match c {
            Control::Cancel(id) => self.end(id, EndReason::Cancelled).await,
            Control::Stopped(id) => {
                self.sched.abort(id);
            }
            Control::Stats(reply) => {
                let (tx, rx) = oneshot::channel();
                let mut kv: KvPoolStats = match self.kv.send(KvMsg::Stats { reply: tx }).await {
                    Ok(()) => rx.await.unwrap_or_default(),
                    Err(_) => Default::default(),
                };
                kv.draft = self.draft_pool.lock().ok().and_then(|p| *p);
                let _ = reply.send(RuntimeStats {
                    running: self.sched.num_running(),
                    waiting: self.sched.num_waiting(),
                    preemptions: self.sched.num_preemptions(),
                    step_cost: self.sched.step_cost(),
                    steps: self.steps,
                    kv,
                });
            }
            Control::Shutdown { drain, done } => {
                // Requests submitted before the shutdown are still taken.
                while let Ok(s) = submits.try_recv() {
                    self.submit(s).await;
                }
                self.closing = Some((Some(Instant::now() + drain), done));
            }
        }
    }

    async fn step_done(&mut self, done: Option<StepDone>) {
        let rows = self.in_flight.take().unwrap_or_default();
        match done {
            Some(StepDone { result: Ok(outcomes), tokens, decode_only, seconds, drafted, draft_seconds, .. }) => {
                if decode_only {
                    self.sched.record_timing(tokens, seconds, drafted, draft_seconds);
                }
                self.sched.update(&outcomes);
            }
            Some(StepDone { result: Err(e), .. }) => {
                for id in rows {
                    self.end(id, EndReason::Failed(RequestError::Internal(format!("forward failed: {e}")))).await;
                }
            }
            None => self.fail_all(RequestError::Internal("the model executor stopped".into())).await,
        }
    }

    /// Plans and sends the next step when none is in flight.
    async fn pump(&mut self) -> Result<(), RequestError> {
        if self.in_flight.is_some() || (self.sched.is_idle() && !self.sched.has_kv_work()) {
            return Ok(());
        }
        let proposal = self.sched.propose();
        let (tx, rx) = oneshot::channel();
        let gone = || RequestError::Internal("the KV allocator is gone".into());
        self.kv.send(KvMsg::Apply { proposal, reply: tx }).await.map_err(|_| gone())?;
        let fit = rx.await.map_err(|_| gone())?;
        let plan = self.sched.plan(fit);
        gauge!(m::REQUESTS_RUNNING).set(self.sched.num_running() as f64);
        gauge!(m::REQUESTS_WAITING).set(self.sched.num_waiting() as f64);
        if plan.rows.is_empty() && plan.finished.is_empty() {
            return Ok(());
        }
        self.steps += 1;
        self.in_flight = Some(plan.rows.iter().map(|r| r.id).collect());
        self.plans.send(plan).await.map_err(|_| RequestError::Internal("the model executor stopped".into()))
    }

    /// Serves until shut down, or until every caller handle is gone and the work is done.
    pub async fn run(
        mut self,
        mut submits: mpsc::Receiver<Submit>,
        mut control: mpsc::Receiver<Control>,
        mut done: mpsc::Receiver<StepDone>,
    ) {
        let (mut submits_open, mut control_open) = (true, true);
        loop {
            let deadline = self.closing.as_ref().and_then(|c| c.0);
            tokio::select! {
                biased;
                d = done.recv(), if self.in_flight.is_some() => self.step_done(d).await,
                c = control.recv(), if control_open => match c {
                    Some(c) => self.control(c, &mut submits).await,
                    None => control_open = false,
                },
                s = submits.recv(), if submits_open => match s {
                    Some(s) => self.submit(s).await,
                    None => submits_open = false,
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.fail_all(RequestError::ShuttingDown).await;
                    if let Some(c) = self.closing.as_mut() {
                        c.0 = None;
                    }
                }
                else => break,
            }
            if let Err(e) = self.pump().await {
                self.in_flight = None;
                self.fail_all(e).await;
            }
            let quiet = self.in_flight.is_none() && self.sched.is_idle();
            if quiet && (self.closing.is_some() || !submits_open) {
                break;
            }
        }
        // Refuse what is still queued in the mailbox, then say we are done.
        submits.close();
        while let Ok(s) = submits.try_recv() {
            let _ = s.events.try_send(Event::Error(RequestError::ShuttingDown));
        }
        if let Some((_, done)) = self.closing.take() {
            let _ = done.send(());
        }
    }
}
