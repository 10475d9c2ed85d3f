//! A request's prompt on its way into a model, as every entry point (the one-request
//! engine, the batching runtime) takes it: tokenized and checked (`tokenize_prompt`), then
//! held in the KV cache in blocks of `BLOCK_SIZE` tokens.

use crate::core::lengths::Lengths;
use crate::model::Tokenizer;
use crate::request::{Prompt, RequestError};

/// Tokens per KV-cache block, for the target's cache and a draft model's alike.
pub const BLOCK_SIZE: usize = 16;

/// Tokenizes a prompt (chat template applied) and checks its ids against the vocabulary;
/// shared by every entry point. A text the context could never hold is refused by its size
/// first, before any work on it; the token count is checked by `Lengths::admit`.
pub fn tokenize_prompt(
    tokenizer: Option<&Tokenizer>,
    prompt: &Prompt,
    vocab: usize,
    lengths: &Lengths,
) -> Result<Vec<u32>, RequestError> {
    let ids = match prompt {
        Prompt::Tokens(ids) => {
            lengths.check_prompt(ids.len())?;
            ids.clone()
        }
        Prompt::Text(text) => {
            let tok = tokenizer.ok_or(RequestError::NoTokenizer)?;
            lengths.check_prompt_bytes(text.len(), tok.max_bytes_per_token())?;
            tok.encode(text, true)
        }
        Prompt::Chat(messages) => {
            let tok = tokenizer.ok_or(RequestError::NoTokenizer)?;
            let bytes = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
            lengths.check_prompt_bytes(bytes, tok.max_bytes_per_token())?;
            let template = tok
                .chat_template
                .as_ref()
                .ok_or_else(|| RequestError::ChatTemplate("the model has no chat template".into()))?;
            let text = template.render(messages, true).map_err(RequestError::ChatTemplate)?;
            lengths.check_prompt_bytes(text.len(), tok.max_bytes_per_token())?;
            tok.encode(&text, false)
        }
    };
    if ids.is_empty() {
        return Err(RequestError::EmptyPrompt);
    }
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(RequestError::BadTokenId(bad));
    }
    Ok(ids)
}
