//! Rebuilds a `tokenizers` tokenizer equivalent to the model's original `tokenizer.json`
//! from GGUF metadata. Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) only: SmolLM2,
//! Llama 3, GPT-2 style vocabularies.
//!
//! The pre-tokenizer is chosen by `tokenizer.ggml.pre`, mirroring llama.cpp's table of
//! pre-tokenizer regexes (`llama-vocab.cpp`) in their Hugging Face form.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::{GgufFile, GgufValue};
use crate::model::chat::ChatTemplate;
use crate::model::{LoadError, Tokenizer};

/// `tokenizer.ggml.token_type` values that mark special tokens.
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Llama 3's split regex, from its `tokenizer.json`.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub(super) fn build(file: &GgufFile) -> Result<Tokenizer, LoadError> {
    let meta = Metadata { file };
    let vocab = meta.vocabulary()?;
    let mut tok = Tokenizer::new(meta.bpe(&vocab)?);
    tok.bos_id = meta.token_id("tokenizer.ggml.bos_token_id", vocab.tokens.len())?;
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = meta.token_id(key, vocab.tokens.len())? {
            if !tok.eos_ids.contains(&id) {
                tok.eos_ids.push(id);
            }
        }
    }
    tok.add_bos = file.metadata("tokenizer.ggml.add_bos_token").and_then(GgufValue::as_bool).unwrap_or(false);
    tok.chat_template = meta.chat_template(&vocab.tokens, tok.bos_id)?;
    Ok(tok)
}

/// The tokens, merges and token types a GGUF stores.
struct Vocabulary<'a> {
    tokens: Vec<&'a str>,
    merges: Vec<(String, String)>,
    types: Vec<i64>,
}

/// The file's tokenizer metadata, read with errors that name the key.
struct Metadata<'a> {
    file: &'a GgufFile,
}

impl<'a> Metadata<'a> {
    fn invalid(&self, msg: String) -> LoadError {
        LoadError::Tokenizer { path: self.file.path().to_path_buf(), msg }
    }

    fn vocabulary(&self) -> Result<Vocabulary<'a>, LoadError> {
        let file = self.file;
        let invalid = |msg: &str| self.invalid(msg.to_string());
        let (Some(model), Some(tokens)) =
            (file.metadata("tokenizer.ggml.model"), file.metadata("tokenizer.ggml.tokens"))
        else {
            return Err(LoadError::MissingTokenizer { path: file.path().to_path_buf() });
        };
        let model = model.as_str().ok_or_else(|| invalid("`tokenizer.ggml.model` is not a string"))?;
        if model != "gpt2" {
            return Err(self.invalid(format!(
                "tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`); \
                 use the Hugging Face folder with its tokenizer.json instead"
            )));
        }
        let tokens: Vec<&str> =
            strings(tokens).ok_or_else(|| invalid("`tokenizer.ggml.tokens` is not an array of strings"))?;
        let merges =
            file.metadata("tokenizer.ggml.merges").ok_or_else(|| invalid("`tokenizer.ggml.merges` is missing"))?;
        let merges = strings(merges).ok_or_else(|| invalid("`tokenizer.ggml.merges` is not an array of strings"))?;
        let merges = merges
            .iter()
            .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("a merge in `tokenizer.ggml.merges` is not two tokens separated by a space"))?;
        let types: Vec<i64> = match file.metadata("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(integer).collect::<Option<Vec<_>>>())
                .filter(|t| t.len() == tokens.len())
                .ok_or_else(|| invalid("`tokenizer.ggml.token_type` is not one integer per token"))?,
        };
        Ok(Vocabulary { tokens, merges, types })
    }

    /// The byte-level BPE model with its pre-tokenizer, decoder and special tokens.
    fn bpe(&self, vocab: &Vocabulary) -> Result<tokenizers::Tokenizer, LoadError> {
        let pre = match self.file.metadata("tokenizer.ggml.pre") {
            None => "default",
            Some(v) => v.as_str().ok_or_else(|| self.invalid("`tokenizer.ggml.pre` is not a string".into()))?,
        };
        let (pre_tokenizer, ignore_merges) = pre_tokenizer(pre).map_err(|msg| self.invalid(msg))?;
        let mut ids: HashMap<String, u32> = HashMap::with_capacity(vocab.tokens.len());
        for (id, &t) in vocab.tokens.iter().enumerate() {
            ids.entry(t.to_string()).or_insert(id as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(ids.into_iter().collect::<Vocab>(), vocab.merges.clone())
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| self.invalid(format!("cannot build the BPE model: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = vocab
            .tokens
            .iter()
            .zip(&vocab.types)
            .filter(|(_, &ty)| ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED)
            .map(|(&t, _)| AddedToken::from(t, true))
            .collect();
        inner.add_special_tokens(&special);
        Ok(inner)
    }

    /// The token id stored under `key`, if any (an error if it is not one of `count` ids).
    fn token_id(&self, key: &str, count: usize) -> Result<Option<u32>, LoadError> {
        match self.file.metadata(key) {
            None => Ok(None),
            Some(v) => match integer(v) {
                Some(id) if (0..count as i64).contains(&id) => Ok(Some(id as u32)),
                _ => Err(self.invalid(format!("`{key}` is {v:?}, not a token id"))),
            },
        }
    }

    /// The chat template, with the texts of the BOS and EOS tokens it may refer to.
    fn chat_template(&self, tokens: &[&str], bos: Option<u32>) -> Result<Option<ChatTemplate>, LoadError> {
        let Some(source) = self.file.metadata("tokenizer.chat_template") else { return Ok(None) };
        let source = source.as_str().ok_or_else(|| self.invalid("`tokenizer.chat_template` is not a string".into()))?;
        let text = |id: Option<u32>| id.map(|i| tokens[i as usize].to_string()).unwrap_or_default();
        let eos = text(self.token_id("tokenizer.ggml.eos_token_id", tokens.len())?);
        let template =
            ChatTemplate::new(source, &text(bos), &eos).map_err(|msg| LoadError::format(self.file.path(), msg))?;
        Ok(Some(template))
    }
}

/// The pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` name, and whether the BPE model
/// takes a whole pre-token that is in the vocabulary without merging (Llama 3's `ignore_merges`).
fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool), String> {
    let byte_level = |use_regex: bool| ByteLevel::new(false, true, use_regex);
    Ok(match pre {
        // GPT-2's regex, applied by the byte-level pre-tokenizer itself.
        "default" | "gpt2" => (byte_level(true).into(), false),
        // Digits one by one, then GPT-2's regex (llama.cpp groups these under one regex set).
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva-7b" => {
            let seq = Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]);
            (seq.into(), false)
        }
        "llama3" | "llama-v3" | "llama-bpe" => {
            let split = Split::new(SplitPattern::Regex(LLAMA3_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| format!("invalid pre-tokenizer regex: {e}"))?;
            (Sequence::new(vec![split.into(), byte_level(false).into()]).into(), true)
        }
        other => return Err(format!("pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported")),
    })
}

fn strings(v: &GgufValue) -> Option<Vec<&str>> {
    v.as_array()?.iter().map(GgufValue::as_str).collect()
}

fn integer(v: &GgufValue) -> Option<i64> {
    match *v {
        GgufValue::I8(x) => Some(x as i64),
        GgufValue::I16(x) => Some(x as i64),
        GgufValue::I32(x) => Some(x as i64),
        GgufValue::I64(x) => Some(x),
        _ => v.as_u64().and_then(|x| i64::try_from(x).ok()),
    }
}
