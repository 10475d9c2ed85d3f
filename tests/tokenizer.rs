//! The tokenizer rebuilt from the default model's GGUF metadata against ids from an
//! independent implementation (`tests/golden/smollm2.json`, produced by a NumPy/Python
//! byte-level BPE cross-checked with the `tokenizers` package).

mod common;

use std::path::Path;

use serde::Deserialize;
use specula::model::gguf::GgufFile;
use specula::model::Tokenizer;

#[derive(Deserialize)]
struct Golden {
    tokenizer_cases: Vec<TokenizerCase>,
    cases: Vec<PromptCase>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct PromptCase {
    name: String,
    rendered: String,
    prompt_ids: Vec<u32>,
}

fn golden() -> Golden {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/smollm2.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn default_tokenizer() -> Option<Tokenizer> {
    let path = common::default_model_path()?;
    Some(GgufFile::open(&path).unwrap().tokenizer().unwrap())
}

#[test]
fn encodes_golden_texts_to_golden_ids() {
    let Some(tok) = default_tokenizer() else { return };
    let golden = golden();
    assert!(!golden.tokenizer_cases.is_empty());
    let mut failures = Vec::new();
    for case in &golden.tokenizer_cases {
        let ids = tok.encode(&case.text, true);
        if ids != case.ids {
            failures.push(format!("{:?}:\n  got  {ids:?}\n  want {:?}", case.text, case.ids));
        }
        assert_eq!(tok.decode(&ids), case.text, "decode(encode(text)) for {:?}", case.text);
    }
    assert!(
        failures.is_empty(),
        "{} of {} texts differ:\n{}",
        failures.len(),
        golden.tokenizer_cases.len(),
        failures.join("\n")
    );
}

#[test]
fn rendered_prompts_encode_to_golden_prompt_ids() {
    let Some(tok) = default_tokenizer() else { return };
    for case in golden().cases {
        let ids = tok.encode(&case.rendered, true);
        assert_eq!(ids, case.prompt_ids, "case {}", case.name);
        assert_eq!(tok.decode(&ids), case.rendered, "case {}", case.name);
    }
}

#[test]
fn special_ids_and_chat_template_come_from_metadata() {
    let Some(tok) = default_tokenizer() else { return };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!((tok.bos_id, tok.eos_ids.as_slice(), tok.add_bos), (Some(1), &[2][..], false));
    for (text, id) in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)] {
        assert_eq!(tok.token_to_id(text), Some(id));
        assert_eq!(tok.encode(text, false), [id]);
    }
    let template = tok.chat_template.as_ref().expect("chat template in the GGUF");
    let out = template.render(&[specula::model::chat::ChatMessage::user("Hi")], true).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}
