//! A tiny random Llama and its Hugging Face folder (config.json, model.safetensors,
//! tokenizer.json, tokenizer_config.json).

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::vocab::{tiny_vocab, TinyVocab, BOS_ID, CHATML, EOS_ID};

/// Llama 3 RoPE scaling parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The shape and hyper-parameters of a tiny model. Inner dimensions are multiples of 32 so
/// that every 2-D weight splits into whole GGUF quantization blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct TinySpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Rope>,
    pub eps: f64,
    pub tied: bool,
    pub max_positions: usize,
}

impl TinySpec {
    /// SmolLM2-like: tied embeddings, grouped-query attention, plain RoPE.
    pub fn smol() -> Self {
        TinySpec {
            hidden: 64,
            intermediate: 96,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            vocab: 320,
            rope_theta: 10000.0,
            rope_scaling: None,
            eps: 1e-5,
            tied: true,
            max_positions: 256,
        }
    }

    /// Llama-3-like: separate `lm_head`, llama3 RoPE scaling whose original context (64) puts
    /// some frequencies in each of the three regimes, query width ≠ hidden size.
    pub fn llama3() -> Self {
        TinySpec {
            heads: 8,
            head_dim: 16,
            hidden: 96,
            intermediate: 64,
            rope_scaling: Some(Llama3Rope {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            }),
            tied: false,
            eps: 1e-6,
            ..TinySpec::smol()
        }
    }

    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Every weight's Hugging Face name and shape, in checkpoint order.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, q, kv) = (self.hidden, self.intermediate, self.q_dim(), self.kv_dim());
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = |s: &str| format!("model.layers.{l}.{s}.weight");
            out.extend([
                (p("input_layernorm"), vec![h]),
                (p("self_attn.q_proj"), vec![q, h]),
                (p("self_attn.k_proj"), vec![kv, h]),
                (p("self_attn.v_proj"), vec![kv, h]),
                (p("self_attn.o_proj"), vec![h, q]),
                (p("post_attention_layernorm"), vec![h]),
                (p("mlp.gate_proj"), vec![i, h]),
                (p("mlp.up_proj"), vec![i, h]),
                (p("mlp.down_proj"), vec![h, i]),
            ]);
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tied {
            out.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        out
    }

    pub fn config_json(&self) -> serde_json::Value {
        let mut c = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.eps,
            "tie_word_embeddings": self.tied,
            "max_position_embeddings": self.max_positions,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if let Some(s) = self.rope_scaling {
            c["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        c
    }
}

/// A model's weights by Hugging Face name, row-major f32.
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub spec: TinySpec,
    pub weights: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub vocab: std::sync::Arc<TinyVocab>,
}

impl TinyModel {
    /// Random weights of a sensible scale: norms near 1, matrices ~ N(0, 1/in), embeddings ~ N(0, 1/16).
    pub fn random(spec: TinySpec, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let mut weights = HashMap::new();
        for (name, shape) in spec.shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if shape.len() == 1 {
                (0..n).map(|_| (1.0 + 0.2 * rng.normal()) as f32).collect()
            } else {
                let std = if name.contains("embed_tokens") { 0.25 } else { 1.0 / (shape[1] as f64).sqrt() };
                (0..n).map(|_| (std * rng.normal()) as f32).collect()
            };
            weights.insert(name, (shape, data));
        }
        let vocab = std::sync::Arc::new(tiny_vocab(spec.vocab));
        TinyModel { spec, weights, vocab }
    }

    pub fn get(&self, name: &str) -> &[f32] {
        &self.weights.get(name).unwrap_or_else(|| panic!("no weight {name}")).1
    }

    /// The same model with every value passed through `f` (e.g. rounded to f16).
    pub fn map(&self, f: impl Fn(&str, &[usize], &[f32]) -> Vec<f32>) -> Self {
        let weights = self.weights.iter().map(|(k, (s, d))| (k.clone(), (s.clone(), f(k, s, d)))).collect();
        TinyModel { spec: self.spec.clone(), weights, vocab: self.vocab.clone() }
    }
}

/// Floating-point storage types of a safetensors checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDtype {
    F32,
    F16,
    Bf16,
}

impl StDtype {
    pub const ALL: [StDtype; 3] = [StDtype::F32, StDtype::F16, StDtype::Bf16];

    pub fn round(self, x: f32) -> f32 {
        match self {
            StDtype::F32 => x,
            StDtype::F16 => f16::from_f32(x).to_f32(),
            StDtype::Bf16 => bf16::from_f32(x).to_f32(),
        }
    }

    pub fn encode(self, data: &[f32]) -> (Dtype, Vec<u8>) {
        match self {
            StDtype::F32 => (Dtype::F32, data.iter().flat_map(|x| x.to_le_bytes()).collect()),
            StDtype::F16 => (Dtype::F16, data.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect()),
            StDtype::Bf16 => (Dtype::BF16, data.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect()),
        }
    }
}

/// Writes `model` as a Hugging Face folder with weights stored as `dtype`; returns the model
/// as stored (values rounded to `dtype`), which is what a loader must reproduce.
pub fn write_hf_dir(model: &TinyModel, dtype: StDtype, dir: &Path) -> TinyModel {
    let stored = model.map(|_, _, d| d.iter().map(|&x| dtype.round(x)).collect());
    let mut encoded: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = stored
        .weights
        .iter()
        .map(|(name, (shape, data))| {
            let (dt, bytes) = dtype.encode(data);
            (name.clone(), shape.clone(), dt, bytes)
        })
        .collect();
    encoded.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(String, TensorView)> = encoded
        .iter()
        .map(|(name, shape, dt, bytes)| (name.clone(), TensorView::new(*dt, shape.clone(), bytes).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&model.spec.config_json()).unwrap()).unwrap();
    model.vocab.hf_tokenizer().save(dir.join("tokenizer.json"), true).unwrap();
    let tokenizer_config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": CHATML,
    });
    std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
    stored
}

/// splitmix64 with Box–Muller normals: deterministic, dependency-free.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
