//! Text ⇄ token ids, a thin wrapper over the `tokenizers` crate that also knows the
//! model's special ids and chat template.

use std::path::Path;

use super::chat::ChatTemplate;
use super::LoadError;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepended by `encode(.., add_bos = true)` when the model asks for it.
    pub bos_id: Option<u32>,
    /// Generation stops at any of these.
    pub eos_ids: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<ChatTemplate>,
    /// Bytes of the longest vocabulary entry: no token stands for more text.
    longest_token: usize,
}

impl Tokenizer {
    pub fn new(inner: tokenizers::Tokenizer) -> Self {
        let longest_token = inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1);
        Tokenizer { inner, bos_id: None, eos_ids: vec![], add_bos: false, chat_template: None, longest_token }
    }

    /// A bound on the bytes of text one token stands for: a text longer than
    /// `context × this` cannot fit in the context, and is refused before it is tokenized.
    /// Generous: twice the longest vocabulary entry (as written in the vocabulary, which is
    /// never shorter than the text it decodes to), so that a normalizer that lengthens text
    /// cannot make it refuse a prompt that fits.
    pub fn max_bytes_per_token(&self) -> usize {
        (2 * self.longest_token).max(16)
    }

    /// Loads `tokenizer.json`, and `tokenizer_config.json` beside it when present
    /// (chat template, bos/eos tokens, whether to add bos).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(LoadError::MissingTokenizer { path: dir.to_path_buf() });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| LoadError::Tokenizer { path: path.clone(), msg: e.to_string() })?;
        let mut tok = Tokenizer::new(inner);
        let config_path = dir.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&config_path) {
            let cfg: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| LoadError::format(&config_path, format!("invalid JSON: {e}")))?;
            let token_id = |key: &str| special_token_text(&cfg[key]).and_then(|t| tok.token_to_id(&t));
            let (bos_id, eos_id) = (token_id("bos_token"), token_id("eos_token"));
            tok.bos_id = bos_id;
            tok.eos_ids.extend(eos_id);
            tok.add_bos = cfg["add_bos_token"].as_bool().unwrap_or(false);
            let bos = special_token_text(&cfg["bos_token"]).unwrap_or_default();
            let eos = special_token_text(&cfg["eos_token"]).unwrap_or_default();
            if let Some(src) = cfg["chat_template"].as_str() {
                tok.chat_template =
                    Some(ChatTemplate::new(src, &bos, &eos).map_err(|msg| LoadError::format(&config_path, msg))?);
            }
        }
        Ok(tok)
    }

    /// Encodes text; special tokens written in the text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let enc = self.inner.encode_fast(text, false).map(|e| e.get_ids().to_vec()).unwrap_or_default();
        match self.bos_id {
            Some(bos) if add_bos && self.add_bos && enc.first() != Some(&bos) => {
                std::iter::once(bos).chain(enc).collect()
            }
            _ => enc,
        }
    }

    /// Decodes ids to text, special tokens included (a chat turn's `<|im_end|>` stays visible
    /// unless the caller stops before it).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// `tokenizer_config.json` writes special tokens as a string or as `{"content": ...}`.
fn special_token_text(v: &serde_json::Value) -> Option<String> {
    v.as_str().or_else(|| v["content"].as_str()).map(str::to_string)
}
