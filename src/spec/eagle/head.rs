//! An EAGLE-1 draft head: its weights, read from the safetensors layout of SafeAILab/EAGLE
//! (as `scripts/eagle/train.py` saves it), and one forward step over the backend's ops.
//!
//! ```text
//!  entry p (sequence position p):  x = fc(concat(embed(token p+1), f_p))   f_p: [hidden]
//!                                  x = x + o_proj(attention(x))            (no input norm)
//!                                  x = x + mlp(rms_norm(x) * post_attention_layernorm)
//!                                  x is the predicted f_{p+1}; its logits: x · lm_headᵀ
//! ```
//! `f_p` is the target's hidden state after its final norm (what its LM head reads), or
//! for a drafted entry the head's own prediction. The embedding and the LM head are the
//! target's.

use std::path::Path;

use super::HeadSize;
use crate::model::safetensors::SafetensorsWeights;
use crate::model::shard::Split;
use crate::model::weight_loader::{load_weight, LoadOptions};
use crate::model::{KvCache, Llama, LoadError, ModelConfig, WeightSource, Weights};
use crate::spec::SpecError;
use crate::tensor::{AttnShape, Backend, BackendError, BatchMeta, HostTensor, Result, StepKey};

/// The head trained for the default model (SmolLM2-135M-Instruct), in this source tree:
/// found by path rather than compiled in, so the binary stays small and the head loads
/// like any other (a folder of config.json and model.safetensors).
pub const DEFAULT_HEAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/eagle/smollm2-135m-instruct");

/// The head's weights; shapes as in the checkpoint (`[out, in]`).
pub struct EagleHead<B: Backend> {
    /// The head's shape: one layer, the target's hidden size and vocabulary.
    pub config: ModelConfig,
    /// `fc.weight` with `fc.bias` appended as a column (zeros without a bias), then zero
    /// columns: the input rows hold a 1 there, so one matmul adds the bias, and the width
    /// is one the tensor-core matmul takes. `[hidden, fc_width(hidden)]`
    fc: B::Tensor,
    wq: B::Tensor,       // [heads * head_dim, hidden]
    wk: B::Tensor,       // [kv_heads * head_dim, hidden]
    wv: B::Tensor,       // [kv_heads * head_dim, hidden]
    wo: B::Tensor,       // [hidden, heads * head_dim]
    mlp_norm: B::Tensor, // [hidden]
    w_gate: B::Tensor,   // [intermediate, hidden]
    w_up: B::Tensor,     // [intermediate, hidden]
    w_down: B::Tensor,   // [hidden, intermediate]
    /// All ones: `add_rms_norm` with it is the plain residual add the layer ends with.
    ones: B::Tensor, // [hidden]
    inv_freq: B::Tensor, // [head_dim / 2]
}

impl<B: Backend> EagleHead<B> {
    /// Loads the head in `dir` (config.json, model.safetensors) for `target`: a head of
    /// another hidden size or vocabulary is refused with both sizes named.
    pub fn load(dir: &Path, target: &ModelConfig, backend: &B) -> std::result::Result<Self, SpecError> {
        let config = ModelConfig::from_hf_json(&dir.join("config.json")).map_err(SpecError::EagleHead)?;
        check_sizes(&config, target)?;
        let file = dir.join("model.safetensors");
        let src = SafetensorsWeights::open_files(std::slice::from_ref(&file)).map_err(SpecError::EagleHead)?;
        Self::from_source(config, &src, backend).map_err(SpecError::EagleHead)
    }

    fn from_source(config: ModelConfig, src: &dyn WeightSource, b: &B) -> std::result::Result<Self, LoadError> {
        let c = &config;
        let (h, q, kv, i) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let weights = Weights::Source(src);
        let get =
            |name: &str, shape: &[usize]| load_weight(&weights, &LoadOptions::default(), b, name, shape, &Split::Whole);
        let p = |s: &str| format!("layers.0.{s}.weight");
        Ok(EagleHead {
            fc: b.upload(&fc_with_bias(src, h)?)?,
            wq: get(&p("self_attn.q_proj"), &[q, h])?,
            wk: get(&p("self_attn.k_proj"), &[kv, h])?,
            wv: get(&p("self_attn.v_proj"), &[kv, h])?,
            wo: get(&p("self_attn.o_proj"), &[h, q])?,
            mlp_norm: get(&p("post_attention_layernorm"), &[h])?,
            w_gate: get(&p("mlp.gate_proj"), &[i, h])?,
            w_up: get(&p("mlp.up_proj"), &[i, h])?,
            w_down: get(&p("mlp.down_proj"), &[h, i])?,
            ones: b.upload(&HostTensor::new(vec![h], vec![1.0; h]))?,
            inv_freq: b.upload(&HostTensor::new(vec![c.head_dim / 2], c.rope_inv_freq()))?,
            config: ModelConfig { num_layers: 1, ..config },
        })
    }

    /// A KV cache for the head's one layer.
    pub fn kv_cache(&self, b: &B, num_blocks: usize, block_size: usize) -> Result<KvCache<B>> {
        KvCache::new(b, &self.config, num_blocks, block_size)
    }

    /// One forward over `meta`, whose token at each entry p is token p+1 of its sequence,
    /// with `features` `[tokens, hidden]` (host, row-major) the f_p each entry reads. Returns
    /// the predicted features of the rows that want logits (host) and their logits (read
    /// them before the next step: a replayed step reuses its buffers).
    pub fn step(
        &self,
        b: &B,
        target: &Llama<B>,
        kv: &mut KvCache<B>,
        meta: &BatchMeta,
        features: &[f32],
    ) -> Result<(Vec<f32>, B::Tensor)> {
        let (h, n) = (self.config.hidden_size, meta.num_tokens());
        if features.len() != n * h {
            return Err(BackendError::Invalid(format!("{} feature values for {n} entries of {h}", features.len())));
        }
        let feats = HostTensor::new(vec![n, h], features.to_vec());
        let key = StepKey { computation: self as *const Self as u64, kv_cache: kv.id() };
        let out =
            b.replayable_step_with(key, meta, &[&feats], |inputs| self.forward(b, target, kv, meta, &inputs[0]))?;
        match <[B::Tensor; 2]>::try_from(out) {
            Ok([out, logits]) => Ok((b.to_host(&out)?, logits)),
            Err(_) => Err(BackendError::Invalid("a replayed head step lost its outputs".into())),
        }
    }

    /// The step's ops, from the features on the device: the predicted features of the rows
    /// that want logits, and their logits.
    fn forward(
        &self,
        b: &B,
        target: &Llama<B>,
        kv: &mut KvCache<B>,
        meta: &BatchMeta,
        feats: &B::Tensor,
    ) -> Result<Vec<B::Tensor>> {
        let c = &self.config;
        let h = c.hidden_size;
        let batch = b.prepare(meta)?;
        // Each input row, made on the device: the token's embedding, the feature, 1 for the
        // bias, zeros to the padded width.
        let input = b.embed_concat(target.embed_table(), &batch, feats, h, fc_width(h))?;
        let mut x = b.matmul(&input, &self.fc)?;
        let shape =
            AttnShape { num_heads: c.num_heads, num_kv_heads: c.num_kv_heads, head_dim: c.head_dim, window: kv.window };
        let mut qkv = b.matmul_many(&x, &[&self.wq, &self.wk, &self.wv])?.into_iter();
        let (Some(mut q), Some(mut k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
            return Err(BackendError::Invalid("matmul_many returned fewer than 3 tensors".into()));
        };
        let attn = b.rope_attention(&mut q, &mut k, &v, &mut kv.k[0], &mut kv.v[0], &batch, &self.inv_freq, shape)?;
        let normed = b.add_rms_norm(&mut x, &b.matmul(&attn, &self.wo)?, &self.mlp_norm, c.rms_norm_eps)?;
        let mlp = b.swiglu(&normed, &self.w_gate, &self.w_up)?;
        b.add_rms_norm(&mut x, &b.matmul(&mlp, &self.w_down)?, &self.ones, c.rms_norm_eps)?;
        let out = b.gather_logit_rows(&x, &batch)?;
        let logits = b.matmul(&out, target.lm_head())?;
        Ok(vec![out, logits])
    }
}

/// A head drafts for the target it was trained on: the same hidden size (it reads the
/// target's hidden states and embeddings) and vocabulary (it shares the LM head).
pub fn check_sizes(head: &ModelConfig, target: &ModelConfig) -> std::result::Result<(), SpecError> {
    let pairs = [
        (HeadSize::Hidden, head.hidden_size, target.hidden_size),
        (HeadSize::Vocab, head.vocab_size, target.vocab_size),
    ];
    match pairs.into_iter().find(|&(_, h, t)| h != t) {
        Some((what, head, target)) => Err(SpecError::HeadMismatch { what, head, target }),
        None => Ok(()),
    }
}

/// The head's input width: embedding, feature and the bias's 1, padded to a multiple of
/// 64 (the tensor-core matmul's K block; padding adds exact zeros to every sum).
fn fc_width(hidden: usize) -> usize {
    (2 * hidden + 1).next_multiple_of(64)
}

/// `fc.weight` `[hidden, 2 * hidden]` with `fc.bias` (or zeros) as an extra column, then
/// zeros to `fc_width`.
fn fc_with_bias(src: &dyn WeightSource, h: usize) -> std::result::Result<HostTensor, LoadError> {
    let w = src.tensor("fc.weight", &[h, 2 * h])?;
    let bias = match src.contains("fc.bias") {
        true => src.tensor("fc.bias", &[h])?.data,
        false => vec![0.0; h],
    };
    let width = fc_width(h);
    let mut data = Vec::with_capacity(h * width);
    for (row, b) in w.data.chunks(2 * h).zip(bias) {
        data.extend_from_slice(row);
        data.push(b);
        data.resize(data.len() + width - 2 * h - 1, 0.0);
    }
    Ok(HostTensor::new(vec![h, width], data))
}
