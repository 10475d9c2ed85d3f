//! An EAGLE-3 draft head (Li et al., 2025), loaded as SafeAILab/EAGLE and SpecForge save it
//! (`midlayer.*`) or as vLLM and the speculators convert it (`layers.0.*`, or
//! `model.layers.0.*` with `model.` before `fc`, `norm` and `embed_tokens`), its config a
//! Llama `config.json` with EAGLE-3's keys or the speculators' (`transformer_layer_config`
//! holding the Llama part, as a difference from `LlamaConfig`'s defaults).
//!
//! ```text
//!  target entry p:   g = fc(concat(a_p, b_p, c_p))     a, b, c: the residual stream entering
//!                                                     the target's low, middle, high layers
//!  drafted entry p:  g = the head's own output at p    (no fc)
//!  the layer:        u = concat(input_layernorm(embed(token p+1)), hidden_norm(g))   [2 hidden]
//!                    x = g + o_proj(attention(q, k, v of u))   (norm_before_residual:
//!                                                     hidden_norm(g) + ...)
//!                    x = x + mlp(post_attention_layernorm(x))       x: the output, next g
//!  logits:           lm_head(norm(x)) over the draft vocabulary; draft id i is target id
//!                    i + d2t[i]
//! ```
//! A drafted entry's g comes from the host; an identity matmul makes it the residual
//! stream's own type on the device (f32 on CUDA, where uploads of matrices are bf16). The
//! concatenation `u` is never built: q, k and v are each the sum of two products, one per
//! half of their weight.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::HeadSize;
use crate::model::safetensors::SafetensorsWeights;
use crate::model::{HiddenKind, KvCache, Llama, LoadError, ModelConfig, WeightSource};
use crate::spec::SpecError;
use crate::tensor::{AttnShape, Backend, BackendError, BatchMeta, HostTensor, Result};

/// Where each layout keeps the decoder layer, tried in this order.
const LAYER_PREFIXES: [&str; 3] = ["midlayer.", "layers.0.", "model.layers.0."];

/// What config.json says beyond a Llama configuration.
#[derive(Deserialize, Default)]
struct Eagle3Json {
    /// The speculators' format: the Llama configuration of the layer, nested.
    transformer_layer_config: Option<serde_json::Value>,
    draft_vocab_size: Option<usize>,
    target_hidden_size: Option<usize>,
    #[serde(default)]
    norm_before_residual: bool,
    /// vLLM's key: the layers whose input is kept.
    eagle_aux_hidden_state_layer_ids: Option<Vec<i64>>,
    eagle_config: Option<EagleConfigJson>,
}

/// `eagle_config` (ModelOpt, SpecForge, SGLang, TensorRT-LLM).
#[derive(Deserialize, Default)]
struct EagleConfigJson {
    /// The layers whose output is kept (SGLang adds one to each for the layer whose input
    /// it keeps).
    eagle_aux_hidden_state_layer_ids: Option<Vec<i64>>,
    use_aux_hidden_state: Option<bool>,
}

/// Whether the head in `dir` is an EAGLE-3 head: its config names an Eagle3 architecture
/// or a draft vocabulary, or its weights hold a `hidden_norm`.
pub fn is_eagle3(dir: &Path) -> bool {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let arch = json["architectures"].as_array().into_iter().flatten();
    let named = arch.filter_map(|a| a.as_str()).any(|a| a.to_ascii_lowercase().contains("eagle3"));
    let weights = SafetensorsWeights::open_dir(dir);
    let norm = weights.is_ok_and(|w| LAYER_PREFIXES.iter().any(|p| w.contains(&format!("{p}hidden_norm.weight"))));
    named || json.get("draft_vocab_size").is_some() || norm
}

/// The layers whose input (the residual stream entering them) the head reads, from its
/// config: vLLM's top-level ids as they are; `eagle_config`'s ids name layer outputs, so
/// each is one more; by default layers 2, L/2 and L − 3, as vLLM, SGLang and EAGLE's own
/// code pick them.
fn aux_layers(json: &Eagle3Json, target_layers: usize) -> std::result::Result<[usize; 3], SpecError> {
    let nested = json.eagle_config.as_ref().and_then(|c| c.eagle_aux_hidden_state_layer_ids.clone());
    let l = target_layers as i64;
    let ids: Vec<i64> = match (&json.eagle_aux_hidden_state_layer_ids, nested) {
        (Some(ids), _) => ids.clone(),
        (None, Some(ids)) => ids.iter().map(|i| i + 1).collect(),
        (None, None) => vec![2, l / 2, l - 3],
    };
    let bad = || SpecError::AuxLayers { ids: ids.clone(), layers: target_layers };
    let in_range = ids.iter().all(|&i| (0..=l).contains(&i));
    let picked: [i64; 3] = ids.clone().try_into().map_err(|_| bad())?;
    match in_range {
        true => Ok(picked.map(|i| i as usize)),
        false => Err(bad()),
    }
}

/// The head's weights; shapes as in the checkpoint (`[out, in]`) unless said.
pub struct Eagle3Head<B: Backend> {
    /// The head's shape: one layer, the target's hidden size and vocabulary.
    pub config: ModelConfig,
    /// The target layers whose input the head reads.
    pub aux: [usize; 3],
    /// Draft id → target id; `None` when the head predicts over the target's vocabulary.
    d2t: Option<Arc<[u32]>>,
    /// `fc.weight` with `fc.bias` (or zeros) as a last column, `[hidden, 3 * hidden + 1]`:
    /// fused rows end in a 1.
    fc: B::Tensor,
    /// The residual is `hidden_norm(g)` rather than g.
    norm_before_residual: bool,
    /// The identity, `[hidden, hidden]`: a drafted entry's input as an activation.
    identity: B::Tensor,
    /// The head's own embedding table, if it has one (else the target's).
    embed: Option<B::Tensor>,
    input_norm: B::Tensor,  // [hidden]
    hidden_norm: B::Tensor, // [hidden]
    /// q, k and v projections split by input half: `[embedding half, hidden half]`.
    wqkv: [[B::Tensor; 3]; 2],
    wo: B::Tensor,       // [hidden, heads * head_dim]
    mlp_norm: B::Tensor, // [hidden]
    w_gate: B::Tensor,   // [intermediate, hidden]
    w_up: B::Tensor,     // [intermediate, hidden]
    w_down: B::Tensor,   // [hidden, intermediate]
    norm: B::Tensor,     // [hidden]
    lm_head: B::Tensor,  // [draft vocab, hidden]
    /// All ones, `[q_dim]`, `[kv_dim]`, `[kv_dim]`: `add_rms_norm` with them is a plain add.
    ones: [B::Tensor; 3],
    inv_freq: B::Tensor, // [head_dim / 2]
}

impl<B: Backend> Eagle3Head<B> {
    /// Loads the head in `dir` (config.json; model.safetensors or a sharded index; FP8
    /// weights are dequantized) for `target`: a head of
    /// another hidden size or vocabulary is refused with both sizes named, an unknown
    /// layout with the tensor it lacks named.
    pub fn load(dir: &Path, target: &ModelConfig, b: &B) -> std::result::Result<Self, SpecError> {
        let path = dir.join("config.json");
        let (config, json) = read_config(&path).map_err(SpecError::EagleHead)?;
        check_json(&json, &config, target, &path)?;
        let norm_before_residual = json.norm_before_residual;
        let aux = aux_layers(&json, target.num_layers)?;
        let src = SafetensorsWeights::open_dir(dir).map_err(SpecError::EagleHead)?;
        let draft_vocab = json.draft_vocab_size.unwrap_or(config.vocab_size);
        let d2t = draft_map(&src, draft_vocab, target.vocab_size)?;
        let config = ModelConfig { num_layers: 1, ..config };
        let head = Self::from_source(config, aux, d2t, draft_vocab, &src, b).map_err(SpecError::EagleHead)?;
        Ok(Eagle3Head { norm_before_residual, ..head })
    }

    fn from_source(
        config: ModelConfig,
        aux: [usize; 3],
        d2t: Option<Arc<[u32]>>,
        draft_vocab: usize,
        src: &SafetensorsWeights,
        b: &B,
    ) -> std::result::Result<Self, LoadError> {
        let c = &config;
        let (h, q, kv, i) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let prefix = LAYER_PREFIXES.iter().find(|p| src.contains(&format!("{p}self_attn.q_proj.weight")));
        let prefix = prefix.unwrap_or(&LAYER_PREFIXES[0]);
        let up = |name: &str, shape: &[usize]| -> std::result::Result<B::Tensor, LoadError> {
            Ok(b.upload(&src.tensor(name, shape)?)?)
        };
        let layer = |s: &str, shape: &[usize]| up(&format!("{prefix}{s}.weight"), shape);
        let top = |s: &str| if src.contains(s) { s.to_string() } else { format!("model.{s}") };
        let embed_name = top("embed_tokens.weight");
        let ones = |n: usize| b.upload(&HostTensor::new(vec![n], vec![1.0; n]));
        Ok(Eagle3Head {
            fc: b.upload(&fc_with_bias(src, top("fc.weight").trim_end_matches(".weight"), h)?)?,
            norm_before_residual: false,
            identity: b.upload(&identity(h))?,
            embed: match src.contains(&embed_name) {
                true => Some(up(&embed_name, &[c.vocab_size, h])?),
                false => None,
            },
            input_norm: layer("input_layernorm", &[h])?,
            hidden_norm: layer("hidden_norm", &[h])?,
            wqkv: split_qkv(src, prefix, [q, kv, kv], h, b)?,
            wo: layer("self_attn.o_proj", &[h, q])?,
            mlp_norm: layer("post_attention_layernorm", &[h])?,
            w_gate: layer("mlp.gate_proj", &[i, h])?,
            w_up: layer("mlp.up_proj", &[i, h])?,
            w_down: layer("mlp.down_proj", &[h, i])?,
            norm: up(&top("norm.weight"), &[h])?,
            lm_head: up("lm_head.weight", &[draft_vocab, h])?,
            ones: [ones(q)?, ones(kv)?, ones(kv)?],
            inv_freq: b.upload(&HostTensor::new(vec![c.head_dim / 2], c.rope_inv_freq()))?,
            aux,
            d2t,
            config,
        })
    }

    /// A KV cache for the head's one layer.
    pub fn kv_cache(&self, b: &B, num_blocks: usize, block_size: usize) -> Result<KvCache<B>> {
        KvCache::new(b, &self.config, num_blocks, block_size)
    }

    /// The target's hidden states this head reads.
    pub fn hidden_kind(&self) -> HiddenKind {
        HiddenKind::Layers(self.aux)
    }

    /// Draft id → target id, when the head has a vocabulary of its own.
    pub fn draft_map(&self) -> Option<Arc<[u32]>> {
        self.d2t.clone()
    }

    /// The draft vocabulary's size (the width of the logits `step` returns).
    pub fn draft_vocab(&self) -> usize {
        self.d2t.as_ref().map_or(self.config.vocab_size, |m| m.len())
    }

    /// The layer's input g of `n` entries: `fc` over fused target features (3 hidden wide
    /// each), or the head's own outputs (hidden wide each) as they are.
    fn input(&self, b: &B, features: &[f32], n: usize) -> Result<B::Tensor> {
        let h = self.config.hidden_size;
        let rows = match features.len() {
            l if l == n * h => {
                return b.matmul(&b.upload(&HostTensor::new(vec![n, h], features.to_vec()))?, &self.identity)
            }
            l if l == n * 3 * h => features.chunks(3 * h).flat_map(|f| f.iter().copied().chain([1.0])).collect(),
            l => return Err(BackendError::Invalid(format!("{l} feature values for {n} entries of {h} or {}", 3 * h))),
        };
        b.matmul(&b.upload(&HostTensor::new(vec![n, 3 * h + 1], rows))?, &self.fc)
    }

    /// One forward over `meta`, whose token at each entry p is token p+1 of its sequence.
    /// `features` (host, row-major) are the target's fused features of every entry
    /// (`[tokens, 3 * hidden]`) or the head's own outputs (`[tokens, hidden]`). Returns the
    /// outputs of the rows that want logits (host, before `norm`: the next step's input)
    /// and their logits over the draft vocabulary.
    pub fn step(
        &self,
        b: &B,
        target: &Llama<B>,
        kv: &mut KvCache<B>,
        meta: &BatchMeta,
        features: &[f32],
    ) -> Result<(Vec<f32>, B::Tensor)> {
        let c = &self.config;
        let (n, eps) = (meta.num_tokens(), c.rms_norm_eps);
        let batch = b.prepare(meta)?;
        let emb = b.embed(self.embed.as_ref().unwrap_or(target.embed_table()), &batch)?;
        let mut x = self.input(b, features, n)?;
        let (en, hn) = (b.rms_norm(&emb, &self.input_norm, eps)?, b.rms_norm(&x, &self.hidden_norm, eps)?);
        if self.norm_before_residual {
            x = b.matmul(&hn, &self.identity)?;
        }
        let [we, wh] = &self.wqkv;
        let mut qkv = b.matmul_many(&en, &[&we[0], &we[1], &we[2]])?;
        let from_hidden = b.matmul_many(&hn, &[&wh[0], &wh[1], &wh[2]])?;
        if qkv.len() != 3 || from_hidden.len() != 3 {
            return Err(BackendError::Invalid("matmul_many returned fewer than 3 tensors".into()));
        }
        for ((part, other), ones) in qkv.iter_mut().zip(&from_hidden).zip(&self.ones) {
            b.add_rms_norm(part, other, ones, eps)?;
        }
        let [mut q, mut k, v] = <[B::Tensor; 3]>::try_from(qkv).map_err(|_| BackendError::Invalid("qkv".into()))?;
        let shape =
            AttnShape { num_heads: c.num_heads, num_kv_heads: c.num_kv_heads, head_dim: c.head_dim, window: kv.window };
        let attn = b.rope_attention(&mut q, &mut k, &v, &mut kv.k[0], &mut kv.v[0], &batch, &self.inv_freq, shape)?;
        let normed = b.add_rms_norm(&mut x, &b.matmul(&attn, &self.wo)?, &self.mlp_norm, eps)?;
        let mlp = b.swiglu(&normed, &self.w_gate, &self.w_up)?;
        let out_normed = b.add_rms_norm(&mut x, &b.matmul(&mlp, &self.w_down)?, &self.norm, eps)?;
        let logits = b.matmul(&b.gather_logit_rows(&out_normed, &batch)?, &self.lm_head)?;
        Ok((b.to_host(&b.gather_logit_rows(&x, &batch)?)?, logits))
    }
}

/// The head's Llama configuration and its EAGLE-3 keys, from `path`: a Llama `config.json`,
/// or the speculators' (the Llama part in `transformer_layer_config`, written as its
/// difference from `LlamaConfig`'s defaults).
fn read_config(path: &Path) -> std::result::Result<(ModelConfig, Eagle3Json), LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::format(path, e.to_string()))?;
    let json: Eagle3Json = serde_json::from_value(value.clone()).map_err(|e| LoadError::format(path, e.to_string()))?;
    let llama = match &json.transformer_layer_config {
        Some(serde_json::Value::Object(layer)) => {
            let mut merged = llama_defaults();
            merged.extend(layer.clone());
            serde_json::Value::Object(merged)
        }
        Some(_) => return Err(LoadError::format(path, "transformer_layer_config is not an object")),
        None => value,
    };
    Ok((ModelConfig::from_hf_value(llama, path)?, json))
}

/// transformers' `LlamaConfig` defaults, which a difference from them leaves out.
fn llama_defaults() -> serde_json::Map<String, serde_json::Value> {
    let defaults = serde_json::json!({
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
    });
    match defaults {
        serde_json::Value::Object(map) => map,
        _ => unreachable!("an object literal"),
    }
}

/// `{prefix}.weight` `[hidden, 3 * hidden]` with `{prefix}.bias` (or zeros) as an extra last
/// column (the speculators' heads have a bias; EAGLE's and SpecForge's do not).
fn fc_with_bias(src: &SafetensorsWeights, prefix: &str, h: usize) -> std::result::Result<HostTensor, LoadError> {
    let w = src.tensor(&format!("{prefix}.weight"), &[h, 3 * h])?;
    let bias_name = format!("{prefix}.bias");
    let bias = match src.contains(&bias_name) {
        true => src.tensor(&bias_name, &[h])?.data,
        false => vec![0.0; h],
    };
    let mut data = Vec::with_capacity(h * (3 * h + 1));
    for (row, b) in w.data.chunks(3 * h).zip(bias) {
        data.extend_from_slice(row);
        data.push(b);
    }
    Ok(HostTensor::new(vec![h, 3 * h + 1], data))
}

/// The `[hidden, hidden]` identity matrix.
fn identity(h: usize) -> HostTensor {
    HostTensor::new(vec![h, h], (0..h * h).map(|i| if i / h == i % h { 1.0 } else { 0.0 }).collect())
}

/// q, k and v (`[out, 2 * hidden]` each) split into their embedding and hidden halves.
fn split_qkv<B: Backend>(
    src: &SafetensorsWeights,
    prefix: &str,
    outs: [usize; 3],
    h: usize,
    b: &B,
) -> std::result::Result<[[B::Tensor; 3]; 2], LoadError> {
    let mut halves: [Vec<B::Tensor>; 2] = [vec![], vec![]];
    for (name, out) in ["q_proj", "k_proj", "v_proj"].into_iter().zip(outs) {
        let w = src.tensor(&format!("{prefix}self_attn.{name}.weight"), &[out, 2 * h])?;
        for (half, dest) in halves.iter_mut().enumerate() {
            let data = w.data.chunks(2 * h).flat_map(|row| row[half * h..(half + 1) * h].iter().copied()).collect();
            dest.push(b.upload(&HostTensor::new(vec![out, h], data))?);
        }
    }
    let [e, g] = halves;
    let three =
        |v: Vec<B::Tensor>| -> [B::Tensor; 3] { v.try_into().unwrap_or_else(|_| unreachable!("three projections")) };
    Ok([three(e), three(g)])
}

/// The head's draft-to-target map (`d2t`: target id = draft id + d2t[draft id]); `None`
/// when the head predicts over the target's whole vocabulary. A map reaching outside the
/// target's vocabulary means the head was made for another model.
fn draft_map(
    src: &SafetensorsWeights,
    draft_vocab: usize,
    vocab: usize,
) -> std::result::Result<Option<Arc<[u32]>>, SpecError> {
    if !src.contains("d2t") && draft_vocab == vocab {
        return Ok(None);
    }
    let offsets = src.integers("d2t", draft_vocab).map_err(SpecError::EagleHead)?;
    let ids: Vec<i64> = offsets.iter().enumerate().map(|(i, &o)| i as i64 + o).collect();
    let top = ids.iter().copied().max().unwrap_or(0);
    if ids.iter().any(|&t| t < 0) || top >= vocab as i64 {
        return Err(SpecError::HeadMismatch { what: HeadSize::Vocab, head: top.max(0) as usize + 1, target: vocab });
    }
    Ok(Some(ids.into_iter().map(|t| t as u32).collect()))
}

/// The head reads the target's hidden states and embeddings: the same hidden size and
/// vocabulary; and only the layout every public head uses is supported.
fn check_json(
    json: &Eagle3Json,
    head: &ModelConfig,
    target: &ModelConfig,
    path: &Path,
) -> std::result::Result<(), SpecError> {
    let sizes = [
        (HeadSize::Hidden, head.hidden_size, target.hidden_size),
        (HeadSize::Hidden, json.target_hidden_size.unwrap_or(head.hidden_size), target.hidden_size),
        (HeadSize::Vocab, head.vocab_size, target.vocab_size),
    ];
    if let Some((what, head, target)) = sizes.into_iter().find(|&(_, h, t)| h != t) {
        return Err(SpecError::HeadMismatch { what, head, target });
    }
    let unsupported = |what: &str| Err(SpecError::EagleHead(LoadError::format(path, format!("unsupported: {what}"))));
    if json.eagle_config.as_ref().and_then(|c| c.use_aux_hidden_state) == Some(false) {
        return unsupported("use_aux_hidden_state false (a head without fc)");
    }
    Ok(())
}
