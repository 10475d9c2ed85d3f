//! The WebSocket protocol at `/v1/ws`: JSON text frames, several requests multiplexed on
//! one connection by a client-chosen id. See `docs/websocket.md` for the protocol with
//! examples.
//!
//! One task per connection owns the connection's event streams, keyed by id. A `cancel`
//! cancels that request (its stream then ends with a `done` whose finish reason is
//! `cancelled`); a closed connection drops every stream, and the runtime cancels a request
//! whose stream is dropped and frees its KV blocks. When the server stops, a connection
//! takes no new requests, forwards its requests' last frames, and closes (1001).

pub mod guard;
pub mod protocol;

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, ProtocolError, Session};
use futures::StreamExt;
use tokio_stream::StreamMap;

use super::body::payload_of;
use super::error::ServerError;
use super::AppState;
use crate::actors::{Event, EventStream};
use crate::request::RequestError;
use guard::{limit_error, FrameGuard, FrameLimitError};
use protocol::{error_frame, event_frame, parse_client_frame, ClientFrame, FrameError, FrameId};

/// `GET /v1/ws`: upgrades and hands the connection to its own task.
pub async fn route(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let limits = &state.limits;
    // The guard sees the bytes before actix's codec does (see `guard`).
    let guarded = FrameGuard::new(body.into_inner(), limits.ws_max_frame_bytes, limits.body_timeout);
    let mut payload = payload_of(guarded);
    let body = web::Payload::from_request(&req, &mut payload).await?;
    let (response, session, messages) = actix_ws::handle(&req, body)?;
    let messages = messages
        .max_frame_size(limits.ws_max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(limits.ws_max_frame_bytes);
    let connection = Connection {
        state: state.into_inner(),
        session,
        streams: StreamMap::new(),
        ids: HashMap::new(),
        stopping: false,
    };
    actix_web::rt::spawn(connection.run(messages));
    Ok(response)
}

struct Connection {
    state: Arc<AppState>,
    session: Session,
    /// In-flight requests' event streams, by id key; dropping one cancels its request.
    streams: StreamMap<String, EventStream>,
    ids: HashMap<String, FrameId>,
    /// The server is stopping: no new requests; close once the last one has ended.
    stopping: bool,
}

/// What the connection does after handling one thing.
enum Next {
    Continue,
    /// Close with this reason (`None`: the client is gone or closed first).
    Close(Option<CloseReason>),
}

impl Connection {
    async fn run(mut self, mut messages: AggregatedMessageStream) {
        let stop = self.state.stopping.clone();
        let close = loop {
            let next = tokio::select! {
                msg = messages.next() => match msg {
                    None => Next::Close(None),
                    Some(msg) => self.on_message(msg).await,
                },
                Some((key, event)) = self.streams.next(), if !self.streams.is_empty() => self.on_event(key, event).await,
                _ = stop.cancelled(), if !self.stopping => {
                    self.stopping = true;
                    Next::Continue
                }
            };
            match next {
                Next::Close(reason) => break reason,
                Next::Continue if self.stopping && self.streams.is_empty() => {
                    break Some(close_reason(CloseCode::Away, "the server is shutting down"))
                }
                Next::Continue => {}
            }
        };
        // Dropping `self` afterwards cancels whatever requests the connection still had.
        let _ = self.session.close(close).await;
    }

    async fn on_message(&mut self, msg: Result<AggregatedMessage, ProtocolError>) -> Next {
        let sent = match msg {
            Ok(AggregatedMessage::Text(text)) => self.on_text(&text).await,
            Ok(AggregatedMessage::Binary(_)) => {
                let e = ServerError::InvalidRequest("send JSON in text frames, not binary".into());
                self.send(error_frame(None, &e)).await
            }
            Ok(AggregatedMessage::Ping(bytes)) => self.session.pong(&bytes).await.is_ok(),
            Ok(AggregatedMessage::Pong(_)) => true,
            Ok(AggregatedMessage::Close(reason)) => return Next::Close(reason),
            Err(e) => return Next::Close(Some(violation_reason(&e))),
        };
        if sent {
            Next::Continue
        } else {
            Next::Close(None)
        }
    }

    /// Acts on one client frame; false when the connection is closed.
    async fn on_text(&mut self, text: &str) -> bool {
        match parse_client_frame(text) {
            Err(FrameError { id, error }) => self.send(error_frame(id.as_ref(), &error)).await,
            Ok(ClientFrame::Generate { id, request }) => {
                let key = id.key();
                let refusal = if self.stopping {
                    Some(ServerError::Request(RequestError::ShuttingDown))
                } else if self.ids.contains_key(&key) {
                    Some(ServerError::DuplicateId(key.clone()))
                } else if self.streams.len() >= self.state.limits.ws_max_in_flight {
                    Some(ServerError::TooManyInFlight(self.state.limits.ws_max_in_flight))
                } else {
                    None
                };
                if let Some(error) = refusal {
                    return self.send(error_frame(Some(id.value()), &error)).await;
                }
                self.streams.insert(key.clone(), self.state.handle.generate(request));
                self.ids.insert(key, id);
                true
            }
            Ok(ClientFrame::Cancel { id }) => {
                let key = id.key();
                // The stream stays: it ends with the runtime's `done` (finish_reason
                // `cancelled`, with the usage so far), forwarded like any other.
                if let Some((_, stream)) = self.streams.iter_mut().find(|(k, _)| *k == key) {
                    stream.cancel();
                    return true;
                }
                self.send(error_frame(Some(id.value()), &ServerError::UnknownId(key))).await
            }
        }
    }

    async fn on_event(&mut self, key: String, event: Event) -> Next {
        let Some(id) = self.ids.get(&key) else { return Next::Continue };
        let frame = event_frame(id, &event);
        if matches!(event, Event::Done { .. } | Event::Error(_)) {
            self.streams.remove(&key);
            self.ids.remove(&key);
        }
        if self.send(frame).await {
            Next::Continue
        } else {
            Next::Close(None)
        }
    }

    /// Sends a text frame; false when the client is gone.
    async fn send(&mut self, frame: String) -> bool {
        self.session.text(frame).await.is_ok()
    }
}

fn close_reason(code: CloseCode, why: impl Into<String>) -> CloseReason {
    CloseReason { code, description: Some(why.into()) }
}

/// How a protocol violation closes the connection: 1009 for a frame over the limit, 1008
/// for a message that stalled, 1002 for the rest (a text frame that is not UTF-8, ...).
fn violation_reason(e: &ProtocolError) -> CloseReason {
    match limit_error(e) {
        Some(too_big @ FrameLimitError::TooBig { .. }) => close_reason(CloseCode::Size, too_big.to_string()),
        Some(stalled @ FrameLimitError::Stalled(_)) => close_reason(CloseCode::Policy, stalled.to_string()),
        None if matches!(e, ProtocolError::Overflow) => close_reason(CloseCode::Size, "message too big"),
        None => close_reason(CloseCode::Protocol, e.to_string()),
    }
}
