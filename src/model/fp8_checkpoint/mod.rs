//! Pre-quantized FP8 checkpoints, loaded without conversion: which projections are FP8 and
//! with which scheme, as the checkpoint's quantization config says. Two formats:
//! - `compressed-tensors` (llm-compressor; `quantization_config.quant_method ==
//!   "compressed-tensors"` in `config.json`): config groups of `weights` (float, 8 bits,
//!   `channel` or `tensor` strategy) and `input_activations` (none, dynamic per `token`, or
//!   static per `tensor` with a stored `input_scale`), targets and an `ignore` list;
//! - NVIDIA ModelOpt (`quantization_config.quant_method == "modelopt"`, or an
//!   `hf_quant_config.json`): `quant_algo` `FP8` (per-tensor `weight_scale`, static
//!   per-tensor `input_scale`) or `FP8_PER_CHANNEL_PER_TOKEN`, and `exclude_modules`.
//!
//! The tensors themselves decide what is FP8: a module's `weight` stored as `F8_E4M3` takes
//! the scheme its config gives it, with `weight_scale` (and `input_scale` when static) beside
//! it; a module stored in a wider type is loaded as it is. A scheme we cannot compute
//! exactly (group- or block-wise scales, integers, 4-bit, dynamic per-tensor activations,
//! ...) is refused by name.

mod compressed_tensors;
mod modelopt;

use std::path::Path;

use regex::Regex;
use serde_json::Value;

use super::LoadError;
use crate::tensor::quant::ScaleGranularity;

/// How a module's inputs are quantized, before any stored scale is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputQuant {
    /// Weight-only: activations stay unquantized.
    None,
    /// Each token's row with its own scale, amax / 448.
    DynamicPerToken,
    /// Every value with the module's stored `input_scale`.
    StaticPerTensor,
}

/// How one module (a linear layer such as `model.layers.0.self_attn.q_proj`) is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Scheme {
    pub weights: ScaleGranularity,
    pub inputs: InputQuant,
}

/// The FP8 quantization config of a checkpoint.
#[derive(Debug)]
pub enum Fp8Checkpoint {
    CompressedTensors(compressed_tensors::Config),
    ModelOpt(modelopt::Config),
}

impl Fp8Checkpoint {
    /// Reads the quantization config of a Hugging Face folder: `config.json`'s
    /// `quantization_config`, else ModelOpt's `hf_quant_config.json`. `None` for an
    /// unquantized checkpoint; an error for a quantization we do not run.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, LoadError> {
        let config_path = dir.join("config.json");
        if let Some(qc) = read_json(&config_path)?.and_then(|c| c.get("quantization_config").cloned()) {
            return Self::from_quantization_config(&config_path, &qc).map(Some);
        }
        let hf_quant = dir.join("hf_quant_config.json");
        match read_json(&hf_quant)? {
            Some(v) => modelopt::Config::from_hf_quant_config(&hf_quant, &v).map(|c| Some(Fp8Checkpoint::ModelOpt(c))),
            None => Ok(None),
        }
    }

    fn from_quantization_config(path: &Path, qc: &Value) -> Result<Self, LoadError> {
        let method = qc.get("quant_method").and_then(Value::as_str).unwrap_or("");
        match method {
            "compressed-tensors" => compressed_tensors::Config::parse(path, qc).map(Fp8Checkpoint::CompressedTensors),
            m if m.to_ascii_lowercase().starts_with("modelopt") => {
                modelopt::Config::from_quantization_config(path, qc).map(Fp8Checkpoint::ModelOpt)
            }
            "" => Err(LoadError::format(path, "`quantization_config` has no `quant_method`")),
            other => Err(LoadError::unsupported_quantization(
                path,
                format!("quant_method `{other}` (FP8 checkpoints load from compressed-tensors and ModelOpt)"),
            )),
        }
    }

    /// The scheme of `module` (a weight's name without `.weight`), or `None` when the
    /// config leaves it unquantized.
    pub fn scheme_for(&self, module: &str) -> Option<Fp8Scheme> {
        match self {
            Fp8Checkpoint::CompressedTensors(c) => c.scheme_for(module),
            Fp8Checkpoint::ModelOpt(c) => c.scheme_for(module),
        }
    }
}

/// A JSON file, or `None` when there is no such file.
fn read_json(path: &Path) -> Result<Option<Value>, LoadError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| LoadError::format(path, format!("invalid JSON: {e}")))
}

/// A list of strings at `key` of `obj` (missing or null: empty).
fn strings(path: &Path, obj: &Value, key: &str) -> Result<Vec<String>, LoadError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| wrong(path, key, "a list of strings")))
            .collect(),
        Some(_) => Err(wrong(path, key, "a list of strings")),
    }
}

fn wrong(path: &Path, key: &str, expected: &str) -> LoadError {
    LoadError::format(path, format!("quantization config: `{key}` should be {expected}"))
}

/// A regular expression matched from the start of a module name, as Python's `re.match`.
fn anchored(path: &Path, pattern: &str) -> Result<Regex, LoadError> {
    Regex::new(&format!("^(?:{pattern})"))
        .map_err(|e| LoadError::format(path, format!("quantization config: pattern `{pattern}`: {e}")))
}
