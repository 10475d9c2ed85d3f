//! The WebSocket protocol at `/v1/ws`: JSON text frames, several requests multiplexed on
//! one connection by a client-chosen id. See `docs/websocket.md` for the protocol with
//! examples.
//!
//! One task per connection owns the connection's event streams, keyed by id. A `cancel`
//! cancels that request (its stream then ends with a `done` whose finish reason is
//! `cancelled`); a closed connection drops every stream, and the runtime cancels a request
//! whose stream is dropped and frees its KV blocks.

use std::collections::HashMap;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, Session};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_stream::StreamMap;

use super::error::{from_serde, ServerError};
use super::params::{SamplingFields, StopField, WireMessage};
use super::AppState;
use crate::actors::{Event, EventStream};
use crate::request::{FinishReason, GenerateRequest, Prompt, Usage};
use crate::spec::SpecStats;

/// Largest frame (and message, continuations aggregated) a client may send.
pub const MAX_FRAME_BYTES: usize = 4 << 20;

/// A parsed client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    Generate { id: FrameId, request: GenerateRequest },
    Cancel { id: FrameId },
}

/// The client's id for a request: a JSON string or integer, echoed back exactly as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameId(Value);

impl FrameId {
    fn parse(v: &Value) -> Result<FrameId, ServerError> {
        match v {
            Value::String(_) => Ok(FrameId(v.clone())),
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(FrameId(v.clone())),
            other => Err(ServerError::InvalidRequest(format!("`id` must be a string or an integer, got {other}"))),
        }
    }

    /// The key the connection files the request under (the id's JSON text).
    fn key(&self) -> String {
        self.0.to_string()
    }
}

/// A frame the server could not act on, with the id it named if it named one.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    pub id: Option<Value>,
    pub error: ServerError,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateFrame {
    #[serde(rename = "type")]
    _kind: String,
    id: Value,
    prompt: Option<String>,
    messages: Option<Vec<WireMessage>>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<StopField>,
    ignore_eos: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelFrame {
    #[serde(rename = "type")]
    _kind: String,
    id: Value,
}

/// Parses and checks one text frame.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|e| FrameError { id: None, error: from_serde(e) })?;
    let Value::Object(map) = &value else {
        let error = ServerError::InvalidRequest("a frame must be a JSON object".into());
        return Err(FrameError { id: None, error });
    };
    // Errors carry the id from here on, whenever the frame has a usable one.
    let id = map.get("id").and_then(|v| FrameId::parse(v).ok()).map(|f| f.0);
    let fail = |error: ServerError| FrameError { id: id.clone(), error };
    let kind = match map.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(other) => return Err(fail(ServerError::InvalidRequest(format!("`type` must be a string, got {other}")))),
        None => return Err(fail(ServerError::InvalidRequest("missing field `type`".into()))),
    };
    match kind {
        "generate" => {
            let f: GenerateFrame = serde_json::from_value(value.clone()).map_err(|e| fail(from_serde(e)))?;
            let id = FrameId::parse(&f.id).map_err(fail)?;
            let prompt = match (f.prompt, f.messages) {
                (Some(text), None) => Prompt::Text(text),
                (None, Some(messages)) => Prompt::Chat(
                    messages.into_iter().map(WireMessage::into_chat).collect::<Result<_, _>>().map_err(fail)?,
                ),
                (Some(_), Some(_)) => {
                    return Err(fail(ServerError::InvalidRequest(
                        "send either `prompt` or `messages`, not both".into(),
                    )))
                }
                (None, None) => {
                    return Err(fail(ServerError::InvalidRequest("missing field `prompt` (or `messages`)".into())))
                }
            };
            let sampling = SamplingFields {
                max_tokens: f.max_tokens,
                temperature: f.temperature,
                top_p: f.top_p,
                top_k: f.top_k,
                min_p: f.min_p,
                repetition_penalty: f.repetition_penalty,
                seed: f.seed,
                stop: f.stop,
                ignore_eos: f.ignore_eos,
            };
            let request = sampling.into_request(prompt).map_err(fail)?;
            Ok(ClientFrame::Generate { id, request })
        }
        "cancel" => {
            let f: CancelFrame = serde_json::from_value(value.clone()).map_err(|e| fail(from_serde(e)))?;
            Ok(ClientFrame::Cancel { id: FrameId::parse(&f.id).map_err(fail)? })
        }
        other => Err(fail(ServerError::UnknownType(other.to_string()))),
    }
}

/// A frame the server sends; `type` comes first on the wire.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ServerFrame<'a> {
    Delta { id: &'a Value, text: &'a str, token_ids: &'a [u32] },
    Done { id: &'a Value, finish_reason: FinishReason, usage: Usage, speculative: &'a Option<SpecStats> },
    Error { id: Option<&'a Value>, code: &'static str, message: String },
}

fn to_text(frame: &ServerFrame) -> String {
    serde_json::to_string(frame).expect("frames serialize")
}

/// The server's frame for one runtime event.
pub fn event_frame(id: &FrameId, event: &Event) -> String {
    match event {
        Event::Token { ids, text } => to_text(&ServerFrame::Delta { id: &id.0, text, token_ids: ids }),
        Event::Done { finish, usage, speculative } => {
            to_text(&ServerFrame::Done { id: &id.0, finish_reason: *finish, usage: *usage, speculative })
        }
        Event::Error(e) => error_frame(Some(&id.0), &ServerError::Request(e.clone())),
    }
}

pub fn error_frame(id: Option<&Value>, error: &ServerError) -> String {
    to_text(&ServerFrame::Error { id, code: error.code(), message: error.to_string() })
}

/// `GET /v1/ws`: upgrades and hands the connection to its own task.
pub async fn route(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let (response, session, messages) = actix_ws::handle(&req, body)?;
    let messages =
        messages.max_frame_size(MAX_FRAME_BYTES).aggregate_continuations().max_continuation_size(MAX_FRAME_BYTES);
    actix_web::rt::spawn(
        Connection { state: state.into_inner(), session, streams: StreamMap::new(), ids: HashMap::new() }.run(messages),
    );
    Ok(response)
}

struct Connection {
    state: std::sync::Arc<AppState>,
    session: Session,
    /// In-flight requests' event streams, by id key; dropping one cancels its request.
    streams: StreamMap<String, EventStream>,
    ids: HashMap<String, FrameId>,
}

impl Connection {
    async fn run(mut self, mut messages: AggregatedMessageStream) {
        loop {
            let sent = tokio::select! {
                msg = messages.next() => match msg {
                    None => break,
                    Some(Ok(AggregatedMessage::Text(text))) => self.on_text(&text).await,
                    Some(Ok(AggregatedMessage::Binary(_))) => {
                        let e = ServerError::InvalidRequest("send JSON in text frames, not binary".into());
                        self.send(error_frame(None, &e)).await
                    }
                    Some(Ok(AggregatedMessage::Ping(bytes))) => self.session.pong(&bytes).await.is_ok(),
                    Some(Ok(AggregatedMessage::Pong(_))) => true,
                    Some(Ok(AggregatedMessage::Close(reason))) => {
                        let _ = self.session.close(reason).await;
                        return; // dropping `self` cancels every request of the connection
                    }
                    Some(Err(e)) => {
                        // A protocol violation (bad UTF-8, oversized frame): say why and close.
                        let reason = CloseReason { code: CloseCode::Protocol, description: Some(e.to_string()) };
                        let _ = self.session.close(Some(reason)).await;
                        return;
                    }
                },
                Some((key, event)) = self.streams.next(), if !self.streams.is_empty() => self.on_event(key, event).await,
            };
            if !sent {
                break; // the client is gone
            }
        }
        let _ = self.session.close(None).await;
    }

    /// Acts on one client frame; false when the connection is closed.
    async fn on_text(&mut self, text: &str) -> bool {
        match parse_client_frame(text) {
            Err(FrameError { id, error }) => self.send(error_frame(id.as_ref(), &error)).await,
            Ok(ClientFrame::Generate { id, request }) => {
                let key = id.key();
                if self.ids.contains_key(&key) {
                    let error = ServerError::DuplicateId(key);
                    return self.send(error_frame(Some(&id.0), &error)).await;
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
                self.send(error_frame(Some(&id.0), &ServerError::UnknownId(key))).await
            }
        }
    }

    async fn on_event(&mut self, key: String, event: Event) -> bool {
        let Some(id) = self.ids.get(&key) else { return true };
        let frame = event_frame(id, &event);
        if matches!(event, Event::Done { .. } | Event::Error(_)) {
            self.streams.remove(&key);
            self.ids.remove(&key);
        }
        self.send(frame).await
    }

    async fn send(&mut self, frame: String) -> bool {
        self.session.text(frame).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(text: &str) -> FrameError {
        parse_client_frame(text).unwrap_err()
    }

    #[test]
    fn parses_generate_with_prompt_or_messages() {
        let f = parse_client_frame(
            r#"{"type":"generate","id":"a","prompt":"Hi","max_tokens":4,"temperature":0.5,"seed":1,"stop":"."}"#,
        )
        .unwrap();
        let ClientFrame::Generate { id, request } = f else { panic!() };
        assert_eq!(id.0, json!("a"));
        assert_eq!(request.prompt, Prompt::Text("Hi".into()));
        assert_eq!((request.max_tokens, request.sampling.temperature, request.sampling.seed), (4, 0.5, Some(1)));
        assert_eq!(request.stop, vec![".".to_string()]);
        let f =
            parse_client_frame(r#"{"type":"generate","id":7,"messages":[{"role":"user","content":"Hi"}]}"#).unwrap();
        let ClientFrame::Generate { id, request } = f else { panic!() };
        assert_eq!(id.key(), "7");
        assert!(matches!(request.prompt, Prompt::Chat(m) if m.len() == 1));
        assert_eq!(parse_client_frame(r#"{"type":"cancel","id":7}"#).unwrap(), ClientFrame::Cancel { id });
    }

    #[test]
    fn bad_frames_are_explained_with_their_id() {
        assert_eq!(err("{not json").error.code(), "invalid_json");
        assert_eq!(err("[1]").error.code(), "invalid_request");
        let e = err(r#"{"type":"dance","id":"x"}"#);
        assert_eq!((e.error.code(), e.id), ("unknown_type", Some(json!("x"))));
        let e = err(r#"{"id":"x","prompt":"hi"}"#);
        assert_eq!(e.error.to_string(), "missing field `type`");
        let e = err(r#"{"type":"generate","prompt":"hi"}"#);
        assert_eq!((e.error.to_string().as_str(), e.id), ("missing field `id`", None));
        let e = err(r#"{"type":"generate","id":"x"}"#);
        assert!(e.error.to_string().contains("prompt"));
        let e = err(r#"{"type":"generate","id":"x","prompt":5}"#);
        assert!(e.error.to_string().contains("invalid type"), "{}", e.error);
        let e = err(r#"{"type":"generate","id":"x","prompt":"hi","temprature":1}"#);
        assert!(e.error.to_string().contains("unknown field `temprature`"), "{}", e.error);
        assert_eq!(err(r#"{"type":"generate","id":"x","prompt":"hi","top_p":2}"#).error.code(), "invalid_sampling");
        assert_eq!(
            err(r#"{"type":"generate","id":"x","prompt":"hi","max_tokens":0}"#).error.code(),
            "invalid_max_tokens"
        );
        assert_eq!(err(r#"{"type":"generate","id":1.5,"prompt":"hi"}"#).error.code(), "invalid_request");
        let both = err(r#"{"type":"generate","id":"x","prompt":"hi","messages":[]}"#);
        assert!(both.error.to_string().contains("not both"));
    }

    #[test]
    fn server_frames_have_the_documented_shape() {
        let id = FrameId(json!("r1"));
        let delta = event_frame(&id, &Event::Token { ids: vec![5, 6], text: "Hi".into() });
        assert_eq!(delta, r#"{"type":"delta","id":"r1","text":"Hi","token_ids":[5,6]}"#);
        let event_frame = |id: &FrameId, e: &Event| serde_json::from_str::<Value>(&event_frame(id, e)).unwrap();
        let usage = crate::request::Usage { prompt_tokens: 3, completion_tokens: 2 };
        let done =
            event_frame(&id, &Event::Done { finish: crate::request::FinishReason::Length, usage, speculative: None });
        assert_eq!(done["finish_reason"], "length");
        assert_eq!(done["usage"]["completion_tokens"], 2);
        let e = event_frame(&id, &Event::Error(crate::request::RequestError::PromptTooLong { tokens: 9, context: 8 }));
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("context_length_exceeded")));
    }
}
