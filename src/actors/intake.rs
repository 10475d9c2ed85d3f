//! Intake: owns admission control and the pure `Scheduler`. Receives submissions (validates,
//! tokenizes, applies the chat template), control messages and step outcomes; plans each
//! step with the KvAllocator and sends it on: to the Drafter when speculating, else straight
//! to the Verifier. One step is in flight at a time.

use std::sync::{Arc, Mutex};

use metrics::{counter, gauge};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::admission::{Admission, Admitted, Pool};
use super::messages::{
    Control, EndReason, Event, KvMsg, KvPoolStats, RuntimeStats, StepDone, StreamMsg, Submit, VerifyMsg,
};
use super::metrics as m;
use super::Health;
use crate::core::kv_manager::KvStats;
use crate::core::lengths::Lengths;
use crate::core::scheduler::{QueueFull, Scheduler};
use crate::model::Tokenizer;
use crate::request::{RequestError, RequestId};

/// What Intake checks requests against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub vocab: usize,
    /// The context and the KV pool (`core::lengths` holds every length rule).
    pub lengths: Lengths,
}

/// The actors Intake sends to.
pub struct Peers {
    pub kv: mpsc::Sender<KvMsg>,
    /// Where plans go: the Drafter, or the Verifier.
    pub plans: mpsc::Sender<VerifyMsg>,
    pub streamer: mpsc::Sender<StreamMsg>,
}

pub struct Intake {
    pub sched: Scheduler,
    /// Validation and tokenization, off this thread.
    admission: Pool,
    pub kv: mpsc::Sender<KvMsg>,
    /// Where plans go: the Drafter, or the Verifier.
    pub plans: mpsc::Sender<VerifyMsg>,
    pub streamer: mpsc::Sender<StreamMsg>,
    /// The draft model's KV pool as the Drafter last saw it.
    pub draft_pool: Arc<Mutex<Option<KvStats>>>,
    /// Set when the model side cannot serve any more.
    health: Arc<Health>,
    in_flight: Option<Vec<RequestId>>,
    steps: u64,
    /// Set by `Shutdown`: the drain deadline (cleared once it has passed) and whom to tell.
    closing: Option<(Option<Instant>, oneshot::Sender<()>)>,
}

impl Intake {
    /// Intake, and the receiver of its admission pool's answers (for `run`).
    pub fn new(
        sched: Scheduler,
        tokenizer: Option<Arc<Tokenizer>>,
        limits: Limits,
        peers: Peers,
        draft_pool: Arc<Mutex<Option<KvStats>>>,
        health: Arc<Health>,
    ) -> (Self, mpsc::Receiver<Admitted>) {
        let Peers { kv, plans, streamer } = peers;
        // As many admissions under way as requests may wait: the queue's own bound.
        let (admission, admitted) = Pool::new(tokenizer, limits, sched.config().max_waiting);
        let intake = Intake {
            sched,
            admission,
            kv,
            plans,
            streamer,
            draft_pool,
            health,
            in_flight: None,
            steps: 0,
            closing: None,
        };
        (intake, admitted)
    }

    /// A new request: refused at once, or admitted (token ids at once; text and chat on the
    /// admission pool, whose answer comes back through `admitted`).
    async fn submit(&mut self, s: Submit) {
        if self.closing.is_some() {
            return refuse(&s, RequestError::ShuttingDown);
        }
        if let Some(reason) = self.health.down() {
            return refuse(&s, RequestError::Unavailable(reason));
        }
        if let Some((s, result)) = self.admission.start(s) {
            self.admitted(s, result).await;
        }
    }

    /// A request whose prompt is tokenized: it joins the waiting queue, or is refused.
    async fn admitted(&mut self, s: Submit, result: Admission) {
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
        let reg = StreamMsg::Register {
            id: s.id,
            events: s.events.clone(),
            prompt_tokens: prompt.len(),
            stop: s.req.stop.clone(),
            arrived: s.arrived,
        };
        if self.streamer.send(reg).await.is_err() {
            return refuse(&s, RequestError::Internal("the streamer is gone".into()));
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

    fn mark_down(&self, reason: &str) {
        if self.health.set_down(reason.to_string()) {
            eprintln!("specula: the runtime cannot serve any more: {reason}");
            gauge!(m::HEALTHY).set(0.0);
        }
    }

    /// The model side cannot serve any more: every request fails, later ones are refused,
    /// and the handles' `health()` (the server's `/health`) says why.
    async fn go_down(&mut self, reason: String) {
        self.mark_down(&reason);
        self.in_flight = None;
        self.fail_all(RequestError::Unavailable(reason)).await;
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
            Some(StepDone { result: Err(failure), .. }) => {
                let kind = if failure.panicked { "panic" } else { "error" };
                counter!(m::STEP_FAILURES, m::KIND_LABEL => kind).increment(1);
                // Down before the step's requests hear of it: their callers see it at once.
                if let Some(reason) = &failure.fatal {
                    self.mark_down(reason);
                }
                // Only this step's requests fail; their blocks are released at the next step.
                for id in rows {
                    self.end(id, EndReason::Failed(RequestError::StepFailed(failure.message.clone()))).await;
                }
                if let Some(reason) = failure.fatal {
                    self.go_down(reason).await;
                }
            }
            None => self.go_down("the model executor stopped".into()).await,
        }
    }

    /// Plans and sends the next step when none is in flight.
    /// An error is a reason for the runtime to go down (an actor it needs is gone).
    async fn pump(&mut self) -> Result<(), String> {
        if self.in_flight.is_some() || (self.sched.is_idle() && !self.sched.has_kv_work()) {
            return Ok(());
        }
        let proposal = self.sched.propose();
        let (tx, rx) = oneshot::channel();
        let gone = || "the KV allocator stopped".to_string();
        self.kv.send(KvMsg::Apply { proposal, reply: tx }).await.map_err(|_| gone())?;
        let fit = rx.await.map_err(|_| gone())?;
        let plan = self.sched.plan(fit);
        gauge!(m::REQUESTS_RUNNING).set(self.sched.num_running() as f64);
        gauge!(m::REQUESTS_WAITING).set(self.sched.num_waiting() as f64);
        // Down, the blocks of the failed requests came back above and nothing runs any more.
        if (plan.rows.is_empty() && plan.finished.is_empty()) || self.health.down().is_some() {
            return Ok(());
        }
        self.steps += 1;
        self.in_flight = Some(plan.rows.iter().map(|r| r.id).collect());
        self.plans.send(plan).await.map_err(|_| "the model executor stopped".to_string())
    }

    /// Serves until shut down, or until every caller handle is gone and the work is done.
    pub async fn run(
        mut self,
        mut submits: mpsc::Receiver<Submit>,
        mut admitted: mpsc::Receiver<Admitted>,
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
                Some(a) = admitted.recv(), if self.admission.under_way() > 0 => {
                    self.admission.finished();
                    self.admitted(a.submit, a.result).await;
                }
                s = submits.recv(), if submits_open && self.admission.has_room() => match s {
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
            if let Err(reason) = self.pump().await {
                self.go_down(reason).await;
            }
            let quiet = self.in_flight.is_none() && self.sched.is_idle() && self.admission.under_way() == 0;
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

fn refuse(s: &Submit, e: RequestError) {
    counter!(m::REQUESTS_FAILED, m::REASON_LABEL => e.code()).increment(1);
    let _ = s.events.try_send(Event::Error(e));
}
