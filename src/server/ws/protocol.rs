//! The WebSocket protocol's messages: client frames parsed and checked into typed requests,
//! runtime events written as server frames. No I/O here (and so it can be fuzzed).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::actors::Event;
use crate::request::{FinishReason, GenerateRequest, Prompt, Usage};
use crate::server::error::{from_serde, ServerError};
use crate::server::params::{SamplingFields, StopField, WireMessage};
use crate::spec::SpecStats;

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
    pub fn key(&self) -> String {
        self.0.to_string()
    }

    /// The id as the client sent it.
    pub fn value(&self) -> &Value {
        &self.0
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
