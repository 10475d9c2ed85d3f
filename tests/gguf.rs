//! GGUF loading: the tiny model written as llama.cpp writes a Llama, in every supported tensor
//! type, read back exactly and run against the f64 reference; the tokenizer rebuilt from GGUF
//! metadata; and clear errors, naming the file and tensor, for broken files.

mod common;

use common::engine::{assert_matches_reference, load, TOKENS};
use common::gguf_writer::{
    tiny_gguf, GgufBuilder, GgufDtype, Value, GGML_BF16, GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q5_K, GGML_Q8_0,
};
use common::tiny::{TinyModel, TinySpec};
use common::vocab::{CHATML, TEXTS};
use common::TempDir;
use half::f16;
use indicatif::ProgressBar;
use specula::backend::cpu::CpuBackend;
use specula::model::chat::{ChatMessage, ChatTemplate};
use specula::model::gguf::GgufFile;
use specula::model::llama::{Llama, Weights};
use specula::model::{LoadError, WeightSource};

const TOL: f64 = 1e-5;

fn write(b: &GgufBuilder, dir: &TempDir) -> std::path::PathBuf {
    let path = dir.join("model.gguf");
    b.write(&path);
    path
}

fn check_gguf(spec: TinySpec, seed: u64) {
    let model = TinyModel::random(spec, seed);
    for dtype in GgufDtype::ALL {
        let dir = TempDir::new("gguf-fwd");
        let (builder, stored) = tiny_gguf(&model, dtype);
        let file = GgufFile::open(&write(&builder, &dir)).unwrap();
        let engine = load(file.config().unwrap(), &file);
        assert_matches_reference(&engine, &stored, &TOKENS, TOL, &format!("{dtype:?} GGUF"));
    }
}

#[test]
fn smol_like_model_matches_reference_in_every_type() {
    check_gguf(TinySpec::smol(), 11);
}

#[test]
fn llama3_like_model_matches_reference_in_every_type() {
    check_gguf(TinySpec::llama3(), 12);
}

/// Every weight reads back bit-exactly as the test's own decoder decodes it, in the Hugging
/// Face layout (Q/K rows un-permuted), whatever the tensor type and data alignment.
#[test]
fn every_tensor_reads_back_exactly() {
    for spec in [TinySpec::smol(), TinySpec::llama3()] {
        let model = TinyModel::random(spec, 13);
        for dtype in GgufDtype::ALL {
            for alignment in [32, 64] {
                let dir = TempDir::new("gguf-exact");
                let (mut builder, stored) = tiny_gguf(&model, dtype);
                builder.alignment = alignment;
                let file = GgufFile::open(&write(&builder, &dir)).unwrap();
                for (name, (shape, want)) in &stored.weights {
                    let got = file.tensor(name, shape).unwrap();
                    assert_eq!(&got.shape, shape, "{name}");
                    assert!(got.data == *want, "{name} ({dtype:?}, alignment {alignment}) differs");
                }
                assert_eq!(file.contains("lm_head.weight"), !model.spec.tied);
                assert!(!file.contains("model.layers.7.mlp.up_proj.weight"));
            }
        }
    }
}

#[test]
fn config_comes_from_metadata() {
    let dir = TempDir::new("gguf-config");
    for spec in [TinySpec::smol(), TinySpec::llama3()] {
        let model = TinyModel::random(spec.clone(), 14);
        let (builder, _) = tiny_gguf(&model, GgufDtype::Q8_0);
        let c = GgufFile::open(&write(&builder, &dir)).unwrap().config().unwrap();
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size),
            (spec.hidden, spec.intermediate, spec.layers, spec.heads, spec.kv_heads, spec.head_dim, spec.vocab)
        );
        assert_eq!(c.tie_word_embeddings, spec.tied);
        assert_eq!((c.rope_theta, c.rms_norm_eps), (spec.rope_theta as f32, spec.eps as f32));
        assert_eq!(c.max_position_embeddings, spec.max_positions);
        assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (Some(1), &[2][..]));
        match (spec.rope_scaling, c.rope_scaling) {
            (None, None) => {}
            (Some(want), Some(got)) => {
                assert_eq!(got.factor as f64, want.factor);
                assert_eq!(got.low_freq_factor as f64, want.low_freq_factor);
                assert_eq!(got.high_freq_factor as f64, want.high_freq_factor);
                assert_eq!(got.original_max_position_embeddings, want.original_max_position_embeddings);
            }
            (want, got) => panic!("rope scaling: wanted {want:?}, got {got:?}"),
        }
    }
}

/// Reads a single 1-D tensor of `n` values stored as `type_id` with these raw bytes.
fn read_raw(type_id: u32, bytes: Vec<u8>, n: usize) -> Result<Vec<f32>, LoadError> {
    let dir = TempDir::new("gguf-raw");
    let mut b = GgufBuilder::new("llama");
    b.add_tensor("output_norm.weight", vec![n as u64], type_id, bytes);
    let file = GgufFile::open(&write(&b, &dir))?;
    file.tensor("model.norm.weight", &[n]).map(|t| t.data)
}

#[test]
fn known_blocks_dequantize_to_exact_values() {
    let f16_bits = |x: f32| f16::from_f32(x).to_le_bytes();

    // Q8_0: d = f16(0.1) (not exactly 0.1), qs = -128, -120, ..., covering the i8 range.
    let d = f16::from_f32(0.1).to_f32();
    let qs: Vec<i8> = (0..32).map(|j| (j * 8 - 128) as i8).collect();
    let mut block = f16_bits(0.1).to_vec();
    block.extend(qs.iter().map(|&q| q as u8));
    let want: Vec<f32> = qs.iter().map(|&q| q as f32 * d).collect();
    assert_eq!(read_raw(GGML_Q8_0, block, 32).unwrap(), want);

    // Q4_0: byte j holds element j (low nibble) and element j + 16 (high nibble); value (n − 8)·d.
    let mut block = f16_bits(0.25).to_vec();
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let want: Vec<f32> =
        (0..32).map(|j| if j < 16 { (j - 8) as f32 * 0.25 } else { (15 - (j - 16) - 8) as f32 * 0.25 }).collect();
    assert_eq!(read_raw(GGML_Q4_0, block, 32).unwrap(), want);

    // Q4_1: value n·d + m, two blocks.
    let mut bytes = Vec::new();
    for (d, m) in [(0.5f32, -1.5f32), (2.0, 3.0)] {
        bytes.extend(f16_bits(d));
        bytes.extend(f16_bits(m));
        bytes.extend((0..16u8).map(|j| (j % 16) | (((j * 7) % 16) << 4)));
    }
    let want: Vec<f32> = [(0.5f32, -1.5f32), (2.0, 3.0)]
        .iter()
        .flat_map(|&(d, m)| {
            (0..32u32).map(move |j| if j < 16 { j as f32 * d + m } else { ((j - 16) * 7 % 16) as f32 * d + m })
        })
        .collect();
    assert_eq!(read_raw(GGML_Q4_1, bytes, 64).unwrap(), want);

    // F16 and BF16, including extremes and a subnormal.
    let values = [1.0f32, -2.5, 65504.0, 5.960_464_5e-8, 0.0, -0.0, 0.333_251_95, 1025.0];
    let bytes = values.iter().flat_map(|&x| f16_bits(x)).collect();
    assert_eq!(read_raw(GGML_F16, bytes, 8).unwrap(), values);
    let bf = [0x3f80u16, 0xc020, 0x7f7f, 0x0001, 0x0000, 0x8000, 0x3eab, 0x4480];
    let want: Vec<f32> = bf.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
    assert_eq!(read_raw(GGML_BF16, bf.iter().flat_map(|b| b.to_le_bytes()).collect(), 8).unwrap(), want);
}

#[test]
fn tokenizer_is_rebuilt_from_metadata() {
    let model = TinyModel::random(TinySpec::smol(), 15);
    let dir = TempDir::new("gguf-tok");
    let (builder, _) = tiny_gguf(&model, GgufDtype::Q4_0);
    let tok = GgufFile::open(&write(&builder, &dir)).unwrap().tokenizer().unwrap();
    let hf = model.vocab.hf_tokenizer();
    assert_eq!(tok.vocab_size(), model.spec.vocab);
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!((tok.bos_id, tok.eos_ids.as_slice(), tok.add_bos), (Some(1), &[2][..], false));
    for text in TEXTS {
        let ids = tok.encode(text, true);
        let want = hf.encode_fast(*text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids, want, "ids of {text:?}");
        assert_eq!(tok.decode(&ids), *text, "round trip of {text:?}");
    }
    assert_eq!(tok.encode("<|im_start|>user", false)[0], 1);
    let msgs = [ChatMessage::user("Hi"), ChatMessage::assistant("Hello!"), ChatMessage::user("2 + 2?")];
    let want = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap().render(&msgs, true).unwrap();
    assert_eq!(tok.chat_template.as_ref().unwrap().render(&msgs, true).unwrap(), want);
}

/// The pre-tokenizer follows `tokenizer.ggml.pre`: digits one by one for SmolLM2, in groups of
/// up to three with Llama 3's regex.
#[test]
fn pre_tokenizer_follows_metadata() {
    let model = TinyModel::random(TinySpec::smol(), 16);
    let dir = TempDir::new("gguf-pre");
    let splits = |pre: &str| -> Vec<String> {
        let (mut builder, _) = tiny_gguf(&model, GgufDtype::F32);
        builder.set("tokenizer.ggml.pre", Value::str(pre));
        let tok = GgufFile::open(&write(&builder, &dir)).unwrap().tokenizer().unwrap();
        let mut pre_tokenized = tokenizers::PreTokenizedString::from("Hello 12345 world's");
        use tokenizers::PreTokenizer;
        tok.inner().get_pre_tokenizer().unwrap().pre_tokenize(&mut pre_tokenized).unwrap();
        pre_tokenized
            .get_splits(tokenizers::OffsetReferential::Original, tokenizers::OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect()
    };
    assert_eq!(splits("smollm"), ["Hello", "Ġ", "1", "2", "3", "4", "5", "Ġworld", "'s"]);
    assert_eq!(splits("llama-bpe"), ["Hello", "Ġ", "123", "45", "Ġworld", "'s"]);
    assert_eq!(splits("gpt2"), ["Hello", "Ġ12345", "Ġworld", "'s"]);
}

// ---- errors: each names the file, and the tensor where one is involved ----

fn open_err(b: &GgufBuilder) -> (String, String) {
    let dir = TempDir::new("gguf-err");
    let path = write(b, &dir);
    let err = GgufFile::open(&path).unwrap_err();
    (err.to_string(), path.display().to_string())
}

fn open_bytes_err(bytes: &[u8]) -> (LoadError, String) {
    let dir = TempDir::new("gguf-err");
    let path = dir.join("broken.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    (err, path.display().to_string())
}

fn tiny_builder() -> GgufBuilder {
    tiny_gguf(&TinyModel::random(TinySpec::smol(), 17), GgufDtype::Q8_0).0
}

fn load_err(b: &GgufBuilder) -> (LoadError, String) {
    let dir = TempDir::new("gguf-err");
    let path = write(b, &dir);
    let file = GgufFile::open(&path).unwrap();
    let result =
        Llama::load(file.config().unwrap(), Weights::Source(&file), &CpuBackend::new(), &ProgressBar::hidden());
    (result.err().expect("load fails"), path.display().to_string())
}

#[test]
fn truncated_file_names_file_and_tensor() {
    let b = tiny_builder();
    let bytes = b.to_bytes();
    let (err, path) = open_bytes_err(&bytes[..bytes.len() - 100]);
    let last = &b.tensors.last().unwrap().name;
    let msg = err.to_string();
    assert!(matches!(err, LoadError::Format { .. }), "{msg}");
    assert!(msg.contains(&path) && msg.contains(last.as_str()) && msg.contains("truncated"), "{msg}");

    // Cut inside the metadata and inside the tensor table.
    for cut in [10, 100, 5000, bytes.len() - b.tensors.iter().map(|t| t.data.len()).sum::<usize>() - 40] {
        let (err, path) = open_bytes_err(&bytes[..cut]);
        let msg = err.to_string();
        assert!(
            matches!(err, LoadError::Format { .. }) && msg.contains(&path) && msg.contains("truncated"),
            "cut {cut}: {msg}"
        );
    }
    let (err, path) = open_bytes_err(&[]);
    assert!(matches!(err, LoadError::Format { .. }) && err.to_string().contains(&path), "{err}");
}

#[test]
fn corrupt_magic_and_unsupported_version_are_refused() {
    let mut bytes = tiny_builder().to_bytes();
    bytes[..4].copy_from_slice(b"GGML");
    let (err, path) = open_bytes_err(&bytes);
    assert!(matches!(err, LoadError::Format { .. }), "{err}");
    assert!(err.to_string().contains(&path) && err.to_string().contains("not a GGUF file"), "{err}");

    let mut b = tiny_builder();
    b.version = 1;
    let (msg, path) = open_err(&b);
    assert!(msg.contains(&path) && msg.contains("version 1"), "{msg}");
}

#[test]
fn tensor_data_outside_the_file_is_refused() {
    let mut b = tiny_builder();
    // Claims more rows than its data holds.
    b.tensor_mut("output_norm.weight").dims = vec![64, 1000];
    let (msg, path) = open_err(&b);
    assert!(msg.contains(&path) && msg.contains("output_norm.weight"), "{msg}");
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let mut b = tiny_builder();
    b.remove_tensor("blk.1.ffn_up.weight");
    let (err, path) = load_err(&b);
    let msg = err.to_string();
    assert!(matches!(err, LoadError::MissingTensor { .. }), "{msg}");
    assert!(
        msg.contains(&path) && msg.contains("blk.1.ffn_up.weight") && msg.contains("model.layers.1.mlp.up_proj.weight"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_names_file_and_tensor() {
    let mut b = tiny_builder();
    // Same number of values, transposed: [kv_dim, hidden] read as [hidden, kv_dim].
    let t = b.tensor_mut("blk.0.attn_v.weight");
    t.dims = vec![32, 64];
    let (err, path) = load_err(&b);
    let msg = err.to_string();
    assert!(matches!(err, LoadError::Shape { .. }), "{msg}");
    assert!(msg.contains(&path) && msg.contains("blk.0.attn_v.weight") && msg.contains("[64, 32]"), "{msg}");
}

#[test]
fn unsupported_tensor_type_names_file_tensor_and_type() {
    let err = read_raw(GGML_Q5_K, vec![0; 176], 256).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LoadError::Dtype { .. }), "{msg}");
    assert!(msg.contains("model.gguf") && msg.contains("output_norm.weight") && msg.contains("Q5_K"), "{msg}");

    let err = read_raw(99, vec![0; 64], 16).unwrap_err();
    assert!(matches!(err, LoadError::Dtype { .. }) && err.to_string().contains("99"), "{err}");

    // In a whole model, the load fails at that tensor.
    let mut b = tiny_builder();
    let t = b.tensor_mut("blk.0.ffn_gate.weight");
    t.dims = vec![256, 24];
    t.type_id = GGML_Q5_K;
    t.data = vec![0; 24 * 176];
    let (err, path) = load_err(&b);
    let msg = err.to_string();
    assert!(
        matches!(err, LoadError::Dtype { .. }) && msg.contains(&path) && msg.contains("blk.0.ffn_gate.weight"),
        "{msg}"
    );
}

#[test]
fn other_architectures_are_refused() {
    let mut b = tiny_builder();
    b.set("general.architecture", Value::str("qwen2"));
    let (msg, path) = open_err(&b);
    assert!(msg.contains(&path) && msg.contains("qwen2"), "{msg}");
    let dir = TempDir::new("gguf-arch");
    let err = GgufFile::open(&write(&b, &dir)).unwrap_err();
    assert!(matches!(err, LoadError::Architecture { .. }), "{err}");
}

#[test]
fn missing_or_unsupported_tokenizer_is_a_clear_error() {
    let dir = TempDir::new("gguf-notok");
    let tokenizer_error = |b: &GgufBuilder| -> (LoadError, String) {
        let path = write(b, &dir);
        (GgufFile::open(&path).unwrap().tokenizer().err().expect("tokenizer fails"), path.display().to_string())
    };
    let mut b = tiny_builder();
    let keys: Vec<String> = b.kv.iter().map(|(k, _)| k.clone()).filter(|k| k.starts_with("tokenizer.")).collect();
    keys.iter().for_each(|k| b.remove(k));
    let (err, path) = tokenizer_error(&b);
    assert!(matches!(err, LoadError::MissingTokenizer { .. }) && err.to_string().contains(&path), "{err}");

    let mut b = tiny_builder();
    b.set("tokenizer.ggml.model", Value::str("llama"));
    let (err, path) = tokenizer_error(&b);
    assert!(matches!(err, LoadError::Tokenizer { .. }) && err.to_string().contains(&path), "{err}");

    let mut b = tiny_builder();
    b.set("tokenizer.ggml.pre", Value::str("no-such-pre"));
    let (err, _) = tokenizer_error(&b);
    assert!(matches!(err, LoadError::Tokenizer { .. }) && err.to_string().contains("no-such-pre"), "{err}");
}

#[test]
fn rope_freqs_that_are_not_llama3_scaling_are_refused() {
    let (mut b, _) = tiny_gguf(&TinyModel::random(TinySpec::llama3(), 18), GgufDtype::F32);
    let t = b.tensor_mut("rope_freqs.weight");
    t.data[4..8].copy_from_slice(&3.0f32.to_le_bytes());
    let dir = TempDir::new("gguf-rope");
    let path = write(&b, &dir);
    let err = GgufFile::open(&path).unwrap().config().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()) && msg.contains("rope_freqs.weight"), "{msg}");
}
