//! NVIDIA ModelOpt's quantization config, in either of its two homes:
//!
//! ```json
//! hf_quant_config.json:  {"producer": {"name": "modelopt"},
//!                         "quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head"]}}
//! config.json:           "quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8",
//!                                                 "ignore": ["lm_head"]}
//! ```
//!
//! `FP8`: per-tensor `weight_scale` and static per-tensor `input_scale` scalars beside every
//! quantized weight. `FP8_PER_CHANNEL_PER_TOKEN`: a `weight_scale` per output channel and
//! dynamic per-token activations. Excluded modules are given by name, by a part of their
//! name, or as shell wildcards (`model.layers.0.mlp*`).

use std::path::Path;

use regex::Regex;
use serde_json::Value;

use super::{anchored, strings, Fp8Scheme, InputQuant};
use crate::model::LoadError;
use crate::tensor::quant::ScaleGranularity;

#[derive(Debug)]
pub struct Config {
    scheme: Fp8Scheme,
    exclude: Vec<(String, Regex)>,
}

impl Config {
    pub fn from_hf_quant_config(path: &Path, v: &Value) -> Result<Self, LoadError> {
        let q = v
            .get("quantization")
            .filter(|q| q.is_object())
            .ok_or_else(|| LoadError::format(path, "`hf_quant_config.json` has no `quantization` object"))?;
        Self::new(path, q.get("quant_algo"), strings(path, q, "exclude_modules")?)
    }

    /// `config.json`'s `quantization_config`: the algorithm at the top or under `quantization`.
    pub fn from_quantization_config(path: &Path, qc: &Value) -> Result<Self, LoadError> {
        match qc.get("quantization").filter(|q| q.is_object()) {
            Some(q) => Self::new(path, q.get("quant_algo"), strings(path, q, "exclude_modules")?),
            None => {
                let mut exclude = strings(path, qc, "ignore")?;
                exclude.extend(strings(path, qc, "exclude_modules")?);
                Self::new(path, qc.get("quant_algo"), exclude)
            }
        }
    }

    fn new(path: &Path, algo: Option<&Value>, exclude: Vec<String>) -> Result<Self, LoadError> {
        let algo = algo
            .and_then(Value::as_str)
            .ok_or_else(|| LoadError::format(path, "ModelOpt quantization config has no `quant_algo` string"))?;
        let scheme = match algo.to_ascii_uppercase().as_str() {
            "FP8" => Fp8Scheme { weights: ScaleGranularity::PerTensor, inputs: InputQuant::StaticPerTensor },
            "FP8_PER_CHANNEL_PER_TOKEN" => {
                Fp8Scheme { weights: ScaleGranularity::PerChannel, inputs: InputQuant::DynamicPerToken }
            }
            _ => {
                return Err(LoadError::unsupported_quantization(
                    path,
                    format!("ModelOpt quant_algo `{algo}` (FP8 and FP8_PER_CHANNEL_PER_TOKEN load)"),
                ))
            }
        };
        let exclude = exclude
            .into_iter()
            .map(|p| {
                let re = anchored(path, &format!("{}$", wildcard_to_regex(&p)))?;
                Ok((p, re))
            })
            .collect::<Result<_, LoadError>>()?;
        Ok(Config { scheme, exclude })
    }

    pub fn scheme_for(&self, module: &str) -> Option<Fp8Scheme> {
        // As ModelOpt's loaders: the whole name, a part of it, or a wildcard match.
        let excluded = self.exclude.iter().any(|(p, re)| module.contains(p.as_str()) || re.is_match(module));
        (!excluded).then_some(self.scheme)
    }
}

/// A shell wildcard (`*`, `?`) as a regular expression; everything else literal.
fn wildcard_to_regex(pattern: &str) -> String {
    pattern
        .chars()
        .map(|c| match c {
            '*' => ".*".to_string(),
            '?' => ".".to_string(),
            c => regex::escape(&c.to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_homes_and_exclusions() {
        let hf = json!({"producer": {"name": "modelopt"},
                        "quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head", "model.layers.1.mlp*"]}});
        let c = Config::from_hf_quant_config(Path::new("hf_quant_config.json"), &hf).unwrap();
        let fp8 = Some(Fp8Scheme { weights: ScaleGranularity::PerTensor, inputs: InputQuant::StaticPerTensor });
        assert_eq!(c.scheme_for("model.layers.0.mlp.up_proj"), fp8);
        assert_eq!(c.scheme_for("model.layers.1.mlp.up_proj"), None);
        assert_eq!(c.scheme_for("model.layers.1.self_attn.q_proj"), fp8);
        assert_eq!(c.scheme_for("lm_head"), None);

        let qc = json!({"quant_method": "modelopt", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "ignore": ["lm_head"]});
        let c = Config::from_quantization_config(Path::new("config.json"), &qc).unwrap();
        let scheme = Fp8Scheme { weights: ScaleGranularity::PerChannel, inputs: InputQuant::DynamicPerToken };
        assert_eq!(c.scheme_for("model.layers.0.mlp.up_proj"), Some(scheme));
        assert_eq!(c.scheme_for("lm_head"), None);
    }

    #[test]
    fn other_algorithms_are_refused_by_name() {
        for algo in ["NVFP4", "FP8_PB_WO", "W4A8_AWQ", "MIXED_PRECISION"] {
            let qc = json!({"quant_method": "modelopt", "quant_algo": algo});
            let err = Config::from_quantization_config(Path::new("config.json"), &qc).unwrap_err();
            assert!(
                matches!(err, LoadError::UnsupportedQuantization { .. }) && err.to_string().contains(algo),
                "{err}"
            );
        }
    }
}
