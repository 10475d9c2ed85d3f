//! FP8 weights on the CPU: tiny checkpoints in the compressed-tensors and ModelOpt formats,
//! and `--dtype fp8` quantizing at load, each against an f64 reference forward of the same
//! dequantization (E4M3 decoded and rounded by `tests/common/fp8.rs`, not by `src/`).

mod common;

use std::path::Path;

use common::engine::{assert_matches, TOKENS};
use common::fp8::{codes, compressed_tensors_config, dequantize, scales, Fp8Model, Inputs, Layout};
use common::gguf_writer::{tiny_gguf, GgufDtype};
use common::reference;
use common::tiny::{write_hf_dir, StDtype, TinyModel, TinySpec};
use common::TempDir;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::json;
use specula::backend::cpu::CpuBackend;
use specula::backend::{Backend, BatchMeta};
use specula::model::{load_model_with, KvCache, Llama, LoadError, LoadOptions, ModelSource, Preset, WeightDtype};

const TOL: f64 = 1e-5;

fn load(path: &Path, dtype: WeightDtype) -> Result<Llama<CpuBackend>, LoadError> {
    let source = ModelSource::Path(path.to_path_buf());
    load_model_with(&source, &LoadOptions::dtype(dtype), &CpuBackend::new()).map(|l| l.model)
}

fn layout(per_tensor: bool, inputs: Inputs, quantize_head: bool, scale_dtype: StDtype) -> Layout {
    Layout { per_tensor, inputs, quantize_head, scale_dtype, scalar_scales: false }
}

/// Writes `spec` as a compressed-tensors checkpoint and checks the loaded model.
fn check_compressed_tensors(spec: TinySpec, seed: u64, layout: Layout) {
    let dir = TempDir::new("fp8-ct");
    let m = Fp8Model::write(&TinyModel::random(spec, seed), layout, dir.path());
    m.set_quantization_config(dir.path(), Some(compressed_tensors_config(layout)));
    check(&m, dir.path(), &format!("compressed-tensors {layout:?}"));
}

/// The checkpoint in `dir` loads as it is and matches the reference forward of `m`.
///
/// Where activations are quantized, the CPU computes them in f32 and the reference in f64:
/// one that lay within f32 rounding (~1e-7 relative) of a boundary between two codes could
/// round differently and move the logits by ~1e-2. The seeds here have none so close; a
/// failure says how close the closest was.
fn check(m: &Fp8Model, dir: &Path, what: &str) {
    let engine = load(dir, WeightDtype::Auto).unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = m.reference(&TOKENS);
    let what = format!("{what} (closest quantized activation to a rounding boundary: {:e})", m.margin.get());
    assert_matches(&engine, &want, &TOKENS, TOL, &what);
}

#[test]
fn compressed_tensors_weight_only_per_channel() {
    check_compressed_tensors(TinySpec::llama3(), 1, layout(false, Inputs::None, false, StDtype::Bf16));
    check_compressed_tensors(TinySpec::smol(), 2, layout(false, Inputs::None, false, StDtype::F32));
}

#[test]
fn compressed_tensors_dynamic_per_token_activations() {
    check_compressed_tensors(TinySpec::llama3(), 3, layout(false, Inputs::DynamicPerToken, true, StDtype::Bf16));
    check_compressed_tensors(TinySpec::smol(), 4, layout(false, Inputs::DynamicPerToken, false, StDtype::F32));
}

#[test]
fn compressed_tensors_static_per_tensor() {
    check_compressed_tensors(TinySpec::llama3(), 5, layout(true, Inputs::StaticPerTensor, true, StDtype::F32));
    check_compressed_tensors(TinySpec::llama3(), 6, layout(true, Inputs::None, false, StDtype::Bf16));
}

#[test]
fn modelopt_fp8_from_hf_quant_config() {
    let layout = Layout { scalar_scales: true, ..layout(true, Inputs::StaticPerTensor, false, StDtype::F32) };
    let dir = TempDir::new("fp8-modelopt");
    let m = Fp8Model::write(&TinyModel::random(TinySpec::llama3(), 7), layout, dir.path());
    m.set_quantization_config(dir.path(), None);
    let hf_quant = json!({"producer": {"name": "modelopt", "version": "0.19.0"},
                          "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": null, "exclude_modules": ["lm_head"]}});
    std::fs::write(dir.join("hf_quant_config.json"), hf_quant.to_string()).unwrap();
    check(&m, dir.path(), "ModelOpt FP8 (hf_quant_config.json)");
}

#[test]
fn modelopt_per_channel_per_token_from_config_json() {
    let layout = layout(false, Inputs::DynamicPerToken, false, StDtype::F32);
    let dir = TempDir::new("fp8-modelopt-pc");
    let m = Fp8Model::write(&TinyModel::random(TinySpec::llama3(), 8), layout, dir.path());
    let qc = json!({"quant_method": "modelopt", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "ignore": ["lm_head"]});
    m.set_quantization_config(dir.path(), Some(qc));
    check(&m, dir.path(), "ModelOpt FP8_PER_CHANNEL_PER_TOKEN (config.json)");
}

/// A weight-only per-channel checkpoint in `dir`, for tests that then spoil it.
fn weight_only(dir: &TempDir) -> Fp8Model {
    let layout = layout(false, Inputs::None, false, StDtype::F32);
    let m = Fp8Model::write(&TinyModel::random(TinySpec::smol(), 9), layout, dir.path());
    m.set_quantization_config(dir.path(), Some(compressed_tensors_config(layout)));
    m
}

#[test]
fn unsupported_schemes_are_refused_by_name_with_the_file() {
    let dir = TempDir::new("fp8-refused");
    let m = weight_only(&dir);
    let weights = |w: serde_json::Value| {
        json!({"quant_method": "compressed-tensors", "format": "float-quantized",
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}}})
    };
    for (qc, needle) in [
        (weights(json!({"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128})), "group-wise"),
        (
            weights(json!({"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]})),
            "block-wise",
        ),
        (weights(json!({"num_bits": 8, "type": "int", "strategy": "channel"})), "int"),
        (weights(json!({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128})), "4-bit"),
        (json!({"quant_method": "modelopt", "quant_algo": "NVFP4"}), "NVFP4"),
        (json!({"quant_method": "gptq", "bits": 4}), "gptq"),
    ] {
        m.set_quantization_config(dir.path(), Some(qc));
        let err = load(dir.path(), WeightDtype::Auto).err().expect("refused");
        assert!(
            matches!(&err, LoadError::UnsupportedQuantization { path, .. } if path.ends_with("config.json")),
            "{err}"
        );
        assert!(err.to_string().contains(needle), "`{err}` does not name `{needle}`");
    }
}

#[test]
fn e5m2_tensors_and_fp8_tensors_without_a_config_are_refused() {
    let dir = TempDir::new("fp8-e5m2");
    weight_only(&dir);
    let name = "model.layers.0.self_attn.q_proj.weight";
    retype(&dir.join("model.safetensors"), name, Dtype::F8_E5M2);
    let err = load(dir.path(), WeightDtype::Auto).err().expect("refused");
    assert!(
        matches!(&err, LoadError::Dtype { tensor, dtype, path } if tensor == name && dtype == "F8_E5M2" && path.ends_with("model.safetensors")),
        "{err}"
    );

    let dir = TempDir::new("fp8-no-config");
    weight_only(&dir).set_quantization_config(dir.path(), None);
    let err = load(dir.path(), WeightDtype::Auto).err().expect("refused");
    assert!(err.to_string().contains("F8_E4M3") && err.to_string().contains("q_proj"), "{err}");
}

/// Rewrites a safetensors file with `name`'s dtype changed (same bytes).
fn retype(file: &Path, name: &str, dtype: Dtype) {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let dt = if n == name { dtype } else { v.dtype() };
            let view = TensorView::new(dt, v.shape().to_vec(), v.data()).unwrap();
            (n, view)
        })
        .collect();
    std::fs::write(file, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// The reference weights of `stored` quantized at load: projections and an untied head per
/// output channel, the rest as stored.
fn quantized_at_load(stored: &TinyModel, name: &str) -> Vec<f64> {
    let (shape, data) = &stored.weights[name];
    if name.contains("_proj.") || name == "lm_head.weight" {
        let s = scales(data, shape[1]);
        dequantize(&codes(data, shape[1], &s), &s, shape[1])
    } else {
        data.iter().map(|&x| x as f64).collect()
    }
}

fn check_dtype_fp8(path: &Path, stored: &TinyModel, what: &str) {
    let engine = load(path, WeightDtype::Fp8).unwrap();
    let want = reference::forward_with(&stored.spec, &|n| quantized_at_load(stored, n), &|_, x| x.to_vec(), &TOKENS);
    assert_matches(&engine, &want, &TOKENS, TOL, what);
}

#[test]
fn dtype_fp8_quantizes_safetensors_at_load() {
    for (spec, seed) in [(TinySpec::smol(), 10), (TinySpec::llama3(), 11)] {
        let model = TinyModel::random(spec, seed);
        for dtype in [StDtype::F32, StDtype::Bf16] {
            let dir = TempDir::new("fp8-at-load");
            let stored = write_hf_dir(&model, dtype, dir.path());
            check_dtype_fp8(dir.path(), &stored, &format!("--dtype fp8 from {dtype:?} safetensors"));
        }
    }
}

#[test]
fn dtype_fp8_quantizes_gguf_blocks_at_load() {
    for (spec, seed) in [(TinySpec::smol(), 12), (TinySpec::llama3(), 13)] {
        let dir = TempDir::new("fp8-gguf");
        let (builder, stored) = tiny_gguf(&TinyModel::random(spec, seed), GgufDtype::Q4_1);
        let path = dir.join("model.gguf");
        builder.write(&path);
        check_dtype_fp8(&path, &stored, "--dtype fp8 from Q4_1 GGUF");
    }
}

#[test]
fn dummy_weights_in_fp8_run() {
    let b = CpuBackend::new();
    let options = LoadOptions::dtype(WeightDtype::Fp8);
    let model = load_model_with(&ModelSource::Dummy(Preset::SmolLm2_135m), &options, &b).unwrap().model;
    let mut kv = KvCache::new(&b, &model.config, 1, 16).unwrap();
    let mut meta = BatchMeta::new(16);
    meta.push_row(&[1, 2, 3], 0, &[0], 1);
    let logits = b.to_host(&model.forward(&b, &mut kv, &meta).unwrap()).unwrap();
    assert_eq!(logits.len(), model.config.vocab_size);
    assert!(logits.iter().all(|x| x.is_finite()) && logits.iter().any(|&x| x != 0.0));
}

/// The default model with `--dtype fp8` against itself as stored, on the golden prompts:
/// the same next token everywhere and a small KL divergence (the figures and the greedy
/// text come from `cargo run --release --example fp8_quality`).
#[test]
fn default_model_in_fp8_stays_close_to_f32() {
    let Some(path) = common::default_model_path() else { return };
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("tests/golden/smollm2.json").unwrap()).unwrap();
    let (plain, fp8) = (load(&path, WeightDtype::Auto).unwrap(), load(&path, WeightDtype::Fp8).unwrap());
    let b = CpuBackend::new();
    let last_logits = |model: &Llama<CpuBackend>, prompt: &[u32]| {
        let blocks = prompt.len().div_ceil(16);
        let mut kv = KvCache::new(&b, &model.config, blocks, 16).unwrap();
        let mut meta = BatchMeta::new(16);
        meta.push_row(prompt, 0, &(0..blocks as u32).collect::<Vec<_>>(), 1);
        b.to_host(&model.forward(&b, &mut kv, &meta).unwrap()).unwrap()
    };
    for case in golden["cases"].as_array().unwrap() {
        let prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        let (p, q) = (last_logits(&plain, &prompt), last_logits(&fp8, &prompt));
        let argmax = |x: &[f32]| specula::core::sampling::argmax(x);
        let kl = kl_divergence(&p, &q);
        assert_eq!(argmax(&p), argmax(&q), "{}: next token", case["name"]);
        assert!(kl < 0.05, "{}: KL(f32 || fp8) = {kl}", case["name"]);
    }
}

/// KL(softmax(p) ‖ softmax(q)) in f64.
fn kl_divergence(p: &[f32], q: &[f32]) -> f64 {
    let log_softmax = |x: &[f32]| {
        let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let log_sum = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        x.iter().map(|&v| v as f64 - max - log_sum).collect::<Vec<_>>()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}
