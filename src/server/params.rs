//! The pieces both wire protocols share: chat messages as clients send them, `stop` as a
//! string or a list, and the sampling fields turned into a `GenerateRequest`.

use serde::Deserialize;

use super::error::ServerError;
use crate::core::sampling::SamplingParams;
use crate::model::chat::ChatMessage;
use crate::request::{GenerateRequest, Prompt};

/// `max_tokens` when a request leaves it out.
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// Most stop strings per request (OpenAI allows 4; we are a little more generous).
pub const MAX_STOP_STRINGS: usize = 16;

/// A chat message as OpenAI clients send it: `content` is a string or a list of text parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireMessage {
    pub role: String,
    pub content: WireContent,
    /// Accepted and ignored (OpenAI's participant name).
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum WireContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message's content; only `text` parts are supported.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

impl WireMessage {
    pub fn into_chat(self) -> Result<ChatMessage, ServerError> {
        if !matches!(self.role.as_str(), "system" | "developer" | "user" | "assistant") {
            return Err(ServerError::InvalidRequest(format!(
                "message role `{}` is not one of system, developer, user, assistant",
                self.role
            )));
        }
        let content = match self.content {
            WireContent::Text(text) => text,
            WireContent::Parts(parts) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ServerError::InvalidRequest(format!(
                                "content part of type `{kind}` is not supported; send text parts"
                            )))
                        }
                    }
                }
                text
            }
        };
        // The templates we know call the developer role system.
        let role = if self.role == "developer" { "system".to_string() } else { self.role };
        Ok(ChatMessage { role, content })
    }
}

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

/// The sampling and length fields of a request, all optional on the wire.
#[derive(Debug, Clone, Default)]
pub struct SamplingFields {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    pub ignore_eos: Option<bool>,
}

impl SamplingFields {
    /// The runtime's request, with the values checked the way the runtime checks them, so
    /// that a bad value is refused before anything is queued.
    pub fn into_request(self, prompt: Prompt) -> Result<GenerateRequest, ServerError> {
        let defaults = SamplingParams::default();
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(defaults.repetition_penalty),
            seed: self.seed,
        };
        sampling.validate().map_err(|e| ServerError::Request(crate::request::RequestError::InvalidSampling(e)))?;
        let max_tokens = self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if max_tokens == 0 {
            return Err(crate::request::RequestError::ZeroMaxTokens.into());
        }
        let stop = self.stop.map(StopField::into_vec).unwrap_or_default();
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ServerError::InvalidRequest(format!(
                "at most {MAX_STOP_STRINGS} stop strings, got {}",
                stop.len()
            )));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ServerError::InvalidRequest("stop strings must not be empty".into()));
        }
        Ok(GenerateRequest { prompt, sampling, max_tokens, stop, ignore_eos: self.ignore_eos.unwrap_or(false) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_greedy_with_the_default_length() {
        let r = SamplingFields::default().into_request(Prompt::Text("hi".into())).unwrap();
        assert!(r.sampling.is_greedy());
        assert_eq!(r.max_tokens, DEFAULT_MAX_TOKENS);
        assert!(r.stop.is_empty());
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let bad = |f: SamplingFields| f.into_request(Prompt::Text("hi".into())).unwrap_err().code();
        assert_eq!(bad(SamplingFields { temperature: Some(-1.0), ..Default::default() }), "invalid_sampling");
        assert_eq!(bad(SamplingFields { top_p: Some(1.5), ..Default::default() }), "invalid_sampling");
        assert_eq!(bad(SamplingFields { max_tokens: Some(0), ..Default::default() }), "invalid_max_tokens");
        let empty_stop = SamplingFields { stop: Some(StopField::One(String::new())), ..Default::default() };
        assert_eq!(bad(empty_stop), "invalid_request");
    }

    #[test]
    fn messages_accept_text_parts_and_refuse_images() {
        let m: WireMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(m.into_chat().unwrap(), ChatMessage::user("ab"));
        let img: WireMessage =
            serde_json::from_str(r#"{"role":"user","content":[{"type":"image_url","image_url":{}}]}"#).unwrap();
        assert!(img.into_chat().is_err());
        let role: WireMessage = serde_json::from_str(r#"{"role":"wizard","content":"x"}"#).unwrap();
        assert!(role.into_chat().is_err());
    }
}
