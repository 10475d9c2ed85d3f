//! The engine's Llama forward (CPU backend, paged KV cache) on a tiny random model loaded
//! from a Hugging Face folder, against an independent f64 reference forward.

mod common;

use common::engine::{assert_matches_reference, load, new_cache, step, BLOCK_TABLE, TOKENS};
use common::tiny::{write_hf_dir, StDtype, TinyModel, TinySpec};
use common::vocab::{CHATML, TEXTS};
use common::TempDir;
use specula::model::chat::{ChatMessage, ChatTemplate};
use specula::model::safetensors::SafetensorsWeights;
use specula::model::{ModelConfig, Tokenizer};

const TOL: f64 = 1e-5;

fn check_safetensors(spec: TinySpec, seed: u64) {
    let model = TinyModel::random(spec, seed);
    for dtype in StDtype::ALL {
        let dir = TempDir::new("tiny-st");
        let stored = write_hf_dir(&model, dtype, dir.path());
        let config = ModelConfig::from_hf_json(&dir.join("config.json")).unwrap();
        let weights = SafetensorsWeights::open_dir(dir.path()).unwrap();
        let engine = load(config, &weights);
        assert_matches_reference(&engine, &stored, &TOKENS, TOL, &format!("{dtype:?} safetensors"));
    }
}

#[test]
fn smol_like_model_matches_reference_in_every_dtype() {
    check_safetensors(TinySpec::smol(), 1);
}

#[test]
fn llama3_like_model_matches_reference_in_every_dtype() {
    check_safetensors(TinySpec::llama3(), 2);
}

#[test]
fn config_json_is_read_as_written() {
    let spec = TinySpec::llama3();
    let model = TinyModel::random(spec.clone(), 3);
    let dir = TempDir::new("tiny-config");
    write_hf_dir(&model, StDtype::F32, dir.path());
    let c = ModelConfig::from_hf_json(&dir.join("config.json")).unwrap();
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size),
        (spec.hidden, spec.intermediate, spec.layers, spec.heads, spec.kv_heads, spec.head_dim, spec.vocab)
    );
    let r = c.rope_scaling.expect("llama3 rope scaling");
    assert_eq!((r.factor, r.original_max_position_embeddings), (8.0, 64));
    assert!(!c.tie_word_embeddings);
    assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (Some(1), &[2][..]));
}

/// Two sequences in one batch give bit-identical logits to each run alone, in prefill and in
/// decode (with rows of different lengths in the same step).
#[test]
fn batching_does_not_change_any_bit() {
    let model = TinyModel::random(TinySpec::smol(), 4);
    let dir = TempDir::new("tiny-batch");
    write_hf_dir(&model, StDtype::F32, dir.path());
    let config = ModelConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let engine = load(config, &SafetensorsWeights::open_dir(dir.path()).unwrap());

    let (a, b) = (&TOKENS[..], &TOKENS[3..16]);
    let (table_a, table_b): (&[u32], &[u32]) = (&BLOCK_TABLE, &[4, 6, 8, 9]);
    let vocab = engine.config.vocab_size;

    let alone_a = step(&engine, &mut new_cache(&engine), &[(a, 0, table_a, a.len())]);
    let alone_b = step(&engine, &mut new_cache(&engine), &[(b, 0, table_b, b.len())]);
    let both = step(&engine, &mut new_cache(&engine), &[(a, 0, table_a, a.len()), (b, 0, table_b, b.len())]);
    assert_eq!(both.len(), (a.len() + b.len()) * vocab);
    assert!(both[..a.len() * vocab] == alone_a[..], "row a changed when batched with b");
    assert!(both[a.len() * vocab..] == alone_b[..], "row b changed when batched with a");

    // Mixed step: a decodes its 11th token while b prefills 9 more after 4 cached.
    let mut kv_alone = new_cache(&engine);
    step(&engine, &mut kv_alone, &[(&a[..10], 0, table_a, 1)]);
    let decode_alone = step(&engine, &mut kv_alone, &[(&a[10..11], 10, table_a, 1)]);
    let mut kv_b = new_cache(&engine);
    step(&engine, &mut kv_b, &[(&b[..4], 0, table_b, 1)]);
    let prefill_alone = step(&engine, &mut kv_b, &[(&b[4..13], 4, table_b, 9)]);
    let mut kv = new_cache(&engine);
    step(&engine, &mut kv, &[(&a[..10], 0, table_a, 1), (&b[..4], 0, table_b, 1)]);
    let mixed = step(&engine, &mut kv, &[(&a[10..11], 10, table_a, 1), (&b[4..13], 4, table_b, 9)]);
    assert!(mixed[..vocab] == decode_alone[..], "decode row changed when batched with a prefill");
    assert!(mixed[vocab..] == prefill_alone[..], "prefill row changed when batched with a decode");
}

#[test]
fn hf_tokenizer_and_chat_template_load_from_the_folder() {
    let model = TinyModel::random(TinySpec::smol(), 5);
    let dir = TempDir::new("tiny-tok");
    write_hf_dir(&model, StDtype::F32, dir.path());
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tok.vocab_size(), TinySpec::smol().vocab);
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    for text in TEXTS {
        assert_eq!(tok.decode(&tok.encode(text, false)), *text);
    }
    let template = tok.chat_template.as_ref().expect("chat template");
    let want = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
    let msgs = [ChatMessage::user("Hi")];
    assert_eq!(template.render(&msgs, true), want.render(&msgs, true));
}
