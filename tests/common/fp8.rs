//! FP8 E4M3 written from the format's definition and nothing in `src/`: decoding, nearest-code
//! rounding by search, per-channel quantization; writers of tiny FP8 checkpoints in the
//! compressed-tensors and ModelOpt formats; and the f64 reference forward of such a model.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use super::reference;
use super::tiny::{write_hf_dir, StDtype, TinyModel};

/// The value of an E4M3 code: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0
/// is subnormal (m/8 · 2⁻⁶); S.1111.111 is NaN; there are no infinities.
pub fn value(code: u8) -> f64 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((code >> 3) & 0x0f, (code & 7) as f64);
    if e == 0x0f && m == 7.0 {
        return f64::NAN;
    }
    let magnitude = if e == 0 { m / 8.0 * 2f64.powi(-6) } else { (1.0 + m / 8.0) * 2f64.powi(e as i32 - 7) };
    sign * magnitude
}

/// The code nearest `x` by search over every finite code, ties to the even code, saturating
/// at ±448.
pub fn nearest(x: f64) -> u8 {
    let a = x.abs().min(448.0);
    let mut best = 0u8;
    for c in 1..=0x7eu8 {
        let (d, d_best) = ((value(c) - a).abs(), (value(best) - a).abs());
        // A tie is between neighbours, so exactly one of them is even.
        if d < d_best || (d == d_best && c % 2 == 0) {
            best = c;
        }
    }
    if x < 0.0 {
        best | 0x80
    } else {
        best
    }
}

/// How far `y` is from the nearest rounding boundary (a midpoint between neighbouring
/// codes), relative to |y|: f32 noise smaller than this cannot change its code.
fn margin(y: f64) -> f64 {
    let a = y.abs();
    if a >= 448.0 {
        return (a - 432.0) / a; // everything above the 416–448 midpoint saturates to 448
    }
    let c = nearest(a);
    let mut m = f64::INFINITY;
    if c > 0 {
        m = m.min(a - (value(c - 1) + value(c)) / 2.0);
    }
    if c < 0x7e {
        m = m.min((value(c) + value(c + 1)) / 2.0 - a);
    }
    m.abs() / a.max(f64::MIN_POSITIVE)
}

/// One scale per row of `cols` values: the row's largest magnitude / 448, as f32 (1 for a
/// row of zeros).
pub fn scales(values: &[f32], cols: usize) -> Vec<f32> {
    values
        .chunks(cols)
        .map(|row| {
            let amax = row.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
            if amax > 0.0 {
                (amax / 448.0) as f32
            } else {
                1.0
            }
        })
        .collect()
}

/// The code of each value over its row's scale.
pub fn codes(values: &[f32], cols: usize, scales: &[f32]) -> Vec<u8> {
    values
        .chunks(cols)
        .zip(scales)
        .flat_map(|(row, &s)| row.iter().map(move |&x| nearest(x as f64 / s as f64)))
        .collect()
}

/// `value(code) × scale` of every code, row by row, in f64.
pub fn dequantize(codes: &[u8], scales: &[f32], cols: usize) -> Vec<f64> {
    codes.chunks(cols).zip(scales).flat_map(|(row, &s)| row.iter().map(move |&c| value(c) * s as f64)).collect()
}

/// How a checkpoint quantizes the inputs of its FP8 projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inputs {
    None,
    DynamicPerToken,
    StaticPerTensor,
}

/// The layout of an FP8 checkpoint written for a test.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub per_tensor: bool,
    pub inputs: Inputs,
    /// Whether an untied `lm_head` is FP8 too (else it is left out by the config).
    pub quantize_head: bool,
    /// The dtype of `weight_scale` and `input_scale` tensors.
    pub scale_dtype: StDtype,
    /// Per-tensor scales as ModelOpt stores them (shape `[]`) rather than compressed-tensors
    /// (`[1]`).
    pub scalar_scales: bool,
}

/// An FP8 module as the checkpoint stores it.
pub struct Fp8Module {
    pub codes: Vec<u8>,
    /// One per row, or one for the tensor; already rounded to the stored dtype.
    pub scales: Vec<f32>,
    pub input_scale: Option<f32>,
}

/// A tiny model written as an FP8 checkpoint: what the file holds, for the reference.
pub struct Fp8Model {
    /// Everything not FP8, as stored (f32).
    pub stored: TinyModel,
    /// FP8 modules by weight name (`...q_proj.weight`).
    pub modules: HashMap<String, Fp8Module>,
    pub layout: Layout,
    /// The smallest distance to a rounding boundary of any activation the reference
    /// quantized (relative), to tell whether f32 noise could flip a code.
    pub margin: Cell<f64>,
}

impl Fp8Model {
    /// Quantizes `model`'s projections into `dir` as a Hugging Face folder, the rest in f32;
    /// the caller adds the quantization config. (Not bf16: products of bf16 embeddings and
    /// norm weights land exactly on E4M3 rounding midpoints now and then, where f32 and f64
    /// arithmetic may round either way.)
    pub fn write(model: &TinyModel, layout: Layout, dir: &Path) -> Self {
        let stored = write_hf_dir(model, StDtype::F32, dir);
        let mut modules = HashMap::new();
        for (i, (name, (shape, data))) in sorted(&stored).into_iter().enumerate() {
            if !is_fp8(name, layout) {
                continue;
            }
            let cols = if layout.per_tensor { data.len() } else { shape[1] };
            let scales: Vec<f32> = scales(data, cols).iter().map(|&s| layout.scale_dtype.round(s)).collect();
            let codes = codes(data, cols, &scales);
            // Static input scales that make the largest activations saturate now and then.
            let input_scale = (layout.inputs == Inputs::StaticPerTensor)
                .then(|| layout.scale_dtype.round((1.5 + (i % 3) as f32) / 448.0));
            modules.insert(name.clone(), Fp8Module { codes, scales, input_scale });
        }
        let m = Fp8Model { stored, modules, layout, margin: Cell::new(f64::INFINITY) };
        m.write_safetensors(dir);
        m
    }

    fn write_safetensors(&self, dir: &Path) {
        let mut tensors: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = vec![];
        for (name, (shape, data)) in sorted(&self.stored) {
            let Some(m) = self.modules.get(name) else {
                let (dt, bytes) = StDtype::F32.encode(data);
                tensors.push((name.clone(), shape.clone(), dt, bytes));
                continue;
            };
            let module = name.strip_suffix(".weight").unwrap();
            tensors.push((name.clone(), shape.clone(), Dtype::F8_E4M3, m.codes.clone()));
            let (dt, bytes) = self.layout.scale_dtype.encode(&m.scales);
            tensors.push((format!("{module}.weight_scale"), self.scale_shape(shape[0]), dt, bytes));
            if let Some(s) = m.input_scale {
                let (dt, bytes) = self.layout.scale_dtype.encode(&[s]);
                tensors.push((format!("{module}.input_scale"), self.scale_shape(1), dt, bytes));
            }
        }
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(name, shape, dt, bytes)| (name.clone(), TensorView::new(*dt, shape.clone(), bytes).unwrap()))
            .collect();
        std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    }

    /// `[rows, 1]` per channel; per tensor `[1]` (compressed-tensors) or `[]` (ModelOpt).
    fn scale_shape(&self, rows: usize) -> Vec<usize> {
        match (self.layout.per_tensor || rows == 1, self.layout.scalar_scales) {
            (false, _) => vec![rows, 1],
            (true, false) => vec![1],
            (true, true) => vec![],
        }
    }

    /// Writes `config.json` with `quantization_config` set to `qc`.
    pub fn set_quantization_config(&self, dir: &Path, qc: Option<Value>) {
        let mut config = self.stored.spec.config_json();
        if let Some(qc) = qc {
            config["quantization_config"] = qc;
        }
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    }

    /// The weight `name` in f64 as the reference computes with it.
    pub fn weight(&self, name: &str) -> Vec<f64> {
        match self.modules.get(name) {
            Some(m) => {
                let cols = self.stored.weights[name].0[1];
                let scales =
                    if m.scales.len() == 1 { vec![m.scales[0]; m.codes.len() / cols] } else { m.scales.clone() };
                dequantize(&m.codes, &scales, cols)
            }
            None => self.stored.get(name).iter().map(|&x| x as f64).collect(),
        }
    }

    /// What the projection `name` computes with in place of its input `x`.
    pub fn input(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let Some(m) = self.modules.get(name) else { return x.to_vec() };
        let scale = match self.layout.inputs {
            Inputs::None => return x.to_vec(),
            Inputs::DynamicPerToken => x.iter().fold(0f64, |a, v| a.max(v.abs())) / 448.0,
            Inputs::StaticPerTensor => m.input_scale.unwrap() as f64,
        };
        if scale == 0.0 {
            return x.to_vec();
        }
        x.iter()
            .map(|&v| {
                self.margin.set(self.margin.get().min(margin(v / scale)));
                value(nearest(v / scale)) * scale
            })
            .collect()
    }

    /// The f64 reference logits of `tokens`.
    pub fn reference(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        reference::forward_with(&self.stored.spec, &|n| self.weight(n), &|n, x| self.input(n, x), tokens)
    }
}

fn is_fp8(name: &str, layout: Layout) -> bool {
    name.contains("_proj.") || (name == "lm_head.weight" && layout.quantize_head)
}

/// A weight's shape and values.
type Weight = (Vec<usize>, Vec<f32>);

fn sorted(m: &TinyModel) -> Vec<(&String, &Weight)> {
    let mut v: Vec<_> = m.weights.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

/// The compressed-tensors `quantization_config` for `layout` (llm-compressor's fields).
pub fn compressed_tensors_config(layout: Layout) -> Value {
    let strategy = if layout.per_tensor { "tensor" } else { "channel" };
    let args = |strategy: &str, dynamic: bool| {
        json!({"num_bits": 8, "type": "float", "symmetric": true, "strategy": strategy, "dynamic": dynamic,
               "group_size": null, "block_structure": null, "actorder": null, "observer": null, "observer_kwargs": {}})
    };
    let inputs = match layout.inputs {
        Inputs::None => Value::Null,
        Inputs::DynamicPerToken => args("token", true),
        Inputs::StaticPerTensor => args("tensor", false),
    };
    json!({
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": null,
        "kv_cache_scheme": null,
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": args(strategy, false),
            "input_activations": inputs,
            "output_activations": null,
            "format": null,
        }},
        "ignore": if layout.quantize_head { json!([]) } else { json!(["lm_head"]) },
    })
}
