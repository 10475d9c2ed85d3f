//! One streamed request at a time, through either door of the server, timed as its tokens
//! arrive: [`Door::send`] gives a [`Completed`] request or the [`Failure`] that ended it.

mod openai;
mod sse;
mod ws;

use std::time::{Duration, Instant};

use serde::Deserialize;

use super::args::Api;
use super::dataset::WorkItem;
use super::server::Endpoint;

/// What every request carries besides its prompt and length.
#[derive(Debug, Clone)]
pub struct RequestShape {
    /// `model` of OpenAI requests (the WebSocket has none).
    pub model: Option<String>,
    pub temperature: f64,
    pub ignore_eos: bool,
    pub api_key: Option<String>,
    /// After this, a request counts as failed.
    pub timeout: Duration,
}

/// A request that streamed its answer to the end.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    /// From sending the request to its first token (to its end, if it had none).
    pub ttft: Duration,
    /// From sending the request to the end of its stream.
    pub e2e: Duration,
    /// Between consecutive chunks of tokens (a chunk may carry several: speculation).
    pub itl: Vec<Duration>,
    /// As the server reports it (`usage`), else as the dataset estimated it.
    pub prompt_tokens: Option<usize>,
    /// As the server reports it, else as counted in the stream.
    pub output_tokens: usize,
    /// The server's speculative decoding statistics for this request, if it sent them.
    pub speculative: Option<SpecCounts>,
}

/// A request's speculative decoding, as Specula's WebSocket `done` frame reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
pub struct SpecCounts {
    /// Verification steps that carried drafts.
    pub steps: u64,
    pub drafted: u64,
    pub accepted: u64,
    /// Acceptance was forced by the server (`--synthetic-acceptance`).
    #[serde(default)]
    pub synthetic: bool,
}

/// `usage` of an OpenAI response or a WebSocket `done` frame.
#[derive(Debug, Clone, Copy, Deserialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
}

/// Why a request did not complete. Counted per [`Failure::kind`], never fatal.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("HTTP {status}: {message}")]
    Http { status: u16, message: String },
    #[error("server error `{code}`: {message}")]
    Server { code: String, message: String },
    #[error("unexpected response: {0}")]
    Protocol(String),
    #[error("connection lost: {0}")]
    Disconnected(String),
    #[error("no end after {0:?}")]
    Timeout(Duration),
}

impl Failure {
    /// The failures counted together in the report: `http 503`, `server overloaded`, ...
    pub fn kind(&self) -> String {
        match self {
            Failure::Connect(_) => "connect".into(),
            Failure::Http { status, .. } => format!("http {status}"),
            Failure::Server { code, .. } => format!("server {code}"),
            Failure::Protocol(_) => "protocol".into(),
            Failure::Disconnected(_) => "disconnected".into(),
            Failure::Timeout(_) => "timeout".into(),
        }
    }
}

/// The clock of one request: when it was sent and when each chunk of tokens arrived.
struct Timeline {
    sent: Instant,
    chunks: Vec<Instant>,
    /// Tokens counted in the stream (chunks, or token ids where the stream has them).
    tokens: usize,
}

impl Timeline {
    fn start() -> Self {
        Timeline { sent: Instant::now(), chunks: Vec::new(), tokens: 0 }
    }

    fn chunk(&mut self, at: Instant, tokens: usize) {
        self.chunks.push(at);
        self.tokens += tokens;
    }

    /// The request ended now: its figures, with the server's counts where it gave them. An
    /// empty answer (an end-of-sequence token first) has its first token at its end.
    fn finish(self, usage: Option<Usage>, speculative: Option<SpecCounts>) -> Completed {
        let end = Instant::now();
        let first = self.chunks.first().copied().unwrap_or(end);
        Completed {
            ttft: first - self.sent,
            e2e: end - self.sent,
            itl: self.chunks.windows(2).map(|w| w[1] - w[0]).collect(),
            prompt_tokens: usage.map(|u| u.prompt_tokens),
            output_tokens: usage.map_or(self.tokens, |u| u.completion_tokens),
            speculative,
        }
    }
}

/// The door requests go through, with what it keeps between requests.
pub enum Door {
    OpenAi(openai::OpenAiClient),
    Ws(ws::WsPool),
}

impl Door {
    pub fn new(api: Api, endpoint: &Endpoint, shape: RequestShape) -> Self {
        match api {
            Api::Openai => Door::OpenAi(openai::OpenAiClient::new(endpoint, shape)),
            Api::Ws => Door::Ws(ws::WsPool::new(endpoint, shape)),
        }
    }

    /// Sends one request and follows its stream to the end, or to the timeout.
    pub async fn send(&self, item: &WorkItem) -> Result<Completed, Failure> {
        let timeout = self.shape().timeout;
        let sent = async {
            match self {
                Door::OpenAi(client) => client.send(item).await,
                Door::Ws(pool) => pool.send(item).await,
            }
        };
        let mut completed = tokio::time::timeout(timeout, sent).await.unwrap_or(Err(Failure::Timeout(timeout)))?;
        // Without the server's count, the dataset's estimate.
        completed.prompt_tokens.get_or_insert(item.input_len);
        Ok(completed)
    }

    fn shape(&self) -> &RequestShape {
        match self {
            Door::OpenAi(client) => &client.shape,
            Door::Ws(pool) => &pool.shape,
        }
    }
}

/// An HTTP client for the benchmark: no limit on connections (the load decides), no
/// overall timeout (`RequestShape::timeout` is applied around each request).
pub fn http_client(api_key: Option<&str>) -> awc::Client {
    let connector = awc::Connector::new().limit(0).timeout(Duration::from_secs(10));
    let builder = awc::Client::builder().connector(connector).disable_timeout();
    match api_key {
        Some(key) => builder.bearer_auth(key).finish(),
        None => builder.finish(),
    }
}

/// The message of an OpenAI-style error body (`{"error": {"message": ...}}`), else the
/// body's start.
fn error_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let json: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    let message = json.as_ref().and_then(|j| j["error"]["message"].as_str().or(j["error"].as_str()));
    match message {
        Some(m) => m.to_string(),
        None => text.chars().take(200).collect(),
    }
}
