//! What a caller asks for and what it gets back, independent of how it was asked
//! (CLI, in-process API, WebSocket, HTTP).

use serde::{Deserialize, Serialize};

use crate::core::sampling::SamplingParams;
use crate::model::chat::ChatMessage;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// Raw text, tokenized as is (with BOS when the model wants one).
    Text(String),
    /// A conversation rendered with the model's chat template, assistant turn opened.
    Chat(Vec<ChatMessage>),
    /// Token ids, for models without a tokenizer (dummy weights) and benchmarks.
    Tokens(Vec<u32>),
}

/// A request's identity inside the runtime (unique for the runtime's life).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u64);

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Generation ends before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// Keep generating past the end-of-sequence token (benchmarks).
    pub ignore_eos: bool,
}

impl GenerateRequest {
    pub fn new(prompt: Prompt) -> Self {
        GenerateRequest {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens: 128,
            stop: vec![],
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the model's context is full.
    Length,
    Cancelled,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Why a request was refused or failed. Nothing else is affected by it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens, more than the model's context of {context}")]
    PromptTooLong { tokens: usize, context: usize },
    /// Refused by its size before tokenizing: no tokenization of it could fit the context.
    #[error("the prompt has {bytes} bytes, more than the model's context of {context} tokens can hold (at most {max_bytes} bytes)")]
    PromptTooLarge { bytes: usize, max_bytes: usize, context: usize },
    #[error("invalid sampling parameters: {0}")]
    InvalidSampling(String),
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    #[error("this model has no tokenizer (dummy weights): send token ids")]
    NoTokenizer,
    #[error("token id {0} is outside the vocabulary")]
    BadTokenId(u32),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("the request needs {tokens} tokens of KV cache, more than the whole pool of {capacity}")]
    ExceedsKvCapacity { tokens: usize, capacity: usize },
    #[error("the server is overloaded: {0} requests are already waiting")]
    Overloaded(usize),
    #[error("the runtime is shutting down")]
    ShuttingDown,
    /// The model step running this request failed (the runtime serves on).
    #[error("the model step running this request failed: {0}")]
    StepFailed(String),
    /// The runtime cannot serve any more (its model executor failed beyond recovery).
    #[error("the runtime is unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl RequestError {
    /// A stable, machine-readable name: the `reason` of the failed-requests metric, and the
    /// `code` the servers send.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::EmptyPrompt => "empty_prompt",
            RequestError::PromptTooLong { .. } | RequestError::PromptTooLarge { .. } => "context_length_exceeded",
            RequestError::InvalidSampling(_) => "invalid_sampling",
            RequestError::ZeroMaxTokens => "invalid_max_tokens",
            RequestError::NoTokenizer => "no_tokenizer",
            RequestError::BadTokenId(_) => "bad_token_id",
            RequestError::ChatTemplate(_) => "chat_template",
            RequestError::ExceedsKvCapacity { .. } => "kv_capacity_exceeded",
            RequestError::Overloaded(_) => "overloaded",
            RequestError::ShuttingDown => "shutting_down",
            RequestError::StepFailed(_) => "step_failed",
            RequestError::Unavailable(_) => "unavailable",
            RequestError::Internal(_) => "internal_error",
        }
    }
}
