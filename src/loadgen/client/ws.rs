//! Specula's WebSocket (`/v1/ws`): a `generate` frame, then `delta` frames (their token ids
//! counted as they arrive) until `done` (usage and speculative statistics) or `error`.
//!
//! A connection carries one request at a time: it is taken from a pool of idle connections
//! (or opened) for a request and given back after it, so that C clients hold C connections
//! and the handshake is paid once per connection, as HTTP clients reuse theirs.

use std::cell::{Cell, RefCell};
use std::time::Instant;

use actix_codec::Framed;
use awc::error::WsClientError;
use awc::ws::{Codec, Frame, Message};
use awc::BoxedSocket;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{http_client, Completed, Failure, RequestShape, SpecCounts, Timeline, Usage};
use crate::loadgen::dataset::WorkItem;
use crate::loadgen::server::Endpoint;

/// Largest frame accepted from the server.
const MAX_FRAME_BYTES: usize = 4 << 20;

type Socket = Framed<BoxedSocket, Codec>;

pub struct WsPool {
    client: awc::Client,
    url: String,
    idle: RefCell<Vec<Socket>>,
    next_id: Cell<u64>,
    pub(super) shape: RequestShape,
}

/// The frames the server sends about a request (docs/websocket.md).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ServerFrame {
    Delta {
        #[serde(default)]
        token_ids: Vec<Value>,
    },
    Done {
        usage: Usage,
        speculative: Option<SpecCounts>,
    },
    Error {
        code: String,
        message: String,
    },
}

impl WsPool {
    pub fn new(endpoint: &Endpoint, shape: RequestShape) -> Self {
        let client = http_client(shape.api_key.as_deref());
        WsPool { client, url: endpoint.websocket(), idle: RefCell::default(), next_id: Cell::new(0), shape }
    }

    pub async fn send(&self, item: &WorkItem) -> Result<Completed, Failure> {
        let idle = self.idle.borrow_mut().pop();
        let mut socket = match idle {
            Some(socket) => socket,
            None => self.connect().await?,
        };
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let result = exchange(&mut socket, self.generate_frame(id, item)).await;
        // The connection is still good after a request's end or its `error` frame.
        if matches!(result, Ok(_) | Err(Failure::Server { .. })) {
            self.idle.borrow_mut().push(socket);
        }
        result
    }

    async fn connect(&self) -> Result<Socket, Failure> {
        let request = self.client.ws(&self.url).max_frame_size(MAX_FRAME_BYTES);
        match request.connect().await {
            Ok((_, socket)) => Ok(socket),
            Err(WsClientError::InvalidResponseStatus(status)) => {
                Err(Failure::Http { status: status.as_u16(), message: "the WebSocket handshake was refused".into() })
            }
            Err(WsClientError::SendRequest(e)) => Err(Failure::Connect(e.to_string())),
            Err(e) => Err(Failure::Protocol(format!("WebSocket handshake: {e}"))),
        }
    }

    fn generate_frame(&self, id: u64, item: &WorkItem) -> String {
        let mut frame = json!({
            "type": "generate",
            "id": id,
            // Token-id prompts are refused before a run (`loadgen::check_options`).
            "prompt": item.prompt,
            "max_tokens": item.output_len,
            "temperature": self.shape.temperature,
        });
        if self.shape.ignore_eos {
            frame["ignore_eos"] = json!(true);
        }
        frame.to_string()
    }
}

/// Sends `generate` and reads the connection until the request's last frame.
async fn exchange(socket: &mut Socket, generate: String) -> Result<Completed, Failure> {
    let lost = |e: &dyn std::fmt::Display| Failure::Disconnected(e.to_string());
    let mut timeline = Timeline::start();
    socket.send(Message::Text(generate.into())).await.map_err(|e| lost(&e))?;
    loop {
        let frame = socket.next().await.ok_or_else(|| lost(&"the server closed the connection"))?;
        let arrived = Instant::now();
        match frame.map_err(|e| lost(&e))? {
            Frame::Text(text) => {
                let frame: ServerFrame = serde_json::from_slice(&text)
                    .map_err(|e| Failure::Protocol(format!("{e}: {}", String::from_utf8_lossy(&text))))?;
                match frame {
                    ServerFrame::Delta { token_ids } if token_ids.is_empty() => {}
                    ServerFrame::Delta { token_ids } => timeline.chunk(arrived, token_ids.len()),
                    ServerFrame::Done { usage, speculative } => return Ok(timeline.finish(Some(usage), speculative)),
                    ServerFrame::Error { code, message } => return Err(Failure::Server { code, message }),
                }
            }
            Frame::Ping(payload) => socket.send(Message::Pong(payload)).await.map_err(|e| lost(&e))?,
            Frame::Close(reason) => return Err(lost(&format!("closed by the server ({reason:?})"))),
            Frame::Binary(_) | Frame::Continuation(_) | Frame::Pong(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_frames_are_read_as_documented() {
        let delta = r#"{"type":"delta","id":3,"text":" Paris","token_ids":[7042,30]}"#;
        assert!(matches!(serde_json::from_str(delta), Ok(ServerFrame::Delta { token_ids }) if token_ids.len() == 2));
        let done = r#"{"type":"done","id":3,"finish_reason":"length","usage":{"prompt_tokens":6,"completion_tokens":16},
            "speculative":{"steps":9,"drafted":36,"accepted":21,"mean_accepted_length":3.33,
            "acceptance_per_position":[0.89,0.67,0.56,0.22],"synthetic":true}}"#;
        let Ok(ServerFrame::Done { usage, speculative: Some(s) }) = serde_json::from_str(done) else { panic!() };
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (6, 16));
        assert_eq!(s, SpecCounts { steps: 9, drafted: 36, accepted: 21, synthetic: true });
        let plain = r#"{"type":"done","id":3,"finish_reason":"stop","usage":{"prompt_tokens":1,"completion_tokens":1},"speculative":null}"#;
        assert!(matches!(serde_json::from_str(plain), Ok(ServerFrame::Done { speculative: None, .. })));
        let error = r#"{"type":"error","id":null,"code":"overloaded","message":"too many requests waiting"}"#;
        assert!(matches!(serde_json::from_str(error), Ok(ServerFrame::Error { code, .. }) if code == "overloaded"));
    }
}
