//! The default model against an independent implementation: `reference/numpy_llama.py`
//! (NumPy, float64, its own GGUF dequantization and tokenizer) produced
//! `tests/golden/smollm2.json`. Greedy ids must match exactly and logits to 1e-3 relative.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use specula::backend::cpu::CpuBackend;
use specula::backend::{Backend, BatchMeta};
use specula::cli::default_model_path;
use specula::engine::Engine;
use specula::model::chat::ChatMessage;
use specula::model::{load_model, KvCache, ModelSource};
use specula::request::{GenerateRequest, Prompt};

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    chat: bool,
    prompt: String,
    rendered: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    prefill_logits_file: String,
    final_logits_file: String,
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn model_path() -> PathBuf {
    std::env::var_os("SPECULA_TEST_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| default_model_path().expect("default model"))
}

fn read_logits(file: &str) -> Vec<f32> {
    let bytes = std::fs::read(golden_dir().join(file)).expect("golden logits");
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// max |a − b| / max |b|
fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    diff / want.iter().map(|b| b.abs() as f64).fold(0.0, f64::max)
}

#[test]
fn default_model_matches_the_numpy_reference() {
    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("smollm2.json")).unwrap()).unwrap();
    let backend = CpuBackend::new();
    let loaded = load_model(&ModelSource::Path(model_path()), &backend).expect("load default model");
    let engine = Engine::new(backend, loaded.model, loaded.tokenizer);
    let tokenizer = engine.tokenizer.as_ref().unwrap();
    let block = specula::prompt::BLOCK_SIZE;

    for case in &golden.cases {
        // The same text and ids as the reference's own template and tokenizer.
        if case.chat {
            let template = tokenizer.chat_template.as_ref().expect("chat template");
            assert_eq!(template.render(&[ChatMessage::user(&case.prompt)], true).unwrap(), case.rendered);
        }
        assert_eq!(tokenizer.encode(&case.rendered, !case.chat), case.prompt_ids, "{}: prompt ids", case.name);

        let mut req = GenerateRequest::new(Prompt::Tokens(case.prompt_ids.clone()));
        req.max_tokens = case.greedy_ids.len();
        req.ignore_eos = true;
        let out = engine.generate(&req, |_, _| {}).unwrap();
        assert_eq!(out.token_ids, case.greedy_ids, "{}: greedy ids", case.name);

        // Prefill logits: the whole prompt in one forward.
        let all: Vec<u32> =
            case.prompt_ids.iter().chain(&case.greedy_ids[..case.greedy_ids.len() - 1]).copied().collect();
        let blocks = all.len().div_ceil(block);
        let table: Vec<u32> = (0..blocks as u32).rev().collect(); // not contiguous on purpose
        let mut kv = KvCache::new(&engine.backend, &engine.model.config, blocks, block).unwrap();
        let prefill = engine.prefill(&mut kv, &case.prompt_ids, &table).unwrap();
        let err = relative_error(&prefill, &read_logits(&case.prefill_logits_file));
        assert!(err < 1e-3, "{}: prefill logits relative error {err:e}", case.name);

        // Final logits: the generated tokens decoded one at a time through the paged cache.
        let mut logits = vec![];
        for (pos, &token) in all.iter().enumerate().skip(case.prompt_ids.len()) {
            let mut meta = BatchMeta::new(block as u32);
            meta.push_row(&[token], pos as u32, &table, 1);
            logits = engine.backend.to_host(&engine.model.forward(&engine.backend, &mut kv, &meta).unwrap()).unwrap();
        }
        let err = relative_error(&logits, &read_logits(&case.final_logits_file));
        assert!(err < 1e-3, "{}: final logits relative error {err:e}", case.name);
        eprintln!("{}: {} greedy ids equal; final logits relative error {err:.2e}", case.name, out.token_ids.len());
    }
}
