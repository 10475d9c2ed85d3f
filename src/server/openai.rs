//! The OpenAI-compatible HTTP API: `/v1/chat/completions`, `/v1/completions` (with
//! `stream: true` as server-sent events) and `/v1/models`.
//!
//! Bodies are parsed here (not by an extractor) so that every malformed body gets the same
//! OpenAI error JSON. Fields OpenAI defines that we do not implement are accepted only at
//! their neutral value; fields nobody defines are refused by name.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use futures::{stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::body::read_body;
use super::error::{from_serde, ServerError};
use super::params::{SamplingFields, StopField, WireMessage};
use super::sse;
use super::AppState;
use crate::actors::Event;
use crate::request::{FinishReason, GenerateRequest, Prompt, RequestError, Usage};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<WireMessage>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    pub ignore_eos: Option<bool>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub logprobs: Option<bool>,
    pub user: Option<String>,
}

/// `prompt` of `/v1/completions`: a string, a list of one string, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CompletionPrompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: CompletionPrompt,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    pub ignore_eos: Option<bool>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// vLLM's extension: each streamed chunk carries its `token_ids`, so that a model
    /// without a tokenizer (dummy weights) still streams a chunk per token.
    pub return_token_ids: Option<bool>,
    pub n: Option<u32>,
    pub best_of: Option<u32>,
    pub echo: Option<bool>,
    pub logprobs: Option<u32>,
    pub suffix: Option<String>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub user: Option<String>,
}

/// Which endpoint a response is for: the object names and the choice shape differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// What a handler needs besides the runtime request.
#[derive(Debug, Clone)]
pub struct ResponseOptions {
    pub endpoint: Endpoint,
    pub stream: bool,
    pub include_usage: bool,
    /// Chunks carry `token_ids` (and are sent even when the tokens completed no text).
    pub token_ids: bool,
}

fn unsupported(field: &str, why: &str) -> ServerError {
    ServerError::InvalidRequest(format!("`{field}` is not supported: {why}"))
}

fn check_model(requested: &Option<String>, served: &str) -> Result<(), ServerError> {
    match requested {
        Some(m) if m != served => {
            Err(ServerError::InvalidRequest(format!("model `{m}` is not served here; this server serves `{served}`")))
        }
        _ => Ok(()),
    }
}

fn check_penalties(frequency: Option<f32>, presence: Option<f32>) -> Result<(), ServerError> {
    if frequency.is_some_and(|p| p != 0.0) {
        return Err(unsupported("frequency_penalty", "use `repetition_penalty`"));
    }
    if presence.is_some_and(|p| p != 0.0) {
        return Err(unsupported("presence_penalty", "use `repetition_penalty`"));
    }
    Ok(())
}

fn check_stream_options(stream: bool, options: &Option<StreamOptions>) -> Result<bool, ServerError> {
    match options {
        Some(_) if !stream => {
            Err(ServerError::InvalidRequest("`stream_options` is only allowed with `stream: true`".into()))
        }
        Some(o) => Ok(o.include_usage),
        None => Ok(false),
    }
}

impl ChatCompletionRequest {
    pub fn into_generate(self, served: &str) -> Result<(GenerateRequest, ResponseOptions), ServerError> {
        check_model(&self.model, served)?;
        if self.n.is_some_and(|n| n != 1) {
            return Err(unsupported("n", "one choice per request"));
        }
        if self.logprobs == Some(true) {
            return Err(unsupported("logprobs", "not implemented"));
        }
        check_penalties(self.frequency_penalty, self.presence_penalty)?;
        if self.messages.is_empty() {
            return Err(ServerError::InvalidRequest("`messages` must not be empty".into()));
        }
        let include_usage = check_stream_options(self.stream, &self.stream_options)?;
        if self.max_tokens.is_some() && self.max_completion_tokens.is_some() {
            return Err(ServerError::InvalidRequest("send `max_tokens` or `max_completion_tokens`, not both".into()));
        }
        let messages = self.messages.into_iter().map(WireMessage::into_chat).collect::<Result<Vec<_>, _>>()?;
        let fields = SamplingFields {
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: self.stop,
            ignore_eos: self.ignore_eos,
        };
        let request = fields.into_request(Prompt::Chat(messages))?;
        let options =
            ResponseOptions { endpoint: Endpoint::Chat, stream: self.stream, include_usage, token_ids: false };
        Ok((request, options))
    }
}

impl CompletionRequest {
    pub fn into_generate(self, served: &str) -> Result<(GenerateRequest, ResponseOptions), ServerError> {
        check_model(&self.model, served)?;
        if self.n.is_some_and(|n| n != 1) || self.best_of.is_some_and(|n| n != 1) {
            return Err(unsupported("n", "one choice per request"));
        }
        if self.echo == Some(true) {
            return Err(unsupported("echo", "not implemented"));
        }
        if self.logprobs.is_some() {
            return Err(unsupported("logprobs", "not implemented"));
        }
        if self.suffix.is_some() {
            return Err(unsupported("suffix", "not implemented"));
        }
        check_penalties(self.frequency_penalty, self.presence_penalty)?;
        let include_usage = check_stream_options(self.stream, &self.stream_options)?;
        let token_ids = self.return_token_ids == Some(true);
        if token_ids && !self.stream {
            return Err(unsupported("return_token_ids", "only with `stream: true`"));
        }
        let prompt = match self.prompt {
            CompletionPrompt::Text(text) => Prompt::Text(text),
            CompletionPrompt::Texts(mut texts) if texts.len() == 1 => Prompt::Text(texts.remove(0)),
            CompletionPrompt::Texts(_) => return Err(unsupported("prompt", "send one prompt per request")),
            CompletionPrompt::Tokens(ids) => Prompt::Tokens(ids),
        };
        let fields = SamplingFields {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: self.stop,
            ignore_eos: self.ignore_eos,
        };
        let request = fields.into_request(prompt)?;
        let options = ResponseOptions { endpoint: Endpoint::Completion, stream: self.stream, include_usage, token_ids };
        Ok((request, options))
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A response id unique for the process: a prefix, the start time and a counter.
fn response_id(endpoint: Endpoint) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    format!("{prefix}-{:x}{:06x}", unix_now(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn finish_str(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        // Only seen when the runtime ends a request the client did not cancel.
        FinishReason::Cancelled => "cancelled",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// Builds the response objects of one request, streamed or not.
pub struct ResponseWriter {
    id: String,
    created: u64,
    model: String,
    options: ResponseOptions,
}

impl ResponseWriter {
    pub fn new(model: &str, options: ResponseOptions) -> Self {
        ResponseWriter { id: response_id(options.endpoint), created: unix_now(), model: model.to_string(), options }
    }

    /// The whole (non-streamed) response.
    pub fn complete(&self, text: &str, finish: FinishReason, usage: &Usage) -> Value {
        let (object, choice) = match self.options.endpoint {
            Endpoint::Chat => (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": { "role": "assistant", "content": text },
                    "logprobs": null,
                    "finish_reason": finish_str(finish),
                }),
            ),
            Endpoint::Completion => (
                "text_completion",
                json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish_str(finish) }),
            ),
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_json(usage),
        })
    }

    fn chunk(&self, choices: Value) -> Value {
        let object = match self.options.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let mut chunk = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.options.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    fn choice(&self, text: Option<&str>, finish: Option<FinishReason>) -> Value {
        let finish = finish.map(finish_str);
        match self.options.endpoint {
            Endpoint::Chat => {
                let delta = match text {
                    Some(t) => json!({ "content": t }),
                    None => json!({}),
                };
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
            Endpoint::Completion => {
                json!({ "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish })
            }
        }
    }

    /// The chunks that open a stream (the chat role).
    pub fn opening(&self) -> Vec<Value> {
        match self.options.endpoint {
            Endpoint::Chat => vec![self.chunk(json!([{
                "index": 0,
                "delta": { "role": "assistant", "content": "" },
                "logprobs": null,
                "finish_reason": null,
            }]))],
            Endpoint::Completion => vec![],
        }
    }

    /// The chunks for one runtime event (none for a token that completes no text yet).
    pub fn on_event(&self, event: &Event) -> Vec<Value> {
        match event {
            // With token ids, even a token that completes no text is a chunk.
            Event::Token { text, .. } if text.is_empty() && !self.options.token_ids => vec![],
            Event::Token { ids, text } => {
                let mut choice = self.choice(Some(text), None);
                if self.options.token_ids {
                    choice["token_ids"] = json!(ids);
                }
                vec![self.chunk(json!([choice]))]
            }
            Event::Done { finish, usage, .. } => {
                let mut chunks = vec![self.chunk(json!([self.choice(None, Some(*finish))]))];
                if self.options.include_usage {
                    let mut last = self.chunk(json!([]));
                    last["usage"] = usage_json(usage);
                    chunks.push(last);
                }
                chunks
            }
            Event::Error(e) => vec![ServerError::Request(e.clone()).openai_json()],
        }
    }
}

/// Runs one request: a JSON response, or an SSE stream once the first event shows that the
/// runtime accepted it (a refusal is an HTTP error, not a stream).
async fn respond(
    state: &AppState,
    request: GenerateRequest,
    options: ResponseOptions,
) -> Result<HttpResponse, ServerError> {
    let writer = ResponseWriter::new(&state.model_name, options);
    let mut events = state.handle.generate(request);
    if !writer.options.stream {
        let mut text = String::new();
        while let Some(event) = events.next().await {
            match event {
                Event::Token { text: t, .. } => text.push_str(&t),
                Event::Done { finish, usage, .. } => {
                    return Ok(HttpResponse::Ok().json(writer.complete(&text, finish, &usage)))
                }
                Event::Error(e) => return Err(e.into()),
            }
        }
        return Err(RequestError::Internal("the runtime ended the request without a result".into()).into());
    }
    let first = match events.next().await {
        Some(Event::Error(e)) => return Err(e.into()),
        Some(event) => event,
        None => return Err(RequestError::Internal("the runtime ended the request without a result".into()).into()),
    };
    let mut head = writer.opening();
    head.extend(writer.on_event(&first));
    // The body owns the event stream: when the client goes away actix drops the body, which
    // drops the stream, which cancels the request.
    let body = stream::iter(head)
        .chain(events.flat_map(move |event| stream::iter(writer.on_event(&event))))
        .map(|chunk| sse::data(&chunk))
        .chain(stream::once(async { sse::done() }))
        .map(Ok::<Bytes, actix_web::Error>);
    Ok(sse::response(body))
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ServerError> {
    if body.is_empty() {
        return Err(ServerError::InvalidJson("the request body is empty".into()));
    }
    serde_json::from_slice(body).map_err(from_serde)
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ServerError> {
    let body = read_body(&req, payload, &state.limits).await?;
    let (request, options) = parse::<ChatCompletionRequest>(&body)?.into_generate(&state.model_name)?;
    respond(&state, request, options).await
}

/// `POST /v1/completions`.
pub async fn completions(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ServerError> {
    let body = read_body(&req, payload, &state.limits).await?;
    let (request, options) = parse::<CompletionRequest>(&body)?.into_generate(&state.model_name)?;
    respond(&state, request, options).await
}

/// `GET /v1/models`.
pub async fn models(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "object": "list",
        "data": [{ "id": state.model_name, "object": "model", "created": state.started, "owned_by": "specula" }],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<(GenerateRequest, ResponseOptions), ServerError> {
        serde_json::from_str::<ChatCompletionRequest>(body).map_err(from_serde)?.into_generate("smol")
    }

    #[test]
    fn chat_request_maps_to_the_runtime_request() {
        let (r, o) = chat(
            r#"{"model":"smol","messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"temperature":0,"stream":true,"stream_options":{"include_usage":true},"stop":["\n"]}"#,
        )
        .unwrap();
        assert!(matches!(r.prompt, Prompt::Chat(ref m) if m[0].content == "Hi"));
        assert_eq!((r.max_tokens, r.stop.len()), (8, 1));
        assert!(o.stream && o.include_usage && o.endpoint == Endpoint::Chat);
    }

    #[test]
    fn chat_request_errors_name_the_field() {
        let msg = |b: &str| chat(b).unwrap_err().to_string();
        assert!(msg(r#"{"model":"smol"}"#).contains("missing field `messages`"));
        assert!(msg(r#"{"messages":[],"bogus":1}"#).contains("unknown field `bogus`"));
        assert!(msg(r#"{"messages":"hi"}"#).contains("invalid type"));
        assert!(msg(r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#).contains("`n`"));
        assert!(msg(r#"{"model":"gpt-4","messages":[{"role":"user","content":"x"}]}"#).contains("not served"));
        assert_eq!(
            chat(r#"{"messages":[{"role":"user","content":"x"}],"temperature":-2}"#).unwrap_err().code(),
            "invalid_sampling"
        );
        assert_eq!(
            chat(r#"{"messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#)
                .unwrap_err()
                .code(),
            "invalid_request"
        );
    }

    #[test]
    fn completion_prompt_forms() {
        let parse = |b: &str| serde_json::from_str::<CompletionRequest>(b).unwrap().into_generate("smol");
        assert_eq!(parse(r#"{"prompt":"a"}"#).unwrap().0.prompt, Prompt::Text("a".into()));
        assert_eq!(parse(r#"{"prompt":["a"]}"#).unwrap().0.prompt, Prompt::Text("a".into()));
        assert_eq!(parse(r#"{"prompt":[1,2]}"#).unwrap().0.prompt, Prompt::Tokens(vec![1, 2]));
        assert!(parse(r#"{"prompt":["a","b"]}"#).is_err());
    }

    #[test]
    fn returned_token_ids_stream_a_chunk_per_token_even_without_text() {
        let parse = |b: &str| serde_json::from_str::<CompletionRequest>(b).unwrap().into_generate("smol");
        let (_, options) = parse(r#"{"prompt":[1,2],"stream":true,"return_token_ids":true}"#).unwrap();
        assert!(options.token_ids);
        assert_eq!(parse(r#"{"prompt":[1],"return_token_ids":true}"#).unwrap_err().code(), "invalid_request");
        let w = ResponseWriter::new("dummy", options);
        let chunks = w.on_event(&Event::Token { ids: vec![7, 9], text: String::new() });
        assert_eq!(chunks[0]["choices"][0]["token_ids"], json!([7, 9]));
        assert_eq!(chunks[0]["choices"][0]["text"], "");
    }

    #[test]
    fn stream_chunks_follow_openai() {
        let options = ResponseOptions { endpoint: Endpoint::Chat, stream: true, include_usage: true, token_ids: false };
        let w = ResponseWriter::new("smol", options);
        let open = w.opening();
        assert_eq!(open[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(w.on_event(&Event::Token { ids: vec![1], text: String::new() }).is_empty());
        let c = &w.on_event(&Event::Token { ids: vec![1], text: "Hi".into() })[0];
        assert_eq!(
            (c["object"].as_str(), c["choices"][0]["delta"]["content"].as_str()),
            (Some("chat.completion.chunk"), Some("Hi"))
        );
        let usage = Usage { prompt_tokens: 3, completion_tokens: 1 };
        let end = w.on_event(&Event::Done { finish: FinishReason::Length, usage, speculative: None });
        assert_eq!(end[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(end[1]["choices"], json!([]));
        assert_eq!(end[1]["usage"]["total_tokens"], 4);
        let full = w.complete("Hi", FinishReason::Stop, &usage);
        assert_eq!(full["choices"][0]["message"]["content"], "Hi");
        assert_eq!(full["object"], "chat.completion");
    }
}
