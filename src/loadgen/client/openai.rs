//! `POST /v1/completions` with `stream: true`: the text chunks of the server-sent events
//! are the tokens' arrivals; the last chunk's `usage` (asked for with `stream_options`)
//! counts them. A token-id prompt also asks for `return_token_ids`: a server without a
//! tokenizer streams no text, only the ids.

use std::time::Instant;

use futures::StreamExt;
use serde_json::{json, Value};

use super::sse::SseParser;
use super::{error_message, http_client, Completed, Failure, RequestShape, Timeline, Usage};
use crate::loadgen::dataset::{PromptBody, WorkItem};
use crate::loadgen::server::Endpoint;

/// Largest error body read from a refused request.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

pub struct OpenAiClient {
    client: awc::Client,
    url: String,
    pub(super) shape: RequestShape,
}

impl OpenAiClient {
    pub fn new(endpoint: &Endpoint, shape: RequestShape) -> Self {
        OpenAiClient { client: http_client(shape.api_key.as_deref()), url: endpoint.completions(), shape }
    }

    fn body(&self, item: &WorkItem) -> Value {
        let mut body = json!({
            "prompt": item.prompt,
            "max_tokens": item.output_len,
            "temperature": self.shape.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(model) = &self.shape.model {
            body["model"] = json!(model);
        }
        if self.shape.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if matches!(item.prompt, PromptBody::TokenIds(_)) {
            body["return_token_ids"] = json!(true);
        }
        body
    }

    pub async fn send(&self, item: &WorkItem) -> Result<Completed, Failure> {
        let body = self.body(item);
        let mut timeline = Timeline::start();
        let mut response =
            self.client.post(&self.url).send_json(&body).await.map_err(|e| Failure::Connect(e.to_string()))?;
        if !response.status().is_success() {
            let status = response.status().as_u16();
            let body = response.body().limit(ERROR_BODY_LIMIT).await.unwrap_or_default();
            return Err(Failure::Http { status, message: error_message(&body) });
        }
        let mut parser = SseParser::default();
        let mut stream = StreamState::default();
        while let Some(bytes) = response.next().await {
            let bytes = bytes.map_err(|e| Failure::Disconnected(e.to_string()))?;
            let arrived = Instant::now();
            for data in parser.push(&bytes) {
                if data == "[DONE]" {
                    return Ok(timeline.finish(stream.usage, None));
                }
                match stream.on_chunk(&data)? {
                    0 => {}
                    tokens => timeline.chunk(arrived, tokens),
                }
            }
        }
        // Some servers end the stream without `[DONE]` after the last choice.
        match stream.finished {
            true => Ok(timeline.finish(stream.usage, None)),
            false => Err(Failure::Disconnected("the stream ended before `[DONE]`".into())),
        }
    }
}

/// What the chunks so far said.
#[derive(Default)]
struct StreamState {
    usage: Option<Usage>,
    /// A choice had its `finish_reason`.
    finished: bool,
}

impl StreamState {
    /// Reads one chunk; gives the tokens that arrived with it: its `token_ids` where it has
    /// them, else one for a chunk of text. An `error` object in the stream ends the request.
    fn on_chunk(&mut self, data: &str) -> Result<usize, Failure> {
        let chunk: Value =
            serde_json::from_str(data).map_err(|e| Failure::Protocol(format!("a chunk that is not JSON: {e}")))?;
        if let Some(error) = chunk.get("error") {
            let code = error["code"].as_str().or(error["type"].as_str()).unwrap_or("error").to_string();
            let message = error["message"].as_str().unwrap_or_default().to_string();
            return Err(Failure::Server { code, message });
        }
        if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
            let usage = serde_json::from_value(usage.clone()).map_err(|e| Failure::Protocol(format!("usage: {e}")))?;
            self.usage = Some(usage);
        }
        let Some(choice) = chunk["choices"].get(0) else { return Ok(0) };
        self.finished |= !choice["finish_reason"].is_null();
        if let Some(ids) = choice["token_ids"].as_array() {
            return Ok(ids.len());
        }
        // `text` for completions; `delta.content` for chat completions.
        let text = choice["text"].as_str().or(choice["delta"]["content"].as_str());
        Ok(usize::from(text.is_some_and(|t| !t.is_empty())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_with_text_count_and_the_usage_chunk_is_kept() {
        let mut s = StreamState::default();
        assert_eq!(s.on_chunk(r#"{"choices":[{"index":0,"text":" Paris","finish_reason":null}],"usage":null}"#), Ok(1));
        assert_eq!(s.on_chunk(r#"{"choices":[{"index":0,"text":"","finish_reason":"length"}]}"#), Ok(0));
        assert!(s.finished);
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#;
        assert_eq!(s.on_chunk(usage), Ok(0));
        assert_eq!(s.usage.map(|u| (u.prompt_tokens, u.completion_tokens)), Some((5, 3)));
        assert_eq!(s.on_chunk(r#"{"choices":[{"delta":{"content":"Hi"},"finish_reason":null}]}"#), Ok(1));
        // Token ids without text (a server without a tokenizer): each id is a token.
        assert_eq!(s.on_chunk(r#"{"choices":[{"text":"","token_ids":[5,8],"finish_reason":null}]}"#), Ok(2));
        let error = s.on_chunk(r#"{"error":{"message":"the step failed","type":"server_error","code":"step_failed"}}"#);
        assert_eq!(error, Err(Failure::Server { code: "step_failed".into(), message: "the step failed".into() }));
        assert!(matches!(s.on_chunk("not json"), Err(Failure::Protocol(_))));
    }
}
