//! What each fuzz target runs, and the properties it checks: an input is loaded (and then
//! used: a forward step, a tokenization, a render) or refused with an error naming the file;
//! nothing panics, nothing allocates without bound, nothing runs without bound.

use std::path::Path;
use std::time::Instant;

use specula::backend::cpu::CpuBackend;
use specula::backend::{Backend, BatchMeta};
use specula::model::chat::{ChatMessage, ChatTemplate, MAX_RENDERED_BYTES};
use specula::model::{load_model, KvCache, LoadError, LoadedModel, ModelSource};

use super::common::gguf_writer::{tiny_gguf, GgufDtype};
use super::common::tiny::{write_hf_dir, StDtype, TinyModel, TinySpec};
use super::common::vocab::CHATML;

pub struct Target {
    pub name: &'static str,
    /// Its slot in `alloc::CURRENT`.
    pub slot: usize,
    /// Roughly where the input's header ends (mutations favour it).
    pub header: usize,
    pub dictionary: &'static [&'static [u8]],
    /// Prepares the scratch folder once (the files a target does not fuzz).
    pub setup: fn(&Path),
    /// Runs one input in the scratch folder; `Err` names a broken property.
    pub run: fn(&Path, &[u8]) -> Result<(), String>,
}

/// The smallest model that still has every part: one layer, grouped-query attention, a
/// byte-level BPE vocabulary with merges and special tokens, a chat template.
pub fn micro_model() -> TinyModel {
    let spec = TinySpec {
        hidden: 32,
        intermediate: 32,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        head_dim: 16,
        vocab: 264,
        max_positions: 64,
        ..TinySpec::smol()
    };
    TinyModel::random(spec, 9)
}

/// The seed inputs generated from the test helpers (checked in under `corpus/`).
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let model = micro_model();
    let dir = common_dir();
    write_hf_dir(&model, StDtype::Bf16, dir.path());
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    vec![
        ("gguf", "micro-q8_0.gguf", tiny_gguf(&model, GgufDtype::Q8_0).0.to_bytes()),
        ("gguf", "micro-f16.gguf", tiny_gguf(&model, GgufDtype::F16).0.to_bytes()),
        ("safetensors", "micro-bf16.safetensors", read("model.safetensors")),
        ("config_json", "micro-config.json", read("config.json")),
        ("chat_template", "chatml.jinja", CHATML.as_bytes().to_vec()),
    ]
}

fn common_dir() -> super::common::TempDir {
    super::common::TempDir::new("fuzz-seeds")
}

/// Every error names the file (or the folder) it is about.
fn names(err: &LoadError, place: &Path) -> Result<(), String> {
    let msg = err.to_string();
    match msg.contains(&place.display().to_string()) {
        true => Ok(()),
        false => Err(format!("the error does not name {}: {msg}", place.display())),
    }
}

/// A loaded model must run: one forward step over two tokens, and its tokenizer and chat
/// template must work on a short conversation.
fn exercise(loaded: &LoadedModel<CpuBackend>) -> Result<(), String> {
    let (model, backend) = (&loaded.model, CpuBackend::new());
    let vocab = model.config.vocab_size as u32;
    let mut kv = KvCache::new(&backend, &model.config, 1, 16).map_err(|e| e.to_string())?;
    let mut meta = BatchMeta::new(16);
    meta.push_row(&[0, 1 % vocab], 0, &[0], 1);
    let logits = model.forward(&backend, &mut kv, &meta).map_err(|e| e.to_string())?;
    let logits = backend.to_host(&logits).map_err(|e| e.to_string())?;
    if logits.len() != vocab as usize {
        return Err(format!("{} logits for a vocabulary of {vocab}", logits.len()));
    }
    if let Some(tok) = &loaded.tokenizer {
        let ids = tok.encode("Hello <|im_start|> wörld 123", true);
        let _ = tok.decode(&ids);
        if let Some(t) = &tok.chat_template {
            let _ = t.render(&conversation(), true);
        }
    }
    Ok(())
}

fn load_gguf(dir: &Path, input: &[u8]) -> Result<(), String> {
    let path = dir.join("model.gguf");
    std::fs::write(&path, input).map_err(|e| e.to_string())?;
    match load_model(&ModelSource::Path(path.clone()), &CpuBackend::new()) {
        Ok(loaded) => exercise(&loaded),
        Err(e) => names(&e, &path),
    }
}

/// A Hugging Face folder with one of its files replaced by the input.
fn load_folder_with(dir: &Path, file: &str, input: &[u8]) -> Result<(), String> {
    std::fs::write(dir.join(file), input).map_err(|e| e.to_string())?;
    match load_model(&ModelSource::Path(dir.to_path_buf()), &CpuBackend::new()) {
        Ok(loaded) => exercise(&loaded),
        Err(e) => names(&e, dir),
    }
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage { role: "system".into(), content: "Be brief.".into() },
        ChatMessage::user("Hi {{ there }} {% raw %}"),
        ChatMessage::assistant("Hello! ✓"),
        ChatMessage::user(""),
    ]
}

fn render_template(_: &Path, input: &[u8]) -> Result<(), String> {
    let source = String::from_utf8_lossy(input);
    let Ok(template) = ChatTemplate::new(&source, "<s>", "</s>") else { return Ok(()) };
    for (messages, open) in [(conversation(), true), (vec![], false)] {
        let start = Instant::now();
        if let Ok(text) = template.render(&messages, open) {
            if text.len() > MAX_RENDERED_BYTES {
                return Err(format!("rendered {} bytes, more than the cap", text.len()));
            }
        }
        if start.elapsed().as_secs() >= 5 {
            return Err(format!("one render took {:?}", start.elapsed()));
        }
    }
    Ok(())
}

fn setup_folder(dir: &Path) {
    write_hf_dir(&micro_model(), StDtype::Bf16, dir);
}

const JSON_WORDS: &[&[u8]] = &[
    b"\"num_hidden_layers\": ",
    b"\"num_attention_heads\": ",
    b"\"num_key_value_heads\": ",
    b"\"head_dim\": ",
    b"\"vocab_size\": ",
    b"\"hidden_size\": ",
    b"\"max_position_embeddings\": ",
    b"\"rope_theta\": ",
    b"\"rms_norm_eps\": ",
    b"\"tie_word_embeddings\": false, ",
    b"\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 0, \"low_freq_factor\": 4, \"high_freq_factor\": 1}, ",
    b"\"eos_token_id\": [1, 2, 4294967295], ",
    b"\"dtype\": \"F8_E4M3\", ",
    b"\"shape\": [4294967296, 0], ",
    b"\"data_offsets\": [0, 18446744073709551615], ",
    b"\"__metadata__\": {}, ",
    b"null",
    b"1e999",
    b"-0.0",
    b"[]",
    b"{}",
];

const TEMPLATE_WORDS: &[&[u8]] = &[
    b"{% for m in messages %}",
    b"{% endfor %}",
    b"{% if loop.first %}",
    b"{% endif %}",
    b"{{ m['content'] }}",
    b"{% for i in range(100000) %}",
    b"{{ 'x' * 1000000 }}",
    b"{{ messages * 1000000 }}",
    b"{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    b"{% set ns = namespace(a=0) %}{% set ns.a = ns.a + 1 %}",
    b"{{ raise_exception('no') }}",
    b"{{ m.content|tojson }}",
    b"{{ (messages|length) ** 1000 }}",
    b"{{ 'a'|indent(100000000) }}",
    b"{{ 'a'|center(100000000) }}",
    b"{{ m.content.split('') }}",
    b"{{ ''.join(messages|map(attribute='role')) }}",
    b"{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
    b"{{ 9223372036854775807 + 1 }}",
    b"{{ range(10)|batch(0)|list }}",
    b"{% filter upper %}",
    b"{% endfilter %}",
    b"{% raw %}",
    b"{{ bos_token ~ eos_token }}",
];

pub const GGUF: Target = Target {
    name: "gguf",
    slot: 0,
    header: 8192,
    dictionary: &[b"llama.block_count", b"general.alignment", b"tokenizer.ggml.tokens", b"\x09\x00\x00\x00"],
    setup: |_| {},
    run: load_gguf,
};

pub const SAFETENSORS: Target = Target {
    name: "safetensors",
    slot: 1,
    header: 2048,
    dictionary: JSON_WORDS,
    setup: setup_folder,
    run: |dir, input| load_folder_with(dir, "model.safetensors", input),
};

pub const CONFIG_JSON: Target = Target {
    name: "config_json",
    slot: 2,
    header: 1024,
    dictionary: JSON_WORDS,
    setup: setup_folder,
    run: |dir, input| load_folder_with(dir, "config.json", input),
};

pub const CHAT_TEMPLATE: Target = Target {
    name: "chat_template",
    slot: 3,
    header: 4096,
    dictionary: TEMPLATE_WORDS,
    setup: |_| {},
    run: render_template,
};
