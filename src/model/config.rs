//! Model shape and hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata.

use serde::Deserialize;
use std::path::Path;

use super::LoadError;

/// Llama 3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Mistral-style `sliding_window` from `config.json`: each token attends to that many
    /// positions up to itself. The runtime's attention window defaults to it.
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    /// The attention window its checkpoint asks for (`sliding_window`, no sinks).
    pub fn default_window(&self) -> Option<crate::tensor::AttnWindow> {
        self.sliding_window.and_then(|w| crate::tensor::AttnWindow::new(w, 0).ok())
    }

    /// Query width: heads × head_dim (may differ from hidden size).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Inverse RoPE frequencies, one per rotated pair, with llama3 scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let f = 1.0 / (self.rope_theta as f64).powf(2.0 * i as f64 / self.head_dim as f64);
                match self.rope_scaling {
                    None => f as f32,
                    Some(s) => llama3_scale(f, s) as f32,
                }
            })
            .collect()
    }

    pub fn parameter_count(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let attn = h * self.q_dim() * 2 + h * self.kv_dim() * 2;
        let layer = attn + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_layers * layer + h + head
    }

    /// Checks every size against sane bounds (far beyond any real model, and small enough
    /// that no product of them overflows or asks for an absurd allocation) and every
    /// hyper-parameter for a value the forward can compute with. The error names the field.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        use ConfigField as F;
        let sizes = [
            (F::NumLayers, self.num_layers, 1, 1 << 10),
            (F::HiddenSize, self.hidden_size, 1, 1 << 16),
            (F::IntermediateSize, self.intermediate_size, 1, 1 << 20),
            (F::NumHeads, self.num_heads, 1, 1 << 10),
            (F::NumKvHeads, self.num_kv_heads, 1, self.num_heads.max(1)),
            (F::HeadDim, self.head_dim, 2, 1 << 10),
            (F::VocabSize, self.vocab_size, 1, 1 << 22),
            // Two positions at least: a one-token prompt and its first generated token.
            (F::MaxPositions, self.max_position_embeddings, 2, 1 << 24),
        ];
        for (field, value, min, max) in sizes {
            if !(min..=max).contains(&value) {
                return Err(InvalidConfig::new(field, format!("is {value}, expected {min} to {max}")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            let msg = format!("is {}, which does not divide the {} attention heads", self.num_kv_heads, self.num_heads);
            return Err(InvalidConfig::new(F::NumKvHeads, msg));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(InvalidConfig::new(F::HeadDim, format!("is {}, expected an even number", self.head_dim)));
        }
        // NaN, infinite, zero or negative values would make every logit NaN.
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(InvalidConfig::new(F::RopeTheta, format!("is {}, expected a number above 1", self.rope_theta)));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps <= 1.0) {
            let msg = format!("is {}, expected a number above 0 and at most 1", self.rms_norm_eps);
            return Err(InvalidConfig::new(F::RmsNormEps, msg));
        }
        if let Some(s) = self.rope_scaling {
            let factors = [s.factor, s.low_freq_factor, s.high_freq_factor];
            if !factors.iter().all(|f| f.is_finite() && *f > 0.0)
                || s.high_freq_factor <= s.low_freq_factor
                || s.original_max_position_embeddings == 0
            {
                return Err(InvalidConfig::new(
                    F::RopeScaling,
                    format!("is {s:?}: expected positive factors, high_freq_factor above low_freq_factor, and a positive original context"),
                ));
            }
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json` (architecture `LlamaForCausalLM`).
    pub fn from_hf_json(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        let value =
            serde_json::from_str(&text).map_err(|e| LoadError::format(path, format!("invalid config.json: {e}")))?;
        Self::from_hf_value(value, path)
    }

    /// A Hugging Face configuration already parsed (one nested in another file's, say);
    /// `path` names where it came from in errors.
    pub fn from_hf_value(value: serde_json::Value, path: &Path) -> Result<Self, LoadError> {
        let raw: HfConfig =
            serde_json::from_value(value).map_err(|e| LoadError::format(path, format!("invalid config.json: {e}")))?;
        raw.into_config().map_err(|msg| LoadError::format(path, msg))
    }
}

/// A configuration value, named as each file format names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigField {
    NumLayers,
    HiddenSize,
    IntermediateSize,
    NumHeads,
    NumKvHeads,
    HeadDim,
    VocabSize,
    MaxPositions,
    RopeTheta,
    RmsNormEps,
    RopeScaling,
}

impl ConfigField {
    /// The key in a Hugging Face `config.json`.
    pub fn hf_key(self) -> &'static str {
        match self {
            ConfigField::NumLayers => "num_hidden_layers",
            ConfigField::HiddenSize => "hidden_size",
            ConfigField::IntermediateSize => "intermediate_size",
            ConfigField::NumHeads => "num_attention_heads",
            ConfigField::NumKvHeads => "num_key_value_heads",
            ConfigField::HeadDim => "head_dim",
            ConfigField::VocabSize => "vocab_size",
            ConfigField::MaxPositions => "max_position_embeddings",
            ConfigField::RopeTheta => "rope_theta",
            ConfigField::RmsNormEps => "rms_norm_eps",
            ConfigField::RopeScaling => "rope_scaling",
        }
    }

    /// The metadata key in a GGUF file (llama architecture).
    pub fn gguf_key(self) -> &'static str {
        match self {
            ConfigField::NumLayers => "llama.block_count",
            ConfigField::HiddenSize => "llama.embedding_length",
            ConfigField::IntermediateSize => "llama.feed_forward_length",
            ConfigField::NumHeads => "llama.attention.head_count",
            ConfigField::NumKvHeads => "llama.attention.head_count_kv",
            ConfigField::HeadDim => "llama.attention.key_length",
            ConfigField::VocabSize => "llama.vocab_size",
            ConfigField::MaxPositions => "llama.context_length",
            ConfigField::RopeTheta => "llama.rope.freq_base",
            ConfigField::RmsNormEps => "llama.attention.layer_norm_rms_epsilon",
            ConfigField::RopeScaling => "rope_freqs.weight",
        }
    }
}

/// A configuration value out of bounds: which, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidConfig {
    pub field: ConfigField,
    pub msg: String,
}

impl InvalidConfig {
    fn new(field: ConfigField, msg: String) -> Self {
        InvalidConfig { field, msg }
    }

    /// The message with the field as a Hugging Face `config.json` names it.
    pub fn hf(&self) -> String {
        format!("invalid model configuration: `{}` {}", self.field.hf_key(), self.msg)
    }

    /// The message with the field as GGUF metadata names it.
    pub fn gguf(&self) -> String {
        format!("invalid model configuration: `{}` {}", self.field.gguf_key(), self.msg)
    }
}

fn llama3_scale(freq: f64, s: RopeScaling) -> f64 {
    let old_ctx = s.original_max_position_embeddings as f64;
    let low_wavelen = old_ctx / s.low_freq_factor as f64;
    let high_wavelen = old_ctx / s.high_freq_factor as f64;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor as f64
    } else {
        let smooth =
            (old_ctx / wavelen - s.low_freq_factor as f64) / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
        (1.0 - smooth) * freq / s.factor as f64 + smooth * freq
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_theta")]
    rope_theta: f32,
    rope_scaling: Option<HfRopeScaling>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f32,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    bos_token_id: Option<OneOrMany>,
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    sliding_window: Option<usize>,
}

fn default_theta() -> f32 {
    10000.0
}
fn default_eps() -> f32 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

impl HfConfig {
    fn into_config(self) -> Result<ModelConfig, String> {
        let is_llama = self.model_type.as_deref() == Some("llama")
            || self.architectures.iter().flatten().any(|a| a == "LlamaForCausalLM");
        if !is_llama {
            return Err(format!(
                "unsupported architecture {:?} (model_type {:?}); Specula runs LlamaForCausalLM models",
                self.architectures, self.model_type
            ));
        }
        let rope_scaling = match self.rope_scaling {
            None => None,
            Some(r) if r.rope_type.as_deref() == Some("llama3") => Some(RopeScaling {
                factor: r.factor.unwrap_or(8.0),
                low_freq_factor: r.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: r.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: r.original_max_position_embeddings.unwrap_or(8192),
            }),
            Some(r) if matches!(r.rope_type.as_deref(), None | Some("default")) => None,
            Some(r) => return Err(format!("unsupported rope_scaling type {:?}", r.rope_type)),
        };
        let ids = |v: Option<OneOrMany>| match v {
            None => vec![],
            Some(OneOrMany::One(x)) => vec![x],
            Some(OneOrMany::Many(xs)) => xs,
        };
        let config = ModelConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            vocab_size: self.vocab_size,
            rope_theta: self.rope_theta,
            rope_scaling,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            max_position_embeddings: self.max_position_embeddings,
            bos_token_id: ids(self.bos_token_id).first().copied(),
            eos_token_ids: ids(self.eos_token_id),
            sliding_window: self.sliding_window.filter(|&w| w > 0),
        };
        config.validate().map_err(|e| e.hf())?;
        Ok(config)
    }
}

/// Named real shapes for the dummy load format (see `shapes.md` in the design notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    #[value(name = "smollm2-135m")]
    SmolLm2_135m,
    #[value(name = "llama-3.2-1b")]
    Llama32_1b,
    #[value(name = "llama-3.2-3b")]
    Llama32_3b,
    #[value(name = "llama-3.1-8b")]
    Llama31_8b,
    #[value(name = "llama-3.3-70b")]
    Llama33_70b,
}

impl Preset {
    pub fn parse(name: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(name, true).ok()
    }

    pub fn config(self) -> ModelConfig {
        // (hidden, intermediate, layers, heads, kv_heads, head_dim, tied, rope factor)
        let (h, i, l, nh, nkv, hd, tied, factor) = match self {
            Preset::SmolLm2_135m => (576, 1536, 30, 9, 3, 64, true, 0.0),
            Preset::Llama32_1b => (2048, 8192, 16, 32, 8, 64, true, 32.0),
            Preset::Llama32_3b => (3072, 8192, 28, 24, 8, 128, true, 32.0),
            Preset::Llama31_8b => (4096, 14336, 32, 32, 8, 128, false, 8.0),
            Preset::Llama33_70b => (8192, 28672, 80, 64, 8, 128, false, 8.0),
        };
        let smol = self == Preset::SmolLm2_135m;
        ModelConfig {
            hidden_size: h,
            intermediate_size: i,
            num_layers: l,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            vocab_size: if smol { 49152 } else { 128256 },
            rope_theta: if smol { 100000.0 } else { 500000.0 },
            rope_scaling: (!smol).then_some(RopeScaling {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            rms_norm_eps: 1e-5,
            tie_word_embeddings: tied,
            max_position_embeddings: if smol { 8192 } else { 131072 },
            bos_token_id: Some(if smol { 1 } else { 128000 }),
            eos_token_ids: if smol { vec![2] } else { vec![128001, 128008, 128009] },
            sliding_window: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parameter_counts_match_published_sizes() {
        let billions = |p: Preset| p.config().parameter_count() as f64 / 1e9;
        assert!((billions(Preset::Llama32_1b) - 1.24).abs() < 0.01);
        assert!((billions(Preset::Llama32_3b) - 3.21).abs() < 0.01);
        assert!((billions(Preset::Llama31_8b) - 8.03).abs() < 0.01);
        assert!((billions(Preset::Llama33_70b) - 70.6).abs() < 0.1);
        assert!((billions(Preset::SmolLm2_135m) - 0.135).abs() < 0.001);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let c = Preset::Llama31_8b.config();
        let plain = ModelConfig { rope_scaling: None, ..c.clone() };
        let (scaled, base) = (c.rope_inv_freq(), plain.rope_inv_freq());
        assert_eq!(scaled[0], base[0]);
        let last = base.len() - 1;
        assert!((scaled[last] * 8.0 - base[last]).abs() < 1e-12);
    }
}
