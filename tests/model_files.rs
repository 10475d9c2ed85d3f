//! Hostile model files: counts and hyper-parameters no model has (a 2^31 layer count, a NaN
//! RoPE base, a negative epsilon, zero heads) are refused with a `LoadError` naming the file
//! and the field, before anything is allocated for them; a shard index cannot point outside
//! its folder.

mod common;

use std::path::{Path, PathBuf};

use common::gguf_writer::{tiny_gguf, GgufBuilder, GgufDtype, Value};
use common::tiny::{write_hf_dir, StDtype, TinyModel, TinySpec};
use common::TempDir;
use specula::backend::cpu::CpuBackend;
use specula::model::{load_model, LoadError, ModelSource};

fn load(path: &Path) -> Result<(), LoadError> {
    load_model(&ModelSource::Path(path.to_path_buf()), &CpuBackend::new()).map(|_| ())
}

fn gguf_with(key: &str, value: Value) -> (TempDir, PathBuf) {
    let (mut b, _): (GgufBuilder, _) = tiny_gguf(&TinyModel::random(TinySpec::smol(), 3), GgufDtype::F32);
    b.set(key, value);
    let dir = TempDir::new("hostile-gguf");
    let path = dir.join("model.gguf");
    b.write(&path);
    (dir, path)
}

/// Loading fails with a format error naming the file and `field`.
fn assert_refused(path: &Path, field: &str) {
    let err = load(path).expect_err("the file is refused");
    let msg = err.to_string();
    assert!(matches!(err, LoadError::Format { .. }), "{msg}");
    assert!(msg.contains(&path.display().to_string()) && msg.contains(field), "{msg}");
}

#[test]
fn a_gguf_with_two_billion_layers_is_refused_not_allocated() {
    let (_dir, path) = gguf_with("llama.block_count", Value::U32(1 << 31));
    assert_refused(&path, "`llama.block_count` is 2147483648");
    // Within the sane bound, but more layers than the file has tensors for.
    let (_dir, path) = gguf_with("llama.block_count", Value::U32(1000));
    assert_refused(&path, "`llama.block_count` is 1000, but the file holds");
}

#[test]
fn gguf_hyper_parameters_no_model_has_are_refused_by_name() {
    let cases = [
        ("llama.rope.freq_base", Value::F32(f32::NAN), "`llama.rope.freq_base` is NaN"),
        ("llama.rope.freq_base", Value::F32(-1.0), "`llama.rope.freq_base` is -1"),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(-1e-5), "`llama.attention.layer_norm_rms_epsilon`"),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(f32::NAN), "`llama.attention.layer_norm_rms_epsilon`"),
        ("llama.attention.head_count", Value::U32(0), "`llama.attention.head_count` is 0"),
        ("llama.attention.head_count", Value::U64(1 << 40), "`llama.attention.head_count` is 1099511627776"),
        ("llama.attention.head_count_kv", Value::U32(3), "`llama.attention.head_count_kv` is 3"),
        ("llama.embedding_length", Value::U64(u64::MAX), "`llama.embedding_length`"),
        ("llama.context_length", Value::U64(1 << 40), "`llama.context_length`"),
        ("llama.vocab_size", Value::U32(u32::MAX), "`llama.vocab_size`"),
        ("llama.attention.key_length", Value::U32(1 << 30), "`llama.attention.key_length`"),
    ];
    for (key, value, field) in cases {
        let (_dir, path) = gguf_with(key, value);
        assert_refused(&path, field);
    }
}

fn hf_dir_with(edit: impl FnOnce(&mut serde_json::Value)) -> TempDir {
    let dir = TempDir::new("hostile-hf");
    write_hf_dir(&TinyModel::random(TinySpec::smol(), 4), StDtype::F32, dir.path());
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    dir
}

#[test]
fn config_json_values_no_model_has_are_refused_by_name() {
    let cases: [(&str, serde_json::Value, &str); 8] = [
        ("num_hidden_layers", (1u64 << 31).into(), "`num_hidden_layers` is 2147483648"),
        ("rope_theta", (-10000.0).into(), "`rope_theta` is -10000"),
        ("rope_theta", 0.0.into(), "`rope_theta` is 0"),
        ("rms_norm_eps", (-1e-6).into(), "`rms_norm_eps` is -0.000001"),
        ("num_attention_heads", 0.into(), "`num_attention_heads` is 0"),
        ("num_key_value_heads", 1000.into(), "`num_key_value_heads` is 1000"),
        ("vocab_size", (1u64 << 40).into(), "`vocab_size` is 1099511627776"),
        ("max_position_embeddings", 1.into(), "`max_position_embeddings` is 1"),
    ];
    for (key, value, field) in cases {
        let dir = hf_dir_with(|c| c[key] = value.clone());
        let err = load(dir.path()).expect_err("refused");
        let msg = err.to_string();
        let config = dir.join("config.json").display().to_string();
        assert!(matches!(err, LoadError::Format { .. }) && msg.contains(&config) && msg.contains(field), "{msg}");
    }
    let dir = hf_dir_with(|c| {
        c["rope_scaling"] =
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0})
    });
    let msg = load(dir.path()).expect_err("refused").to_string();
    assert!(msg.contains("`rope_scaling`"), "{msg}");
}

#[test]
fn a_shard_index_cannot_name_files_outside_its_folder() {
    let dir = hf_dir_with(|_| {});
    let outside = TempDir::new("hostile-outside");
    std::fs::copy(dir.join("model.safetensors"), outside.join("model.safetensors")).unwrap();
    let relative = format!("../{}/model.safetensors", outside.path().file_name().unwrap().to_str().unwrap());
    for name in [relative.as_str(), outside.join("model.safetensors").to_str().unwrap()] {
        let index = serde_json::json!({ "weight_map": { "model.embed_tokens.weight": name } });
        let index_path = dir.join("model.safetensors.index.json");
        std::fs::write(&index_path, index.to_string()).unwrap();
        let err = load(dir.path()).expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains(&index_path.display().to_string()) && msg.contains(name), "{msg}");
    }
}
