//! Streamer: an actix actor owning each request's text output (incremental detokenizer,
//! stop strings) and subscriber. Receives tokens (from the Verifier) and ends (from Intake);
//! sends events to the caller, and tells Intake when a stop string or a vanished caller ends
//! a request.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use actix::{Actor, Addr, Context, Handler};
use metrics::{counter, histogram};
use tokio::sync::mpsc;

use super::intake::Intake;
use super::messages::{End, EndReason, Ended, Event, Register, StepTokens};
use super::metrics as m;
use super::verifier::panic_message;
use super::Running;
use crate::core::finish::TextOutput;
use crate::core::scheduler::RowOutcome;
use crate::model::Tokenizer;
use crate::request::{FinishReason, RequestError, RequestId, Usage};
use crate::spec::SpecStats;

struct Subscriber {
    events: mpsc::Sender<Event>,
    text: TextOutput,
    usage: Usage,
    arrived: Instant,
    last: Option<Instant>,
    first: Option<Instant>,
    speculative: Option<SpecStats>,
    span: tracing::Span,
}

pub struct Streamer {
    tokenizer: Option<Arc<Tokenizer>>,
    subs: HashMap<RequestId, Subscriber>,
    intake: Addr<Intake>,
    /// Each request's speculation statistics start from this (None: no speculation).
    speculative: Option<SpecStats>,
    _running: Running,
}

impl Streamer {
    pub fn new(
        tokenizer: Option<Arc<Tokenizer>>,
        intake: Addr<Intake>,
        speculative: Option<SpecStats>,
        running: Running,
    ) -> Self {
        Streamer { tokenizer, subs: HashMap::new(), intake, speculative, _running: running }
    }

    /// One row's tokens: events to the caller; at the end, usage and latency metrics.
    fn row(&mut self, o: RowOutcome) {
        let Some(sub) = self.subs.get_mut(&o.id) else { return }; // ended already
        let now = Instant::now();
        let (events, finish) = sub.events_for(&o, self.tokenizer.as_deref());
        if !o.new_tokens.is_empty() {
            sub.record_latency(now);
        }
        let gone = events.into_iter().any(|ev| sub.events.try_send(ev).is_err()); // stopped reading
        if !gone && finish.is_none() {
            return;
        }
        let sub = self.subs.remove(&o.id).expect("present");
        let _enter = sub.span.enter();
        match finish {
            Some(reason) if !gone => {
                tracing::debug!(?reason, tokens = sub.usage.completion_tokens, "done");
                record_done(&sub, now);
            }
            _ => tracing::debug!("the caller stopped reading"),
        }
        // The model side finished it already unless a stop string or the caller ended it.
        if o.finish.is_none() || gone {
            self.intake.do_send(Ended { id: o.id, caller_gone: gone });
        }
    }

    /// A row that panicked (a tokenizer's decode, say) fails its request alone.
    fn row_failed(&mut self, id: RequestId, why: String) {
        if let Some(sub) = self.subs.remove(&id) {
            tracing::error!(parent: &sub.span, %why, "streaming the request panicked");
            let e = RequestError::Internal(format!("streaming the request panicked: {why}"));
            counter!(m::REQUESTS_FAILED, m::REASON_LABEL => e.code()).increment(1);
            let _ = sub.events.try_send(Event::Error(e));
            self.intake.do_send(Ended { id, caller_gone: true });
        }
    }
}

impl Subscriber {
    /// The events a row's tokens make, and why the request ends if it does.
    fn events_for(&mut self, o: &RowOutcome, tokenizer: Option<&Tokenizer>) -> (Vec<Event>, Option<FinishReason>) {
        let mut finish = o.finish;
        let mut events = vec![];
        if let Some(s) = self.speculative.as_mut() {
            s.record_tree(o.drafted, o.depth, o.accepted);
        }
        let decode = tokenizer.map(|tok| move |ids: &[u32]| tok.decode(ids));
        for &t in &o.new_tokens {
            self.usage.completion_tokens += 1;
            let delta = self.text.push(t, decode);
            events.push(Event::Token { ids: vec![t], text: delta.text });
            if delta.stopped {
                finish = Some(FinishReason::Stop);
                break;
            }
        }
        if let Some(reason) = finish {
            let rest = self.text.finish(reason);
            if !rest.is_empty() {
                events.push(Event::Token { ids: vec![], text: rest });
            }
            events.push(Event::Done { finish: reason, usage: self.usage, speculative: self.speculative.clone() });
        }
        (events, finish)
    }

    fn record_latency(&mut self, now: Instant) {
        if self.first.is_none() {
            self.first = Some(now);
            histogram!(m::TIME_TO_FIRST_TOKEN).record((now - self.arrived).as_secs_f64());
        }
        if let Some(last) = self.last {
            histogram!(m::INTER_TOKEN_LATENCY).record((now - last).as_secs_f64());
        }
        self.last = Some(now);
    }
}

impl Actor for Streamer {
    type Context = Context<Self>;

    /// Intake and the Verifier are gone: whatever is left fails.
    fn stopped(&mut self, _: &mut Context<Self>) {
        for (_, sub) in self.subs.drain() {
            let _ = sub.events.try_send(Event::Error(RequestError::ShuttingDown));
        }
    }
}

impl Handler<Register> for Streamer {
    type Result = ();

    fn handle(&mut self, r: Register, _: &mut Context<Self>) {
        let sub = Subscriber {
            events: r.events,
            text: TextOutput::new(r.stop),
            usage: Usage { prompt_tokens: r.prompt_tokens, completion_tokens: 0 },
            arrived: r.arrived,
            last: None,
            first: None,
            speculative: self.speculative.clone(),
            span: r.span,
        };
        self.subs.insert(r.id, sub);
    }
}

impl Handler<StepTokens> for Streamer {
    type Result = ();

    fn handle(&mut self, StepTokens(rows): StepTokens, _: &mut Context<Self>) {
        for o in rows {
            let id = o.id;
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.row(o))) {
                self.row_failed(id, panic_message(payload.as_ref()));
            }
        }
    }
}

impl Handler<End> for Streamer {
    type Result = ();

    fn handle(&mut self, End { id, why }: End, _: &mut Context<Self>) {
        let Some(sub) = self.subs.remove(&id) else { return };
        let ev = match why {
            EndReason::Cancelled => {
                Event::Done { finish: FinishReason::Cancelled, usage: sub.usage, speculative: sub.speculative }
            }
            EndReason::Failed(e) => {
                tracing::debug!(parent: &sub.span, error = %e, "failed");
                counter!(m::REQUESTS_FAILED, m::REASON_LABEL => e.code()).increment(1);
                Event::Error(e)
            }
        };
        let _ = sub.events.try_send(ev);
    }
}

fn record_done(sub: &Subscriber, now: Instant) {
    histogram!(m::E2E_LATENCY).record((now - sub.arrived).as_secs_f64());
    let n = sub.usage.completion_tokens;
    if let (Some(first), true) = (sub.first, n > 1) {
        histogram!(m::TIME_PER_OUTPUT_TOKEN).record((now - first).as_secs_f64() / (n - 1) as f64);
    }
    counter!(m::PROMPT_TOKENS).increment(sub.usage.prompt_tokens as u64);
    counter!(m::GENERATION_TOKENS).increment(n as u64);
}
