//! Medusa heads: K small heads on the target's last hidden state, head i guessing the token
//! i + 1 positions past the one the target's own LM head predicts.
//!
//! ```text
//!  h: the target's hidden state after its final norm at the newest verified position
//!  head i:  x = h;  per layer:  x = x + SiLU(W_l · x + b_l)       (ResBlock, [hidden, hidden])
//!           logits_i = W_out · x                                  ([vocab, hidden], no bias)
//! ```
//! Weights load as FasterDecoding/Medusa saves them (`medusa_lm_head.safetensors`, keys
//! `{i}.{l}.linear.weight|bias` and `{i}.{L}.weight`, optionally under `medusa_head.`), with
//! `config.json` giving `medusa_num_heads` and `medusa_num_layers`. A head without its own
//! `{i}.{L}.weight` reads the target's LM head (the shared layout of TGI's Medusa loader).

use std::path::{Path, PathBuf};

use crate::model::safetensors::SafetensorsWeights;
use crate::model::{Llama, LoadError, ModelConfig, WeightSource};
use crate::spec::{HeadSize, SpecError};
use crate::tensor::random::normal_values;
use crate::tensor::{Backend, HostTensor, Result};

/// How many heads and ResBlocks per head (`config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MedusaConfig {
    pub num_heads: usize,
    pub num_layers: usize,
}

/// The most heads a checkpoint may have (each guesses one position further).
pub const MAX_MEDUSA_HEADS: usize = 16;

/// One head: its ResBlocks, each `[hidden, hidden + 1]` with the bias as a last column (the
/// input row ends in a 1), and its own LM head `[vocab, hidden]` or None for the target's.
struct Head<T> {
    blocks: Vec<T>,
    out: Option<T>,
}

pub struct MedusaHeads<B: Backend> {
    pub config: MedusaConfig,
    pub hidden: usize,
    heads: Vec<Head<B::Tensor>>,
    /// Random weights, not trained ones: drafts are guesses and are labelled so.
    pub random: bool,
}

impl<B: Backend> MedusaHeads<B> {
    /// Loads the heads in `dir` for `target`: heads of another hidden size or vocabulary are
    /// refused with both sizes named.
    pub fn load(dir: &Path, target: &ModelConfig, b: &B) -> std::result::Result<Self, SpecError> {
        let config = read_config(&dir.join("config.json")).map_err(SpecError::MedusaHead)?;
        let file = weights_file(dir);
        let src = SafetensorsWeights::open_files(std::slice::from_ref(&file)).map_err(SpecError::MedusaHead)?;
        let names = Names::find(&src, &file).map_err(SpecError::MedusaHead)?;
        let hidden = src.shape_of(&names.block(0, 0, "weight")).map_or(0, |s| s[0]);
        check_size(HeadSize::Hidden, hidden, target.hidden_size)?;
        let out = names.out(0, config.num_layers);
        if let Some(shape) = src.shape_of(&out) {
            check_size(HeadSize::Vocab, shape[0], target.vocab_size)?;
        }
        let heads = (0..config.num_heads).map(|i| load_head(&src, &names, i, config, target, b));
        let heads = heads.collect::<std::result::Result<_, _>>().map_err(SpecError::MedusaHead)?;
        Ok(MedusaHeads { config, hidden, heads, random: false })
    }

    /// `num_heads` heads of one ResBlock with random weights, reading the target's LM head:
    /// for measuring what drafting costs when no trained head exists. Never accurate.
    pub fn random(target: &ModelConfig, num_heads: usize, seed: u64, b: &B) -> Result<Self> {
        let h = target.hidden_size;
        let heads = (0..num_heads as u64).map(|i| {
            let mut w = normal_values(h * h, 1.0 / (h as f32).sqrt(), seed.wrapping_add(i));
            let with_bias: Vec<f32> = w.chunks_mut(h).flat_map(|row| row.iter().copied().chain([0.0])).collect();
            Ok(Head { blocks: vec![b.upload(&HostTensor::new(vec![h, h + 1], with_bias))?], out: None })
        });
        let config = MedusaConfig { num_heads, num_layers: 1 };
        Ok(MedusaHeads { config, hidden: h, heads: heads.collect::<Result<_>>()?, random: true })
    }

    /// Each of the first `n` heads' logits (host, `[vocab]` each) from the hidden state `h`.
    pub fn logits(&self, b: &B, target: &Llama<B>, h: &[f32], n: usize) -> Result<Vec<Vec<f32>>> {
        self.logit_rows(b, target, h, n)?.iter().map(|t| b.to_host(t)).collect()
    }

    /// `logits` left on the device: one `[1, vocab]` tensor per head.
    pub fn logit_rows(&self, b: &B, target: &Llama<B>, h: &[f32], n: usize) -> Result<Vec<B::Tensor>> {
        self.heads.iter().take(n).map(|head| self.head_logits(b, target, head, h)).collect()
    }

    fn head_logits(&self, b: &B, target: &Llama<B>, head: &Head<B::Tensor>, h: &[f32]) -> Result<B::Tensor> {
        let mut x = h.to_vec();
        for block in &head.blocks {
            let input = HostTensor::new(vec![1, self.hidden + 1], x.iter().copied().chain([1.0]).collect());
            let y = b.to_host(&b.matmul(&b.upload(&input)?, block)?)?;
            x.iter_mut().zip(y).for_each(|(x, y)| *x += y / (1.0 + (-y).exp()));
        }
        let x = b.upload(&HostTensor::new(vec![1, self.hidden], x))?;
        b.matmul(&x, head.out.as_ref().unwrap_or(target.lm_head()))
    }
}

fn check_size(what: HeadSize, head: usize, target: usize) -> std::result::Result<(), SpecError> {
    match head == target {
        true => Ok(()),
        false => Err(SpecError::HeadMismatch { what, head, target }),
    }
}

/// `medusa_num_heads` (required) and `medusa_num_layers` (default 1) from `config.json`.
fn read_config(path: &Path) -> std::result::Result<MedusaConfig, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| LoadError::format(path, format!("invalid JSON: {e}")))?;
    let count = |key: &str, default: Option<u64>| {
        let v = json.get(key).map(|v| v.as_u64()).unwrap_or(default);
        v.map(|v| v as usize).ok_or_else(|| LoadError::format(path, format!("`{key}` must be a whole number")))
    };
    let config =
        MedusaConfig { num_heads: count("medusa_num_heads", None)?, num_layers: count("medusa_num_layers", Some(1))? };
    if !(1..=MAX_MEDUSA_HEADS).contains(&config.num_heads) || !(1..=8).contains(&config.num_layers) {
        return Err(LoadError::format(path, format!("{config:?}: 1 to {MAX_MEDUSA_HEADS} heads of 1 to 8 layers")));
    }
    Ok(config)
}

/// `medusa_lm_head.safetensors` as Medusa saves it, else `model.safetensors`.
fn weights_file(dir: &Path) -> PathBuf {
    let medusa = dir.join("medusa_lm_head.safetensors");
    if medusa.exists() {
        medusa
    } else {
        dir.join("model.safetensors")
    }
}

/// The checkpoint's key prefix: `medusa_head.` (heads saved inside a model) or none (the
/// heads' own state dict).
struct Names {
    prefix: &'static str,
}

impl Names {
    fn find(src: &SafetensorsWeights, file: &Path) -> std::result::Result<Self, LoadError> {
        let found = ["medusa_head.", ""].into_iter().find(|p| src.contains(&format!("{p}0.0.linear.weight")));
        let missing = || LoadError::missing(file, "medusa_head.0.0.linear.weight");
        found.map(|prefix| Names { prefix }).ok_or_else(missing)
    }

    fn block(&self, head: usize, layer: usize, what: &str) -> String {
        format!("{}{head}.{layer}.linear.{what}", self.prefix)
    }

    fn out(&self, head: usize, layers: usize) -> String {
        format!("{}{head}.{layers}.weight", self.prefix)
    }
}

fn load_head<B: Backend>(
    src: &SafetensorsWeights,
    names: &Names,
    i: usize,
    config: MedusaConfig,
    target: &ModelConfig,
    b: &B,
) -> std::result::Result<Head<B::Tensor>, LoadError> {
    let (h, v) = (target.hidden_size, target.vocab_size);
    let mut blocks = vec![];
    for l in 0..config.num_layers {
        let w = src.tensor(&names.block(i, l, "weight"), &[h, h])?;
        let bias = src.tensor(&names.block(i, l, "bias"), &[h])?;
        let data: Vec<f32> =
            w.data.chunks(h).zip(&bias.data).flat_map(|(row, &b)| row.iter().copied().chain([b])).collect();
        blocks.push(b.upload(&HostTensor::new(vec![h, h + 1], data))?);
    }
    let out_name = names.out(i, config.num_layers);
    let out = match src.contains(&out_name) {
        true => Some(b.upload(&src.tensor(&out_name, &[v, h])?)?),
        false => None,
    };
    Ok(Head { blocks, out })
}
