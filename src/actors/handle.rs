//! The in-process API: a cloneable `RuntimeHandle` (submit, stats, health, shutdown), each
//! request's `EventStream`, and `collect` to read one to its end.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::dev::SendError;
use actix::Addr;
use futures::Stream;
use tokio::sync::{mpsc, oneshot};

use super::config::RuntimeConfig;
use super::error::DownReason;
use super::intake::Intake;
use super::messages::{Cancel, Event, GetStats, HandlesGone, RuntimeStats, Shutdown, Submit};
use super::metrics as m;
use super::ModelInfo;
use crate::engine::{Completion, Timings};
use crate::request::{FinishReason, GenerateRequest, RequestError, RequestId, Usage};

/// Whether the runtime can serve: set by Intake when its model executor failed beyond
/// recovery (see `verifier::MAX_FAILED_STEPS_IN_A_ROW`), read by every handle (`/health`).
#[derive(Debug, Default)]
pub struct Health {
    down: Mutex<Option<DownReason>>,
}

impl Health {
    /// Why the runtime cannot serve, if it cannot.
    pub fn down(&self) -> Option<String> {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        down.as_ref().map(ToString::to_string)
    }

    /// Marks the runtime down (the first reason stays); whether it was up until now.
    pub(super) fn set_down(&self, reason: DownReason) -> bool {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let was_up = down.is_none();
        down.get_or_insert(reason);
        was_up
    }
}

pub(super) struct Inner {
    pub intake: Addr<Intake>,
    pub next_id: AtomicU64,
    pub config: RuntimeConfig,
    pub info: ModelInfo,
    pub health: Arc<Health>,
    /// The actors' thread and the GPU workers' threads, joined by `shutdown`.
    pub threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    fn take_threads(&self) -> Vec<JoinHandle<()>> {
        self.threads.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default()
    }
}

impl Drop for Inner {
    /// The last handle is gone: Intake finishes what runs, then every actor stops.
    fn drop(&mut self) {
        self.intake.do_send(HandlesGone);
    }
}

/// A cloneable handle to a running runtime. When the last handle is dropped the runtime
/// finishes the requests in flight and stops.
#[derive(Clone)]
pub struct RuntimeHandle {
    pub(super) inner: Arc<Inner>,
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
        let span = tracing::info_span!("request", id = id.0);
        let submit = Submit { id, req, events: tx.clone(), arrived: Instant::now(), span };
        let refused = match self.inner.intake.try_send(submit) {
            Ok(()) => None,
            Err(SendError::Full(_)) => Some(RequestError::Overloaded(self.inner.config.max_waiting)),
            Err(SendError::Closed(_)) => Some(RequestError::ShuttingDown),
        };
        if let Some(e) = refused {
            ::metrics::counter!(m::REQUESTS_FAILED, m::REASON_LABEL => e.code()).increment(1);
            let _ = tx.try_send(Event::Error(e));
        }
        EventStream { id, rx, intake: self.inner.intake.clone(), ended: false }
    }

    /// A snapshot of the queues and KV pools.
    pub async fn stats(&self) -> Result<RuntimeStats, RequestError> {
        self.inner.intake.send(GetStats).await.map_err(|_| RequestError::ShuttingDown)
    }

    /// Stops taking requests, lets those in flight finish for up to `drain`, fails the rest
    /// with `ShuttingDown`, and returns once every actor has stopped.
    pub async fn shutdown(&self, drain: Duration) {
        let (tx, rx) = oneshot::channel();
        self.inner.intake.do_send(Shutdown { drain, done: tx });
        let _ = rx.await; // answered, or dropped with a runtime already gone
        let threads = self.inner.take_threads();
        let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
    }

    /// `shutdown` for callers outside any async runtime.
    pub fn shutdown_blocking(&self, drain: Duration) {
        let (tx, rx) = oneshot::channel();
        self.inner.intake.do_send(Shutdown { drain, done: tx });
        let _ = rx.blocking_recv();
        for t in self.inner.take_threads() {
            let _ = t.join();
        }
    }
}

/// A request's events. Ends after `Done` or `Error`; a runtime that goes away mid-request
/// yields `Error(ShuttingDown)` rather than silence.
pub struct EventStream {
    id: RequestId,
    rx: mpsc::Receiver<Event>,
    intake: Addr<Intake>,
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
            self.intake.do_send(Cancel(self.id));
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
            // `do_send` never waits for room; the Streamer also notices a closed stream at the
            // request's next token.
            self.intake.do_send(Cancel(self.id));
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
