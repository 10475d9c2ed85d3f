//! Streamer: owns each request's incremental detokenizer, stop-string matcher and
//! subscriber. Receives tokens (from the Verifier) and ends (from Intake); sends events to
//! the caller, and tells Intake when a stop string or a vanished caller ends a request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use metrics::{counter, histogram};
use tokio::sync::mpsc;

use super::messages::{Control, EndReason, Event, StreamMsg};
use super::metrics as m;
use crate::core::detokenizer::{Detokenizer, StopCheck, StopMatcher};
use crate::core::scheduler::RowOutcome;
use crate::model::Tokenizer;
use crate::request::{FinishReason, RequestId, Usage};
use crate::spec::SpecStats;

struct Subscriber {
    events: mpsc::Sender<Event>,
    detok: Detokenizer,
    stops: StopMatcher,
    usage: Usage,
    arrived: Instant,
    last: Option<Instant>,
    first: Option<Instant>,
    speculative: Option<SpecStats>,
}

pub struct Streamer {
    tokenizer: Option<Arc<Tokenizer>>,
    subs: HashMap<RequestId, Subscriber>,
    intake: mpsc::Sender<Control>,
    /// Each request's speculation statistics start from this (None: no speculation).
    speculative: Option<SpecStats>,
}

impl Streamer {
    pub fn new(
        tokenizer: Option<Arc<Tokenizer>>,
        intake: mpsc::Sender<Control>,
        speculative: Option<SpecStats>,
    ) -> Self {
        Streamer { tokenizer, subs: HashMap::new(), intake, speculative }
    }

    pub fn handle(&mut self, msg: StreamMsg) {
        match msg {
            StreamMsg::Register { id, events, prompt_tokens, stop, arrived } => {
                let sub = Subscriber {
                    events,
                    detok: Detokenizer::new(),
                    stops: StopMatcher::new(stop),
                    usage: Usage { prompt_tokens, completion_tokens: 0 },
                    arrived,
                    last: None,
                    first: None,
                    speculative: self.speculative.clone(),
                };
                self.subs.insert(id, sub);
            }
            StreamMsg::Step(rows) => rows.into_iter().for_each(|o| self.row(o)),
            StreamMsg::End { id, why } => {
                if let Some(sub) = self.subs.remove(&id) {
                    let ev = match why {
                        EndReason::Cancelled => Event::Done {
                            finish: FinishReason::Cancelled,
                            usage: sub.usage,
                            speculative: sub.speculative,
                        },
                        EndReason::Failed(e) => {
                            counter!(m::REQUESTS_FAILED, m::REASON_LABEL => e.code()).increment(1);
                            Event::Error(e)
                        }
                    };
                    let _ = sub.events.try_send(ev);
                }
            }
        }
    }

    fn row(&mut self, o: RowOutcome) {
        let Some(sub) = self.subs.get_mut(&o.id) else { return }; // ended already
        let now = Instant::now();
        let mut finish = o.finish;
        let mut events = vec![];
        if let Some(s) = sub.speculative.as_mut() {
            s.record(o.drafted, o.accepted);
        }
        for &t in &o.new_tokens {
            sub.usage.completion_tokens += 1;
            let delta = match &self.tokenizer {
                Some(tok) => sub.detok.push(&[t], |ids| tok.decode(ids)),
                None => String::new(),
            };
            match sub.stops.push(&delta) {
                StopCheck::Stop(text) => {
                    events.push(Event::Token { ids: vec![t], text });
                    finish = Some(FinishReason::Stop);
                    break;
                }
                StopCheck::Continue(text) => events.push(Event::Token { ids: vec![t], text }),
            }
        }
        if !o.new_tokens.is_empty() {
            if sub.first.is_none() {
                sub.first = Some(now);
                histogram!(m::TIME_TO_FIRST_TOKEN).record((now - sub.arrived).as_secs_f64());
            }
            if let Some(last) = sub.last {
                histogram!(m::INTER_TOKEN_LATENCY).record((now - last).as_secs_f64());
            }
            sub.last = Some(now);
        }
        if let Some(reason) = finish {
            if reason == FinishReason::Length {
                // As the single-request engine does: held-back text is released unless the
                // request stopped (end of sequence or a stop string).
                let rest = sub.stops.flush();
                if !rest.is_empty() {
                    events.push(Event::Token { ids: vec![], text: rest });
                }
            }
            events.push(Event::Done { finish: reason, usage: sub.usage, speculative: sub.speculative.clone() });
        }
        let mut gone = false;
        for ev in events {
            if sub.events.try_send(ev).is_err() {
                gone = true; // the caller dropped its stream (or stopped reading)
                break;
            }
        }
        if gone || finish.is_some() {
            let sub = self.subs.remove(&o.id).expect("present");
            if let (Some(_), false) = (finish, gone) {
                record_done(&sub, now);
            }
            // The model side finished it already unless a stop string or the caller ended it.
            let model_finished = o.finish.is_some() && !gone;
            if !model_finished {
                let msg = if gone { Control::Cancel(o.id) } else { Control::Stopped(o.id) };
                // The control lane is sized so that this never fills; if Intake is gone the
                // runtime is shutting down and the request with it.
                let _ = self.intake.try_send(msg);
            }
        }
    }

    /// Serves until Intake and the Verifier are gone; then fails whatever is left.
    pub async fn run(mut self, mut rx: mpsc::Receiver<StreamMsg>) {
        while let Some(msg) = rx.recv().await {
            self.handle(msg);
        }
        for (_, sub) in self.subs.drain() {
            let _ = sub.events.try_send(Event::Error(crate::request::RequestError::ShuttingDown));
        }
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
