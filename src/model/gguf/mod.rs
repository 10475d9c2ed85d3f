//! GGUF files (llama.cpp's format) of the `llama` architecture: configuration from the
//! metadata, weights dequantized to f32 at load (F32, F16, BF16, Q8_0, Q4_0, Q4_1), and the
//! tokenizer rebuilt from the `tokenizer.ggml.*` keys.
//!
//! Tensors are served under their Hugging Face names, in the Hugging Face layout: GGUF dims
//! are reversed into a row-major shape, and the rows of `attn_q` / `attn_k`, which llama.cpp's
//! converter interleaves for its RoPE, are put back in the order our rotate-half RoPE expects.

mod dtype;
mod parse;
mod tokenizer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::{LoadError, ModelConfig, RopeScaling, WeightSource};
use crate::tensor::quant::{BlockWeight, QuantWeight};
use crate::tensor::HostTensor;
pub use dtype::GgmlType;
pub use parse::{GgufValue, TensorInfo};

/// An open, validated GGUF file, memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: HashMap<String, GgufValue>,
    tensors: HashMap<String, TensorInfo>,
    /// Absolute byte offset of the data section.
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// The architecture whose tensor names and metadata keys we read.
const ARCH: &str = "llama";

impl GgufFile {
    /// Opens and validates `path`: header, metadata, tensor table, and that every tensor's
    /// data lies inside the file. Only the `llama` architecture is accepted.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
        // SAFETY: the file is opened read-only; weights files are not modified while loaded.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
        let header = parse::parse_header(&mmap).map_err(|msg| LoadError::format(path, msg))?;
        let arch = header.metadata.get("general.architecture").and_then(GgufValue::as_str);
        match arch {
            Some(ARCH) => {}
            Some(other) => return Err(LoadError::Architecture { path: path.into(), arch: other.to_string() }),
            None => return Err(LoadError::format(path, "no `general.architecture` in the metadata")),
        }
        let mut tensors = HashMap::with_capacity(header.tensors.len());
        for t in header.tensors {
            check_bounds(&t, header.data_start, mmap.len()).map_err(|msg| LoadError::format(path, msg))?;
            if tensors.contains_key(&t.name) {
                return Err(LoadError::format(path, format!("tensor `{}` is listed twice", t.name)));
            }
            tensors.insert(t.name.clone(), t);
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version: header.version,
            metadata: header.metadata,
            tensors,
            data_start: header.data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// A metadata value by key (`llama.block_count`, `tokenizer.ggml.tokens`, ...).
    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The model configuration from the `llama.*` metadata and the tensor table.
    pub fn config(&self) -> Result<ModelConfig, LoadError> {
        let hidden = self.required_usize("llama.embedding_length")?;
        let num_heads = self.required_usize("llama.attention.head_count")?;
        let num_kv_heads = self.usize_key("llama.attention.head_count_kv")?.unwrap_or(num_heads);
        let head_dim = match self.usize_key("llama.attention.key_length")? {
            Some(d) => d,
            None => self.usize_key("llama.rope.dimension_count")?.unwrap_or(hidden / num_heads.max(1)),
        };
        let vocab_size = match self.usize_key("llama.vocab_size")? {
            Some(v) => v,
            None => match self.metadata("tokenizer.ggml.tokens").and_then(GgufValue::as_array) {
                Some(tokens) => tokens.len(),
                None => match self.tensors.get("token_embd.weight") {
                    Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
                    _ => return Err(self.missing_key("llama.vocab_size")),
                },
            },
        };
        let token_id = |key: &str| self.usize_key(key).map(|v| v.map(|v| v as u32));
        let mut eos_token_ids: Vec<u32> = Vec::new();
        // End of turn / end of message ids stop generation too (Llama 3 instruct models).
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = token_id(key)? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let config = ModelConfig {
            hidden_size: hidden,
            intermediate_size: self.required_usize("llama.feed_forward_length")?,
            num_layers: self.required_usize("llama.block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rope_theta: self.f64_key("llama.rope.freq_base")?.unwrap_or(10000.0) as f32,
            rope_scaling: None,
            rms_norm_eps: self.f64_key("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5) as f32,
            tie_word_embeddings: !self.tensors.contains_key("output.weight"),
            max_position_embeddings: self.usize_key("llama.context_length")?.unwrap_or(2048),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids,
            sliding_window: None,
        };
        // Checked before the RoPE tables are computed from it, and again with its scaling.
        config.validate().map_err(|e| LoadError::format(&self.path, e.gguf()))?;
        let config = ModelConfig { rope_scaling: self.rope_scaling(&config)?, ..config };
        config.validate().map_err(|e| LoadError::format(&self.path, e.gguf()))?;
        // Each layer is 9 tensors: a layer count the file cannot hold is refused here,
        // before anything is allocated for it.
        if config.num_layers * 9 > self.tensors.len() {
            return Err(LoadError::format(
                &self.path,
                format!(
                    "invalid model configuration: `llama.block_count` is {}, but the file holds {} tensors (9 per layer)",
                    config.num_layers,
                    self.tensors.len()
                ),
            ));
        }
        Ok(config)
    }

    /// The tokenizer rebuilt from the `tokenizer.ggml.*` metadata (byte-level BPE models).
    pub fn tokenizer(&self) -> Result<super::Tokenizer, LoadError> {
        tokenizer::build(self)
    }

    /// Llama 3 RoPE scaling. llama.cpp's converter does not write the llama3 parameters; it
    /// bakes them into a `rope_freqs.weight` tensor of per-frequency divisors. We recover the
    /// parameters from it (factor = the largest divisor; low/high frequency factors 1 and 4 and
    /// the original context from `llama.rope.scaling.original_context_length`, else 8192, as
    /// every Llama 3.x model uses) and refuse the file when the divisors do not match them.
    fn rope_scaling(&self, config: &ModelConfig) -> Result<Option<RopeScaling>, LoadError> {
        match self.str_key("llama.rope.scaling.type")? {
            None | Some("none") => {}
            Some(other) => {
                return Err(LoadError::format(&self.path, format!("unsupported RoPE scaling type `{other}`")));
            }
        }
        const FREQS: &str = "rope_freqs.weight";
        if !self.tensors.contains_key(FREQS) {
            return Ok(None);
        }
        let half = config.head_dim / 2;
        let divisors = self.raw_tensor(FREQS, &[half])?.data;
        let factor = divisors.iter().copied().fold(1.0f32, f32::max);
        if divisors.iter().all(|&d| (d - 1.0).abs() < 1e-6) {
            return Ok(None);
        }
        let scaling = RopeScaling {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: self
                .usize_key("llama.rope.scaling.original_context_length")?
                .unwrap_or(8192),
        };
        let plain = ModelConfig { rope_scaling: None, ..config.clone() }.rope_inv_freq();
        let scaled = ModelConfig { rope_scaling: Some(scaling), ..config.clone() }.rope_inv_freq();
        for (i, ((&p, &s), &d)) in plain.iter().zip(&scaled).zip(&divisors).enumerate() {
            let expected = p / s;
            if ((expected - d) / d).abs() > 1e-4 {
                return Err(LoadError::format(
                    &self.path,
                    format!(
                        "tensor `{FREQS}`: divisor {i} is {d}, but llama3 RoPE scaling {scaling:?} gives {expected}; \
                         other RoPE scalings are not supported"
                    ),
                ));
            }
        }
        Ok(Some(scaling))
    }

    /// A tensor's type and bytes by GGUF name, checked against the checkpoint's `shape`
    /// (GGUF lists dims innermost first, so they are reversed).
    fn tensor_bytes(&self, gguf_name: &str, shape: &[usize]) -> Result<(GgmlType, &[u8]), LoadError> {
        let info = self.tensors.get(gguf_name).ok_or_else(|| LoadError::missing(&self.path, gguf_name))?;
        let unsupported = |dtype: String| LoadError::Dtype { path: self.path.clone(), tensor: gguf_name.into(), dtype };
        let ty = match GgmlType::from_id(info.type_id) {
            Some(GgmlType::Other { name, .. }) => return Err(unsupported(name.to_string())),
            Some(ty) => ty,
            None => return Err(unsupported(format!("ggml type id {}", info.type_id))),
        };
        let found: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        if found != shape {
            return Err(LoadError::shape(&self.path, gguf_name, shape, &found));
        }
        // The size was checked against the file at open.
        let size = ty.data_size(&info.dims).map_err(|msg| LoadError::format(&self.path, msg))? as usize;
        let start = self.data_start + info.offset as usize;
        Ok((ty, &self.mmap[start..start + size]))
    }

    /// A tensor by GGUF name, dequantized, row-major with the checkpoint's shape.
    fn raw_tensor(&self, gguf_name: &str, shape: &[usize]) -> Result<HostTensor, LoadError> {
        let (ty, bytes) = self.tensor_bytes(gguf_name, shape)?;
        let data = ty.dequantize(bytes).ok_or_else(|| LoadError::Dtype {
            path: self.path.clone(),
            tensor: gguf_name.into(),
            dtype: ty.name().to_string(),
        })?;
        Ok(HostTensor::new(shape.to_vec(), data))
    }

    /// How many heads a tensor's rows are permuted within (0: not permuted).
    fn permuted_heads(&self, rows: Rows) -> Result<usize, LoadError> {
        Ok(match rows {
            Rows::AsIs => 0,
            Rows::QueryHeads => self.required_usize("llama.attention.head_count")?,
            Rows::KeyHeads => match self.usize_key("llama.attention.head_count_kv")? {
                Some(h) => h,
                None => self.required_usize("llama.attention.head_count")?,
            },
        })
    }

    /// Resolves a Hugging Face name to its GGUF name and permuted head count, checking that
    /// permuted rows split into heads.
    fn resolve(&self, name: &str, shape: &[usize]) -> Result<(String, usize), LoadError> {
        let (gguf, rows) = gguf_name(name).ok_or_else(|| LoadError::missing(&self.path, name))?;
        if !self.tensors.contains_key(&gguf) {
            return Err(LoadError::missing(&self.path, &format!("{gguf}` / `{name}")));
        }
        let heads = self.permuted_heads(rows)?;
        if heads > 0 && (shape.len() != 2 || !shape[0].is_multiple_of(2 * heads)) {
            return Err(LoadError::format(
                &self.path,
                format!("tensor `{gguf}`: {:?} rows do not split into {heads} heads of even size", shape.first()),
            ));
        }
        Ok((gguf, heads))
    }

    fn missing_key(&self, key: &str) -> LoadError {
        LoadError::format(&self.path, format!("metadata `{key}` is missing"))
    }

    fn wrong_type(&self, key: &str, expected: &str, v: &GgufValue) -> LoadError {
        LoadError::format(&self.path, format!("metadata `{key}` should be {expected}, found {v:?}"))
    }

    fn usize_key(&self, key: &str) -> Result<Option<usize>, LoadError> {
        self.metadata(key)
            .map(|v| v.as_u64().map(|x| x as usize).ok_or_else(|| self.wrong_type(key, "a non-negative integer", v)))
            .transpose()
    }

    fn required_usize(&self, key: &str) -> Result<usize, LoadError> {
        self.usize_key(key)?.ok_or_else(|| self.missing_key(key))
    }

    fn f64_key(&self, key: &str) -> Result<Option<f64>, LoadError> {
        self.metadata(key).map(|v| v.as_f64().ok_or_else(|| self.wrong_type(key, "a number", v))).transpose()
    }

    fn str_key(&self, key: &str) -> Result<Option<&str>, LoadError> {
        self.metadata(key).map(|v| v.as_str().ok_or_else(|| self.wrong_type(key, "a string", v))).transpose()
    }
}

/// Checks that the tensor's data lies inside the file.
fn check_bounds(t: &TensorInfo, data_start: usize, file_len: usize) -> Result<(), String> {
    let start = (data_start as u64).checked_add(t.offset);
    let size = match GgmlType::from_id(t.type_id) {
        Some(ty) => ty.data_size(&t.dims).map_err(|msg| format!("tensor `{}`: {msg}", t.name))?,
        // A type we cannot size: at least its first byte must be in the file.
        None => 1,
    };
    match start.and_then(|s| s.checked_add(size)) {
        Some(end) if end <= file_len as u64 => Ok(()),
        _ => Err(format!(
            "tensor `{}` ({size} bytes at offset {}) extends past the end of the file ({file_len} bytes): \
             the file is truncated or corrupt",
            t.name,
            data_start as u64 + t.offset
        )),
    }
}

/// Which row permutation a tensor needs when read in the Hugging Face layout.
enum Rows {
    AsIs,
    /// llama.cpp's converter interleaved the rotary halves of each query head ...
    QueryHeads,
    /// ... and of each key head.
    KeyHeads,
}

/// The GGUF name for a Hugging Face tensor name, and whether its rows need un-permuting.
fn gguf_name(hf: &str) -> Option<(String, Rows)> {
    let simple = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = simple {
        return Some((name.to_string(), Rows::AsIs));
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = rest.strip_suffix(".weight")?;
    let (name, rows) = match part {
        "self_attn.q_proj" => ("attn_q", Rows::QueryHeads),
        "self_attn.k_proj" => ("attn_k", Rows::KeyHeads),
        "self_attn.v_proj" => ("attn_v", Rows::AsIs),
        "self_attn.o_proj" => ("attn_output", Rows::AsIs),
        "mlp.gate_proj" => ("ffn_gate", Rows::AsIs),
        "mlp.up_proj" => ("ffn_up", Rows::AsIs),
        "mlp.down_proj" => ("ffn_down", Rows::AsIs),
        "input_layernorm" => ("attn_norm", Rows::AsIs),
        "post_attention_layernorm" => ("ffn_norm", Rows::AsIs),
        _ => return None,
    };
    Some((format!("blk.{layer}.{name}.weight"), rows))
}

/// Undoes llama.cpp's Q/K row permutation: for each Hugging Face row, the GGUF row that
/// holds it. Within each head of `head_dim` rows, GGUF row `2j + s` holds Hugging Face row
/// `s · head_dim/2 + j` (s ∈ {0, 1}, j < head_dim/2).
fn unpermuted_order(rows: usize, heads: usize) -> Vec<usize> {
    let head_dim = rows / heads;
    let half = head_dim / 2;
    (0..rows)
        .map(|dst| {
            let (h, r) = (dst / head_dim, dst % head_dim);
            let (s, j) = (r / half, r % half);
            h * head_dim + 2 * j + s
        })
        .collect()
}

fn permute_rows(t: &HostTensor, from: &[usize]) -> HostTensor {
    let cols = t.shape[1];
    let data = from.iter().flat_map(|&r| t.data[r * cols..(r + 1) * cols].iter().copied()).collect();
    HostTensor::new(t.shape.clone(), data)
}

impl WeightSource for GgufFile {
    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|(g, _)| self.tensors.contains_key(&g))
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor, LoadError> {
        let (gguf, heads) = self.resolve(name, shape)?;
        let t = self.raw_tensor(&gguf, shape)?;
        Ok(if heads == 0 { t } else { permute_rows(&t, &unpermuted_order(shape[0], heads)) })
    }

    fn quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QuantWeight>, LoadError> {
        let (gguf, heads) = self.resolve(name, shape)?;
        let (ty, bytes) = self.tensor_bytes(&gguf, shape)?;
        // Only matrices stay in blocks; a vector stored quantized is dequantized by `tensor`.
        let (Some(format), &[rows, cols]) = (ty.quant_format(), shape) else { return Ok(None) };
        let w = QuantWeight::Blocks(BlockWeight { format, shape: [rows, cols], blocks: bytes.to_vec() });
        Ok(Some(if heads == 0 { w } else { w.permute_rows(&unpermuted_order(rows, heads)) }))
    }
}
