//! A GGUF v3 writer, the ggml quantizers (Q8_0, Q4_0, Q4_1 as ggml's reference `quantize_row_*`
//! computes them) with their own dequantizers, and the tiny model written as llama.cpp's
//! converter writes a Llama (Q/K rows permuted for its interleaved RoPE).

use std::path::Path;

use half::{bf16, f16};

use super::reference::llama3_divisor;
use super::tiny::TinyModel;
use super::vocab::{BOS_ID, CHATML, EOS_ID};

/// A metadata value; the variant is the GGUF value type written.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Elements must all have the type of the first (an empty array is written as u32).
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn str(s: &str) -> Self {
        Value::Str(s.to_string())
    }

    pub fn strings<S: AsRef<str>>(items: &[S]) -> Self {
        Value::Array(items.iter().map(|s| Value::Str(s.as_ref().to_string())).collect())
    }

    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.push(*v as u8),
            Value::U16(v) => out.extend(v.to_le_bytes()),
            Value::I16(v) => out.extend(v.to_le_bytes()),
            Value::U32(v) => out.extend(v.to_le_bytes()),
            Value::I32(v) => out.extend(v.to_le_bytes()),
            Value::F32(v) => out.extend(v.to_le_bytes()),
            Value::Bool(v) => out.push(*v as u8),
            Value::Str(s) => write_str(out, s),
            Value::Array(items) => {
                out.extend(items.first().map_or(4, Value::type_id).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|v| v.write(out));
            }
            Value::U64(v) => out.extend(v.to_le_bytes()),
            Value::I64(v) => out.extend(v.to_le_bytes()),
            Value::F64(v) => out.extend(v.to_le_bytes()),
        }
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A tensor as stored: GGUF dims (innermost first), ggml type id, raw bytes.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub data: Vec<u8>,
}

/// Metadata and tensors of a GGUF file to write, editable before writing.
#[derive(Debug, Clone)]
pub struct GgufBuilder {
    pub version: u32,
    pub alignment: u64,
    pub kv: Vec<(String, Value)>,
    pub tensors: Vec<RawTensor>,
}

impl GgufBuilder {
    pub fn new(arch: &str) -> Self {
        let mut b = GgufBuilder { version: 3, alignment: 32, kv: vec![], tensors: vec![] };
        b.set("general.architecture", Value::str(arch));
        b
    }

    pub fn set(&mut self, key: &str, value: Value) {
        self.remove(key);
        self.kv.push((key.to_string(), value));
    }

    pub fn remove(&mut self, key: &str) {
        self.kv.retain(|(k, _)| k != key);
    }

    pub fn add_tensor(&mut self, name: &str, dims: Vec<u64>, type_id: u32, data: Vec<u8>) {
        self.tensors.push(RawTensor { name: name.to_string(), dims, type_id, data });
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut RawTensor {
        self.tensors.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"))
    }

    pub fn remove_tensor(&mut self, name: &str) {
        let before = self.tensors.len();
        self.tensors.retain(|t| t.name != name);
        assert_eq!(before, self.tensors.len() + 1, "no tensor {name}");
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut kv = self.kv.clone();
        if self.alignment != 32 {
            kv.push(("general.alignment".into(), Value::U32(self.alignment as u32)));
        }
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((kv.len() as u64).to_le_bytes());
        for (key, value) in &kv {
            write_str(&mut out, key);
            out.extend(value.type_id().to_le_bytes());
            value.write(&mut out);
        }
        let align = |n: usize| n.div_ceil(self.alignment as usize) * self.alignment as usize;
        let mut offset = 0;
        let mut offsets = vec![];
        for t in &self.tensors {
            write_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(t.type_id.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = align(offset + t.data.len());
        }
        let data_start = align(out.len());
        out.resize(data_start, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend(&t.data);
        }
        out
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_bytes()).unwrap();
    }
}

/// ggml type ids.
pub const GGML_F32: u32 = 0;
pub const GGML_F16: u32 = 1;
pub const GGML_Q4_0: u32 = 2;
pub const GGML_Q4_1: u32 = 3;
pub const GGML_Q8_0: u32 = 8;
pub const GGML_Q5_K: u32 = 13;
pub const GGML_BF16: u32 = 30;

/// The tensor types we write, with an encoder and an independent decoder for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl GgufDtype {
    pub const ALL: [GgufDtype; 6] =
        [GgufDtype::F32, GgufDtype::F16, GgufDtype::Bf16, GgufDtype::Q8_0, GgufDtype::Q4_0, GgufDtype::Q4_1];

    pub fn type_id(self) -> u32 {
        match self {
            GgufDtype::F32 => GGML_F32,
            GgufDtype::F16 => GGML_F16,
            GgufDtype::Bf16 => GGML_BF16,
            GgufDtype::Q8_0 => GGML_Q8_0,
            GgufDtype::Q4_0 => GGML_Q4_0,
            GgufDtype::Q4_1 => GGML_Q4_1,
        }
    }

    pub fn encode(self, x: &[f32]) -> Vec<u8> {
        match self {
            GgufDtype::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgufDtype::F16 => x.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
            GgufDtype::Bf16 => x.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
            GgufDtype::Q8_0 => x.chunks(32).flat_map(quantize_q8_0).collect(),
            GgufDtype::Q4_0 => x.chunks(32).flat_map(quantize_q4_0).collect(),
            GgufDtype::Q4_1 => x.chunks(32).flat_map(quantize_q4_1).collect(),
        }
    }

    pub fn decode(self, b: &[u8]) -> Vec<f32> {
        let h = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        match self {
            GgufDtype::F32 => b.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            GgufDtype::F16 => b.chunks(2).map(|c| h(c, 0)).collect(),
            GgufDtype::Bf16 => b.chunks(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            GgufDtype::Q8_0 => {
                b.chunks(34).flat_map(|c| c[2..].iter().map(move |&q| q as i8 as f32 * h(c, 0))).collect()
            }
            GgufDtype::Q4_0 => {
                b.chunks(18).flat_map(|c| (0..32).map(move |j| (nibble(&c[2..], j) as f32 - 8.0) * h(c, 0))).collect()
            }
            GgufDtype::Q4_1 => {
                b.chunks(20).flat_map(|c| (0..32).map(move |j| nibble(&c[4..], j) as f32 * h(c, 0) + h(c, 2))).collect()
            }
        }
    }

    /// What a loader must produce from `encode(x)`.
    pub fn round_trip(self, x: &[f32]) -> Vec<f32> {
        self.decode(&self.encode(x))
    }
}

/// Element j of a 32-value block of packed nibbles: low nibbles hold 0..16, high ones 16..32.
fn nibble(qs: &[u8], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 0x0f
    } else {
        qs[j - 16] >> 4
    }
}

fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut out = f16::from_f32(d).to_le_bytes().to_vec();
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
    out
}

fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    // The value of largest magnitude, sign kept, maps to -8.
    let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    let mut out = f16::from_f32(d).to_le_bytes().to_vec();
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
    out
}

fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    let min = x.iter().cloned().fold(f32::INFINITY, f32::min);
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
    let mut out = f16::from_f32(d).to_le_bytes().to_vec();
    out.extend(f16::from_f32(min).to_le_bytes());
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
    out
}

/// llama.cpp's converter permutation of Q/K rows: within each head, Hugging Face row
/// `s·head_dim/2 + j` moves to row `2j + s`.
pub fn permute_rows(data: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = data.len() / rows;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                let hf = h * head_dim + s * half + j;
                let gg = h * head_dim + 2 * j + s;
                out[gg * cols..][..cols].copy_from_slice(&data[hf * cols..][..cols]);
            }
        }
    }
    out
}

/// The GGUF name of a Hugging Face weight name, as llama.cpp names it.
pub fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let part = match part.strip_suffix(".weight").unwrap() {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        other => panic!("unknown weight {other}"),
    };
    format!("blk.{layer}.{part}.weight")
}

/// The tiny model as a GGUF file with 2-D weights stored as `dtype` (1-D norms stay F32, as
/// llama.cpp keeps them), full llama and tokenizer metadata. Returns the builder (to edit or
/// write) and the model as stored, in Hugging Face layout: what a loader must reproduce.
pub fn tiny_gguf(model: &TinyModel, dtype: GgufDtype) -> (GgufBuilder, TinyModel) {
    let s = &model.spec;
    let mut b = GgufBuilder::new("llama");
    b.set("general.name", Value::str("specula tiny test model"));
    b.set("llama.context_length", Value::U32(s.max_positions as u32));
    b.set("llama.embedding_length", Value::U32(s.hidden as u32));
    b.set("llama.feed_forward_length", Value::U32(s.intermediate as u32));
    b.set("llama.block_count", Value::U32(s.layers as u32));
    b.set("llama.attention.head_count", Value::U32(s.heads as u32));
    b.set("llama.attention.head_count_kv", Value::U32(s.kv_heads as u32));
    b.set("llama.rope.freq_base", Value::F32(s.rope_theta as f32));
    b.set("llama.attention.layer_norm_rms_epsilon", Value::F32(s.eps as f32));
    b.set("llama.rope.dimension_count", Value::U32(s.head_dim as u32));
    if s.q_dim() != s.hidden {
        b.set("llama.attention.key_length", Value::U32(s.head_dim as u32));
        b.set("llama.attention.value_length", Value::U32(s.head_dim as u32));
    }
    b.set("llama.vocab_size", Value::U32(s.vocab as u32));
    b.set("general.file_type", Value::U32(dtype.type_id()));
    let v = &model.vocab;
    b.set("tokenizer.ggml.model", Value::str("gpt2"));
    b.set("tokenizer.ggml.pre", Value::str("smollm"));
    b.set("tokenizer.ggml.tokens", Value::strings(&v.tokens));
    b.set("tokenizer.ggml.token_type", Value::Array(v.types.iter().map(|&t| Value::I32(t)).collect()));
    b.set("tokenizer.ggml.merges", Value::strings(&v.merge_strings()));
    b.set("tokenizer.ggml.bos_token_id", Value::U32(BOS_ID));
    b.set("tokenizer.ggml.eos_token_id", Value::U32(EOS_ID));
    b.set("tokenizer.ggml.add_bos_token", Value::Bool(false));
    b.set("tokenizer.chat_template", Value::str(CHATML));

    let mut names: Vec<&String> = model.weights.keys().collect();
    names.sort();
    for name in names {
        let (shape, data) = &model.weights[name];
        let heads = match name {
            n if n.ends_with("q_proj.weight") => Some(s.heads),
            n if n.ends_with("k_proj.weight") => Some(s.kv_heads),
            _ => None,
        };
        let stored = heads.map_or_else(|| data.clone(), |h| permute_rows(data, shape[0], h));
        let dt = if shape.len() == 1 { GgufDtype::F32 } else { dtype };
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        b.add_tensor(&gguf_name(name), dims, dt.type_id(), dt.encode(&stored));
    }
    if let Some(r) = s.rope_scaling {
        // As llama.cpp's converter bakes llama3 scaling into per-frequency divisors.
        let divisors: Vec<f32> = (0..s.head_dim / 2)
            .map(|i| llama3_divisor(s.rope_theta.powf(-((2 * i) as f64) / s.head_dim as f64), r) as f32)
            .collect();
        b.add_tensor("rope_freqs.weight", vec![divisors.len() as u64], GGML_F32, GgufDtype::F32.encode(&divisors));
        b.set("llama.rope.scaling.original_context_length", Value::U32(r.original_max_position_embeddings as u32));
    }
    // Quantization blocks never straddle rows (inner dims are multiples of 32), so the row
    // permutation commutes with it and the stored values are the round trip of each row.
    let stored = model.map(|_, shape, d| if shape.len() == 1 { d.to_vec() } else { dtype.round_trip(d) });
    (b, stored)
}
