//! A tiny byte-level BPE vocabulary in the SmolLM2 style: three special tokens first
//! (`<|endoftext|>`, `<|im_start|>` = 1, `<|im_end|>` = 2), then the 256 byte symbols, then
//! merges learned on a small corpus by a plain BPE trainer written here.

use std::collections::BTreeMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::AddedToken;

pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;

/// SmolLM2's chat template.
pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const CORPUS: &str = "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox \
    runs home. Hello world! Hello there, how are you today? I am fine, thank you. The weather is \
    nice and the sun is warm; the dog and the fox are friends now. Where is the station? It is there.";

/// Texts that exercise the tokenizer: specials inside text, digits, unicode, odd whitespace.
pub const TEXTS: &[&str] = &[
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>user\nHi there 12345<|im_end|>\n<|im_start|>assistant\n",
    "héllo wörld ✓ 日本語 🙂",
    "  leading spaces,\ttabs\n\nand   runs of   spaces  ",
    "it's 3.14159 o'clock, isn't it? 2024-11-24",
    "",
];

#[derive(Debug)]
pub struct TinyVocab {
    pub tokens: Vec<String>,
    /// llama.cpp token types: 3 = control (special), 1 = normal.
    pub types: Vec<i32>,
    pub merges: Vec<(String, String)>,
}

/// GPT-2's reversible map from bytes to printable characters.
pub fn byte_to_char() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                let c = char::from_u32(next).unwrap();
                next += 1;
                c
            }
        })
        .collect()
}

/// A vocabulary of exactly `size` tokens (`size` ≥ 259).
pub fn tiny_vocab(size: usize) -> TinyVocab {
    let chars = byte_to_char();
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3; SPECIALS.len()];
    tokens.extend(chars.iter().map(|c| c.to_string()));
    types.extend(std::iter::repeat_n(1, 256));

    // Words keep their leading space, as GPT-2's pre-tokenizer does.
    let mut words: Vec<Vec<String>> = Vec::new();
    let mut current = String::new();
    for ch in CORPUS.chars() {
        if ch == ' ' && !current.is_empty() {
            words.push(encode_word(&current, &chars));
            current.clear();
        }
        current.push(ch);
    }
    words.push(encode_word(&current, &chars));

    let mut merges = Vec::new();
    while tokens.len() < size {
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        for w in &words {
            for p in w.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += 1;
            }
        }
        // Most frequent pair; ties go to the smallest pair, so the vocabulary is deterministic.
        let Some((best, _)) = counts.into_iter().rev().max_by_key(|(_, c)| *c) else {
            panic!("corpus too small for a vocabulary of {size}");
        };
        let merged = format!("{}{}", best.0, best.1);
        for w in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == best.0 && w[i + 1] == best.1 {
                    w[i] = merged.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        if !tokens.contains(&merged) {
            tokens.push(merged);
            types.push(1);
        }
        merges.push(best);
    }
    TinyVocab { tokens, types, merges }
}

fn encode_word(word: &str, chars: &[char]) -> Vec<String> {
    word.bytes().map(|b| chars[b as usize].to_string()).collect()
}

impl TinyVocab {
    /// The Hugging Face tokenizer for this vocabulary, built as SmolLM2's `tokenizer.json` is:
    /// digits split one by one, byte-level with GPT-2's regex, special tokens as added tokens.
    pub fn hf_tokenizer(&self) -> tokenizers::Tokenizer {
        let vocab: Vocab = self.tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, self.merges.clone()).build().unwrap();
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect();
        tok.add_special_tokens(&specials);
        tok
    }

    /// Merges as GGUF and `merges.txt` write them: "a b".
    pub fn merge_strings(&self) -> Vec<String> {
        self.merges.iter().map(|(a, b)| format!("{a} {b}")).collect()
    }
}
